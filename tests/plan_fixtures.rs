//! Plans every fixture under tests/fixtures/plan/ and compares the whole plans.json with the one
//! nnU-Net v2.8.1's ExperimentPlanner wrote for the same dataset.json + dataset_fingerprint.json
//! (see tests/fixtures/plan/generate.py). Integers must be equal and of the same JSON kind (nnU-Net
//! writes some shapes as floats), floats equal to 1e-9 relative.

use std::path::{Path, PathBuf};

use nnflow::preprocess::fingerprint_format::Fingerprint;
use nnflow::preprocess::plan::{plan, PlanInputs, PlanSettings, Planner};
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

/// nnflow's plan of a fixture dataset (its dataset.json, fingerprint and name) with `settings`.
fn plan_dataset(
    dataset: &Value,
    fingerprint: &Fingerprint,
    raw_settings: &Value,
    settings: &PlanSettings,
) -> Value {
    let names = channel_names(dataset);
    let inputs = PlanInputs {
        fingerprint,
        channel_names: &names,
        labels: dataset["labels"].clone(),
        num_training_cases: dataset["numTraining"].as_u64().expect("numTraining") as usize,
        dataset_name: raw_settings["dataset_name"].as_str().expect("dataset_name"),
        file_ending: dataset["file_ending"].as_str().expect("file_ending"),
    };
    plan(&inputs, settings).expect("planning failed")
}

fn plan_fixture(dir: &Path) -> (Value, Value) {
    let dataset = read_json(&dir.join("dataset.json"));
    let fingerprint: Fingerprint =
        serde_json::from_value(read_json(&dir.join("dataset_fingerprint.json"))).expect("fingerprint");
    let raw_settings = read_json(&dir.join("settings.json"));
    let expected = read_json(&dir.join("plans.json"));
    let got = plan_dataset(
        &dataset,
        &fingerprint,
        &raw_settings,
        &settings_from(&raw_settings),
    );
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

/// Every fixture folder (one holding nnU-Net's `plans.json`), sorted.
fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("plans.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn plans_match_nnunet_for_every_fixture() {
    let dirs = fixture_dirs();
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

/// The residual-encoder presets and the suffix of their fixture files (`resenc_M.plans.json`, ...).
const RESENC_PRESETS: [(Planner, &str); 3] = [
    (Planner::ResEncM, "M"),
    (Planner::ResEncL, "L"),
    (Planner::ResEncXL, "XL"),
];

/// Plans `dir`'s dataset with a ResEnc preset, with the settings nnU-Net's planner got
/// (`resenc_<suffix>.settings.json`), and returns it with what that planner wrote.
fn plan_resenc_fixture(dir: &Path, planner: Planner, suffix: &str) -> (Value, Value) {
    let dataset = read_json(&dir.join("dataset.json"));
    let fingerprint: Fingerprint =
        serde_json::from_value(read_json(&dir.join("dataset_fingerprint.json"))).expect("fingerprint");
    let raw_settings = read_json(&dir.join(format!("resenc_{suffix}.settings.json")));
    let expected = read_json(&dir.join(format!("resenc_{suffix}.plans.json")));
    let mut settings = PlanSettings::for_planner(planner);
    if let Some(gb) = raw_settings.get("gpu_memory_target_in_gb") {
        settings.gpu_memory_target_gb = gb.as_f64().expect("gpu target");
    }
    if let Some(spacing) = raw_settings.get("overwrite_target_spacing") {
        let v: Vec<f64> = serde_json::from_value(spacing.clone()).expect("spacing");
        settings.overwrite_target_spacing = Some([v[0], v[1], v[2]]);
    }
    let got = plan_dataset(&dataset, &fingerprint, &raw_settings, &settings);
    (got, expected)
}

#[test]
fn resenc_plans_match_nnunet_for_every_fixture() {
    // Every fixture of the default planner is also planned by nnUNetPlannerResEncM/L/XL
    // (generate.py), so the presets see the same isotropic, anisotropic, 2D-only, tiny, lowres and
    // cascade cases.
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 6, "found {} plan fixtures", dirs.len());

    let mut failures = Vec::new();
    for dir in &dirs {
        for (planner, suffix) in RESENC_PRESETS {
            assert!(
                dir.join(format!("resenc_{suffix}.plans.json")).is_file(),
                "{}: no resenc_{suffix}.plans.json (run generate.py)",
                dir.display()
            );
            let (got, expected) = plan_resenc_fixture(dir, planner, suffix);
            let mut differences = Vec::new();
            diff("", &got, &expected, &mut differences);
            if !differences.is_empty() {
                failures.push(format!(
                    "{} ({}):\n  {}",
                    dir.display(),
                    planner.class_name(),
                    differences.join("\n  ")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "ResEnc plans differ from nnU-Net:\n{}",
        failures.join("\n")
    );
}

#[test]
fn resenc_fixtures_cover_presets_lowres_and_no_3d_cases() {
    // Guards the ResEnc fixtures: each preset's own names and network, and the cascade and
    // 2D-only branches.
    for (planner, suffix) in RESENC_PRESETS {
        let read = |name: &str| {
            read_json(
                &fixture_dir()
                    .join(name)
                    .join(format!("resenc_{suffix}.plans.json")),
            )
        };
        let large = read("large_ct");
        assert_eq!(large["experiment_planner_used"], planner.class_name());
        assert_eq!(large["plans_name"], planner.default_plans_name());
        let configs = large["configurations"].as_object().unwrap();
        assert!(configs.contains_key("3d_lowres"), "{suffix}: no 3d_lowres");
        assert_eq!(
            configs["3d_lowres"]["data_identifier"],
            format!("{}_3d_lowres", planner.default_plans_name())
        );
        assert_eq!(configs["3d_fullres"]["data_identifier"], "nnUNetPlans_3d_fullres");
        assert_eq!(
            configs["3d_fullres"]["architecture"]["network_class_name"],
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        );
        let two_d = read("two_d");
        let keys: Vec<&String> = two_d["configurations"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["2d"]);
    }
}

#[test]
fn resenc_plans_are_readable_as_plans() {
    // The planned JSON reads as nnflow's typed plans, with ResidualEncoderUNet kwargs.
    let (got, _) = plan_resenc_fixture(&fixture_dir().join("anisotropic"), Planner::ResEncL, "L");
    let plans = nnflow::plans::Plans::from_json(&got, "plans.json").expect("typed plans");
    let fullres = plans.configuration("3d_fullres").expect("3d_fullres");
    let architecture = fullres.architecture().expect("architecture");
    let nnflow::plans::NetworkKwargs::ResidualEncoderUNet(kwargs) = &architecture.arch_kwargs else {
        panic!("not typed as ResidualEncoderUNet: {architecture:?}");
    };
    assert_eq!(kwargs.n_blocks_per_stage[..3], [1, 3, 4]);
    assert_eq!(kwargs.n_conv_per_stage_decoder.len() + 1, kwargs.n_stages);
}
