//! JSON objects with their keys sorted. serde_json keeps a map's keys sorted unless its
//! `preserve_order` feature is on, and any crate in the build may switch that on for everyone
//! (`zarrs` does). What must not depend on that, a cache key or a file promised to have its keys
//! sorted (plans.json), goes through [`sorted_keys`].

use serde_json::Value;

/// `value` with the keys of every object in it sorted, at every depth.
pub fn sorted_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted_keys).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_out_sorted_at_every_depth() {
        let value: Value =
            serde_json::from_str(r#"{"b": [{"y": 1, "x": 2}], "a": {"d": 0, "c": 1}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&sorted_keys(&value)).unwrap(),
            r#"{"a":{"c":1,"d":0},"b":[{"x":2,"y":1}]}"#
        );
    }
}
