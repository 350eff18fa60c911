//! Exact decimals for comparisons (filters) and arithmetic (views): `unscaled * 10^-scale`.
//!
//! Values arrive as JSON numbers (`1.5`, `42`, `1e20`) or as decimal strings (`"123.450"`, the
//! form Debezium's `decimal.handling.mode=string` and livetable's own decoding produce). Both
//! become a [`Decimal`] without going through binary floating point, so `"0.1" + "0.2" == "0.3"`
//! and `"1.50" == 1.5`.
//!
//! Invariants: equality, ordering and hashing are numeric (`1.50 == 1.5`, same hash); the scale
//! of a sum is the larger scale of its terms (`"1.50" + "2.25"` prints `"3.75"`, `"0.10" + "0.20"`
//! prints `"0.30"`); parsing is bounded ([`MAX_DECIMAL_CHARS`], [`MAX_EXPONENT`]) so a hostile
//! value cannot make a comparison allocate without limit.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use num_bigint::{BigInt, Sign};
use num_traits::{One, Signed, ToPrimitive, Zero};
use serde_json::{Number, Value};

/// Longest text accepted as a decimal (a longer string is not a number, it is a string).
pub const MAX_DECIMAL_CHARS: usize = 1024;
/// Longest text of a decimal livetable itself wrote (a view's `sum` or `avg`, read back at a
/// restore): a sum of accepted values can print longer than one of them (`"9…9" + "1"`, or a
/// 1,000-digit integer plus a 1,000-digit fraction). Terms of at most [`MAX_DECIMAL_CHARS`]
/// (or floats, within ~330 digits) and at most `u64::MAX` of them print within about 2,100
/// characters; this leaves room.
pub const MAX_STORED_DECIMAL_CHARS: usize = 4 * MAX_DECIMAL_CHARS;
/// Largest exponent magnitude accepted in a JSON number or a filter literal (`1e1024`).
pub const MAX_EXPONENT: i64 = 1024;
/// Extra fractional digits an average keeps beyond its sum's scale before rounding half-even.
pub const DIVISION_EXTRA_DIGITS: i64 = 20;

/// An exact decimal number.
#[derive(Clone, Debug)]
pub struct Decimal {
    unscaled: BigInt,
    /// Digits after the point; negative multiplies (`unscaled=5, scale=-2` is 500).
    scale: i64,
}

impl Decimal {
    /// Zero with scale 0.
    pub fn zero() -> Self {
        Decimal {
            unscaled: BigInt::zero(),
            scale: 0,
        }
    }

    /// An integer.
    pub fn from_i64(v: i64) -> Self {
        Decimal {
            unscaled: BigInt::from(v),
            scale: 0,
        }
    }

    /// Parses plain decimal notation: `-?digits(.digits)?` (the form of Debezium decimal strings
    /// and of numeric columns printed by databases). No exponent, no `+`, no spaces: a string such
    /// as `"1e5"` or `" 7"` is a string, not a number.
    pub fn parse_plain(s: &str) -> Option<Self> {
        Self::parse_inner(s, false, MAX_DECIMAL_CHARS)
    }

    /// Parses a decimal livetable wrote itself in plain notation (a view's sum or average read
    /// back from its changelog topic), which may be longer than an input value
    /// ([`MAX_STORED_DECIMAL_CHARS`]).
    pub fn parse_stored(s: &str) -> Option<Self> {
        Self::parse_inner(s, false, MAX_STORED_DECIMAL_CHARS)
    }

    /// A value livetable wrote itself ([`Decimal::to_json`]): a JSON number, or a plain decimal
    /// string of up to [`MAX_STORED_DECIMAL_CHARS`].
    pub fn from_stored_json(value: &Value) -> Option<Self> {
        Self::from_json_within(value, MAX_STORED_DECIMAL_CHARS)
    }

    /// Parses JSON/SQL number notation: plain notation plus an optional leading `+`, a leading or
    /// trailing point (`.5`, `5.`) and an exponent (`1.5e-3`, `1E20`).
    pub fn parse_number(s: &str) -> Option<Self> {
        Self::parse_inner(s, true, MAX_DECIMAL_CHARS)
    }

    fn parse_inner(s: &str, extended: bool, max_chars: usize) -> Option<Self> {
        if s.is_empty() || s.len() > max_chars {
            return None;
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let negative = match bytes[0] {
            b'-' => {
                i = 1;
                true
            }
            b'+' if extended => {
                i = 1;
                false
            }
            _ => false,
        };
        let int_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int_digits = &s[int_start..i];
        let mut frac_digits = "";
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let frac_start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac_digits = &s[frac_start..i];
            if frac_digits.is_empty() && !extended {
                return None;
            }
        }
        if int_digits.is_empty() && (frac_digits.is_empty() || !extended) {
            return None;
        }
        let mut exponent: i64 = 0;
        if i < bytes.len() && extended && (bytes[i] == b'e' || bytes[i] == b'E') {
            i += 1;
            let exp_negative = match bytes.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let exp_start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let exp_digits = &s[exp_start..i];
            if exp_digits.is_empty() || exp_digits.len() > 6 {
                return None;
            }
            exponent = exp_digits.parse::<i64>().ok()?;
            if exponent > MAX_EXPONENT {
                return None;
            }
            if exp_negative {
                exponent = -exponent;
            }
        }
        if i != bytes.len() {
            return None;
        }
        let mut digits = String::with_capacity(int_digits.len() + frac_digits.len() + 1);
        if negative {
            digits.push('-');
        }
        digits.push_str(int_digits);
        digits.push_str(frac_digits);
        let unscaled = BigInt::from_str(&digits).ok()?;
        Some(Decimal {
            unscaled,
            scale: frac_digits.len() as i64 - exponent,
        })
    }

    /// A JSON number or a plain decimal string as a decimal; anything else is `None`.
    pub fn from_json(value: &Value) -> Option<Self> {
        Self::from_json_within(value, MAX_DECIMAL_CHARS)
    }

    /// A JSON number, or a plain decimal string of at most `max_chars`.
    fn from_json_within(value: &Value, max_chars: usize) -> Option<Self> {
        match value {
            Value::Number(n) => Self::from_json_number(n),
            Value::String(s) => Self::parse_inner(s, false, max_chars),
            _ => None,
        }
    }

    /// A JSON number as a decimal: integers exactly, floats by their shortest round-trip text
    /// (the float `0.1` is the decimal `0.1`).
    pub fn from_json_number(n: &Number) -> Option<Self> {
        if let Some(i) = n.as_i64() {
            return Some(Self::from_i64(i));
        }
        if let Some(u) = n.as_u64() {
            return Some(Decimal {
                unscaled: BigInt::from(u),
                scale: 0,
            });
        }
        Self::parse_number(&n.to_string())
    }

    /// Digits after the point (negative for `1e3`-style values).
    pub fn scale(&self) -> i64 {
        self.scale
    }

    /// True for zero.
    pub fn is_zero(&self) -> bool {
        self.unscaled.is_zero()
    }

    fn unscaled_at(&self, scale: i64) -> BigInt {
        debug_assert!(scale >= self.scale);
        if scale == self.scale {
            self.unscaled.clone()
        } else {
            &self.unscaled * pow10(scale - self.scale)
        }
    }

    /// `self + other`, exactly; the scale is the larger of the two.
    pub fn add(&self, other: &Decimal) -> Decimal {
        let scale = self.scale.max(other.scale);
        Decimal {
            unscaled: self.unscaled_at(scale) + other.unscaled_at(scale),
            scale,
        }
    }

    /// `self - other`, exactly; the scale is the larger of the two.
    pub fn sub(&self, other: &Decimal) -> Decimal {
        let scale = self.scale.max(other.scale);
        Decimal {
            unscaled: self.unscaled_at(scale) - other.unscaled_at(scale),
            scale,
        }
    }

    /// `|self|`.
    pub fn abs(&self) -> Decimal {
        Decimal {
            unscaled: self.unscaled.abs(),
            scale: self.scale,
        }
    }

    /// `self / n` for an average: exact when the quotient has at most `max(scale, 0) + 20`
    /// fractional digits, else rounded half-even to that many; trailing zeros past the scale of
    /// `self` are dropped (`"4.00" / 2` is `"2.00"`, `"0.3" / 2` is `"0.15"`, `1 / 3` is
    /// `0.33333333333333333333`). `None` when `n` is 0.
    pub fn div_count(&self, n: u64) -> Option<Decimal> {
        if n == 0 {
            return None;
        }
        let base_scale = self.scale.max(0);
        let scale = base_scale + DIVISION_EXTRA_DIGITS;
        let numerator = self.unscaled_at(scale);
        let divisor = BigInt::from(n);
        let mut quotient = &numerator / &divisor;
        let remainder = &numerator - &quotient * &divisor;
        let twice = remainder.abs() * 2u8;
        let round_away = match twice.cmp(&divisor) {
            Ordering::Greater => true,
            Ordering::Equal => (&quotient % 2u8) != BigInt::zero(),
            Ordering::Less => false,
        };
        if round_away {
            if numerator.sign() == Sign::Minus {
                quotient -= 1;
            } else {
                quotient += 1;
            }
        }
        let mut out = Decimal {
            unscaled: quotient,
            scale,
        };
        out.strip_zeros_down_to(base_scale);
        Some(out)
    }

    fn strip_zeros_down_to(&mut self, min_scale: i64) {
        if self.unscaled.is_zero() {
            self.scale = min_scale.min(self.scale);
            return;
        }
        if let Some(mut small) = self.unscaled.to_i64() {
            // the common case, without a big-integer division per digit
            let start = self.scale;
            while self.scale > min_scale && small % 10 == 0 {
                small /= 10;
                self.scale -= 1;
            }
            if self.scale != start {
                self.unscaled = BigInt::from(small);
            }
            return;
        }
        let ten = BigInt::from(10u8);
        while self.scale > min_scale {
            let (q, r) = num_integer::Integer::div_rem(&self.unscaled, &ten);
            if !r.is_zero() {
                break;
            }
            self.unscaled = q;
            self.scale -= 1;
        }
    }

    /// The same number with trailing fractional zeros dropped while the scale is above
    /// `min_scale` (`"3.7500"` to 2 is `"3.75"`, to 3 is `"3.750"`; `"3.75"` to 0 stays `"3.75"`).
    pub fn reduce_scale_to(&self, min_scale: i64) -> Decimal {
        let mut out = self.clone();
        out.strip_zeros_down_to(min_scale);
        out
    }

    /// The same number with no trailing fractional zeros (zero has scale 0): the canonical form
    /// behind hashing.
    pub fn normalized(&self) -> Decimal {
        if self.unscaled.is_zero() {
            return Decimal::zero();
        }
        let mut out = self.clone();
        out.strip_zeros_down_to(i64::MIN);
        out
    }

    /// Appends a byte string whose lexicographic order is the numeric order, and that is never a
    /// prefix of another number's (so encodings can be concatenated): a sign byte (1 negative,
    /// 2 zero, 3 positive), then for `0.DIGITS x 10^E` the exponent `E` as 4 order-preserving
    /// bytes, each digit as `digit + 1` and a 0 terminator; all inverted for negatives.
    pub fn write_order_bytes(&self, out: &mut Vec<u8>) {
        let n = self.normalized();
        let sign = n.unscaled.sign();
        if sign == Sign::NoSign {
            out.push(2);
            return;
        }
        let digits = match n.unscaled.to_i64() {
            Some(small) => small.unsigned_abs().to_string(),
            None => n.unscaled.magnitude().to_string(),
        };
        let exponent = digits.len() as i64 - n.scale;
        let exponent =
            i32::try_from(exponent).unwrap_or(if exponent < 0 { i32::MIN } else { i32::MAX });
        let biased = (exponent as u32) ^ 0x8000_0000;
        let negative = sign == Sign::Minus;
        let flip = |b: u8| if negative { 255 - b } else { b };
        out.push(if negative { 1 } else { 3 });
        out.extend(biased.to_be_bytes().into_iter().map(flip));
        out.extend(digits.bytes().map(|d| flip(d - b'0' + 1)));
        out.push(flip(0));
    }

    /// Plain notation with exactly `scale` fractional digits (`"3.750"`, `"-0.5"`, `"500"`).
    pub fn to_plain_string(&self) -> String {
        if self.scale >= 0 {
            // a filter literal's exponent is bounded far below the decoder's limits
            crate::cdc::decimal::format_unscaled(&self.unscaled, self.scale)
                .unwrap_or_else(|_| self.unscaled.to_string())
        } else {
            (&self.unscaled * pow10(-self.scale)).to_string()
        }
    }

    /// As JSON: a number when `prefer_number` and the value survives as one (an integer within
    /// `i64`, or a float whose shortest text is this decimal), else the plain decimal string.
    pub fn to_json(&self, prefer_number: bool) -> Value {
        if prefer_number {
            let n = self.normalized();
            if n.scale <= 0 {
                if let Some(i) = (&n.unscaled * pow10(-n.scale)).to_i64() {
                    return Value::from(i);
                }
            } else if let Ok(f) = n.to_plain_string().parse::<f64>() {
                if let Some(num) = Number::from_f64(f) {
                    if Decimal::from_json_number(&num).is_some_and(|back| back == n) {
                        return Value::Number(num);
                    }
                }
            }
        }
        Value::String(self.to_plain_string())
    }
}

fn pow10(exp: i64) -> BigInt {
    let mut result = BigInt::one();
    let mut base = BigInt::from(10u8);
    let mut e = exp.max(0) as u64;
    while e > 0 {
        if e & 1 == 1 {
            result *= &base;
        }
        e >>= 1;
        if e > 0 {
            base = &base * &base;
        }
    }
    result
}

impl PartialEq for Decimal {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Decimal {}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.unscaled.sign(), other.unscaled.sign());
        if a != b {
            return sign_rank(a).cmp(&sign_rank(b));
        }
        if self.scale == other.scale {
            return self.unscaled.cmp(&other.unscaled);
        }
        let scale = self.scale.max(other.scale);
        self.unscaled_at(scale).cmp(&other.unscaled_at(scale))
    }
}

fn sign_rank(s: Sign) -> i8 {
    match s {
        Sign::Minus => -1,
        Sign::NoSign => 0,
        Sign::Plus => 1,
    }
}

impl Hash for Decimal {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let n = self.normalized();
        n.unscaled.hash(state);
        n.scale.hash(state);
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_plain_string())
    }
}

impl serde::Serialize for Decimal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_plain_string())
    }
}

impl<'de> serde::Deserialize<'de> for Decimal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Decimal::parse_plain(&s)
            .ok_or_else(|| serde::de::Error::custom("expected a plain decimal string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::hash_map::DefaultHasher;

    fn d(s: &str) -> Decimal {
        Decimal::parse_number(s).unwrap()
    }

    fn hash_of(x: &Decimal) -> u64 {
        let mut h = DefaultHasher::new();
        x.hash(&mut h);
        h.finish()
    }

    #[test]
    fn parses_plain_and_number_forms() {
        assert_eq!(d("123.450").to_plain_string(), "123.450");
        assert_eq!(d("-0.5").to_plain_string(), "-0.5");
        assert_eq!(d("1e3").to_plain_string(), "1000");
        assert_eq!(d("1.5E-3").to_plain_string(), "0.0015");
        assert_eq!(d(".5").to_plain_string(), "0.5");
        assert_eq!(d("+7").to_plain_string(), "7");
        for bad in [
            "",
            "-",
            ".",
            "1e",
            "1e+",
            "abc",
            "1.2.3",
            " 1",
            "1 ",
            "--1",
            "1e9999999",
        ] {
            assert!(Decimal::parse_number(bad).is_none(), "{bad:?}");
        }
        for not_plain in ["1e3", ".5", "5.", "+7", "NaN", "Infinity", "0x10"] {
            assert!(Decimal::parse_plain(not_plain).is_none(), "{not_plain:?}");
        }
        assert!(Decimal::parse_plain(&"9".repeat(MAX_DECIMAL_CHARS + 1)).is_none());
        assert!(Decimal::parse_plain(&"9".repeat(MAX_DECIMAL_CHARS)).is_some());
    }

    #[test]
    fn equality_is_numeric_and_hash_agrees() {
        assert_eq!(d("1.50"), d("1.5"));
        assert_eq!(d("0"), d("-0.000"));
        assert_eq!(d("1e2"), d("100.0"));
        assert_eq!(hash_of(&d("1.50")), hash_of(&d("1.5")));
        assert_eq!(hash_of(&d("1e2")), hash_of(&d("100.00")));
        assert!(d("-2") < d("-1.99"));
        assert!(d("10.5") > d("9.99"));
        let json = Decimal::from_json(&serde_json::json!(1.5)).unwrap();
        assert_eq!(json, d("1.500"));
        assert_eq!(
            Decimal::from_json(&serde_json::json!(0.1)).unwrap(),
            d("0.1")
        );
        assert_eq!(
            Decimal::from_json(&serde_json::json!(u64::MAX)).unwrap(),
            d("18446744073709551615")
        );
    }

    #[test]
    fn arithmetic_is_exact() {
        assert_eq!(d("0.1").add(&d("0.2")), d("0.3"));
        assert_eq!(d("0.1").add(&d("0.2")).to_plain_string(), "0.3");
        assert_eq!(d("1.50").add(&d("2.25")).to_plain_string(), "3.75");
        assert_eq!(d("0.10").add(&d("0.20")).to_plain_string(), "0.30");
        assert_eq!(d("1").sub(&d("0.001")).to_plain_string(), "0.999");
        assert_eq!(d("-3.5").abs().to_plain_string(), "3.5");
    }

    #[test]
    fn division_rounds_half_even_and_keeps_scale() {
        assert_eq!(d("4.00").div_count(2).unwrap().to_plain_string(), "2.00");
        assert_eq!(d("0.3").div_count(2).unwrap().to_plain_string(), "0.15");
        assert_eq!(
            d("1").div_count(3).unwrap().to_plain_string(),
            "0.33333333333333333333"
        );
        assert_eq!(
            d("2").div_count(3).unwrap().to_plain_string(),
            "0.66666666666666666667"
        );
        assert_eq!(
            d("-2").div_count(3).unwrap().to_plain_string(),
            "-0.66666666666666666667"
        );
        // exactly half at the last digit: to even
        let half = d("0.000000000000000000025");
        assert_eq!(
            half.div_count(1).unwrap().to_plain_string(),
            "0.000000000000000000025"
        );
        assert_eq!(d("0").div_count(5).unwrap().to_plain_string(), "0");
        assert!(d("1").div_count(0).is_none());
    }

    #[test]
    fn json_output_prefers_numbers_only_when_exact() {
        assert_eq!(d("42").to_json(true), serde_json::json!(42));
        assert_eq!(d("1.5").to_json(true), serde_json::json!(1.5));
        assert_eq!(d("0.3").to_json(true), serde_json::json!(0.3));
        assert_eq!(d("1.50").to_json(false), serde_json::json!("1.50"));
        let long = d("0.12345678901234567890123");
        assert_eq!(
            long.to_json(true),
            serde_json::json!("0.12345678901234567890123")
        );
        assert_eq!(
            d("123456789012345678901234567890").to_json(true),
            serde_json::json!("123456789012345678901234567890")
        );
    }

    #[test]
    fn serde_round_trip() {
        let x = d("-12.3400");
        let text = serde_json::to_string(&x).unwrap();
        assert_eq!(text, "\"-12.3400\"");
        let back: Decimal = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_plain_string(), "-12.3400");
    }

    proptest! {
        #[test]
        fn order_matches_i128_arithmetic(a in -1_000_000_000i64..1_000_000_000, sa in 0u32..6,
                                         b in -1_000_000_000i64..1_000_000_000, sb in 0u32..6) {
            let da = Decimal { unscaled: BigInt::from(a), scale: sa as i64 };
            let db = Decimal { unscaled: BigInt::from(b), scale: sb as i64 };
            // compare a/10^sa with b/10^sb on a common denominator
            let ia = a as i128 * 10i128.pow(6 - sa);
            let ib = b as i128 * 10i128.pow(6 - sb);
            prop_assert_eq!(da.cmp(&db), ia.cmp(&ib));
            if da == db { prop_assert_eq!(hash_of(&da), hash_of(&db)); }
            let sum = da.add(&db);
            prop_assert_eq!(sum.clone(), Decimal { unscaled: BigInt::from(ia + ib), scale: 6 });
            prop_assert_eq!(sum.sub(&db), da.clone());
            let text = da.to_plain_string();
            prop_assert_eq!(Decimal::parse_plain(&text).unwrap(), da);
        }
    }
}
