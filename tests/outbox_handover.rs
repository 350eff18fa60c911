//! OUTBOX-1 (chaos seed 31415001): an all-in-one node killed -9 while changelog records of
//! changes it had applied and flushed were still unacknowledged (its outbox) restarts; the group
//! gives it only some of its partitions at first (a member that is gone, or another one, still
//! holds the others), so its follower takes the other slices up, outbox and all. When those
//! partitions come back, the node takes the slices over and starts their input at its stored
//! position, past the changes of the outbox. Their changelog records were never produced: the node
//! served the right values while its changelog (what gateways, restores and other nodes read)
//! kept older ones for good.
//!
//! The test holds the changelog's acknowledgements back (the node's producer lingers 3 s), kills
//! the node right after it applied the last changes, and plays the member that holds partitions
//! with a consumer of its own in the node's group.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{until_api_state, Node};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const KEYS: usize = 200;
const PARTITIONS: i32 = 4;

/// The last value of every key in the changelog (fences skipped; one writer at a time here).
fn changelog_state(changelog: &str) -> BTreeMap<String, i64> {
    let mut state = BTreeMap::new();
    for r in read_to_end(&brokers(), changelog, PARTITIONS, Duration::from_secs(60)) {
        let Some(key) = r.key else { continue };
        if r.headers.iter().any(|(k, _)| k == "livetable.fence") {
            continue;
        }
        match r.value {
            Some(v) => {
                let n = serde_json::from_str::<serde_json::Value>(&v).unwrap()["n"]
                    .as_i64()
                    .unwrap();
                state.insert(key, n);
            }
            None => {
                state.remove(&key);
            }
        }
    }
    state
}

fn differing(a: &BTreeMap<String, i64>, b: &BTreeMap<String, i64>) -> Vec<String> {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} -> {:?}", b.get(k)))
        .collect()
}

/// The keys whose value in the changelog still differs from `want` once they all agree or
/// `deadline` passed (empty: the changelog holds `want`).
async fn changelog_behind(
    changelog: &str,
    want: &BTreeMap<String, i64>,
    deadline: Duration,
) -> Vec<String> {
    let until = Instant::now() + deadline;
    loop {
        let behind = differing(want, &changelog_state(changelog));
        if behind.is_empty() || Instant::now() >= until {
            return behind;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A member of `group` that takes partitions of `topic` and does nothing with them, polled on a
/// thread of its own until dropped (it then leaves the group).
struct Holder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    assigned: Arc<std::sync::atomic::AtomicUsize>,
}

impl Holder {
    fn join(group: &str, topic: &str) -> Holder {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let thread = {
            let (stop, assigned) = (stop.clone(), assigned.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let _ = consumer.poll(Duration::from_millis(100));
                    if let Ok(a) = consumer.assignment() {
                        assigned.store(a.count(), Ordering::Relaxed);
                    }
                }
                consumer.unsubscribe();
                // a last poll serves the revoke, then the drop leaves the group
                let _ = consumer.poll(Duration::from_millis(500));
            })
        };
        Holder {
            stop,
            thread: Some(thread),
            assigned,
        }
    }

    fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    fn leave(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_followed_after_a_restart_keep_their_outbox_until_taken_back() {
    let u = unique("obx");
    let topic = format!("{u}.public.t");
    create_topic(&topic, PARTITIONS).await;
    let group = format!("g-{u}");
    let changelog = format!("{group}.table.t");
    let logs = tempdir();
    let dir = tempdir();
    let mut node = Node::spawn(
        "node",
        "all",
        &group,
        &topic,
        dir.path(),
        logs.path(),
        &[
            "--kafka-prop",
            "session.timeout.ms=6000",
            // the changelog's acknowledgements come 3 s after the changes are applied and
            // flushed: a kill -9 within them leaves an outbox in every partition
            "--kafka-prop",
            "linger.ms=3000",
        ],
    );
    let p = producer();
    let mut want = BTreeMap::new();
    produce_n_updates(&p, &topic, "t", (KEYS, 0), 0..KEYS, &mut want).await;
    node.wait_ready(Duration::from_secs(90)).await;
    until_api_state(
        &node.base,
        "t",
        &want,
        Duration::from_secs(60),
        "first rows",
    )
    .await;
    eventually(
        "the first rows in the changelog",
        Duration::from_secs(30),
        || async { (changelog_state(&changelog) == want).then_some(()) },
    )
    .await;

    // every key changes once more; the node applies the changes, and is killed before their
    // records leave its producer
    produce_n_updates(&p, &topic, "t", (KEYS, 0), KEYS..2 * KEYS, &mut want).await;
    until_api_state(
        &node.base,
        "t",
        &want,
        Duration::from_secs(2),
        "the last changes applied within 2 s",
    )
    .await;
    // sled makes what was applied durable by itself every 200 ms (`Store::open`), with nothing
    // a test can watch; the checkpointer's own flush of these batches may wait behind the
    // previous checkpoint's 3 s linger. Three of its periods, well inside the linger
    tokio::time::sleep(Duration::from_millis(600)).await;
    node.kill9();
    let missing = differing(&want, &changelog_state(&changelog));
    assert!(
        !missing.is_empty(),
        "the kill came after the changelog had every change: the test did not make an outbox"
    );
    eprintln!("{} keys in the outbox at the kill", missing.len());

    // a member that holds every partition (once the killed member's session ended)
    let holder = Holder::join(&group, &topic);
    eventually(
        "the holder has every partition",
        Duration::from_secs(60),
        || async { (holder.assigned() == PARTITIONS as usize).then_some(()) },
    )
    .await;
    // the node comes back and gets some of them; the follower takes up the others
    let before = node.log_text().len();
    node.start();
    let this_run = || {
        node.log_text()
            .get(before..)
            .unwrap_or_default()
            .to_string()
    };
    eventually(
        "the restarted node got some partitions and the holder kept the others",
        Duration::from_secs(60),
        || async {
            (this_run().contains("slice taken over")
                && holder.assigned() > 0
                && holder.assigned() < PARTITIONS as usize)
                .then_some(())
        },
    )
    .await;
    // then they come back to it
    holder.leave();
    node.wait_ready(Duration::from_secs(90)).await;
    until_api_state(
        &node.base,
        "t",
        &want,
        Duration::from_secs(60),
        "the node serves every change",
    )
    .await;
    // the path under test was taken: a partition's input started at the stored position, past
    // what the changelog had acknowledged
    let past_acked = this_run()
        .lines()
        .filter(|l| l.contains("input start chosen"))
        .filter(|l| {
            let field = |name: &str| {
                l.split(&format!("{name}=Some("))
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .and_then(|n| n.parse::<i64>().ok())
            };
            matches!((field("stored"), field("floor")), (Some(s), Some(f)) if s > f)
        })
        .count();
    assert!(
        past_acked > 0,
        "no partition started past its acknowledged changes: the test did not reach the case"
    );
    // what the node serves, its changelog must hold (linger: up to 3 s more)
    let last = changelog_behind(&changelog, &want, Duration::from_secs(30)).await;
    assert!(
        last.is_empty(),
        "{} keys are older in the changelog than what the node serves, e.g. {:?} (log {})",
        last.len(),
        &last[..last.len().min(5)],
        node.log.display()
    );
    node.stop();
}
