-- The odds schema: one row per game with its current odds. Debezium captures every change.
-- NUMERIC columns: the connector uses decimal.handling.mode=string so they arrive exact.
CREATE TABLE IF NOT EXISTS game_odds (
    game_id    text PRIMARY KEY,
    odd1       numeric(10, 3),
    odd2       numeric(10, 3),
    odd3       numeric(10, 3),
    odd4       numeric(10, 3),
    odd5       numeric,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- full before-images, so deletes and updates carry every column
ALTER TABLE game_odds REPLICA IDENTITY FULL;
INSERT INTO game_odds (game_id, odd1, odd2, odd3, odd4, odd5)
SELECT 'g' || i, 1.5 + i / 10.0, 2.25, 3.125, 4.0, 5.5 FROM generate_series(1, 20) AS i
ON CONFLICT DO NOTHING;
