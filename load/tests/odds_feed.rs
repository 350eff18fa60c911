//! The odds API against a real PostgreSQL (dev/postgres on the tests' port 55439) and a real
//! MariaDB (dev/mariadb on the tests' port 33319, the seed's one-table-per-game layout): games get
//! every odd column the seed's rows have (odd1..odd5), the returned odds are the stored odds, and
//! every error is a JSON `{"error": ...}`.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

const PG_PORT: &str = "55439";
const MARIADB_PORT: &str = "33319";
const ODDS: [&str; 5] = ["odd1", "odd2", "odd3", "odd4", "odd5"];

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `dev/<script> args` with `env`; panics with its stderr when it fails; returns stdout.
fn dev(script: &str, args: &[&str], env: (&str, &str)) -> String {
    let out = Command::new(root().join("dev").join(script))
        .args(args)
        .env(env.0, env.1)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dev/{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn psql(q: &str) -> String {
    dev("postgres", &["psql", "-tAc", q], ("PG_PORT", PG_PORT))
}

fn mariadb(q: &str) -> String {
    dev(
        "mariadb",
        &["sql", "-N", "-B", "-e", q],
        ("MARIADB_PORT", MARIADB_PORT),
    )
}

/// The feed process, stopped when the test ends (also on a failed assertion).
struct Feed(Child);
impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_feed(db: &[&str]) -> (Feed, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_odds-feed"))
        .args(db)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    (Feed(child), format!("http://127.0.0.1:{port}"))
}

/// A request's status and JSON body (Null when the body is not JSON).
async fn call(http: &reqwest::Client, method: reqwest::Method, url: &str) -> (u16, Value) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match http.request(method.clone(), url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                return (status, r.json().await.unwrap_or(Value::Null));
            }
            // only while the feed starts
            Err(e) if Instant::now() < until && e.is_connect() => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("odds-feed did not answer {url}: {e}"),
        }
    }
}

async fn post(http: &reqwest::Client, url: &str) -> (u16, Value) {
    call(http, reqwest::Method::POST, url).await
}

/// The odds of a row as text, odd1..odd5 joined with `|` (absent or null: empty).
fn odds_text(row: &Value) -> String {
    ODDS.map(|c| row[c].as_str().unwrap_or_default().to_string())
        .join("|")
}

/// The API: create, create again, new odds (as stored in the database, read by `stored`), unknown
/// and hostile ids, and the JSON error of every kind of mistake.
async fn check_api(base: &str, game: &str, stored: impl Fn(&str) -> String) {
    let http = reqwest::Client::new();
    let (status, created) = post(&http, &format!("{base}/games/{game}")).await;
    assert_eq!(status, 201, "{created}");
    for c in ODDS {
        assert!(
            created[c].is_string(),
            "a new game has every odd column of the seed: {created}"
        );
    }
    assert_eq!(stored(game), odds_text(&created), "created odds are stored");
    let (status, again) = post(&http, &format!("{base}/games/{game}")).await;
    assert_eq!(status, 200, "creating twice is harmless");
    assert_eq!(again, created);
    let (status, sent) = post(&http, &format!("{base}/sendodd/{game}")).await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(
        stored(game),
        odds_text(&sent),
        "returned odds are the stored odds"
    );

    let bad_id = "game id must be 1-32 of [A-Za-z0-9_-]";
    let cases: [(reqwest::Method, String, u16, &str); 9] = [
        (
            reqwest::Method::POST,
            format!("/sendodd/nope{game}"),
            404,
            "unknown game",
        ),
        // an empty id, no id, a hostile id, an id too long: 400 naming the rule
        (reqwest::Method::POST, "/games/".into(), 400, bad_id),
        (reqwest::Method::POST, "/games".into(), 400, bad_id),
        (reqwest::Method::POST, "/sendodd/".into(), 400, bad_id),
        (
            reqwest::Method::POST,
            "/games/x%27%3B%20drop%20table%20game_odds%3B--".into(),
            400,
            bad_id,
        ),
        (
            reqwest::Method::POST,
            format!("/games/{}", "x".repeat(33)),
            400,
            bad_id,
        ),
        (reqwest::Method::POST, "/games/%FF".into(), 400, bad_id),
        (
            reqwest::Method::POST,
            "/nothing/here".into(),
            404,
            "no such route",
        ),
        (
            reqwest::Method::GET,
            format!("/games/{game}"),
            405,
            "method not allowed",
        ),
    ];
    for (method, path, want_status, want_error) in cases {
        let (status, body) = call(&http, method.clone(), &format!("{base}{path}")).await;
        assert_eq!(status, want_status, "{method} {path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(want_error),
            "{method} {path}: a JSON error saying {want_error:?}, got {body}"
        );
    }
}

#[tokio::test]
async fn games_and_odds_are_written_to_postgres() {
    dev("postgres", &["start"], ("PG_PORT", PG_PORT));
    let (_feed, base) = start_feed(&[
        "--pg",
        &format!("host=127.0.0.1 port={PG_PORT} user=postgres dbname=gameodds"),
    ]);
    let game = format!("t{}", std::process::id());
    check_api(&base, &game, |g| {
        psql(&format!(
            "select concat_ws('|', odd1, odd2, odd3, odd4, odd5) from game_odds where game_id = '{g}'"
        ))
    })
    .await;
    // nothing reached SQL from the hostile id
    assert_eq!(psql("select count(*) > 0 from game_odds"), "t");
    psql(&format!("delete from game_odds where game_id = '{game}'"));
}

#[tokio::test]
async fn games_and_odds_are_written_to_mariadb_in_the_seed_layout() {
    dev("mariadb", &["start"], ("MARIADB_PORT", MARIADB_PORT));
    let (_feed, base) = start_feed(&[
        "--mysql",
        &format!("mysql://root@127.0.0.1:{MARIADB_PORT}/gameodds"),
    ]);
    let game = format!("t{}", std::process::id());
    check_api(&base, &game, |g| {
        mariadb(&format!(
            "select concat_ws('|', odd1, odd2, odd3, odd4, odd5) from `game_{g}` where game_id = '{g}'"
        ))
    })
    .await;
    assert_eq!(
        mariadb(&format!(
            "select count(*) from available_games where game_id = '{game}'"
        )),
        "1"
    );
    mariadb(&format!(
        "drop table `game_{game}`; delete from available_games where game_id = '{game}'"
    ));
}
