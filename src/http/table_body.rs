//! The bodies of `GET /api/tables/{table}` (`{"table","seq","epoch","pos","complete","rows"}`,
//! [`TableBody`]) and of `GET /api/tables/{table}/rows/{key}` ([`row_body`]). The first is
//! written from a copy of the rows the request selects ([`SnapshotCopy`], taken under the
//! table's read lock, which holds up the table's ingest), holding no lock, in pieces. In both, a row held as its JSON (loaded from
//! the store or a changelog) goes out as that JSON when nothing needs its columns (no `where`, no
//! `columns`, no row filter of a token; a token's glob key patterns read only keys): a restarted
//! table is answered without parsing its rows. That JSON goes out as it was stored: byte for byte
//! what livetable would write for rows it wrote itself, the same values in another spelling for a
//! changelog record written by another program. Unlike a snapshot frame, the bodies keep NULL
//! columns.

use crate::fanout::selector::Selector;
use crate::fanout::snapshot::SnapshotCopy;
use crate::table::stored_row::StoredRow;

/// The JSON body of the rows of a copy (taken with `sel`, under the table's read lock) that
/// `sel` selects, with its projection, built holding no lock, in pieces: a large table goes out
/// as the client takes it, and the body holds its copy (not the whole text) until its last piece
/// is built.
pub struct TableBody {
    /// `None` once the last piece is built (the copy is dropped with it).
    copy: Option<SnapshotCopy>,
    table: String,
    sel: Selector,
    as_stored: bool,
    /// Where the next piece goes on among the copied rows; `None` before the head.
    next: Option<usize>,
    /// Whether a row was written (the next one is preceded by a comma).
    wrote_row: bool,
}

impl TableBody {
    pub fn new(copy: SnapshotCopy, table: String, sel: Selector) -> Self {
        TableBody {
            copy: Some(copy),
            table,
            as_stored: !sel.reads_rows(),
            sel,
            next: None,
            wrote_row: false,
        }
    }

    /// Whether the last piece was built.
    pub fn finished(&self) -> bool {
        self.copy.is_none()
    }

    /// The next piece: rows until it holds at least `max` bytes (a piece passes `max` by at most
    /// one row; the head is a piece of its own when it fills one), the tail last; `None` after the last.
    pub fn next_piece(&mut self, max: usize) -> Option<Vec<u8>> {
        let copy = self.copy.as_ref()?;
        let mut out = Vec::new();
        // serialising strings and JSON values into a Vec cannot fail
        let start = match self.next {
            Some(i) => i,
            None => {
                out.extend_from_slice(br#"{"table":"#);
                let _ = serde_json::to_writer(&mut out, &self.table);
                out.extend_from_slice(format!(r#","seq":{},"epoch":"#, copy.seq).as_bytes());
                let _ = serde_json::to_writer(&mut out, &*copy.epoch);
                out.extend_from_slice(br#","pos":"#);
                let _ = serde_json::to_writer(&mut out, &copy.token());
                out.extend_from_slice(
                    format!(r#","complete":{},"rows":{{"#, copy.complete).as_bytes(),
                );
                0
            }
        };
        let mut rest = None;
        for (i, k, r) in copy.selected_from(&self.sel, start) {
            // a piece holds a row at least, once past the head
            if !out.is_empty() && out.len() >= max {
                rest = Some(i);
                break;
            }
            if self.wrote_row {
                out.push(b',');
            }
            self.wrote_row = true;
            let _ = serde_json::to_writer(&mut out, k);
            out.push(b':');
            match self.as_stored.then(|| r.json()).flatten() {
                Some(json) => out.extend_from_slice(json.as_bytes()),
                None => {
                    let _ = serde_json::to_writer(&mut out, self.sel.project(r).as_ref());
                }
            }
        }
        match rest {
            Some(i) => self.next = Some(i),
            None => {
                out.extend_from_slice(b"}}");
                self.copy = None;
            }
        }
        Some(out)
    }
}

/// The whole body of [`TableBody`] at once (tests).
#[cfg(test)]
pub fn table_body(copy: SnapshotCopy, table: &str, sel: &Selector) -> Vec<u8> {
    let mut body = TableBody::new(copy, table.to_string(), sel.clone());
    let mut out = Vec::new();
    while let Some(piece) = body.next_piece(usize::MAX) {
        out.extend_from_slice(&piece);
    }
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
