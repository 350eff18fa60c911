//! The bounds on what one record may ask of the decoder. A record past any of them is a
//! [`DecodeError`] with its own reason (dead-lettered by the caller), found before the work or
//! the memory it asks for is spent. The decimal bounds live in [`crate::cdc::decimal`]; the
//! record's own size is `--max-record-bytes`.

use super::DecodeError;

/// Deepest JSON nesting of a record, envelope and schema wrapper included (a Debezium envelope
/// with a schema uses 6 levels; a column's JSON value nests inside `payload.after`). Checked on
/// the raw bytes, so nesting inside parts the decoder does not read counts too.
pub const MAX_DEPTH: usize = 64;
/// Longest row key, in bytes, after composite parts are joined.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Longest table or schema name, in bytes (PostgreSQL allows 63, MySQL 64, Oracle and SQL Server
/// 128); control characters are refused too.
pub const MAX_NAME_BYTES: usize = 255;
/// What the decimals of one record may expand to beyond twice the record's size, in bytes. A
/// decimal such as `0.000…1` with 16383 digits is 4 bytes of base64 and 16385 characters of
/// text; this admits dozens of them per record while a record's output stays within
/// `2 x its size + 512 KiB` (a 1 MiB record of such columns would otherwise expand to ~500 MB).
pub const DECIMAL_SLACK_BYTES: usize = 512 * 1024;
/// Longest piece of record text quoted in an error message (the op, a column name).
const MAX_QUOTED_CHARS: usize = 64;

/// True when the JSON text nests deeper than `limit` (brackets inside strings do not count).
/// Linear, no allocation; the bytes need not be valid JSON.
pub(super) fn nests_deeper_than(bytes: &[u8], limit: usize) -> bool {
    // cheap first (vectorised): fewer opening brackets than the limit cannot nest past it
    let opening: usize = bytes
        .iter()
        .map(|&b| usize::from(b == b'{' || b == b'['))
        .sum();
    if opening <= limit {
        return false;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = string_end(bytes, i + 1),
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The bytes of `word` equal to `c` (their high bits); exact for the lowest one, which is all
/// that is used.
fn bytes_equal(word: u64, c: u8) -> u64 {
    let x = word ^ (ONES * u64::from(c));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The index of the quote that ends the string starting at `i` (or `bytes.len()`). Most of a
/// record is inside strings: they are skipped 8 bytes at a time.
fn string_end(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let word = u64::from_le_bytes(word);
            let special = bytes_equal(word, b'"') | bytes_equal(word, b'\\');
            if special == 0 {
                i += 8;
                continue;
            }
            i += (special.trailing_zeros() / 8) as usize;
        }
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// At most [`MAX_QUOTED_CHARS`] characters of `s`, for error messages.
pub(super) fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// Checks a table or schema name against [`MAX_NAME_BYTES`] and control characters.
pub(super) fn check_name(name: &str) -> Result<(), DecodeError> {
    if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(DecodeError::BadName(quote(name)));
    }
    Ok(())
}

/// Checks a row key against [`MAX_KEY_BYTES`].
pub(super) fn check_key(key: &str) -> Result<(), DecodeError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(DecodeError::KeyTooLong {
            size: key.len(),
            limit: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_ignores_strings_and_escapes() {
        assert!(!nests_deeper_than(br#"{"a":[1,{"b":"[[[["}]}"#, 3));
        assert!(nests_deeper_than(br#"{"a":[1,{"b":[]}]}"#, 3));
        assert!(!nests_deeper_than(br#"{"a":"\"[[[[[","b":{}}"#, 2));
        assert!(!nests_deeper_than(br#"{"a":"\\","b":{}}"#, 2));
        assert!(nests_deeper_than(br#"{"a":"\\","b":{"c":{}}}"#, 2));
        // unterminated strings and stray escapes end the scan
        assert!(!nests_deeper_than(br#"{"a":"\"#, 1));
    }

    #[test]
    fn long_strings_are_skipped_word_by_word_exactly() {
        for pad in 0..20 {
            let s = "x".repeat(pad);
            let text = format!(r#"{{"a":"{s}[{s}\"{s}\\","b":{{}}}}"#);
            assert!(!nests_deeper_than(text.as_bytes(), 2), "{text}");
            assert!(nests_deeper_than(text.as_bytes(), 1), "{text}");
            let unicode = format!(r#"["{s}é\"ü[[[[","#);
            assert!(!nests_deeper_than(unicode.as_bytes(), 1), "{unicode}");
            assert_eq!(string_end(format!("{s}\"").as_bytes(), 0), pad);
            assert_eq!(string_end(format!("{s}\\\"\"").as_bytes(), 0), pad + 2);
        }
    }

    #[test]
    fn quotes_are_clipped_on_char_boundaries() {
        assert_eq!(quote("op"), "op");
        let long = "é".repeat(100);
        assert_eq!(quote(&long).chars().count(), MAX_QUOTED_CHARS + 1);
    }
}
