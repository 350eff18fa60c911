//! The durability holes of issue 12, each with the test that shows it closed: permanent produce
//! errors do not wedge the pipeline, an input position that no longer exists is detected, a
//! restore is cut short only when it stops progressing, shutdown ends in time whatever the broker
//! does, and a client's position survives an unclean stop.

mod common;

use std::time::Duration;

use common::procs::api_state;
use common::*;
use livetable::config::TopicSelection;

async fn metric(base: &str, name: &str) -> f64 {
    metric_value(&metrics_text(base).await, name).unwrap_or(0.0)
}

/// Issue 12 hole 4: a row the changelog can never take (here: over the producer's message size,
/// as a broker's limit or an authorisation error would be) used to wedge every checkpoint behind
/// it while /readyz said 200. Now it is dead-lettered, counted, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_changelog_refuses_is_dead_lettered_and_nothing_wedges() {
    let u = unique("rej");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 1).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.kafka_props
        .push(("message.max.bytes".into(), "200000".into()));
    let dlq = c.dlq_topic.clone();
    let (svc, base) = start_service(c).await;
    let p = producer();
    produce(&p, &topic, &[n_update("t", "a", 1, 10)]).await;
    table_at_seq(&base, "t", 1).await;
    // 500 KB: accepted (under --max-record-bytes) but over the producer's limit for the changelog
    produce(&p, &topic, &[n_update("t", "big", 2, 500_000)]).await;
    for n in 3..=50 {
        produce(&p, &topic, &[n_update("t", "a", n, 10)]).await;
    }
    // the table goes on: nothing waits behind the refused row
    eventually(
        "the stream goes on after the refused row",
        Duration::from_secs(30),
        || async {
            api_state(&base, "t")
                .await
                .filter(|s| s.get("a") == Some(&50))
                .map(|_| ())
        },
    )
    .await;
    eventually(
        "the refusal is counted",
        Duration::from_secs(30),
        || async {
            (metric(&base, "livetable_changelog_rejected_total").await >= 1.0).then_some(())
        },
    )
    .await;
    eventually("ready again", Duration::from_secs(30), || async {
        (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    let commits = metric(&base, "livetable_last_commit_timestamp_seconds").await;
    assert!(commits > 0.0, "offsets are committed again");
    let letters = read_topic(&dlq, usize::MAX, Duration::from_secs(3));
    let reasons: Vec<String> = letters
        .iter()
        .flat_map(|(_, _, h)| {
            h.iter()
                .filter(|(k, _)| k == "livetable.dlq.reason")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r == "changelog_rejected"),
        "{reasons:?}"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Issue 12 hole 5: an input position that no longer exists (here: the topic was deleted and
/// created again while livetable was down) used to reset to `earliest` silently. Now it is
/// detected, counted and logged, and the new records are applied, not taken for old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_that_no_longer_exists_is_detected_and_counted() {
    let u = unique("oor");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 1).await;
    let p = producer();
    let first: Vec<FixtureRecord> = (0..10)
        .map(|i| n_update("t", &format!("k{i}"), i, 1))
        .collect();
    produce(&p, &topic, &first).await;
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c.clone()).await;
    table_at_seq(&base, "t", 10).await;
    svc.shutdown();
    svc.wait().await.unwrap();

    // the topic is recreated with fewer records than the stored position
    delete_topic(&topic).await;
    create_topic(&topic, 1).await;
    let again: Vec<FixtureRecord> = (0..3)
        .map(|i| n_update("t", &format!("k{i}"), 100 + i, 1))
        .collect();
    produce(&p, &topic, &again).await;
    let (svc, base) = start_service(c).await;
    eventually(
        "the new records are applied",
        Duration::from_secs(60),
        || async {
            let s = api_state(&base, "t").await?;
            (s.get("k0") == Some(&100) && s.get("k2") == Some(&102)).then_some(())
        },
    )
    .await;
    let m = metrics_text(&base).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("livetable_offset_resets_total{") && l.ends_with(" 1")),
        "the reset is counted:\n{}",
        m.lines()
            .filter(|l| l.contains("offset_resets"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// The input topic deleted and created again while the node was down, the new topic already past
/// the stored positions (a connector reset that snapshots the database again): every position
/// still exists, so the broker reports nothing, and the node used to go on from there, skipping
/// the new topic's first records (here: every key's new value). It now reads again the record
/// each position follows, finds another one there, counts and logs it, and reads the partitions
/// from their beginning. A restart without a new topic reads the same records again and resets
/// nothing. Two partitions, the livetable binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_past_the_stored_position_is_read_from_its_beginning() {
    use common::procs::{until_api_state, Node};
    use std::collections::BTreeMap;

    let u = unique("again");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 2).await;
    let p = producer();
    let keys = |prefix: &str, n: usize, value: usize| -> Vec<FixtureRecord> {
        (0..n)
            .map(|k| n_update("t", &format!("{prefix}{k}"), value, 1))
            .collect()
    };
    let mut want = BTreeMap::new();
    for round in 0..3 {
        produce_keyed(&p, &topic, &keys("k", 20, round)).await;
    }
    for k in 0..20 {
        want.insert(format!("k{k}"), 2);
    }
    let (logs, dir) = (tempdir(), tempdir());
    let mut node = Node::spawn(
        "node",
        "all",
        &format!("g-{u}"),
        &topic,
        dir.path(),
        logs.path(),
        &[],
    );
    let what = format!("the table (log {})", node.log.display());
    node.wait_ready(Duration::from_secs(90)).await;
    until_api_state(&node.base, "t", &want, Duration::from_secs(90), &what).await;
    let sum = |text: &str, prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let resets = |text: String| sum(&text, "livetable_offset_resets_total{");

    // the same topic: each partition's last applied record is read again and found the same
    // (counted as a duplicate), nothing is reset
    node.stop();
    let before = node.log_text().len();
    node.start();
    node.wait_ready(Duration::from_secs(90)).await;
    until_api_state(&node.base, "t", &want, Duration::from_secs(90), &what).await;
    let text = eventually(
        "both partitions' last records read again",
        Duration::from_secs(30),
        || async {
            let text = metrics_text(&node.base).await;
            let duplicates = sum(
                &text,
                "livetable_records_consumed_total{outcome=\"duplicate\"",
            );
            (duplicates >= 2.0).then_some(text)
        },
    )
    .await;
    assert_eq!(resets(text), 0.0, "{what}");
    let log = node.log_text();
    assert_eq!(
        log[before..].matches("reads_again=Some(").count(),
        2,
        "{what}"
    );
    node.stop();

    // every key's new value first, then more records than the old topic had in each partition
    delete_topic(&topic).await;
    create_topic(&topic, 2).await;
    produce_keyed(&p, &topic, &keys("k", 20, 100)).await;
    produce_keyed(&p, &topic, &keys("f", 80, 7)).await;
    for k in 0..20 {
        want.insert(format!("k{k}"), 100);
    }
    for k in 0..80 {
        want.insert(format!("f{k}"), 7);
    }
    node.start();
    node.wait_ready(Duration::from_secs(90)).await;
    until_api_state(&node.base, "t", &want, Duration::from_secs(90), &what).await;
    assert_eq!(
        resets(metrics_text(&node.base).await),
        2.0,
        "both partitions: {what}"
    );
    assert_eq!(
        node.log_text()
            .matches("is not the one applied there: the topic was deleted and created again")
            .count(),
        2,
        "both partitions found by the record read again: {what}"
    );
    node.stop();
}

/// The input topic deleted and created again while its owner was down, with fewer records than
/// the stored positions: the owner reads it from its beginning and applies the new records. Its
/// changelog records of the new offsets used to be taken for older ones by every other node's copy
/// of the slice (their rows carry the old, higher offsets), which kept the old values for good: a
/// gateway served `2` where the owner served `100`. The owner now gives the slice's rows offset -1
/// and writes an `input-reset` fence before the new records; readers do the same there. Keys the
/// new topic does not mention keep their rows, and their later changes (at offsets below the old
/// ones) apply everywhere. Checked on a gateway that runs throughout, after its kill -9, and on a
/// second node that reads the changelog from its beginning and takes a partition over (whose
/// replay used to produce the old rows again with their old offsets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_copy_of_a_slice_takes_the_new_offsets_of_an_input_created_again() {
    use common::procs::{until_api_state, Node};
    use std::collections::BTreeMap;

    let u = unique("reset");
    let topic = format!("{u}.public.t");
    let group = format!("g-{u}");
    create_topic(&topic, 2).await;
    let p = producer();
    let mut want = BTreeMap::new();
    let write = |keys: std::ops::Range<usize>, value: usize, want: &mut BTreeMap<String, i64>| {
        for k in keys.clone() {
            want.insert(format!("k{k}"), value as i64);
        }
        keys.map(|k| n_update("t", &format!("k{k}"), value, 1))
            .collect::<Vec<FixtureRecord>>()
    };
    for round in 0..3 {
        produce_keyed(&p, &topic, &write(0..30, round, &mut want)).await;
    }
    let (logs, owner_dir, gw_dir, b_dir) = (tempdir(), tempdir(), tempdir(), tempdir());
    let node = |name: &str, role: &str, dir: &std::path::Path| {
        Node::spawn(name, role, &group, &topic, dir, logs.path(), &[])
    };
    let mut owner = node("owner", "all", owner_dir.path());
    let mut gw = node("gw", "gateway", gw_dir.path());
    owner.wait_ready(Duration::from_secs(90)).await;
    gw.wait_ready(Duration::from_secs(90)).await;
    let converged = |n: &Node, want: &BTreeMap<String, i64>, what: &str| {
        let what = format!("{what} on {} (log {})", n.name, n.log.display());
        let (base, want) = (n.base.clone(), want.clone());
        async move { until_api_state(&base, "t", &want, Duration::from_secs(90), &what).await }
    };
    converged(&owner, &want, "the first rows").await;
    converged(&gw, &want, "the first rows").await;

    // about 45 records per partition, then a new topic of about 10 per partition that does not
    // mention k20..k29 (they stay at 2); the gateway runs on (it does not read the input topic,
    // whose deletion under a consumer crashes Tansu's clients)
    owner.stop();
    delete_topic(&topic).await;
    create_topic(&topic, 2).await;
    produce_keyed(&p, &topic, &write(0..20, 100, &mut want)).await;
    owner.start();
    owner.wait_ready(Duration::from_secs(90)).await;
    converged(&owner, &want, "the new topic's records").await;
    converged(&gw, &want, "the new topic's records, followed").await;
    let log = gw.log_text();
    for part in 0..2 {
        assert!(
            log.lines()
                .any(|l| l.contains("says its input partition started over")
                    && l.contains(&format!(" partition={part} "))),
            "partition {part}'s fence folded (log {})",
            gw.log.display()
        );
    }
    // the new offsets go on, older than the old rows' offsets still
    produce_keyed(&p, &topic, &write(0..10, 101, &mut want)).await;
    converged(&gw, &want, "later records of the new topic").await;

    // the reset is stored with the rows: a kill -9 keeps them together
    gw.kill9();
    gw.start();
    gw.wait_ready(Duration::from_secs(90)).await;
    produce_keyed(&p, &topic, &write(10..20, 102, &mut want)).await;
    converged(&gw, &want, "after its kill -9").await;

    // a second node reads the changelog from its beginning (old offsets, the fence, new offsets)
    // and takes a partition over; then the keys the new topic never mentioned change, at offsets
    // below their rows' old ones
    let mut b = node("b", "all", b_dir.path());
    b.wait_ready(Duration::from_secs(90)).await;
    converged(&b, &want, "read from the changelog's beginning").await;
    produce_keyed(&p, &topic, &write(20..30, 104, &mut want)).await;
    produce_keyed(&p, &topic, &write(0..20, 103, &mut want)).await;
    for n in [&owner, &gw, &b] {
        converged(n, &want, "after a take-over").await;
    }
    let log = b.log_text();
    assert!(
        log.contains("slice taken over")
            && (log.contains("(an input-reset fence)")
                || log.contains("says its input partition started over")),
        "b took a partition over and read the fence, as its follower or its restore (log {})",
        b.log.display()
    );
    for n in [&mut owner, &mut gw, &mut b] {
        n.stop();
    }
}

/// Issue 12 hole 8: shutdown ends within the grace period in every state: live WebSocket clients
/// get the 1001 close, SSE streams end, and a broker that is gone does not hold anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_in_time_with_clients_attached_and_with_the_broker_gone() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    // clients attached
    let u = unique("down");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 1).await;
    produce(&producer(), &topic, &[n_update("t", "a", 1, 1)]).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.shutdown_grace = Duration::from_secs(5);
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "t", 1).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/ws?table=t",
        base.replace("http://", "ws://")
    ))
    .await
    .unwrap();
    let sse = reqwest::get(format!("{base}/sse?table=t")).await.unwrap();
    let mut sse = sse.bytes_stream();
    let _ = sse.next().await; // the snapshot
    let asked = std::time::Instant::now();
    svc.shutdown();
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the WebSocket is closed in time");
    assert_eq!(close, Some(1001), "going away");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = sse.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream ends");
    tokio::time::timeout(Duration::from_secs(6), svc.wait())
        .await
        .expect("stopped within the grace period")
        .unwrap();
    eprintln!("shutdown with clients attached: {:?}", asked.elapsed());

    // the broker gone: SIGTERM still ends within the grace period
    let port = common::procs::free_port();
    let addr = format!("127.0.0.1:{port}");
    dev_script("broker", &["start"], &[("BROKER_ADDR", addr.as_str())]);
    let dir = tempdir();
    let mut c = test_config(
        TopicSelection::Names(vec![topic.clone()]),
        dir.path(),
        &unique("down2"),
    );
    c.brokers = addr.clone();
    c.shutdown_grace = Duration::from_secs(5);
    let (svc, base) = start_service(c).await;
    eventually(
        "ready on the private broker",
        Duration::from_secs(60),
        || async { (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(()) },
    )
    .await;
    dev_script("broker", &["stop"], &[("BROKER_ADDR", addr.as_str())]);
    eventually(
        "not ready without the broker",
        Duration::from_secs(30),
        || async { (get_json(&format!("{base}/readyz")).await.0 == 503).then_some(()) },
    )
    .await;
    let asked = std::time::Instant::now();
    svc.shutdown();
    tokio::time::timeout(Duration::from_secs(6), svc.wait())
        .await
        .expect("stopped within the grace period with the broker gone")
        .unwrap();
    eprintln!("shutdown with the broker gone: {:?}", asked.elapsed());
}

/// Issue 12 hole 9: a restore used to give up after a fixed total time (600 s), so a table that
/// took longer restart-looped forever. Now it gives up only when nothing arrives for
/// `--restore-stall-secs`: here a restore longer than that window completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_longer_than_the_stall_window_completes() {
    let u = unique("stall");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 1).await;
    let n = 60_000usize;
    let p = producer();
    let records: Vec<FixtureRecord> = (0..n)
        .map(|i| n_update("t", &format!("k{i}"), i, 20))
        .collect();
    for chunk in records.chunks(10_000) {
        produce(&p, &topic, chunk).await;
    }
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c.clone()).await;
    table_at_seq(&base, "t", n as u64).await;
    svc.shutdown();
    svc.wait().await.unwrap();
    // the same deployment with an empty data directory and a 300 ms stall window, as a
    // materialiser: an all-in-one node's follower may read the whole changelog before the
    // partition is assigned (then the takeover replays nothing, as in a failed CI run), a
    // materialiser has no follower, so its takeover restores all the rows
    let dir = tempdir();
    let mut c = c;
    c.data_dir = dir.path().to_path_buf();
    c.restore_stall = Duration::from_millis(300);
    c.role = livetable::config::Role::Materialiser;
    let started = std::time::Instant::now();
    let (svc, base) = start_service(c).await;
    let rows = r#"livetable_table_rows{table="t"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    // the rows count as they are folded; the restore ends later, with its fence (its duration is
    // set then: a CI run read it between the two)
    while metric(&base, rows).await < n as f64
        || metric(&base, "livetable_restore_duration_seconds").await <= 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the materialiser restored {} of {n} rows in 90 s (restore finished: {})",
            metric(&base, rows).await,
            metric(&base, "livetable_restore_duration_seconds").await > 0.0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = metric(&base, "livetable_restore_duration_seconds").await;
    let retries = metric(&base, "livetable_restore_retries_total").await;
    let replayed = metric(&base, "livetable_restore_records_total").await;
    eprintln!(
        "restore of {n} rows: the slice takeover read {replayed} records in {took:.2} s after {retries} retries (restored after {:?}) with a 300 ms stall window",
        started.elapsed()
    );
    assert!(
        replayed >= n as f64,
        "the takeover read {replayed} changelog records, not the {n} rows"
    );
    // the test shows something only if the restore outlasted the window: in one attempt, or (on
    // a loaded machine, where a second without progress does happen) in attempts that stalled and
    // were retried until one completed
    assert!(
        took > 0.3 || retries >= 1.0,
        "the restore did not outlast the stall window ({took} s, {retries} retries): it shows nothing"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Issue 12 hole 2: after an unclean stop, the node used to reopen under the same epoch at an
/// older seq and could honour a client's old `since` with patches built on another history (1 run
/// in 3 missed rows for good). Positions are now Kafka offsets: a client that resumes after each
/// of 3 kill -9 ends exact, and never sees a value go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_across_kill9_ends_exact_and_never_goes_back() {
    use common::procs::{Node, Watcher};
    let u = unique("k9");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 2).await;
    let (keys, per_round) = (2_000usize, 6_000usize);
    let logs = tempdir();
    let dir = tempdir();
    let mut node = Node::spawn(
        "node",
        "all",
        &format!("g-{u}"),
        &topic,
        dir.path(),
        logs.path(),
        &["--max-batch", "500"],
    );
    let p = producer();
    let change = |i: usize| n_update("t", &format!("k{}", i % keys), i, 1);
    produce_keyed(&p, &topic, &(0..keys).map(change).collect::<Vec<_>>()).await;
    node.wait_ready(Duration::from_secs(90)).await;
    let mut held: std::collections::BTreeMap<String, i64> = Default::default();
    let mut pos: Option<String> = None;
    let mut next = keys;
    for round in 0..3 {
        let w = Watcher::connect(&node.base, "t", pos.as_deref()).await;
        // a burst; the node is killed in the middle of it
        let burst: Vec<FixtureRecord> = (next..next + per_round).map(change).collect();
        next += per_round;
        let (first, second) = burst.split_at(per_round / 2);
        produce_keyed(&p, &topic, first).await;
        // the first half's last change reached the client (in patches, or in its resume: after
        // an unclean stop the node holds new subscriptions until it applied its input again, by
        // when the whole first half may be in the one resume patch or snapshot)
        let last = next - per_round + per_round / 2 - 1;
        let last_key = format!("k{}", last % keys);
        eventually(
            "the client sees the burst",
            Duration::from_secs(60),
            || async {
                let s = w.seen.lock().unwrap();
                let n = s.state.get(&last_key).and_then(|v| v["n"].as_i64());
                (n >= Some(last as i64)).then_some(())
            },
        )
        .await;
        node.kill9();
        produce_keyed(&p, &topic, second).await;
        {
            let s = w.seen.lock().unwrap();
            assert!(
                s.regressions.is_empty(),
                "round {round}: {:?}",
                s.regressions
            );
            // what the client holds now: what it held before plus what it received
            if s.snapshots > 0 {
                held.clear();
            }
            for (k, v) in &s.state {
                if let Some(n) = v["n"].as_i64() {
                    let old = held.insert(k.clone(), n);
                    assert!(
                        old.is_none_or(|o| o <= n),
                        "round {round}: {k} went back {old:?} -> {n}"
                    );
                }
            }
            pos = s.pos.clone();
        }
        w.abort();
        node.start();
        node.wait_ready(Duration::from_secs(90)).await;
    }
    // the last resume: the client ends exact
    let w = Watcher::connect(&node.base, "t", pos.as_deref()).await;
    let want: std::collections::BTreeMap<String, i64> = (next - keys..next)
        .map(|i| (format!("k{}", i % keys), i as i64))
        .collect();
    eventually(
        "the resumed client is exact",
        Duration::from_secs(90),
        || async {
            let s = w.seen.lock().unwrap();
            let mut now = if s.snapshots > 0 {
                Default::default()
            } else {
                held.clone()
            };
            for (k, v) in &s.state {
                if let Some(n) = v["n"].as_i64() {
                    now.insert(k.clone(), n);
                }
            }
            (now == want).then_some(())
        },
    )
    .await;
    let s = w.seen.lock().unwrap();
    assert!(s.regressions.is_empty(), "{:?}", s.regressions);
    eprintln!(
        "last resume: {} snapshot(s), {} patch(es)",
        s.snapshots, s.patches
    );
    assert_eq!(
        s.snapshots, 0,
        "the replay buffer covers the changes since the restart: the resume is a patch"
    );
}

/// Issue 12 hole 3: a node that falls behind its input (a backlog after an outage, a burst) used
/// to serve old values as current. Now readiness and the API say so, and live clients get a
/// `status` message when the node stops and starts again being caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_its_input_tells_its_clients() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let u = unique("stale");
    let topic = format!("{u}.public.t");
    create_topic(&topic, 1).await;
    let p = producer();
    produce(&p, &topic, &[n_update("t", "a", 0, 1)]).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.max_ready_lag = 100;
    c.max_batch = 50;
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "t", 1).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/ws?table=t",
        base.replace("http://", "ws://")
    ))
    .await
    .unwrap();
    // a burst far beyond the ready lag
    let burst: Vec<FixtureRecord> = (1..=30_000)
        .map(|i| n_update("t", &format!("k{}", i % 500), i, 200))
        .collect();
    let producing = tokio::spawn(async move { produce(&producer(), &topic, &burst).await });
    let mut seen = Vec::new();
    let mut behind_api = false;
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while !(seen.contains(&false) && seen.last() == Some(&true)) {
        assert!(
            std::time::Instant::now() < until,
            "status messages seen: {seen:?}"
        );
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        {
            let m: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            if m["type"] == "status" {
                let caught_up = m["caught_up"].as_bool().unwrap();
                if !caught_up {
                    assert!(m["reason"].as_str().unwrap().contains("behind"), "{m}");
                    let (_, tables) = get_json(&format!("{base}/api/tables")).await;
                    behind_api |= tables["caught_up"] == false;
                }
                seen.push(caught_up);
            }
        }
    }
    producing.await.unwrap();
    assert!(behind_api, "the API said the node was behind while it was");
    eventually("ready at the end", Duration::from_secs(60), || async {
        (get_json(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Issue 12, BUG-2 of RELIABILITY.md: clients are sent a batch before it is durable, so after a
/// kill -9 the store can be behind what they saw. A client that connects to the restarted node
/// (no position to resume from, like the seed's rows clients) must not get a snapshot older than
/// what a client saw before the kill: new subscriptions wait until the input is applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill9_a_new_client_never_gets_older_values_than_clients_saw() {
    new_clients_after_kill9(false).await;
}

/// The same for a gateway killed with -9 (its store, a cache of the changelog, can also reopen
/// older than what it sent): new subscriptions wait until it read the changelog again up to the
/// end it first sees after the restart. Without that hold: values older than clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill9_of_a_gateway_a_new_client_never_gets_older_values() {
    new_clients_after_kill9(true).await;
}

/// Three rounds: a client watches a stream on the serving node, which is killed with -9 while
/// the stream flows and restarted; a new client connects as soon as it takes connections, and its
/// snapshot must hold no value older than the first client saw. `gateway`: the serving node is a
/// gateway in front of one materialiser (it is the one killed); otherwise an all-in-one node.
async fn new_clients_after_kill9(gateway: bool) {
    use common::procs::{Node, Watcher};
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let u = unique(if gateway { "k9gw" } else { "k9new" });
    let topic = format!("{u}.public.t");
    create_topic(&topic, 2).await;
    let keys = 200usize;
    let logs = tempdir();
    let dir = tempdir();
    let mat_dir = tempdir();
    let group = format!("g-{u}");
    let spawn = |name: &str, role: &str, dir: &std::path::Path| {
        Node::spawn(
            name,
            role,
            &group,
            &topic,
            dir,
            logs.path(),
            // shorter than the hold after a kill -9: an SSE client held must still get its
            // stream (a 503 at the request timeout is the end of a browser's EventSource)
            &["--max-batch", "200", "--request-timeout-secs", "2"],
        )
    };
    let mut node = spawn("node", if gateway { "gateway" } else { "all" }, dir.path());
    let mut materialiser = gateway.then(|| spawn("mat", "materialiser", mat_dir.path()));
    let p = producer();
    let change = move |i: usize| n_update("t", &format!("k{}", i % keys), i, 200);
    produce_keyed(&p, &topic, &(0..keys).map(change).collect::<Vec<_>>()).await;
    if let Some(m) = &materialiser {
        m.wait_ready(Duration::from_secs(90)).await;
    }
    node.wait_ready(Duration::from_secs(90)).await;
    let mut worst: Vec<String> = Vec::new();
    let mut next = keys;
    for round in 0..3 {
        let a = Watcher::connect(&node.base, "t", None).await;
        // a steady stream; the node is killed while it flows
        let (start, n) = (next, 30_000usize);
        next += n;
        let prod = {
            let p = p.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for c in (start..start + n).collect::<Vec<_>>().chunks(500) {
                    produce_keyed(
                        &p,
                        &topic,
                        &c.iter().map(|i| change(*i)).collect::<Vec<_>>(),
                    )
                    .await;
                }
            })
        };
        eventually(
            "the client sees the stream",
            Duration::from_secs(60),
            || async { (a.seen.lock().unwrap().patches > 20).then_some(()) },
        )
        .await;
        node.kill9();
        let before: std::collections::BTreeMap<String, i64> = {
            let s = a.seen.lock().unwrap();
            s.state
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v["n"].as_i64()?)))
                .collect()
        };
        a.abort();
        node.start();
        // a new client as soon as the node takes connections
        let url = format!("{}/ws?table=t", node.base.replace("http://", "ws://"));
        let until = std::time::Instant::now() + Duration::from_secs(90);
        let mut ws = loop {
            match tokio_tungstenite::connect_async(&url).await {
                Ok((ws, _)) => break ws,
                Err(_) if std::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("round {round}: the restarted node takes no connection: {e}"),
            }
        };
        // and an SSE client: its response head comes at once, its snapshot after the hold
        let sse = reqwest::Client::new()
            .get(format!("{}/sse?table=t", node.base))
            .send();
        let mut sse = tokio::time::timeout(Duration::from_secs(30), sse)
            .await
            .expect("the SSE response head")
            .unwrap();
        assert_eq!(
            sse.status(),
            200,
            "round {round}: SSE held past the request timeout"
        );
        let snapshot = loop {
            let m = tokio::time::timeout(Duration::from_secs(90), ws.next())
                .await
                .expect("a snapshot")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "snapshot" {
                    assert_ne!(v["more"], true, "a small table is one frame");
                    break v;
                }
            }
        };
        for (k, old) in &before {
            let new = snapshot["rows"][k]["n"].as_i64().unwrap_or(-1);
            if new < *old {
                worst.push(format!("round {round}: {k} {old} -> {new}"));
            }
        }
        drop(ws);
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let data = loop {
            if let Some(at) = text.find("event: snapshot\n") {
                if let Some(end) = text[at..].find("\n\n") {
                    let block = &text[at..at + end];
                    break block
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .collect::<String>();
                }
            }
            let chunk = tokio::time::timeout_at(deadline, sse.chunk())
                .await
                .expect("an SSE snapshot")
                .unwrap()
                .expect("the SSE stream goes on");
            text.push_str(&String::from_utf8_lossy(&chunk));
        };
        let sse_snapshot: serde_json::Value = serde_json::from_str(&data).unwrap();
        for (k, old) in &before {
            let new = sse_snapshot["rows"][k]["n"].as_i64().unwrap_or(-1);
            if new < *old {
                worst.push(format!("round {round} (SSE): {k} {old} -> {new}"));
            }
        }
        drop(sse);
        prod.await.unwrap();
        node.wait_ready(Duration::from_secs(90)).await;
        // ready only once the hold ended: a load balancer sends no one to a node that holds
        let recovered = node
            .log_text()
            .matches("recovered from the unclean stop")
            .count();
        assert!(
            recovered > round,
            "round {round}: /readyz said ready before the unclean-stop hold ended"
        );
    }
    if let Some(m) = materialiser.as_mut() {
        m.stop();
    }
    assert!(
        worst.is_empty(),
        "{} values older than a client saw before the kill, e.g. {:?}",
        worst.len(),
        &worst[..worst.len().min(5)]
    );
}
