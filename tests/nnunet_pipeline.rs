//! The nnU-Net stages through the engine, on small synthetic datasets: targets, stage order,
//! bad datasets, and the dataset commands.

mod common;

use std::path::Path;

use common::{stderr, stdout, Project};
use nnflow::data::case_store::{list_cases, read_case};

fn project_with_dataset(cases: usize) -> Project {
    let project = Project::new();
    let output = project.nnflow(&[
        "synth",
        "D",
        "--cases",
        &cases.to_string(),
        "--shape",
        "12,20,20",
        "--spacing",
        "3,1,1",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    project
}

const FEW_SAMPLES: &str = "fingerprint.foreground_samples=20000";

#[test]
fn the_plan_target_runs_fingerprint_and_plan_only() {
    let project = project_with_dataset(3);
    let result = project.run(&["nnunet.toml", "--set", "dataset=D", "--set", FEW_SAMPLES, "plan"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.with_outcome("ran"), ["fingerprint", "plan"]);
    let plan_outputs = project.path().join(".nnflow/nnunet/out/plan");
    for file in ["plans.json", "dataset_fingerprint.json", "dataset.json"] {
        assert!(plan_outputs.join(file).is_file(), "{file}");
    }
    let plans: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/nnunet/out/plan/plans.json")).unwrap();
    assert_eq!(plans["dataset_name"], "D");
    assert!(plans["configurations"]["3d_fullres"]["patch_size"].is_array());
}

#[test]
fn plan_overrides_replace_planned_values() {
    let project = project_with_dataset(3);
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        FEW_SAMPLES,
        "--set",
        "plan.overrides={ \"3d_fullres\" = { batch_size = 7 } }",
        "plan",
    ]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    let plans: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/nnunet/out/plan/plans.json")).unwrap();
    assert_eq!(plans["configurations"]["3d_fullres"]["batch_size"], 7);
    // An nnU-Net configuration this plan does not have (small images: no cascade) fails the plan
    // stage; a name nnU-Net never plans fails at load time (tests/bad_values.rs).
    let unplanned = project.run(&[
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        FEW_SAMPLES,
        "--set",
        "plan.overrides={ \"3d_lowres\" = { batch_size = 7 } }",
        "plan",
    ]);
    assert_eq!(unplanned.code, 1);
    assert!(
        unplanned
            .json
            .to_string()
            .contains("no configuration `3d_lowres`"),
        "{}",
        unplanned.json
    );
}

#[test]
fn issue_15_an_override_the_plan_types_refuse_fails_the_plan_stage_naming_the_key() {
    let project = project_with_dataset(3);
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        FEW_SAMPLES,
        "--set",
        "plan.overrides={ \"3d_fullres\" = { patch_size = [\"big\", 64, 64] } }",
        "plan",
    ]);
    assert_eq!(result.code, 1, "{}", result.stderr);
    assert!(
        result
            .json
            .to_string()
            .contains("overrides: plans.json: `configurations.3d_fullres.patch_size[0]`: invalid type"),
        "{}",
        result.json
    );
    assert!(!project.path().join(".nnflow/nnunet/out/plan/plans.json").exists());
}

#[test]
fn resample_and_normalize_compose_in_either_order() {
    let project = project_with_dataset(2);
    project.write(
        "reversed.toml",
        r#"
[stages.fingerprint]
kind = "fingerprint"
dataset = "D"
foreground_samples = 20000
[stages.plan]
kind = "plan"
dataset = "D"
fingerprint = "${fingerprint.outputs}"
[stages.resample]
kind = "resample"
dataset = "D"
plan = "${plan.outputs}"
configuration = "3d_fullres"
[stages.normalize]
kind = "normalize"
dataset = "D"
source = "${resample.outputs}"
plan = "${plan.outputs}"
configuration = "3d_fullres"
"#,
    );
    let result = project.run(&["reversed.toml"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    let folder = project.path().join(".nnflow/reversed/out/normalize");
    let ids = list_cases(&folder);
    assert_eq!(ids, ["case_000", "case_001"]);
    let case = read_case(&folder, "case_000").unwrap();
    assert!(case.properties.normalized && case.properties.resampled);
    assert!(case.properties.class_locations.is_some());
    // CT normalization: values are standardized with the dataset's foreground statistics.
    let mean = case.data.iter().sum::<f32>() / case.data.len() as f32;
    assert!(mean.abs() < 5.0, "{mean}");

    // Normalizing twice is refused, naming the case.
    project.write(
        "twice.toml",
        &project.read("reversed.toml").replace("[stages.normalize]", "[stages.again]\nkind = \"normalize\"\ndataset = \"D\"\nsource = \"${normalize.outputs}\"\nplan = \"${plan.outputs}\"\nconfiguration = \"3d_fullres\"\n[stages.normalize]"),
    );
    let twice = project.run(&["twice.toml"]);
    assert_eq!(twice.code, 1);
    assert!(
        twice.json.to_string().contains("already normalized"),
        "{}",
        twice.json
    );
}

#[test]
fn a_bad_dataset_fails_the_fingerprint_with_every_bad_case_and_caches_nothing() {
    let project = project_with_dataset(4);
    // case_001: truncated image; case_002: a label value dataset.json does not declare.
    let image = project.path().join("D/imagesTr/case_001_0000.nii.gz");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&image, &bytes[..bytes.len() / 2]).unwrap();
    let label_path = project.path().join("D/labelsTr/case_002.nii.gz");
    let (label, header) = nnflow::data::nifti::read_integer_labels(&label_path).unwrap();
    nnflow::data::nifti::write(
        &label_path,
        &label.mapv(|v| if v == 1 { 7u8 } else { v as u8 }),
        &header,
    )
    .unwrap();

    let result = project.run(&["nnunet.toml", "--set", "dataset=D", "--set", FEW_SAMPLES]);
    assert_eq!(result.code, 1);
    assert_eq!(result.outcome("fingerprint"), "failed");
    let error = result.json.to_string();
    assert!(
        error.contains("case case_001") && error.contains("case_001_0000.nii.gz"),
        "{error}"
    );
    assert!(
        error.contains("case case_002: label values [7] are not declared"),
        "{error}"
    );
    assert!(!project.path().join(".nnflow/nnunet/out/fingerprint").exists());
    let entries = std::fs::read_dir(project.cache.join("entries")).map_or(0, |e| e.count());
    assert_eq!(entries, 0, "nothing is cached");

    let check = project.nnflow(&["check", "D"]);
    assert_eq!(check.status.code(), Some(2));
    assert!(
        stderr(&check).contains("2 problem(s) in the dataset"),
        "{}",
        stderr(&check)
    );
}

#[test]
fn import_builds_a_dataset_from_plain_folders() {
    let project = project_with_dataset(2);
    std::fs::create_dir_all(project.path().join("scans")).unwrap();
    std::fs::create_dir_all(project.path().join("masks")).unwrap();
    for (case, name) in [("case_000", "alice"), ("case_001", "bob")] {
        std::fs::copy(
            project.path().join(format!("D/imagesTr/{case}_0000.nii.gz")),
            project.path().join(format!("scans/{name}.nii.gz")),
        )
        .unwrap();
        std::fs::copy(
            project.path().join(format!("D/labelsTr/{case}.nii.gz")),
            project.path().join(format!("masks/{name}.nii.gz")),
        )
        .unwrap();
    }
    let output = project.nnflow(&[
        "import",
        "--images",
        "scans",
        "--channel",
        "CT",
        "--labels",
        "masks",
        "--label",
        "background=0",
        "--label",
        "liver=1",
        "--label",
        "tumour=2",
        "--out",
        "Dataset002_Imported",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("imported 2 cases"));
    let json: serde_json::Value =
        serde_json::from_str(&project.read("Dataset002_Imported/dataset.json")).unwrap();
    assert_eq!(json["labels"]["tumour"], 2);
    assert_eq!(json["channel_names"]["0"], "CT");
    assert!(project
        .path()
        .join("Dataset002_Imported/imagesTr/bob_0000.nii.gz")
        .is_file());
    let check = project.nnflow(&["check", "Dataset002_Imported"]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));

    let refused = project.nnflow(&[
        "import",
        "--images",
        "scans",
        "--channel",
        "CT",
        "--labels",
        "masks",
        "--label",
        "background=0",
        "--out",
        "Dataset003_Bad",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("not declared"), "{}", stderr(&refused));
    assert!(!project.path().join("Dataset003_Bad").exists());
}

/// `preprocess` (one pass per case) gives exactly the cases `normalize` then `resample` give, for
/// cases off the target grid (resampled) and on it (left as they are); `resample` links the arrays
/// of cases on the grid instead of writing them again.
#[test]
fn preprocess_equals_normalize_then_resample_and_cases_on_the_grid_are_linked() {
    let project = Project::new();
    let synth = [
        "synth",
        "D",
        "--cases",
        "3",
        "--shape",
        "10,16,16",
        "--spacing",
        "3,1,1",
        "--spacing-variation",
        "0.2",
    ];
    assert_eq!(project.nnflow(&synth).status.code(), Some(0));
    project.write(
        "steps.toml",
        r#"
[stages.fingerprint]
kind = "fingerprint"
dataset = "D"
foreground_samples = 20000
[stages.plan]
kind = "plan"
dataset = "D"
fingerprint = "${fingerprint.outputs}"
[stages.normalize]
kind = "normalize"
dataset = "D"
plan = "${plan.outputs}"
configuration = "3d_fullres"
[stages.resample]
kind = "resample"
dataset = "D"
source = "${normalize.outputs}"
plan = "${plan.outputs}"
configuration = "3d_fullres"
[stages.preprocess]
kind = "preprocess"
dataset = "D"
plan = "${plan.outputs}"
configuration = "3d_fullres"
"#,
    );
    let result = project.run(&["steps.toml"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    let out = project.path().join(".nnflow/steps/out");
    let (normalized, resampled, preprocessed) = (
        out.join("normalize"),
        out.join("resample"),
        out.join("preprocess"),
    );
    assert_eq!(list_cases(&preprocessed), list_cases(&resampled));
    let (mut moved, mut linked) = (0, 0);
    for id in list_cases(&resampled) {
        let before = read_case(&normalized, &id).unwrap();
        let after = read_case(&resampled, &id).unwrap();
        assert_eq!(read_case(&preprocessed, &id).unwrap(), after, "{id}");
        assert!(after.properties.resampled && after.properties.class_locations.is_some());
        if before.data.shape() == after.data.shape() {
            use std::os::unix::fs::MetadataExt;
            let inode = |folder: &Path| {
                std::fs::metadata(folder.join(format!("{id}.zarr/data/c/0/0/0/0")))
                    .unwrap()
                    .ino()
            };
            assert_eq!(
                inode(&normalized),
                inode(&resampled),
                "{id}: unchanged arrays are linked"
            );
            linked += 1;
        } else {
            moved += 1;
        }
    }
    // With spacings varying by up to 20%, the median grid fits some cases and not others.
    assert!(moved > 0, "some case was resampled");
    assert_eq!(moved + linked, 3);
}
