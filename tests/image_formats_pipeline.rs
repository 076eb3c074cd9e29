//! A small synthetic dataset in each image format nnflow reads goes through `pipelines/nnunet.toml`
//! end to end (fingerprint, plan, preprocessing, one short training, selection, postprocessing,
//! prediction), and the predictions are written in the input's format with its geometry. DICOM
//! series go in through `nnflow import` and come out of prediction as NIfTI.

mod common;

use std::path::Path;

use common::{stderr, Project};
use nnflow::data::image;

/// The pipeline on dataset `D`: one configuration, fold 0, one short epoch, predicting `D/imagesTs`.
fn run_pipeline(project: &Project, configuration: &str) {
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    let configurations = format!("configurations=[\"{configuration}\"]");
    let result = project.run(&[
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        &configurations,
        "--set",
        "folds=[0]",
        "--set",
        "fingerprint.foreground_samples=2000",
        "--set",
        "train.epochs=1",
        "--set",
        "train.iterations_per_epoch=2",
        "--set",
        "train.val_iterations=1",
        "--set",
        "predictions=out",
    ]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    assert_eq!(result.outcome("predict"), "ran", "{}", result.json);
}

/// Every test image has a prediction `out/<case><ending>` on the image's grid, in the image's
/// geometry, holding only declared labels.
fn check_predictions(project: &Project, ending: &str, prediction_ending: &str) {
    let images = project.path().join("D/imagesTs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&images).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(&format!("_0000{ending}")) else { continue };
        let input = image::read(&path).unwrap();
        let predicted = project.path().join(format!("out/{stem}{prediction_ending}"));
        let (labels, geometry) =
            image::read_labels(&predicted).unwrap_or_else(|e| panic!("{}: {e}", predicted.display()));
        assert_eq!(labels.shape(), input.channels[0].shape(), "{name}");
        assert_same_geometry(&geometry, &input.geometry, &name);
        assert!(labels.iter().all(|v| (0..=2).contains(v)), "{name}: labels 0..=2");
        checked += 1;
    }
    assert_eq!(checked, 2, "both test images predicted");
}

fn assert_same_geometry(found: &image::Geometry, expected: &image::Geometry, what: &str) {
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0));
    assert_eq!(found.ndim, expected.ndim, "{what}: dimensions");
    assert_eq!(found.shape_zyx, expected.shape_zyx, "{what}: shape");
    assert!(close(&found.spacing_zyx, &expected.spacing_zyx), "{what}: spacing {found:?} vs {expected:?}");
    assert!(close(&found.itk_origin, &expected.itk_origin), "{what}: origin {found:?} vs {expected:?}");
    assert!(
        close(found.itk_direction.as_flattened(), expected.itk_direction.as_flattened()),
        "{what}: direction {found:?} vs {expected:?}"
    );
}

fn synth(project: &Project, ending: &str, shape: &str) {
    let output = project.nnflow(&[
        "synth", "D", "--cases", "5", "--test-cases", "2", "--shape", shape, "--spacing", "2,1,1",
        "--format", ending,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

fn a_3d_format_runs_end_to_end(ending: &str) {
    let project = Project::new();
    synth(&project, ending, "16,24,24");
    run_pipeline(&project, "3d_fullres");
    check_predictions(&project, ending, ending);
}

#[test]
fn nifti_uncompressed() {
    a_3d_format_runs_end_to_end(".nii");
}

#[test]
fn nrrd() {
    a_3d_format_runs_end_to_end(".nrrd");
}

#[test]
fn nrrd_detached_header() {
    a_3d_format_runs_end_to_end(".nhdr");
}

#[test]
fn metaimage() {
    a_3d_format_runs_end_to_end(".mha");
}

#[test]
fn metaimage_detached_header() {
    a_3d_format_runs_end_to_end(".mhd");
}

#[test]
fn tiff_3d() {
    a_3d_format_runs_end_to_end(".tiff");
}

#[test]
fn png_2d() {
    let project = Project::new();
    synth(&project, ".png", "1,48,48");
    run_pipeline(&project, "2d");
    check_predictions(&project, ".png", ".png");
}
