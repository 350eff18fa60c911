"""BROKER-1 of RELIABILITY.md: how fast a new consumer reads a 4-partition topic back from the
local broker, after it was written in batches of 1-2 records (as a producer at a few hundred
records/s with a short linger writes). Manual, not part of the suite:

    python3 -m venv /tmp/ckv && /tmp/ckv/bin/pip install confluent-kafka
    BROKER_ADDR=127.0.0.1:19092 ./dev/broker start
    /tmp/ckv/bin/python dev/probes/tansu_small_batches.py [brokers]
"""
import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

brokers = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:19092"
topic = f"tansuprobe{int(time.time())}"
admin = AdminClient({"bootstrap.servers": brokers})
admin.create_topics([NewTopic(topic, 4, 1)])[topic].result()
producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})


def read_all(expected, limit=60.0):
    """Reads the topic from the beginning; (records read, seconds), giving up after `limit`."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"probe{time.time()}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    c.assign([TopicPartition(topic, p, 0) for p in range(4)])
    t0, n = time.time(), 0
    while n < expected and time.time() - t0 < limit:
        n += len([m for m in c.consume(1000, 0.2) if not m.error()])
    c.close()
    return n, time.time() - t0


total = 0
for step in (5000, 20000, 40000):
    while total < step:
        key = f"k{total % 1000}"
        producer.produce(topic, key=json.dumps({"id": key}),
                         value=json.dumps({"op": "u", "after": {"id": key, "n": total}}))
        total += 1
        if total % 2 == 0:
            producer.flush()  # batches of 1-2 records
    producer.flush()
    n, secs = read_all(total)
    print(f"{total} records in the topic: a new consumer read {n} in {secs:.1f} s", flush=True)
