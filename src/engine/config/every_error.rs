//! Reading a typed struct and reporting every mistake in it, not only the first: serde stops at the
//! first error, so after each one the offending value is set aside (an unknown key removed, a
//! wrong value replaced by one of the right type) and the value is read again. A repair is kept
//! only when it makes the error at that place go away without causing another there, so no error
//! that nnflow itself caused is ever reported.

use crate::engine::stage::ParamError;

/// Reads `value` with `read`. `Ok` when there is no mistake; else every mistake found, in order.
/// `unknowable(path)` marks values whose type cannot be judged yet (e.g. a `${...}` that is not
/// substituted): errors there are set aside but not reported (the result is still an `Err`).
pub fn read_all<T>(
    value: toml::Value,
    read: impl Fn(toml::Value) -> Result<T, ParamError>,
    unknowable: impl Fn(&[String]) -> bool,
) -> Result<T, Vec<ParamError>> {
    let mut current = value;
    let mut problems: Vec<ParamError> = Vec::new();
    let mut set_aside = false;
    let mut repaired: Vec<Vec<String>> = Vec::new();
    // Each round repairs one value; a pipeline stage has far fewer.
    for _ in 0..200 {
        let problem = match read(current.clone()) {
            Ok(read) if problems.is_empty() && !set_aside => return Ok(read),
            Ok(_) => break,
            Err(problem) => problem,
        };
        let path = problem_path(&problem);
        // An error where a repair was made comes from that repair (or is the same error again).
        if repaired.iter().any(|done| touches(done, &path)) {
            break;
        }
        let next = repair(&current, &path, &problem, &read);
        if unknowable(&path) {
            set_aside = true;
        } else {
            problems.push(problem);
        }
        match next {
            Some(next) => current = next,
            None => break,
        }
        repaired.push(path);
    }
    // Empty when the only errors were at values that cannot be judged yet.
    Err(problems)
}

/// The path serde_path_to_error reports, as `Node::find` takes it: list indices `[1]` as `1`, its
/// placeholders for unnamed levels dropped.
pub fn plain_path(problem: &ParamError) -> Vec<String> {
    problem
        .path
        .iter()
        .filter(|s| s.as_str() != "?" && s.as_str() != ".")
        .map(|s| {
            s.strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(s)
                .to_string()
        })
        .collect()
}

/// The keys (list indices as numbers) leading to the value an error is about; for an unknown or a
/// missing field, ending with that field.
pub fn problem_path(problem: &ParamError) -> Vec<String> {
    let mut path = plain_path(problem);
    if let Some(field) = field_named(&problem.message, "unknown field `")
        .or_else(|| field_named(&problem.message, "missing field `"))
    {
        if path.last().map(String::as_str) != Some(field) {
            path.push(field.to_string());
        }
    }
    path
}

fn field_named<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// Whether one path lies on the other's way (equal, or one inside the other).
fn touches(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// The value with the one at `path` set aside: an unknown key removed; a wrong value replaced by
/// a value of another type, the first that `read` accepts there, else removed (it may be optional).
fn repair<T>(
    value: &toml::Value,
    path: &[String],
    problem: &ParamError,
    read: &impl Fn(toml::Value) -> Result<T, ParamError>,
) -> Option<toml::Value> {
    let (last, parent) = path.split_last()?;
    if problem.message.starts_with("unknown field `") {
        let mut next = value.clone();
        match at_mut(&mut next, parent)? {
            toml::Value::Table(table) => table.remove(last)?,
            _ => return None,
        };
        return Some(next);
    }
    // Removal comes last: a required field removed shows only at the end of its table ("missing
    // field"), perhaps after other errors, so a removal is kept only when no other value will do.
    let candidates = [
        Some(toml::Value::String(String::new())),
        Some(toml::Value::Integer(0)),
        Some(toml::Value::Integer(1)),
        Some(toml::Value::Float(0.5)),
        Some(toml::Value::Boolean(false)),
        Some(toml::Value::Array(Vec::new())),
        Some(toml::Value::Table(toml::Table::new())),
        None,
    ];
    candidates.into_iter().find_map(|candidate| {
        let mut next = value.clone();
        match (at_mut(&mut next, parent)?, candidate) {
            (toml::Value::Table(table), None) => {
                table.remove(last)?;
            }
            (toml::Value::Table(table), Some(candidate)) => {
                table.insert(last.clone(), candidate);
            }
            (toml::Value::Array(items), Some(candidate)) => {
                *items.get_mut(last.parse::<usize>().ok()?)? = candidate;
            }
            _ => return None,
        }
        let settled = match read(next.clone()) {
            Ok(_) => true,
            Err(problem) => !touches(&problem_path(&problem), path),
        };
        settled.then_some(next)
    })
}

fn at_mut<'a>(value: &'a mut toml::Value, path: &[String]) -> Option<&'a mut toml::Value> {
    path.iter().try_fold(value, |value, segment| match value {
        toml::Value::Table(table) => table.get_mut(segment),
        toml::Value::Array(items) => items.get_mut(segment.parse::<usize>().ok()?),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Params {
        cmd: String,
        #[serde(default)]
        threads: u32,
        #[serde(default)]
        outputs: Vec<String>,
        inner: Option<Inner>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: u32,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Two {
        first: String,
        second: String,
        #[serde(default)]
        n: u32,
    }

    fn read_as<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T, ParamError> {
        serde_path_to_error::deserialize::<_, T>(value).map_err(|err| ParamError {
            path: err.path().iter().map(|s| s.to_string()).collect(),
            message: err.into_inner().message().to_string(),
        })
    }

    fn read(value: toml::Value) -> Result<Params, ParamError> {
        read_as(value)
    }

    fn problems(text: &str) -> Vec<(String, String)> {
        problems_as::<Params>(text)
    }

    fn problems_as<T: serde::de::DeserializeOwned>(text: &str) -> Vec<(String, String)> {
        let value: toml::Value = toml::from_str(text).unwrap();
        match read_all(value, read_as::<T>, |_| false) {
            Ok(_) => Vec::new(),
            Err(problems) => problems
                .iter()
                .map(|p| (problem_path(p).join("."), p.message.clone()))
                .collect(),
        }
    }

    #[test]
    fn every_mistake_is_found_once_and_repairs_cause_none() {
        let found = problems(
            "cmd = 3\nthreads = \"two\"\ncmdd = 1\noutputs = [\"a\", 2, \"c\", false]\ninner = { size = \"x\", extra = 1 }\n",
        );
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cmd",
                "cmdd",
                "inner.extra",
                "inner.size",
                "outputs.1",
                "outputs.3",
                "threads"
            ],
            "{found:?}"
        );
        assert!(
            !found.iter().any(|(_, m)| m.contains("missing field")),
            "{found:?}"
        );
    }

    #[test]
    fn a_missing_field_is_reported_with_the_others() {
        let found = problems("threads = -1\n");
        let messages: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            messages.iter().any(|m| m.starts_with("missing field `cmd`")),
            "{found:?}"
        );
        assert!(messages.iter().any(|m| m.contains("expected u32")), "{found:?}");
    }

    #[test]
    fn a_required_value_of_the_wrong_type_is_not_also_missing() {
        // `first` removed would only show as missing after `n`'s error: it is replaced instead.
        let found = problems_as::<Two>("first = 4\nn = \"x\"\n");
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["first", "n", "second"], "{found:?}");
        assert!(found[2].1.starts_with("missing field `second`"), "{found:?}");
    }

    #[test]
    fn valid_values_read_and_unknowable_ones_are_not_reported() {
        assert!(problems("cmd = \"x\"\n").is_empty());
        let value: toml::Value = toml::from_str("cmd = \"x\"\nthreads = \"${n}\"\nbad = 1\n").unwrap();
        let found = read_all(value, read, |path| path == ["threads"]).unwrap_err();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].message.starts_with("unknown field `bad`"));
    }
}
