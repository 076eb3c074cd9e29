//! Prediction with what a model needs besides images (issue 16): a cascade's second stage on
//! previous-stage segmentations given as files (nnUNetv2_predict's `-prev_stage_predictions`), the
//! mirror axes a training recorded, and models nnflow refuses by name (a trainer that builds
//! another network, a network class nnflow does not build).

mod common;

use std::path::{Path, PathBuf};

use common::Project;
use nnflow::data::{nifti, npy};

const DATASET: &str = "data/Dataset951_Prev";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/predict")
        .join(name)
}

/// A predict stage on this project's trainings, with the probabilities for a cascade (its
/// previous stage's segmentation is then the logits' argmax in both ways of predicting it).
fn cascade_stage(name: &str, output: &str, configuration: &str, previous: Option<&str>) -> String {
    let probabilities = configuration == "3d_cascade_fullres";
    let previous = previous
        .map(|folder| format!("previous_stage_predictions = \"{folder}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[stages.{name}]
kind = "predict"
images = "${{dataset}}/imagesTs"
output = "{output}"
dataset = "${{dataset}}"
plan = "${{plan.outputs}}"
trainings = "${{train[*].outputs}}"
configuration = "{configuration}"
save_probabilities = {probabilities}
threads = 1
{previous}"#
    )
}

/// nnU-Net's cascade trained on a synthetic dataset that nnU-Net's planner gives 3d_lowres and
/// 3d_cascade_fullres (as tests/cascade_pipeline.rs), fold `all` only; the cascade's training
/// mirrors only axis 0. Then 3d_lowres predicts the test image (`prev_own`), the cascade
/// predicts it through its own 3d_lowres (`pred_own`) and from the segmentations in `prev_own`
/// (`pred_given`). `extra` adds stages.
fn pipeline(extra: &str) -> String {
    let mut text = format!(
        r#"
[pipeline]
name = "prev"

[vars]
dataset = "{DATASET}"

[stages.data]
kind = "command"
cmd = "rm -rf ${{dataset}} && $NNFLOW_EXE synth ${{dataset}} --cases 4 --shape 64,64,64 --spacing 1,1,1 --test-cases 1"
outputs = ["${{dataset}}"]

[stages.fingerprint]
kind = "fingerprint"
dataset = "${{dataset}}"

[stages.plan]
kind = "plan"
dataset = "${{dataset}}"
fingerprint = "${{fingerprint.outputs}}"
gpu_memory_gb = 0.05

[stages.normalize]
kind = "normalize"
matrix = {{ configuration = ["3d_fullres", "3d_lowres"] }}
dataset = "${{dataset}}"
plan = "${{plan.outputs}}"
configuration = "${{configuration}}"

[stages.resample]
kind = "resample"
matrix = {{ configuration = ["3d_fullres", "3d_lowres"] }}
dataset = "${{dataset}}"
source = "${{normalize.outputs}}"
plan = "${{plan.outputs}}"
configuration = "${{configuration}}"

[stages.train]
kind = "train"
matrix = {{ configuration = ["3d_lowres", "3d_cascade_fullres"], fold = ["all"] }}
dataset = "${{dataset}}"
plan = "${{plan.outputs}}"
preprocessed = "${{resample.outputs}}"
configuration = "${{configuration}}"
fold = "${{fold}}"
epochs = 2
iterations_per_epoch = 2
val_iterations = 1
validation_mirroring = false
save_probabilities = false
threads = 1

[[stages.train.instance_overrides]]
where = {{ configuration = "3d_cascade_fullres" }}
preprocessed = "${{resample[configuration=3d_fullres].outputs}}"
previous_stage = "${{train[configuration=3d_lowres].outputs}}"
augment = [{{ name = "mirror", axes = [0] }}]
"#
    );
    text.push_str(&cascade_stage("predict_lowres", "prev_own", "3d_lowres", None));
    text.push_str(&cascade_stage(
        "predict_own",
        "pred_own",
        "3d_cascade_fullres",
        None,
    ));
    text.push_str(&cascade_stage(
        "predict_given",
        "pred_given",
        "3d_cascade_fullres",
        Some("prev_own"),
    ));
    text.push_str(extra);
    text
}

fn probabilities(project: &Project, folder: &str) -> ndarray::ArrayD<f32> {
    npy::read::<f32>(&project.path().join(folder).join("test_000.npy")).unwrap()
}

fn labels(project: &Project, folder: &str) -> ndarray::Array3<i32> {
    nifti::read_integer_labels(project.path().join(folder).join("test_000.nii.gz"))
        .unwrap()
        .0
}

fn job(project: &Project, stage: &str) -> serde_json::Value {
    serde_json::from_str(&project.read(&format!(".nnflow/prev/out/{stage}/predict_job.json"))).unwrap()
}

/// The error of a failed stage instance, as `run --json` reports it.
fn stage_error(result: &common::RunResult, id: &str) -> String {
    result.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .and_then(|s| s["error"].as_str())
        .unwrap_or_else(|| panic!("no error for {id}: {}\n{}", result.json, result.stderr))
        .to_string()
}

#[test]
fn a_cascade_predicts_from_the_previous_stage_segmentations_it_is_given() {
    let project = Project::new();
    project.write("p.toml", &pipeline(""));
    let result = project.run(&["p.toml"]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);

    // each training records the axes its augmentation mirrored, and prediction uses them
    let out = project.path().join(".nnflow/prev/out");
    for (configuration, axes) in [("3d_lowres", vec![0, 1, 2]), ("3d_cascade_fullres", vec![0])] {
        let fold: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                out.join(format!("train/configuration={configuration},fold=all/fold.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(fold["mirror_axes"], serde_json::json!(axes), "{configuration}");
    }
    let own = job(&project, "predict_own");
    let models: Vec<(&str, bool, serde_json::Value)> = own["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["configuration"].as_str().unwrap(),
                m["member"].as_bool().unwrap(),
                m["mirror_axes"].clone(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("3d_lowres", false, serde_json::json!([0, 1, 2])),
            ("3d_cascade_fullres", true, serde_json::json!([0])),
        ]
    );

    // given segmentations replace the previous stage: its model is not predicted at all
    let given = job(&project, "predict_given");
    assert_eq!(given["models"].as_array().unwrap().len(), 1, "{given}");
    assert_eq!(given["models"][0]["configuration"], "3d_cascade_fullres");
    assert!(given["previous_stage_predictions"]
        .as_str()
        .unwrap()
        .ends_with("prev_own"));
    // the stage's own 3d_lowres predictions given as files: the stage's own cascade prediction
    assert_eq!(labels(&project, "pred_given"), labels(&project, "pred_own"));
    assert_eq!(
        probabilities(&project, "pred_given"),
        probabilities(&project, "pred_own")
    );
    let image = nifti::read_header(
        project
            .path()
            .join(format!("{DATASET}/imagesTs/test_000_0000.nii.gz")),
    )
    .unwrap();
    let header = nifti::read_header(project.path().join("pred_given/test_000.nii.gz")).unwrap();
    assert_eq!(header.shape_zyx(), image.shape_zyx());
    assert_eq!(header.affine(), image.affine());

    // other segmentations give another prediction
    let (previous, previous_header) =
        nifti::read_integer_labels(project.path().join("prev_own/test_000.nii.gz")).unwrap();
    let other = project.path().join("prev_other");
    std::fs::create_dir_all(&other).unwrap();
    let write_other = |label: i16| {
        let segmentation = previous.mapv(|v| if v == 0 { label } else { 0 });
        nifti::write(other.join("test_000.nii.gz"), &segmentation, &previous_header).unwrap();
    };
    write_other(1);
    project.write(
        "p.toml",
        &pipeline(&cascade_stage(
            "predict_other",
            "pred_other",
            "3d_cascade_fullres",
            Some("prev_other"),
        )),
    );
    let second = project.run(&["p.toml"]);
    assert_eq!(second.code, 0, "{}\n{}", second.stderr, second.json);
    assert_eq!(second.with_outcome("ran"), ["predict_other"]);
    let from_other = probabilities(&project, "pred_other");
    assert_eq!(from_other.shape(), probabilities(&project, "pred_own").shape());
    assert_ne!(from_other, probabilities(&project, "pred_own"));

    // the folder's contents are keyed: changed segmentations predict again, nothing else does
    let third = project.run(&["p.toml"]);
    assert_eq!(third.with_outcome("ran"), Vec::<String>::new(), "{}", third.json);
    write_other(2);
    let fourth = project.run(&["p.toml"]);
    assert_eq!(fourth.code, 0, "{}\n{}", fourth.stderr, fourth.json);
    assert_eq!(fourth.with_outcome("ran"), ["predict_other"]);
    assert_ne!(probabilities(&project, "pred_other"), from_other);

    // a case without a segmentation is named with the folder; a model that is no cascade refuses
    // the folder
    std::fs::remove_file(other.join("test_000.nii.gz")).unwrap();
    project.write("prev_other/README", "no segmentations");
    let mut extra = cascade_stage(
        "predict_other",
        "pred_other",
        "3d_cascade_fullres",
        Some("prev_other"),
    );
    extra.push_str(&cascade_stage(
        "predict_not_cascade",
        "pred_not_cascade",
        "3d_lowres",
        Some("prev_own"),
    ));
    project.write("p.toml", &pipeline(&extra));
    let failed = project.run(&["p.toml", "--keep-going"]);
    assert_ne!(failed.code, 0);
    let error = stage_error(&failed, "predict_other");
    assert!(
        error.contains(&format!(
            "case test_000: no previous-stage segmentation test_000.nii.gz in {}",
            other.display()
        )),
        "{error}"
    );
    let error = stage_error(&failed, "predict_not_cascade");
    assert!(
        error.contains("previous_stage_predictions")
            && error.contains("none of the configurations predicted (3d_lowres) has a previous stage"),
        "{error}"
    );
}

/// A project with the test images and nnU-Net's exported model (not a cascade) extracted into
/// `models/results`.
fn nnunet_project() -> Project {
    let project = Project::new();
    std::fs::create_dir_all(project.path().join("images")).unwrap();
    for case in ["TinyTest_000", "TinyTest_001"] {
        let name = format!("{case}_0000.nii.gz");
        std::fs::copy(fixture(&name), project.path().join("images").join(&name)).unwrap();
    }
    nnflow::inference::model::extract_zip(&fixture("model.zip"), &project.path().join("models/results"))
        .unwrap();
    project
}

const RESULTS_FOLDER: &str = "models/results/Dataset990_Tiny/nnUNetTrainerTinyCPU__nnUNetPlans__3d_fullres";

/// `nnflow predict --prev-stage-predictions` on a model that is no cascade is an error (nnU-Net
/// would feed the segmentation to a network that has no channel for it and fail inside torch),
/// said before anything is predicted; the flag goes into the pipeline file.
#[test]
fn the_prev_stage_flag_needs_a_cascade() {
    let project = nnunet_project();
    project.write("prev/TinyTest_000.nii.gz", "");
    let output = project.nnflow(&[
        "predict",
        "-i",
        "images",
        "-o",
        "out",
        "-m",
        RESULTS_FOLDER,
        "--prev-stage-predictions",
        "prev",
        "--device",
        "cpu",
    ]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = common::stderr(&output);
    assert!(
        stderr.contains("none of the configurations predicted (3d_fullres) has a previous stage"),
        "{stderr}"
    );
    let written = project.read("nnflow-predict.toml");
    assert!(
        written.contains("previous_stage_predictions = \"prev\""),
        "{written}"
    );
    assert!(!project.path().join("out/TinyTest_000.nii.gz").exists());
}

/// A results folder of a trainer that builds another network, and a plan naming a network class
/// nnflow does not build, are refused with the name and the model before anything runs.
#[test]
fn a_trainer_or_network_nnflow_cannot_build_is_refused_by_name() {
    let project = nnunet_project();
    let bn = "models/results/Dataset990_Tiny/nnUNetTrainerBN__nnUNetPlans__3d_fullres";
    std::fs::rename(project.path().join(RESULTS_FOLDER), project.path().join(bn)).unwrap();
    let output = project.nnflow(&[
        "predict", "-i", "images", "-o", "out", "-m", bn, "--device", "cpu",
    ]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = common::stderr(&output);
    assert!(
        stderr.contains("nnUNetTrainerBN__nnUNetPlans__3d_fullres: trainer nnUNetTrainerBN replaces instance normalization with batch normalization"),
        "{stderr}"
    );

    std::fs::rename(project.path().join(bn), project.path().join(RESULTS_FOLDER)).unwrap();
    let plans_file = project.path().join(RESULTS_FOLDER).join("plans.json");
    let mut plans: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plans_file).unwrap()).unwrap();
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] =
        "dynamic_network_architectures.architectures.primus.Primus".into();
    std::fs::write(&plans_file, plans.to_string()).unwrap();
    let output = project.nnflow(&[
        "predict",
        "-i",
        "images",
        "-o",
        "out",
        "-m",
        RESULTS_FOLDER,
        "--device",
        "cpu",
    ]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = common::stderr(&output);
    assert!(
        stderr.contains(
            "nnUNetTrainerTinyCPU__nnUNetPlans__3d_fullres (3d_fullres): network class \
                         dynamic_network_architectures.architectures.primus.Primus is not supported"
        ),
        "{stderr}"
    );
}
