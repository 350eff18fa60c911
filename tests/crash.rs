//! kill -9 while livetable applies a stream of 100k changes: after a restart the state equals the
//! expected one exactly: no change lost, none applied twice (seq counts every change once).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const CHANGES: usize = 100_000;
const KEYS: usize = 1_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(topic: &str, dir: &std::path::Path, port: u16, u: &str, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_livetable"))
        .args([
            "--brokers",
            &brokers(),
            "--topics",
            topic,
            "--group-id",
            &format!("g-{u}"),
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            dir.to_str().unwrap(),
        ])
        .args([
            "--changelog-prefix",
            &format!("lt.{u}.table."),
            "--dlq-topic",
            &format!("lt.{u}.dlq"),
        ])
        .args([
            "--kafka-prop",
            "session.timeout.ms=6000",
            "--max-batch",
            "2000",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn record(i: usize) -> FixtureRecord {
    let key = format!("k{}", i % KEYS);
    FixtureRecord {
        key: Some(format!(r#"{{"id":"{key}"}}"#)),
        value: Some(format!(
            r#"{{"id":"{key}","n":{i},"price":"{}.{:02}","__op":"u","__table":"ticks","__source_ts_ms":{i}}}"#,
            i % 97,
            i % 100
        )),
        headers: vec![],
    }
}

async fn seq(base: &str) -> Option<u64> {
    let resp = reqwest::get(format!("{base}/api/tables/ticks"))
        .await
        .ok()?;
    let v: Value = resp.json().await.ok()?;
    v["seq"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_applying_loses_and_duplicates_nothing() {
    let u = unique("crash");
    let topic = format!("{u}.ticks");
    create_topic(&topic, 1).await;
    let dir = tempdir();
    let logs = tempdir();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");

    // the stream keeps flowing while livetable is killed and restarted
    let producer_task = {
        let topic = topic.clone();
        tokio::spawn(async move {
            let producer = producer();
            let all: Vec<FixtureRecord> = (0..CHANGES).map(record).collect();
            for chunk in all.chunks(10_000) {
                produce(&producer, &topic, chunk).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    let mut kills = Vec::new();
    for (round, at) in [5_000u64, 40_000].into_iter().enumerate() {
        let mut child = spawn(
            &topic,
            dir.path(),
            port,
            &u,
            &logs.path().join(format!("run{round}.log")),
        );
        let seen = eventually(
            &format!("round {round}: seq passes {at}"),
            Duration::from_secs(120),
            || async { seq(&base).await.filter(|s| *s >= at) },
        )
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills.push(seen);
    }
    producer_task.await.unwrap();

    let mut child = spawn(&topic, dir.path(), port, &u, &logs.path().join("final.log"));
    let body = eventually(
        "all 100k changes applied",
        Duration::from_secs(180),
        || async {
            let v: Value = reqwest::get(format!("{base}/api/tables/ticks"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["seq"].as_u64()? >= CHANGES as u64).then_some(v)
        },
    )
    .await;
    eprintln!("killed at seq {kills:?}; final seq {}", body["seq"]);
    assert_eq!(
        body["seq"].as_u64(),
        Some(CHANGES as u64),
        "every change applied exactly once"
    );
    let rows = body["rows"].as_object().unwrap();
    assert_eq!(rows.len(), KEYS);
    for k in 0..KEYS {
        let last = CHANGES - KEYS + k;
        assert_eq!(
            rows[&format!("k{k}")]["n"].as_u64(),
            Some(last as u64),
            "key k{k} holds its last change"
        );
    }
    // the changelog caught up too: last record per key equals the table
    let changelog = format!("lt.{u}.table.ticks");
    let expected = body["rows"].clone();
    eventually(
        "the changelog holds the final rows",
        Duration::from_secs(60),
        || {
            let changelog = changelog.clone();
            let expected = expected.clone();
            async move {
                let records = tokio::task::spawn_blocking(move || {
                    read_topic(&changelog, usize::MAX, Duration::from_secs(3))
                })
                .await
                .unwrap();
                // as a compacting broker would keep it: the last record per key (fences are not rows)
                let mut m = serde_json::Map::new();
                for (k, v, h) in records {
                    if h.iter().any(|(name, _)| name == "livetable.fence") {
                        continue;
                    }
                    match (k, v) {
                        (Some(k), Some(v)) => {
                            m.insert(k, serde_json::from_str(&v).unwrap());
                        }
                        (Some(k), None) => {
                            m.remove(&k);
                        }
                        _ => {}
                    }
                }
                (Value::Object(m) == expected).then_some(())
            }
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}
