//! odds-feed: the seed system's odds API and a random-walk generator, writing to the database the
//! local stack captures with Debezium:
//!   PostgreSQL (`--pg`, the default): one table `game_odds`, one row per game;
//!   MySQL/MariaDB (`--mysql URL`): the seed's layout, `available_games` plus a table `game_<id>`
//!   per game holding that game's odds.
//! API:
//!   POST /games/{game_id}    create a game with random odds (201; 200 with its odds if it exists)
//!   POST /sendodd/{game_id}  write new random odds for a game and return them (404 if unknown)
//! Every error, of these routes or of any other path or method, is a JSON `{"error": "..."}` with a
//! 4xx/5xx status; a missing or invalid id is a 400 naming the rule for ids.
//! With `--games N --rate R` it also creates games g1..gN and moves their odds as a random walk,
//! R updates/s in total.
//! Game ids are validated (`[A-Za-z0-9_-]{1,32}`); values are always bound parameters. The MySQL
//! layout needs the id in a table name (DDL takes no parameters): only a validated id is used, and
//! quoted.

mod mysql;
mod pg;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "odds-feed",
    about = "The odds API and a random-walk generator, writing to PostgreSQL or MySQL/MariaDB"
)]
struct Args {
    /// PostgreSQL, libpq-style connection string (the default database).
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=55432 user=postgres dbname=gameodds"
    )]
    pg: String,
    /// Use MySQL/MariaDB with the seed's per-game tables instead, e.g.
    /// mysql://root@127.0.0.1:33306/gameodds
    #[arg(long)]
    mysql: Option<String>,
    /// HTTP address of the API.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Games moved by the generator (0 = API only).
    #[arg(long, default_value_t = 0)]
    games: u32,
    /// Generator updates per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
}

/// The odds of a game, odd1..odd5 (every odd column of the seed's rows), kept as numbers for the
/// random walk and written with 3 decimals.
pub type Odds = [f64; 5];

/// A game's row as the API returns it (odds as decimal strings, like Debezium delivers them).
pub fn row_json(game_id: &str, odds: [Option<String>; 5]) -> Value {
    let [odd1, odd2, odd3, odd4, odd5] = odds;
    json!({"game_id": game_id, "odd1": odd1, "odd2": odd2, "odd3": odd3, "odd4": odd4, "odd5": odd5})
}

pub fn fmt_odds(o: &Odds) -> [String; 5] {
    o.map(|v| format!("{v:.3}"))
}

/// A database the feed writes to.
pub enum Db {
    Pg(pg::Pg),
    Mysql(mysql::Mysql),
}

impl Db {
    /// Creates the game with these odds unless it exists; returns (created, the stored row).
    async fn create(&self, id: &str, odds: &Odds) -> anyhow::Result<(bool, Value)> {
        match self {
            Db::Pg(d) => d.create(id, odds).await,
            Db::Mysql(d) => d.create(id, odds).await,
        }
    }

    /// Writes new odds for an existing game; None if the game does not exist.
    async fn update(&self, id: &str, odds: &Odds) -> anyhow::Result<Option<Value>> {
        match self {
            Db::Pg(d) => d.update(id, odds).await,
            Db::Mysql(d) => d.update(id, odds).await,
        }
    }
}

/// A tiny xorshift generator: odds need no cryptographic randomness.
struct Rng(u64);
impl Rng {
    fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        Rng(t | 1)
    }

    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn odds(&mut self) -> Odds {
        [(); 5].map(|_| 1.01 + self.next() * 9.0)
    }

    /// One random-walk step: each odd moves by up to +-3 %, kept within [1.01, 50].
    fn step(&mut self, o: &Odds) -> Odds {
        o.map(|v| (v * (1.0 + (self.next() - 0.5) * 0.06)).clamp(1.01, 50.0))
    }
}

fn valid(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({"error": msg}))).into_response()
}

const BAD_ID: &str = "game id must be 1-32 of [A-Za-z0-9_-]";

/// The game id of the path when it is valid (`None` also for a path that is not UTF-8).
fn game_id(path: Result<Path<String>, PathRejection>) -> Option<String> {
    path.ok().map(|Path(id)| id).filter(|id| valid(id))
}

/// `POST /games/` and `POST /sendodd/`: the id is missing.
async fn missing_id() -> Response {
    error(StatusCode::BAD_REQUEST, BAD_ID)
}

async fn no_route() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such route: POST /games/{game_id} or POST /sendodd/{game_id}",
    )
}

async fn no_method() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: use POST /games/{game_id} or POST /sendodd/{game_id}",
    )
}

async fn create_game(
    State(db): State<Arc<Db>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(id) = game_id(path) else {
        return error(StatusCode::BAD_REQUEST, BAD_ID);
    };
    match db.create(&id, &Rng::new().odds()).await {
        Ok((true, row)) => (StatusCode::CREATED, Json(row)).into_response(),
        Ok((false, row)) => Json(row).into_response(),
        Err(e) => {
            eprintln!("odds-feed: create {id}: {e:#}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
        }
    }
}

async fn send_odd(
    State(db): State<Arc<Db>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(id) = game_id(path) else {
        return error(StatusCode::BAD_REQUEST, BAD_ID);
    };
    match db.update(&id, &Rng::new().odds()).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown game"),
        Err(e) => {
            eprintln!("odds-feed: sendodd {id}: {e:#}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
        }
    }
}

/// Creates games g1..gN and moves their odds as a random walk, `rate` updates/s in total.
async fn generate(db: Arc<Db>, games: u32, rate: f64) {
    let mut rng = Rng::new();
    let mut current: HashMap<String, Odds> = HashMap::new();
    for g in 1..=games {
        let id = format!("g{g}");
        let odds = rng.odds();
        match db.create(&id, &odds).await {
            Ok(_) => {
                current.insert(id, odds);
            }
            Err(e) => eprintln!("odds-feed: create {id}: {e:#}"),
        }
    }
    if current.is_empty() {
        eprintln!("odds-feed: no game could be created; the generator stops");
        return;
    }
    let ids: Vec<String> = current.keys().cloned().collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let id = &ids[(rng.next() * ids.len() as f64) as usize % ids.len()];
        let Some(odds) = current.get_mut(id) else {
            continue;
        };
        let next = rng.step(odds);
        match db.update(id, &next).await {
            Ok(_) => *odds = next,
            Err(e) => eprintln!("odds-feed: update {id}: {e:#}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let db = Arc::new(match &a.mysql {
        Some(url) => Db::Mysql(mysql::Mysql::connect(url).await?),
        None => Db::Pg(pg::Pg::connect(&a.pg).await?),
    });
    if a.games > 0 && a.rate > 0.0 {
        tokio::spawn(generate(db.clone(), a.games, a.rate));
    }
    let app = Router::new()
        .route("/games/{game_id}", post(create_game))
        .route("/sendodd/{game_id}", post(send_odd))
        .route("/games", post(missing_id))
        .route("/games/", post(missing_id))
        .route("/sendodd", post(missing_id))
        .route("/sendodd/", post(missing_id))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(db);
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    eprintln!("odds-feed: listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        for ok in ["g1", "A_b-9", &"x".repeat(32)] {
            assert!(valid(ok), "{ok}");
        }
        for bad in ["", "a b", "a`b", "a'b", "a;b", "a.b", &"x".repeat(33), "é"] {
            assert!(!valid(bad), "{bad}");
        }
    }

    #[test]
    fn the_walk_stays_in_range_and_moves() {
        let mut rng = Rng(12345);
        let mut o = rng.odds();
        let start = o;
        for _ in 0..10_000 {
            let n = rng.step(&o);
            for (a, b) in o.iter().zip(n.iter()) {
                assert!((1.01..=50.0).contains(b));
                assert!((b / a - 1.0).abs() <= 0.0301 || *b == 1.01 || *b == 50.0);
            }
            o = n;
        }
        assert_ne!(o, start);
    }
}
