//! Stage parameters are finite numbers. Cache keys and the job files stages hand to the worker are
//! JSON, which has no NaN or infinity (serde_json writes them as `null`), so TOML's `nan`, `inf`
//! and `-inf` are refused when a pipeline is loaded, with the path to the value.

use serde::de::DeserializeOwned;

use super::{build_typed, ParamError, Stage};

/// Reads a kind's parameters like [`build_typed`], then refuses a non-finite float anywhere in
/// them: serde_json would write it as `null`, so `nan`, `inf` and `-inf` would share one cache key
/// and reach a worker's job file as `null`.
pub fn build_finite<P>(params: toml::Value) -> Result<Box<dyn Stage>, ParamError>
where
    P: DeserializeOwned + Stage + 'static,
{
    let stage = build_typed::<P>(params.clone())?;
    match non_finite_float(&params) {
        None => Ok(stage),
        Some((path, value)) => Err(ParamError {
            path,
            message: format!(
                "{} is not a finite number (cache keys and the files stages pass on are JSON, which \
                 has no NaN or infinity)",
                toml_float(value)
            ),
        }),
    }
}

/// The path (keys, and list indices as `[i]`) and value of the first NaN or infinite float.
pub fn non_finite_float(value: &toml::Value) -> Option<(Vec<String>, f64)> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => Some((Vec::new(), *f)),
        toml::Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            non_finite_float(item).map(|(mut path, f)| {
                path.insert(0, format!("[{i}]"));
                (path, f)
            })
        }),
        toml::Value::Table(table) => table.iter().find_map(|(key, item)| {
            non_finite_float(item).map(|(mut path, f)| {
                path.insert(0, key.clone());
                (path, f)
            })
        }),
        _ => None,
    }
}

/// A float as TOML writes it: `nan`, `inf`, `-inf`, or the number.
fn toml_float(value: f64) -> String {
    if value.is_nan() {
        "`nan`".into()
    } else if value.is_infinite() {
        format!("`{}inf`", if value < 0.0 { "-" } else { "" })
    } else {
        format!("`{value}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_finite_float_is_found_with_its_path() {
        let params: toml::Value =
            toml::from_str("a = 1.5\nb = [1.0, 2.0]\n[c]\nd = [0.5, -inf]\n[e]\nf = nan").unwrap();
        let (path, value) = non_finite_float(&params).unwrap();
        assert_eq!(path, ["c", "d", "[1]"]);
        assert_eq!(value, f64::NEG_INFINITY);
        let finite: toml::Value = toml::from_str("a = 1.5\nb = [1.0, 1e308]").unwrap();
        assert_eq!(non_finite_float(&finite), None);
        assert_eq!(toml_float(f64::NAN), "`nan`");
        assert_eq!(toml_float(f64::INFINITY), "`inf`");
    }
}
