//! A `format=rows` subscription that falls behind its table's update channel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{RowsResync, Session, SessionEnv};
use crate::cdc::decode::Op;
use crate::fanout::hub::{BufferLimits, Hub, Missed};
use crate::fanout::protocol::{Format, Outgoing};
use crate::fanout::selector::Selector;
use crate::metrics::Metrics;
use crate::table::state::{Delta, RowWrite, SliceMode, Tables};

struct Fixture {
    tables: Arc<Tables>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    off: i64,
}

impl Fixture {
    /// A one-partition table `t` with rows `k0..k9` (`n` = 0), and a hub whose update channel
    /// holds 16 updates and whose replay buffer holds `replay` changes.
    fn new(replay: usize) -> Self {
        Fixture::with(BufferLimits {
            changes: replay,
            bytes: 64 << 20,
        })
    }

    /// [`Fixture::new`] with the hub's buffer limited by `limits`.
    fn with(limits: BufferLimits) -> Self {
        let tables = Arc::new(Tables::default());
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(tables.clone(), metrics.clone(), limits, 16));
        tables
            .ensure("t", "e1", "topic", 1)
            .update_slices(|s| s.slice_mut(0).mode = SliceMode::Owned);
        hub.open("t");
        let mut f = Fixture {
            tables,
            hub,
            metrics,
            off: 0,
        };
        f.commit((0..10).map(|i| (format!("k{i}"), Some(0))).collect());
        f
    }

    /// One update: each key's new `n` (`None`: deleted).
    fn commit(&mut self, writes: Vec<(String, Option<i64>)>) {
        let t = self.tables.get("t").expect("table");
        let mut d = Delta::new(t);
        for (key, n) in writes {
            self.off += 1;
            let row = n.map(|n| {
                let v = json!({"id": key, "n": n});
                Arc::new(v.as_object().cloned().unwrap_or_default())
            });
            d.stage(RowWrite {
                key,
                row: row.map(Into::into),
                op: Op::Update,
                part: 0,
                off: self.off,
                ts_ms: None,
                kafka_ts_ms: None,
                polled: None,
            });
        }
        self.tables.commit(d, &*self.hub);
    }

    /// The table's rows as `key -> n`.
    fn table(&self) -> BTreeMap<String, i64> {
        let t = self.tables.get("t").expect("table");
        let s = t.read();
        s.rows
            .iter()
            .map(|(k, e)| (k.clone(), e.row["n"].as_i64().unwrap_or(-1)))
            .collect()
    }

    fn session(&self) -> Session {
        self.session_with(no_copy_limit())
    }

    /// A session that knows union `all` of table `t`.
    fn union_session(&self) -> Session {
        let union = crate::config::UnionDef {
            name: "all".into(),
            pattern: regex::Regex::new("^t$").unwrap(),
        };
        self.session_of(no_copy_limit(), vec![union])
    }

    /// The table's rows as union `all` holds them: `t/key -> n`.
    fn union_table(&self) -> BTreeMap<String, i64> {
        self.table()
            .into_iter()
            .map(|(k, n)| (format!("t/{k}"), n))
            .collect()
    }

    /// A session whose copies take places among `copies`.
    fn session_with(&self, copies: Arc<crate::fanout::copies::Copies>) -> Session {
        self.session_of(copies, Vec::new())
    }

    fn session_of(
        &self,
        copies: Arc<crate::fanout::copies::Copies>,
        unions: Vec<crate::config::UnionDef>,
    ) -> Session {
        Session::new(
            Arc::new(SessionEnv {
                hub: self.hub.clone(),
                metrics: self.metrics.clone(),
                resume_wait: Duration::from_secs(1),
                unions: Arc::from(unions),
                copies,
            }),
            16,
        )
    }

    /// A session subscribed to `t` in `format=rows`, and the client state its rows make.
    async fn rows_client(&self) -> (Session, BTreeMap<String, i64>) {
        let mut s = self.session();
        let mut client = BTreeMap::new();
        apply(
            &mut client,
            s.subscribe("t", Selector::default(), None, Format::Rows)
                .await,
        );
        (s, client)
    }

    /// 60 single-change updates (more than the channel holds): k0..k4 deleted, k5..k9 updated
    /// and new keys n0..n9 created.
    fn burst(&mut self) {
        for i in 0..60 {
            let w = match i % 3 {
                0 if i / 3 < 5 => (format!("k{}", i / 3), None),
                0 => (format!("n{}", i / 3 - 5), Some(i)),
                1 => (format!("k{}", 5 + (i / 3) % 5), Some(i)),
                _ => (format!("n{}", (i / 3) % 10), Some(i)),
            };
            self.commit(vec![w]);
        }
    }
}

/// Copies without a bound on places.
fn no_copy_limit() -> Arc<crate::fanout::copies::Copies> {
    Arc::new(crate::fanout::copies::Copies::new(
        0,
        prometheus::IntGauge::new("g", "g").unwrap(),
    ))
}

/// Applies `format=rows` messages to a client's state.
fn apply(state: &mut BTreeMap<String, i64>, out: Vec<Outgoing>) {
    for o in out {
        let Some(r) = o.row_value() else {
            panic!("a rows session sent {o:?}");
        };
        let key = r["id"].as_str().expect("id").to_string();
        if r["__deleted"] == Value::Bool(true) {
            state.remove(&key);
        } else {
            state.insert(key, r["n"].as_i64().expect("n"));
        }
    }
}

/// Runs the session's events until none comes for a moment.
async fn drain(s: &mut Session, state: &mut BTreeMap<String, i64>) {
    for _ in 0..1000 {
        match tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            Ok(event) => s.on_event(event).await,
            Err(_) => break,
        }
        if s.close.is_some() {
            break;
        }
        let (out, frames) = s.take();
        assert!(frames.is_empty(), "rows sessions get no shared frames");
        apply(state, out);
    }
    let (out, _) = s.take();
    apply(state, out);
}

#[tokio::test]
async fn a_rows_client_that_fell_behind_gets_the_deletes_it_missed() {
    let mut f = Fixture::new(10_000);
    let (mut s, mut client) = f.rows_client().await;
    assert_eq!(client, f.table());
    f.burst();
    drain(&mut s, &mut client).await;
    assert!(
        f.metrics.resnapshots.get() >= 1,
        "the session did not fall behind its channel: the test tests nothing"
    );
    assert_eq!(s.close, None, "the replay buffer covers the gap");
    assert!(!client.contains_key("k0"), "k0 was deleted: {client:?}");
    assert_eq!(client, f.table(), "the client's rows are the table's");
    // and it goes on live
    f.commit(vec![("k9".into(), Some(1000)), ("k5".into(), None)]);
    drain(&mut s, &mut client).await;
    assert_eq!(client, f.table());
}

#[tokio::test]
async fn a_rows_client_behind_the_replay_buffer_is_closed_not_sent_a_partial_list() {
    let mut f = Fixture::new(8);
    let (mut s, mut client) = f.rows_client().await;
    let built = f.metrics.snapshot_seconds.get_sample_count();
    f.burst();
    drain(&mut s, &mut client).await;
    assert!(f.metrics.resnapshots.get() >= 1, "did not fall behind");
    assert_eq!(s.close, Some(RowsResync::Behind));
    assert_eq!(
        f.metrics.snapshot_seconds.get_sample_count(),
        built,
        "a list of rows (or a resume) was built for a connection that is closed"
    );
    // nothing it was sent claims a state it does not have: every row it holds is a value the
    // key really had, and no list of current rows followed
    let (out, _) = s.take();
    assert!(out.is_empty(), "{out:?}");
}

#[tokio::test]
async fn a_patch_client_that_fell_behind_gets_a_new_snapshot() {
    let mut f = Fixture::new(8);
    let mut s = f.session();
    let first = s
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    assert!(
        matches!(first[..], [Outgoing::Snapshot { .. }]),
        "{first:?}"
    );
    f.burst();
    let mut snapshots = 0;
    for _ in 0..1000 {
        match tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            Ok(event) => s.on_event(event).await,
            Err(_) => break,
        }
        let (out, _) = s.take();
        snapshots += out
            .iter()
            .filter(|o| matches!(o, Outgoing::Snapshot { .. }))
            .count();
    }
    assert!(f.metrics.resnapshots.get() >= 1, "did not fall behind");
    assert!(snapshots >= 1, "a patch client is sent a new snapshot");
    assert_eq!(s.close, None);
}

#[tokio::test]
async fn a_patch_client_whose_unread_updates_the_byte_budget_dropped_gets_a_new_snapshot() {
    // room for about one update: each one drops the one before it
    let mut f = Fixture::with(BufferLimits {
        changes: 1000,
        bytes: 1,
    });
    let mut s = f.session();
    let mut client = BTreeMap::new();
    let first = s
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    let mut snapshots = patch_apply(&mut client, first.iter().flat_map(|o| o.frames()));
    // fewer updates than the channel holds (16): only the budget makes the client miss any
    for i in 0..10 {
        f.commit(vec![(format!("k{i}"), Some(100 + i))]);
    }
    for _ in 0..100 {
        match tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            Ok(event) => s.on_event(event).await,
            Err(_) => break,
        }
        let (out, frames) = s.take();
        snapshots += patch_apply(&mut client, frames.into_iter().map(|f| f.text));
        snapshots += patch_apply(&mut client, out.iter().flat_map(|o| o.frames()));
    }
    assert!(
        f.metrics.fanout_buffer_evictions.get() >= 1,
        "nothing was dropped unread: the test tests nothing"
    );
    assert!(snapshots >= 2, "the client was sent a new snapshot");
    assert_eq!(client, f.table(), "the client's rows are the table's");
}

/// Applies patch-format frames to a client's `key -> n`; returns the snapshots among them.
fn patch_apply(
    state: &mut BTreeMap<String, i64>,
    texts: impl IntoIterator<Item = axum::extract::ws::Utf8Bytes>,
) -> usize {
    let mut snapshots = 0;
    for t in texts {
        let m: Value = serde_json::from_str(t.as_str()).expect("JSON");
        let rows = match m["type"].as_str() {
            Some("snapshot") => {
                snapshots += 1;
                state.clear();
                &m["rows"]
            }
            Some("patch") => &m["patch"],
            _ => continue,
        };
        for (k, v) in rows.as_object().into_iter().flatten() {
            match v["n"].as_i64() {
                _ if v.is_null() => {
                    state.remove(k);
                }
                Some(n) => {
                    state.insert(k.clone(), n);
                }
                None => {}
            }
        }
    }
    snapshots
}

#[tokio::test]
async fn an_update_dropped_unread_is_lost_only_to_a_member_not_past_it() {
    let f = Fixture::new(1000);
    let mut s = f.session();
    s.subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    let (useq, epoch) = (s.members[0].sub.useq, s.members[0].sub.epoch.clone());
    let key = ("t".to_string(), None);
    let dropped = |useq, epoch: &str| Missed::Dropped {
        useq,
        epoch: epoch.into(),
    };
    assert!(
        !s.lost(&key, &dropped(useq, &epoch)),
        "its snapshot holds it"
    );
    assert!(s.lost(&key, &dropped(useq + 1, &epoch)));
    assert!(s.lost(&key, &dropped(useq, "another lineage")));
    assert!(s.lost(&key, &Missed::Lagged));
}

/// What the connection loop awaits on every update stays small: an async fn's future is as
/// large as the largest future it awaits, for as long as the connection lives, so a rare path
/// (a subscription start, a restart) awaited unboxed there grows every idle connection
/// (bench: connections-snapshot; an unboxed restart in `absorb` cost ~2 KiB per connection).
#[tokio::test]
async fn the_futures_on_the_update_path_stay_small() {
    let f = Fixture::new(1000);
    let (mut s, _) = f.rows_client().await;
    let next = std::mem::size_of_val(&s.next());
    let on_event = std::mem::size_of_val(&s.on_event(super::Event::Rescan));
    eprintln!("next {next} bytes, on_event {on_event} bytes");
    // 24 and 104 bytes (debug build) at the time of writing, since `next` polls the session's
    // streams and `on_event` boxes what must wait; before, 328 and 504; a nested subscription
    // start is ~1.4 KiB more
    assert!(next <= 64, "Session::next's future is {next} bytes");
    assert!(
        on_event <= 256,
        "Session::on_event's future is {on_event} bytes"
    );
}

/// What a WebSocket connection does while its write waits: [`Session::poll_take`] takes the
/// ready updates into the pending output without waiting, and hands back what must (a new
/// snapshot) for after the write.
#[tokio::test]
async fn poll_take_composes_what_is_ready_and_hands_back_what_must_wait() {
    use std::task::{Context, Poll, Waker};
    let mut f = Fixture::new(8);
    let mut s = f.session();
    let mut client = BTreeMap::new();
    let first = s
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    patch_apply(&mut client, first.iter().flat_map(|o| o.frames()));
    let mut cx = Context::from_waker(Waker::noop());
    // fewer updates than the channel holds (16): all taken at once, none waits
    for i in 0..12 {
        f.commit(vec![(format!("k{}", i % 10), Some(100 + i))]);
    }
    assert!(s.poll_take(&mut cx).is_pending());
    let (out, frames) = s.take();
    assert!(!frames.is_empty(), "the updates were taken");
    let mut snapshots = patch_apply(&mut client, frames.into_iter().map(|f| f.text));
    snapshots += patch_apply(&mut client, out.iter().flat_map(|o| o.frames()));
    assert_eq!(snapshots, 0);
    assert_eq!(client, f.table(), "the client's rows are the table's");

    // more than the channel holds: the session lagged, which needs a snapshot built
    f.burst();
    let Poll::Ready(w) = s.poll_take(&mut cx) else {
        panic!("a lagged feed must hand back a snapshot to build");
    };
    s.finish(w).await;
    // as the connection writes a turn: its frames, then its messages
    for _ in 0..100 {
        let (out, frames) = s.take();
        snapshots += patch_apply(&mut client, frames.into_iter().map(|f| f.text));
        snapshots += patch_apply(&mut client, out.iter().flat_map(|o| o.frames()));
        match s.poll_take(&mut cx) {
            Poll::Ready(w) => s.finish(w).await,
            Poll::Pending => {
                let (out, frames) = s.take();
                snapshots += patch_apply(&mut client, frames.into_iter().map(|f| f.text));
                snapshots += patch_apply(&mut client, out.iter().flat_map(|o| o.frames()));
                break;
            }
        }
    }
    assert_eq!(snapshots, 1, "the lagged client was sent a new snapshot");
    assert!(f.metrics.resnapshots.get() >= 1);
    assert_eq!(client, f.table(), "the client's rows are the table's");
}

#[tokio::test]
async fn a_session_holds_one_place_for_its_copies_and_never_waits_on_itself() {
    let f = Fixture::new(1000);
    let copies = Arc::new(crate::fanout::copies::Copies::new(
        1,
        prometheus::IntGauge::new("g", "g").unwrap(),
    ));
    let mut s = f.session_with(copies.clone());
    let started = std::time::Instant::now();
    let mut client = BTreeMap::new();
    apply(
        &mut client,
        s.subscribe("t", Selector::default(), None, Format::Rows)
            .await,
    );
    assert_eq!(client, f.table());
    assert_eq!(copies.in_flight(), 1);
    // a second copy of its own on the same session (the only place is its own): no wait
    let scanned = Selector::build(None, Some("n >= 0"), None).unwrap();
    let out = s.subscribe("t", scanned, None, Format::Patch).await;
    assert!(
        matches!(out[..], [Outgoing::Snapshot { rows: 10, .. }]),
        "{out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(copies.in_flight(), 1);
    assert!(copies.try_enter().is_none());
    // written: the place goes back
    drop(s.take_places());
    assert_eq!(copies.in_flight(), 0);
    // a lookup by keys takes no place, even with none free
    let held = copies.try_enter().unwrap();
    let mut other = f.session_with(copies.clone());
    let started = std::time::Instant::now();
    let out = other
        .subscribe(
            "t",
            Selector::keys(Some(["k1".into()].into())),
            None,
            Format::Rows,
        )
        .await;
    assert_eq!(out.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(held);
}

#[tokio::test]
async fn a_token_decides_whether_a_subscription_copies_the_table() {
    use crate::auth::claims::Grant;
    use crate::auth::Access;
    use crate::fanout::protocol::ErrorCode;
    let f = Fixture::new(1000);
    let copies = Arc::new(crate::fanout::copies::Copies::new(
        1,
        prometheus::IntGauge::new("g", "g").unwrap(),
    ));
    // no place is free
    let held = copies.try_enter().unwrap();
    let token = |keys: Value| {
        let claims = json!({"exp": 1, "livetable": {"tables": ["t"], "keys": {"t": keys}}});
        Access::Token(Arc::new(
            Grant::from_claims(claims.as_object().unwrap(), "livetable").unwrap(),
        ))
    };
    // keys listed by the token: a scanned `where` is a lookup for it, answered at once
    let mut s = f
        .session_with(copies.clone())
        .with_access(token(json!(["k1", "k2"])));
    let started = std::time::Instant::now();
    let scanned = Selector::build(None, Some("n >= 0"), None).unwrap();
    let out = s.subscribe("t", scanned, None, Format::Patch).await;
    assert!(
        matches!(out[..], [Outgoing::Snapshot { rows: 2, .. }]),
        "{out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // a key pattern: a whole-table subscribe scans for it, so it waits for a place, then busy
    let mut s = f
        .session_with(copies.clone())
        .with_access(token(json!(["k*"])));
    let started = std::time::Instant::now();
    let out = s
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    assert_eq!(only_error(&out), Some(ErrorCode::Busy), "{out:?}");
    assert!(started.elapsed() >= Duration::from_secs(4));
    // a table the token does not grant: forbidden at once, not busy
    let started = std::time::Instant::now();
    let out = s
        .subscribe("nope", Selector::default(), None, Format::Rows)
        .await;
    assert_eq!(only_error(&out), Some(ErrorCode::Forbidden), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(held);
}

/// The code of `out` when it is one error message.
fn only_error(out: &[Outgoing]) -> Option<crate::fanout::protocol::ErrorCode> {
    match out {
        [Outgoing::Error { code, .. }] => Some(*code),
        _ => None,
    }
}

/// A table subscribed alone and through a union: unsubscribing (or subscribing again to) the table
/// leaves the union's member, which keeps getting the table's changes.
#[tokio::test]
async fn a_plain_subscription_to_a_union_member_leaves_the_union_alone() {
    let mut f = Fixture::new(64);
    let mut s = f.union_session();
    let u = s
        .subscribe("all", Selector::default(), None, Format::Patch)
        .await;
    assert!(matches!(u[..], [Outgoing::Snapshot { .. }]), "{u:?}");
    let _ = s
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    assert!(s.unsubscribe("t"));
    let _ = s
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    assert!(s.unsubscribe("t"));
    let _ = s.take();
    f.commit(vec![("k3".into(), Some(7))]);
    let mut sent = String::new();
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            Ok(event) => s.on_event(event).await,
            Err(_) => break,
        }
        let (out, frames) = s.take();
        sent.push_str(&format!("{out:?} {frames:?}"));
    }
    assert!(
        sent.contains("t/k3"),
        "the union's member got the change: {sent}"
    );
}

/// What a union client holds after `out` (union keys `t/k` -> `n`): a union snapshot replaces it,
/// a patch merges (`null` deletes).
fn apply_union(state: &mut BTreeMap<String, i64>, out: Vec<Outgoing>) {
    let merge = |state: &mut BTreeMap<String, i64>, m: &serde_json::Map<String, Value>| {
        for (k, r) in m {
            match r["n"].as_i64() {
                Some(n) if !r.is_null() => {
                    state.insert(k.clone(), n);
                }
                _ => {
                    state.remove(k);
                }
            }
        }
    };
    for o in out {
        match o {
            Outgoing::Snapshot { table, parts, .. } => {
                assert_eq!(table, "all", "only the union's own snapshots: {parts:?}");
                state.clear();
                for p in parts.iter() {
                    let v: Value = serde_json::from_str(p.as_str()).unwrap();
                    let m = v.get("rows").or_else(|| v.get("patch"));
                    merge(state, m.and_then(Value::as_object).unwrap());
                }
            }
            Outgoing::Patch { table, patch, .. } => {
                assert_eq!(table, "all");
                merge(state, &patch);
            }
            other => panic!("a union client got {other:?}"),
        }
    }
}

/// A union member that falls behind its table's channel: the union starts again with a snapshot
/// of itself, so the rows deleted meanwhile leave the client (a member's snapshot sent as a
/// patch of the union left them).
#[tokio::test]
async fn a_union_member_that_fell_behind_leaves_the_client_exact() {
    let mut f = Fixture::new(8);
    let mut s = f.union_session();
    let mut client = BTreeMap::new();
    let first = s
        .subscribe("all", Selector::default(), None, Format::Patch)
        .await;
    apply_union(&mut client, first);
    assert_eq!(client.len(), 10);
    f.burst();
    for _ in 0..1000 {
        match tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            Ok(event) => s.on_event(event).await,
            Err(_) => break,
        }
        let (out, _) = s.take();
        apply_union(&mut client, out);
    }
    assert!(f.metrics.resnapshots.get() >= 1, "did not fall behind");
    let want = f.union_table();
    assert_eq!(client, want, "deleted rows k0..k4 gone, others current");
}

/// A union subscribed while its member's shared snapshot is a little behind: the changes since
/// that snapshot reach the client as the union's (keys `t/k`), so its state is the table's.
#[tokio::test]
async fn a_union_built_from_a_shared_snapshot_gets_the_changes_since_as_its_own() {
    let mut f = Fixture::new(64);
    let mut plain = f.session();
    let _ = plain
        .subscribe("t", Selector::default(), None, Format::Patch)
        .await;
    f.commit(vec![("k1".into(), Some(5)), ("k2".into(), None)]);
    let mut s = f.union_session();
    let mut client = BTreeMap::new();
    let first = s
        .subscribe("all", Selector::default(), None, Format::Patch)
        .await;
    apply_union(&mut client, first);
    let want = f.union_table();
    assert_eq!(client, want);
}

/// A subscription to a table that does not exist yet waits for it: a patch client is told so
/// (`waiting`), a `format=rows` client gets no message (it has no envelope: a `waiting` would
/// read as a row), and both get the table's rows once it appears.
#[tokio::test]
async fn a_rows_client_waiting_for_a_table_gets_no_envelope_only_its_rows() {
    let f = Fixture::new(100);
    let mut rows = f.session();
    let out = rows
        .subscribe("later", Selector::default(), None, Format::Rows)
        .await;
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(rows.subscriptions(), 1, "the waiter is kept");
    let mut patch = f.session();
    let out = patch
        .subscribe("later", Selector::default(), None, Format::Patch)
        .await;
    assert!(
        matches!(out.as_slice(), [Outgoing::Waiting { table }] if table == "later"),
        "{out:?}"
    );
    // the table appears with one row
    let t = f.tables.ensure("later", "e1", "topic2", 1);
    t.update_slices(|s| s.slice_mut(0).mode = SliceMode::Owned);
    let mut d = Delta::new(t);
    d.stage(RowWrite {
        key: "a".into(),
        row: Some(Arc::new(json!({"id": "a", "n": 7}).as_object().cloned().unwrap()).into()),
        op: Op::Update,
        part: 0,
        off: 1,
        ts_ms: None,
        kafka_ts_ms: None,
        polled: None,
    });
    f.tables.commit(d, &*f.hub);
    // the hub announces it; each session takes its waiter up on that event
    f.hub.open("later");
    let mut got = BTreeMap::new();
    drain(&mut rows, &mut got).await;
    assert_eq!(got, BTreeMap::from([("a".to_string(), 7)]));
    let event = tokio::time::timeout(Duration::from_secs(5), patch.next())
        .await
        .expect("the patch session hears of the table");
    patch.on_event(event).await;
    let (out, _) = patch.take();
    let snapshots: Vec<usize> = out
        .iter()
        .filter_map(|o| match o {
            Outgoing::Snapshot { table, rows, .. } if table == "later" => Some(*rows),
            _ => None,
        })
        .collect();
    assert_eq!(snapshots, vec![1], "{out:?}");
}
