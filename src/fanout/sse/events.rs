//! The events of an SSE stream, built one at a time as the socket takes them (pure).
//!
//! A message is turned into its events' parts here: the frames stay the shared buffers they are
//! (a snapshot's frames are shared by every client of the table), and an [`Event`] is written
//! only when the stream yields it, so a connection that does not read holds references, not a
//! copy of the snapshot.
//!
//! Ids: the last event of a message carries its resume token. The earlier frames of a snapshot
//! sent in several carry [`MID_SNAPSHOT`], which names no position: a browser keeps the id of the
//! last event that had one, so without it a client cut off in the middle of a snapshot would
//! reconnect with the position before that snapshot and be answered with a patch on top of the
//! snapshot's first part, its other rows missing. With it, the reconnect gets a fresh snapshot.

use axum::extract::ws::Utf8Bytes;
use axum::response::sse::Event;

use crate::fanout::protocol::Outgoing;

/// The id of a snapshot's frames before its last: "no position", a fresh snapshot on reconnect.
pub const MID_SNAPSHOT: &str = "snapshot";

/// One event to send: its name, data (a shared frame) and id.
#[derive(Debug, Clone)]
pub struct Pending {
    pub name: &'static str,
    pub data: Utf8Bytes,
    pub id: Option<String>,
}

impl Pending {
    /// An `error` event.
    pub fn error(code: crate::fanout::protocol::ErrorCode, message: String) -> Pending {
        Pending {
            name: "error",
            data: Outgoing::Error { code, message }
                .frames()
                .pop()
                .unwrap_or_default(),
            id: None,
        }
    }

    /// The SSE event (its data copied into the event's buffer only now).
    pub fn event(&self) -> Event {
        let event = Event::default().event(self.name).data(self.data.as_str());
        match &self.id {
            // an id axum would refuse (it panics) is left out: the client then cannot resume
            // from this event, nothing else is lost (tokens carry only letters, digits, `_`,
            // `~` and `.`)
            Some(id) if !id.contains(['\n', '\r', '\0']) => event.id(id),
            _ => event,
        }
    }
}

/// The events of `out` with its `frames`: a snapshot's further frames are patches at the same
/// position.
pub fn events_of(out: &Outgoing, frames: Vec<Utf8Bytes>) -> Vec<Pending> {
    let last = frames.len().saturating_sub(1);
    frames
        .into_iter()
        .enumerate()
        .map(|(i, data)| Pending {
            name: if i == 0 { out.event_name() } else { "patch" },
            data,
            id: if i == last {
                out.event_id()
            } else {
                Some(MID_SNAPSHOT.to_string())
            },
        })
        .collect()
}

/// Where a stream resumes from: the `Last-Event-ID` header (what a browser sends on reconnect)
/// before `?since=`; [`MID_SNAPSHOT`] resumes from nothing (a fresh snapshot), not from `since`,
/// which is older than the snapshot the client was cut off in.
pub fn resume_from(last_event_id: Option<&str>, since: Option<&str>) -> Option<String> {
    match last_event_id {
        Some(MID_SNAPSHOT) => None,
        Some(id) => Some(id.to_string()),
        None => since.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(parts: &[&str]) -> Outgoing {
        Outgoing::Snapshot {
            table: "t".into(),
            epoch: "e".into(),
            seq: 7,
            pos: "e~7".into(),
            rows: 3,
            parts: parts
                .iter()
                .map(|p| Utf8Bytes::from(p.to_string()))
                .collect::<Vec<_>>()
                .into(),
        }
    }

    #[test]
    fn a_snapshot_in_several_frames_names_its_position_only_on_the_last() {
        let out = snapshot(&[r#"{"a":1}"#, r#"{"b":2}"#, r#"{"c":3}"#]);
        let frames = out.frames();
        let events = events_of(&out, frames);
        let got: Vec<(&str, Option<&str>)> =
            events.iter().map(|e| (e.name, e.id.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                ("snapshot", Some(MID_SNAPSHOT)),
                ("patch", Some(MID_SNAPSHOT)),
                ("patch", Some("e~7")),
            ]
        );
        // the sentinel is no resume token
        assert!(crate::table::position::Token::parse(MID_SNAPSHOT).is_none());
        // one frame: its id is the position
        let one = snapshot(&[r#"{"a":1}"#]);
        let events = events_of(&one, one.frames());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id.as_deref(), Some("e~7"));
    }

    #[test]
    fn pending_events_share_the_snapshot_frames() {
        let out = snapshot(&[r#"{"a":1}"#, r#"{"b":2}"#]);
        let Outgoing::Snapshot { parts, .. } = &out else {
            unreachable!()
        };
        let events = events_of(&out, out.frames());
        for (e, p) in events.iter().zip(parts.iter()) {
            assert_eq!(
                e.data.as_str().as_ptr(),
                p.as_str().as_ptr(),
                "a pending event refers to the shared frame, it does not copy it"
            );
        }
    }

    #[test]
    fn a_reconnect_mid_snapshot_starts_over() {
        assert_eq!(resume_from(Some(MID_SNAPSHOT), Some("e~3")), None);
        assert_eq!(
            resume_from(Some("e~5"), Some("e~3")).as_deref(),
            Some("e~5")
        );
        assert_eq!(resume_from(None, Some("e~3")).as_deref(), Some("e~3"));
        assert_eq!(resume_from(None, None), None);
    }
}
