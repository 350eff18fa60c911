//! The fault-injection suite (`chaos`) at CI size: both topologies (all-in-one; 2 materialisers +
//! a gateway), 20 kill -9 of livetable, and once each: SIGSTOP of the broker for 10 s, the proxy
//! cutting, blackholing and delaying the broker's traffic, the data filesystem full, kill -9 of
//! Kafka Connect (when Java and PostgreSQL are here), the changelog topic deleted. The broker
//! restart is skipped: the local broker keeps its topics in memory (see RELIABILITY.md).
//!
//! The seed comes from `CHAOS_SEED` (to replay a failure) or the clock; it is printed, and the
//! reports (JSON, markdown, every process's log) stay in `target/chaos/ci-<seed>-<unix time>/`.
//! Ports: `LIVETABLE_CHAOS_PORT_BASE` (default 19595) to +2.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("load/ is inside the repository")
        .to_path_buf()
}

/// The livetable binary of this profile, built first (a no-op when fresh) so that the suite never
/// runs a binary older than the source. `LIVETABLE_BIN` names one built just before instead:
/// `./dev/test` passes the one its `cargo test --workspace` built, because `cargo build -p
/// livetable` resolves the dependencies' features for livetable alone and, on a fresh target
/// directory, builds them all again (1-1.7 min in CI).
fn livetable_bin() -> PathBuf {
    if let Some(given) = std::env::var_os("LIVETABLE_BIN") {
        let bin = PathBuf::from(given);
        assert!(bin.is_file(), "LIVETABLE_BIN: no file at {}", bin.display());
        return bin;
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_chaos")).with_file_name("livetable");
    let release = bin.components().any(|c| c.as_os_str() == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "livetable", "--bin", "livetable"]);
    if release {
        build.arg("--release");
    }
    let st = build.current_dir(repo()).status().unwrap();
    assert!(st.success(), "cargo build --bin livetable failed");
    assert!(bin.is_file(), "no livetable binary at {}", bin.display());
    bin
}

#[test]
#[ignore = "run by ./dev/test after the other tests (~8 min; RELIABILITY.md), not by a plain cargo test"]
fn faults_at_random_moments_lose_nothing_and_never_go_back() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_000
        });
    let port_base = std::env::var("LIVETABLE_CHAOS_PORT_BASE").unwrap_or_else(|_| "19595".into());
    // a run of a seed run before does not overwrite that run's logs
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = repo().join(format!("target/chaos/ci-{seed}-{stamp}"));
    eprintln!(
        "chaos: seed {seed} (replay with CHAOS_SEED={seed}); reports and logs in {}",
        out.display()
    );
    let started = std::time::Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--seed", &seed.to_string()])
        .args([
            "--kills",
            "20",
            "--quick-kill-pct",
            "70",
            "--rate",
            "300",
            "--keys",
            "1000",
        ])
        .args([
            "--gap-ms",
            "300-1500",
            "--recovery-secs",
            "45",
            "--settle-secs",
            "45",
        ])
        .args(["--port-base", &port_base])
        .arg("--livetable")
        .arg(livetable_bin())
        .arg("--out-dir")
        .arg(&out)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let report: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "chaos printed no JSON report ({e}), exit {}:\n{stderr}",
            run.status
        )
    });
    let md = std::fs::read_to_string(out.join("report.md")).unwrap_or_default();
    eprintln!("{md}\nchaos ran {elapsed:?}");
    let t = &report["totals"];
    let by_kind = &report["faults_by_kind"];
    let kills = by_kind["kill9"]["count"].as_u64().unwrap_or(0)
        + by_kind["kill9-quick"]["count"].as_u64().unwrap_or(0);
    assert!(kills >= 20, "at least 20 kill -9 ran: {kills}");
    for kind in [
        "broker-sigstop10s",
        "proxy-cut",
        "proxy-blackhole8s",
        "proxy-delay2s",
        "changelog-deleted",
    ] {
        assert!(
            by_kind[kind]["count"].as_u64().unwrap_or(0) >= 1,
            "fault {kind} ran: {by_kind}"
        );
    }
    assert!(t["clients_checked"].as_u64().unwrap_or(0) >= 12, "{t}");
    assert!(t["changes"].as_u64().unwrap_or(0) >= 10_000, "{t}");
    let failures: Vec<String> = report["failures"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    // Known failures (bugs in src/, reported in RELIABILITY.md), expected here until fixed.
    // BUG-1: the changelog topic deleted while livetable runs. Since 2026-12-03 it is created
    // again and written again (src/table/repair.rs), and the gateway recovers; in 3 of 6 runs
    // the folded changelog still lacked one or two partitions' rewrite on the local broker
    // (RELIABILITY.md), so its checks stay tolerated until that is explained. Checked
    // after the main checks, tagged apart.
    let bug1 = |f: &str| {
        f.contains("after the changelog was deleted") || f.contains("] ChangelogDeleted on ")
    };
    // VIEWS-GROUP-1: a view's topic left unwritten because no serving node was given the views
    // since it last started (the local broker held the group `<group>.views` after a kill -9;
    // RELIABILITY.md). Only when no node logged an assignment: a topic that differs although
    // a node was given it fails the run.
    let views_group1 = |f: &str| f.contains("VIEWS-GROUP-1: no serving node was assigned");
    // BUG-2 (a restarted node serving an older state than it had sent) is fixed (RELIABILITY.md):
    // values going back after a kill -9 fail the run like any other check
    let known = |f: &str| bug1(f) || views_group1(f);
    let unexpected: Vec<&String> = failures.iter().filter(|f| !known(f)).collect();
    assert!(
        unexpected.is_empty(),
        "seed {seed}: {} failed checks (replay: CHAOS_SEED={seed} cargo test -p livetable-load --test chaos):\n{}\n\nlogs: {}",
        unexpected.len(),
        unexpected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
        out.join("logs").display()
    );
    // a livetable process that exits by itself fails the test, except BUG-3 (RELIABILITY.md):
    // the gateway dies of SIGSEGV when the changelog topic it follows is deleted; and a node whose
    // store failed on the full disk exits with that error by design (DISK-1), which it may notice
    // only once the fault ended (its next store write), and the suite restarts it as a supervisor
    let crashes: Vec<&str> = report["crashes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let unexpected_crashes: Vec<&&str> = crashes
        .iter()
        .filter(|c| !(c.contains("SIGSEGV") && c.contains("after ChangelogDeleted")))
        .filter(|c| {
            !(c.contains("DiskFull")
                && c.contains("exit status: 1")
                && c.contains("No space left on device"))
        })
        .collect();
    assert!(unexpected_crashes.is_empty(), "{unexpected_crashes:?}");
    assert_eq!(t["lost"].as_u64(), Some(0), "{t}");
    // VIEWS-GROUP-1 is tolerated in a phase, not in all of them: the views' topics are checked
    let phases = report["phases"].as_array().cloned().unwrap_or_default();
    let unwritten = phases
        .iter()
        .filter(|p| {
            p["tables"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["view_topic_unwritten"].as_u64().unwrap_or(0) > 0)
        })
        .count();
    assert!(
        unwritten < phases.len(),
        "seed {seed}: no phase's view topics were written (VIEWS-GROUP-1 in each): {t}"
    );
    assert_eq!(t["reordered_visible"].as_u64(), Some(0), "{t}");
}
