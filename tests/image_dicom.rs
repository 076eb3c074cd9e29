//! DICOM series folders read through `nnflow::data::image::read`, against what SimpleITK 2.5.7's
//! ImageSeriesReader (with GetGDCMSeriesFileNames) reads from the same files. Fixtures and
//! references: tests/fixtures/image_formats/dicom/generate.py.

use std::path::{Path, PathBuf};

use nnflow::data::image::{self, ImageError};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_formats/dicom")
}

fn series(name: &str) -> PathBuf {
    root().join("series").join(name)
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: {what} length");
    for (g, w) in got.iter().zip(want) {
        let tolerance = 1e-6 * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tolerance,
            "{name}: {what} {got:?} != SimpleITK {want:?}"
        );
    }
}

/// Reads series `name` and compares it with SimpleITK's reference; voxels may differ by at most
/// `voxel_tolerance` (0: bit-for-bit equal float32).
fn check_against_sitk(name: &str, voxel_tolerance: f32) {
    let decoded = image::read(series(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("expected").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let voxels =
        nnflow::data::npy::read::<f32>(&root().join("expected").join(format!("{name}.npy"))).unwrap();

    assert_eq!(decoded.channels.len(), 1, "{name}: channels");
    let geometry = &decoded.geometry;
    assert_eq!(geometry.ndim, 3, "{name}: ndim");
    let shape: Vec<usize> = expected["shape_zyx"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(geometry.shape_zyx.to_vec(), shape, "{name}: shape");
    assert_eq!(voxels.shape(), shape.as_slice(), "{name}: reference shape");
    assert_close(
        "spacing",
        name,
        &geometry.itk_spacing,
        &floats(&expected["spacing"]),
    );
    assert_close("origin", name, &geometry.itk_origin, &floats(&expected["origin"]));
    assert_close(
        "direction",
        name,
        geometry.itk_direction.as_flattened(),
        &floats(&expected["direction"]),
    );
    let [sx, sy, sz] = geometry.itk_spacing;
    assert_eq!(geometry.spacing_zyx, [sz, sy, sx], "{name}: nnU-Net spacing");

    let channel = &decoded.channels[0];
    assert_eq!(channel.shape(), shape.as_slice(), "{name}: voxel shape");
    let mut worst = 0.0f32;
    for ((index, got), want) in channel.indexed_iter().zip(voxels.iter()) {
        let difference = (got - want).abs();
        if voxel_tolerance == 0.0 {
            assert!(
                got.to_bits() == want.to_bits(),
                "{name}: voxel {index:?} is {got}, SimpleITK {want}"
            );
        }
        worst = worst.max(difference);
    }
    assert!(
        worst <= voxel_tolerance,
        "{name}: voxels differ from SimpleITK by up to {worst}"
    );
}

#[test]
fn axial_implicit_vr_int16_stored_against_the_normal() {
    // InstanceNumber runs head to feet (z decreasing); the files are shuffled on disk; a README
    // and a hidden file sit beside the slices.
    check_against_sitk("axial_implicit_int16", 0.0);
}

#[test]
fn sagittal_uint16_with_12_bits_stored_and_rescale() {
    check_against_sitk("sagittal_uint12", 0.0);
}

#[test]
fn coronal_8_bit_without_rescale() {
    check_against_sitk("coronal_uint8", 0.0);
}

#[test]
fn oblique_mr_with_fractional_slope_differing_between_slices() {
    check_against_sitk("oblique_varying_slope", 0.0);
    let decoded = image::read(series("oblique_varying_slope")).unwrap();
    assert!(
        decoded.channels[0].iter().any(|v| v.fract() != 0.0),
        "fractional slopes give non-integer values"
    );
}

#[test]
fn fractional_slope_after_an_integer_first_slice_is_not_truncated() {
    // SimpleITK's default output type (int32, from the first slice) truncates the later
    // fractional slices; nnflow matches its Float32 read.
    check_against_sitk("axial_slope_first_integer", 0.0);
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("expected/axial_slope_first_integer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(expected["sitk_default_differs"], Value::Bool(true));
}

#[test]
fn explicit_vr_big_endian() {
    check_against_sitk("axial_big_endian", 0.0);
}

#[test]
fn deflated_explicit_vr_little_endian() {
    check_against_sitk("coronal_deflate", 0.0);
}

#[test]
fn rle_lossless() {
    check_against_sitk("axial_rle", 0.0);
}

#[test]
fn jpeg_lossless_first_order_prediction_16_bit() {
    check_against_sitk("sagittal_jpeg_lossless", 0.0);
}

#[test]
fn jpeg_baseline_8_bit() {
    // Lossy: the pure-Rust decoder's IDCT rounds some pixels differently from GDCM's libjpeg (by
    // one grey level in these fixtures).
    check_against_sitk("axial_jpeg_baseline", 1.0);
}

#[test]
fn single_slice_is_a_3d_image_with_one_slice() {
    check_against_sitk("single_slice", 0.0);
}

#[test]
fn signed_12_bits_stored_are_masked_and_sign_extended() {
    check_against_sitk("axial_int12_masked", 0.0);
}

fn error_of(name: &str) -> String {
    match image::read(series(name)) {
        Ok(_) => panic!("{name}: read without error"),
        Err(error) => {
            assert!(matches!(error, ImageError::Invalid { .. }), "{name}: {error:?}");
            error.to_string()
        }
    }
}

fn assert_mentions(name: &str, message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{name}: {message:?} does not mention {part:?}"
        );
    }
}

/// The files whose ImagePositionPatient is (0, 0, z) in an error fixture (names do not follow
/// slice order).
fn file_with_position(name: &str, z: f64) -> Vec<String> {
    let folder = series(name);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        if text.contains(&format!("0\\0\\{z}")) {
            found.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    found.sort();
    found
}

#[test]
fn missing_slice_is_an_error_naming_the_gap_and_its_files() {
    let message = error_of("error_missing_slice");
    let before = file_with_position("error_missing_slice", 6.0);
    let after = file_with_position("error_missing_slice", 10.0);
    assert_eq!((before.len(), after.len()), (1, 1));
    assert_mentions(
        "error_missing_slice",
        &message,
        &["not evenly spaced", "4 mm apart", &before[0], &after[0]],
    );
}

#[test]
fn two_series_in_one_folder_are_an_error_listing_both() {
    let message = error_of("error_two_series");
    assert_mentions(
        "error_two_series",
        &message,
        &[
            "2 DICOM series",
            "1.2.826.0.1.3680043.10.1447.31",
            "1.2.826.0.1.3680043.10.1447.32",
            "first series",
            "second series",
        ],
    );
}

#[test]
fn jpeg_2000_is_an_error_naming_file_and_syntax() {
    let message = error_of("error_jpeg2000");
    assert_mentions(
        "error_jpeg2000",
        &message,
        &["1.2.840.10008.1.2.4.90", "JPEG 2000", ".dcm"],
    );
}

#[test]
fn jpeg_ls_is_an_error_naming_file_and_syntax() {
    let message = error_of("error_jpegls");
    assert_mentions(
        "error_jpegls",
        &message,
        &["1.2.840.10008.1.2.4.80", "JPEG-LS", ".dcm"],
    );
}

#[test]
fn duplicate_position_is_an_error_naming_both_files() {
    let message = error_of("error_duplicate_position");
    let both = file_with_position("error_duplicate_position", 2.0);
    assert_eq!(both.len(), 2);
    assert_mentions(
        "error_duplicate_position",
        &message,
        &["same slice position", &both[0], &both[1]],
    );
}

#[test]
fn gantry_tilt_is_an_error() {
    // SimpleITK reads it with spacing |last - first| / 3 = 2.06 and an axial direction, which
    // misplaces every slice but the first.
    let message = error_of("error_gantry_tilt");
    assert_mentions(
        "error_gantry_tilt",
        &message,
        &["shift within their plane", "tilted-gantry"],
    );
}

#[test]
fn slices_of_different_size_are_an_error_naming_the_file() {
    let message = error_of("error_columns_differ");
    assert_mentions(
        "error_columns_differ",
        &message,
        &["Rows x Columns", "8 x 12", "8 x 10"],
    );
}

#[test]
fn folder_without_dicom_files_is_an_error() {
    let message = error_of("error_no_dicom");
    assert_mentions(
        "error_no_dicom",
        &message,
        &["no DICOM image files", "1 files skipped"],
    );
}

#[test]
fn errors_name_the_series_folder_or_a_file_in_it() {
    for name in [
        "error_missing_slice",
        "error_two_series",
        "error_jpeg2000",
        "error_duplicate_position",
    ] {
        let message = error_of(name);
        assert!(
            message.contains(name),
            "{name}: {message:?} names neither the folder nor a file in it"
        );
    }
}

#[test]
fn a_folder_is_read_as_a_dicom_series() {
    let folder: &Path = &series("coronal_uint8");
    assert_eq!(
        image::ImageFormat::of_path(folder),
        Some(image::ImageFormat::DicomSeries)
    );
}
