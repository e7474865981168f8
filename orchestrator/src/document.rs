//! Definitions as documents (YAML or JSON): their schema, the command templates over the
//! input and earlier steps' outputs, and their compilation into a [`Definition`]
//! (docs/definitions.md specifies the format).

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The content hash of a document: `sha256:` and the hex digest of its canonical JSON (object
/// keys sorted, no white space), so that the same document in YAML or JSON, or with its keys
/// in another order, has one hash.
pub fn content_hash(document: &Value) -> String {
    let mut canonical = Vec::new();
    write_canonical(document, &mut canonical);
    let digest = Sha256::digest(&canonical);
    let mut hash = String::with_capacity(7 + 64);
    hash.push_str("sha256:");
    for byte in digest {
        hash.push_str(&format!("{byte:02x}"));
    }
    hash
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(key).expect("a string serializes"));
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("a JSON value serializes")),
    }
}
