//! Numbers in JSON. JSON has no NaN or infinity: serde_json writes them as `null` (silently, also
//! through `json!` and `to_value`) and refuses to read `null` back as a number. Everything nnflow
//! hands from one stage to the next (cache keys, job files, fingerprints, plans, summaries) is JSON,
//! so a non-finite number must never reach it by accident:
//!
//! - stage parameters are finite: TOML's `nan` and `inf` are refused when the pipeline is loaded
//!   (`stages::finite::build_finite`), with the path to the value;
//! - values that are NaN on purpose (nnU-Net's Dice when reference and prediction are both empty,
//!   the pseudo Dice of a class absent from every validation patch) are written as `null` and
//!   read back as NaN ([`nan_as_null`], [`nan_as_null_vec`], [`nan_as_null_map`]);
//! - files that must hold only numbers can be checked before they are written ([`first_null`]).

use serde_json::Value;

/// The dotted path (`a.b.0`) of the first `null` in `value`, if any.
pub fn first_null(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut Vec<String>) -> bool {
        match value {
            Value::Null => true,
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                path.push(i.to_string());
                walk(item, path) || {
                    path.pop();
                    false
                }
            }),
            Value::Object(map) => map.iter().any(|(key, item)| {
                path.push(key.clone());
                walk(item, path) || {
                    path.pop();
                    false
                }
            }),
            _ => false,
        }
    }
    let mut path = Vec::new();
    walk(value, &mut path).then(|| path.join("."))
}

/// An f64 that may be NaN on purpose: written as `null` when not finite (serde_json would write
/// `null` anyway), read back as NaN. Use with `#[serde(with = "crate::json_numbers::nan_as_null")]`.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        match value.is_finite() {
            true => serializer.serialize_f64(*value),
            false => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}

/// [`nan_as_null`] for every entry of a list.
pub mod nan_as_null_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(values: &[f64], serializer: S) -> Result<S::Ok, S::Error> {
        let nullable: Vec<Option<f64>> = values.iter().map(|&v| v.is_finite().then_some(v)).collect();
        nullable.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f64>, D::Error> {
        let nullable = Vec::<Option<f64>>::deserialize(deserializer)?;
        Ok(nullable.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }
}

/// [`nan_as_null`] for every value of a map.
pub mod nan_as_null_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, f64>, serializer: S) -> Result<S::Ok, S::Error> {
        let nullable: BTreeMap<&String, Option<f64>> = map
            .iter()
            .map(|(k, &v)| (k, v.is_finite().then_some(v)))
            .collect();
        nullable.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, f64>, D::Error> {
        let nullable = BTreeMap::<String, Option<f64>>::deserialize(deserializer)?;
        Ok(nullable
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[test]
    fn first_null_names_the_path() {
        let value = serde_json::json!({"a": {"b": [1.0, f64::INFINITY]}, "c": 2});
        assert_eq!(first_null(&value).as_deref(), Some("a.b.1"));
        assert_eq!(first_null(&serde_json::json!({"a": [1, 2]})), None);
    }

    #[derive(Serialize, Deserialize, Debug)]
    struct Record {
        #[serde(with = "nan_as_null")]
        one: f64,
        #[serde(with = "nan_as_null_vec")]
        list: Vec<f64>,
        #[serde(with = "nan_as_null_map")]
        map: BTreeMap<String, f64>,
    }

    #[test]
    fn nan_is_written_as_null_and_read_back() {
        let record = Record {
            one: f64::NAN,
            list: vec![0.5, f64::NAN],
            map: [("1".to_string(), f64::NAN), ("2".to_string(), 0.25)].into(),
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(
            text,
            r#"{"one":null,"list":[0.5,null],"map":{"1":null,"2":0.25}}"#
        );
        let back: Record = serde_json::from_str(&text).unwrap();
        assert!(back.one.is_nan() && back.list[1].is_nan() && back.map["1"].is_nan());
        assert_eq!((back.list[0], back.map["2"]), (0.5, 0.25));
        // A plain f64 field refuses the same text: what the helpers are for.
        assert!(serde_json::from_str::<f64>("null").is_err());
    }
}
