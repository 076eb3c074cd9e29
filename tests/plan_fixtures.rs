//! Plans every fixture under tests/fixtures/plan/ and compares the whole plans.json with the one
//! nnU-Net v2.8.1's ExperimentPlanner wrote for the same dataset.json + dataset_fingerprint.json
//! (see tests/fixtures/plan/generate.py). Integers must be equal and of the same JSON kind (nnU-Net
//! writes some shapes as floats), floats equal to 1e-9 relative.

use std::path::{Path, PathBuf};

use nnflow::preprocess::fingerprint_format::Fingerprint;
use nnflow::preprocess::plan::{plan, PlanInputs, PlanSettings};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// dataset.json `channel_names` values ordered by their numeric channel key.
fn channel_names(dataset: &Value) -> Vec<String> {
    let mut channels: Vec<(usize, String)> = dataset["channel_names"]
        .as_object()
        .expect("channel_names")
        .iter()
        .map(|(k, v)| {
            (
                k.parse().expect("numeric channel key"),
                v.as_str().expect("name").to_string(),
            )
        })
        .collect();
    channels.sort();
    channels.into_iter().map(|(_, name)| name).collect()
}

fn settings_from(raw: &Value) -> PlanSettings {
    let mut settings = PlanSettings::default();
    if let Some(gb) = raw.get("gpu_memory_target_in_gb") {
        settings.gpu_memory_target_gb = gb.as_f64().expect("gpu target");
    }
    if let Some(name) = raw.get("plans_name") {
        settings.plans_name = name.as_str().expect("plans name").into();
    }
    if let Some(spacing) = raw.get("overwrite_target_spacing") {
        let v: Vec<f64> = serde_json::from_value(spacing.clone()).expect("spacing");
        settings.overwrite_target_spacing = Some([v[0], v[1], v[2]]);
    }
    settings
}

fn plan_fixture(dir: &Path) -> (Value, Value) {
    let dataset = read_json(&dir.join("dataset.json"));
    let fingerprint: Fingerprint =
        serde_json::from_value(read_json(&dir.join("dataset_fingerprint.json"))).expect("fingerprint");
    let raw_settings = read_json(&dir.join("settings.json"));
    let expected = read_json(&dir.join("plans.json"));
    let names = channel_names(&dataset);
    let inputs = PlanInputs {
        fingerprint: &fingerprint,
        channel_names: &names,
        labels: dataset["labels"].clone(),
        num_training_cases: dataset["numTraining"].as_u64().expect("numTraining") as usize,
        dataset_name: raw_settings["dataset_name"].as_str().expect("dataset_name"),
        file_ending: dataset["file_ending"].as_str().expect("file_ending"),
    };
    let got = plan(&inputs, &settings_from(&raw_settings)).expect("planning failed");
    (got, expected)
}

/// Collects every difference between `got` and `expected` as "path: got vs expected".
fn diff(path: &str, got: &Value, expected: &Value, out: &mut Vec<String>) {
    match (got, expected) {
        (Value::Object(g), Value::Object(e)) => {
            for key in g.keys().chain(e.keys().filter(|k| !g.contains_key(*k))) {
                let child = format!("{path}.{key}");
                match (g.get(key), e.get(key)) {
                    (Some(gv), Some(ev)) => diff(&child, gv, ev, out),
                    (gv, ev) => out.push(format!("{child}: {gv:?} vs {ev:?}")),
                }
            }
        }
        (Value::Array(g), Value::Array(e)) if g.len() == e.len() => {
            for (i, (gv, ev)) in g.iter().zip(e).enumerate() {
                diff(&format!("{path}[{i}]"), gv, ev, out);
            }
        }
        (Value::Number(g), Value::Number(e)) => {
            let same_kind = g.is_f64() == e.is_f64();
            let (gf, ef) = (g.as_f64().unwrap_or(f64::NAN), e.as_f64().unwrap_or(f64::NAN));
            let close = if g.is_f64() {
                (gf - ef).abs() <= 1e-9 * ef.abs().max(1.0)
            } else {
                g == e
            };
            if !(same_kind && close) {
                out.push(format!("{path}: {g} vs {e}"));
            }
        }
        _ if got == expected => {}
        _ => out.push(format!("{path}: {got} vs {expected}")),
    }
}

#[test]
fn plans_match_nnunet_for_every_fixture() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("plans.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 6,
        "expected at least six plan fixtures, found {}",
        dirs.len()
    );

    let mut failures = Vec::new();
    for dir in &dirs {
        let (got, expected) = plan_fixture(dir);
        let mut differences = Vec::new();
        diff("", &got, &expected, &mut differences);
        if !differences.is_empty() {
            failures.push(format!("{}:\n  {}", dir.display(), differences.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "plans differ from nnU-Net:\n{}",
        failures.join("\n")
    );
}

#[test]
fn fixtures_cover_lowres_and_no_3d_cases() {
    // Guards the fixture set itself: the comparisons above only mean something if the interesting
    // branches are exercised.
    let configs = |name: &str| {
        let plans = read_json(&fixture_dir().join(name).join("plans.json"));
        let mut keys: Vec<String> = plans["configurations"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        configs("large_ct"),
        ["2d", "3d_cascade_fullres", "3d_fullres", "3d_lowres"]
    );
    assert_eq!(configs("two_d"), ["2d"]);
    assert_eq!(configs("lowres_dropped"), ["2d", "3d_fullres"]);
}

#[test]
fn comparison_detects_a_wrong_patch_size() {
    let (mut got, expected) = plan_fixture(&fixture_dir().join("isotropic"));
    got["configurations"]["3d_fullres"]["patch_size"][0] = Value::from(96);
    let mut differences = Vec::new();
    diff("", &got, &expected, &mut differences);
    assert_eq!(differences.len(), 1, "{differences:?}");
}
