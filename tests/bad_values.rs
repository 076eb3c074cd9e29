//! Bad values are stopped at the door (issue 14): images with +Inf/-Inf voxels fail `nnflow check`
//! and the fingerprint stage, naming case, channel and file, and nothing is cached; configuration
//! names nnU-Net never plans and non-finite parameters fail when the pipeline is loaded (exit code
//! 2, nothing runs), while configurations a dataset's plan leaves out are still skipped.

mod common;

use std::path::Path;

use common::{stderr, Project};
use nnflow::data::nifti;

const FEW_SAMPLES: &str = "fingerprint.foreground_samples=2000";
const VALID_NAMES: &str = "2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres";

/// A tiny dataset `D` (two channels) and `nnunet.toml`, the repository's pipeline.
fn project_with_dataset(cases: usize) -> Project {
    let project = Project::new();
    let output = project.nnflow(&[
        "synth",
        "D",
        "--cases",
        &cases.to_string(),
        "--shape",
        "8,12,12",
        "--spacing",
        "3,1,1",
        "--channels",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    project
}

/// Sets `count` foreground voxels (label > 0) of one channel image to `value`, after skipping the
/// first `skip`, keeping its geometry. Foreground, so that the fingerprint's intensity statistics
/// would see them.
fn poison(project: &Project, case: &str, channel: usize, value: f32, skip: usize, count: usize) {
    let image = project
        .path()
        .join(format!("D/imagesTr/{case}_{channel:04}.nii.gz"));
    let label = project.path().join(format!("D/labelsTr/{case}.nii.gz"));
    let volume = nifti::read(&image).unwrap();
    let (seg, _) = nifti::read_integer_labels(&label).unwrap();
    let mut data = volume.data.clone();
    let mut left = count;
    for (v, _) in data.iter_mut().zip(seg.iter()).filter(|(_, &l)| l > 0).skip(skip) {
        if left > 0 {
            *v = value;
            left -= 1;
        }
    }
    assert_eq!(left, 0, "{case} has fewer than {count} foreground voxels");
    nifti::write(&image, &data, &volume.header).unwrap();
}

fn cache_entries(project: &Project) -> usize {
    std::fs::read_dir(project.cache.join("entries")).map_or(0, |e| e.count())
}

/// `nnflow check D` fails with exit code 2; its report.
fn check_fails(project: &Project) -> String {
    let check = project.nnflow(&["check", "D"]);
    let report = stderr(&check);
    assert_eq!(check.status.code(), Some(2), "{report}");
    report
}

/// The `plan` target fails at the fingerprint stage, writes no fingerprint and caches nothing; the
/// run's JSON report.
fn fingerprint_fails(project: &Project, extra: &[&str]) -> String {
    let mut args = vec!["nnunet.toml", "--set", "dataset=D", "--set", FEW_SAMPLES];
    args.extend_from_slice(extra);
    args.push("plan");
    let result = project.run(&args);
    assert_eq!(result.code, 1, "{}\n{}", result.stderr, result.json);
    assert_eq!(result.outcome("fingerprint"), "failed");
    assert_ne!(result.outcome("plan"), "ran");
    let out = project.path().join(".nnflow/nnunet/out");
    assert!(!out.join("fingerprint").exists(), "no fingerprint written");
    assert!(!out.join("plan").exists());
    assert_eq!(cache_entries(project), 0, "nothing is cached");
    result.json.to_string()
}

#[test]
fn a_positive_infinity_fails_check_and_fingerprint_naming_case_channel_and_file() {
    let project = project_with_dataset(3);
    poison(&project, "case_001", 1, f32::INFINITY, 0, 1);

    let report = check_fails(&project);
    assert!(
        report.contains(
            "error: case case_001: channel 1 contains +Inf (1 voxel) in D/imagesTr/case_001_0001.nii.gz"
        ),
        "{report}"
    );
    assert!(report.contains("1 problem(s) in the dataset"), "{report}");

    // With the integrity check (the default) and without it: the same case, channel and file.
    let error = fingerprint_fails(&project, &[]);
    assert!(
        error.contains("case case_001: channel 1 contains +Inf (1 voxel) in ")
            && error.contains("case_001_0001.nii.gz"),
        "{error}"
    );
    let error = fingerprint_fails(&project, &["--set", "fingerprint.check_integrity=false"]);
    assert!(
        error.contains("case case_001: channel 1 contains +Inf (1 voxel) in ")
            && error.contains("case_001_0001.nii.gz"),
        "{error}"
    );

    // Once the image is repaired, the fingerprint holds only numbers and the plan is made.
    let image = project.path().join("D/imagesTr/case_001_0001.nii.gz");
    let volume = nifti::read(&image).unwrap();
    nifti::write(
        &image,
        &volume.data.mapv(|v| if v.is_finite() { v } else { 0.0 }),
        &volume.header,
    )
    .unwrap();
    let result = project.run(&["nnunet.toml", "--set", "dataset=D", "--set", FEW_SAMPLES, "plan"]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    let fingerprint = project.read(".nnflow/nnunet/out/fingerprint/dataset_fingerprint.json");
    assert!(!fingerprint.contains("null"), "{fingerprint}");
}

#[test]
fn negative_infinity_and_nan_are_reported_for_every_bad_case() {
    let project = project_with_dataset(3);
    poison(&project, "case_000", 0, f32::NEG_INFINITY, 0, 2);
    poison(&project, "case_002", 1, f32::NAN, 0, 1);
    poison(&project, "case_002", 1, f32::NEG_INFINITY, 1, 1);

    let report = check_fails(&project);
    assert!(
        report.contains(
            "error: case case_000: channel 0 contains -Inf (2 voxels) in D/imagesTr/case_000_0000.nii.gz"
        ),
        "{report}"
    );
    assert!(
        report.contains(
            "error: case case_002: channel 1 contains NaN (1 voxel) and -Inf (1 voxel) in D/imagesTr/case_002_0001.nii.gz"
        ),
        "{report}"
    );
    assert!(report.contains("2 problem(s) in the dataset"), "{report}");

    let error = fingerprint_fails(&project, &[]);
    assert!(
        error.contains("case case_000: channel 0 contains -Inf (2 voxels) in ")
            && error.contains("case case_002: channel 1 contains NaN (1 voxel) and -Inf (1 voxel) in "),
        "{error}"
    );
}

/// `nnflow validate` and `nnflow run` both exit with 2 and the same report, and nothing ran.
fn invalid(project: &Project, args: &[&str]) -> String {
    let mut validate = vec!["validate"];
    validate.extend_from_slice(args);
    let output = project.nnflow(&validate);
    let report = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "validate: {report}");
    let mut run = vec!["run"];
    run.extend_from_slice(args);
    let output = project.nnflow(&run);
    assert_eq!(output.status.code(), Some(2), "run: {}", stderr(&output));
    assert_eq!(stderr(&output), report, "run reports what validate reports");
    assert!(!project.path().join(".nnflow/nnunet/out").exists(), "nothing ran");
    assert_eq!(cache_entries(project), 0);
    report
}

#[test]
fn a_misspelt_configuration_fails_at_load_time_listing_nnunets_names() {
    let project = project_with_dataset(2);
    // On the command line.
    let report = invalid(
        &project,
        &[
            "nnunet.toml",
            "--set",
            "dataset=D",
            "--set",
            "configurations=[\"2d\", \"3d_fulres\"]",
        ],
    );
    let message = format!(
        "unknown configuration `3d_fulres` (did you mean `3d_fullres`?): nnU-Net plans only {VALID_NAMES}"
    );
    // The preprocessing stages cover nnU-Net's configurations on demand; the training of the
    // misspelt one is refused, and finds no preprocessing of that name.
    assert!(
        report.contains(&format!("error: stage `train`: `configuration`: {message}")),
        "{report}"
    );
    assert!(
        report.contains(
            "no instance of `preprocess` matches this instance's matrix values (configuration=3d_fulres; \
             instances: preprocess[configuration=2d], preprocess[configuration=3d_fullres], \
             preprocess[configuration=3d_lowres])"
        ),
        "{report}"
    );
    assert!(report.contains("2 error(s) in the pipeline"), "{report}");
    // `2d` is fine: only the misspelt name is reported.
    assert!(!report.contains("`2d`"), "{report}");

    // In the pipeline file; the location is the stage's `configuration`, with file and line.
    let pipeline = project.read("nnunet.toml").replace(
        "configurations = [\"2d\", \"3d_fullres\", \"3d_lowres\", \"3d_cascade_fullres\"]",
        "configurations = [\"3d_fulres\"]",
    );
    assert!(pipeline.contains("configurations = [\"3d_fulres\"]"));
    project.write("nnunet.toml", &pipeline);
    let report = invalid(&project, &["nnunet.toml", "--set", "dataset=D"]);
    let line = pipeline
        .lines()
        .enumerate()
        .skip_while(|(_, l)| !l.starts_with("[stages.train]"))
        .find(|(_, l)| l.starts_with("configuration = \"${configuration}\""))
        .unwrap()
        .0
        + 1;
    assert!(
        report.contains(&format!("nnunet.toml:{line}:")) && report.contains(&message),
        "{report}"
    );
}

#[test]
fn a_configuration_written_in_a_stage_points_at_the_value() {
    let project = Project::with_pipeline(
        r#"[stages.norm]
kind = "normalize"
dataset = "D"
plan = "plan"
configuration = "3D_fullres"
"#,
    );
    let output = project.nnflow(&["validate", "p.toml"]);
    let report = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert!(
        report.contains(&format!(
            "p.toml:5:17: error: stage `norm`: `configuration`: unknown configuration `3D_fullres` (did \
             you mean `3d_fullres`?): nnU-Net plans only {VALID_NAMES}"
        )),
        "{report}"
    );
    assert!(
        report.contains("    5 | configuration = \"3D_fullres\""),
        "{report}"
    );
}

#[test]
fn a_plan_override_for_a_configuration_nnunet_never_plans_fails_at_load_time() {
    let project = project_with_dataset(2);
    let report = invalid(
        &project,
        &[
            "nnunet.toml",
            "--set",
            "dataset=D",
            "--set",
            "plan.overrides={ \"3d_huge\" = { batch_size = 7 } }",
        ],
    );
    assert!(
        report.contains(&format!(
            "error: stage `plan`: `overrides`: unknown configuration `3d_huge`: nnU-Net plans only {VALID_NAMES}"
        )),
        "{report}"
    );
}

#[test]
fn configurations_the_plan_leaves_out_are_still_skipped_with_the_reason() {
    let project = project_with_dataset(2);
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        FEW_SAMPLES,
        "--set",
        "configurations=[\"3d_fullres\", \"3d_lowres\"]",
        "preprocess",
    ]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    assert_eq!(result.outcome("preprocess[configuration=3d_fullres]"), "ran");
    let id = "preprocess[configuration=3d_lowres]";
    assert_eq!(result.outcome(id), "skipped");
    let entry = result.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()
        .clone();
    let reason = entry["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no configuration `3d_lowres`") && reason.contains("less than a quarter"),
        "{entry}"
    );
}

#[test]
fn non_finite_parameters_fail_at_load_time_with_their_path() {
    let project = project_with_dataset(2);
    let report = invalid(
        &project,
        &["nnunet.toml", "--set", "dataset=D", "--set", "gpu_memory_gb=nan"],
    );
    assert!(
        report.contains(
            "error: stage `plan`: `gpu_memory_gb`: `nan` is not a finite number (cache keys and the files \
             stages pass on are JSON, which has no NaN or infinity)"
        ),
        "{report}"
    );
    let report = invalid(
        &project,
        &[
            "nnunet.toml",
            "--set",
            "dataset=D",
            "--set",
            "plan.overwrite_target_spacing=[3.0, -inf, 1.0]",
            "--set",
            "train.learning_rate=inf",
        ],
    );
    assert!(
        report.contains("error: stage `plan`: `overwrite_target_spacing.1`: `-inf` is not a finite number"),
        "{report}"
    );
    assert!(
        report.contains("error: stage `train`: `learning_rate`: `inf` is not a finite number"),
        "{report}"
    );
}

#[test]
fn a_fingerprint_with_null_statistics_is_refused_by_the_plan_naming_the_value() {
    // What nnflow before version 2 of the fingerprint kind cached for an image with +Inf.
    let project = project_with_dataset(2);
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        FEW_SAMPLES,
        "fingerprint",
    ]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    let mut fingerprint: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/nnunet/out/fingerprint/dataset_fingerprint.json"))
            .unwrap();
    fingerprint["foreground_intensity_properties_per_channel"]["1"]["mean"] = serde_json::Value::Null;
    project.write("fp/dataset_fingerprint.json", &fingerprint.to_string());
    project.write(
        "p.toml",
        "[stages.plan]\nkind = \"plan\"\ndataset = \"D\"\nfingerprint = \"fp\"\n",
    );
    let result = project.run(&["p.toml"]);
    assert_eq!(result.code, 1, "{}\n{}", result.stderr, result.json);
    let error = result.json.to_string();
    assert!(
        error.contains("dataset_fingerprint.json: `foreground_intensity_properties_per_channel.1.mean` is null, not a number"),
        "{error}"
    );
}
