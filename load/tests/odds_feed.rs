//! The odds API against a real PostgreSQL (dev/postgres on the tests' port 55439).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const PG_PORT: &str = "55439";

fn psql(q: &str) -> String {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("dev/postgres"))
        .args(["psql", "-tAc", q])
        .env("PG_PORT", PG_PORT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn games_and_odds_are_written_to_postgres() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = Command::new(root.join("dev/postgres"))
        .arg("start")
        .env("PG_PORT", PG_PORT)
        .status()
        .unwrap();
    assert!(st.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut feed = Command::new(env!("CARGO_BIN_EXE_odds-feed"))
        .args([
            "--pg",
            &format!("host=127.0.0.1 port={PG_PORT} user=postgres dbname=gameodds"),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(20);
    let game = format!("t{}", std::process::id());
    let created = loop {
        match http.post(format!("{base}/games/{game}")).send().await {
            Ok(r) => break r,
            Err(_) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("odds-feed did not answer: {e}"),
        }
    };
    assert_eq!(created.status().as_u16(), 201);
    let again = http
        .post(format!("{base}/games/{game}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 200, "creating twice is harmless");
    let sent: Value = http
        .post(format!("{base}/sendodd/{game}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let in_db = psql(&format!(
        "select odd1::text || '|' || odd4::text from game_odds where game_id = '{game}'"
    ));
    assert_eq!(
        in_db,
        format!(
            "{}|{}",
            sent["odd1"].as_str().unwrap(),
            sent["odd4"].as_str().unwrap()
        ),
        "returned odds are the stored odds"
    );
    assert_eq!(
        http.post(format!("{base}/sendodd/nope{game}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    // ids are validated: nothing reaches SQL from a hostile path
    let bad = http
        .post(format!(
            "{base}/games/x%27%3B%20drop%20table%20game_odds%3B--"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert_eq!(psql("select count(*) > 0 from game_odds"), "t");
    psql(&format!("delete from game_odds where game_id = '{game}'"));
    let _ = feed.kill();
    let _ = feed.wait();
}
