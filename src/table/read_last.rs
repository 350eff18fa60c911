//! The changelog record a reader's position follows, read again when it resumes there: a
//! changelog topic deleted, written again and written past the position while the reader was
//! down shows no other sign (its end is not below the position, and the `restarted` fence that
//! ends the rewrite lies below it, see [`crate::table::repair`]).
//!
//! The record is told by its id ([`RecordId`]: a follower stores the one it read last with its
//! position), or, where this node wrote the partition last as its owner, by the owner in its
//! header. A record compacted away since cannot be compared.

use rdkafka::message::Message;

use crate::table::changelog::parse_record;
use crate::table::position::{Owner, RecordId};

/// What the record at a reader's position - 1 must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLast {
    /// The record this node's follower read last (stored with its position).
    Record(RecordId),
    /// A record of this node's own tenure as the slice's owner, at the offset: an owned slice's
    /// changelog position follows this node's own last record or fence.
    Owner(i64, Owner),
}

/// What the first record read at or past [`ReadLast::offset`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAgain {
    /// The same record: the partition is the one this node read.
    Same,
    /// Another record there: the topic was deleted and created again.
    Replaced,
    /// Past it: the record is gone (compacted away); nothing to compare.
    Gone,
}

impl ReadLast {
    /// As stored: a record id's 24 bytes, or 16 (offset, owner's epoch and generation).
    pub fn to_bytes(self) -> Vec<u8> {
        match self {
            ReadLast::Record(id) => id.to_bytes().to_vec(),
            ReadLast::Owner(offset, owner) => {
                let mut b = Vec::with_capacity(16);
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&owner.epoch.to_be_bytes());
                b.extend_from_slice(&owner.generation.to_be_bytes());
                b
            }
        }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 16 {
            return RecordId::from_bytes(b).map(ReadLast::Record);
        }
        let offset = i64::from_be_bytes(b[..8].try_into().ok()?);
        let epoch = u32::from_be_bytes(b[8..12].try_into().ok()?);
        let generation = i32::from_be_bytes(b[12..].try_into().ok()?);
        Some(ReadLast::Owner(offset, Owner { epoch, generation }))
    }

    pub fn offset(self) -> i64 {
        match self {
            ReadLast::Record(id) => id.offset,
            ReadLast::Owner(offset, _) => offset,
        }
    }

    /// Compares `m`, the first record read at or past [`ReadLast::offset`] (changelog topics
    /// named with `prefix`).
    pub fn read_again<M: Message>(self, m: &M, prefix: &str) -> ReadAgain {
        if m.offset() > self.offset() {
            return ReadAgain::Gone;
        }
        let same = match self {
            ReadLast::Record(id) => RecordId::of(m) == id,
            ReadLast::Owner(_, owner) => {
                parse_record(prefix, m).is_ok_and(|r| r.meta.owner == owner)
            }
        };
        if same {
            ReadAgain::Same
        } else {
            ReadAgain::Replaced
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn record(offset: i64, owner: &str, ts: i64, value: &str) -> OwnedMessage {
        let headers = OwnedHeaders::new().insert(Header {
            key: crate::table::changelog::HEADER_OWNER,
            value: Some(owner),
        });
        OwnedMessage::new(
            Some(value.as_bytes().to_vec()),
            Some(b"k".to_vec()),
            "g.table.t".into(),
            Timestamp::CreateTime(ts),
            0,
            offset,
            Some(headers),
        )
    }

    #[test]
    fn the_record_read_last_is_told_by_its_id() {
        let m = record(9, "3.7", 100, "{\"n\":1}");
        let last = ReadLast::Record(RecordId::of(&m));
        assert_eq!(last.offset(), 9);
        assert_eq!(last.read_again(&m, "g.table."), ReadAgain::Same);
        // the same row written again (a refill): another time, another record
        let again = record(9, "3.7", 101, "{\"n\":1}");
        assert_eq!(last.read_again(&again, "g.table."), ReadAgain::Replaced);
        let other = record(9, "3.7", 100, "{\"n\":2}");
        assert_eq!(last.read_again(&other, "g.table."), ReadAgain::Replaced);
        // compacted away: the first record read is past it, nothing to compare
        let past = record(12, "3.8", 100, "{\"n\":5}");
        assert_eq!(last.read_again(&past, "g.table."), ReadAgain::Gone);
    }

    #[test]
    fn both_kinds_round_trip_as_stored() {
        let id = ReadLast::Record(RecordId::of(&record(9, "3.7", 100, "{}")));
        let own = ReadLast::Owner(41, Owner::parse("3.7").unwrap());
        for last in [id, own] {
            assert_eq!(ReadLast::from_bytes(&last.to_bytes()), Some(last));
        }
        assert_eq!(ReadLast::from_bytes(b"short"), None);
    }

    #[test]
    fn the_record_an_owner_wrote_last_is_told_by_its_tenure() {
        let last = ReadLast::Owner(9, Owner::parse("3.7").unwrap());
        let own = record(9, "3.7", 100, "{\"n\":1}");
        assert_eq!(last.read_again(&own, "g.table."), ReadAgain::Same);
        // another owner's record where this node wrote last: not the partition it wrote
        let other = record(9, "3.8", 100, "{\"n\":1}");
        assert_eq!(last.read_again(&other, "g.table."), ReadAgain::Replaced);
        // not a changelog record at all: not this node's
        let bad = record(9, "3.7", 100, "not json");
        assert_eq!(last.read_again(&bad, "g.table."), ReadAgain::Replaced);
        let past = record(10, "3.8", 100, "{\"n\":1}");
        assert_eq!(last.read_again(&past, "g.table."), ReadAgain::Gone);
    }
}
