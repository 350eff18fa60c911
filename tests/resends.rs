//! Issue 12: Kafka Connect delivers at least once. After a crash of Connect, Debezium sends again
//! the events since its last flushed offset, at higher Kafka offsets than their first copies.
//! Applied in Kafka order, they took keys back to older values (and deleted rows that exist) until
//! the stream caught up: the chaos suite saw it as values going back in live clients ~7 s after
//! `connect-kill9`. livetable now tells such copies by their source position (PostgreSQL's
//! `source.sequence`) and skips them, across a kill -9 of its own in the middle of the re-send.
//! A second node run with `--source-resends apply` shows the test's stream does go back without
//! the check.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::procs::{api_state, Node, Watcher};
use common::*;
use livetable::table::follower::SECOND_WRITER;
use serde_json::json;

const KEYS: usize = 120;

/// Change `i` of the stream: key `k{i % KEYS}` gets `n = i`, except every 50th change deletes it
/// (a delete event then its tombstone, as Debezium writes them). Its source position is `i`'s.
fn change(i: usize) -> Vec<FixtureRecord> {
    let key = format!("k{}", i % KEYS);
    let lsn = 10_000 + 100 * i as u64;
    // a transaction of two events shares its last commit LSN
    let commit = 10_000 + 100 * (i as u64 / 2) * 2;
    let id = json!({ "id": key }).to_string();
    let source = json!({
        "connector": "postgresql", "name": "srv", "db": "odds", "schema": "public",
        "table": "t", "ts_ms": 1, "snapshot": "false", "lsn": lsn,
        "sequence": json!([commit.to_string(), lsn.to_string()]).to_string(),
    });
    if i % 50 == 49 {
        let delete =
            json!({"before": {"id": key, "n": i}, "after": null, "op": "d", "source": source});
        return vec![
            FixtureRecord {
                key: Some(id.clone()),
                value: Some(delete.to_string()),
                headers: vec![],
            },
            FixtureRecord {
                key: Some(id),
                value: None,
                headers: vec![],
            },
        ];
    }
    let op = if i < KEYS { "c" } else { "u" };
    let value = json!({"before": null, "after": {"id": key, "n": i}, "op": op, "source": source});
    vec![FixtureRecord {
        key: Some(id),
        value: Some(value.to_string()),
        headers: vec![],
    }]
}

fn changes(range: std::ops::Range<usize>) -> Vec<FixtureRecord> {
    range.flat_map(change).collect()
}

/// The table after changes `0..end`: `{key: n}`.
fn oracle(end: usize) -> BTreeMap<String, i64> {
    let mut t = BTreeMap::new();
    for i in 0..end {
        let key = format!("k{}", i % KEYS);
        if i % 50 == 49 {
            t.remove(&key);
        } else {
            t.insert(key, i as i64);
        }
    }
    t
}

async fn until_api(base: &str, want: &BTreeMap<String, i64>, what: &str) {
    eventually(what, Duration::from_secs(60), || async {
        (api_state(base, "t").await.as_ref() == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_connector_sends_again_never_take_a_key_back() {
    let u = unique("resend");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 3).await;
    let logs = tempdir();
    let (dir, dir_apply) = (tempdir(), tempdir());
    let mut node = Node::spawn(
        "skip",
        "all",
        &format!("g-{u}"),
        &topic,
        dir.path(),
        logs.path(),
        &["--max-batch", "50"],
    );
    let mut control = Node::spawn(
        "apply",
        "all",
        &format!("g-{u}-apply"),
        &topic,
        dir_apply.path(),
        logs.path(),
        &["--max-batch", "50", "--source-resends", "apply"],
    );
    let p = producer();
    let (first, end) = (2_000usize, 3_000usize);
    produce_keyed(&p, &topic, &changes(0..KEYS)).await;
    node.wait_ready(Duration::from_secs(90)).await;
    control.wait_ready(Duration::from_secs(90)).await;
    let seen = Watcher::connect(&node.base, "t", None).await;
    let seen_apply = Watcher::connect(&control.base, "t", None).await;

    // the stream, then Connect's crash: it sends again everything after its last flushed offset
    produce_keyed(&p, &topic, &changes(KEYS..first)).await;
    seen.until_state(
        &oracle(first),
        Duration::from_secs(60),
        "the client holds the stream",
    )
    .await;
    seen_apply
        .until_state(
            &oracle(first),
            Duration::from_secs(60),
            "the control's client holds the stream",
        )
        .await;
    let resent = first / 2..first;
    let half = resent.start + resent.len() / 2;
    produce_keyed(&p, &topic, &changes(resent.start..half)).await;
    eventually(
        "the node skips the first copies",
        Duration::from_secs(60),
        || async {
            let n = node.metric("livetable_source_resends_skipped_total").await;
            (n >= Some(1.0)).then_some(())
        },
    )
    .await;
    // livetable dies in the middle of the re-send: the marks come back with the store
    node.kill9();
    produce_keyed(&p, &topic, &changes(half..first)).await;
    node.start();
    node.wait_ready(Duration::from_secs(90)).await;
    let seen_after = Watcher::connect(&node.base, "t", None).await;
    // then the stream goes on
    produce_keyed(&p, &topic, &changes(first..end)).await;
    let want = oracle(end);
    seen_after
        .until_state(
            &want,
            Duration::from_secs(60),
            "the client after the restart holds the stream",
        )
        .await;
    until_api(&node.base, &want, "the API holds the stream").await;
    seen_apply
        .until_state(
            &want,
            Duration::from_secs(60),
            "the control's client holds the stream",
        )
        .await;

    let skipped = node
        .metric("livetable_source_resends_skipped_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(api_state(&control.base, "t").await, Some(want));
    {
        let after = seen_after.seen.lock().unwrap();
        assert!(
            after.older_than_ever.is_empty(),
            "went back: {:?}",
            after.older_than_ever
        );
        // what the first client showed before the kill, then the new one: never older
        let before = seen.seen.lock().unwrap();
        assert!(
            before.older_than_ever.is_empty(),
            "went back: {:?}",
            before.older_than_ever
        );
        let back: Vec<String> = before
            .max_ever
            .iter()
            .filter(|(k, n)| after.max_ever.get(*k).is_some_and(|m| m < n))
            .map(|(k, n)| format!("{k}: {n} -> {:?}", after.max_ever.get(k)))
            .collect();
        assert!(back.is_empty(), "older after the restart: {back:?}");
    }
    assert!(
        skipped >= 1.0,
        "the copies after the restart were skipped too: {skipped}"
    );
    {
        // the control applied the copies: its client saw keys go back, so the stream above does
        // test the check
        let control_seen = seen_apply.seen.lock().unwrap();
        assert!(
            control_seen.older_than_ever.len() >= 10,
            "with --source-resends apply the copies show older values: {:?}",
            control_seen.older_than_ever
        );
        eprintln!(
            "skip: {skipped} copies skipped after the restart; apply: {} older values shown, e.g. {:?}",
            control_seen.older_than_ever.len(),
            control_seen.older_than_ever.first()
        );
    }
    node.stop();
    control.stop();
    // each node owns every partition: its changelog follower must never have held one of them
    // (it did when it saw the table's registry entry during a restore: a second writer that
    // took keys back on CI)
    for n in [&node, &control] {
        assert!(
            !n.log_text().contains(SECOND_WRITER),
            "{SECOND_WRITER}: {}",
            n.log_text()
        );
    }
}
