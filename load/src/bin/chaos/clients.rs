//! Live clients attached the whole run: WebSocket in `patch` and `rows` format, SSE; the whole
//! table or some keys. Each reconnects when its connection ends (a patch or SSE client resumes
//! from its last complete position) and checks every message it applies:
//!
//! - `reordered_visible`: a live message (patch, or a row after the initial rows) shows a key at an
//!   `n` smaller than one the client already showed, or shows a deleted key again with an `n` not
//!   larger than before its delete;
//! - `stale_after_recovery`: the same, carried by a snapshot (or, for a `rows` connection, which
//!   carries no position, its initial rows and anything in its first 10 s): the state was
//!   replaced by one older than what the client had shown.
//!
//! Both must stay 0. The client's final state is compared with the oracle at the end.
//!
//! A row's `n` is its column `n`, or for a `history` view's row (`{"history": [...]}`) the `n`
//! of its last entry: a history whose last entry is a delete (`null`) shows its key deleted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::workload::State;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    WsPatch,
    WsRows,
    Sse,
}

/// What a client saw and found.
#[derive(Debug, Default)]
pub struct Seen {
    pub state: BTreeMap<String, Value>,
    max_n: HashMap<String, i64>,
    /// The largest `n` a key had when the client saw it deleted.
    deleted_at: HashMap<String, i64>,
    pub pos: Option<String>,
    pub connects: u64,
    pub messages: u64,
    pub snapshots: u64,
    pub resumes: u64,
    pub errors: Vec<String>,
    /// `format=rows` connections closed with 4409 (behind the replay buffer).
    pub rows_resyncs: u64,
    pub reordered_visible: u64,
    pub stale_after_recovery: u64,
    /// Of `stale_after_recovery`: carried by a snapshot whose position (same epoch) is behind the
    /// highest position the client was shown, in some partition: the node knew it served an
    /// older state (BUG-2 in RELIABILITY.md). The rest come from `rows` connections (no
    /// position) or from a snapshot at or past that position, which no known bug explains.
    pub stale_behind_position: u64,
    /// Of `reordered_visible`: live patches whose position is still behind the highest position
    /// the client was shown, showing again values older than ones it had shown: the node going
    /// forward again over what it lost (the second half of BUG-2). A patch position tells no
    /// partition apart, so while it is behind in one partition a regression of any key counts
    /// here.
    pub replay_after_stale: u64,
    /// A history showing its key deleted with a last value older than one the client showed
    /// (the key was created again after that delete): the documented gap of a change a new owner
    /// fills in below the input's position (README, "Reliability"), shown until the key changes
    /// again. Counted apart from the two above, with examples tagged `deleted-behind`.
    pub deleted_behind: u64,
    /// Whether the snapshot being applied is behind the client's position (see above).
    snapshot_behind: bool,
    /// The keys of the snapshot being applied so far: a big snapshot comes in frames (a
    /// `snapshot` with `"more":true`, then patches adding the rest), and the keys none of its
    /// frames carries are gone once the last one arrived.
    snapshot_keys: std::collections::HashSet<String>,
    /// Whether the patch being applied is behind the highest position the client was shown.
    replaying: bool,
    /// The highest position the client was shown: its epoch and, per partition, the largest
    /// offset.
    high: Option<(String, Vec<i64>)>,
    /// The first regressions of each kind (at most 20 each).
    pub examples: Vec<String>,
    pub values_checked: u64,
}

/// The `n` a row shows: its column `n`, or a history's last entry's (see the module doc);
/// `None` for a history whose last entry is a delete.
fn shown_n(row: &Value) -> Option<i64> {
    match row["history"].as_array() {
        Some(entries) => match entries.last() {
            Some(Value::Null) | None => None,
            Some(e) => Some(e["n"].as_i64().unwrap_or(-1)),
        },
        None => Some(row["n"].as_i64().unwrap_or(-1)),
    }
}

impl Seen {
    /// Applies one key's new row (`None`: deleted); `replacing` when it comes from a snapshot.
    fn apply(&mut self, key: &str, row: Option<Value>, replacing: bool, at: &str) {
        // a history showing its key deleted: kept (the next patch adds to it), checked as a
        // delete
        let row = match row {
            Some(r) if shown_n(&r).is_none() => {
                // its last value must not be older than one the client showed
                let last = r["history"]
                    .as_array()
                    .and_then(|e| e.iter().rev().find_map(|e| e["n"].as_i64()));
                let max = self.max_n.get(key).copied().unwrap_or(i64::MIN);
                if let Some(n) = last.filter(|n| *n < max) {
                    self.deleted_behind += 1;
                    let e = format!(
                        "{key}: n {max} -> {n}, deleted ({at}) [{} connects, at {} UTC] deleted-behind",
                        self.connects,
                        time_of_day()
                    );
                    self.keep_example("deleted-behind", e);
                }
                // shown deleted: the row stays, its key absent from what the client shows
                self.apply(key, None, replacing, at);
                self.state.insert(key.to_string(), r);
                return;
            }
            row => row,
        };
        match row {
            None => {
                // a row already shown deleted is not deleted again
                if let Some(n) = self.state.remove(key).and_then(|r| shown_n(&r)) {
                    let d = self.deleted_at.entry(key.to_string()).or_insert(n);
                    *d = (*d).max(n);
                }
            }
            Some(r) => {
                let n = shown_n(&r).unwrap_or(-1);
                self.values_checked += 1;
                let was_absent = self.state.get(key).is_none_or(|r| shown_n(r).is_none());
                let max = self.max_n.get(key).copied().unwrap_or(i64::MIN);
                let back = if n < max {
                    Some(format!("{key}: n {max} -> {n} ({at})"))
                } else if was_absent && self.deleted_at.get(key).is_some_and(|d| n <= *d) {
                    Some(format!(
                        "{key}: deleted at n {} and back with n {n} ({at})",
                        self.deleted_at[key]
                    ))
                } else {
                    None
                };
                if let Some(b) = back {
                    self.went_back(b, replacing);
                }
                self.max_n.insert(key.to_string(), n.max(max));
                self.state.insert(key.to_string(), r);
            }
        }
    }

    /// Counts a value older than one the client showed (`what`), carried by a snapshot
    /// (`replacing`) or live, and keeps it as an example.
    fn went_back(&mut self, what: String, replacing: bool) {
        let mut b = what;
        b.push_str(&format!(
            " [client at {} before, {} connects, at {} UTC]",
            self.pos.as_deref().unwrap_or("-"),
            self.connects,
            time_of_day()
        ));
        let kind = if replacing {
            self.stale_after_recovery += 1;
            if self.snapshot_behind {
                self.stale_behind_position += 1;
                b.push_str(" behind-position");
            }
            "stale-after-recovery"
        } else {
            self.reordered_visible += 1;
            if self.replaying {
                self.replay_after_stale += 1;
                b.push_str(" replay-after-stale");
            }
            "reordered-visible"
        };
        b.push(' ');
        b.push_str(kind);
        self.keep_example(kind, b);
    }

    /// Keeps `example` (tagged `kind`) while fewer than 20 of that kind are kept.
    fn keep_example(&mut self, kind: &str, example: String) {
        if self.examples.iter().filter(|e| e.contains(kind)).count() < 20 {
            self.examples.push(example);
        }
    }

    /// Deletes (as a replacing state) every key `kept` says a new state does not carry.
    fn forget_absent(&mut self, kept: impl Fn(&str) -> bool, at: &str) {
        let gone: Vec<String> = self.state.keys().filter(|k| !kept(k)).cloned().collect();
        for k in gone {
            self.apply(&k, None, true, at);
        }
    }

    /// Whether message `m`'s position is behind the highest position this client was shown (same
    /// epoch) in some partition; then raises that highest position with it.
    fn behind_high(&mut self, m: &Value) -> bool {
        let Some((epoch, offs)) = m["pos"].as_str().and_then(parse_pos) else {
            return false;
        };
        match &mut self.high {
            Some((e, high)) if *e == epoch => {
                let back = high
                    .iter()
                    .enumerate()
                    .any(|(i, h)| offs.get(i).is_none_or(|o| o < h));
                for (i, o) in offs.iter().enumerate() {
                    match high.get_mut(i) {
                        Some(h) => *h = (*h).max(*o),
                        None => high.push(*o),
                    }
                }
                back
            }
            _ => {
                self.high = Some((epoch, offs));
                false
            }
        }
    }

    /// The last frame of a snapshot arrived: the keys none of its frames carried are gone (a
    /// replacing state).
    fn snapshot_done(&mut self, at: &str) {
        let keys = std::mem::take(&mut self.snapshot_keys);
        self.forget_absent(|k| keys.contains(k), at);
    }

    /// `{key: n}` of the client's state (a key shown deleted is absent).
    pub fn ns(&self) -> State {
        self.state
            .iter()
            .filter_map(|(k, v)| shown_n(v).map(|n| (k.clone(), n)))
            .collect()
    }

    /// A snapshot (or its continuation frames) or a patch of the envelope protocol.
    fn envelope(&mut self, m: &Value, in_snapshot: &mut bool, resumed: &mut bool) {
        let at = format!("{} {}", m["type"].as_str().unwrap_or("?"), m["pos"]);
        match m["type"].as_str() {
            Some("snapshot") => {
                self.snapshots += 1;
                *resumed = false;
                self.snapshot_behind = self.behind_high(m);
                let rows = m["rows"].as_object().cloned().unwrap_or_default();
                self.snapshot_keys = rows.keys().cloned().collect();
                for (k, v) in rows {
                    self.apply(&k, Some(v), true, &at);
                }
                *in_snapshot = m["more"] == Value::Bool(true);
                if *in_snapshot {
                    // a connection lost before the last frame holds a state half replaced: the
                    // next one asks for a whole snapshot, not the patches since the old position
                    self.pos = None;
                } else {
                    self.snapshot_done(&at);
                    self.pos = m["pos"].as_str().map(String::from);
                }
            }
            Some("patch") => {
                self.replaying = self.behind_high(m);
                if *resumed {
                    self.resumes += 1;
                    *resumed = false;
                }
                let replacing = *in_snapshot;
                for (k, v) in m["patch"].as_object().cloned().unwrap_or_default() {
                    // a frame of a snapshot carries whole rows: merged onto nothing
                    let whole = replacing && self.snapshot_keys.insert(k.clone());
                    if v.is_null() {
                        self.apply(&k, None, replacing, &at);
                    } else {
                        let mut row = if whole {
                            Value::Null
                        } else {
                            self.state.get(&k).cloned().unwrap_or(Value::Null)
                        };
                        livetable::patch::merge(&mut row, &v);
                        self.apply(&k, Some(row), replacing, &at);
                    }
                }
                *in_snapshot = m["more"] == Value::Bool(true);
                if replacing && !*in_snapshot {
                    self.snapshot_done(&at);
                }
                if !*in_snapshot {
                    self.pos = m["pos"].as_str().map(String::from);
                }
            }
            Some("error") => self.errors.push(m.to_string()),
            _ => {}
        }
    }
}

/// The UTC time of day (`HH:MM:SS.mmm`), to match an example with the faults in the log.
fn time_of_day() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 86_400_000)
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// A position token `epoch~o0.o1...` as its epoch and offsets.
fn parse_pos(t: &str) -> Option<(String, Vec<i64>)> {
    let (e, p) = t.split_once('~')?;
    let offs = p
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<Vec<i64>>>()?;
    Some((e.to_string(), offs))
}

/// Whether position token `snap` (`epoch~o0.o1...`) is of the same epoch as `held` and behind it
/// in some partition.
#[cfg(test)]
fn behind(snap: &str, held: &str) -> bool {
    match (parse_pos(snap), parse_pos(held)) {
        (Some((es, s)), Some((eh, h))) => {
            es == eh
                && h.iter()
                    .enumerate()
                    .any(|(i, o)| s.get(i).is_none_or(|x| x < o))
        }
        _ => false,
    }
}

/// How long after a `rows` connection opens a regression counts as stale-after-recovery.
const ROWS_RECOVERY_WINDOW: Duration = Duration::from_secs(10);

/// One live client.
pub struct Client {
    pub name: String,
    pub kind: Kind,
    pub table: String,
    pub keys: Option<Vec<String>>,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub fn start(
        name: &str,
        kind: Kind,
        base: &str,
        table: &str,
        keys: Option<Vec<String>>,
        stop: Arc<AtomicBool>,
    ) -> Client {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (s, b, t, k) = (
            seen.clone(),
            base.to_string(),
            table.to_string(),
            keys.clone(),
        );
        let task = tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let since = s.lock().unwrap_or_else(|e| e.into_inner()).pos.clone();
                let r = match kind {
                    Kind::WsPatch | Kind::WsRows => ws_session(kind, &b, &t, &k, since, &s).await,
                    Kind::Sse => sse_session(&b, &t, &k, since, &s).await,
                };
                if let Err(e) = r {
                    let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                    if g.errors.len() < 1000 && !e.contains("Connection refused") {
                        g.errors.push(e);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Client {
            name: name.into(),
            kind,
            table: table.into(),
            keys,
            seen,
            task,
        }
    }

    /// The oracle restricted to this client's keys.
    pub fn want(&self, oracle: &State) -> State {
        match &self.keys {
            None => oracle.clone(),
            Some(keys) => oracle
                .iter()
                .filter(|(k, _)| keys.contains(k))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(table: &str, keys: &Option<Vec<String>>) -> String {
    let mut q = format!("table={table}");
    if let Some(k) = keys {
        q.push_str(&format!("&keys={}", k.join(",")));
    }
    q
}

async fn ws_session(
    kind: Kind,
    base: &str,
    table: &str,
    keys: &Option<Vec<String>>,
    since: Option<String>,
    seen: &Arc<Mutex<Seen>>,
) -> Result<(), String> {
    let mut url = format!(
        "{}/ws?{}",
        base.replace("http://", "ws://"),
        query(table, keys)
    );
    let rows = kind == Kind::WsRows;
    if rows {
        url.push_str("&format=rows&up_to_date=true");
    } else if let Some(s) = &since {
        url.push_str(&format!("&since={s}"));
    }
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    seen.lock().unwrap_or_else(|e| e.into_inner()).connects += 1;
    let mut in_snapshot = false;
    let mut resumed = since.is_some();
    // rows format: the current rows come first, one message each, then `{"__up_to_date":true}`
    // (asked for with up_to_date=true), then the changes
    let connected = Instant::now();
    let mut initial_keys: std::collections::HashSet<String> = Default::default();
    let mut initial = true;
    loop {
        let Some(msg) = ws.next().await else { break };
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(Some(f))) if f.code == CloseCode::Library(4409) => {
                // fell behind further than the replay buffer: the rows start over
                seen.lock().unwrap_or_else(|e| e.into_inner()).rows_resyncs += 1;
                break;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let m: Value = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
        let mut g = seen.lock().unwrap_or_else(|e| e.into_inner());
        g.messages += 1;
        if !rows {
            g.envelope(&m, &mut in_snapshot, &mut resumed);
            continue;
        }
        if m["__up_to_date"] == Value::Bool(true) {
            if !initial {
                g.errors
                    .push("rows connection: a second __up_to_date marker".to_string());
            }
            // the initial rows are complete: rows held before and not among them were deleted
            // while the client was away
            initial = false;
            g.forget_absent(|k| initial_keys.contains(k), "rows reconnect");
            continue;
        }
        if m.get("type").is_some() && m.get("id").is_none() {
            if m["type"] == "error" {
                g.errors.push(m.to_string());
            }
            continue;
        }
        let deleted = m["__deleted"] == Value::Bool(true);
        let key = m["id"]
            .as_str()
            .or_else(|| m["__key"].as_str())
            .unwrap_or_default()
            .to_string();
        // a rows connection carries no position: a regression in its first seconds (the initial
        // rows, or a node that is still restoring) counts as stale-after-recovery, later ones as
        // reordered
        let recovering = initial || connected.elapsed() < ROWS_RECOVERY_WINDOW;
        let at = if initial {
            "initial row"
        } else if recovering {
            "row soon after connecting"
        } else {
            "row"
        };
        if initial {
            initial_keys.insert(key.clone());
        }
        let row = (!deleted).then(|| {
            let mut r = m.clone();
            if let Some(o) = r.as_object_mut() {
                o.retain(|_, v| !v.is_null());
            }
            r
        });
        g.apply(&key, row, recovering, at);
    }
    Ok(())
}

async fn sse_session(
    base: &str,
    table: &str,
    keys: &Option<Vec<String>>,
    since: Option<String>,
    seen: &Arc<Mutex<Seen>>,
) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = client.get(format!("{base}/sse?{}", query(table, keys)));
    if let Some(s) = &since {
        req = req.header("Last-Event-ID", s);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("sse: http {}", resp.status()));
    }
    seen.lock().unwrap_or_else(|e| e.into_inner()).connects += 1;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut data = String::new();
    let mut in_snapshot = false;
    let mut resumed = since.is_some();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line = buf[..i].trim_end_matches('\r').to_string();
            buf.drain(..=i);
            if line.is_empty() {
                if !data.is_empty() {
                    let m: Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
                    data.clear();
                    let mut g = seen.lock().unwrap_or_else(|e| e.into_inner());
                    g.messages += 1;
                    g.envelope(&m, &mut in_snapshot, &mut resumed);
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{behind, Seen};
    use serde_json::json;

    #[test]
    fn a_snapshot_in_frames_replaces_the_state_once_its_last_frame_arrived() {
        let mut s = Seen::default();
        let (mut snap, mut resumed) = (false, false);
        let live = json!({"type": "patch", "pos": "e~1", "patch": {"a": {"n": 5}, "b": {"n": 6, "x": 1}, "c": {"n": 7}}});
        s.envelope(&live, &mut snap, &mut resumed);
        // a snapshot in three frames: b arrives in the second, c in none
        let frames = [
            json!({"type": "snapshot", "pos": "e~2", "rows": {"a": {"n": 5}}, "more": true}),
            json!({"type": "patch", "pos": "e~2", "patch": {"b": {"n": 6}}, "more": true}),
            json!({"type": "patch", "pos": "e~2", "patch": {}, "more": false}),
        ];
        for f in &frames[..2] {
            s.envelope(f, &mut snap, &mut resumed);
        }
        assert_eq!(s.ns().len(), 3, "nothing is gone before the last frame");
        assert_eq!(
            s.pos, None,
            "a connection lost now asks for a whole snapshot"
        );
        s.envelope(&frames[2], &mut snap, &mut resumed);
        assert_eq!(s.ns().keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(s.pos.as_deref(), Some("e~2"));
        assert_eq!(s.state["b"], json!({"n": 6}), "a frame's row is whole");
        assert_eq!(
            s.stale_after_recovery + s.reordered_visible,
            0,
            "{:?}",
            s.examples
        );
        // c back with a larger n: fine; with an older one: a value going back
        let back = |n: i64| json!({"type": "patch", "pos": "e~3", "patch": {"c": {"n": n}}});
        s.envelope(&back(7), &mut snap, &mut resumed);
        assert_eq!(s.reordered_visible, 1);
    }

    #[test]
    fn a_history_row_shows_its_last_entry_and_a_last_delete_hides_its_key() {
        let mut s = Seen::default();
        let (mut snap, mut resumed) = (false, false);
        let mut patch = |s: &mut Seen, p: serde_json::Value| {
            s.envelope(
                &json!({"type": "patch", "pos": "e~1", "patch": p}),
                &mut snap,
                &mut resumed,
            )
        };
        patch(&mut s, json!({"a": {"history": [{"n": 3}, {"n": 7}]}}));
        assert_eq!(s.ns().get("a"), Some(&7));
        // deleted: the row stays, the key is not shown
        patch(
            &mut s,
            json!({"a": {"history": [{"n": 3}, {"n": 7}, null]}}),
        );
        assert!(s.ns().is_empty());
        assert_eq!(s.state.len(), 1);
        // back with a larger n: fine; then an older history: a value going back
        patch(
            &mut s,
            json!({"a": {"history": [{"n": 7}, null, {"n": 9}]}}),
        );
        assert_eq!(s.ns().get("a"), Some(&9));
        assert_eq!(s.reordered_visible, 0);
        patch(&mut s, json!({"a": {"history": [{"n": 3}, {"n": 7}]}}));
        assert_eq!(s.reordered_visible, 1);
        // back after a delete with an n not larger than before it
        patch(&mut s, json!({"b": {"history": [{"n": 5}]}}));
        patch(&mut s, json!({"b": {"history": [{"n": 5}, null]}}));
        patch(&mut s, json!({"b": {"history": [{"n": 4}]}}));
        assert_eq!(s.reordered_visible, 2, "{:?}", s.examples);
        // a deleted history whose last value is older than one shown
        patch(
            &mut s,
            json!({"a": {"history": [{"n": 7}, null, {"n": 9}, {"n": 11}]}}),
        );
        patch(
            &mut s,
            json!({"a": {"history": [{"n": 7}, null, {"n": 9}, null]}}),
        );
        assert_eq!(s.reordered_visible, 2, "{:?}", s.examples);
        assert_eq!(s.deleted_behind, 1, "{:?}", s.examples);
    }

    #[test]
    fn a_snapshot_is_behind_when_one_partition_is_behind_in_the_same_epoch() {
        assert!(behind("e~5.3", "e~5.4"));
        assert!(behind("e~6.3", "e~5.4"));
        assert!(behind("e~9", "e~9.1"));
        assert!(!behind("e~5.4", "e~5.4"));
        assert!(!behind("e~6.4", "e~5.4"));
        assert!(!behind("f~1.1", "e~5.4"));
        assert!(!behind("e~x", "e~5.4"));
    }
}
