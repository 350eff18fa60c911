//! Taking a partition over after another owner, on the real broker with livetable processes: what
//! the new owner starts from must never skip a change that no valid changelog record holds.
//!
//! The test plays the other owners itself (a former owner's late writes, a newer owner's fence,
//! their commits), so that each interleaving the chaos suite met by chance (RELIABILITY.md,
//! SPLIT-1) happens every time.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::procs::{until_api_state, Node};
use common::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TABLE: &str = "ticks";
const KEYS: usize = 10;

/// Change `i`: key `k{i % KEYS}` gets `n = i`.
fn change(i: usize) -> FixtureRecord {
    n_update(TABLE, &format!("k{}", i % KEYS), i, 0)
}

/// A changelog record as an owner writes it: the row of change `i` at input offset `i`.
fn changelog_row(i: usize, owner: &str, acked: i64) -> FixtureRecord {
    let key = format!("k{}", i % KEYS);
    FixtureRecord {
        key: Some(key.clone()),
        value: Some(format!(r#"{{"id":"{key}","n":{i}}}"#)),
        headers: vec![
            ("livetable.table".into(), TABLE.into()),
            ("livetable.owner".into(), owner.into()),
            ("livetable.offset".into(), i.to_string()),
            ("livetable.seq".into(), (i + 1).to_string()),
            ("livetable.acked".into(), acked.to_string()),
            ("livetable.ts_ms".into(), "1".into()),
        ],
    }
}

/// A fence record of `owner`.
fn fence(owner: &str) -> FixtureRecord {
    FixtureRecord {
        key: Some("\u{0}livetable.fence".into()),
        value: Some(format!(r#"{{"owner":"{owner}","member":"test"}}"#)),
        headers: vec![
            ("livetable.table".into(), TABLE.into()),
            ("livetable.owner".into(), owner.into()),
            ("livetable.fence".into(), "1".into()),
        ],
    }
}

/// The owner of the last fence in changelog partition 0, and an owner greater than it.
fn owners(changelog: &str) -> (String, String) {
    let records = read_partitions(changelog, &[0], usize::MAX, Duration::from_secs(4));
    let owner = records
        .iter()
        .rev()
        .find(|(_, _, h)| h.iter().any(|(k, _)| k == "livetable.fence"))
        .and_then(|(_, _, h)| h.iter().find(|(k, _)| k == "livetable.owner"))
        .map(|(_, v)| v.clone())
        .expect("the node fenced the partition when it took it");
    let (epoch, _) = owner.split_once('.').expect("owner is epoch.generation");
    let newer = format!("{}.1", epoch.parse::<u32>().unwrap() + 1);
    (owner, newer)
}

/// A client of `group` that never joins it (commits and reads its offsets only).
fn group_client(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Commits `offset` for partition 0 of `topic` in `group`, as a former owner that has not noticed
/// its revoke can (a broker that does not fence commits by generation accepts it). The test
/// commits as no member, which the broker accepts once the group has no member left (a killed
/// member's session ends within `session.timeout.ms`).
fn commit(group: &str, topic: &str, offset: i64) {
    let consumer = group_client(group);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        assert!(
            std::time::Instant::now() < until,
            "the broker refused the commit for 30 s: {e}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        committed.elements()[0].offset(),
        Offset::Offset(offset),
        "the broker kept the commit"
    );
}

fn want(changes: &[usize]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for &i in changes {
        m.insert(format!("k{}", i % KEYS), i as i64);
    }
    m
}

async fn api_equals(node: &Node, want: &BTreeMap<String, i64>, what: &str) {
    let what = format!("{what} (log {})", node.log.display());
    until_api_state(&node.base, TABLE, want, Duration::from_secs(90), &what).await;
}

/// Waits until the group committed `offset` for partition 0 of `topic`.
async fn committed(group: &str, topic: &str, offset: i64) {
    eventually(
        &format!("{group} committed {offset}"),
        Duration::from_secs(30),
        || {
            let (group, topic) = (group.to_string(), topic.to_string());
            async move {
                tokio::task::spawn_blocking(move || {
                    let c = group_client(&group);
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, 0);
                    let got = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
                    (got.elements()[0].offset() == Offset::Offset(offset)).then_some(())
                })
                .await
                .unwrap()
            }
        },
    )
    .await;
}

impl Setup {
    /// Another all-in-one node of the deployment, logging beside the first.
    fn node(&self, name: &str, dir: &std::path::Path) -> Node {
        Node::spawn(
            name,
            "all",
            &self.group,
            &self.topic,
            dir,
            self.logs.path(),
            &[],
        )
    }
}

/// A node of a new deployment on a one-partition topic, after it applied changes `0..KEYS`.
struct Setup {
    topic: String,
    group: String,
    changelog: String,
    logs: tempfile::TempDir,
}

async fn setup(prefix: &str) -> (Setup, Node, tempfile::TempDir) {
    let u = unique(prefix);
    let topic = format!("{u}.public.{TABLE}");
    create_topic(&topic, 1).await;
    let group = format!("g-{u}");
    let changelog = format!("{group}.table.{TABLE}");
    let logs = tempdir();
    let dir = tempdir();
    let node = Node::spawn("first", "all", &group, &topic, dir.path(), logs.path(), &[]);
    let p = producer();
    produce(&p, &topic, &(0..KEYS).map(change).collect::<Vec<_>>()).await;
    node.wait_ready(Duration::from_secs(90)).await;
    api_equals(&node, &want(&(0..KEYS).collect::<Vec<_>>()), "first node").await;
    // its records acknowledged and its store flushed: it committed the whole input
    committed(&group, &topic, KEYS as i64).await;
    let s = Setup {
        topic,
        group,
        changelog,
        logs,
    };
    (s, node, dir)
}

/// A former owner missed its revoke: a newer owner fenced the partition, the former owner's record
/// of change 10 landed after that fence (every reader ignores it) and the former owner committed
/// past change 10 anyway. A node that takes the partition over must apply change 10 from the
/// input: starting at the committed offset lost it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_past_fenced_writes_does_not_skip_their_changes() {
    let (s, mut first, _first_dir) = setup("to1").await;
    first.stop();
    let (former, newer) = owners(&s.changelog);
    let p = producer();
    produce(&p, &s.topic, &[change(KEYS)]).await;
    produce(&p, &s.changelog, &[fence(&newer)]).await;
    produce(
        &p,
        &s.changelog,
        &[changelog_row(KEYS, &former, KEYS as i64)],
    )
    .await;
    commit(&s.group, &s.topic, KEYS as i64 + 1);

    let dir = tempdir();
    let next = s.node("next", dir.path());
    next.wait_ready(Duration::from_secs(90)).await;
    let mut changes: Vec<usize> = (0..KEYS).collect();
    changes.push(KEYS);
    api_equals(&next, &want(&changes), "the new owner holds change 10").await;
}

/// A node killed -9 after the broker acknowledged its record of change 10 but before its store
/// flushed it; another node then took the partition over (folding that record), applied change 11
/// and committed past both. When the first node takes the partition back, its store ends at change
/// 9 and the input starts after change 11: its own record of change 10 must be folded, not skipped
/// as "already in the store".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_a_partition_back_folds_its_own_records_its_store_lost() {
    let (s, mut first, _first_dir) = setup("to2").await;
    first.kill9();
    let (mine, _) = owners(&s.changelog);
    let p = producer();
    produce(&p, &s.topic, &[change(KEYS)]).await;
    produce(&p, &s.changelog, &[changelog_row(KEYS, &mine, KEYS as i64)]).await;
    let other_dir = tempdir();
    let mut other = s.node("other", other_dir.path());
    other.wait_ready(Duration::from_secs(90)).await;
    produce(&p, &s.topic, &[change(KEYS + 1)]).await;
    let mut changes: Vec<usize> = (0..KEYS).collect();
    changes.extend([KEYS, KEYS + 1]);
    api_equals(&other, &want(&changes), "the other node").await;
    committed(&s.group, &s.topic, KEYS as i64 + 2).await;
    other.stop();

    first.start();
    first.wait_ready(Duration::from_secs(90)).await;
    api_equals(
        &first,
        &want(&changes),
        "the first node holds its own change 10 and the other node's 11",
    )
    .await;
}
