#!/usr/bin/env bash
# Whole-table reads against a running livetable (BENCHMARKS.md, "Whole-table reads"): first
# byte and total time of ROUNDS reads of TABLE one after another, then READERS reads at once,
# each downloading at RATE (curl --limit-rate, e.g. 1M) for at most SECS seconds, while the
# node's resident memory is sampled every second. Prints each read's times, the peak resident
# memory of PID (VmHWM) before and after the slow readers, and the HTTP codes they got.
#
#   load/table_reads.sh http://127.0.0.1:38561 game_odds "$(pgrep -f 'listen 127.0.0.1:38561')" \
#       3 30 1M 20
#
# Every loop is bounded (ROUNDS, READERS, SECS). Needs curl.
set -euo pipefail
[[ $# -eq 7 ]] || { sed -n 2,12p "$0"; exit 2; }
BASE=$1 TABLE=$2 PID=$3 ROUNDS=$4 READERS=$5 RATE=$6 SECS=$7
OUT=$(mktemp -d /tmp/table-reads.XXXX)
trap 'rm -rf "$OUT"' EXIT
rss() { awk -v k="$1:" '$1 == k { print $2 " kB" }' "/proc/$PID/status"; }
echo "before: VmRSS $(rss VmRSS), VmHWM $(rss VmHWM)"
for i in $(seq 1 "$ROUNDS"); do
  curl -s -o /dev/null --max-time 60 \
    -w "read $i: %{http_code} %{size_download} bytes, first byte %{time_starttransfer} s, total %{time_total} s\n" \
    "$BASE/api/tables/$TABLE"
done
echo "after $ROUNDS reads: VmRSS $(rss VmRSS), VmHWM $(rss VmHWM)"
for i in $(seq 1 "$READERS"); do
  curl -s -o /dev/null --limit-rate "$RATE" --max-time "$SECS" -w "%{http_code}\n" \
    "$BASE/api/tables/$TABLE" > "$OUT/code.$i" 2>/dev/null &
done
for s in $(seq 1 "$SECS"); do
  sleep 1
  echo "$s s: VmRSS $(rss VmRSS), copies in progress $(curl -s "$BASE/metrics" | awk '$1 == "livetable_table_copies" { print $2 }')"
done
wait
echo "after $READERS slow readers: VmHWM $(rss VmHWM)"
echo "their codes (a read cut by --max-time still got its 200):"
cat "$OUT"/code.* | sort | uniq -c
