//! The core pipeline against the real local broker: Debezium captures in, HTTP API and changelog
//! topic out; late topics, dead letters, restart and restore.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use livetable::config::TopicSelection;
use serde_json::{json, Value};

use common::{start_service as start, test_config as config};

/// The final rows of the captured workload, with odds as exact decimal strings.
fn final_rows_exact(odd5_g6: &str) -> Value {
    let row = |id: &str, o: [Value; 5], ts: &str| json!({"game_id": id, "odd1": o[0], "odd2": o[1], "odd3": o[2], "odd4": o[3], "odd5": o[4], "updated_at": ts});
    json!({
        "g1": row("g1", [json!("1.750"), json!("2.250"), json!("3.125"), json!("4.000"), json!("5.5")], "2026-11-21T22:35:56.913545Z"),
        "g2": row("g2", [json!("1.100"), json!("1.300"), json!("1.300"), json!("1.400"), json!("1.5")], "2026-11-21T22:35:56.913870Z"),
        "g5": row("g5", [Value::Null, json!("1.000"), json!("1.000"), json!("1.000"), json!("-0.5")], "2026-11-21T22:35:56.914217Z"),
        "g6": row("g6", [json!("2.000"), json!("3.100"), json!("4.000"), json!("5.000"), json!(odd5_g6)], "2026-11-21T22:35:56.914261Z"),
    })
}

/// Folds a changelog topic: last record per key wins, tombstones delete, fences are not rows.
fn fold_changelog(records: &[ReadRecord]) -> Value {
    let mut m = BTreeMap::new();
    for (k, v, h) in records {
        if h.iter().any(|(name, _)| name == "livetable.fence") {
            continue;
        }
        let k = k.clone().unwrap();
        match v {
            Some(v) => {
                m.insert(k, serde_json::from_str::<Value>(v).unwrap());
            }
            None => {
                m.remove(&k);
            }
        }
    }
    serde_json::to_value(m).unwrap()
}

/// Waits until `topic`'s partitions `parts`, folded, hold `expected`.
async fn changelog_equals(topic: &str, parts: &[i32], expected: &Value) {
    let topic = topic.to_string();
    let parts = parts.to_vec();
    eventually(
        &format!("changelog {topic} holds the final rows"),
        Duration::from_secs(30),
        || {
            let (topic, parts) = (topic.clone(), parts.clone());
            async move {
                let records = tokio::task::spawn_blocking(move || {
                    read_partitions(&topic, &parts, usize::MAX, Duration::from_millis(1500))
                })
                .await
                .unwrap();
                (fold_changelog(&records) == *expected).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_stream_materialises_the_final_rows() {
    let cases: &[(&str, Option<Value>)] = &[
        ("pg_b_envelope_schema.jsonl", Some(final_rows_exact("6"))),
        (
            "pg_f_decimal_string.jsonl",
            Some({
                let mut v = final_rows_exact("6.0");
                v["g5"]["odd5"] = json!("-0.5");
                v
            }),
        ),
        ("pg_a_envelope_noschema.jsonl", None),
        ("pg_c_unwrap_rewrite.jsonl", None),
        ("pg_c_unwrap_tombstone.jsonl", None),
        ("mysql_on_mariadb_seedlike_unwrap_route.jsonl", None),
    ];
    let producer = producer();
    let mut running = Vec::new();
    for (file, expected) in cases {
        let u = unique("fx");
        let topic = format!("{u}.public.game_odds");
        create_topic(&topic, 1).await;
        produce(&producer, &topic, &load_fixture(file)).await;
        let dir = tempdir();
        let c = config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
        let prefix = c.changelog_prefix.clone();
        let (svc, base) = start(c).await;
        running.push((file, expected.clone(), svc, base, dir, prefix));
    }
    for (file, expected, svc, base, _dir, prefix) in running {
        // 14 or 12 records; the redundant tombstones after deletes change nothing: 12 changes.
        let body = table_at_seq(&base, "game_odds", 12).await;
        let rows = &body["rows"];
        assert_eq!(
            rows.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["g1", "g2", "g5", "g6"],
            "{file}"
        );
        if let Some(expected) = &expected {
            assert_eq!(rows, expected, "{file}");
        }
        assert_eq!(rows["g1"]["game_id"], "g1");
        changelog_equals(&format!("{prefix}game_odds"), &[0], rows).await;
        let (status, row) = get_json(&format!("{base}/api/tables/game_odds/rows/g6")).await;
        assert_eq!((status, &row), (200, &rows["g6"]), "{file}");
        let (status, err) = get_json(&format!("{base}/api/tables/game_odds/rows/g3")).await;
        assert_eq!(status, 404, "{file}: deleted row");
        assert!(err["error"].as_str().unwrap().contains("g3"));
        let (status, _) = get_json(&format!("{base}/api/tables/nope")).await;
        assert_eq!(status, 404);
        let (_, list) = get_json(&format!("{base}/api/tables")).await;
        assert_eq!(list["tables"][0]["rows"], 4);
        let (status, _) = get_json(&format!("{base}/readyz")).await;
        assert_eq!(status, 200, "{file}: ready once caught up");
        svc.shutdown();
        svc.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_after_start_is_consumed() {
    let u = unique("late");
    let dir = tempdir();
    let c = config(
        TopicSelection::Pattern(format!(r"^{u}\..*")),
        dir.path(),
        &u,
    );
    let (svc, base) = start(c).await;
    eventually(
        "ready with no topics yet",
        Duration::from_secs(30),
        || async { (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(()) },
    )
    .await;
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    produce(
        &producer(),
        &topic,
        &load_fixture("pg_f_decimal_string.jsonl"),
    )
    .await;
    let body = table_at_seq(&base, "game_odds", 12).await;
    assert_eq!(body["rows"]["g6"]["odd2"], "3.100");
    // a second table appears the same way
    let topic2 = format!("{u}.public.other_odds");
    create_topic(&topic2, 1).await;
    let rec = FixtureRecord {
        key: Some(r#"{"id":"x"}"#.into()),
        value: Some(r#"{"id":"x","v":1,"__op":"c","__table":"other_odds"}"#.into()),
        headers: vec![],
    };
    produce(&producer(), &topic2, &[rec]).await;
    let body = table_at_seq(&base, "other_odds", 1).await;
    assert_eq!(body["rows"]["x"], json!({"id": "x", "v": 1}));
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// A record of the game_odds stream whose value is `v` as it is (malformed on purpose).
fn malformed(v: &str) -> FixtureRecord {
    FixtureRecord {
        key: Some(r#"{"game_id":"gx"}"#.into()),
        value: Some(v.into()),
        headers: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_is_dead_lettered_and_the_stream_goes_on() {
    let u = unique("dlq");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    let good = load_fixture("pg_f_decimal_string.jsonl");
    let bad = malformed;
    let stream = vec![
        good[0].clone(),
        bad("{not json"),
        bad(r#"{"op":"c","after":null,"source":{}}"#),
        good[1].clone(),
    ];
    produce(&producer(), &topic, &stream).await;
    let dir = tempdir();
    let c = config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let dlq = c.dlq_topic.clone();
    let (svc, base) = start(c).await;
    let body = table_at_seq(&base, "game_odds", 2).await;
    assert_eq!(body["rows"].as_object().unwrap().len(), 2);
    let letters = tokio::task::spawn_blocking(move || read_topic(&dlq, 2, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "both bad records are in the DLQ");
    let h = |i: usize, k: &str| {
        letters[i]
            .2
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(
        letters[0].1.as_deref(),
        Some("{not json"),
        "payload kept as is"
    );
    assert_eq!(
        (
            h(0, "livetable.dlq.reason"),
            h(0, "livetable.dlq.offset"),
            h(0, "livetable.dlq.topic")
        ),
        ("invalid_json".into(), "1".into(), topic.clone())
    );
    assert_eq!(h(1, "livetable.dlq.reason"), "bad_shape");
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains("livetable_dead_lettered_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains(r#"livetable_decode_errors_total{reason="invalid_json"} 1"#));
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_stream_and_restore_from_the_changelog() {
    let u = unique("rs");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    let records = load_fixture("pg_f_decimal_string.jsonl");
    let producer = producer();
    produce(&producer, &topic, &records[..7]).await;
    let dir = tempdir();
    let c = config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);

    // first run: 7 records = 7 changes
    let (svc, base) = start(c.clone()).await;
    let first = table_at_seq(&base, "game_odds", 7).await;
    svc.shutdown();
    svc.wait().await.unwrap();

    // the rest arrives while livetable is down; restart on the same data directory
    produce(&producer, &topic, &records[7..]).await;
    let (svc, base) = start(c.clone()).await;
    let after_restart = table_at_seq(&base, "game_odds", 12).await;
    assert_eq!(
        after_restart["epoch"], first["epoch"],
        "same lineage after a restart"
    );
    svc.shutdown();
    svc.wait().await.unwrap();

    // a run without restart over the same stream gives the same seq and rows
    let u2 = unique("rs-ref");
    let dir2 = tempdir();
    let (svc, base) = start(config(
        TopicSelection::Names(vec![topic.clone()]),
        dir2.path(),
        &u2,
    ))
    .await;
    let reference = table_at_seq(&base, "game_odds", 12).await;
    assert_eq!(after_restart["rows"], reference["rows"]);
    svc.shutdown();
    svc.wait().await.unwrap();

    // once more on the first data directory, with nothing new: every row is loaded from the store
    // (held as its JSON) and is answered one by one as it was
    let (svc, base) = start(c.clone()).await;
    let loaded = table_at_seq(&base, "game_odds", 12).await;
    assert_eq!(loaded["rows"], reference["rows"]);
    // ready (the group joined) before the stop: a member that stops mid-join holds up the
    // group's next join on this broker until its session times out
    eventually("ready on the store", Duration::from_secs(30), || async {
        (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    for (k, row) in reference["rows"].as_object().unwrap() {
        let (status, got) = get_json(&format!("{base}/api/tables/game_odds/rows/{k}")).await;
        assert_eq!((status, &got), (200, row), "row {k}");
    }
    svc.shutdown();
    svc.wait().await.unwrap();

    // lose the data directory: the state comes back from the changelog, then the stream goes on
    drop(dir);
    let dir = tempdir();
    let mut c = c;
    c.data_dir = dir.path().to_path_buf();
    let (svc, base) = start(c.clone()).await;
    let restored = table_at_seq(&base, "game_odds", 12).await;
    // nothing is left to consume (the offsets were committed): ready without any new record
    eventually(
        "ready after the restore",
        Duration::from_secs(30),
        || async { (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(()) },
    )
    .await;
    assert_eq!(restored["rows"], reference["rows"]);
    assert_eq!(
        restored["epoch"], first["epoch"],
        "the lineage is the deployment's: a restore keeps it (positions are Kafka offsets)"
    );
    let offsets = |v: &Value| {
        v["pos"]
            .as_str()
            .unwrap()
            .split('~')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(offsets(&restored), offsets(&reference), "the same position");
    let extra = FixtureRecord {
        key: Some(r#"{"game_id":"g7"}"#.into()),
        value: Some(r#"{"before":null,"after":{"game_id":"g7","odd1":"9.000"},"source":{"table":"game_odds","ts_ms":1},"op":"c"}"#.into()),
        headers: vec![],
    };
    produce(&producer, &topic, &[extra]).await;
    let next = table_at_seq(&base, "game_odds", 13).await;
    assert_eq!(next["rows"]["g7"]["odd1"], "9.000");
    assert_eq!(
        next["rows"].as_object().unwrap().len(),
        5,
        "nothing applied twice, nothing lost"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// `%XX` for every byte of a path segment but ASCII letters and digits.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_whose_names_kafka_does_not_accept_keep_changelogs_of_their_own() {
    // each pair would share one changelog topic if characters were only replaced by `_`
    let tables = ["a b", "a_b", "赔率", "比赛"];
    let u = unique("names");
    let producer = producer();
    let mut topics = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let topic = format!("{u}.public.t{i}");
        create_topic(&topic, 2).await;
        let records: Vec<FixtureRecord> = (1..=3)
            .map(|k| FixtureRecord {
                key: Some(format!(r#"{{"id":"{k}"}}"#)),
                value: Some(
                    json!({"before": null, "after": {"id": k.to_string(), "of": table},
                           "source": {"table": table, "ts_ms": 1}, "op": "c"})
                    .to_string(),
                ),
                headers: vec![],
            })
            .collect();
        produce_keyed(&producer, &topic, &records).await;
        topics.push(topic);
    }
    let expected = |table: &str| {
        json!({
            "1": {"id": "1", "of": table},
            "2": {"id": "2", "of": table},
            "3": {"id": "3", "of": table},
        })
    };
    let dir = tempdir();
    let c = config(TopicSelection::Names(topics.clone()), dir.path(), &u);
    let (svc, base) = start(c.clone()).await;
    for table in tables {
        let got = table_at_seq(&base, &path_segment(table), 3).await;
        assert_eq!(got["rows"], expected(table), "table `{table}`");
    }
    // every table's changelog topic is its own and holds its rows only
    let mut changelogs = std::collections::HashSet::new();
    for table in tables {
        let changelog = livetable::table::changelog::topic_name(&c.changelog_prefix, table);
        assert!(
            changelogs.insert(changelog.clone()),
            "{changelog} is shared"
        );
        changelog_equals(&changelog, &[0, 1], &expected(table)).await;
    }
    eventually("ready", Duration::from_secs(30), || async {
        (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    svc.shutdown();
    svc.wait().await.unwrap();

    // an empty data directory: each table comes back from its own changelog
    let empty = tempdir();
    let mut c = c;
    c.data_dir = empty.path().to_path_buf();
    let (svc, base) = start(c).await;
    for table in tables {
        let got = table_at_seq(&base, &path_segment(table), 3).await;
        assert_eq!(got["rows"], expected(table), "table `{table}` restored");
    }
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_deleted_while_running_is_created_again() {
    let u = unique("dlq-del");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    let good = load_fixture("pg_f_decimal_string.jsonl");
    let bad = malformed;
    let producer = producer();
    produce(&producer, &topic, &[good[0].clone(), bad("{first")]).await;
    let dir = tempdir();
    let c = config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let dlq = c.dlq_topic.clone();
    let (svc, base) = start(c.clone()).await;
    table_at_seq(&base, "game_odds", 1).await;
    let letters = {
        let dlq = dlq.clone();
        tokio::task::spawn_blocking(move || read_topic(&dlq, 1, Duration::from_secs(20)))
            .await
            .unwrap()
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1.as_deref(), Some("{first"));

    delete_topic(&dlq).await;
    // two letters in one batch: both sent before the first is found gone
    produce(
        &producer,
        &topic,
        &[bad("{second"), bad("{third"), good[1].clone()],
    )
    .await;
    table_at_seq(&base, "game_odds", 2).await;
    // the letter lands in the topic created again (a retry while the topic is created again may
    // land it twice: dead letters are produced at least once), and the checkpoint behind it goes
    // on: the input offsets are committed, so a restart applies and produces nothing again
    let read_all = || {
        let dlq = dlq.clone();
        tokio::task::spawn_blocking(move || read_topic(&dlq, usize::MAX, Duration::from_secs(5)))
    };
    let letters = eventually(
        "the dead-letter topic holds the new letter",
        Duration::from_secs(30),
        || async {
            let letters = read_all().await.unwrap();
            let values: std::collections::BTreeSet<Option<&str>> =
                letters.iter().map(|l| l.1.as_deref()).collect();
            (values == [Some("{second"), Some("{third")].into()).then_some(letters)
        },
    )
    .await;
    eventually("ready", Duration::from_secs(30), || async {
        (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains("livetable_dead_letters_dropped_total 0"),
        "no letter dropped by the node that met the deletion: {metrics}"
    );
    svc.shutdown();
    tokio::time::timeout(Duration::from_secs(30), svc.wait())
        .await
        .expect("a clean stop: nothing waits for the dead-letter topic")
        .unwrap();
    // (counted once stopped: a retry in flight may have landed a copy after the read above)
    let stopped = read_all().await.unwrap();
    assert!(stopped.len() >= letters.len());
    let (svc, base) = start(c).await;
    let body = table_at_seq(&base, "game_odds", 2).await;
    assert_eq!(body["rows"].as_object().unwrap().len(), 2);
    eventually(
        "ready after the restart",
        Duration::from_secs(30),
        || async { (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(()) },
    )
    .await;
    let again = read_all().await.unwrap();
    assert_eq!(
        again.len(),
        stopped.len(),
        "no letter produced again after the restart: {again:?}"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}
