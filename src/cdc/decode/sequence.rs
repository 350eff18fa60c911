//! A change's position in its source's log, when the connector states one that orders every
//! event it emits: PostgreSQL's `source.sequence`, `["<last commit LSN>", "<LSN>"]` (Debezium
//! 1.5+, DBZ-2911). Kafka Connect delivers at least once: after a crash of Connect, Debezium
//! sends again the events since its last flushed offset, at higher Kafka offsets than the first
//! copies. Their positions are below what the stream already reached, which is how the table
//! layer tells them from new changes.
//!
//! Pure and total: a `sequence` that is absent or not of this shape gives no position (the change
//! is applied as before), never an error.

use super::limits::MAX_NAME_BYTES;

/// Where a change sits in one connector's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePos {
    /// The connector's logical name (`source.name`): positions of different streams do not
    /// compare.
    pub stream: String,
    /// (last commit LSN, LSN), compared as a pair: it never decreases along the stream (events
    /// of one statement can share it: a primary-key update is a delete and a create at one LSN).
    pub at: (u64, u64),
}

/// The position of a PostgreSQL change from its `source` block's `connector`, `name` and
/// `sequence`. A null last-commit LSN (the first transaction after a connector first starts) is
/// taken as the event's own LSN: the next transaction's last commit LSN is past every LSN of this
/// one, so the order holds, and a new connector under an old name is not taken for a replay.
pub fn postgres(
    connector: Option<&str>,
    name: Option<&str>,
    sequence: Option<&str>,
) -> Option<SourcePos> {
    if connector != Some("postgresql") {
        return None;
    }
    let name = name.filter(|n| !n.is_empty() && n.len() <= MAX_NAME_BYTES)?;
    let sequence = sequence.filter(|s| s.len() <= 64)?;
    let parts: Vec<Option<String>> = serde_json::from_str(sequence).ok()?;
    let [commit, lsn] = parts.as_slice() else {
        return None;
    };
    let lsn: u64 = lsn.as_deref()?.parse().ok()?;
    let commit = match commit {
        Some(c) => c.parse().ok()?,
        None => lsn,
    };
    Some(SourcePos {
        stream: name.to_string(),
        at: (commit, lsn),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_sequence_is_read_as_a_pair() {
        let p = postgres(
            Some("postgresql"),
            Some("srv"),
            Some(r#"["26752552","26752720"]"#),
        );
        assert_eq!(
            p,
            Some(SourcePos {
                stream: "srv".into(),
                at: (26752552, 26752720)
            })
        );
    }

    #[test]
    fn a_null_commit_is_the_event_s_own_lsn() {
        let p = postgres(
            Some("postgresql"),
            Some("srv"),
            Some(r#"[null,"26752128"]"#),
        );
        assert_eq!(p.map(|p| p.at), Some((26752128, 26752128)));
    }

    #[test]
    fn the_captured_stream_increases_along_its_events() {
        // the order of tests/fixtures/debezium/pg_a_envelope_noschema.jsonl's streamed events
        let seqs = [
            r#"[null,"26752128"]"#,
            r#"["26752336","26752336"]"#,
            r#"["26752552","26752552"]"#,
            r#"["26752552","26752720"]"#,
            r#"["26752920","26752920"]"#,
        ];
        let at: Vec<_> = seqs
            .iter()
            .filter_map(|s| postgres(Some("postgresql"), Some("a"), Some(s)))
            .map(|p| p.at)
            .collect();
        assert_eq!(at.len(), seqs.len());
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
    }

    #[test]
    fn anything_else_gives_no_position() {
        for (connector, name, seq) in [
            (Some("mysql"), Some("a"), Some(r#"["1","2"]"#)),
            (None, Some("a"), Some(r#"["1","2"]"#)),
            (Some("postgresql"), None, Some(r#"["1","2"]"#)),
            (Some("postgresql"), Some(""), Some(r#"["1","2"]"#)),
            (Some("postgresql"), Some("a"), None),
            (Some("postgresql"), Some("a"), Some(r#"["1"]"#)),
            (Some("postgresql"), Some("a"), Some(r#"["1","2","3"]"#)),
            (Some("postgresql"), Some("a"), Some(r#"["1",null]"#)),
            (Some("postgresql"), Some("a"), Some(r#"["x","2"]"#)),
            (Some("postgresql"), Some("a"), Some(r#"["-1","2"]"#)),
            (Some("postgresql"), Some("a"), Some("not json")),
            (Some("postgresql"), Some("a"), Some(r#"[1,2]"#)),
        ] {
            assert_eq!(
                postgres(connector, name, seq),
                None,
                "{connector:?} {name:?} {seq:?}"
            );
        }
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            postgres(Some("postgresql"), Some(&long), Some(r#"["1","2"]"#)),
            None
        );
    }
}
