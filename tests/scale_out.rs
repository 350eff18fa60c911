//! Scale-out on the real broker with several livetable processes: materialisers in one consumer
//! group over a 4-partition topic, gateways serving from the changelog topics, clients attached the
//! whole time. Every client ends equal to an oracle computed from what was produced, and no client
//! ever sees a key's value go back.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::procs::{api_state, until_api_state, Node, Watcher};
use common::*;
use livetable::config::TopicSelection;
use serde_json::Value;

const TABLE: &str = "ticks";

/// Change `i` of a workload over `keys` keys: key `k{i % keys}` gets `n = i`.
fn change(i: usize, keys: usize) -> FixtureRecord {
    let key = format!("k{}", i % keys);
    FixtureRecord {
        key: Some(format!(r#"{{"id":"{key}"}}"#)),
        value: Some(format!(
            r#"{{"before":null,"after":{{"id":"{key}","n":{i},"price":"{}.{:02}"}},"op":"u","source":{{"table":"{TABLE}","ts_ms":{}}}}}"#,
            i % 97,
            i % 100,
            now_ms()
        )),
        headers: vec![],
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The final `{key: n}` after changes `0..count` over `keys` keys.
fn oracle(count: usize, keys: usize) -> BTreeMap<String, i64> {
    (count.saturating_sub(keys)..count)
        .map(|i| (format!("k{}", i % keys), i as i64))
        .collect()
}

async fn produce_range(
    topic: &str,
    from: usize,
    to: usize,
    keys: usize,
    chunk: usize,
    pause: Duration,
) {
    let p = producer();
    let mut i = from;
    while i < to {
        let end = (i + chunk).min(to);
        let records: Vec<FixtureRecord> = (i..end).map(|i| change(i, keys)).collect();
        produce_keyed(&p, topic, &records).await;
        i = end;
        tokio::time::sleep(pause).await;
    }
}

/// The changelog folded as a compacting broker would keep it: the last record per key, fences
/// left out.
fn fold_changelog(topic: &str, partitions: i32) -> BTreeMap<String, i64> {
    let parts: Vec<i32> = (0..partitions).collect();
    let mut m = BTreeMap::new();
    for (k, v, h) in read_partitions(topic, &parts, usize::MAX, Duration::from_secs(4)) {
        if h.iter().any(|(name, _)| name == "livetable.fence") {
            continue;
        }
        let Some(k) = k else { continue };
        match v.and_then(|v| serde_json::from_str::<Value>(&v).ok()) {
            Some(row) => {
                m.insert(k, row["n"].as_i64().unwrap_or(-1));
            }
            None => {
                m.remove(&k);
            }
        }
    }
    m
}

async fn changelog_equals(topic: &str, partitions: i32, want: &BTreeMap<String, i64>) {
    let topic = topic.to_string();
    eventually(
        &format!("changelog {topic} folds to the oracle"),
        Duration::from_secs(60),
        || {
            let topic = topic.clone();
            let want = want.clone();
            async move {
                let have = tokio::task::spawn_blocking(move || fold_changelog(&topic, partitions))
                    .await
                    .unwrap();
                (have == want).then_some(())
            }
        },
    )
    .await;
}

fn no_regressions(watchers: &[&Watcher]) {
    for (i, w) in watchers.iter().enumerate() {
        let s = w.seen.lock().unwrap();
        assert!(
            s.regressions.is_empty(),
            "client {i} saw values go back: {:?}",
            &s.regressions[..s.regressions.len().min(10)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_in_one_on_four_partitions_equals_the_oracle() {
    let u = unique("so1");
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 4).await;
    let (changes, keys) = (20_000, 500);
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let prefix = c.changelog_prefix.clone();
    let (svc, base) = start_service(c).await;
    produce_range(&topic, 0, changes / 2, keys, 2000, Duration::ZERO).await;
    let watcher = Watcher::connect_when_ready(&base, TABLE).await;
    produce_range(&topic, changes / 2, changes, keys, 2000, Duration::ZERO).await;
    let want = oracle(changes, keys);
    watcher
        .until_state(
            &want,
            Duration::from_secs(120),
            "the client equals the oracle",
        )
        .await;
    until_api_state(
        &base,
        TABLE,
        &want,
        Duration::from_secs(10),
        "the API equals the oracle",
    )
    .await;
    no_regressions(&[&watcher]);
    let (_, tables) = get_json(&format!("{base}/api/tables")).await;
    let t = &tables["tables"][0];
    assert_eq!(
        (t["partitions"].as_u64(), t["held"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(
        t["seq"].as_u64(),
        Some(changes as u64),
        "every change counted once"
    );
    // the changelog has the input's 4 partitions and folds to the same rows
    changelog_equals(&format!("{prefix}{TABLE}"), 4, &want).await;
    svc.shutdown();
    svc.wait().await.unwrap();
}

impl Watcher {
    async fn connect_when_ready(base: &str, table: &str) -> Watcher {
        eventually("the table exists", Duration::from_secs(60), || async {
            api_state(base, table)
                .await
                .filter(|s| !s.is_empty())
                .map(|_| ())
        })
        .await;
        Watcher::connect(base, table, None).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialisers_fail_over_and_rebalance_while_clients_watch_two_gateways() {
    let u = unique("so2");
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 4).await;
    let (changes, keys) = (100_000usize, 2_000usize);
    let group = format!("g-{u}");
    let logs = tempdir();
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempdir()).collect();
    let node = |name: &str, role: &str, d: usize| {
        Node::spawn(
            name,
            role,
            &group,
            &topic,
            dirs[d].path(),
            logs.path(),
            &["--max-batch", "2000"],
        )
    };
    let mut mat1 = node("mat1", "materialiser", 0);
    let mut mat2 = node("mat2", "materialiser", 1);
    let gw1 = node("gw1", "gateway", 2);
    let gw2 = node("gw2", "gateway", 3);
    // a first slice of the stream, so that the table exists when the clients connect
    produce_range(&topic, 0, 4_000, keys, 2_000, Duration::ZERO).await;
    for n in [&mat1, &mat2, &gw1, &gw2] {
        n.wait_ready(Duration::from_secs(90)).await;
    }
    let watchers = [
        Watcher::connect_when_ready(&gw1.base, TABLE).await,
        Watcher::connect_when_ready(&gw1.base, TABLE).await,
        Watcher::connect_when_ready(&gw2.base, TABLE).await,
        Watcher::connect_when_ready(&gw2.base, TABLE).await,
    ];
    let producing = {
        let topic = topic.clone();
        tokio::spawn(async move {
            produce_range(
                &topic,
                4_000,
                changes,
                keys,
                4_000,
                Duration::from_millis(300),
            )
            .await
        })
    };
    // kill -9 one materialiser mid-stream: the other takes its partitions over
    eventually(
        "a third of the stream is in",
        Duration::from_secs(120),
        || async {
            let s = api_state(&gw1.base, TABLE).await?;
            (s.values().copied().max().unwrap_or(0) as usize > changes / 3).then_some(())
        },
    )
    .await;
    mat1.kill9();
    let killed = Instant::now();
    // the dead member's keys move again on the clients: measured on the gateway's API
    let probe_base = gw2.base.clone();
    let before = api_state(&probe_base, TABLE).await.unwrap();
    eventually(
        "every key moves again after the failover",
        Duration::from_secs(60),
        || {
            let base = probe_base.clone();
            let before = before.clone();
            async move {
                let now = api_state(&base, TABLE).await?;
                now.iter()
                    .all(|(k, n)| before.get(k).is_some_and(|b| n > b))
                    .then_some(())
            }
        },
    )
    .await;
    let failover = killed.elapsed();
    // a third materialiser joins while the stream and the clients go on: partitions move again
    let mat3 = node("mat3", "materialiser", 4);
    producing.await.unwrap();
    let want = oracle(changes, keys);
    for (i, w) in watchers.iter().enumerate() {
        w.until_state(
            &want,
            Duration::from_secs(180),
            &format!("client {i} equals the oracle"),
        )
        .await;
    }
    no_regressions(&watchers.iter().collect::<Vec<_>>());
    for g in [&gw1, &gw2] {
        until_api_state(
            &g.base,
            TABLE,
            &want,
            Duration::from_secs(30),
            "the gateway's API equals the oracle",
        )
        .await;
    }
    mat3.wait_ready(Duration::from_secs(60)).await;
    assert!(
        mat3.metric("livetable_fences_written_total")
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "the third materialiser took partitions over:\n{}",
        mat3.log_text()
    );
    changelog_equals(&format!("{group}.table.{TABLE}"), 4, &want).await;
    let (_, t) = get_json(&format!("{}/api/tables/{TABLE}", gw1.base)).await;
    assert_eq!(
        t["seq"].as_u64(),
        Some(changes as u64),
        "every change counted once"
    );
    eprintln!(
        "failover: kill -9 of a materialiser -> every key moving again on a gateway: {failover:?}"
    );
    mat2.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_gateway_and_a_gateway_restarts_from_its_cache() {
    let u = unique("so3");
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 4).await;
    // as many keys as changes: the changelog gets a record per change (a batch produces the last
    // value of each key it touched)
    let keys = 10_000;
    let group = format!("g-{u}");
    let logs = tempdir();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempdir()).collect();
    let node = |name: &str, role: &str, d: usize| {
        Node::spawn(name, role, &group, &topic, dirs[d].path(), logs.path(), &[])
    };
    let mat = node("mat", "materialiser", 0);
    let mut gw1 = node("gw1", "gateway", 1);
    let gw2 = node("gw2", "gateway", 2);
    produce_range(&topic, 0, 10_000, keys, 2_000, Duration::ZERO).await;
    let want = oracle(10_000, keys);
    let client = Watcher::connect_when_ready(&gw1.base, TABLE).await;
    client
        .until_state(
            &want,
            Duration::from_secs(90),
            "the client on gateway 1 is current",
        )
        .await;
    let pos = client
        .seen
        .lock()
        .unwrap()
        .pos
        .clone()
        .expect("a resume token");
    client.abort();

    // 50 changes while the client is away, then it comes back through gateway 2
    produce_range(&topic, 10_000, 10_050, keys, 50, Duration::ZERO).await;
    let want = oracle(10_050, keys);
    until_api_state(
        &gw2.base,
        TABLE,
        &want,
        Duration::from_secs(30),
        "gateway 2 has the new changes",
    )
    .await;
    let started = Instant::now();
    let resumed = Watcher::connect(&gw2.base, TABLE, Some(&pos)).await;
    let mut base_state = client.seen.lock().unwrap().state.clone();
    eventually("the resume patch", Duration::from_secs(10), || async {
        (resumed.seen.lock().unwrap().patches > 0).then_some(())
    })
    .await;
    let first_patch = started.elapsed();
    {
        let s = resumed.seen.lock().unwrap();
        assert_eq!(
            s.snapshots, 0,
            "a resume on another gateway sends no snapshot"
        );
        // only the missed changes: the patch touched at most the 50 keys that changed
        let changed: Vec<&String> = s.state.keys().collect();
        assert!(
            changed.len() <= 50,
            "{} keys in the resume patch",
            changed.len()
        );
        for (k, row) in &s.state {
            base_state.insert(k.clone(), row.clone());
        }
    }
    let merged: BTreeMap<String, i64> = base_state
        .iter()
        .filter_map(|(k, v)| v["n"].as_i64().map(|n| (k.clone(), n)))
        .collect();
    assert_eq!(
        merged, want,
        "what the client held plus the resume patch == the oracle"
    );
    eprintln!("resume on another gateway: first missed change after {first_patch:?}");

    // gateway 1 is killed with -9, the stream goes on, it restarts from its cache plus the tail
    let read_before = gw1
        .metric("livetable_follower_records_total")
        .await
        .unwrap_or(0.0);
    assert!(
        read_before >= 9_000.0,
        "gateway 1 read the changelog: {read_before}"
    );
    gw1.kill9();
    produce_range(&topic, 10_050, 11_000, keys, 500, Duration::ZERO).await;
    gw1.start();
    gw1.wait_ready(Duration::from_secs(60)).await;
    let want = oracle(11_000, keys);
    until_api_state(
        &gw1.base,
        TABLE,
        &want,
        Duration::from_secs(30),
        "gateway 1 caught up after its restart",
    )
    .await;
    let read_after = gw1
        .metric("livetable_follower_records_total")
        .await
        .unwrap_or(f64::MAX);
    assert!(
        read_after < 5_000.0,
        "a restarted gateway reads its cache plus the tail, not everything again ({read_after} records):\n{}",
        gw1.log_text()
    );
    drop(mat);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_never_touch_each_others_topics() {
    let u = unique("so4");
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 2).await;
    produce_range(&topic, 0, 2_000, 100, 1_000, Duration::ZERO).await;
    let want = oracle(2_000, 100);
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let dir = tempdir();
        let mut c = test_config(
            TopicSelection::Names(vec![topic.clone()]),
            dir.path(),
            &format!("{u}{name}"),
        );
        // the names derive from the group id
        c.changelog_prefix = format!("{}.table.", c.group_id);
        c.dlq_topic = format!("{}.dlq", c.group_id);
        let (svc, base) = start_service(c.clone()).await;
        until_api_state(
            &base,
            TABLE,
            &want,
            Duration::from_secs(60),
            "each deployment holds every row",
        )
        .await;
        nodes.push((svc, c, dir));
    }
    // each registry names only its own deployment, each changelog only its own owner's fences
    for (_, c, _) in &nodes {
        let topic = format!("{}__registry", c.changelog_prefix);
        let registry = eventually("the registry is read", Duration::from_secs(60), || {
            let topic = topic.clone();
            async move {
                let r = tokio::task::spawn_blocking(move || {
                    read_topic(&topic, usize::MAX, Duration::from_secs(3))
                })
                .await
                .unwrap();
                (!r.is_empty()).then_some(r)
            }
        })
        .await;
        for (_, v, _) in &registry {
            let e: Value = serde_json::from_str(v.as_deref().unwrap()).unwrap();
            assert_eq!(e["deployment"], c.group_id.as_str());
        }
        changelog_equals(&format!("{}{TABLE}", c.changelog_prefix), 2, &want).await;
    }
    // a third deployment configured onto the first one's topics refuses to run
    let dir = tempdir();
    let mut c = test_config(
        TopicSelection::Names(vec![topic.clone()]),
        dir.path(),
        &format!("{u}c"),
    );
    c.changelog_prefix = nodes[0].1.changelog_prefix.clone();
    let (svc, _) = start_service(c).await;
    let err = tokio::time::timeout(Duration::from_secs(60), svc.wait())
        .await
        .expect("the clashing deployment stops")
        .expect_err("the clashing deployment fails");
    assert!(err.to_string().contains("belongs to deployment"), "{err}");
    for (svc, _, _) in nodes {
        svc.shutdown();
        svc.wait().await.unwrap();
    }
}

/// A materialiser used to keep nothing across a restart: its store never recorded its tables
/// (only a follower wrote their entries), and the slices of its last run were let go of at its
/// first assignment (told through a registry not read yet). Each restart, clean or kill -9, read
/// its changelog partitions from the beginning, as with an empty data directory. Now a restart
/// reads only their tail, and the node goes on exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_materialiser_reads_only_the_tail_of_its_changelog() {
    let u = unique("matrestart");
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 2).await;
    let (first, keys) = (20_000usize, 5_000usize);
    produce_range(&topic, 0, first, keys, 5_000, Duration::ZERO).await;
    let group = format!("g-{u}");
    let (dir, logs) = (tempdir(), tempdir());
    let mut mat = Node::spawn(
        "mat",
        "materialiser",
        &group,
        &topic,
        dir.path(),
        logs.path(),
        &[],
    );
    let rows = format!(r#"livetable_table_rows{{table="{TABLE}"}}"#);
    // ready with every key; returns the changelog records its restore read
    async fn ready(mat: &Node, rows: &str, keys: usize) -> f64 {
        mat.wait_ready(Duration::from_secs(90)).await;
        eventually("every key in memory", Duration::from_secs(30), || async {
            (mat.metric(rows).await == Some(keys as f64)).then_some(())
        })
        .await;
        mat.metric("livetable_restore_records_total")
            .await
            .unwrap_or(-1.0)
    }
    let changelog = format!("{group}.table.{TABLE}");
    let fresh = ready(&mat, &rows, keys).await;
    changelog_equals(&changelog, 2, &oracle(first, keys)).await;
    for how in ["SIGTERM", "kill -9"] {
        if how == "SIGTERM" {
            mat.stop();
        } else {
            mat.kill9();
        }
        let started = Instant::now();
        mat.start();
        let read = ready(&mat, &rows, keys).await;
        eprintln!(
            "materialiser restarted after {how}: ready with every key after {:?}, {read} \
             changelog records read (first start: {fresh}); {keys} keys in its changelog",
            started.elapsed()
        );
        assert!(
            read < (keys / 10) as f64,
            "after {how}, the materialiser read {read} changelog records for its {keys} keys: \
             it restored from the beginning\n{}",
            mat.log_text()
        );
    }
    // it goes on from there: updates and the changelog stay exact
    produce_range(&topic, first, first + 4_000, keys, 2_000, Duration::ZERO).await;
    changelog_equals(&changelog, 2, &oracle(first + 4_000, keys)).await;
    assert_eq!(mat.metric(&rows).await, Some(keys as f64));
    mat.stop();
}

/// A node whose data directory was last in use half the changelog's tombstone retention ago or
/// longer may have missed deletes whose tombstones the broker has dropped since (a compacting
/// broker: the local one does not compact, so what is tested here is the decision): it forgets
/// what its store holds and reads every slice anew, owned (an all-in-one node) or followed (a
/// gateway). A node back sooner reads only the changelog's tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_longer_than_half_the_tombstone_retention_reads_its_tables_anew() {
    let u = unique("away");
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 2).await;
    let (first, keys) = (4_000usize, 1_000usize);
    produce_range(&topic, 0, first, keys, 2_000, Duration::ZERO).await;
    let group = format!("g-{u}");
    let logs = tempdir();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempdir()).collect();
    // half of it, 8 s, is the line; the store is marked every 2 s
    let retention = ["--changelog-tombstone-retention-secs", "16"];
    let mut node = Node::spawn(
        "all",
        "all",
        &group,
        &topic,
        dirs[0].path(),
        logs.path(),
        &retention,
    );
    let mut gw = Node::spawn(
        "gw",
        "gateway",
        &group,
        &topic,
        dirs[1].path(),
        logs.path(),
        &retention,
    );
    const ANEW: &str = "its tables are read anew";
    // ready with every key as the oracle says; returns the changelog records it read on start (an
    // all-in-one node's follower takes up the slices it does not hold until they are assigned)
    async fn current(n: &Node, want: &BTreeMap<String, i64>) -> f64 {
        n.wait_ready(Duration::from_secs(90)).await;
        let what = format!("{} serves the oracle (log {})", n.name, n.log.display());
        until_api_state(&n.base, TABLE, want, Duration::from_secs(60), &what).await;
        let mut read = 0.0;
        for counter in [
            "livetable_restore_records_total",
            "livetable_follower_records_total",
        ] {
            read += n.metric(counter).await.unwrap_or(0.0);
        }
        read
    }
    let want = oracle(first, keys);
    current(&node, &want).await;
    current(&gw, &want).await;

    // back at once: the tail only
    node.stop();
    gw.stop();
    node.start();
    gw.start();
    let (n_read, g_read) = (current(&node, &want).await, current(&gw, &want).await);
    eprintln!(
        "back at once: the all-in-one node read {n_read} changelog records, the gateway {g_read}"
    );
    assert!(
        n_read < (keys / 10) as f64 && g_read < (keys / 10) as f64,
        "back at once, {n_read} / {g_read} changelog records read for {keys} keys: read anew\n{}",
        node.log_text()
    );
    assert!(!node.log_text().contains(ANEW) && !gw.log_text().contains(ANEW));

    // away past half the retention (after a kill -9, the last periodic mark counts)
    node.kill9();
    gw.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let started = Instant::now();
    node.start();
    gw.start();
    let (n_read, g_read) = (current(&node, &want).await, current(&gw, &want).await);
    eprintln!(
        "back after 10 s away: the all-in-one node read {n_read} changelog records, the \
         gateway {g_read}; both current after {:?}",
        started.elapsed()
    );
    assert!(
        n_read >= keys as f64 && g_read >= keys as f64,
        "away past half the retention, {n_read} / {g_read} changelog records read for {keys} \
         keys: the stores were trusted\n{}",
        node.log_text()
    );
    for n in [&node, &gw] {
        assert_eq!(n.log_text().matches(ANEW).count(), 1, "{}", n.log_text());
    }
    // and they go on from there
    produce_range(&topic, first, first + 2_000, keys, 1_000, Duration::ZERO).await;
    let want = oracle(first + 2_000, keys);
    for n in [&gw, &node] {
        until_api_state(
            &n.base,
            TABLE,
            &want,
            Duration::from_secs(60),
            "updates go on",
        )
        .await;
    }
    changelog_equals(&format!("{group}.table.{TABLE}"), 2, &want).await;
    node.stop();
    gw.stop();
}
