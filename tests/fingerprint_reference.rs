//! Cropping and the dataset fingerprint against nnU-Net v2.8.1 on a tiny synthetic dataset
//! (tests/fixtures/fingerprint/generate.py writes the dataset and nnU-Net's numbers).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use nnflow::data::dataset::Dataset;
use nnflow::data::nifti;
use nnflow::preprocess::crop::{crop_to_nonzero, OUTSIDE_NONZERO_LABEL};
use nnflow::preprocess::fingerprint::{case_fingerprint, dataset_fingerprint, FingerprintError};
use nnflow::preprocess::fingerprint_format::{Fingerprint, IntensityStats};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fingerprint")
}

fn dataset() -> Dataset {
    Dataset::open(&fixtures().join("Dataset001_Tiny")).unwrap()
}

/// What nnU-Net's crop_to_nonzero and collect_foreground_intensities give for one case.
#[derive(Deserialize)]
struct CropCase {
    bbox: [[usize; 2]; 3],
    shape_before: [usize; 3],
    shape_after: [usize; 3],
    minus_one_count: usize,
    first_samples: Vec<Vec<f32>>,
}

fn read_case(index: usize) -> (Vec<ndarray::Array3<f32>>, ndarray::Array3<i32>, [f64; 3]) {
    let case = &dataset().cases[index];
    let volumes: Vec<_> = case.images.iter().map(|p| nifti::read(p).unwrap()).collect();
    let spacing = volumes[0].spacing_zyx();
    let (seg, _) = nifti::read_integer_labels(&case.label).unwrap();
    (volumes.into_iter().map(|v| v.data).collect(), seg, spacing)
}

#[test]
fn crop_matches_nnunet_per_case() {
    let text = std::fs::read_to_string(fixtures().join("crop_cases.json")).unwrap();
    let expected: std::collections::BTreeMap<String, CropCase> = serde_json::from_str(&text).unwrap();
    let dataset = dataset();
    assert_eq!(dataset.cases.len(), expected.len());
    for (index, case) in dataset.cases.iter().enumerate() {
        let want = &expected[&case.id];
        let (images, seg, _) = read_case(index);
        let cropped = crop_to_nonzero(images, Some(seg));
        let bbox = [0, 1, 2].map(|axis| [cropped.bbox.start[axis], cropped.bbox.end[axis]]);
        assert_eq!(bbox, want.bbox, "{}", case.id);
        assert_eq!(cropped.shape_before, want.shape_before, "{}", case.id);
        assert_eq!(cropped.bbox.shape(), want.shape_after, "{}", case.id);
        let minus_one = cropped
            .seg
            .iter()
            .filter(|&&l| l == OUTSIDE_NONZERO_LABEL)
            .count();
        assert_eq!(minus_one, want.minus_one_count, "{}", case.id);
    }
}

#[test]
fn foreground_samples_are_nnunets_draws() {
    // Same RandomState(1234) stream, same C-order foreground: the very same voxels are drawn.
    let text = std::fs::read_to_string(fixtures().join("crop_cases.json")).unwrap();
    let expected: std::collections::BTreeMap<String, CropCase> = serde_json::from_str(&text).unwrap();
    for (index, case) in dataset().cases.iter().enumerate() {
        let want = &expected[&case.id].first_samples;
        let (images, seg, spacing) = read_case(index);
        let fingerprint = case_fingerprint(images, seg, spacing, want[0].len(), 1234);
        assert_eq!(&fingerprint.foreground_samples, want, "{}", case.id);
    }
}

#[test]
fn dataset_fingerprint_matches_nnunet() {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let expected: Fingerprint = serde_json::from_str(&text).unwrap();
    let ours = dataset_fingerprint(&dataset(), 2).unwrap();

    assert_eq!(ours.spacings, expected.spacings);
    assert_eq!(ours.shapes_after_crop, expected.shapes_after_crop);
    assert!(
        (ours.median_relative_size_after_cropping - expected.median_relative_size_after_cropping).abs()
            < 1e-9
    );
    let channels = &expected.foreground_intensity_properties_per_channel;
    assert_eq!(
        ours.foreground_intensity_properties_per_channel
            .keys()
            .collect::<Vec<_>>(),
        channels.keys().collect::<Vec<_>>()
    );
    for (channel, want) in channels {
        let got = &ours.foreground_intensity_properties_per_channel[channel];
        assert_stats_close(got, want, channel);
    }
}

/// Within 1% of nnU-Net's value, relative to the value or, for values near 0, to the intensity
/// range. Order statistics must be equal: the samples are the same, only the arithmetic differs
/// (nnU-Net sums float32, we sum f64).
fn assert_stats_close(got: &IntensityStats, want: &IntensityStats, channel: &str) {
    let range = want.max - want.min;
    let close = |name: &str, a: f64, b: f64| {
        let scale = b.abs().max(range * 0.01);
        assert!(
            (a - b).abs() <= 0.01 * scale,
            "channel {channel} {name}: ours {a}, nnU-Net {b}"
        );
    };
    close("mean", got.mean, want.mean);
    close("std", got.std, want.std);
    assert!(
        (got.mean - want.mean).abs() <= 1e-5 * want.mean.abs(),
        "{channel} mean {got:?}"
    );
    assert!(
        (got.std - want.std).abs() <= 1e-5 * want.std,
        "{channel} std {got:?}"
    );
    for (name, a, b) in [
        ("median", got.median, want.median),
        ("min", got.min, want.min),
        ("max", got.max, want.max),
        ("percentile_00_5", got.percentile_00_5, want.percentile_00_5),
        ("percentile_99_5", got.percentile_99_5, want.percentile_99_5),
    ] {
        close(name, a, b);
        assert_eq!(a, b, "channel {channel} {name}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_label_of_the_wrong_shape_names_the_case() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("Dataset001_Tiny");
    copy_dir(&fixtures().join("Dataset001_Tiny"), &root);
    // tiny_001's label is 22 slices; tiny_002's images are 24x26x22.
    std::fs::copy(
        root.join("labelsTr/tiny_001.nii.gz"),
        root.join("labelsTr/tiny_002.nii.gz"),
    )
    .unwrap();
    let error = dataset_fingerprint(&Dataset::open(&root).unwrap(), 2).unwrap_err();
    assert!(
        matches!(error, FingerprintError::ShapeMismatch { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("case tiny_002") && message.contains("tiny_002.nii.gz"),
        "{message}"
    );
    assert!(
        message.contains("[22, 28, 20]") && message.contains("[24, 26, 22]"),
        "{message}"
    );
}

#[test]
fn an_unreadable_image_names_the_case() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("Dataset001_Tiny");
    copy_dir(&fixtures().join("Dataset001_Tiny"), &root);
    std::fs::write(root.join("imagesTr/tiny_003_0001.nii.gz"), b"not an image").unwrap();
    let message = dataset_fingerprint(&Dataset::open(&root).unwrap(), 1)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("case tiny_003: ") && message.contains("tiny_003_0001.nii.gz"),
        "{message}"
    );
}

#[test]
fn expected_json_is_nnunets_layout() {
    // The fixture parses as our format type and round-trips, so the keys and nesting agree.
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let parsed: Fingerprint = serde_json::from_str(&text).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), value);
}
