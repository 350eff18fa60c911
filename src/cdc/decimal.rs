//! Exact decimals from Kafka Connect's binary encodings (pure).
//!
//! `org.apache.kafka.connect.data.Decimal` is the unscaled value as big-endian two's-complement
//! bytes (base64 in JSON), with the scale in the schema. `io.debezium.data.VariableScaleDecimal`
//! carries its own scale: `{"scale": 3, "value": "<base64>"}`. Both become decimal strings such as
//! `"123456.789012"`, so no precision is lost on the way to a screen.

use base64::Engine;
use num_bigint::BigInt;

/// Most digits before the decimal point of a decoded decimal: PostgreSQL NUMERIC's 131072, the
/// widest of any database (MySQL DECIMAL has 65 digits, Oracle NUMBER 38, SQL Server 38).
pub const MAX_INTEGER_DIGITS: u32 = 131_072;
/// Most digits after the point (the largest scale): PostgreSQL NUMERIC's 16383.
pub const MAX_FRACTION_DIGITS: u32 = 16_383;
/// Most bytes of an unscaled value: enough for `MAX_INTEGER_DIGITS + MAX_FRACTION_DIGITS` digits
/// (10^147455 < 2^489837) with its sign bit.
pub const MAX_UNSCALED_BYTES: usize = 61_230;

/// Why a binary decimal does not become a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// Not base64, or no bytes: not a binary decimal at all (kept as it is by the caller).
    #[error("not a base64 decimal")]
    NotBase64,
    /// The scale is outside `-MAX_INTEGER_DIGITS..=MAX_FRACTION_DIGITS`.
    #[error("scale {0} is outside -131072..=16383")]
    Scale(i64),
    /// The unscaled value has more than `MAX_UNSCALED_BYTES` bytes.
    #[error("{0} unscaled bytes, more than 61230")]
    Bytes(usize),
    /// The value would have more than `MAX_INTEGER_DIGITS` digits before the point.
    #[error("{0} digits before the point, more than 131072")]
    IntegerDigits(u64),
}

impl DecimalError {
    /// True when the value is a decimal whose size is past the bounds (not merely not a decimal).
    pub fn out_of_range(self) -> bool {
        self != DecimalError::NotBase64
    }
}

/// Decodes base64 unscaled bytes with `scale` into a decimal string. Every size is checked before
/// it is allocated: the result has at most `MAX_INTEGER_DIGITS` digits before the point and
/// `MAX_FRACTION_DIGITS` after it.
pub fn decode_base64(b64: &str, scale: i64) -> Result<String, DecimalError> {
    // base64 of MAX_UNSCALED_BYTES is 81640 characters: refuse longer text before decoding it
    if b64.len() > MAX_UNSCALED_BYTES.div_ceil(3) * 4 + 4 {
        return Err(DecimalError::Bytes(b64.len() / 4 * 3));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| DecimalError::NotBase64)?;
    if bytes.is_empty() {
        return Err(DecimalError::NotBase64);
    }
    if bytes.len() > MAX_UNSCALED_BYTES {
        return Err(DecimalError::Bytes(bytes.len()));
    }
    format_unscaled(&BigInt::from_signed_bytes_be(&bytes), scale)
}

/// Formats an unscaled integer with `scale` digits after the point (negative scale multiplies),
/// within the bounds above.
pub fn format_unscaled(unscaled: &BigInt, scale: i64) -> Result<String, DecimalError> {
    if scale > i64::from(MAX_FRACTION_DIGITS) || scale < -i64::from(MAX_INTEGER_DIGITS) {
        return Err(DecimalError::Scale(scale));
    }
    let negative = unscaled.sign() == num_bigint::Sign::Minus;
    // at most MAX_UNSCALED_BYTES * 2.41 digits: bounded by the check of the caller or the type
    let digits = unscaled.magnitude().to_string();
    let sign = if negative { "-" } else { "" };
    let integer_digits = if digits == "0" {
        1
    } else {
        (digits.len() as i64 - scale).max(1) as u64
    };
    if integer_digits > u64::from(MAX_INTEGER_DIGITS) {
        return Err(DecimalError::IntegerDigits(integer_digits));
    }
    if scale <= 0 {
        if digits == "0" {
            return Ok("0".into());
        }
        let zeros = "0".repeat(scale.unsigned_abs() as usize);
        return Ok(format!("{sign}{digits}{zeros}"));
    }
    let scale = scale as usize;
    let padded = if digits.len() <= scale {
        format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
    } else {
        digits
    };
    let (int, frac) = padded.split_at(padded.len() - scale);
    Ok(format!("{sign}{int}.{frac}"))
}

/// True when a JSON string looks like a base64-encoded decimal that arrived without a schema:
/// strict base64 (length a multiple of 4, at most 44) that also has padding, `+` or `/`, or is a
/// short mixed-case token. A heuristic, used only to count and warn; the value is kept unchanged.
pub fn looks_like_base64_decimal(s: &str) -> bool {
    let len = s.len();
    if !(4..=44).contains(&len) || !len.is_multiple_of(4) {
        return false;
    }
    let body = s.trim_end_matches('=');
    if len - body.len() > 2
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return false;
    }
    let padded = body.len() != len;
    let symbols = body.contains(['+', '/']);
    let mixed = body.bytes().any(|b| b.is_ascii_uppercase())
        && body.bytes().any(|b| b.is_ascii_lowercase());
    padded || symbols || (mixed && len <= 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_fixture_values() {
        assert_eq!(decode_base64("Bdw=", 3).unwrap(), "1.500");
        assert_eq!(decode_base64("BtY=", 3).unwrap(), "1.750");
        assert_eq!(decode_base64("HL6ZGhQ=", 6).unwrap(), "123456.789012");
        assert_eq!(decode_base64("+w==", 1).unwrap(), "-0.5");
        assert_eq!(decode_base64("Bg==", 0).unwrap(), "6");
        assert_eq!(decode_base64("FbM=", 3).unwrap(), "5.555");
        assert_eq!(decode_base64("AA==", 2).unwrap(), "0.00");
        assert_eq!(decode_base64("Bg==", -2).unwrap(), "600");
        assert_eq!(
            decode_base64("not base64!", 2),
            Err(DecimalError::NotBase64)
        );
        assert_eq!(decode_base64("", 2), Err(DecimalError::NotBase64));
    }

    #[test]
    fn small_negative_and_leading_zeros() {
        assert_eq!(format_unscaled(&BigInt::from(-5), 3).unwrap(), "-0.005");
        assert_eq!(format_unscaled(&BigInt::from(5), 1).unwrap(), "0.5");
        assert_eq!(format_unscaled(&BigInt::from(0), -3).unwrap(), "0");
    }

    #[test]
    fn sizes_are_checked_before_they_are_allocated() {
        let one = BigInt::from(1);
        assert_eq!(
            format_unscaled(&one, i64::from(i32::MAX)),
            Err(DecimalError::Scale(i64::from(i32::MAX)))
        );
        assert_eq!(
            format_unscaled(&one, i64::from(i32::MIN)),
            Err(DecimalError::Scale(i64::from(i32::MIN)))
        );
        let at_limit = format_unscaled(&one, -i64::from(MAX_INTEGER_DIGITS - 1)).unwrap();
        assert_eq!(at_limit.len(), MAX_INTEGER_DIGITS as usize);
        assert_eq!(
            format_unscaled(&BigInt::from(10), -i64::from(MAX_INTEGER_DIGITS - 1)),
            Err(DecimalError::IntegerDigits(
                u64::from(MAX_INTEGER_DIGITS) + 1
            ))
        );
        let too_many = "A".repeat(MAX_UNSCALED_BYTES / 3 * 4 + 8);
        assert!(matches!(
            decode_base64(&too_many, 0),
            Err(DecimalError::Bytes(_))
        ));
    }

    #[test]
    fn base64_heuristic() {
        for s in ["Bdw=", "A+g=", "/gw=", "AeJA", "HL6ZGhQ="] {
            assert!(looks_like_base64_decimal(s), "{s}");
        }
        for s in [
            "g1",
            "1.500",
            "2026-01-01T12:00:00Z",
            "home",
            "abcdefghijkl",
            "",
            "a b c d",
        ] {
            assert!(!looks_like_base64_decimal(s), "{s}");
        }
    }
}
