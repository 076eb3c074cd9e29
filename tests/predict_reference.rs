//! Same weights, same answer: nnU-Net 2.8.1 trained a small 3d_fullres model and predicted two raw
//! test images (tests/fixtures/predict/generate.py); nnflow's `predict` stage loads those weights
//! with nnU-Net's plan and predicts the same raw images. At least 99.9% of voxels must agree, with
//! and without mirroring, and the written NIfTI must carry the input's geometry.

mod common;

use std::path::{Path, PathBuf};

use common::Project;
use nnflow::data::nifti;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/predict")
        .join(name)
}

const CASES: [&str; 2] = ["TinyTest_000", "TinyTest_001"];

/// A project with nnU-Net's dataset.json, plan, a "training" holding nnU-Net's weights, and the
/// test images.
fn project() -> Project {
    let project = Project::new();
    let copy = |from: &str, to: &str| {
        let target = project.path().join(to);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(fixture(from), target).unwrap();
    };
    copy("dataset.json", "D/dataset.json");
    copy("plans.json", "plan/plans.json");
    copy("weights.safetensors", "training/checkpoint_final.safetensors");
    for case in CASES {
        copy(
            &format!("{case}_0000.nii.gz"),
            &format!("D/imagesTs/{case}_0000.nii.gz"),
        );
    }
    project.write(
        "training/fold.json",
        r#"{"configuration": "3d_fullres", "fold": "0", "validation_cases": [], "file_ending": ".nii.gz", "probabilities": false}"#,
    );
    project.write(
        "p.toml",
        r#"[stages.predict]
kind = "predict"
images = "D/imagesTs"
output = "predictions"
dataset = "D"
plan = "plan"
trainings = ["training"]
configuration = "3d_fullres"
device = "cpu"
"#,
    );
    project
}

fn agreement(ours: &Path, theirs: &Path) -> f64 {
    let (a, header_a) = nifti::read_integer_labels(ours).unwrap();
    let (b, _) = nifti::read_integer_labels(theirs).unwrap();
    assert_eq!(a.shape(), b.shape(), "{}", ours.display());
    let input = theirs
        .to_string_lossy()
        .replace("_pred_mirror", "_0000")
        .replace("_pred_nomirror", "_0000");
    let source = nifti::read_header(&input).unwrap();
    assert_eq!(
        header_a.affine(),
        source.affine(),
        "{}: geometry differs from the input's",
        ours.display()
    );
    let same = a.iter().zip(b.iter()).filter(|(x, y)| x == y).count();
    same as f64 / a.len() as f64
}

#[test]
fn nnunet_weights_predict_like_nnunet() {
    for (mirroring, suffix) in [(true, "mirror"), (false, "nomirror")] {
        let project = project();
        let setting = format!("predict.mirroring={mirroring}");
        let result = project.run(&["p.toml", "--set", &setting]);
        assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
        for case in CASES {
            let ours = project.path().join(format!("predictions/{case}.nii.gz"));
            let share = agreement(&ours, &fixture(&format!("{case}_pred_{suffix}.nii.gz")));
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
}
