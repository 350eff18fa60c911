//! Deletes and keys (issue 12, hole 6), against the real broker: a tombstone deletes the row its
//! key has on that topic whatever the topic is named, an update that changes the key column
//! removes the old row, a delete that carries only the primary key (PostgreSQL's default replica
//! identity) still finds its row under `--key-columns`, and `public.users` and `auth.users` stay
//! two tables.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use livetable::config::{KeyColumns, TopicSelection};
use serde_json::Value;

fn envelope(schema: &str, table: &str, op: &str, before: &str, after: &str) -> String {
    format!(
        r#"{{"before":{before},"after":{after},"op":"{op}","source":{{"schema":"{schema}","table":"{table}","ts_ms":1}}}}"#
    )
}

fn record(key: Option<String>, value: Option<String>) -> FixtureRecord {
    FixtureRecord {
        key,
        value,
        headers: vec![],
    }
}

async fn keys_of(base: &str, table: &str) -> Option<BTreeSet<String>> {
    let (status, body) = get_json(&format!("{base}/api/tables/{table}")).await;
    if status != 200 {
        return None;
    }
    Some(body["rows"].as_object()?.keys().cloned().collect())
}

async fn tables(base: &str) -> BTreeSet<String> {
    let (_, body) = get_json(&format!("{base}/api/tables")).await;
    body["tables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_keys(base: &str, table: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let base = base.to_string();
    let table = table.to_string();
    eventually(
        &format!("{table} holds exactly {want:?}"),
        Duration::from_secs(60),
        || {
            let (base, table, want) = (base.clone(), table.clone(), want.clone());
            async move { (keys_of(&base, &table).await == Some(want)).then_some(()) }
        },
    )
    .await;
}

/// A topic routed to a name that is not the table's (Debezium's RegexRouter): its tombstones
/// used to land in a ghost table named after the topic, and the row stayed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_on_a_routed_topic_deletes_the_row_of_its_table() {
    let u = unique("route");
    let topic = format!("{u}.routed_items");
    create_topic(&topic, 4).await;
    let mut records = Vec::new();
    for id in 1..=8 {
        records.push(record(
            Some(format!(r#"{{"id":{id}}}"#)),
            Some(envelope(
                "public",
                "items",
                "c",
                "null",
                &format!(r#"{{"id":{id},"v":"a"}}"#),
            )),
        ));
    }
    // Debezium's delete: the event, then the tombstone (no value, so no table name)
    for id in [2, 5] {
        records.push(record(
            Some(format!(r#"{{"id":{id}}}"#)),
            Some(envelope(
                "public",
                "items",
                "d",
                &format!(r#"{{"id":{id},"v":"a"}}"#),
                "null",
            )),
        ));
        records.push(record(Some(format!(r#"{{"id":{id}}}"#)), None));
    }
    // a tombstone alone (the delete event compacted away) for key 7
    records.push(record(Some(r#"{"id":7}"#.into()), None));
    produce_keyed(&producer(), &topic, &records).await;

    let dir = tempdir();
    let (svc, base) = start_service(test_config(
        TopicSelection::Names(vec![topic.clone()]),
        dir.path(),
        &u,
    ))
    .await;
    wait_keys(&base, "items", &["1", "3", "4", "6", "8"]).await;
    assert_eq!(
        tables(&base).await,
        BTreeSet::from(["items".to_string()]),
        "no table named after the topic appeared"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// With `--key-columns`, an update that changes the key column used to leave the old row; a
/// delete under PostgreSQL's default replica identity (only the primary key in `before`) used to
/// name a key that no row had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_column_changes_and_primary_key_only_deletes_under_key_columns() {
    let u = unique("keycol");
    let topic = format!("{u}.public.games");
    create_topic(&topic, 3).await;
    let row = |id: u32, code: &str, v: u32| format!(r#"{{"id":{id},"code":"{code}","v":{v}}}"#);
    let key = |id: u32| Some(format!(r#"{{"id":{id}}}"#));
    let mut records = Vec::new();
    for (id, code) in [(1, "A"), (2, "B"), (3, "C"), (4, "D")] {
        records.push(record(
            key(id),
            Some(envelope("public", "games", "c", "null", &row(id, code, 0))),
        ));
    }
    // REPLICA IDENTITY FULL: `before` names the old code
    records.push(record(
        key(1),
        Some(envelope(
            "public",
            "games",
            "u",
            &row(1, "A", 0),
            &row(1, "A2", 1),
        )),
    ));
    // default replica identity: `before` holds only the primary key
    records.push(record(
        key(3),
        Some(envelope("public", "games", "d", r#"{"id":3}"#, "null")),
    ));
    records.push(record(key(3), None));
    // a tombstone alone for id 4, then a delete of a key no row has (nothing happens)
    records.push(record(key(4), None));
    records.push(record(
        key(9),
        Some(envelope("public", "games", "d", r#"{"id":9}"#, "null")),
    ));
    produce_keyed(&producer(), &topic, &records).await;

    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.key_columns = KeyColumns::parse("games=code").unwrap();
    let (svc, base) = start_service(c).await;
    wait_keys(&base, "games", &["A2", "B"]).await;
    let (_, body) = get_json(&format!("{base}/api/tables/games")).await;
    assert_eq!(body["rows"]["A2"]["v"], Value::from(1));
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// `public.users` and `auth.users` used to merge into one table `users`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_the_same_name_in_two_schemas_stay_apart() {
    let u = unique("schemas");
    let public = format!("{u}.public.users");
    let auth = format!("{u}.auth.users");
    create_topic(&public, 2).await;
    create_topic(&auth, 2).await;
    let user = |schema: &str, id: u32| {
        record(
            Some(format!(r#"{{"id":{id}}}"#)),
            Some(envelope(
                schema,
                "users",
                "c",
                "null",
                &format!(r#"{{"id":{id},"from":"{schema}"}}"#),
            )),
        )
    };
    produce_keyed(
        &producer(),
        &public,
        &[user("public", 1), user("public", 2)],
    )
    .await;

    let dir = tempdir();
    let (svc, base) = start_service(test_config(
        TopicSelection::Names(vec![public.clone(), auth.clone()]),
        dir.path(),
        &u,
    ))
    .await;
    wait_keys(&base, "users", &["1", "2"]).await;
    produce_keyed(
        &producer(),
        &auth,
        &[user("auth", 1), user("auth", 3), user("auth", 4)],
    )
    .await;
    wait_keys(&base, "auth.users", &["1", "3", "4"]).await;
    // the first table keeps its short name and its own rows
    wait_keys(&base, "users", &["1", "2"]).await;
    let (_, body) = get_json(&format!("{base}/api/tables/users")).await;
    assert_eq!(body["rows"]["1"]["from"], "public");
    let (_, body) = get_json(&format!("{base}/api/tables/auth.users")).await;
    assert_eq!(body["rows"]["1"]["from"], "auth");
    svc.shutdown();
    svc.wait().await.unwrap();
}
