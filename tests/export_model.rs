//! `nnflow export-model`: nnflow's trainings as the zip `nnUNetv2_export_model_to_zip` makes.
//! nnU-Net's own weights (tests/fixtures/predict), exported as if nnflow had trained them, give
//! back nnU-Net's checkpoint: every state-dict name with its values, trainer, configuration, fold
//! and mirror axes. A model nnflow trains (one tiny fold) exported from its pipeline predicts
//! exactly what the training predicts. That nnU-Net itself installs and predicts such a zip is
//! checked by tests/fixtures/export_model/nnunet_predicts_export.py (see its README).

mod common;

use std::path::{Path, PathBuf};

use common::{stderr, stdout, Project};
use nnflow::cli::export_zip::MARKER;
use nnflow::data::nifti;
use nnflow::inference::model::extract_zip;
use nnflow::network::pth::read_checkpoint;
use nnflow::network::safetensors::read_safetensors;

fn predict_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/predict")
        .join(name)
}

/// The zip's entry names, and its comment.
fn zip_listing(zip: &Path) -> (Vec<String>, String) {
    let archive = zip::ZipArchive::new(std::fs::File::open(zip).unwrap()).unwrap();
    let names = archive.file_names().map(|n| n.unwrap().into_owned()).collect();
    let comment = String::from_utf8_lossy(archive.comment()).into_owned();
    (names, comment)
}

/// nnflow's training outputs and plan stage outputs holding nnU-Net's fixture model: its weights
/// under their canonical names (as nnflow's trainer writes them), its plans, dataset.json and
/// fingerprint.
fn fixture_training(project: &Project) {
    project.write(
        "train/fold.json",
        r#"{"configuration": "3d_fullres", "fold": "0", "validation_cases": [],
            "file_ending": ".nii.gz", "probabilities": false}"#,
    );
    let copy = |from: &str, to: &str| {
        std::fs::copy(predict_fixture(from), project.path().join(to)).unwrap();
    };
    copy("weights.safetensors", "train/checkpoint_final.safetensors");
    std::fs::create_dir_all(project.path().join("plan")).unwrap();
    for file in ["plans.json", "dataset.json", "dataset_fingerprint.json"] {
        copy(file, &format!("plan/{file}"));
    }
}

const FIXTURE_FOLDER: &str = "Dataset990_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres";

#[test]
fn nnunets_weights_exported_are_nnunets_checkpoint() {
    let project = Project::new();
    fixture_training(&project);
    let output = project.nnflow(&[
        "export-model",
        "-m",
        "train",
        "--plan",
        "plan",
        "-o",
        "out/model.zip",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains(FIXTURE_FOLDER), "{}", stdout(&output));

    let zip = project.path().join("out/model.zip");
    let (names, comment) = zip_listing(&zip);
    let expected: Vec<String> = [
        "fold_0/checkpoint_final.pth",
        "plans.json",
        "dataset.json",
        "dataset_fingerprint.json",
    ]
    .iter()
    .map(|f| format!("{FIXTURE_FOLDER}/{f}"))
    .collect();
    assert_eq!(names, expected);
    assert!(comment.starts_with(MARKER), "{comment}");

    let ours = project.path().join("ours");
    extract_zip(&zip, &ours).unwrap();
    for file in ["plans.json", "dataset.json", "dataset_fingerprint.json"] {
        assert_eq!(
            std::fs::read(ours.join(FIXTURE_FOLDER).join(file)).unwrap(),
            std::fs::read(predict_fixture(file)).unwrap(),
            "{file}"
        );
    }
    let theirs = project.path().join("theirs");
    extract_zip(&predict_fixture("model.zip"), &theirs).unwrap();
    let exported = read_checkpoint(&ours.join(FIXTURE_FOLDER).join("fold_0/checkpoint_final.pth")).unwrap();
    let nnunet =
        read_checkpoint(&theirs.join(
            "Dataset990_Tiny/nnUNetTrainerTinyCPU__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth",
        ))
        .unwrap();
    // every name of nnU-Net's state dict (188, aliases included) with nnU-Net's values
    assert_eq!(exported.weights.len(), 188);
    assert_eq!(exported.weights, nnunet.weights);
    assert_eq!(exported.trainer_name, "nnUNetTrainer");
    assert_eq!(exported.mirror_axes, nnunet.mirror_axes);
    assert_eq!(exported.configuration, nnunet.configuration);
    assert_eq!(exported.fold, nnunet.fold);

    // the same trainings give the same bytes, and the command replaces its own zip
    let before = std::fs::read(&zip).unwrap();
    let again = project.nnflow(&[
        "export-model",
        "-m",
        "train",
        "--plan",
        "plan/plans.json",
        "-o",
        "out/model.zip",
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(std::fs::read(&zip).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(project.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["model.zip"]);
}

#[test]
fn what_export_refuses_is_named() {
    let project = Project::new();
    fixture_training(&project);
    let export = |extra: &[&str]| {
        let mut args = vec!["export-model", "-m", "train", "--plan", "plan", "-o", "model.zip"];
        args.extend_from_slice(extra);
        let output = project.nnflow(&args);
        (output.status.code(), stderr(&output))
    };

    // a file nnflow did not write stays
    project.write("model.zip", "someone's file");
    let (code, message) = export(&[]);
    assert_eq!(code, Some(2), "{message}");
    assert!(
        message.contains("model.zip") && message.contains("not written by"),
        "{message}"
    );
    assert_eq!(project.read("model.zip"), "someone's file");
    std::fs::remove_file(project.path().join("model.zip")).unwrap();

    // nnU-Net finds models by DatasetXXX_: a plan of a dataset named otherwise needs --dataset-name
    let plans = project.read("plan/plans.json").replace("Dataset990_Tiny", "Tiny");
    project.write("plan/plans.json", &plans);
    let (code, message) = export(&[]);
    assert_eq!(code, Some(2), "{message}");
    assert!(
        message.contains("\"Tiny\"") && message.contains("--dataset-name"),
        "{message}"
    );
    let (code, message) = export(&["--dataset-name", "Dataset12_Tiny"]);
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("Dataset12_Tiny"), "{message}");
    let (code, message) = export(&["--dataset-name", "Dataset991_Renamed"]);
    assert_eq!(code, Some(0), "{message}");
    let (names, _) = zip_listing(&project.path().join("model.zip"));
    assert!(
        names[0].starts_with("Dataset991_Renamed/nnUNetTrainer__nnUNetPlans__3d_fullres/"),
        "{names:?}"
    );

    std::fs::copy(
        predict_fixture("plans.json"),
        project.path().join("plan/plans.json"),
    )
    .unwrap();

    // a fold or checkpoint that is not there, a configuration not trained, a missing plan file
    for (extra, expected) in [
        (&["-f", "1"][..], "fold 1 is not trained"),
        (
            &["--chk", "checkpoint_best.pth"][..],
            "checkpoint_best.safetensors",
        ),
        (&["-c", "2d"][..], "no training of configuration 2d"),
    ] {
        let (code, message) = export(extra);
        assert_eq!(code, Some(2), "{extra:?}: {message}");
        assert!(message.contains(expected), "{extra:?}: {message}");
    }

    // the mirror axes fold.json records: none is nnU-Net's None, an axis the network lacks an error
    let fold_json = project.read("train/fold.json");
    let with_axes = |axes: &str| {
        fold_json.replace(
            "\"probabilities\"",
            &format!("\"mirror_axes\": {axes}, \"probabilities\""),
        )
    };
    project.write("train/fold.json", &with_axes("[0, 3]"));
    let (code, message) = export(&[]);
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("fold.json: mirror axes [0, 3]"), "{message}");
    for (axes, expected) in [("[]", vec![]), ("[1, 2]", vec![1, 2])] {
        project.write("train/fold.json", &with_axes(axes));
        let (code, message) = export(&[]);
        assert_eq!(code, Some(0), "{message}");
        let extracted = project.path().join(format!("extracted{axes}"));
        extract_zip(&project.path().join("model.zip"), &extracted).unwrap();
        let checkpoint =
            read_checkpoint(&extracted.join(FIXTURE_FOLDER).join("fold_0/checkpoint_final.pth")).unwrap();
        assert_eq!(checkpoint.mirror_axes, expected, "{axes}");
    }
    project.write("train/fold.json", &fold_json);

    // nnU-Net's own models are exported by nnU-Net
    extract_zip(&predict_fixture("model.zip"), &project.path().join("nnunet")).unwrap();
    let output = project.nnflow(&[
        "export-model",
        "-m",
        "nnunet",
        "--plan",
        "plan",
        "-o",
        "model.zip",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("an nnU-Net model already"),
        "{}",
        stderr(&output)
    );

    std::fs::remove_file(project.path().join("plan/dataset_fingerprint.json")).unwrap();
    let (code, message) = export(&[]);
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("dataset_fingerprint.json"), "{message}");
}

/// The tiny nnU-Net pipeline on a synthetic dataset: one 3d_fullres fold trained for an epoch,
/// and the test images predicted from the training itself.
const PIPELINE: &str = r#"
[pipeline]
name = "p"
extends = "nnunet.toml"

[stages.predict_trained]
kind = "predict"
images = "${dataset}/imagesTs"
output = "trained_predictions"
dataset = "${dataset}"
plan = "${plan.outputs}"
trainings = "${train[*].outputs}"
configuration = "3d_fullres"
device = "cpu"
"#;

const SETTINGS: [&str; 14] = [
    "--set",
    "dataset=Dataset901_Tiny",
    "--set",
    "configurations=[\"3d_fullres\"]",
    "--set",
    "folds=[0]",
    "--set",
    "fingerprint.foreground_samples=20000",
    "--set",
    "train.epochs=1",
    "--set",
    "train.iterations_per_epoch=2",
    "--set",
    "train.val_iterations=1",
];

#[test]
fn a_trained_model_exported_predicts_exactly_as_its_training() {
    let project = Project::new();
    let synth = project.nnflow(&[
        "synth",
        "Dataset901_Tiny",
        "--cases",
        "10",
        "--shape",
        "32,32,32",
        "--spacing",
        "1,1,1",
        "--test-cases",
        "2",
    ]);
    assert_eq!(synth.status.code(), Some(0), "{}", stderr(&synth));
    let nnunet = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(nnunet).unwrap());
    project.write("p.toml", PIPELINE);
    let mut run = vec!["p.toml"];
    run.extend(SETTINGS);
    run.push("predict_trained");
    let trained = project.run(&run);
    assert_eq!(trained.code, 0, "{}\n{}", trained.stderr, trained.json);

    let mut export = vec!["export-model", "p.toml", "-o", "model.zip"];
    export.extend(SETTINGS);
    let output = project.nnflow(&export);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let folder = "Dataset901_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres";
    let (names, _) = zip_listing(&project.path().join("model.zip"));
    assert_eq!(
        names[0],
        format!("{folder}/fold_0/checkpoint_final.pth"),
        "{names:?}"
    );
    assert_eq!(names.len(), 4, "{names:?}");

    // the checkpoint holds the training's weights, under every name nnU-Net's state dict has
    let training = project
        .path()
        .join(".nnflow/p/out/train/configuration=3d_fullres,fold=0");
    extract_zip(
        &project.path().join("model.zip"),
        &project.path().join("extracted"),
    )
    .unwrap();
    let checkpoint = read_checkpoint(
        &project
            .path()
            .join("extracted")
            .join(folder)
            .join("fold_0/checkpoint_final.pth"),
    )
    .unwrap();
    let weights = read_safetensors(&training.join("checkpoint_final.safetensors")).unwrap();
    for tensor in &weights {
        let exported = checkpoint
            .get(&tensor.name)
            .unwrap_or_else(|| panic!("no {}", tensor.name));
        assert_eq!(exported.shape, tensor.shape, "{}", tensor.name);
        assert_eq!(exported.values, tensor.values, "{}", tensor.name);
    }
    assert!(
        checkpoint.weights.len() > 2 * weights.len(),
        "aliases are missing"
    );
    let fold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(training.join("fold.json")).unwrap()).unwrap();
    let axes: Vec<usize> = serde_json::from_value(fold["mirror_axes"].clone()).unwrap_or(vec![0, 1, 2]);
    assert_eq!(checkpoint.mirror_axes, axes);
    assert_eq!(checkpoint.current_epoch, Some(1));

    // the zip predicts exactly what the training predicts
    let predicted = project.nnflow(&[
        "predict",
        "-i",
        "Dataset901_Tiny/imagesTs",
        "-o",
        "zip_predictions",
        "-m",
        "model.zip",
        "--device",
        "cpu",
    ]);
    assert_eq!(predicted.status.code(), Some(0), "{}", stderr(&predicted));
    assert_same_predictions(&project, "zip_predictions");

    // the trainings themselves, with the plan they were trained with, predict the same too
    let direct = [
        "predict",
        "-i",
        "Dataset901_Tiny/imagesTs",
        "-o",
        "direct_predictions",
        "-m",
        ".nnflow/p/out/train",
        "--device",
        "cpu",
    ];
    let output = project.nnflow(&direct);
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("bring no plan: give the plan stage's outputs"),
        "{}",
        stderr(&output)
    );
    let output = project.nnflow(&[&direct[..], &["--plan", ".nnflow/p/out/plan"]].concat());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_same_predictions(&project, "direct_predictions");

    // by folder, the same zip; a pipeline whose training is not up to date exports nothing
    let by_folder = project.nnflow(&[
        "export-model",
        "-m",
        ".nnflow/p/out/train",
        "--plan",
        ".nnflow/p/out/plan",
        "-o",
        "by_folder.zip",
    ]);
    assert_eq!(by_folder.status.code(), Some(0), "{}", stderr(&by_folder));
    assert_eq!(
        std::fs::read(project.path().join("by_folder.zip")).unwrap(),
        std::fs::read(project.path().join("model.zip")).unwrap()
    );
    let mut stale = vec!["export-model", "p.toml", "-o", "stale.zip"];
    stale.extend(SETTINGS);
    stale.extend(["--set", "train.epochs=2"]);
    let output = project.nnflow(&stale);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("out of date: train[configuration=3d_fullres,fold=0]"),
        "{}",
        stderr(&output)
    );
    assert!(!project.path().join("stale.zip").exists());
}

/// Every prediction in `folder` equals the pipeline's own (`trained_predictions`) in every voxel
/// and in its geometry.
fn assert_same_predictions(project: &Project, folder: &str) {
    let mut cases = 0;
    for entry in std::fs::read_dir(project.path().join("trained_predictions")).unwrap() {
        let name = entry.unwrap().file_name();
        let (ours, header) =
            nifti::read_integer_labels(project.path().join("trained_predictions").join(&name)).unwrap();
        let (other, other_header) =
            nifti::read_integer_labels(project.path().join(folder).join(&name)).unwrap();
        assert_eq!(header.affine(), other_header.affine(), "{folder}/{name:?}");
        let same = ours.iter().zip(other.iter()).filter(|(a, b)| a == b).count();
        assert_eq!(
            same,
            ours.len(),
            "{folder}/{name:?}: {same} of {} voxels equal",
            ours.len()
        );
        cases += 1;
    }
    assert_eq!(cases, 2, "{folder}");
}
