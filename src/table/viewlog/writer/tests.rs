use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::{tombstones, Writing};
use crate::table::viewlog::Mark;

fn writing(present: &[&str], tombs: &[(&str, Arc<Mark>)]) -> Writing {
    Writing {
        topic: "livetable.view.v".into(),
        present: present
            .iter()
            .map(|k| k.to_string())
            .collect::<HashSet<_>>(),
        tombs: tombs
            .iter()
            .map(|(k, m)| (k.to_string(), m.clone()))
            .collect::<HashMap<_, _>>(),
        synced: i64::MIN,
        gen: 1,
        last_rewrite: None,
        floor_sent: None,
        last_key: None,
        last_tomb: None,
        last_sent: Instant::now(),
    }
}

#[test]
fn a_rewrite_sends_a_tombstone_read_at_the_take_over_with_its_own_mark() {
    let base = Arc::new(Mark {
        input: Some("e1#9".into()),
        ..Mark::default()
    });
    let deleted = Arc::new(Mark {
        input: Some("e1#4".into()),
        at: Some((0, 4)),
        ..Mark::default()
    });
    // the topic holds a row of `a`, tombstones of `pk` (naming its delete) and `q`; the view
    // holds `a` only; `u`'s tombstone was sent and not acknowledged
    let w = writing(&["a", "pk", "q"], &[("pk", deleted.clone())]);
    let row = Arc::new(crate::cdc::decode::Row::new());
    let rows = vec![("a".to_string(), Some(row), base.clone())];
    let unacked = HashMap::from([
        ("u".to_string(), base.clone()),
        ("a".to_string(), deleted.clone()),
    ]);
    let gone = tombstones(&rows, &w, &unacked, &base);
    let got: Vec<String> = gone
        .iter()
        .map(|(k, r, m)| format!("{k} {} {:?}", r.is_none(), m.at))
        .collect();
    assert_eq!(got, ["pk true Some((0, 4))", "q true None", "u true None"]);
    assert!(Arc::ptr_eq(&gone[1].2, &base));
}

#[test]
fn an_unacknowledged_tombstone_is_sent_again_with_the_mark_it_was_sent_with() {
    let base = Arc::new(Mark::default());
    let sent = Arc::new(Mark {
        input: Some("e1#4".into()),
        at: Some((0, 4)),
        ..Mark::default()
    });
    // `pk`: read at the take-over without a named change, deleted again since (unacknowledged)
    let w = writing(&["pk"], &[]);
    let unacked = HashMap::from([("pk".to_string(), sent)]);
    let gone = tombstones(&[], &w, &unacked, &base);
    assert_eq!(gone.len(), 1);
    assert_eq!((gone[0].0.as_str(), gone[0].2.at), ("pk", Some((0, 4))));
}
