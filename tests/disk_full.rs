//! Issue 12, the data directory's filesystem full. sled fails every write after an I/O error until
//! the store is opened again, so a node whose store failed used to stay up, healthy, retrying a
//! slice takeover (or a flush) that could never succeed again, its table frozen, even after the
//! space was freed (chaos seed 723870756). Now it stops with the store's error, as a supervisor
//! expects; started again once there is space, it loses nothing.
//!
//! The filesystem is a tmpfs the test mounts, so these tests need root; without it they say so
//! and check nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::{until_api_state, Node};
use common::*;

/// Bytes of padding per row: rows of ~1 KB fill the small filesystem quickly.
const PAD: usize = 1_000;

/// A tmpfs of a few MiB that the test can fill up; unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` when this process may not mount (not root).
    fn mount(mib: u64) -> Option<SmallFs> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return None;
        }
        let dir = tempdir();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs as root failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ballast(&self) -> PathBuf {
        self.path().join("ballast")
    }

    /// Writes the ballast until the filesystem is full but for about `room` bytes; returns its
    /// size.
    fn fill(&self, room: u64) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.ballast()).unwrap();
        let block = vec![0u8; 1 << 20];
        let mut written = 0u64;
        // a tmpfs of `mib` MiB takes at most that many blocks
        for _ in 0..4096 {
            match f.write(&block) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        // the last partial block: byte by byte is too slow, halve instead
        let mut chunk = block.len() / 2;
        while chunk > 0 {
            if f.write_all(&block[..chunk]).is_ok() {
                written += chunk as u64;
            } else {
                chunk /= 2;
            }
        }
        if room > 0 {
            written = written.saturating_sub(room);
            f.set_len(written).unwrap();
        }
        written
    }

    fn free(&self) {
        std::fs::remove_file(self.ballast()).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// The first `keys` rows, produced before `node` is ready and then served by it; returns them.
async fn first_rows(
    node: &Node,
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    keys: usize,
) -> BTreeMap<String, i64> {
    let mut want = BTreeMap::new();
    produce_n_updates(p, topic, "t", (keys, PAD), 0..keys, &mut want).await;
    node.wait_ready(Duration::from_secs(90)).await;
    until_api_state(
        &node.base,
        "t",
        &want,
        Duration::from_secs(60),
        "the first rows",
    )
    .await;
    want
}

/// `node` exited with an error that names the full disk.
fn assert_store_error_exit(node: &Node, status: std::process::ExitStatus) {
    assert!(
        !status.success(),
        "a failed store is an error exit: {status}"
    );
    let log = node.log_text();
    assert!(
        log.contains("No space left on device"),
        "the exit names the cause:\n{}",
        tail(&log, 30)
    );
}

/// The disk fills while the node runs (`kill9 == false`), or while it is down after a kill -9 and
/// must take its partitions over again on a full disk (`kill9 == true`, the chaos run's case).
async fn disk_full(kill9: bool) {
    let Some(fs) = SmallFs::mount(64) else {
        eprintln!("SKIPPED: mounting a tmpfs needs root; the disk-full test checked nothing");
        return;
    };
    let u = unique(if kill9 { "dfk" } else { "dfr" });
    let topic = format!("{u}.public.t");
    create_topic(&topic, 4).await;
    let keys = 2_000usize;
    let logs = tempdir();
    let data = fs.path().join("data");
    let mut node = Node::spawn(
        "node",
        "all",
        &format!("g-{u}"),
        &topic,
        &data,
        logs.path(),
        &[
            "--kafka-prop",
            "session.timeout.ms=6000",
            "--changelog-tombstone-retention-secs",
            "16",
        ],
    );
    let p = producer();
    let mut want = first_rows(&node, &p, &topic, keys).await;

    if kill9 {
        // the disk fills once the restarted node has opened its store, before the group gives
        // it its partitions again (it waits for the killed member's session to end); meanwhile
        // the node marks its store as in use (every 2 s with this retention), and that write
        // fails
        node.kill9();
        node.start();
        eventually(
            "the restarted node has loaded its store",
            Duration::from_secs(60),
            || async { (node.log_text().matches("store loaded").count() >= 2).then_some(()) },
        )
        .await;
    }
    let filled = fs.fill(0);
    eprintln!("ballast: {} MiB", filled >> 20);
    // 40 MB of changes: far more than fits, whatever sled can reuse
    let mut next = keys;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the node is still running 90 s after its disk filled up (its store cannot write any \
             more): it must stop with the error. Log {}:\n{}",
            node.log.display(),
            tail(&node.log_text(), 30)
        );
        if next < keys + 40_000 {
            produce_n_updates(&p, &topic, "t", (keys, PAD), next..next + 2_000, &mut want).await;
            next += 2_000;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    eprintln!(
        "stopped after {:.1} s ({status}); {} changes produced",
        started.elapsed().as_secs_f64(),
        next - keys
    );
    assert_store_error_exit(&node, status);
    // the producer goes on while the node is down; then there is space again
    produce_n_updates(&p, &topic, "t", (keys, PAD), next..next + 2_000, &mut want).await;
    fs.free();
    node.start();
    node.wait_ready(Duration::from_secs(120)).await;
    until_api_state(
        &node.base,
        "t",
        &want,
        Duration::from_secs(120),
        "after the restart with space again, every key at its last value",
    )
    .await;
    let status = node.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "a clean stop after the recovery: {status:?}"
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_while_running_stops_the_node_and_loses_nothing() {
    disk_full(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_at_restart_after_kill9_stops_the_node_and_loses_nothing() {
    disk_full(true).await;
}

/// A second node joins with a data directory that is full but for 2 MiB: it opens its store, and
/// its follower (which reads the slices the first node owns) fills the rest before the group
/// gives it partitions. Its takeovers then failed and were retried forever: the partitions it was
/// given stood still while both nodes said they were healthy. Now it stops, the first node takes
/// every partition back, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_with_a_full_disk_stops_and_the_other_serves_everything() {
    let Some(fs) = SmallFs::mount(64) else {
        eprintln!("SKIPPED: mounting a tmpfs needs root; the disk-full test checked nothing");
        return;
    };
    let u = unique("dfj");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 4).await;
    let keys = 4_000usize;
    let logs = tempdir();
    let a_dir = tempdir();
    let flags = ["--kafka-prop", "session.timeout.ms=6000"];
    let group = format!("g-{u}");
    let a = Node::spawn(
        "a",
        "all",
        &group,
        &topic,
        a_dir.path(),
        logs.path(),
        &flags,
    );
    let p = producer();
    let mut want = first_rows(&a, &p, &topic, keys).await;
    let filled = fs.fill(2 << 20);
    eprintln!("ballast: {} MiB", filled >> 20);
    let mut b = Node::spawn(
        "b",
        "all",
        &group,
        &topic,
        &fs.path().join("data"),
        logs.path(),
        &flags,
    );
    let started = Instant::now();
    let mut next = keys;
    let status = loop {
        if let Some(status) = b.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "b is still running 90 s after it joined with a full disk. Log {}:\n{}",
            b.log.display(),
            tail(&b.log_text(), 30)
        );
        produce_n_updates(&p, &topic, "t", (keys, PAD), next..next + 200, &mut want).await;
        next += 200;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "b stopped after {:.1} s ({status})",
        started.elapsed().as_secs_f64()
    );
    assert_store_error_exit(&b, status);
    until_api_state(
        &a.base,
        "t",
        &want,
        Duration::from_secs(90),
        "a serves every change",
    )
    .await;
    fs.free();
    b.start();
    b.wait_ready(Duration::from_secs(120)).await;
    produce_n_updates(&p, &topic, "t", (keys, PAD), next..next + 2_000, &mut want).await;
    for n in [&a, &b] {
        until_api_state(
            &n.base,
            "t",
            &want,
            Duration::from_secs(120),
            &format!("{} after b's return", n.name),
        )
        .await;
    }
}
