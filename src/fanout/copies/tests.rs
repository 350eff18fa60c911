use std::time::{Duration, Instant};

use super::*;

fn copies(max: usize) -> Copies {
    Copies::new(max, IntGauge::new("g", "g").unwrap())
}

#[tokio::test]
async fn a_copy_over_the_limit_waits_then_is_refused_and_a_place_given_back_is_taken() {
    let c = Arc::new(copies(1));
    let place = c.enter(WAIT).await.unwrap();
    assert_eq!(c.in_flight(), 1);
    let started = Instant::now();
    let busy = c.enter(Duration::from_millis(100)).await.err().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(busy.max, 1);
    assert!(busy.to_string().contains("--max-table-copies"), "{busy}");
    assert!(c.try_enter().is_none());
    let mut waiting = tokio::spawn({
        let c = c.clone();
        async move { c.enter(WAIT).await.is_ok() }
    });
    // it waits while the place is held (not a sleep: the wait itself is what is checked)
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut waiting)
            .await
            .is_err()
    );
    drop(place);
    assert!(waiting.await.unwrap());
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn no_limit_when_zero() {
    let c = copies(0);
    let places: Vec<Place> = futures::future::join_all((0..100).map(|_| c.enter(WAIT)))
        .await
        .into_iter()
        .map(|p| p.ok().unwrap())
        .collect();
    assert_eq!(c.in_flight(), 100);
    drop(places);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn only_snapshots_of_their_own_that_scan_or_are_rows_need_a_place() {
    let sel = |keys: Option<&[&str]>, filter: Option<&str>| {
        Selector::build(
            keys.map(|k| k.iter().map(|s| s.to_string()).collect()),
            filter,
            None,
        )
        .unwrap()
    };
    // whole table (shared), keys, an indexed equality: looked up or shared
    assert!(!needs_place(&sel(None, None), Format::Patch));
    assert!(!needs_place(&sel(Some(&["g1"]), None), Format::Patch));
    assert!(!needs_place(
        &sel(None, Some("league = 'EPL'")),
        Format::Patch
    ));
    assert!(!needs_place(
        &sel(Some(&["g1"]), Some("price > 2")),
        Format::Patch
    ));
    // a scan, or a projection of the whole table (not shared)
    assert!(needs_place(&sel(None, Some("price > 2")), Format::Patch));
    let projected = Selector::build(None, None, Some("price")).unwrap();
    assert!(needs_place(&projected, Format::Patch));
    assert!(needs_place(
        &sel(None, Some("price > 2 OR league = 'EPL'")),
        Format::Patch
    ));
    // rows: each client's own messages, unless looked up
    assert!(needs_place(&sel(None, None), Format::Rows));
    assert!(needs_place(&sel(None, Some("price > 2")), Format::Rows));
    assert!(!needs_place(&sel(Some(&["g1"]), None), Format::Rows));
    assert!(!needs_place(
        &sel(None, Some("league = 'EPL'")),
        Format::Rows
    ));
}
