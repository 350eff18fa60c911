//! cdc-gen: produces Debezium-format change events (full envelope by default, `--unwrapped` for
//! ExtractNewRecordState output) for N keys of an odds-like row, at a target rate or as fast as
//! possible. `source.ts_ms` carries the send time so clients can measure freshness.
//! Progress on stderr, a JSON summary on stdout.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

#[derive(Parser, Debug)]
#[command(
    name = "cdc-gen",
    about = "Debezium change events into Kafka, for load tests"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Topic (created with `--partitions` partitions if missing); the table name is its last
    /// segment.
    #[arg(long, default_value = "odds.public.game_odds")]
    topic: String,
    /// Partitions of the topic when cdc-gen creates it; keys spread over them by the producer's
    /// partitioner (a hash of the message key). An existing topic is used as it is.
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// Number of distinct row keys.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Changes to send.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Changes per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// The producer's `linger.ms`: how long a record waits for others to share its request. A
    /// paced run at thousands of changes/s with 1 ms sends a request per one or two records,
    /// which a small broker may not keep up with.
    #[arg(long, default_value_t = 1)]
    linger_ms: u32,
    /// Stop after this many seconds even if `count` was not reached.
    #[arg(long, default_value_t = 3600)]
    duration_secs: u64,
    /// ExtractNewRecordState output instead of the full envelope.
    #[arg(long)]
    unwrapped: bool,
    /// Give each row a `league` column, `L{key number % N}` (0: no such column), for filtered
    /// subscriptions (`where=league = 'L7'`).
    #[arg(long, default_value_t = 0)]
    leagues: u64,
    /// Game score events instead of change events (an `events` topic of a views file, e.g. the
    /// demo's high-score board): `{"player":"pN","score":S,"at":ms}` keyed by the player, with
    /// `--keys` players.
    #[arg(long)]
    scores: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One score event: a pseudo-random player and score (most scores low, a few high).
fn score_event(i: u64, players: u64) -> (String, String) {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    x ^= x >> 29;
    let player = x % players.max(1);
    let score = (x >> 20) % 1000 * ((x >> 40) % 10 + 1);
    let key = format!("p{player}");
    let value = format!(r#"{{"player":"{key}","score":{score},"at":{}}}"#, now_ms());
    (key, value)
}

fn event(i: u64, keys: u64, leagues: u64, table: &str, unwrapped: bool) -> (String, String) {
    let k = i % keys;
    let ts = now_ms();
    let odd = |salt: u64| {
        format!(
            "{}.{:03}",
            1 + (i * 7 + salt) % 9,
            (i * 13 + salt * 101) % 1000
        )
    };
    let key = format!(r#"{{"game_id":"g{k}"}}"#);
    let league = if leagues > 0 {
        format!(r#""league":"L{}","#, k % leagues)
    } else {
        String::new()
    };
    let after = format!(
        r#"{{"game_id":"g{k}",{league}"odd1":"{}","odd2":"{}","odd3":"{}","odd4":"{}","odd5":"{}","updated_at":"{ts}"}}"#,
        odd(1),
        odd(2),
        odd(3),
        odd(4),
        odd(5)
    );
    let value = if unwrapped {
        format!(
            r#"{}, "__op":"u","__table":"{table}","__source_ts_ms":{ts}}}"#,
            &after[..after.len() - 1]
        )
    } else {
        format!(
            r#"{{"before":null,"after":{after},"source":{{"connector":"cdc-gen","table":"{table}","ts_ms":{ts}}},"op":"u","ts_ms":{ts}}}"#
        )
    };
    (key, value)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(
            [&NewTopic::new(
                &a.topic,
                a.partitions.max(1),
                TopicReplication::Fixed(1),
            )],
            &opts,
        )
        .await?
    {
        if let Err((t, e)) = r {
            anyhow::ensure!(e == RDKafkaErrorCode::TopicAlreadyExists, "create {t}: {e}");
        }
    }
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("linger.ms", a.linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("producer")?;
    // connect and learn the topic's leaders before the clock starts: the rows carry their
    // creation time, so a paced run would otherwise time the producer's first connection too
    let client = producer.client();
    let topic = a.topic.clone();
    tokio::task::block_in_place(|| client.fetch_metadata(Some(&topic), Duration::from_secs(10)))
        .context("topic metadata")?;
    let table = a
        .topic
        .rsplit('.')
        .next()
        .unwrap_or("game_odds")
        .to_string();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.duration_secs);
    let mut sent = 0u64;
    let mut last_report = Instant::now();
    while sent < a.count && Instant::now() < deadline {
        if a.rate > 0 {
            // token bucket: never ahead of rate * elapsed
            let allowed = (started.elapsed().as_secs_f64() * a.rate as f64) as u64 + 1;
            if sent >= allowed {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
        }
        let (key, value) = if a.scores {
            score_event(sent, a.keys)
        } else {
            event(sent, a.keys, a.leagues, &table, a.unwrapped)
        };
        loop {
            match producer.send(BaseRecord::to(&a.topic).key(&key).payload(&value)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Err((e, _)) => anyhow::bail!("produce: {e}"),
            }
        }
        sent += 1;
        if last_report.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "cdc-gen: {sent} sent ({:.0}/s)",
                sent as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    producer.flush(Duration::from_secs(30))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"tool": "cdc-gen", "topic": a.topic, "sent": sent, "seconds": secs, "rate_per_sec": sent as f64 / secs})
    );
    anyhow::ensure!(sent > 0, "nothing sent");
    Ok(())
}
