//! Acknowledgements checked against the topic: a uniform sample of the acks of a run, each read
//! back at the partition and offset it names, must be the record whose `livetable.publish_id`
//! header is that publish's id. A count of acks is only worth reporting when the acks say where
//! the records really are.

use std::time::{Duration, Instant};

use anyhow::Context;
use livetable::publish::recover::HEADER_ID;
use livetable::publish::Ack;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};

/// An acknowledged publish: its id as JSON text (as in the header) and the position its ack gave.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sampled {
    pub partition: i32,
    pub offset: i64,
    pub id: String,
}

/// A reservoir of at most `cap` acks, uniform over the acks offered (deterministic per seed).
pub struct Sample {
    cap: usize,
    seen: u64,
    rng: u64,
    pub acks: Vec<Sampled>,
}

impl Sample {
    pub fn new(cap: usize, seed: u64) -> Sample {
        Sample {
            cap,
            seen: 0,
            // xorshift needs a non-zero state
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            acks: Vec::new(),
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    pub fn offer(&mut self, ack: &Ack) {
        if self.cap == 0 {
            return;
        }
        let Some(id) = &ack.id else { return };
        self.seen += 1;
        let s = Sampled {
            partition: ack.partition,
            offset: ack.offset,
            id: id.to_string(),
        };
        if self.acks.len() < self.cap {
            self.acks.push(s);
        } else {
            let j = (self.next() % self.seen) as usize;
            if j < self.cap {
                self.acks[j] = s;
            }
        }
    }
}

/// The `livetable.publish_id` header of the record at `partition`/`offset` (None: no such record
/// within 10 s, or no header).
fn id_at(
    c: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<Option<String>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    c.assign(&tpl)?;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.with_context(|| format!("reading {topic}/{partition}@{offset}"))?;
        // after a new assignment, records fetched for the previous one may still arrive
        if m.partition() != partition || m.offset() != offset {
            continue;
        }
        let id = m.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == HEADER_ID)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        return Ok(id);
    }
    Ok(None)
}

/// Reads every sampled ack's record back from `topic`; a JSON report: sampled, matched, and the
/// first mismatches.
pub fn verify(brokers: &str, topic: &str, mut acks: Vec<Sampled>) -> anyhow::Result<Value> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("publish-load-verify-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("verification consumer")?;
    // forward through each partition: every assignment starts a fetch at the wanted offset
    acks.sort();
    let mut matched = 0u64;
    let mut mismatches = Vec::new();
    for s in &acks {
        let got = id_at(&c, topic, s.partition, s.offset)?;
        if got.as_deref() == Some(s.id.as_str()) {
            matched += 1;
        } else if mismatches.len() < 5 {
            mismatches.push(format!(
                "ack of {} at {}/{}: the record there has id {}",
                s.id,
                s.partition,
                s.offset,
                got.as_deref().unwrap_or("(none, or no record)")
            ));
        }
    }
    Ok(json!({
        "sampled": acks.len(),
        "matched": matched,
        "mismatches": mismatches,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(n: i64) -> Ack {
        Ack {
            id: Some(json!(format!("c-{n}"))),
            topic: "t".into(),
            partition: (n % 3) as i32,
            offset: n,
            duplicate: false,
        }
    }

    #[test]
    fn the_sample_is_bounded_and_spread_over_the_run() {
        let mut s = Sample::new(50, 7);
        for n in 0..10_000 {
            s.offer(&ack(n));
        }
        assert_eq!(s.acks.len(), 50);
        // uniform: some of the sample comes from the second half of the run
        assert!(s.acks.iter().any(|a| a.offset >= 5_000));
        // the id is kept as JSON text, as in the record's header
        assert!(s.acks.iter().all(|a| a.id.starts_with("\"c-")));
        let mut none = Sample::new(0, 1);
        none.offer(&ack(1));
        assert!(none.acks.is_empty());
    }
}
