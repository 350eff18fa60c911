//! odds-feed: the seed system's odds API, against PostgreSQL (table `game_odds`).
//!   POST /games/{game_id}    create a game with random odds (201; 200 if it exists)
//!   POST /sendodd/{game_id}  write new random odds for a game and return them (404 if unknown)
//! With `--games N --rate R` it also moves the odds of N games as a random walk, R updates/s.
//! Game ids are validated (`[A-Za-z0-9_-]{1,32}`); all SQL is parameterised.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use serde_json::json;
use tokio_postgres::{Client, NoTls};

#[derive(Parser, Debug)]
#[command(
    name = "odds-feed",
    about = "The odds API and a random-walk generator, writing to PostgreSQL"
)]
struct Args {
    /// libpq-style connection string.
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=55432 user=postgres dbname=gameodds"
    )]
    pg: String,
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

/// A tiny xorshift generator: odds need no cryptographic randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
        | 1
}

fn valid(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn odds(rng: &mut Rng) -> [String; 4] {
    [(); 4].map(|_| format!("{:.3}", 1.01 + rng.next() * 9.0))
}

const ROW: &str = "game_id, odd1::text, odd2::text, odd3::text, odd4::text";

fn row_json(r: &tokio_postgres::Row) -> serde_json::Value {
    json!({"game_id": r.get::<_, String>(0), "odd1": r.get::<_, Option<String>>(1), "odd2": r.get::<_, Option<String>>(2),
           "odd3": r.get::<_, Option<String>>(3), "odd4": r.get::<_, Option<String>>(4)})
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({"error": msg}))).into_response()
}

async fn create_game(State(db): State<Arc<Client>>, Path(id): Path<String>) -> Response {
    if !valid(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "game id must be 1-32 of [A-Za-z0-9_-]",
        );
    }
    let o = odds(&mut Rng(seed()));
    let q = format!("insert into game_odds (game_id, odd1, odd2, odd3, odd4) values ($1, $2::text::numeric, $3::text::numeric, $4::text::numeric, $5::text::numeric) on conflict (game_id) do nothing returning {ROW}");
    match db.query_opt(&q, &[&id, &o[0], &o[1], &o[2], &o[3]]).await {
        Ok(Some(r)) => (StatusCode::CREATED, Json(row_json(&r))).into_response(),
        Ok(None) => match db
            .query_one(
                &format!("select {ROW} from game_odds where game_id = $1"),
                &[&id],
            )
            .await
        {
            Ok(r) => Json(row_json(&r)).into_response(),
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "database error"),
        },
        Err(e) => {
            eprintln!("odds-feed: create {id}: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
        }
    }
}

async fn send_odd(State(db): State<Arc<Client>>, Path(id): Path<String>) -> Response {
    if !valid(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "game id must be 1-32 of [A-Za-z0-9_-]",
        );
    }
    match update(&db, &id, &mut Rng(seed())).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown game"),
        Err(e) => {
            eprintln!("odds-feed: sendodd {id}: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
        }
    }
}

async fn update(
    db: &Client,
    id: &str,
    rng: &mut Rng,
) -> Result<Option<serde_json::Value>, tokio_postgres::Error> {
    let o = odds(rng);
    let q = format!("update game_odds set odd1 = $2::text::numeric, odd2 = $3::text::numeric, odd3 = $4::text::numeric, odd4 = $5::text::numeric, updated_at = now() where game_id = $1 returning {ROW}");
    Ok(db
        .query_opt(&q, &[&id, &o[0], &o[1], &o[2], &o[3]])
        .await?
        .map(|r| row_json(&r)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (client, conn) = tokio_postgres::connect(&a.pg, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("odds-feed: database connection lost: {e}");
            std::process::exit(1);
        }
    });
    let db = Arc::new(client);
    if a.games > 0 && a.rate > 0.0 {
        let db = db.clone();
        let (games, rate) = (a.games, a.rate);
        tokio::spawn(async move {
            let mut rng = Rng(seed());
            for g in 1..=games {
                let id = format!("g{g}");
                let o = odds(&mut rng);
                let q = "insert into game_odds (game_id, odd1, odd2, odd3, odd4) values ($1, $2::text::numeric, $3::text::numeric, $4::text::numeric, $5::text::numeric) on conflict (game_id) do nothing";
                if let Err(e) = db.execute(q, &[&id, &o[0], &o[1], &o[2], &o[3]]).await {
                    eprintln!("odds-feed: create {id}: {e}");
                }
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            loop {
                tick.tick().await;
                let id = format!("g{}", 1 + (rng.next() * games as f64) as u32 % games);
                if let Err(e) = update(&db, &id, &mut rng).await {
                    eprintln!("odds-feed: update {id}: {e}");
                }
            }
        });
    }
    let app = Router::new()
        .route("/games/{game_id}", post(create_game))
        .route("/sendodd/{game_id}", post(send_odd))
        .with_state(db);
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    eprintln!("odds-feed: listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
