//! Positions defined by Kafka, so that they mean the same on every node.
//!
//! A table is fed by one input topic with P partitions; its state is partitioned the same way (a
//! *slice* per partition). The position of a table is, per partition, the input offset of the last
//! change applied from that partition (`-1`: none yet). Because the state of a slice is a function of
//! its input partition up to an offset, two nodes at the same position hold the same rows: a
//! materialiser that applied the records itself, a gateway that read them from the changelog, and
//! a node restarted after kill -9 that re-applied them.
//!
//! A resume token names a table lineage (its `epoch`, fixed when the table is first registered by
//! the deployment) and a position: `<epoch>~<o0>.<o1>...` (an empty component is `-1`).
//!
//! [`Owner`] names who may write a changelog partition: the new owner of a partition writes a fence
//! record with an owner greater than any seen before it, and readers ignore records of a smaller
//! owner after that fence (a former owner that has not noticed its revoke).

use std::fmt;

/// The owner of a changelog partition: ordered by `(epoch, generation)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Owner {
    /// Bumped when the consumer group's generation does not exceed the largest owner seen (e.g.
    /// the group was re-created and its generations restarted).
    pub epoch: u32,
    /// The consumer group generation in which the partition was assigned.
    pub generation: i32,
}

impl Owner {
    /// The owner a new assignee takes, given the largest owner seen in the partition and the
    /// group generation of its assignment: always strictly greater than `seen`.
    pub fn next(seen: Owner, generation: i32) -> Owner {
        if generation > seen.generation {
            Owner {
                epoch: seen.epoch,
                generation,
            }
        } else {
            Owner {
                epoch: seen.epoch.saturating_add(1),
                generation,
            }
        }
    }

    /// `epoch.generation`, as in the `livetable.owner` header.
    pub fn to_header(self) -> String {
        format!("{}.{}", self.epoch, self.generation)
    }

    pub fn parse(s: &str) -> Option<Owner> {
        let (e, g) = s.split_once('.')?;
        Some(Owner {
            epoch: e.parse().ok()?,
            generation: g.parse().ok()?,
        })
    }
}

/// Per partition of a table's input topic, the input offset of the last change applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Position(pub Vec<i64>);

impl Position {
    pub fn new(partitions: usize) -> Self {
        Position(vec![-1; partitions])
    }

    /// The offset of partition `p` (`-1` when unknown).
    pub fn get(&self, p: u32) -> i64 {
        self.0.get(p as usize).copied().unwrap_or(-1)
    }

    /// Raises partition `p` to `off` (growing the vector if needed).
    pub fn raise(&mut self, p: u32, off: i64) {
        let i = p as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, -1);
        }
        if off > self.0[i] {
            self.0[i] = off;
        }
    }

    /// Whether this position has reached `other` in every partition.
    pub fn covers(&self, other: &Position) -> bool {
        (0..other.0.len()).all(|p| self.get(p as u32) >= other.0[p])
    }
}

/// What tells an input record from any other at the same offset: a node keeps the one it applied
/// last per partition (with the partition's position), and when it resumes there it reads that
/// offset again: a different record means the topic was deleted and created again meanwhile, even
/// when the new topic already holds more records than the position (its offsets exist, so the
/// broker cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    pub offset: i64,
    /// The record's timestamp (ms; -1 when it has none).
    pub timestamp_ms: i64,
    /// FNV-1a of the key's and the value's lengths and bytes (a missing one apart from an empty one).
    pub digest: u64,
}

impl RecordId {
    pub fn new(
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Self {
        let mut h = crate::digest::Fnv1a::default();
        for part in [key, value] {
            match part {
                Some(b) => {
                    h.write(&(b.len() as u64).to_be_bytes());
                    h.write(b);
                }
                None => h.write(&u64::MAX.to_be_bytes()),
            }
        }
        RecordId {
            offset,
            timestamp_ms: timestamp_ms.unwrap_or(-1),
            digest: h.finish(),
        }
    }

    /// The id of Kafka record `m`.
    pub fn of<M: rdkafka::message::Message>(m: &M) -> Self {
        RecordId::new(m.offset(), m.timestamp().to_millis(), m.key(), m.payload())
    }

    /// 24 bytes: offset, timestamp, digest (big-endian).
    pub fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.offset.to_be_bytes());
        b[8..16].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[16..].copy_from_slice(&self.digest.to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 24] = b.try_into().ok()?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            w
        };
        Some(RecordId {
            offset: i64::from_be_bytes(word(0)),
            timestamp_ms: i64::from_be_bytes(word(8)),
            digest: u64::from_be_bytes(word(16)),
        })
    }
}

/// The record an input partition's position follows, and whom this node wrote the partition's
/// slices as then (a digest of their owners, [`owners_digest`]): a check at the next take-over
/// is meaningful only if nobody wrote them since, when their owners are still those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastApplied {
    pub record: RecordId,
    pub owners: u64,
}

impl LastApplied {
    /// 32 bytes: the record's 24, then the owners' digest (big-endian).
    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..24].copy_from_slice(&self.record.to_bytes());
        b[24..].copy_from_slice(&self.owners.to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 32 {
            return None;
        }
        let mut owners = [0u8; 8];
        owners.copy_from_slice(&b[24..]);
        Some(LastApplied {
            record: RecordId::from_bytes(&b[..24])?,
            owners: u64::from_be_bytes(owners),
        })
    }
}

/// A digest of the owners of an input partition's slices, by table (in any order).
pub fn owners_digest<'a>(owners: impl IntoIterator<Item = (&'a str, Owner)>) -> u64 {
    let mut list: Vec<(&str, Owner)> = owners.into_iter().collect();
    list.sort();
    let mut h = crate::digest::Fnv1a::default();
    for (table, owner) in list {
        h.write(&(table.len() as u64).to_be_bytes());
        h.write(table.as_bytes());
        h.write(&owner.epoch.to_be_bytes());
        h.write(&owner.generation.to_be_bytes());
    }
    h.finish()
}

/// A position with the lineage it belongs to: what a client presents to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub epoch: String,
    pub pos: Position,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.epoch)?;
        f.write_str("~")?;
        for (i, o) in self.pos.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            if *o >= 0 {
                write!(f, "{o}")?;
            }
        }
        Ok(())
    }
}

/// Most partitions a token may name (bounds what a client can make the server allocate).
pub const MAX_TOKEN_PARTITIONS: usize = 4096;

/// Whether `epoch` can name a lineage in a resume token (and in an SSE event id): 1 to 64
/// ASCII letters, digits or `_`.
pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch.len() <= 64
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Token {
    /// Parses `<epoch>~<o0>.<o1>...`; `None` for anything else (including the tokens of protocol
    /// version 1, `EPOCH:SEQ`, which name a process-local counter and can never be honoured).
    pub fn parse(s: &str) -> Option<Token> {
        let (epoch, rest) = s.split_once('~')?;
        if !valid_epoch(epoch) {
            return None;
        }
        let mut pos = Vec::new();
        for part in rest.split('.') {
            if pos.len() >= MAX_TOKEN_PARTITIONS {
                return None;
            }
            pos.push(if part.is_empty() {
                -1
            } else {
                let o: i64 = part.parse().ok()?;
                if o < 0 {
                    return None;
                }
                o
            });
        }
        Some(Token {
            epoch: epoch.to_string(),
            pos: Position(pos),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_old_tokens_are_refused() {
        let t = Token {
            epoch: "3f2a9c1e0b7d".into(),
            pos: Position(vec![12, -1, 40, 0]),
        };
        let s = t.to_string();
        assert_eq!(s, "3f2a9c1e0b7d~12..40.0");
        assert_eq!(Token::parse(&s), Some(t));
        assert_eq!(
            Token::parse("e~").unwrap().pos,
            Position(vec![-1]),
            "one partition, nothing yet"
        );
        for bad in [
            "3f2a9c1e0b7d:42",
            "~1.2",
            "e~x",
            "e~-5",
            "e/1~2",
            "e~1.2.3.",
        ] {
            // "e~1.2.3." is a valid token with a trailing empty partition; the others are not
            if bad == "e~1.2.3." {
                assert_eq!(Token::parse(bad).unwrap().pos, Position(vec![1, 2, 3, -1]));
            } else {
                assert!(Token::parse(bad).is_none(), "{bad}");
            }
        }
        let huge = format!("e~{}", ".".repeat(MAX_TOKEN_PARTITIONS + 1));
        assert!(Token::parse(&huge).is_none());
    }

    #[test]
    fn owners_order_and_next_is_always_greater() {
        let a = Owner {
            epoch: 0,
            generation: 5,
        };
        assert!(Owner::next(a, 7) > a);
        assert_eq!(Owner::next(a, 7).epoch, 0);
        // the group's generations restarted: the epoch is bumped
        let b = Owner::next(a, 1);
        assert!(b > a);
        assert_eq!(
            b,
            Owner {
                epoch: 1,
                generation: 1
            }
        );
        assert_eq!(Owner::parse(&b.to_header()), Some(b));
        assert_eq!(Owner::parse("x"), None);
    }

    #[test]
    fn record_ids_tell_records_apart_and_round_trip() {
        let a = RecordId::new(41, Some(1_700_000_000_000), Some(b"k1"), Some(b"{\"v\":1}"));
        assert_eq!(RecordId::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(
            a,
            RecordId::new(41, Some(1_700_000_000_000), Some(b"k1"), Some(b"{\"v\":1}"))
        );
        // another value, key, time or offset: another record
        for other in [
            RecordId::new(41, Some(1_700_000_000_000), Some(b"k1"), Some(b"{\"v\":2}")),
            RecordId::new(41, Some(1_700_000_000_000), Some(b"k2"), Some(b"{\"v\":1}")),
            RecordId::new(41, Some(1_700_000_000_001), Some(b"k1"), Some(b"{\"v\":1}")),
            RecordId::new(40, Some(1_700_000_000_000), Some(b"k1"), Some(b"{\"v\":1}")),
        ] {
            assert_ne!(a, other);
        }
        // the bytes move between key and value, or a part is missing rather than empty
        assert_ne!(
            RecordId::new(0, None, Some(b"ab"), Some(b"c")),
            RecordId::new(0, None, Some(b"a"), Some(b"bc"))
        );
        assert_ne!(
            RecordId::new(0, None, None, Some(b"")),
            RecordId::new(0, None, Some(b""), Some(b""))
        );
        assert_eq!(RecordId::new(0, None, None, None).timestamp_ms, -1);
        assert_eq!(RecordId::from_bytes(&[0u8; 8]), None, "an old 8-byte value");
    }

    #[test]
    fn owner_digests_tell_owners_apart_in_any_order() {
        let o = |epoch, generation| Owner { epoch, generation };
        let last = LastApplied {
            record: RecordId::new(9, Some(5), None, Some(b"v")),
            owners: owners_digest([("a", o(0, 3)), ("b", o(1, 2))]),
        };
        assert_eq!(LastApplied::from_bytes(&last.to_bytes()), Some(last));
        assert_eq!(LastApplied::from_bytes(&last.to_bytes()[..24]), None);
        assert_eq!(
            last.owners,
            owners_digest([("b", o(1, 2)), ("a", o(0, 3))]),
            "the order of the tables does not matter"
        );
        for other in [
            owners_digest([("a", o(0, 4)), ("b", o(1, 2))]),
            owners_digest([("a", o(0, 3)), ("b", o(2, 2))]),
            owners_digest([("a", o(0, 3))]),
            owners_digest([("a", o(0, 3)), ("c", o(1, 2))]),
        ] {
            assert_ne!(last.owners, other);
        }
    }

    #[test]
    fn positions_cover() {
        let mut p = Position::new(2);
        p.raise(1, 10);
        p.raise(1, 3);
        p.raise(3, 7);
        assert_eq!(p.0, vec![-1, 10, -1, 7]);
        assert!(p.covers(&Position(vec![-1, 10])));
        assert!(!p.covers(&Position(vec![0, 10])));
        assert!(!Position(vec![5]).covers(&Position(vec![5, 1])));
    }
}
