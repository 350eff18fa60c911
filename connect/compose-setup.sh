#!/usr/bin/env bash
# One-shot setup of docker-compose.yml (runs in the Debezium Connect image, which has curl):
# register the PostgreSQL connector through Connect's REST API. Idempotent. livetable creates its
# own topics (changelogs with their input topic's partition count, the registry, the dead-letter
# topic) as topics/*.toml define them.
set -euo pipefail
CONNECT=${CONNECT:-http://connect:8083}

name=$(sed -n 's/.*"name": *"\([^"]*\)".*/\1/p' /setup/postgres-odds.json | head -1)
if curl -fsS "$CONNECT/connectors/$name" >/dev/null 2>&1; then
  echo "connector $name already registered"
else
  curl -fsS -X POST -H 'Content-Type: application/json' --data @/setup/postgres-odds.json "$CONNECT/connectors"
  echo
fi
