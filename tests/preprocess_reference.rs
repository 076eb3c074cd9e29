//! The whole default pipeline up to preprocessing against nnU-Net 2.8.1's
//! `nnUNetv2_plan_and_preprocess` on the same datasets (tests/fixtures/preprocess/generate.py: a
//! CT + T2 dataset cropped to nonzero, and a single-channel MR one z-scored without a mask):
//! plans.json equal, preprocessed images within 1e-4 of the intensity range, segmentations equal
//! but for ties, cropping and class-location counts equal.

mod common;

use std::path::Path;

use nnflow::data::case_store::read_case;
use nnflow::data::npy;
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn run_pipeline(project: &common::Project, dataset: &str) -> Value {
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        &format!("dataset={dataset}"),
        "--set",
        "configurations=[\"3d_fullres\", \"2d\"]",
        "preprocess",
    ]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    result.json
}

fn outputs(json: &Value, id: &str) -> std::path::PathBuf {
    let stage = json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap();
    stage["outputs"].as_str().unwrap().into()
}

/// Equal JSON, numbers compared as f64 to 1e-6 relative: nnU-Net writes some integers as floats, and
/// sums intensity statistics in float32 where nnflow uses f64 (a 1e-8 relative difference).
fn assert_json_close(ours: &Value, theirs: &Value, path: &str) {
    match (ours, theirs) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{path}: {a} != {b}");
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: lengths differ");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_close(x, y, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            // JSON objects are unordered: serde_json keeps insertion order when a crate in the
            // build enables its `preserve_order` (zarrs does)
            let mut keys_a: Vec<&String> = a.keys().collect();
            let mut keys_b: Vec<&String> = b.keys().collect();
            keys_a.sort();
            keys_b.sort();
            assert_eq!(keys_a, keys_b, "{path}: keys differ");
            for (key, x) in a {
                assert_json_close(x, &b[key], &format!("{path}.{key}"));
            }
        }
        (a, b) => assert_eq!(a, b, "{path}"),
    }
}

#[test]
fn plans_and_preprocessed_cases_match_nnunet() {
    matches_nnunet(&format!("{FIXTURES}/fingerprint/Dataset001_Tiny"), "preprocess");
}

/// One T2 channel with no zero background: nothing is cropped and nnU-Net z-scores every voxel
/// (`use_mask_for_norm` false).
#[test]
fn single_channel_mr_without_a_mask_matches_nnunet() {
    matches_nnunet(
        &format!("{FIXTURES}/preprocess/mr/Dataset002_MR"),
        "preprocess/mr",
    );
    let plans = std::fs::read_to_string(format!("{FIXTURES}/preprocess/mr/plans.json")).unwrap();
    let plans: Value = serde_json::from_str(&plans).unwrap();
    let configuration = &plans["configurations"]["3d_fullres"];
    assert_eq!(
        configuration["normalization_schemes"],
        serde_json::json!(["ZScoreNormalization"])
    );
    assert_eq!(configuration["use_mask_for_norm"], serde_json::json!([false]));
}

/// `dataset` through nnflow's pipeline against nnU-Net's results in `tests/fixtures/<fixtures>`.
fn matches_nnunet(dataset: &str, fixtures: &str) {
    let project = common::Project::new();
    let run = run_pipeline(&project, dataset);
    let plans: Value =
        serde_json::from_str(&std::fs::read_to_string(outputs(&run, "plan").join("plans.json")).unwrap())
            .unwrap();
    let expected_plans: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/{fixtures}/plans.json")).unwrap())
            .unwrap();
    assert_json_close(&plans, &expected_plans, "plans");

    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/{fixtures}/expected.json")).unwrap(),
    )
    .unwrap();
    for (name, properties) in expected.as_object().unwrap() {
        let (configuration, case) = ["3d_fullres", "2d"]
            .into_iter()
            .find_map(|c| Some((c, name.strip_prefix(c)?.strip_prefix('_')?)))
            .unwrap_or_else(|| panic!("{name}: not <configuration>_<case>"));
        let folder = outputs(&run, &format!("preprocess[configuration={configuration}]"));
        let ours = read_case(&folder, case).unwrap();
        let data = npy::read::<f32>(Path::new(&format!("{FIXTURES}/{fixtures}/{name}_data.npy"))).unwrap();
        let seg = npy::read::<i16>(Path::new(&format!("{FIXTURES}/{fixtures}/{name}_seg.npy"))).unwrap();
        assert_eq!(ours.data.shape(), data.shape(), "{name}: image shape");
        let range =
            data.iter().fold(f32::MIN, |m, &v| m.max(v)) - data.iter().fold(f32::MAX, |m, &v| m.min(v));
        let worst = ours
            .data
            .iter()
            .zip(data.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-4 * range,
            "{name}: image differs by {worst} (range {range})"
        );
        let ours_seg = ours.seg.as_ref().unwrap();
        let differing = ours_seg.iter().zip(seg.iter()).filter(|(a, b)| a != b).count();
        assert!(
            differing * 1000 <= seg.len(),
            "{name}: {differing} of {} segmentation voxels differ",
            seg.len()
        );

        let p = &ours.properties;
        let expect = |key: &str| properties[key].clone();
        assert_eq!(
            serde_json::to_value(p.shape_before_cropping).unwrap(),
            expect("shape_before_cropping"),
            "{name}"
        );
        assert_eq!(
            serde_json::to_value(p.bbox_used_for_cropping).unwrap(),
            expect("bbox_used_for_cropping"),
            "{name}"
        );
        assert_eq!(
            serde_json::to_value(p.shape_after_cropping_and_before_resampling).unwrap(),
            expect("shape_after_cropping_and_before_resampling"),
            "{name}"
        );
        // nnU-Net's properties['spacing'] is the image's own spacing as read (export resamples back
        // to it): nnflow's `original_spacing`. The stored arrays' spacing is the plan's, with the
        // image's own z for 2d.
        let spacing: Vec<f64> = serde_json::from_value(expect("spacing")).unwrap();
        assert_eq!(p.original_spacing.len(), spacing.len(), "{name}");
        for (a, b) in p.original_spacing.iter().zip(&spacing) {
            assert!(
                (a - b).abs() < 1e-9,
                "{name}: original spacing {:?} vs {spacing:?}",
                p.original_spacing
            );
        }
        let planned: Vec<f64> =
            serde_json::from_value(expected_plans["configurations"][configuration]["spacing"].clone())
                .unwrap();
        let stored_in_plane = &p.spacing[p.spacing.len() - planned.len()..];
        for (a, b) in stored_in_plane.iter().zip(&planned) {
            assert!(
                (a - b).abs() < 1e-6,
                "{name}: stored spacing {:?} vs planned {planned:?}",
                p.spacing
            );
        }
        let counts: std::collections::BTreeMap<String, usize> = p
            .class_locations
            .as_ref()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect();
        assert_eq!(
            serde_json::to_value(counts).unwrap(),
            expect("class_location_counts"),
            "{name}"
        );
    }
}

#[test]
fn second_run_is_cached_and_a_different_gpu_target_replans_only_what_depends_on_it() {
    let project = common::Project::new();
    run_pipeline(&project, &format!("{FIXTURES}/fingerprint/Dataset001_Tiny"));
    let dataset = format!("dataset={FIXTURES}/fingerprint/Dataset001_Tiny");
    let configurations = "configurations=[\"3d_fullres\", \"2d\"]";
    let again = project.run(&[
        "nnunet.toml",
        "--set",
        &dataset,
        "--set",
        configurations,
        "preprocess",
    ]);
    assert!(again.with_outcome("ran").is_empty(), "{}", again.json);
    let replanned = project.run(&[
        "nnunet.toml",
        "--set",
        &dataset,
        "--set",
        configurations,
        "--set",
        "gpu_memory_gb=4",
        "preprocess",
    ]);
    assert_eq!(replanned.outcome("fingerprint"), "cached");
    assert_eq!(replanned.outcome("plan"), "ran");
}
