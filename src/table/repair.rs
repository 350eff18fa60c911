//! A changelog topic deleted while livetable runs (an operator's mistake, a cleanup script, a
//! topic policy): it is created again and every owner writes its slices into it again.
//!
//! How each side finds out, without relying on the broker to say "recreated":
//! - an owner whose changelog record fails because the topic or partition is unknown, or is
//!   acknowledged at an offset below one it already had (a broker that takes records for a deleted
//!   topic, as Tansu does, starts its offsets over), creates the topic again if it is missing
//!   ([`recreate`]), then writes a fence to each slice it owns: a fence that lands below the
//!   changelog position this node had already written proves the partition started over, and
//!   every row of that slice is produced again (an acknowledgement out of order after a retry
//!   only costs the fence);
//! - a node taking a slice over whose fence lands below where it had read does the same (see
//!   `restore::take_slice`);
//! - a reader whose partition's high watermark falls below its position, or whose record read
//!   last (stored with its position) is not the one at that offset any more, reads it again from
//!   the beginning (see `follower`).
//!
//! Records are folded only where newer, so a slice written twice, or read twice, never goes back.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::table::changelog::{Changelog, ChangelogError, FenceKind};
use crate::table::checkpoint::{resend_current, PendingRow};
use crate::table::state::{SliceMode, TableState, Tables};
use crate::table::store::{AckMeta, Store};

/// Errors of a repair.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{0}")]
    Changelog(#[from] ChangelogError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the fence of {0}/{1} was not acknowledged: {2}")]
    Fence(String, u32, String),
}

/// Whether a delivery failed because its topic or partition does not exist (deleted).
pub fn missing_topic(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition)
    )
}

/// The keys of slice `part` to produce again, with their input offset and whether they are
/// tombstones: every key when `all`, else the outbox (changes after the acknowledged offset, and
/// deletes whose tombstone was not acknowledged).
pub fn slice_keys(t: &TableState, part: u32, all: bool) -> Vec<(String, i64, bool)> {
    let Some(s) = t.slice(part) else {
        return Vec::new();
    };
    let mut keys: Vec<(String, i64, bool)> = t
        .rows
        .iter()
        .filter(|(_, e)| e.part == part && (all || e.off > s.acked))
        .map(|(k, e)| (k.clone(), e.off, false))
        .collect();
    keys.extend(s.tombs.iter().map(|(k, off)| (k.clone(), *off, true)));
    keys
}

/// Produces the current value of every key of `keys` in slice `part` (blocking).
pub fn produce_keys(
    tables: &Tables,
    changelog: &Changelog,
    table: &str,
    part: u32,
    keys: Vec<(String, i64, bool)>,
) -> Result<Vec<PendingRow>, KafkaError> {
    let mut out = Vec::with_capacity(keys.len());
    for (key, off, deleted) in keys {
        let delivery = resend_current(tables, changelog, table, part, &key)?;
        out.push(PendingRow {
            table: table.to_string(),
            part,
            key,
            off,
            deleted,
            delivery,
        });
    }
    Ok(out)
}

/// What a repair produced (to be seen acknowledged, also when it failed part way), and how it
/// ended.
pub struct Repaired {
    pub rows: Vec<PendingRow>,
    pub result: Result<(), RepairError>,
}

/// After a changelog record of `table` failed with an unknown topic or partition, or was
/// acknowledged below this node's changelog position: creates the topic again when it is
/// missing, and writes again each owned slice whose partition started over (blocking).
///
/// For such a slice: a fence measures where the partition ends; below the position this node had
/// written, every row of the slice is produced again, then a `restarted` fence after them (readers
/// that meet it read the partition again from its beginning); only then is the slice's changelog
/// position set to the new partition's, so that a repair that failed part way is done again.
pub fn recreate(tables: &Tables, changelog: &Changelog, store: &Store, table: &str) -> Repaired {
    let mut rows = Vec::new();
    let result = recreate_into(tables, changelog, store, table, &mut rows);
    Repaired { rows, result }
}

fn recreate_into(
    tables: &Tables,
    changelog: &Changelog,
    store: &Store,
    table: &str,
    out: &mut Vec<PendingRow>,
) -> Result<(), RepairError> {
    let Some(t) = tables.get(table) else {
        return Ok(());
    };
    let (source, partitions, owned) = {
        let s = t.read();
        let owned: Vec<u32> = (0..s.slices.len())
            .filter_map(|p| u32::try_from(p).ok())
            .filter(|p| s.slice(*p).is_some_and(|sl| sl.mode == SliceMode::Owned))
            .collect();
        (s.source.to_string(), s.slices.len(), owned)
    };
    let topic = changelog.topic_for(table);
    changelog.forget(&topic);
    changelog.ensure_table(table, &source, partitions)?;
    for part in owned {
        let Some((owner, cl_next)) = t.read().slice(part).map(|s| (s.owner, s.cl_next)) else {
            continue;
        };
        // the fence is appended after every record this node had acknowledged, unless the
        // partition started over
        let fence = |kind| {
            changelog
                .write_fence(table, part, owner, "repair", kind)
                .map_err(|why| RepairError::Fence(table.into(), part, why))
        };
        let probe = fence(FenceKind::Open)?;
        if probe >= cl_next {
            continue;
        }
        let keys = slice_keys(&t.read(), part, true);
        tracing::warn!(
            %topic,
            partition = part,
            fence_offset = probe,
            had_written_up_to = cl_next,
            rows = keys.len(),
            "changelog partition started over (topic deleted and created again); producing every row of the slice again"
        );
        out.extend(produce_keys(tables, changelog, table, part, keys)?);
        let end = fence(FenceKind::Restarted)?;
        let mut meta = None;
        t.update_slices(|s| {
            let slice = s.slice_mut(part);
            slice.cl_next = end + 1;
            meta = Some(AckMeta::of(slice));
        });
        if let Some(meta) = meta {
            if let Err(e) = store.put_acks(table, part, &meta) {
                tracing::error!(error = %e, "recording the changelog position failed");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::decode::Op;
    use crate::table::state::{Delta, NoSink, RowWrite};
    use serde_json::json;
    use std::sync::Arc;

    #[test]
    fn a_rewrite_takes_every_key_of_the_slice_the_outbox_only_the_unacknowledged() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 2);
        let mut d = Delta::new(t.clone());
        for (key, part, off) in [("a", 0, 1), ("b", 0, 2), ("c", 1, 3), ("d", 0, 4)] {
            d.stage(RowWrite {
                key: key.into(),
                row: Some(Arc::new(json!({"v": off}).as_object().unwrap().clone()).into()),
                op: Op::Update,
                part,
                off,
                ts_ms: None,
                kafka_ts_ms: None,
                polled: None,
            });
        }
        tables.commit(d, &NoSink);
        t.update_slices(|s| s.slice_mut(0).raise_acked(2));
        let keys = |all| {
            let mut k: Vec<String> = slice_keys(&t.read(), 0, all)
                .into_iter()
                .map(|(k, _, _)| k)
                .collect();
            k.sort();
            k
        };
        assert_eq!(keys(true), ["a", "b", "d"]);
        assert_eq!(keys(false), ["d"]);
        assert!(slice_keys(&t.read(), 7, true).is_empty());
    }

    #[test]
    fn only_unknown_topics_and_partitions_count_as_missing() {
        use RDKafkaErrorCode as C;
        let produce = |c| KafkaError::MessageProduction(c);
        assert!(missing_topic(&produce(C::UnknownTopicOrPartition)));
        assert!(missing_topic(&produce(C::UnknownTopic)));
        assert!(missing_topic(&produce(C::UnknownPartition)));
        assert!(!missing_topic(&produce(C::MessageTimedOut)));
        assert!(!missing_topic(&produce(C::NotLeaderForPartition)));
        assert!(!missing_topic(&produce(C::ProducerFenced)));
    }
}
