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
