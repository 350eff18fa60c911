//! PostgreSQL: one table `game_odds` (db/postgres-init.sql), one row per game.

use serde_json::Value;
use tokio_postgres::{Client, NoTls, Row};

use crate::{fmt_odds, row_json, Odds};

pub struct Pg(Client);

const ROW: &str = "game_id, odd1::text, odd2::text, odd3::text, odd4::text, odd5::text";

fn to_json(r: &Row) -> Value {
    row_json(&r.get::<_, String>(0), [1, 2, 3, 4, 5].map(|i| r.get(i)))
}

impl Pg {
    pub async fn connect(conninfo: &str) -> anyhow::Result<Pg> {
        let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("odds-feed: database connection lost: {e}");
                std::process::exit(1);
            }
        });
        Ok(Pg(client))
    }

    pub async fn create(&self, id: &str, odds: &Odds) -> anyhow::Result<(bool, Value)> {
        let o = fmt_odds(odds);
        let q = format!("insert into game_odds (game_id, odd1, odd2, odd3, odd4, odd5) values ($1, $2::text::numeric, $3::text::numeric, $4::text::numeric, $5::text::numeric, $6::text::numeric) on conflict (game_id) do nothing returning {ROW}");
        if let Some(r) = self
            .0
            .query_opt(&q, &[&id, &o[0], &o[1], &o[2], &o[3], &o[4]])
            .await?
        {
            return Ok((true, to_json(&r)));
        }
        let q = format!("select {ROW} from game_odds where game_id = $1");
        Ok((false, to_json(&self.0.query_one(&q, &[&id]).await?)))
    }

    pub async fn update(&self, id: &str, odds: &Odds) -> anyhow::Result<Option<Value>> {
        let o = fmt_odds(odds);
        let q = format!("update game_odds set odd1 = $2::text::numeric, odd2 = $3::text::numeric, odd3 = $4::text::numeric, odd4 = $5::text::numeric, odd5 = $6::text::numeric, updated_at = now() where game_id = $1 returning {ROW}");
        let row = self
            .0
            .query_opt(&q, &[&id, &o[0], &o[1], &o[2], &o[3], &o[4]])
            .await?;
        Ok(row.as_ref().map(to_json))
    }
}
