//! The changelog topic deleted while livetable runs, or while it is down (RELIABILITY.md, BUG-1):
//! the topic is created again, every owner writes its slices into it again, and a gateway whose
//! position is past the new topic's end reads it from the beginning. On the real broker, with
//! livetable processes, on a two-partition input.
//!
//! The gateway is stopped while the topic is deleted: a librdkafka consumer assigned to a topic
//! that Tansu deletes dies of SIGSEGV (BUG-3; `dev/probes/tansu_recreated_topic.py`). A gateway
//! restarted with its cache meets the same recreated topic a surviving one would.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::procs::{until_api_state, Node};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const TABLE: &str = "ticks";
const KEYS: usize = 20;

struct Setup {
    topic: String,
    group: String,
    changelog: String,
    logs: tempfile::TempDir,
}

impl Setup {
    fn node(&self, name: &str, role: &str, dir: &std::path::Path) -> Node {
        Node::spawn(
            name,
            role,
            &self.group,
            &self.topic,
            dir,
            self.logs.path(),
            &[],
        )
    }
}

fn setup(prefix: &str) -> Setup {
    let u = unique(prefix);
    let group = format!("g-{u}");
    Setup {
        topic: format!("{u}.public.{TABLE}"),
        changelog: format!("{group}.table.{TABLE}"),
        group,
        logs: tempdir(),
    }
}

/// Produces `n` for every key in `keys`; returns what the table then holds.
async fn write(
    s: &Setup,
    keys: std::ops::Range<usize>,
    n: usize,
    want: &mut BTreeMap<String, i64>,
) {
    let records: Vec<FixtureRecord> = keys
        .clone()
        .map(|k| n_update(TABLE, &format!("k{k}"), n, 0))
        .collect();
    produce_keyed(&producer(), &s.topic, &records).await;
    for k in keys {
        want.insert(format!("k{k}"), n as i64);
    }
}

async fn api_equals(node: &Node, want: &BTreeMap<String, i64>, what: &str) {
    let what = format!("{what} (log {})", node.log.display());
    until_api_state(&node.base, TABLE, want, Duration::from_secs(90), &what).await;
}

/// The partition count of `topic`, when it exists.
fn partitions(topic: &str) -> Option<usize> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .ok()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len())
}

/// The changelog folded as a restore from scratch would: per key, the value of its record of the
/// highest input offset (fences skipped).
fn folded(changelog: &str) -> BTreeMap<String, i64> {
    let records = read_partitions(changelog, &[0, 1], usize::MAX, Duration::from_secs(4));
    let mut best: BTreeMap<String, (i64, Option<i64>)> = BTreeMap::new();
    for (key, value, headers) in records {
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if header("livetable.fence").is_some() {
            continue;
        }
        let (Some(key), Some(off)) = (key, header("livetable.offset")) else {
            continue;
        };
        let off: i64 = off.parse().unwrap();
        let n = value
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
            .and_then(|v| v["n"].as_i64());
        if best.get(&key).is_none_or(|(o, _)| off >= *o) {
            best.insert(key, (off, n));
        }
    }
    best.into_iter()
        .filter_map(|(k, (_, n))| n.map(|n| (k, n)))
        .collect()
}

async fn changelog_refilled(s: &Setup, want: &BTreeMap<String, i64>, what: &str) {
    let changelog = s.changelog.clone();
    eventually(
        &format!("{what}: {changelog} exists again with 2 partitions"),
        Duration::from_secs(90),
        || {
            let c = changelog.clone();
            async move {
                tokio::task::spawn_blocking(move || (partitions(&c) == Some(2)).then_some(()))
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    eventually(
        &format!("{what}: the changelog folds to every key's latest value"),
        Duration::from_secs(90),
        || {
            let c = changelog.clone();
            let want = want.clone();
            async move {
                let got = tokio::task::spawn_blocking(move || folded(&c))
                    .await
                    .unwrap();
                (got == want).then_some(())
            }
        },
    )
    .await;
}

/// Deleted while the owner runs: its next records fail, it creates the topic again and writes
/// every row of its slices into it (also the keys that did not change since); a gateway restarted
/// with a position past the new end reads the new topic from its beginning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_deleted_under_a_running_owner_is_created_again_and_refilled() {
    let s = setup("cld1");
    create_topic(&s.topic, 2).await;
    let (owner_dir, gw_dir) = (tempdir(), tempdir());
    let owner = s.node("owner", "all", owner_dir.path());
    let mut gw = s.node("gw", "gateway", gw_dir.path());
    let mut want = BTreeMap::new();
    for round in 0..3 {
        write(&s, 0..KEYS, round, &mut want).await;
    }
    owner.wait_ready(Duration::from_secs(90)).await;
    gw.wait_ready(Duration::from_secs(90)).await;
    api_equals(&owner, &want, "owner before").await;
    api_equals(&gw, &want, "gateway before").await;
    gw.stop();

    delete_topic(&s.changelog).await;
    // half of the keys change: the other half is in the new topic only if the owner refills it
    write(&s, 0..KEYS / 2, 100, &mut want).await;
    api_equals(&owner, &want, "owner after the deletion").await;
    changelog_refilled(&s, &want, "running owner").await;
    let refilled = owner
        .metric("livetable_changelog_refilled_total")
        .await
        .unwrap_or(0.0);
    assert!(refilled >= (KEYS / 2) as f64, "refilled {refilled}");

    gw.start();
    gw.wait_ready(Duration::from_secs(90)).await;
    write(&s, KEYS / 2..KEYS, 200, &mut want).await;
    api_equals(&gw, &want, "gateway restarted past the new topic's end").await;
    let rewound = gw
        .metric("livetable_changelog_rewound_total")
        .await
        .unwrap_or(0.0);
    assert!(rewound >= 1.0, "rewound {rewound}");
}

/// Deleted while the owner is down: when it takes its partitions back, the fence lands below where
/// it had read; it reads the new topic from the beginning and writes every row into it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_down_while_its_changelog_was_deleted_writes_every_row_again() {
    let s = setup("cld2");
    create_topic(&s.topic, 2).await;
    let dir = tempdir();
    let mut owner = s.node("owner", "all", dir.path());
    let mut want = BTreeMap::new();
    for round in 0..3 {
        write(&s, 0..KEYS, round, &mut want).await;
    }
    owner.wait_ready(Duration::from_secs(90)).await;
    api_equals(&owner, &want, "owner before").await;
    owner.stop();

    delete_topic(&s.changelog).await;
    owner.start();
    owner.wait_ready(Duration::from_secs(90)).await;
    api_equals(&owner, &want, "owner after its restart").await;
    changelog_refilled(&s, &want, "restarted owner").await;
    let refilled = owner
        .metric("livetable_changelog_refilled_total")
        .await
        .unwrap_or(0.0);
    assert!(refilled >= KEYS as f64, "refilled {refilled}");
}

/// Writes every key in four rounds, each applied by `owner` before the next (each key has several
/// records in the old topic, one in a refill); returns the changelog's layout then.
async fn rounds_then_layout(
    s: &Setup,
    owner: &Node,
    want: &mut BTreeMap<String, i64>,
) -> [(i64, Option<i64>); 2] {
    for round in 0..4 {
        write(s, 0..KEYS, round, want).await;
        api_equals(owner, want, "owner before").await;
    }
    let cl = s.changelog.clone();
    tokio::task::spawn_blocking(move || layout(&cl))
        .await
        .unwrap()
}

/// Writes every key once more through `owner`, then deletes the changelog while `owner` is down:
/// restarted, it refills the new topic. (Deleted while the owner is down: Tansu takes records
/// produced to a deleted topic and serves their offsets twice once it is created again, a
/// broker's quirk, not these tests' case.)
async fn refilled_while_down(s: &Setup, owner: &mut Node, want: &mut BTreeMap<String, i64>) {
    write(s, 0..KEYS, 50, want).await;
    api_equals(owner, want, "owner before the deletion").await;
    owner.stop();
    delete_topic(&s.changelog).await;
    owner.start();
    owner.wait_ready(Duration::from_secs(90)).await;
    changelog_refilled(s, want, "owner restarted after the deletion").await;
}

/// Writes half of the keys, round by round through `owner`, until the new changelog topic's end
/// is past the old one's (`read`), and checks the layout the last two tests are about: each
/// partition's `restarted` fence below the old end, its end past it.
async fn write_past(
    s: &Setup,
    read: &[(i64, Option<i64>); 2],
    owner: &Node,
    want: &mut BTreeMap<String, i64>,
) {
    let read_layout = || {
        let cl = s.changelog.clone();
        async move {
            tokio::task::spawn_blocking(move || layout(&cl))
                .await
                .unwrap()
        }
    };
    let mut now = read_layout().await;
    for round in 101..141 {
        if now.iter().zip(read).all(|(n, r)| n.0 > r.0) {
            break;
        }
        write(s, 0..KEYS / 2, round, want).await;
        api_equals(owner, want, "owner writing the new topic").await;
        now = read_layout().await;
    }
    for (p, (n, r)) in now.iter().zip(read).enumerate() {
        let fence =
            n.1.unwrap_or_else(|| panic!("partition {p}: no restarted fence: {now:?}"));
        assert!(
            fence < r.0 - 1 && n.0 > r.0,
            "partition {p}: the layout this test is about (restarted fence below the old end {}, \
             the new end past it): {now:?}",
            r.0
        );
    }
}

/// Per partition of `changelog` (two): the offset after its last record, and the offset of its
/// last `restarted` fence. Read from the beginning to the end.
fn layout(changelog: &str) -> [(i64, Option<i64>); 2] {
    let mut out = [(0, None); 2];
    for r in read_to_end(&brokers(), changelog, 2, Duration::from_secs(20)) {
        let slot = &mut out[usize::try_from(r.partition).unwrap()];
        slot.0 = slot.0.max(r.offset + 1);
        if r.headers
            .iter()
            .any(|(k, v)| k == "livetable.fence" && v == "restarted")
        {
            slot.1 = Some(r.offset);
        }
    }
    out
}

/// A gateway down while the changelog was deleted, created again and refilled (by its owner,
/// restarted), and written past
/// the gateway's old position: the new topic's end does not fall below the position and its
/// `restarted` fence lies below it, so neither tells. The record the gateway read last is read
/// again at its restart: another one is there, and the partition is read from its beginning
/// (else the values the gateway missed, in the refill below its position, were never read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_position_the_new_changelog_passed_while_it_was_down_reads_it_again() {
    let s = setup("cld3");
    create_topic(&s.topic, 2).await;
    let (owner_dir, gw_dir) = (tempdir(), tempdir());
    let mut owner = s.node("owner", "all", owner_dir.path());
    let mut gw = s.node("gw", "gateway", gw_dir.path());
    owner.wait_ready(Duration::from_secs(90)).await;
    gw.wait_ready(Duration::from_secs(90)).await;
    let mut want = BTreeMap::new();
    let read = rounds_then_layout(&s, &owner, &mut want).await;
    api_equals(&gw, &want, "gateway before").await;
    gw.stop();

    // values the gateway misses: after the refill, only below its old position
    refilled_while_down(&s, &mut owner, &mut want).await;
    // the new topic is written past the gateway's old position (half of the keys only)
    write_past(&s, &read, &owner, &mut want).await;

    gw.start();
    gw.wait_ready(Duration::from_secs(90)).await;
    api_equals(&gw, &want, "gateway restarted below the new topic's end").await;
    let rewound = gw
        .metric("livetable_changelog_rewound_total")
        .await
        .unwrap_or(0.0);
    assert!(rewound >= 2.0, "rewound {rewound} (both partitions)");
    let log = gw.log_text();
    assert!(
        log.contains("is not the one there now"),
        "the gateway found the replaced record (log {})",
        gw.log.display()
    );
}

/// An owner down while the changelog was deleted, and another node meanwhile took its partitions,
/// refilled the new topic and wrote it past the first owner's position: when the first takes its
/// partitions back, its fence lands past its position and the `restarted` fence lies below it.
/// The record at its position - 1, one of its own tenure in the old topic, is another owner's in
/// the new one: it reads the partition from its beginning (else the other node's values in the
/// refill, below its position, were never read). Stopped cleanly, the node let its slices go to
/// its follower with a mark of its tenure; killed, it takes them over from its store.
async fn owner_passed_while_down(prefix: &str, kill: bool) {
    let s = setup(prefix);
    create_topic(&s.topic, 2).await;
    let (a_dir, b_dir) = (tempdir(), tempdir());
    let mut a = s.node("a", "all", a_dir.path());
    a.wait_ready(Duration::from_secs(90)).await;
    let mut want = BTreeMap::new();
    let read = rounds_then_layout(&s, &a, &mut want).await;
    if kill {
        a.kill9();
    } else {
        a.stop();
    }

    // another node takes the partitions; the values it writes are, after the refill, only below
    // the first owner's position
    let mut b = s.node("b", "all", b_dir.path());
    b.wait_ready(Duration::from_secs(90)).await;
    refilled_while_down(&s, &mut b, &mut want).await;
    write_past(&s, &read, &b, &mut want).await;
    b.stop();

    a.start();
    a.wait_ready(Duration::from_secs(90)).await;
    api_equals(&a, &want, "first owner taking its partitions back").await;
    let log = a.log_text();
    assert!(
        log.matches("is not the one there now").count() >= 2,
        "the first owner found the replaced record in both partitions (log {})",
        a.log.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_stopped_whose_position_the_new_changelog_passed_reads_it_again() {
    owner_passed_while_down("cld4", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_whose_position_the_new_changelog_passed_reads_it_again() {
    owner_passed_while_down("cld5", true).await;
}
