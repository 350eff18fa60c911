-- The MySQL flavour of the odds database, laid out like the seed system: one row per game in
-- `available_games`, and one table `game_<id>` per game holding that game's current odds (the odds
-- feed creates both; see load/src/bin/odds-feed.rs). Debezium's MySQL connector captures them all.
CREATE TABLE IF NOT EXISTS available_games (
  game_id    VARCHAR(32)  NOT NULL PRIMARY KEY,
  created_at DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB;
