//! The whole default pipeline up to preprocessing against nnU-Net 2.8.1's
//! `nnUNetv2_plan_and_preprocess` on the same dataset (tests/fixtures/preprocess/generate.py):
//! plans.json equal, preprocessed images within 1e-4 of the intensity range, segmentations equal
//! but for ties, cropping and class-location counts equal.

mod common;

use std::path::Path;

use nnflow::data::case_store::read_case;
use nnflow::data::npy;
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn run_pipeline(project: &common::Project) -> Value {
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    let dataset = format!("{FIXTURES}/fingerprint/Dataset001_Tiny");
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        &format!("dataset={dataset}"),
        "--set",
        "configurations=[\"3d_fullres\", \"2d\"]",
        "resample",
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
            let keys_a: Vec<&String> = a.keys().collect();
            let keys_b: Vec<&String> = b.keys().collect();
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
    let project = common::Project::new();
    let run = run_pipeline(&project);
    let plans: Value =
        serde_json::from_str(&std::fs::read_to_string(outputs(&run, "plan").join("plans.json")).unwrap())
            .unwrap();
    let expected_plans: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/preprocess/plans.json")).unwrap())
            .unwrap();
    assert_json_close(&plans, &expected_plans, "plans");

    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/preprocess/expected.json")).unwrap(),
    )
    .unwrap();
    for (name, properties) in expected.as_object().unwrap() {
        let (configuration, case) = name.split_at(name.rfind("_tiny").unwrap());
        let case = &case[1..];
        let folder = outputs(&run, &format!("resample[configuration={configuration}]"));
        let ours = read_case(&folder, case).unwrap();
        let data = npy::read::<f32>(Path::new(&format!("{FIXTURES}/preprocess/{name}_data.npy"))).unwrap();
        let seg = npy::read::<i16>(Path::new(&format!("{FIXTURES}/preprocess/{name}_seg.npy"))).unwrap();
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
        let spacing: Vec<f64> = serde_json::from_value(expect("spacing")).unwrap();
        let ours_spacing = if configuration == "2d" {
            p.spacing[1..].to_vec()
        } else {
            p.spacing.to_vec()
        };
        assert_eq!(ours_spacing.len(), spacing.len().min(ours_spacing.len()));
        for (a, b) in p.spacing.iter().rev().zip(spacing.iter().rev()) {
            assert!(
                (a - b).abs() < 1e-9,
                "{name}: spacing {:?} vs {spacing:?}",
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
    run_pipeline(&project);
    let dataset = format!("dataset={FIXTURES}/fingerprint/Dataset001_Tiny");
    let configurations = "configurations=[\"3d_fullres\", \"2d\"]";
    let again = project.run(&[
        "nnunet.toml",
        "--set",
        &dataset,
        "--set",
        configurations,
        "resample",
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
        "resample",
    ]);
    assert_eq!(replanned.outcome("fingerprint"), "cached");
    assert_eq!(replanned.outcome("plan"), "ran");
}
