#!/usr/bin/env bash
# Restart -> ready of livetable binaries on fresh copies of one data directory, interleaved
# (BENCHMARKS.md, "The store load on every core"). Make the data directory and its topics with
#
#   BENCH_KEEP=1 target/release/bench --brokers 127.0.0.1:19092 --scenarios recovery
#
# which prints the run id (`b<seconds>`) in its commands and keeps $WORK/data-recovery. Then
#
#   load/restart_copies.sh /tmp/livetable-benchXXXX/data-recovery b1796427580 0 4 \
#       /tmp/livetable-before /tmp/livetable-after
#
# runs ROUNDS rounds of one start per binary, the node pinned to CPUS (taskset list: 0, or 0,1),
# each on a new copy of the directory with the bench's flags and a broker on $BROKERS
# (default 127.0.0.1:19092). Prints per start: ready (process start -> /readyz 200, polled every
# 20 ms), the store load's elapsed_ms from the log, and the peak resident memory; then stops the
# node with SIGTERM. Every wait is bounded (60 s to ready, 60 s to exit).
#
# EMPTY=1 starts each node on an empty data directory instead (a restore from the changelog;
# DATA is then not read) and prints the slowest slice's take-over (`slice taken
# over ... elapsed_ms`) instead of the store load.
set -euo pipefail
[[ $# -ge 5 ]] || { sed -n 2,21p "$0"; exit 2; }
SRC=$1 RUN=$2 CPUS=$3 ROUNDS=$4
shift 4
BROKERS=${BROKERS:-127.0.0.1:19092}
PORT=${PORT:-37055}
WORK=$(mktemp -d /tmp/restart-copies.XXXX)
echo "copies and logs in $WORK"
for round in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    d=$WORK/data log=$WORK/$(basename "$bin")-$round.log
    rm -rf "$d"
    if [[ ${EMPTY:-0} == 1 ]]; then mkdir -p "$d"; else cp -r "$SRC" "$d"; fi
    sync
    start=$(date +%s.%N)
    taskset -c "$CPUS" "$bin" --brokers "$BROKERS" --topics "$RUN.recovery.game_odds" \
      --group-id "$RUN-recovery" --listen "127.0.0.1:$PORT" \
      --changelog-prefix "$RUN.recovery.table." --dlq-topic "$RUN.recovery.dlq" \
      --max-connections-per-ip 0 --log info --data-dir "$d" > "$log" 2>&1 &
    pid=$!
    ready=
    for _ in $(seq 1 3000); do
      if curl -sf -o /dev/null "http://127.0.0.1:$PORT/readyz"; then ready=$(date +%s.%N); break; fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.02
    done
    if [[ ${EMPTY:-0} == 1 ]]; then
      load="slowest_take_ms=$(grep 'slice taken over' "$log" | grep -o ' elapsed_ms=[0-9]*' | cut -d= -f2 | sort -n | tail -1 || true)"
    else
      load=$(grep -o 'store loaded.*' "$log" | grep -o 'elapsed_ms=[0-9]*' | head -1 || true)
    fi
    hwm=$(grep VmHWM "/proc/$pid/status" 2>/dev/null | tr -s ' \t' ' ' || true)
    if [[ -n $ready ]]; then
      echo "$(basename "$bin") round $round: ready_s=$(awk -v a="$start" -v b="$ready" 'BEGIN { printf "%.3f", b - a }') $load $hwm"
    else
      echo "$(basename "$bin") round $round: not ready within 60 s (log $log)"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
done
rm -rf "$WORK/data"
