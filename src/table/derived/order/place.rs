//! The order in which one group's input rows were taken, as far as the group's record read from
//! the view's topic tells (pure functions of the rows and the record).

use crate::cdc::decode::Row;

/// One group's input `rows` (given oldest offset first) with the one of highest offset whose
/// values `record` shows (`same(record, row)`) last (a keyed `delta`'s output row is the own
/// row of the row changed last: its values plus its movement), and every row it shows.
pub(super) fn shown_last<T: Copy>(
    record: &Row,
    rows: Vec<(T, &Row)>,
    same: impl Fn(&Row, &Row) -> bool,
) -> (Vec<T>, Vec<T>) {
    let shown: Vec<bool> = rows.iter().map(|(_, row)| same(record, row)).collect();
    let mut order: Vec<T> = rows.iter().map(|(t, _)| *t).collect();
    let top = shown.iter().rposition(|s| *s).map(|i| order.remove(i));
    order.extend(top);
    let all = rows
        .iter()
        .zip(&shown)
        .filter(|(_, s)| **s)
        .map(|((t, _), _)| *t)
        .collect();
    (order, all)
}

/// The order (oldest first) in which one group's input `rows` (given oldest offset first) were
/// taken, as far as the group's output row `record` tells: `columns` are its `latest`
/// aggregates (input column, output column). From the newest down, each next row is the one of
/// highest offset that could have given every output column not yet given whose input column
/// it has a value in (NULL is skipped, as `latest` does), and gives at least one; the rows left
/// come before them by offset.
pub(in crate::table::derived) fn latest_order<T>(
    columns: &[(&str, &str)],
    record: &Row,
    rows: Vec<(T, &Row)>,
) -> Vec<T> {
    let value = |row: &Row, c: &str| row.get(c).filter(|v| !v.is_null()).cloned();
    let mut open: Vec<(&str, serde_json::Value)> = columns
        .iter()
        .filter_map(|(input, output)| Some((*input, value(record, output)?)))
        .collect();
    let mut rest: Vec<Option<(T, &Row)>> = rows.into_iter().map(Some).collect();
    let mut top: Vec<T> = Vec::new();
    while !open.is_empty() {
        let gives = |row: &Row| {
            let mut any = false;
            for (input, want) in &open {
                match value(row, input) {
                    Some(v) if v == *want => any = true,
                    Some(_) => return false,
                    None => {}
                }
            }
            any
        };
        let pick = rest
            .iter()
            .rposition(|r| r.as_ref().is_some_and(|(_, row)| gives(row)));
        let Some((t, row)) = pick.and_then(|i| rest[i].take()) else {
            break;
        };
        open.retain(|(input, _)| value(row, input).is_none());
        top.push(t);
    }
    rest.into_iter()
        .flatten()
        .map(|(t, _)| t)
        .chain(top.into_iter().rev())
        .collect()
}
