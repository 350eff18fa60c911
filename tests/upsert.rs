//! `upsert` input topics (issue 15, inputs beyond Debezium): a plain KTable topic (value = the row
//! JSON, null = delete) declared in the views file becomes a live table, over several partitions,
//! beside a Debezium topic, with bad records dead-lettered; views files this version cannot serve
//! are refused at start.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::*;
use livetable::config::{Args, Config, TopicSelection};

fn record(key: &str, value: Option<Value>) -> FixtureRecord {
    FixtureRecord {
        key: Some(key.to_string()),
        value: value.map(|v| v.to_string()),
        headers: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_topic_is_a_live_table_with_updates_deletes_and_dead_letters() {
    let u = unique("ups");
    let topic = format!("{u}.prices");
    create_topic(&topic, 3).await;
    let dir = tempdir();
    let views = dir.path().join("views.toml");
    std::fs::write(
        &views,
        format!("[topics.\"{topic}\"]\nformat = \"upsert\"\nname = \"prices\"\n"),
    )
    .unwrap();
    // the Debezium selection does not name the upsert topic: the views file adds it
    let other = format!("{u}.public.odds");
    let mut c = test_config(TopicSelection::Names(vec![other]), dir.path(), &u);
    let from_file = Config::from_args(Args {
        views: Some(views.clone()),
        topics: Some(format!("^{u}\\.public\\..*")),
        ..Args::default()
    })
    .unwrap();
    assert!(
        from_file.topics.subscription()[0].contains(&format!("{u}\\.prices$")),
        "a pattern gets the upsert topic as an alternative: {:?}",
        from_file.topics
    );
    c.upsert = from_file.upsert.clone();
    c.topics = c.topics.with_topics(c.upsert.keys());

    let p = producer();
    let mut first = Vec::new();
    for i in 0..50 {
        first.push(record(
            &format!("S{i}"),
            Some(json!({"px": format!("{i}.5"), "venue": "X"})),
        ));
    }
    produce_keyed(&p, &topic, &first).await;
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "prices", 50).await;

    // updates, deletes (null values), and records that are not rows
    let mut more = Vec::new();
    for i in 0..50 {
        if i % 5 == 0 {
            more.push(record(&format!("S{i}"), None));
        } else {
            more.push(record(
                &format!("S{i}"),
                Some(json!({"px": format!("{i}.75")})),
            ));
        }
    }
    more.push(record("bad1", Some(json!([1, 2]))));
    more.push(FixtureRecord {
        key: Some("bad2".into()),
        value: Some("{not json".into()),
        headers: vec![],
    });
    produce_keyed(&p, &topic, &more).await;
    let rows = eventually(
        "the updates and deletes are applied",
        Duration::from_secs(60),
        || async {
            let (status, body) = get_json(&format!("{base}/api/tables/prices")).await;
            let rows = body["rows"].as_object().cloned()?;
            (status == 200 && rows.len() == 40 && rows["S1"]["px"] == "1.75").then_some(rows)
        },
    )
    .await;
    for i in 0..50 {
        let k = format!("S{i}");
        if i % 5 == 0 {
            assert!(!rows.contains_key(&k), "{k} deleted");
        } else {
            assert_eq!(rows[&k], json!({"px": format!("{i}.75")}), "{k}");
        }
    }
    let m = metrics_text(&base).await;
    let dead: f64 = m
        .lines()
        .filter(|l| l.starts_with("livetable_decode_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dead, 2.0, "two records dead-lettered:\n{m}");
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[test]
fn views_files_are_validated_at_start() {
    let dir = tempdir();
    let path = dir.path().join("views.toml");
    let load = |text: &str| {
        std::fs::write(&path, text).unwrap();
        Config::from_args(Args {
            views: Some(path.clone()),
            ..Args::default()
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    load("[topics.scores]\nformat = \"events\"\n").expect("an events topic");
    let e = load("[topics.\"odds.scores\"]\nformat = \"events\"\n").unwrap_err();
    assert!(
        e.contains("odds.scores") && e.contains("--topics"),
        "an events topic the table ingest would also read: {e}"
    );
    load(
        "[topics.scores]\nformat = \"upsert\"\n[views.best]\nfrom = \"scores\"\nmax_by = { key = [\"player\"], by = \"score\" }\n",
    )
    .expect("a view of an upsert table is computed");
    let e = load("[topics.x]\nformat = \"nope\"\n").unwrap_err();
    assert!(e.contains("views"), "{e}");
    assert!(load("[topics.\"a.b\"]\nformat = \"upsert\"\n").is_ok());
}
