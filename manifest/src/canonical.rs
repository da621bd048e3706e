//! Canonical JSON: the exact bytes that signatures cover.
//!
//! The rules, chosen so that any JSON library can reproduce them:
//! - no insignificant whitespace;
//! - object keys sorted by their UTF-8 bytes, each key at most once;
//! - strings escape only `"`, `\` and control characters below U+0020 (as `\b`, `\f`, `\n`,
//!   `\r`, `\t` or `\u00xx` with lowercase hex); everything else is written as raw UTF-8;
//! - integers in plain decimal; other numbers in the shortest form that reads back to the same
//!   binary64 value (what `serde_json` prints). Reading them back exactly needs `serde_json`'s
//!   `float_roundtrip` feature, which the workspace enables: without it a future writer's float
//!   field could parse to a neighbouring value and fail its own signature.
//!
//! The sort is done here rather than relied upon from `serde_json::Map`: another crate in the
//! build enabling `serde_json/preserve_order` would otherwise silently change what we sign.

use serde_json::Value;

/// Encodes `value` in canonical form.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for byte in s.bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            // Multi-byte UTF-8 sequences pass through unchanged: `s` is valid UTF-8.
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        let value: Value =
            serde_json::from_str(r#"{ "b": [1, {"z": null, "a": true}], "a": "x" }"#)
                .expect("valid json");
        assert_eq!(to_vec(&value), br#"{"a":"x","b":[1,{"a":true,"z":null}]}"#);
    }

    #[test]
    fn escapes_only_what_json_requires() {
        let value = json!("q\"b\\n\nt\tc\u{1}é/€");
        assert_eq!(to_vec(&value), "\"q\\\"b\\\\n\\nt\\tc\\u0001é/€\"".as_bytes());
    }

    #[test]
    fn keys_sort_by_utf8_bytes() {
        let value = json!({"é": 1, "z": 2, "Z": 3, "": 4});
        assert_eq!(to_vec(&value), "{\"\":4,\"Z\":3,\"z\":2,\"é\":1}".as_bytes());
    }

    #[test]
    fn floats_survive_a_parse_and_print_cycle() {
        // Found by the property test: the fast float parser misreads this one.
        let text = "-9.7635970292187175e299";
        let value: Value = serde_json::from_str(text).expect("number");
        let printed = to_vec(&value);
        let again: Value = serde_json::from_slice(&printed).expect("number");
        assert_eq!(to_vec(&again), printed);
        assert_eq!(value.as_f64(), text.parse::<f64>().ok());
    }

    #[test]
    fn output_parses_back_to_the_same_value() {
        let value = json!({"n": -12, "big": u64::MAX, "f": 1.5, "s": "\u{7f}\u{0}"});
        let bytes = to_vec(&value);
        let back: Value = serde_json::from_slice(&bytes).expect("canonical output is json");
        assert_eq!(back, value);
        assert_eq!(to_vec(&back), bytes);
    }
}
