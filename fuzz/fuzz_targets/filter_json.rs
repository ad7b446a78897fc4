//! The filter's JSON reader and string writer (`imds_filter::json`), held
//! to serde_json.
//!
//! Invariants: a document the reader accepts, serde_json accepts as the same
//! value (numbers equal as serde_json reads them, the last of duplicate
//! keys winning as in serde_json's map), except a number serde_json cannot
//! represent (it refuses `1e400`); a document the reader refuses, serde_json
//! refuses too; any string the writer writes is what serde_json writes, and
//! reads back as itself.
#![no_main]

use imds_filter::json::{self, Value};
use libfuzzer_sys::fuzz_target;

/// Our value as serde_json's, or `None` if it holds a number serde_json
/// cannot hold.
fn to_serde(value: &Value) -> Option<serde_json::Value> {
    Some(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(text) => serde_json::from_str(text).ok()?,
        Value::String(text) => serde_json::Value::String(text.clone()),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(to_serde).collect::<Option<_>>()?),
        Value::Object(members) => {
            let mut map = serde_json::Map::new();
            for (name, value) in members {
                map.insert(name.clone(), to_serde(value)?);
            }
            serde_json::Value::Object(map)
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let theirs = serde_json::from_slice::<serde_json::Value>(data);
    match json::parse(data) {
        Ok(ours) => match to_serde(&ours) {
            Some(ours) => assert_eq!(Some(ours), theirs.ok(), "serde_json reads it otherwise"),
            None => assert!(theirs.is_err(), "a number serde_json reads but cannot read alone"),
        },
        Err(e) => assert!(theirs.is_err(), "refused ({e}), but serde_json reads it"),
    }

    let text = String::from_utf8_lossy(data);
    let mut written = Vec::new();
    json::push_string(&mut written, &text);
    assert_eq!(written, serde_json::to_vec(&text).unwrap(), "written unlike serde_json");
    assert_eq!(json::parse(&written), Ok(Value::String(text.into_owned())));
});
