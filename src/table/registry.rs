//! The deployment's table registry: which tables exist, which input topic feeds each, how many
//! partitions it has and its lineage (`epoch`). Kept in a small compacted topic; every node reads
//! it, materialisers add to it when a table first appears.
//!
//! The first record of a table wins: two materialisers that register the same new table at once
//! (from different partitions) both read the registry back and adopt the earlier record, so every
//! node agrees on the table's lineage. A record written by another deployment (another group id on
//! the same topic names) stops the service: two deployments must never share changelogs.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use crate::cdc::source::Reader;
use rdkafka::message::Message;

use crate::table::changelog::{Changelog, RegistryEntry};
use crate::table::reader::{self, End, ReadError, Span};

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "table `{table}` in {topic} belongs to deployment `{other}`, not `{ours}`: two deployments \
         share the same changelog topics. Give each its own --group-id (the topic names derive \
         from it) or its own --changelog-prefix"
    )]
    OtherDeployment {
        table: String,
        topic: String,
        other: String,
        ours: String,
    },
    #[error("reading the registry: {0}")]
    Read(#[from] ReadError),
    #[error("writing the registry: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the registry entry of `{0}` was not acknowledged: {1}")]
    NotAcknowledged(String, String),
}

/// The registry as this node knows it.
pub struct Registry {
    deployment: String,
    topic: String,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, RegistryEntry>,
    /// Next offset of the registry topic to read.
    next: i64,
}

impl Registry {
    pub fn new(deployment: &str, topic: &str) -> Self {
        Registry {
            deployment: deployment.to_string(),
            topic: topic.to_string(),
            state: RwLock::new(State::default()),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn get(&self, table: &str) -> Option<RegistryEntry> {
        self.read().entries.get(table).cloned()
    }

    /// The tables fed by `topic`.
    pub fn tables_of(&self, topic: &str) -> Vec<RegistryEntry> {
        let mut v: Vec<RegistryEntry> = self
            .read()
            .entries
            .values()
            .filter(|e| e.source == topic)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.table.cmp(&b.table));
        v
    }

    pub fn all(&self) -> Vec<RegistryEntry> {
        let mut v: Vec<RegistryEntry> = self.read().entries.values().cloned().collect();
        v.sort_by(|a, b| a.table.cmp(&b.table));
        v
    }

    /// Next offset of the registry topic to read.
    pub fn next_offset(&self) -> i64 {
        self.read().next
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one registry record read at `offset`; returns the entry when it is new to this node.
    pub fn absorb(
        &self,
        offset: i64,
        payload: Option<&[u8]>,
    ) -> Result<Option<RegistryEntry>, RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.next = st.next.max(offset + 1);
        let Some(entry) = payload.and_then(|p| serde_json::from_slice::<RegistryEntry>(p).ok())
        else {
            tracing::warn!(
                offset,
                "registry: a record that is not a table entry; skipped"
            );
            return Ok(None);
        };
        if entry.deployment != self.deployment {
            return Err(RegistryError::OtherDeployment {
                table: entry.table,
                topic: self.topic.clone(),
                other: entry.deployment,
                ours: self.deployment.clone(),
            });
        }
        if !crate::table::position::valid_epoch(&entry.epoch) {
            // its tokens could never be resumed (and would break SSE event ids): as if it were
            // not there, on every node alike, so the next valid record fixes the lineage
            tracing::warn!(
                offset,
                table = %entry.table,
                "registry: a table entry whose epoch is not 1-64 letters, digits or '_'; skipped"
            );
            return Ok(None);
        }
        if st.entries.contains_key(&entry.table) {
            // the first record of a table fixes its lineage
            return Ok(None);
        }
        st.entries.insert(entry.table.clone(), entry.clone());
        Ok(Some(entry))
    }

    /// Reads the registry topic from where this node stopped to its end; returns the new entries.
    pub fn catch_up(
        &self,
        consumer: &Reader,
        stall: Duration,
        brokers: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<RegistryEntry>, RegistryError> {
        self.read_to(consumer, End::HighWatermark, stall, brokers, cancelled)
    }

    fn read_to(
        &self,
        consumer: &Reader,
        end: End,
        stall: Duration,
        brokers: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<RegistryEntry>, RegistryError> {
        let span = Span {
            topic: self.topic.clone(),
            partition: 0,
            from: Some(self.next_offset()),
            end,
        };
        let mut new = Vec::new();
        let mut failure = None;
        reader::read_spans(consumer, &[span], stall, brokers, cancelled, |m| {
            if failure.is_some() {
                return;
            }
            match self.absorb(m.offset(), m.payload()) {
                Ok(Some(e)) => new.push(e),
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(new),
        }
    }

    /// Registers `entry` unless the table is known, then reads the registry back to the record
    /// written: the entry every node agrees on (the first one) is returned.
    pub fn register(
        &self,
        changelog: &Changelog,
        consumer: &Reader,
        entry: RegistryEntry,
        stall: Duration,
        brokers: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<RegistryEntry, RegistryError> {
        if let Some(e) = self.get(&entry.table) {
            return Ok(e);
        }
        let delivery = changelog.send_registry(&entry)?;
        let offset = futures::executor::block_on(delivery)
            .map_err(|_| RegistryError::NotAcknowledged(entry.table.clone(), "cancelled".into()))?
            .map_err(|(e, _)| RegistryError::NotAcknowledged(entry.table.clone(), e.to_string()))?
            .offset;
        self.read_to(consumer, End::Through(offset), stall, brokers, cancelled)?;
        Ok(self.get(&entry.table).unwrap_or(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: &str, epoch: &str, deployment: &str) -> Vec<u8> {
        serde_json::to_vec(&RegistryEntry {
            table: table.into(),
            source: "cdc.t".into(),
            partitions: 4,
            epoch: epoch.into(),
            deployment: deployment.into(),
            changelog: "d.table.t".into(),
        })
        .unwrap()
    }

    #[test]
    fn first_record_wins_and_other_deployments_are_refused() {
        let r = Registry::new("d", "d.table.__registry");
        assert!(r.absorb(0, Some(&entry("t", "e1", "d"))).unwrap().is_some());
        assert!(r.absorb(1, Some(&entry("t", "e2", "d"))).unwrap().is_none());
        assert_eq!(r.get("t").unwrap().epoch, "e1");
        assert_eq!(r.tables_of("cdc.t").len(), 1);
        assert_eq!(r.next_offset(), 2);
        assert!(r.absorb(2, Some(b"junk")).unwrap().is_none());
        let err = r.absorb(3, Some(&entry("u", "e3", "other"))).unwrap_err();
        assert!(err.to_string().contains("deployment `other`"), "{err}");
    }

    #[test]
    fn an_epoch_no_token_can_carry_is_skipped_and_the_next_valid_record_wins() {
        let r = Registry::new("d", "d.table.__registry");
        for (i, bad) in ["e\n1", "", "a~b", "a.b", &"x".repeat(65)]
            .iter()
            .enumerate()
        {
            assert!(r
                .absorb(i as i64, Some(&entry("t", bad, "d")))
                .unwrap()
                .is_none());
            assert!(r.get("t").is_none(), "{bad:?}");
        }
        assert!(r
            .absorb(9, Some(&entry("t", "ok_1", "d")))
            .unwrap()
            .is_some());
        assert_eq!(r.get("t").unwrap().epoch, "ok_1");
    }
}
