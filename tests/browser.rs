//! The live page in a real browser: headless Chromium (Debian's package, driven by playwright-core
//! from npm; `./dev/test` installs both) loads `/`, a change is produced into Kafka, and the row on
//! the page shows the new value within 2 s; a bet placed on one page's bet slip shows on another.
//! Screenshots are kept in `target/browser-artifacts/`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::*;
use livetable::config::{Config, TopicSelection};
use livetable::publish::PublishConfig;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A node driver script of tests/browser with its arguments; its stdout lines arrive on the channel.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::sync::mpsc::Receiver<String>,
}

impl Driver {
    fn start(script: &str, args: &[&str]) -> Driver {
        let dir = repo().join("tests/browser");
        assert!(
            dir.join("node_modules/playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
            "the browser test needs Debian's chromium and `npm ci` in tests/browser: run ./dev/test, which installs both"
        );
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node");
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::channel::<String>(8);
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Driver {
            child,
            stdin,
            lines,
        }
    }

    /// The next line, within `secs`.
    async fn line(&mut self, secs: u64, what: &str) -> String {
        tokio::time::timeout(Duration::from_secs(secs), self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing from the browser in {secs} s"))
            .unwrap_or_default()
    }

    /// The script's exit status, within `secs` (else it is killed and the test fails: a browser
    /// that hangs must not hold up the suite).
    async fn exit(&mut self, secs: u64, what: &str) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("the browser script's status") {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{what}: the browser script did not end within {secs} s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    /// A test that failed half-way leaves no browser behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn artifacts() -> PathBuf {
    let dir = repo().join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_change_within_two_seconds() {
    init_logs();
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

    let shot = artifacts().join("live-page.png");
    let page_url = format!("{base}/?table=game_odds");
    let mut d = Driver::start("page.mjs", &[&page_url, shot.to_str().unwrap()]);
    let ready = d.line(60, "the page loads").await;
    assert_eq!(ready, "READY 1.500", "row g1 shown with its snapshot value");
    // update g1.odd1 1.500 -> 1.750 through Kafka
    produce(&p, &topic, &records[4..5]).await;
    writeln!(d.stdin, "GO").unwrap();
    let result = d.line(30, "a result").await;
    let status = d.exit(30, "the page script").await;
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

/// The bet slip (issue 16): the page publishes a bet to the writable `bets` topic over its
/// WebSocket, livetable reads the topic back as an upsert table, and another visitor's page shows
/// the stakes per game change; a bet the topic's JSON Schema refuses is shown as refused and
/// changes nothing. The topic then holds exactly the two accepted bets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bet_placed_on_one_page_shows_on_another() {
    init_logs();
    let u = unique("slip");
    let odds = format!("{u}.public.game_odds");
    let bets = format!("{u}.bets");
    create_topic(&odds, 1).await;
    create_topic(&bets, 2).await;
    produce(
        &producer(),
        &odds,
        &load_fixture("pg_f_decimal_string.jsonl")[..4],
    )
    .await;
    let dir = tempdir();
    // the demo's own files: the bet schema of dev/up, the topic read back as table `bets`
    let views = dir.path().join("views.toml");
    std::fs::write(
        &views,
        format!("[topics.\"{bets}\"]\nformat = \"upsert\"\nname = \"bets\"\n"),
    )
    .unwrap();
    let schema = repo().join("dev/demo/bet.schema.json");
    let mut c = test_config(TopicSelection::Names(vec![odds.clone()]), dir.path(), &u);
    c.upsert = Config::from_args(livetable::config::Args {
        views: Some(views),
        ..Default::default()
    })
    .unwrap()
    .upsert;
    c.topics = c.topics.with_topics(c.upsert.keys());
    c.publish = PublishConfig::from_toml(
        &format!(
            "[publish]\n[[publish.topic]]\nname = \"{bets}\"\nschema = \"{}\"\n",
            schema.display()
        ),
        dir.path(),
    )
    .unwrap();
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "game_odds", 4).await;
    let topics: serde_json::Value = reqwest::get(format!("{base}/api/topics"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(topics["topics"][0]["name"], bets.as_str(), "{topics}");
    assert_eq!(topics["topics"][0]["table"], "bets", "{topics}");
    assert_eq!(topics["topics"][0]["schema"], true, "{topics}");

    let prefix = artifacts().join("bet-slip");
    let mut d = Driver::start("bet.mjs", &[&base, prefix.to_str().unwrap()]);
    for step in ["ready", "first", "second", "refused"] {
        let line = d.line(90, step).await;
        eprintln!("browser: {line}");
        assert!(line.starts_with(&format!("OK {step} ")), "{step}: {line}");
    }
    assert!(d.exit(30, "the browser script").await.success());
    // the table of bets (and so the topic) holds the two accepted bets, once each
    let rows = table_at_seq(&base, "bets", 2).await;
    let mut stakes: Vec<f64> = rows["rows"]
        .as_object()
        .unwrap()
        .values()
        .map(|b| {
            assert_eq!(b["game_id"], "g1");
            assert_eq!(b["pick"], "odd1");
            assert_eq!(b["odds"], "1.500");
            b["stake"].as_f64().unwrap()
        })
        .collect();
    stakes.sort_by(f64::total_cmp);
    assert_eq!(stakes, vec![5.0, 25.0]);
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// The views of the demo (issue 15, dev/demo/views.toml, with this test's topic names): the page
/// shows the biggest movers with an odds sparkline and the high-score board; a big move of g2's
/// odd1 through Kafka puts g2 first among the movers, and a record score on the events topic puts
/// its player first on the board.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_demo_views_live() {
    init_logs();
    let u = unique("viewspage");
    let odds = format!("{u}.public.game_odds");
    let scores = format!("{u}.scores");
    create_topic(&odds, 1).await;
    create_topic(&scores, 2).await;
    let p = producer();
    let records = load_fixture("pg_f_decimal_string.jsonl");
    produce(&p, &odds, &records[..5]).await;
    let score = |player: &str, s: u64| FixtureRecord {
        key: Some(player.to_string()),
        value: Some(serde_json::json!({"player": player, "score": s}).to_string()),
        headers: vec![],
    };
    let first: Vec<FixtureRecord> = (0..24)
        .map(|i| score(&format!("p{}", i % 8), 100 + (i * 37) % 800))
        .collect();
    produce_keyed(&p, &scores, &first).await;

    let dir = tempdir();
    let demo = std::fs::read_to_string(repo().join("dev/demo/views.toml")).unwrap();
    let views = dir.path().join("views.toml");
    std::fs::write(
        &views,
        demo.replace(
            "[topics.scores]",
            &format!("[topics.\"{scores}\"]\nname = \"scores\""),
        )
        .replace("[topics.bets]", &format!("[topics.\"{u}.bets\"]")),
    )
    .unwrap();
    let from_file = Config::from_args(livetable::config::Args {
        views: Some(views),
        ..Default::default()
    })
    .unwrap();
    let mut c = test_config(TopicSelection::Names(vec![odds.clone()]), dir.path(), &u);
    c.views = from_file.views;
    c.events = from_file.events;
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "game_odds", 5).await;

    let shot = artifacts().join("views-page.png");
    let mut d = Driver::start(
        "views.mjs",
        &[
            &base,
            shot.to_str().unwrap(),
            "g2",
            "9.999",
            "champion",
            "99999",
        ],
    );
    let line = d.line(60, "ready").await;
    eprintln!("browser: {line}");
    assert!(line.starts_with("OK ready "), "{line}");
    // g2's odd1 1.100 -> 9.999: the biggest move; a record score for a new player
    let mut moved: serde_json::Value =
        serde_json::from_str(records[1].value.as_deref().unwrap()).unwrap();
    moved["after"]["odd1"] = "9.999".into();
    moved["op"] = "u".into();
    // a later change than the captured stream's (whose events reached LSN 26752336), as
    // Debezium would number it: an older position is a re-send, and skipped
    moved["source"]["snapshot"] = "false".into();
    moved["source"]["lsn"] = 26760000.into();
    moved["source"]["sequence"] = r#"["26760000","26760000"]"#.into();
    let change = FixtureRecord {
        key: records[1].key.clone(),
        value: Some(moved.to_string()),
        headers: vec![],
    };
    produce(&p, &odds, &[change]).await;
    produce_keyed(&p, &scores, &[score("champion", 99999)]).await;
    writeln!(d.stdin, "GO").unwrap();
    for step in ["moved", "record"] {
        let line = d.line(30, step).await;
        eprintln!("browser: {line}");
        assert!(line.starts_with(&format!("OK {step} ")), "{step}: {line}");
    }
    assert!(d.exit(30, "the browser script").await.success());
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// livetable.js's `subscribe()`, as a React or Angular app calls it: switched while the socket is
/// still connecting, the new table's snapshot comes (the URL named the former one); switched 70
/// times on the open connection (more than --max-subscriptions), every switch gets its snapshot,
/// no error, and the former table is unsubscribed (the server counts no subscription of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_switches_tables_without_leaking_subscriptions() {
    init_logs();
    let u = unique("switch");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    produce(
        &producer(),
        &topic,
        &load_fixture("pg_f_decimal_string.jsonl")[..5],
    )
    .await;
    let dir = tempdir();
    let views = dir.path().join("views.toml");
    std::fs::write(
        &views,
        "[views.movers]\nfrom = \"game_odds\"\ndelta = { columns = [\"odd1\"] }\n",
    )
    .unwrap();
    let from_file = Config::from_args(livetable::config::Args {
        views: Some(views),
        ..Default::default()
    })
    .unwrap();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.views = from_file.views;
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "game_odds", 5).await;
    let mut d = Driver::start("switch.mjs", &[&base, "game_odds", "movers", "70"]);
    let line = d.line(120, "switching").await;
    eprintln!("browser: {line}");
    assert_eq!(line, "OK switched 70");
    let subscribed = |table: &str| {
        let base = base.clone();
        let name = format!("livetable_subscriptions{{table=\"{table}\"}}");
        async move { metric_value(&metrics_text(&base).await, &name) }
    };
    // the server counts what the page unsubscribed a moment later
    let mut former = subscribed("game_odds").await;
    for _ in 0..100 {
        if former == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        former = subscribed("game_odds").await;
    }
    let held = subscribed("movers").await;
    writeln!(d.stdin, "DONE").unwrap();
    let exited = d.exit(30, "the browser script").await;
    svc.shutdown();
    svc.wait().await.unwrap();
    assert_eq!(former, Some(0.0), "the former table is unsubscribed");
    assert_eq!(held, Some(1.0), "the page holds movers");
    assert!(exited.success());
}
