//! Smoke run of the load tools against a real livetable and the real broker: cdc-gen produces while
//! ws-swarm listens and verifies every client's final state against the HTTP API.

use std::process::Command;
use std::time::Duration;

use livetable::config::{Config, TopicSelection};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn brokers() -> String {
    std::env::var("LIVETABLE_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_gen_and_ws_swarm_run_and_agree_with_the_api() {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let u = format!("smoke{}x{t}", std::process::id());
    let topic = format!("{u}.public.game_odds");
    let dir = tempfile::tempdir().unwrap();
    let gen_topic = topic.clone();
    let gen = move |count: &str, rate: &str| {
        let topic = gen_topic.clone();
        Command::new(env!("CARGO_BIN_EXE_cdc-gen"))
            .args([
                "--brokers",
                &brokers(),
                "--topic",
                &topic,
                "--keys",
                "50",
                "--count",
                count,
                "--rate",
                rate,
            ])
            .output()
            .unwrap()
    };
    let first = gen("50", "0"); // creates the topic and the 50 rows
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let c = Config::for_tests(
        &brokers(),
        TopicSelection::Names(vec![topic.clone()]),
        dir.path(),
        &u,
    );
    let svc = livetable::start(c, CancellationToken::new()).await.unwrap();
    let base = format!("http://{}", svc.local_addr);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/api/tables/game_odds"))
        .await
        .ok()
        .map(|r| r.status().as_u16())
        != Some(200)
    {
        assert!(std::time::Instant::now() < until, "table never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let swarm = tokio::process::Command::new(env!("CARGO_BIN_EXE_ws-swarm"))
        .args([
            "--base",
            &base,
            "--table",
            "game_odds",
            "--clients",
            "20",
            "--duration-secs",
            "4",
            "--verify",
        ])
        .output();
    let producer = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(800));
        gen("400", "200")
    });
    let swarm = swarm.await.unwrap();
    let generated = producer.await.unwrap();
    let g: Value = serde_json::from_slice(&generated.stdout).unwrap();
    assert_eq!(g["sent"], 400);
    assert!(
        swarm.status.success(),
        "{}",
        String::from_utf8_lossy(&swarm.stderr)
    );
    let s: Value = serde_json::from_slice(&swarm.stdout).unwrap();
    eprintln!("{s}");
    assert_eq!(
        (
            s["connected"].as_u64(),
            s["mismatches"].as_u64(),
            s["errors"].as_u64()
        ),
        (Some(20), Some(0), Some(0))
    );
    assert!(
        s["row_updates"].as_u64().unwrap() > 0,
        "patches flowed: {s}"
    );
    assert!(s["freshness_ms"]["p50"].as_f64().is_some());
    svc.shutdown();
    svc.wait().await.unwrap();
}
