//! Exact decimals from Kafka Connect's binary encodings (pure).
//!
//! `org.apache.kafka.connect.data.Decimal` is the unscaled value as big-endian two's-complement
//! bytes (base64 in JSON), with the scale in the schema. `io.debezium.data.VariableScaleDecimal`
//! carries its own scale: `{"scale": 3, "value": "<base64>"}`. Both become decimal strings such as
//! `"123456.789012"`, so no precision is lost on the way to a screen.

use base64::Engine;
use num_bigint::BigInt;

/// Decodes base64 unscaled bytes with `scale` into a decimal string; `None` if not base64.
pub fn decode_base64(b64: &str, scale: i32) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    if bytes.is_empty() || bytes.len() > 64 {
        return None;
    }
    Some(format_unscaled(
        &BigInt::from_signed_bytes_be(&bytes),
        scale,
    ))
}

/// Formats an unscaled integer with `scale` digits after the point (negative scale multiplies).
pub fn format_unscaled(unscaled: &BigInt, scale: i32) -> String {
    let negative = unscaled.sign() == num_bigint::Sign::Minus;
    let digits = unscaled.magnitude().to_string();
    let sign = if negative { "-" } else { "" };
    if scale <= 0 {
        if digits == "0" {
            return "0".into();
        }
        let zeros = "0".repeat(scale.unsigned_abs() as usize);
        return format!("{sign}{digits}{zeros}");
    }
    let scale = scale as usize;
    let padded = if digits.len() <= scale {
        format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
    } else {
        digits
    };
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

/// True when a JSON string looks like a base64-encoded decimal that arrived without a schema:
/// strict base64 (length a multiple of 4, at most 44) that also has padding, `+` or `/`, or is a
/// short mixed-case token. A heuristic, used only to count and warn; the value is kept unchanged.
pub fn looks_like_base64_decimal(s: &str) -> bool {
    let len = s.len();
    if !(4..=44).contains(&len) || len % 4 != 0 {
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
        assert!(decode_base64("not base64!", 2).is_none());
    }

    #[test]
    fn small_negative_and_leading_zeros() {
        assert_eq!(format_unscaled(&BigInt::from(-5), 3), "-0.005");
        assert_eq!(format_unscaled(&BigInt::from(5), 1), "0.5");
        assert_eq!(format_unscaled(&BigInt::from(0), -3), "0");
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
