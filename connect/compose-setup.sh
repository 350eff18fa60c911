#!/usr/bin/env bash
# One-shot setup of docker-compose.yml (runs in the Debezium Connect image, which has the Kafka CLI
# and curl): create the compacted changelog and dead-letter topics as topics/ defines them, then
# register the PostgreSQL connector through Connect's REST API. Idempotent.
set -euo pipefail
BOOTSTRAP=${BOOTSTRAP:-kafka:9092}
CONNECT=${CONNECT:-http://connect:8083}
TOPICS=/kafka/bin/kafka-topics.sh

# topics/changelog.toml: 1 partition, compacted; topics/dlq.toml: delete, 14 days
$TOPICS --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic livetable.table.game_odds \
  --partitions 1 --config cleanup.policy=compact --config min.cleanable.dirty.ratio=0.1 \
  --config segment.ms=3600000 --config delete.retention.ms=86400000
$TOPICS --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic livetable.dlq \
  --partitions 1 --config cleanup.policy=delete --config retention.ms=1209600000

name=$(sed -n 's/.*"name": *"\([^"]*\)".*/\1/p' /setup/postgres-odds.json | head -1)
if curl -fsS "$CONNECT/connectors/$name" >/dev/null 2>&1; then
  echo "connector $name already registered"
else
  curl -fsS -X POST -H 'Content-Type: application/json' --data @/setup/postgres-odds.json "$CONNECT/connectors"
  echo
fi
