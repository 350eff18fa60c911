"""What a reader positioned past the end of a recreated topic sees (BUG-1 of RELIABILITY.md).

    python3 -m venv /tmp/ckv && /tmp/ckv/bin/pip install confluent-kafka
    /tmp/ckv/bin/python dev/probes/tansu_recreated_topic.py 127.0.0.1:19192 [--keep-consumer]

Produces 100 records, reads them, deletes and recreates the topic, produces 5, and reports what
a consumer still positioned at offset 100 receives (records, errors, the watermarks of its
fetch responses) for 10 s; then what a consumer assigned at offset 100 from scratch receives.
"""

import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

args = [a for a in sys.argv[1:] if not a.startswith("--")]
brokers = args[0] if args else "127.0.0.1:19192"
topic = f"probe-recreate-{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": brokers})


def create():
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(10)


def produce(n, tag):
    p = Producer({"bootstrap.servers": brokers, "allow.auto.create.topics": False})
    for i in range(n):
        p.produce(topic, key=f"{tag}{i}", value=b"x", partition=0)
    print("unflushed", p.flush(10))


def consumer():
    return Consumer({
        "bootstrap.servers": brokers,
        "group.id": "probe-" + uuid.uuid4().hex[:6],
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 10,
    })


def watch(c, secs, label):
    t0 = time.time()
    got = []
    errs = []
    while time.time() - t0 < secs:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            errs.append(str(m.error()))
        else:
            got.append(m.offset())
    lo, hi = c.get_watermark_offsets(TopicPartition(topic, 0), cached=True)
    print(f"{label}: records at offsets {got[:10]}{'...' if len(got) > 10 else ''} ({len(got)}), errors {errs[:3]}, cached watermarks ({lo}, {hi}), position {c.position([TopicPartition(topic, 0)])[0].offset}")


create()
produce(100, "a")
c = consumer()
c.assign([TopicPartition(topic, 0, 0)])
watch(c, 5, "before")
if "--keep-consumer" not in sys.argv:
    # a consumer assigned to the topic while it is deleted dies of SIGSEGV on Tansu 0.6
    # (librdkafka 2.16 here, 2.x in livetable): BUG-3
    c.close()
print("deleting", flush=True)
for f in admin.delete_topics([topic]).values():
    f.result(10)
time.sleep(2)
if "--keep-consumer" in sys.argv:
    watch(c, 3, "deleted")
create()
produce(5, "b")
if "--keep-consumer" in sys.argv:
    watch(c, 10, "recreated, same consumer")
    c.close()
c2 = consumer()
c2.assign([TopicPartition(topic, 0, 100)])
watch(c2, 10, "recreated, new consumer at 100")
c2.close()
c3 = consumer()
c3.assign([TopicPartition(topic, 0, 0)])
watch(c3, 5, "recreated, new consumer at 0")
c3.close()
