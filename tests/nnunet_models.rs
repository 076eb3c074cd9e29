//! nnU-Net's own models, as its users have them: the zip `nnUNetv2_export_model_to_zip` wrote and
//! the results folder inside it, trained and run by nnU-Net 2.8.1 on two raw test images:
//! tests/fixtures/predict/ (PlainConvUNet, a schedule-shortening trainer of the generator's own)
//! and tests/fixtures/predict_resenc/ (ResidualEncoderUNet planned by nnUNetPlannerResEncM,
//! trained by nnU-Net's own non-default `nnUNetTrainer_5epochs`). The `predict` stage with
//! `models = [...]` and the `nnflow predict` command must give at least 99.9% of voxels equal to
//! nnU-Net's predictions, with and without mirroring, on the input's geometry, and compute nothing
//! the second time.

mod common;

use std::path::{Path, PathBuf};

use common::Project;
use nnflow::data::nifti;

/// A folder of tests/fixtures made by nnU-Net: its test images, `model.zip` and nnU-Net's
/// predictions `<case>_pred_{mirror,nomirror}.nii.gz`.
struct Fixture {
    folder: &'static str,
    /// The results folder inside the zip, relative to where it is extracted.
    results_folder: &'static str,
}

impl Fixture {
    fn file(&self, name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(self.folder)
            .join(name)
    }
}

const PLAIN: Fixture = Fixture {
    folder: "predict",
    results_folder: "Dataset990_Tiny/nnUNetTrainerTinyCPU__nnUNetPlans__3d_fullres",
};

const RESENC: Fixture = Fixture {
    folder: "predict_resenc",
    results_folder: "Dataset990_Tiny/nnUNetTrainer_5epochs__nnUNetResEncUNetMPlans__3d_fullres",
};

const CASES: [&str; 2] = ["TinyTest_000", "TinyTest_001"];

/// The results folder of the PlainConvUNet fixture, relative to where its zip is extracted.
const RESULTS_FOLDER: &str = PLAIN.results_folder;

/// A project holding the test images and nnU-Net's model, predicting with `models = [model]`.
fn project(model: &str, extra: &str) -> Project {
    project_of(&PLAIN, model, extra)
}

/// A project holding `fixture`'s test images and model (`models/model.zip`, and
/// `models/results/` unpacked from it), predicting with `models = [model]`.
fn project_of(fixture: &Fixture, model: &str, extra: &str) -> Project {
    let project = Project::new();
    let images = project.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for case in CASES {
        let name = format!("{case}_0000.nii.gz");
        std::fs::copy(fixture.file(&name), images.join(&name)).unwrap();
    }
    let models = project.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(fixture.file("model.zip"), models.join("model.zip")).unwrap();
    nnflow::inference::model::extract_zip(&fixture.file("model.zip"), &models.join("results")).unwrap();
    project.write(
        "p.toml",
        &format!(
            r#"[stages.predict]
kind = "predict"
images = "images"
output = "predictions"
models = ["{model}"]
device = "cpu"
{extra}
"#
        ),
    );
    project
}

/// The share of voxels equal to nnU-Net's prediction; the input's geometry is checked on the way.
fn agreement(ours: &Path, case: &str, suffix: &str) -> f64 {
    agreement_with(&PLAIN, ours, case, suffix)
}

/// The share of voxels of `ours` equal to `fixture`'s nnU-Net prediction of `case` (`suffix`:
/// mirror or nomirror); the input's geometry (spacing, origin, direction: the affine) is checked
/// on the way.
fn agreement_with(fixture: &Fixture, ours: &Path, case: &str, suffix: &str) -> f64 {
    let (a, header) = nifti::read_integer_labels(ours).unwrap();
    let (b, _) = nifti::read_integer_labels(fixture.file(&format!("{case}_pred_{suffix}.nii.gz"))).unwrap();
    assert_eq!(a.shape(), b.shape(), "{}", ours.display());
    let input = nifti::read_header(fixture.file(&format!("{case}_0000.nii.gz"))).unwrap();
    assert_eq!(
        header.itk_spacing(),
        input.itk_spacing(),
        "{}: spacing differs from the input's",
        ours.display()
    );
    assert_eq!(
        header.affine(),
        input.affine(),
        "{}: geometry differs from the input's",
        ours.display()
    );
    let same = a.iter().zip(b.iter()).filter(|(x, y)| x == y).count();
    same as f64 / a.len() as f64
}

/// What the run said about a failed stage: its error in the `--json` report, and stderr.
fn failure(result: &common::RunResult) -> String {
    format!("{}\n{}", result.json, result.stderr)
}

fn assert_predicts_like_nnunet(project: &Project, suffix: &str) {
    for case in CASES {
        let ours = project.path().join(format!("predictions/{case}.nii.gz"));
        let share = agreement(&ours, case, suffix);
        eprintln!(
            "{case} ({suffix}): {:.4}% of voxels agree with nnU-Net",
            share * 100.0
        );
        assert!(
            share >= 0.999,
            "{case} ({suffix}): {:.4}% of voxels agree",
            share * 100.0
        );
    }
}

#[test]
fn the_exported_zip_predicts_like_nnunet_and_a_second_run_computes_nothing() {
    for (mirroring, suffix) in [(true, "mirror"), (false, "nomirror")] {
        let project = project("models/model.zip", &format!("mirroring = {mirroring}"));
        let first = project.run(&["p.toml"]);
        assert_eq!(first.code, 0, "{}\n{}", first.stderr, first.json);
        assert_predicts_like_nnunet(&project, suffix);
        if mirroring {
            let second = project.run(&["p.toml"]);
            assert_eq!(second.code, 0, "{}", second.stderr);
            assert_eq!(second.outcome("predict"), "cached", "{}", second.json);
            // another checkpoint choice is another result
            let other = project.run(&["p.toml", "--set", "predict.folds=[\"0\"]"]);
            assert_eq!(
                other.outcome("predict"),
                "ran",
                "{}\n{}",
                other.stderr,
                other.json
            );
        }
    }
}

#[test]
fn a_results_folder_predicts_like_nnunet() {
    let project = project(&format!("models/results/{RESULTS_FOLDER}"), "");
    let result = project.run(&["p.toml"]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    assert_predicts_like_nnunet(&project, "mirror");
}

#[test]
fn a_fold_or_checkpoint_the_model_lacks_is_named() {
    let project = project("models/model.zip", "folds = [\"0\", \"3\"]");
    let result = project.run(&["p.toml"]);
    assert_ne!(result.code, 0);
    assert!(failure(&result).contains("fold 3"), "{}", failure(&result));
    assert!(!project.path().join("predictions").exists());

    let project = self::project(
        &format!("models/results/{RESULTS_FOLDER}"),
        "checkpoint = \"checkpoint_best.pth\"",
    );
    let result = project.run(&["p.toml"]);
    assert_ne!(result.code, 0);
    assert!(
        failure(&result).contains("checkpoint_best.pth"),
        "{}",
        failure(&result)
    );
}

#[test]
fn models_and_trainings_are_not_mixed() {
    let project = project("models/model.zip", "trainings = [\"models/results\"]");
    let result = project.run(&["p.toml"]);
    assert_ne!(result.code, 0);
    assert!(
        failure(&result).contains("`models` replaces `trainings`"),
        "{}",
        failure(&result)
    );
}

/// `nnflow predict` as nnUNetv2_predict is called: the zip, no TTA; the same call again is cached.
#[test]
fn the_predict_command_runs_a_model_like_nnunetv2_predict() {
    let project = project("models/model.zip", "");
    let args = [
        "predict",
        "-i",
        "images",
        "-o",
        "out",
        "-m",
        "models/model.zip",
        "-f",
        "0",
        "--disable-tta",
        "--device",
        "cpu",
        "--json",
    ];
    let first = project.nnflow(&args);
    assert!(first.status.success(), "{}", common::stderr(&first));
    for case in CASES {
        let share = agreement(
            &project.path().join(format!("out/{case}.nii.gz")),
            case,
            "nomirror",
        );
        assert!(share >= 0.999, "{case}: {:.4}% of voxels agree", share * 100.0);
    }
    let second = project.nnflow(&args);
    let report: serde_json::Value = serde_json::from_str(&common::stdout(&second)).unwrap();
    assert_eq!(report["stages"][0]["outcome"], "cached", "{report}");
    // the file it wrote says what ran, and `nnflow run` repeats it
    let pipeline = project.read("nnflow-predict.toml");
    assert!(pipeline.contains("mirroring = false"), "{pipeline}");
    let rerun = project.run(&["nnflow-predict.toml"]);
    assert_eq!(rerun.outcome("predict"), "cached", "{}", rerun.json);
}

#[test]
fn the_predict_command_writes_only_inside_its_folder_and_only_its_own_file() {
    let project = project("models/model.zip", "");
    let outside = project.nnflow(&[
        "predict",
        "-i",
        "images",
        "-o",
        "../elsewhere",
        "-m",
        "models/model.zip",
    ]);
    assert_eq!(outside.status.code(), Some(2));
    assert!(common::stderr(&outside).contains("only inside the folder it runs in"));
    assert!(!project.path().join("nnflow-predict.toml").exists());

    project.write("nnflow-predict.toml", "# my notes\n");
    let foreign = project.nnflow(&["predict", "-i", "images", "-o", "out", "-m", "models/model.zip"]);
    assert_eq!(foreign.status.code(), Some(2));
    assert!(common::stderr(&foreign).contains("was not written by `nnflow predict`"));
    assert_eq!(project.read("nnflow-predict.toml"), "# my notes\n");
    assert!(!project.path().join("out").exists());
}

/// `nnflow predict` with `model` (relative to the project) on the ResEnc fixture's images, with
/// and without TTA, each into its own folder: both agree with nnU-Net's predictions of the same
/// setting on >= 99.9% of voxels, on the input's geometry.
fn assert_resenc_predicts_like_nnunet(model: &str) {
    let project = project_of(&RESENC, model, "");
    for (tta, suffix) in [(true, "mirror"), (false, "nomirror")] {
        let output = format!("out_{suffix}");
        let mut args = vec![
            "predict", "-i", "images", "-o", &output, "-m", model, "--device", "cpu",
        ];
        if !tta {
            args.push("--disable-tta");
        }
        let result = project.nnflow(&args);
        assert!(
            result.status.success(),
            "{model} ({suffix}): {}",
            common::stderr(&result)
        );
        for case in CASES {
            let ours = project.path().join(format!("{output}/{case}.nii.gz"));
            let share = agreement_with(&RESENC, &ours, case, suffix);
            eprintln!(
                "ResEnc {model}, {case} ({suffix}): {:.4}% of voxels agree with nnU-Net",
                share * 100.0
            );
            assert!(
                share >= 0.999,
                "ResEnc {model}, {case} ({suffix}): {:.4}% of voxels agree",
                share * 100.0
            );
        }
    }
}

/// Issue 16: a ResidualEncoderUNet (nnUNetPlannerResEncM) checkpoint of nnU-Net's own
/// `nnUNetTrainer_5epochs`, as the zip nnU-Net exported.
#[test]
fn a_resenc_model_of_a_non_default_nnunet_trainer_predicts_like_nnunet_from_its_zip() {
    assert_resenc_predicts_like_nnunet("models/model.zip");
}

/// Issue 16: the same model as the results folder `nnUNetv2_install_pretrained_model_from_zip`
/// unpacks.
#[test]
fn a_resenc_model_of_a_non_default_nnunet_trainer_predicts_like_nnunet_from_its_results_folder() {
    assert_resenc_predicts_like_nnunet(&format!("models/results/{}", RESENC.results_folder));
}
