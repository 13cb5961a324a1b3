//! Canonical JSON text (SPEC 3.4), byte-identical to the JavaScript implementation.
//!
//! The JavaScript peers hash `JSON.stringify` of a copy of the value whose object keys were put
//! through `Object.keys(v).sort()`. A JavaScript object then enumerates its *array-index* keys
//! (canonical decimal integers `0..=4294967294`) first, in numeric order, and every other key in
//! insertion order, which here is the sorted (UTF-16 code unit) order. [`canon`] reproduces that
//! text exactly:
//!
//! - no whitespace; arrays in order; object keys ordered by [`compare_keys`];
//! - strings escaped as `JSON.stringify` does: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other
//!   control characters below U+0020 as `\u00xx` (lowercase hex), everything else literal
//!   (including U+2028, U+2029, DEL and all non-ASCII text). Rust strings cannot hold lone
//!   surrogates, so the `\udxxx` escapes of well-formed `JSON.stringify` never arise;
//! - integers held as `u64`/`i64` printed as plain decimals; `f64` values printed as JavaScript's
//!   `Number.prototype.toString` does (`-0` as `0`, `1e21` as `1e+21`, `1.5e-7`, ...) by the
//!   `ryu-js` crate.
//!
//! Two deliberate differences from JavaScript, both of which only make JavaScript and Rust hashes
//! *disagree* (a record is then refused, never wrongly accepted):
//!
//! - integers beyond 2^53 that only a Rust (or other exact) writer can produce are printed exactly,
//!   where JavaScript would first round them to a double. Every number text a JavaScript peer
//!   writes still canonicalises to the same text here, because such text either parses back into
//!   an exact `u64`/`i64` or into the very same `f64`;
//! - a key named `__proto__` is kept. The JavaScript canonicaliser loses it (assigning
//!   `o["__proto__"]` sets the prototype instead of a property), which would leave that field
//!   outside every hash.

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde_json::{Number, Value};

/// Returns the canonical JSON text of `value` (SPEC 3.4), as JavaScript's
/// `JSON.stringify` prints it after the keys of every object have been sorted.
#[must_use]
pub fn canon(value: &Value) -> String {
    let mut out = String::new();
    canon_into(value, &mut out);
    out
}

/// Appends the canonical JSON text of `value` to `out`; see [`canon`].
pub fn canon_into(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canon_into(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|(a, _), (b, _)| compare_keys(a, b));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                canon_into(item, out);
            }
            out.push('}');
        }
    }
}

/// Orders two object keys as a JavaScript object enumerates them after insertion in sorted
/// order: array-index keys (see [`array_index`]) first by numeric value, then all other keys by
/// UTF-16 code units ([`cmp_utf16`]).
#[must_use]
pub fn compare_keys(a: &str, b: &str) -> Ordering {
    match (array_index(a), array_index(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => cmp_utf16(a, b),
    }
}

/// Compares two strings by their UTF-16 code units, as JavaScript's default `sort` and `<` do.
///
/// This differs from Rust's `str` ordering (code points) only when a character at or above
/// U+10000 (a surrogate pair, first unit 0xD800..=0xDBFF) meets one in U+E000..=U+FFFF.
#[must_use]
pub fn cmp_utf16(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// Sorts strings in place by UTF-16 code units, as JavaScript's default `Array.prototype.sort`
/// does for an array of strings.
pub fn sort_utf16<S: AsRef<str>>(items: &mut [S]) {
    items.sort_by(|a, b| cmp_utf16(a.as_ref(), b.as_ref()));
}

/// Returns the numeric value of `key` when it is a JavaScript array index: the canonical decimal
/// text (no sign, no leading zero except `"0"` itself) of an integer in `0..=4294967294`.
#[must_use]
pub fn array_index(key: &str) -> Option<u32> {
    let bytes = key.as_bytes();
    if bytes.is_empty() || bytes.len() > 10 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes.first() == Some(&b'0') {
        return None;
    }
    let value = key.parse::<u64>().ok()?;
    if value <= 4_294_967_294 { u32::try_from(value).ok() } else { None }
}

/// Writes `s` as a JSON string literal escaped exactly as `JSON.stringify` does.
fn write_string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut start = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape: &str = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` is the index of an ASCII byte, hence a char boundary; so is `start`.
        if let Some(run) = s.get(start..i) {
            out.push_str(run);
        }
        if escape.is_empty() {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    if let Some(run) = s.get(start..) {
        out.push_str(run);
    }
    out.push('"');
}

/// Writes a number as JavaScript prints it (see the module documentation).
fn write_number(n: &Number, out: &mut String) {
    if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        write_f64(f, out);
    } else {
        // Unreachable without serde_json's arbitrary_precision; fall back to its own text.
        out.push_str(&n.to_string());
    }
}

/// Writes an `f64` as JavaScript's `Number.prototype.toString` (and so `JSON.stringify`) does.
fn write_f64(f: f64, out: &mut String) {
    if !f.is_finite() {
        // JSON.stringify(NaN | ±Infinity) is "null"; serde_json cannot hold such values.
        out.push_str("null");
    } else if f == 0.0 {
        // Covers -0, which JavaScript prints as "0".
        out.push('0');
    } else {
        let mut buffer = ryu_js::Buffer::new();
        out.push_str(buffer.format_finite(f));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use serde_json::json;

    fn canon_str(text: &str) -> String {
        canon(&serde_json::from_str::<Value>(text).unwrap())
    }

    #[test]
    fn sorts_index_keys_numerically_first() {
        assert_eq!(canon_str(r#"{"b":1,"a":2,"10":3,"2":4}"#), r#"{"2":4,"10":3,"a":2,"b":1}"#);
        // Not array indices: leading zero, sign, too large, non-digits; they sort as strings.
        assert_eq!(
            canon_str(r#"{"x":0,"4294967295":1,"4294967294":2,"01":3,"-1":4,"1.5":5,"0":6,"":7}"#),
            r#"{"0":6,"4294967294":2,"":7,"-1":4,"01":3,"1.5":5,"4294967295":1,"x":0}"#
        );
        assert_eq!(array_index("0"), Some(0));
        assert_eq!(array_index("4294967294"), Some(4_294_967_294));
        assert_eq!(array_index("4294967295"), None);
        assert_eq!(array_index("99999999999"), None);
        assert_eq!(array_index("00"), None);
        assert_eq!(array_index("+1"), None);
        assert_eq!(array_index(""), None);
        assert_eq!(array_index("١"), None);
    }

    #[test]
    fn sorts_other_keys_by_utf16_units() {
        // U+1F600 is the pair D83D DE00, which sorts before U+FF61 in UTF-16 (not in UTF-8).
        let v = json!({"\u{FF61}": 1, "\u{1F600}": 2, "a": 3, "B": 4, "é": 5});
        assert_eq!(canon(&v), "{\"B\":4,\"a\":3,\"é\":5,\"\u{1F600}\":2,\"\u{FF61}\":1}");
        assert_eq!(cmp_utf16("\u{1F600}", "\u{FF61}"), Ordering::Less);
        assert_eq!("\u{1F600}".cmp("\u{FF61}"), Ordering::Greater);
        assert_eq!(cmp_utf16("ab", "abc"), Ordering::Less);
        assert_eq!(cmp_utf16("abc", "abc"), Ordering::Equal);
        let mut ids = vec!["\u{FF61}", "b", "\u{1F600}", "a"];
        sort_utf16(&mut ids);
        assert_eq!(ids, vec!["a", "b", "\u{1F600}", "\u{FF61}"]);
    }

    #[test]
    fn nested_values_and_whitespace() {
        assert_eq!(
            canon_str(r#" { "z" : [ 3, {"b":null,"a":true} , [] , {} ], "y": false } "#),
            r#"{"y":false,"z":[3,{"a":true,"b":null},[],{}]}"#
        );
        assert_eq!(canon(&json!([])), "[]");
        assert_eq!(canon(&json!({})), "{}");
        assert_eq!(canon(&json!(null)), "null");
        assert_eq!(canon(&json!("")), "\"\"");
    }

    #[test]
    fn escapes_strings_like_json_stringify() {
        let s = "q\"b\\s/\u{8}\u{c}\n\r\t\u{0}\u{1}\u{1f}\u{7f}\u{2028}\u{2029}é😀";
        assert_eq!(canon(&json!(s)), "\"q\\\"b\\\\s/\\b\\f\\n\\r\\t\\u0000\\u0001\\u001f\u{7f}\u{2028}\u{2029}é😀\"");
        // Escaping applies to keys too.
        assert_eq!(canon(&json!({"a\nb": "\u{1b}"})), "{\"a\\nb\":\"\\u001b\"}");
    }

    #[test]
    fn prints_numbers_like_javascript() {
        // Integers and number texts whose parse is exact.
        let parsed: &[(&str, &str)] = &[
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("0.0", "0"),
            ("1.0", "1"),
            ("-1", "-1"),
            ("1e2", "100"),
            ("0.5", "0.5"),
            ("1e21", "1e+21"),
            ("1795608533215", "1795608533215"),
            ("18446744073709551615", "18446744073709551615"),
            ("-9223372036854775808", "-9223372036854775808"),
        ];
        for (input, expected) in parsed {
            assert_eq!(&canon_str(input), expected, "input {input}");
        }
        // Doubles (Rust literals are correctly rounded), printed as JavaScript prints them.
        let doubles: &[(f64, &str)] = &[
            (-0.0, "0"),
            (0.1, "0.1"),
            (-0.5, "-0.5"),
            (2.5, "2.5"),
            (1.5e-7, "1.5e-7"),
            (1e-7, "1e-7"),
            (0.000_001, "0.000001"),
            (123.456, "123.456"),
            (1e20, "100000000000000000000"),
            (1e21, "1e+21"),
            (1.5e300, "1.5e+300"),
            (123_456_789_012_345_680_000.0, "123456789012345680000"),
            (18_446_744_073_709_551_616.0, "18446744073709552000"),
            (9_007_199_254_740_993.0, "9007199254740992"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (0.1 + 0.2, "0.30000000000000004"),
            (4.424_827_073_555_387_5e-172, "4.4248270735553875e-172"),
        ];
        for (input, expected) in doubles {
            assert_eq!(&canon(&json!(input)), expected, "input {input:e}");
        }
    }

    /// Cases printed by the JavaScript canonicaliser (`tests/vectors/gen-canon-js.mjs`): random
    /// doubles of every magnitude, and random nested values with index-like, non-ASCII, emoji,
    /// private-use and control-character keys and strings.
    #[test]
    fn matches_javascript_outputs() {
        let cases: Vec<(String, String)> =
            serde_json::from_str(include_str!("../tests/vectors/canon-js.json")).unwrap();
        assert!(cases.len() > 3000);
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|(input, expected)| {
                let got = canon_str(input);
                (&got != expected).then(|| format!("{input} -> {got}, JS {expected}"))
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{} mismatches (if only floats differ in the last digit, serde_json is parsing them \
             up to 1 ULP off: enable its `float_roundtrip` feature):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn keeps_proto_key() {
        assert_eq!(canon_str(r#"{"__proto__":{"a":1}}"#), r#"{"__proto__":{"a":1}}"#);
    }
}
