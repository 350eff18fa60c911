//! The bodies of `GET /api/tables/{table}` (`{"table","seq","epoch","pos","complete","rows"}`)
//! and of `GET /api/tables/{table}/rows/{key}` ([`row_body`]). The first is written from a copy
//! of the rows the request selects ([`SnapshotCopy`], taken under the table's read lock, which
//! holds up the table's ingest), holding no lock. In both, a row held as its JSON (loaded from
//! the store or a changelog) goes out as that JSON when nothing needs its columns (no `where`, no
//! `columns`, no row filter of a token; a token's glob key patterns read only keys): a restarted
//! table is answered without parsing its rows. That JSON goes out as it was stored: byte for byte
//! what livetable would write for rows it wrote itself, the same values in another spelling for a
//! changelog record written by another program. Unlike a snapshot frame, the bodies keep NULL
//! columns.

use crate::fanout::selector::Selector;
use crate::fanout::snapshot::SnapshotCopy;
use crate::table::stored_row::StoredRow;

/// The JSON body for the rows of `copy` (taken with `sel`, under the table's read lock) that
/// `sel` selects, with its projection. Built holding no lock.
pub fn table_body(copy: &SnapshotCopy, table: &str, sel: &Selector) -> Vec<u8> {
    let as_stored = !sel.reads_rows();
    let mut out = Vec::new();
    // serialising strings and JSON values into a Vec cannot fail
    out.extend_from_slice(br#"{"table":"#);
    let _ = serde_json::to_writer(&mut out, table);
    out.extend_from_slice(format!(r#","seq":{},"epoch":"#, copy.seq).as_bytes());
    let _ = serde_json::to_writer(&mut out, &*copy.epoch);
    out.extend_from_slice(br#","pos":"#);
    let _ = serde_json::to_writer(&mut out, &copy.token());
    out.extend_from_slice(format!(r#","complete":{},"rows":{{"#, copy.complete).as_bytes());
    let mut first = true;
    for (k, r) in copy.selected(sel) {
        if !first {
            out.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut out, k);
        out.push(b':');
        match as_stored.then(|| r.json()).flatten() {
            Some(json) => out.extend_from_slice(json.as_bytes()),
            None => {
                let _ = serde_json::to_writer(&mut out, sel.project(r).as_ref());
            }
        }
    }
    out.extend_from_slice(b"}}");
    out
}

/// The JSON body for `GET /api/tables/{table}/rows/{key}`: `row` as `sel` (the caller's token)
/// may read it, `None` when it may not. A row held as its JSON goes out as stored, NULL columns
/// included, when no filter of `sel` reads rows (a token's key patterns read the key); when one
/// does, from the columns it judged, as in [`table_body`] and the snapshots: a stored text that
/// spells a column twice would otherwise show a reader that keeps the first what the filter
/// never saw.
pub fn row_body(key: &str, row: &StoredRow, sel: &Selector) -> Option<Vec<u8>> {
    if !sel.selects(key, row) {
        return None;
    }
    match row.json().filter(|_| !sel.reads_rows()) {
        Some(json) => Some(json.as_bytes().to_vec()),
        // serialising a map of JSON values into a Vec cannot fail
        None => serde_json::to_vec(row.shared().as_ref()).ok(),
    }
}

#[cfg(test)]
mod tests;
