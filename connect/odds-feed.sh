#!/usr/bin/env bash
# A gentle odds feed: every FEED_INTERVAL seconds, move the odds of one random game as a small
# random walk, in PostgreSQL (plain SQL through psql). Used by docker-compose.yml and dev/up.
# Connection: PGHOST (postgres), PGPORT (5432), PGUSER (postgres), PGPASSWORD as psql reads them.
set -euo pipefail
interval=${FEED_INTERVAL:-0.5}
while true; do
  psql -v ON_ERROR_STOP=1 -q -h "${PGHOST:-postgres}" -p "${PGPORT:-5432}" -U "${PGUSER:-postgres}" -d gameodds -c "
    UPDATE game_odds SET
      odd1 = greatest(1.01, odd1 + round((random() - 0.5)::numeric * 0.2, 3)),
      odd2 = greatest(1.01, odd2 + round((random() - 0.5)::numeric * 0.2, 3)),
      updated_at = now()
    WHERE game_id = 'g' || (1 + floor(random() * 20))::int;"
  sleep "$interval"
done
