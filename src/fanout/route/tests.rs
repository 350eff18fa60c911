use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::{json, Value};

use super::*;
use crate::cdc::decode::Op;
use crate::fanout::hub::Sent;
use crate::table::position::Position;
use crate::table::state::{AppliedChange, TableUpdate};
use crate::table::stored_row::StoredRow;

fn row(v: Value) -> StoredRow {
    Arc::new(v.as_object().cloned().unwrap_or_default()).into()
}

fn change(key: &str, before: Option<Value>, after: Option<Value>) -> AppliedChange {
    AppliedChange {
        key: key.into(),
        op: Op::Update,
        row: after.map(row),
        before: before.map(row),
        part: 0,
        off: 0,
        ts_ms: None,
        kafka_ts_ms: None,
        polled: None,
    }
}

fn update(useq: u64, changes: Vec<AppliedChange>) -> Arc<HubUpdate> {
    let update = TableUpdate {
        table: "t".into(),
        epoch: "".into(),
        useq,
        seq: useq,
        pos: Position::default(),
        changes,
    };
    let token: Arc<str> = update.token().to_string().into();
    Arc::new(HubUpdate::new(update, None, token))
}

/// Routes `u` as the hub does (weakly) and keeps it alive in `kept`, as the hub's buffer does.
fn route(router: &Mutex<Router>, u: Arc<HubUpdate>, all: bool, kept: &mut Vec<Arc<HubUpdate>>) {
    router.lock().unwrap().route(&Sent::of(&u), &u, all);
    kept.push(u);
}

/// Routes updates 1..=n, each an nba row's change, and returns them (as the hub's buffer keeps
/// them).
fn nba_updates(router: &Mutex<Router>, n: u64) -> Vec<Arc<HubUpdate>> {
    let mut kept = Vec::new();
    for useq in 1..=n {
        let u = update(
            useq,
            vec![change("g", None, Some(json!({"league": "nba"})))],
        );
        route(router, u, false, &mut kept);
    }
    kept
}

fn league(l: &str) -> RouteSpec {
    RouteSpec::Filter(Arc::new(
        Filter::parse(&format!("league = '{l}'")).expect("parses"),
    ))
}

/// The useqs a feed has ready now.
fn ready(f: &mut RoutedFeed) -> Vec<Result<u64, ()>> {
    let mut out = Vec::new();
    while let Some(Some(item)) = futures::FutureExt::now_or_never(f.next()) {
        out.push(item.map(|u| u.update.useq).map_err(|_| ()));
    }
    out
}

#[tokio::test]
async fn a_change_reaches_only_the_subscriptions_it_may_concern() {
    let router = Arc::new(Mutex::new(Router::default()));
    let mut nba = RoutedFeed::register(&router, league("nba"), 16);
    let mut nhl = RoutedFeed::register(&router, league("nhl"), 16);
    let mut keys = RoutedFeed::register(
        &router,
        RouteSpec::Keys(HashSet::from(["g7".to_string()])),
        16,
    );
    let mut kept = Vec::new();
    let mut send = |u: Arc<HubUpdate>| route(&router, u, false, &mut kept);
    // an nba row changes: nba only
    send(update(
        1,
        vec![change(
            "g1",
            Some(json!({"league": "nba", "odds": 1})),
            Some(json!({"league": "nba", "odds": 2})),
        )],
    ));
    // a row moves from nba to nhl: both (a move-out and a move-in)
    send(update(
        2,
        vec![change(
            "g1",
            Some(json!({"league": "nba"})),
            Some(json!({"league": "nhl"})),
        )],
    ));
    // key g7 in another league: the key subscription only
    send(update(
        3,
        vec![change("g7", None, Some(json!({"league": "mlb"})))],
    ));
    // an nhl row deleted, in one update with an mlb insert: nhl once
    send(update(
        4,
        vec![
            change("g2", Some(json!({"league": "nhl"})), None),
            change("g3", None, Some(json!({"league": "mlb"}))),
            change("g4", None, Some(json!({"league": "nhl"}))),
        ],
    ));
    assert_eq!(ready(&mut nba), vec![Ok(1), Ok(2)]);
    assert_eq!(ready(&mut nhl), vec![Ok(2), Ok(4)]);
    assert_eq!(ready(&mut keys), vec![Ok(3)]);
    // a new lineage reaches every one
    let mut kept = Vec::new();
    route(&router, update(5, vec![]), true, &mut kept);
    assert_eq!(ready(&mut nba), vec![Ok(5)]);
    assert_eq!(ready(&mut nhl), vec![Ok(5)]);
    assert_eq!(ready(&mut keys), vec![Ok(5)]);
}

#[tokio::test]
async fn a_full_queue_is_reported_as_lagged_and_a_dropped_feed_unregisters() {
    let router = Arc::new(Mutex::new(Router::default()));
    let mut slow = RoutedFeed::register(&router, league("nba"), 2);
    let other = RoutedFeed::register(&router, league("nba"), 2);
    assert_eq!(router.lock().unwrap().len(), 2);
    let _kept = nba_updates(&router, 3);
    // the third did not fit: the feed says it lagged before anything else
    assert_eq!(ready(&mut slow).first(), Some(&Err(())));
    drop(other);
    assert_eq!(router.lock().unwrap().len(), 1);
    drop(slow);
    assert!(router.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_update_the_hub_dropped_before_it_was_read_is_reported_as_lagged() {
    let router = Arc::new(Mutex::new(Router::default()));
    let mut feed = RoutedFeed::register(&router, league("nba"), 16);
    let mut kept = nba_updates(&router, 3);
    // the hub's byte budget dropped the oldest before the feed read it
    kept.remove(0);
    assert_eq!(ready(&mut feed), vec![Err(()), Ok(2), Ok(3)]);
}
