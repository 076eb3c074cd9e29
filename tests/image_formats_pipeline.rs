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
        let Some(stem) = name.strip_suffix(&format!("_0000{ending}")) else {
            continue;
        };
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
    let close = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0))
    };
    assert_eq!(found.ndim, expected.ndim, "{what}: dimensions");
    assert_eq!(found.shape_zyx, expected.shape_zyx, "{what}: shape");
    assert!(
        close(&found.spacing_zyx, &expected.spacing_zyx),
        "{what}: spacing {found:?} vs {expected:?}"
    );
    assert!(
        close(&found.itk_origin, &expected.itk_origin),
        "{what}: origin {found:?} vs {expected:?}"
    );
    assert!(
        close(
            found.itk_direction.as_flattened(),
            expected.itk_direction.as_flattened()
        ),
        "{what}: direction {found:?} vs {expected:?}"
    );
}

fn synth(project: &Project, ending: &str, shape: &str) {
    let output = project.nnflow(&[
        "synth",
        "D",
        "--cases",
        "5",
        "--test-cases",
        "2",
        "--shape",
        shape,
        "--spacing",
        "2,1,1",
        "--format",
        ending,
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

/// DICOM series (tests/fixtures/image_formats/dicom_pipeline, see its generate.py): `nnflow import`
/// turns one series folder per case into NIfTI channels with the series' geometry, the pipeline
/// trains on them, and predicting a folder of series writes NIfTI with each series' geometry.
#[test]
fn dicom_series_import_and_predict() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_formats/dicom_pipeline");
    let project = Project::new();
    let images = fixtures.join("images");
    let labels = fixtures.join("labels");
    let output = project.nnflow(&[
        "import",
        "--images",
        images.to_str().unwrap(),
        "--channel",
        "CT",
        "--labels",
        labels.to_str().unwrap(),
        "--out",
        "D",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for case in ["case_000", "case_001"] {
        let series = image::read(images.join(case)).unwrap();
        let imported = image::read(project.path().join(format!("D/imagesTr/{case}_0000.nii.gz"))).unwrap();
        assert_eq!(imported.channels, series.channels, "{case}: voxels (HU) kept");
        assert_same_geometry(&imported.geometry, &series.geometry, case);
    }
    // the test series, predicted as a folder of series folders
    let test = project.path().join("D/imagesTs");
    for case in ["test_000", "test_001"] {
        copy_folder(&fixtures.join("test").join(case), &test.join(case));
    }
    run_pipeline(&project, "3d_fullres");
    for case in ["test_000", "test_001"] {
        let series = image::read(test.join(case)).unwrap();
        let predicted = project.path().join(format!("out/{case}.nii.gz"));
        let (labels, geometry) =
            image::read_labels(&predicted).unwrap_or_else(|e| panic!("{}: {e}", predicted.display()));
        assert_eq!(labels.shape(), series.channels[0].shape(), "{case}");
        assert_same_geometry(&geometry, &series.geometry, case);
    }
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// NIfTI-2 (nibabel writes it; SimpleITK 2.5 cannot read it): a dataset converted to NIfTI-2
/// trains, and its predictions are NIfTI-2 with the images' geometry.
#[test]
fn nifti2() {
    use nnflow::data::geometry::Nifti2Geometry;
    use nnflow::data::nifti;
    let project = Project::new();
    synth(&project, ".nii.gz", "16,24,24");
    for folder in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
        for entry in std::fs::read_dir(project.path().join("D").join(folder)).unwrap() {
            let path = entry.unwrap().path();
            let (labels, mut header) = nifti::read_integer_labels(&path).unwrap();
            header.nifti2 = Some(Nifti2Geometry::of(&header));
            nifti::write(&path, &labels.mapv(|v| v as i16), &header).unwrap();
        }
    }
    run_pipeline(&project, "3d_fullres");
    check_predictions(&project, ".nii.gz", ".nii.gz");
    for case in ["test_000", "test_001"] {
        let path = project.path().join(format!("out/{case}.nii.gz"));
        let (_, header) = nifti::read_integer_labels(&path).unwrap();
        assert!(header.nifti2.is_some(), "{case}: written as NIfTI-2");
    }
}

#[test]
fn bmp_2d() {
    let project = Project::new();
    synth(&project, ".bmp", "1,48,48");
    run_pipeline(&project, "2d");
    check_predictions(&project, ".bmp", ".bmp");
}

#[test]
fn tif_2d() {
    let project = Project::new();
    synth(&project, ".tif", "1,48,48");
    run_pipeline(&project, "2d");
    check_predictions(&project, ".tif", ".tif");
}

/// RGB pictures, one file for three channels as nnU-Net's NaturalImage2DIO reads them (its road
/// segmentation example): the synthetic grey pictures rewritten as 8-bit RGB, dataset.json naming
/// three channels.
#[test]
fn rgb_png_one_file_three_channels() {
    let project = Project::new();
    synth(&project, ".png", "1,48,48");
    for folder in ["imagesTr", "imagesTs"] {
        for entry in std::fs::read_dir(project.path().join("D").join(folder)).unwrap() {
            let path = entry.unwrap().path();
            let grey = image::read(&path).unwrap().channels.remove(0);
            let rgb: Vec<u8> = grey
                .iter()
                .flat_map(|&v| [(v / 2.0).min(255.0) as u8, (v / 4.0) as u8, 255 - (v / 4.0) as u8])
                .collect();
            let file = std::fs::File::create(&path).unwrap();
            let mut encoder = png::Encoder::new(file, 48, 48);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.write_header().unwrap().write_image_data(&rgb).unwrap();
        }
    }
    let json_path = project.path().join("D/dataset.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    json["channel_names"] = serde_json::json!({"0": "R", "1": "G", "2": "B"});
    std::fs::write(&json_path, json.to_string()).unwrap();
    run_pipeline(&project, "2d");
    check_predictions(&project, ".png", ".png");
    let plans = project.read(".nnflow/nnunet/out/plan/plans.json");
    let plans: serde_json::Value = serde_json::from_str(&plans).unwrap();
    let schemes = &plans["configurations"]["2d"]["normalization_schemes"];
    assert_eq!(schemes.as_array().map(Vec::len), Some(3), "{schemes}");
}
