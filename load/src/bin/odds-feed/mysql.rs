//! MySQL/MariaDB with the seed's layout: `available_games` (db/mariadb-init.sql) lists the games,
//! and each game has a table `game_<id>` with its one row of odds, created with the game.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool};
use serde_json::Value;

use crate::{fmt_odds, row_json, Odds};

pub struct Mysql(Pool);

/// The five odds of a game's row, as exact decimal text.
type OddsRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The quoted table name of a game. Only ever called with an id that passed `valid`
/// (`[A-Za-z0-9_-]`, no backtick), so quoting cannot be escaped.
fn table(id: &str) -> String {
    debug_assert!(crate::valid(id));
    format!("`game_{id}`")
}

async fn select(conn: &mut Conn, id: &str) -> anyhow::Result<Option<Value>> {
    let q = format!(
        "SELECT CAST(odd1 AS CHAR), CAST(odd2 AS CHAR), CAST(odd3 AS CHAR), CAST(odd4 AS CHAR), CAST(odd5 AS CHAR) FROM {} WHERE game_id = ?",
        table(id)
    );
    let row: Option<OddsRow> = conn.exec_first(q, (id,)).await?;
    Ok(row.map(|(a, b, c, d, e)| row_json(id, [a, b, c, d, e])))
}

impl Mysql {
    pub async fn connect(url: &str) -> anyhow::Result<Mysql> {
        let pool = Pool::new(mysql_async::Opts::from_url(url)?);
        // fail at start, not on the first request, when the database is not there
        pool.get_conn().await?.ping().await?;
        Ok(Mysql(pool))
    }

    /// As the seed did: the game's table, its row in `available_games`, its first odds.
    pub async fn create(&self, id: &str, odds: &Odds) -> anyhow::Result<(bool, Value)> {
        let mut conn = self.0.get_conn().await?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (\
               game_id VARCHAR(32) NOT NULL PRIMARY KEY, \
               odd1 DECIMAL(10,3), odd2 DECIMAL(10,3), odd3 DECIMAL(10,3), odd4 DECIMAL(10,3), odd5 DECIMAL(10,3), \
               updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)\
             ) ENGINE = InnoDB",
            table(id)
        ))
        .await?;
        let o = fmt_odds(odds);
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await?;
        tx.exec_drop(
            "INSERT IGNORE INTO available_games (game_id) VALUES (?)",
            (id,),
        )
        .await?;
        let created = tx.affected_rows() == 1;
        tx.exec_drop(
            format!(
                "INSERT IGNORE INTO {} (game_id, odd1, odd2, odd3, odd4, odd5) VALUES (?, ?, ?, ?, ?, ?)",
                table(id)
            ),
            (id, &o[0], &o[1], &o[2], &o[3], &o[4]),
        )
        .await?;
        tx.commit().await?;
        let row = select(&mut conn, id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("game {id} has no row"))?;
        Ok((created, row))
    }

    pub async fn update(&self, id: &str, odds: &Odds) -> anyhow::Result<Option<Value>> {
        let mut conn = self.0.get_conn().await?;
        let known: Option<String> = conn
            .exec_first(
                "SELECT game_id FROM available_games WHERE game_id = ?",
                (id,),
            )
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        let o = fmt_odds(odds);
        conn.exec_drop(
            format!(
                "UPDATE {} SET odd1 = ?, odd2 = ?, odd3 = ?, odd4 = ?, odd5 = ? WHERE game_id = ?",
                table(id)
            ),
            (&o[0], &o[1], &o[2], &o[3], &o[4], id),
        )
        .await?;
        select(&mut conn, id).await
    }
}
