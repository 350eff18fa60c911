#!/usr/bin/env bash
# A gentle odds feed for docker-compose.yml: every FEED_INTERVAL seconds, move the odds of one
# random game as a small random walk (plain SQL through psql; the Rust feed comes with `livetable`).
set -euo pipefail
interval=${FEED_INTERVAL:-0.5}
while true; do
  psql -v ON_ERROR_STOP=1 -q -h postgres -U postgres -d gameodds -c "
    UPDATE game_odds SET
      odd1 = greatest(1.01, odd1 + round((random() - 0.5)::numeric * 0.2, 3)),
      odd2 = greatest(1.01, odd2 + round((random() - 0.5)::numeric * 0.2, 3)),
      updated_at = now()
    WHERE game_id = 'g' || (1 + floor(random() * 20))::int;"
  sleep "$interval"
done
