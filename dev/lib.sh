# Shared helpers for the dev/ scripts. Sourced, not executed.
# Everything the scripts create lives in two places:
#   $LIVETABLE_CACHE (default ~/.cache/livetable): downloads, keyed by version and checksum
#   $LIVETABLE_RUN   (default <repo>/.run):        pid files, logs, data directories

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIVETABLE_CACHE=${LIVETABLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/livetable}
LIVETABLE_RUN=${LIVETABLE_RUN:-$REPO_ROOT/.run}
mkdir -p "$LIVETABLE_CACHE" "$LIVETABLE_RUN/logs"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_port HOST PORT SECONDS NAME: poll until the port accepts, or fail.
wait_port() {
  local host=$1 port=$2 secs=$3 name=$4 i
  for ((i = 0; i < secs * 10; i++)); do
    port_open "$host" "$port" && return 0
    sleep 0.1
  done
  die "$name did not accept connections on $host:$port within ${secs}s (log: $LIVETABLE_RUN/logs/$name.log)"
}

# pid_alive FILE: true when the pid in FILE names a running process (a zombie, killed but not yet
# reaped, does not count).
pid_alive() {
  [[ -f $1 ]] || return 1
  local pid state
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(ps -o stat= -p "$pid" 2>/dev/null)
  [[ -n $state && $state != Z* ]]
}

# stop_pid NAME [GRACE_SECONDS]: SIGTERM the process in $LIVETABLE_RUN/NAME.pid, SIGKILL after the grace.
stop_pid() {
  local name=$1 grace=${2:-10} file="$LIVETABLE_RUN/$1.pid" pid i
  if ! pid_alive "$file"; then rm -f "$file"; log "$name is not running"; return 0; fi
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$file"; log "$name stopped (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
  log "$name killed after ${grace}s (pid $pid)"
}

# sha256_ok FILE SUM
sha256_ok() { [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]]; }
