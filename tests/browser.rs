//! The live page in a real browser: headless Chromium (Debian's package, driven by playwright-core
//! from npm; `./dev/test` installs both) loads `/`, a change is produced into Kafka, and the row on
//! the page shows the new value within 2 s. The screenshot is kept in `target/browser-artifacts/`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use livetable::config::TopicSelection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_change_within_two_seconds() {
    init_logs();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let driver_dir = root.join("tests/browser");
    assert!(
        driver_dir.join("node_modules/playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Debian's chromium and `npm ci` in tests/browser: run ./dev/test, which installs both"
    );
    let u = unique("page");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    let records = load_fixture("pg_f_decimal_string.jsonl");
    let p = producer();
    produce(&p, &topic, &records[..4]).await;
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "game_odds", 4).await;

    let artifacts = root.join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("live-page.png");
    let mut child = Command::new("node")
        .arg(driver_dir.join("page.mjs"))
        .arg(format!("{base}/?table=game_odds"))
        .arg(&shot)
        .current_dir(&driver_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8);
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let ready = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the page loads")
        .unwrap_or_default();
    assert_eq!(ready, "READY 1.500", "row g1 shown with its snapshot value");
    // update g1.odd1 1.500 -> 1.750 through Kafka
    produce(&p, &topic, &records[4..5]).await;
    writeln!(stdin, "GO").unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a result")
        .unwrap_or_default();
    let status = child.wait().unwrap();
    eprintln!("browser: {result} (screenshot {})", shot.display());
    assert!(result.starts_with("OK "), "{result}");
    assert!(status.success());
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "a screenshot was saved"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}
