//! The plan stage's `plans_from` (issue 16): another dataset's plans moved onto this one, as nnU-Net
//! v2.8.1's `nnUNetv2_move_plans_between_datasets` does. The stage's plans.json must equal what
//! nnU-Net wrote for the same source plans and target dataset (tests/fixtures/plan_transfer/,
//! generate.py there): the same values and the same key order. Bad sources fail the stage naming the
//! files; planner parameters next to `plans_from` fail at load time; normalize and resample run on a
//! transferred plan, with the source's spacing and CT statistics.

mod common;

use std::path::{Path, PathBuf};

use common::{stderr, Project};
use nnflow::data::case_store::{list_cases, read_case};
use nnflow::data::nifti;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A path as a TOML string.
fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// The cases of tests/fixtures/plan_transfer/, sorted.
fn cases() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures().join("plan_transfer"))
        .expect("fixture folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("plans.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// A project holding the case's target dataset (its dataset.json, in a folder of the target's
/// name: nnflow names the plans after the folder) and `p.toml` with one plan stage moving the
/// case's source plans onto it, with the case's target identifier.
fn transfer_project(case: &Path) -> Project {
    let settings = read_json(&case.join("settings.json"));
    let target = settings["target_dataset_name"].as_str().unwrap();
    let project = Project::new();
    project.write(
        &format!("{target}/dataset.json"),
        &std::fs::read_to_string(case.join("dataset.json")).unwrap(),
    );
    let fingerprint = fixtures().join(settings["target_dataset"].as_str().unwrap());
    let source = fixtures().join(settings["source_plans"].as_str().unwrap());
    let mut pipeline = format!(
        "[stages.plan]\nkind = \"plan\"\ndataset = \"{target}\"\nfingerprint = {}\nplans_from = {}\n",
        toml_path(&fingerprint),
        toml_path(&source)
    );
    if let Some(name) = settings["target_plans_identifier"].as_str() {
        pipeline.push_str(&format!("plans_name = \"{name}\"\n"));
    }
    project.write("p.toml", &pipeline);
    project
}

/// Every difference between two JSON values as "path: got vs expected". Key order is not one:
/// nnflow writes plans.json with sorted keys, nnU-Net's transfer keeps its own order.
fn differences(path: &str, got: &Value, expected: &Value, out: &mut Vec<String>) {
    match (got, expected) {
        (Value::Object(g), Value::Object(e)) => {
            let (mut gk, mut ek): (Vec<_>, Vec<_>) = (g.keys().collect(), e.keys().collect());
            gk.sort();
            ek.sort();
            if gk != ek {
                out.push(format!("{path}: keys {gk:?} vs {ek:?}"));
            }
            for (key, ev) in e {
                if let Some(gv) = g.get(key) {
                    differences(&format!("{path}.{key}"), gv, ev, out);
                }
            }
        }
        (Value::Array(g), Value::Array(e)) if g.len() == e.len() => {
            for (i, (gv, ev)) in g.iter().zip(e).enumerate() {
                differences(&format!("{path}[{i}]"), gv, ev, out);
            }
        }
        // Numbers too: a transfer copies them, so they must come back exactly, of the same kind
        // (serde_json's `1` and `1.0` differ).
        _ if got == expected => {}
        _ => out.push(format!("{path}: {got} vs {expected}")),
    }
}

#[test]
fn transferred_plans_equal_nnunets_move_plans_between_datasets() {
    let cases = cases();
    assert_eq!(cases.len(), 3, "{cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let project = transfer_project(case);
        let result = project.run(&["p.toml"]);
        assert_eq!(
            result.code,
            0,
            "{}: {}\n{}",
            case.display(),
            result.json,
            result.stderr
        );
        let out = project.path().join(".nnflow/p/out/plan");
        let got = read_json(&out.join("plans.json"));
        let mut found = Vec::new();
        differences("", &got, &read_json(&case.join("plans.json")), &mut found);
        if !found.is_empty() {
            failures.push(format!("{}:\n  {}", case.display(), found.join("\n  ")));
        }
        // The target's own fingerprint and dataset.json lie beside the plans, as in nnU-Net's
        // preprocessed folder.
        let settings = read_json(&case.join("settings.json"));
        let fingerprint = fixtures().join(settings["target_fingerprint"].as_str().unwrap());
        assert_eq!(
            read_json(&out.join("dataset_fingerprint.json")),
            read_json(&fingerprint)
        );
        assert_eq!(
            read_json(&out.join("dataset.json")),
            read_json(&case.join("dataset.json"))
        );
    }
    assert!(
        failures.is_empty(),
        "plans differ from nnU-Net's:\n{}",
        failures.join("\n")
    );
}

#[test]
fn fixtures_pin_what_nnunet_changes_and_keeps() {
    // The comparison above means something only if nnU-Net's output differs from the source in
    // exactly the fields it moves, and keeps the fingerprint-derived ones from the source.
    for case in cases() {
        let settings = read_json(&case.join("settings.json"));
        let source = read_json(&fixtures().join(settings["source_plans"].as_str().unwrap()));
        let expected = read_json(&case.join("plans.json"));
        let target_fingerprint =
            read_json(&fixtures().join(settings["target_fingerprint"].as_str().unwrap()));
        assert_ne!(
            source["dataset_name"],
            expected["dataset_name"],
            "{}",
            case.display()
        );
        assert_eq!(expected["dataset_name"], settings["target_dataset_name"]);
        for kept in [
            "original_median_spacing_after_transp",
            "original_median_shape_after_transp",
            "transpose_forward",
            "foreground_intensity_properties_per_channel",
        ] {
            assert_eq!(source[kept], expected[kept], "{}: {kept}", case.display());
        }
        assert_ne!(
            expected["foreground_intensity_properties_per_channel"],
            target_fingerprint["foreground_intensity_properties_per_channel"],
            "{}",
            case.display()
        );
        let patch = |plans: &Value| plans["configurations"]["3d_fullres"]["patch_size"].clone();
        assert_eq!(patch(&source), patch(&expected));
    }
    let renamed = read_json(&fixtures().join("plan_transfer/large_ct_resenc_to_tiny_nibabel/plans.json"));
    assert_eq!(renamed["plans_name"], "nnUNetResEncMPretrain");
    assert_eq!(renamed["image_reader_writer"], "NibabelIOWithReorient");
    let identifier = |c: &str| renamed["configurations"][c]["data_identifier"].clone();
    assert_eq!(identifier("2d"), "nnUNetResEncMPretrain_nnUNetPlans_2d");
    assert_eq!(identifier("3d_lowres"), "nnUNetResEncMPretrain_3d_lowres");
}

/// Runs the plan stage of `project` with `plans_from` set to `source`; the run's JSON report as
/// text, after checking that the stage failed and wrote no plans.
fn failing_transfer(project: &Project, source: &str) -> String {
    let result = project.run(&[
        "p.toml",
        "--set",
        &format!("plan.plans_from={}", toml_path(Path::new(source))),
    ]);
    assert_eq!(result.code, 1, "{}\n{}", result.json, result.stderr);
    assert_eq!(result.outcome("plan"), "failed");
    assert!(!project.path().join(".nnflow/p/out/plan/plans.json").exists());
    result.json.to_string()
}

#[test]
fn a_bad_source_fails_the_stage_naming_the_files() {
    let project = transfer_project(&fixtures().join("plan_transfer/isotropic_to_tiny"));

    let missing = failing_transfer(&project, "elsewhere/nnUNetPlans.json");
    assert!(missing.contains("elsewhere/nnUNetPlans.json"), "{missing}");
    // A folder is read as holding plans.json.
    std::fs::create_dir_all(project.path().join("empty")).unwrap();
    let folder = failing_transfer(&project, "empty");
    assert!(folder.contains("empty/plans.json"), "{folder}");

    let dataset_json = fixtures().join("plan/tiny/dataset.json");
    let not_plans = failing_transfer(&project, &dataset_json.display().to_string());
    assert!(
        not_plans.contains(&format!(
            "plans_from: not an nnU-Net plans.json: {}: missing field `dataset_name`",
            dataset_json.display()
        )),
        "{not_plans}"
    );

    // Three channels planned, one in the target: nnU-Net would fail in preprocessing.
    let multichannel = fixtures().join("plan/multichannel/plans.json");
    let mismatch = failing_transfer(&project, &multichannel.display().to_string());
    let target = project.path().join("Dataset904_tiny/dataset.json");
    assert!(
        mismatch.contains(&format!(
            "plans_from: {}: configuration `2d` plans 3 normalization scheme(s) per channel, but {} \
             lists 1 channel(s) (`MRI`)",
            multichannel.display(),
            target.display()
        )),
        "{mismatch}"
    );
    let entries = std::fs::read_dir(project.cache.join("entries")).map_or(0, |e| e.count());
    assert_eq!(entries, 0, "nothing is cached");
}

#[test]
fn planner_parameters_next_to_plans_from_fail_at_load_time() {
    let project = transfer_project(&fixtures().join("plan_transfer/isotropic_to_tiny"));
    for set in [
        "plan.planner=\"ResEncL\"",
        "plan.overwrite_target_spacing=[1.0, 1.0, 1.0]",
    ] {
        let output = project.nnflow(&["validate", "p.toml", "--set", set]);
        let report = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{set}: {report}");
        let key = set["plan.".len()..].split('=').next().unwrap();
        assert!(
            report.contains(&format!(
                "`{key}` chooses how to plan, but with `plans_from` the plans are transferred, not \
                 planned"
            )),
            "{set}: {report}"
        );
    }
    for set in [None, Some("plan.gpu_memory_gb=24")] {
        let mut args = vec!["validate", "p.toml"];
        args.extend(set.iter().flat_map(|set| ["--set", *set]));
        let output = project.nnflow(&args);
        assert_eq!(output.status.code(), Some(0), "{set:?}: {}", stderr(&output));
    }
}

/// Pretraining on `A`, fine-tuning on `B`: B's plan is A's, and B's cases are normalized and
/// resampled with it.
const DOWNSTREAM: &str = r#"
[stages.fingerprint_a]
kind = "fingerprint"
dataset = "A"
foreground_samples = 20000
[stages.plan_a]
kind = "plan"
dataset = "A"
fingerprint = "${fingerprint_a.outputs}"
[stages.fingerprint_b]
kind = "fingerprint"
dataset = "B"
foreground_samples = 20000
[stages.plan_b]
kind = "plan"
dataset = "B"
fingerprint = "${fingerprint_b.outputs}"
plans_from = "${plan_a.outputs}"
plans_name = "nnUNetPlansFromA"
[stages.normalize]
kind = "normalize"
dataset = "B"
plan = "${plan_b.outputs}"
configuration = "3d_fullres"
[stages.resample]
kind = "resample"
dataset = "B"
source = "${normalize.outputs}"
plan = "${plan_b.outputs}"
configuration = "3d_fullres"
"#;

fn synth(project: &Project, name: &str, shape: &str, spacing: &str) {
    let output = project.nnflow(&[
        "synth",
        name,
        "--cases",
        "2",
        "--shape",
        shape,
        "--spacing",
        spacing,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn normalize_and_resample_run_with_a_transferred_plan() {
    let project = Project::with_pipeline(DOWNSTREAM);
    synth(&project, "A", "12,20,20", "3,1,1");
    synth(&project, "B", "16,16,16", "1,1,1");
    // B's intensities lie far above A's: CT normalization with A's statistics (as nnU-Net does)
    // clips every voxel to A's upper percentile, with B's own it would not.
    for case in ["case_000", "case_001"] {
        let image = project.path().join(format!("B/imagesTr/{case}_0000.nii.gz"));
        let volume = nifti::read(&image).unwrap();
        nifti::write(&image, &volume.data.mapv(|v| v + 5000.0), &volume.header).unwrap();
    }

    let result = project.run(&["p.toml"]);
    assert_eq!(result.code, 0, "{}\n{}", result.json, result.stderr);
    let out = project.path().join(".nnflow/p/out");
    let plan_a = read_json(&out.join("plan_a/plans.json"));
    let plan_b = read_json(&out.join("plan_b/plans.json"));
    assert_eq!(plan_b["dataset_name"], "B");
    assert_eq!(plan_b["plans_name"], "nnUNetPlansFromA");
    let fullres = |plans: &Value, key: &str| plans["configurations"]["3d_fullres"][key].clone();
    for key in [
        "patch_size",
        "spacing",
        "batch_size",
        "architecture",
        "normalization_schemes",
    ] {
        assert_eq!(fullres(&plan_b, key), fullres(&plan_a, key), "{key}");
    }
    assert_eq!(fullres(&plan_b, "data_identifier"), "nnUNetPlansFromA_3d_fullres");
    let stats = &plan_a["foreground_intensity_properties_per_channel"]["0"];
    assert_eq!(&plan_b["foreground_intensity_properties_per_channel"]["0"], stats);

    // Resampled to A's spacing, not B's 1 mm.
    let spacing: Vec<f64> = serde_json::from_value(fullres(&plan_a, "spacing")).unwrap();
    assert!(spacing.iter().any(|&s| s > 2.0), "{spacing:?}");
    let resampled = out.join("resample");
    assert_eq!(list_cases(&resampled), ["case_000", "case_001"]);
    let case = read_case(&resampled, "case_000").unwrap();
    assert!(case.properties.normalized && case.properties.resampled);
    assert_eq!(case.properties.spacing.to_vec(), spacing);
    assert_eq!(case.properties.original_spacing, [1.0, 1.0, 1.0]);

    // Normalized with A's CT statistics: every voxel clipped to A's 99.5th percentile.
    let number = |key: &str| stats[key].as_f64().unwrap();
    let clipped = (number("percentile_99_5") - number("mean")) / number("std");
    let normalized = read_case(&out.join("normalize"), "case_000").unwrap();
    for &v in normalized.data.iter() {
        assert!((f64::from(v) - clipped).abs() < 1e-4, "{v} vs {clipped}");
    }

    // A second run is all cache hits; a changed source plan re-plans B and redoes its cases.
    let again = project.run(&["p.toml"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.with_outcome("ran").is_empty(), "{}", again.json);
    let changed = project.run(&[
        "p.toml",
        "--set",
        "plan_a.overrides={ \"3d_fullres\" = { batch_size = 3 } }",
    ]);
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    assert_eq!(
        changed.with_outcome("ran"),
        ["normalize", "plan_a", "plan_b", "resample"]
    );
    let plan_b = read_json(&out.join("plan_b/plans.json"));
    assert_eq!(fullres(&plan_b, "batch_size"), 3);
}
