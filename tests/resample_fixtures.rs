//! Golden tests of resampling and normalization against numbers from skimage, batchgenerators and nnU-Net
//! v2.8.1 (`tests/fixtures/resample/generate.py`; the library versions are in its `cases.json`).

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, ArrayD, IxDyn};
use serde_json::Value;

use nnflow::preprocess::fingerprint_format::IntensityStats;
use nnflow::preprocess::normalize::{normalize, Scheme};
use nnflow::preprocess::resample::{
    compute_new_shape, resample_data_to_shape, resample_seg_to_shape, resize, resize_segmentation,
    ResampleOptions,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resample")
}

/// A minimal .npy reader for what generate.py writes: version 1/2 headers, C order, '<f4' or '<i4'.
fn read_npy(name: &str) -> (ArrayD<f64>, bool) {
    let bytes = std::fs::read(fixture_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{name} is not .npy");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{name}: {header}");
    let is_int = header.contains("'<i4'");
    assert!(is_int || header.contains("'<f4'"), "{name}: {header}");
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let values: Vec<f64> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| {
            let raw = [c[0], c[1], c[2], c[3]];
            if is_int {
                f64::from(i32::from_le_bytes(raw))
            } else {
                f64::from(f32::from_le_bytes(raw))
            }
        })
        .collect();
    (ArrayD::from_shape_vec(IxDyn(&shape), values).unwrap(), is_int)
}

fn f32_3d(name: &str) -> Array3<f32> {
    read_npy(name).0.mapv(|v| v as f32).into_dimensionality().unwrap()
}

fn i32_3d(name: &str) -> Array3<i32> {
    read_npy(name).0.mapv(|v| v as i32).into_dimensionality().unwrap()
}

fn cases(kind: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let picked: Vec<Value> = all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect();
    assert!(!picked.is_empty(), "no {kind} cases");
    picked
}

fn shape3(v: &Value) -> [usize; 3] {
    let s: Vec<usize> = serde_json::from_value(v.clone()).unwrap();
    [s[0], s[1], s[2]]
}

fn spacing(v: &Value) -> [f64; 3] {
    let s: Vec<f64> = serde_json::from_value(v.clone()).unwrap();
    [s[0], s[1], s[2]]
}

/// Largest |ours - expected| relative to the expected data's intensity range.
fn max_rel_error<'a>(ours: impl Iterator<Item = &'a f32>, expected: &ArrayD<f64>) -> f64 {
    let lo = expected.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = expected.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let range = (hi - lo).max(1e-12);
    ours.zip(expected.iter())
        .map(|(&a, &b)| (f64::from(a) - b).abs() / range)
        .fold(0.0, f64::max)
}

fn mismatch_fraction<'a>(ours: impl Iterator<Item = &'a i32>, expected: &ArrayD<f64>) -> (usize, f64) {
    let wrong = ours
        .zip(expected.iter())
        .filter(|(&a, &b)| f64::from(a) != b)
        .count();
    (wrong, wrong as f64 / expected.len() as f64)
}

const IMAGE_TOLERANCE: f64 = 1e-4;
const SEG_MISMATCH_TOLERANCE: f64 = 1e-3;

#[test]
fn resize_matches_skimage() {
    for case in cases("resize") {
        let input = f32_3d(case["input"].as_str().unwrap());
        let (expected, _) = read_npy(case["expected"].as_str().unwrap());
        let order = case["order"].as_u64().unwrap() as usize;
        let ours = resize(input.view(), shape3(&case["new_shape"]), order).unwrap();
        assert_eq!(ours.shape(), expected.shape(), "{case}");
        let err = max_rel_error(ours.iter(), &expected);
        println!("{}: max error {err:.2e} of range", case["expected"]);
        assert!(err < IMAGE_TOLERANCE, "{}: {err}", case["expected"]);
    }
}

#[test]
fn resize_segmentation_matches_batchgenerators() {
    for case in cases("resize_segmentation") {
        let input = i32_3d(case["input"].as_str().unwrap());
        let (expected, _) = read_npy(case["expected"].as_str().unwrap());
        let order = case["order"].as_u64().unwrap() as usize;
        let ours = resize_segmentation(input.view(), shape3(&case["new_shape"]), order).unwrap();
        assert_eq!(ours.shape(), expected.shape(), "{case}");
        let (wrong, fraction) = mismatch_fraction(ours.iter(), &expected);
        println!("{}: {wrong} voxels differ ({fraction:.2e})", case["expected"]);
        assert!(
            fraction < SEG_MISMATCH_TOLERANCE,
            "{}: {wrong} voxels differ",
            case["expected"]
        );
    }
}

fn options(case: &Value, seg: bool) -> ResampleOptions {
    let base = if seg {
        ResampleOptions::seg()
    } else {
        ResampleOptions::data()
    };
    ResampleOptions {
        order: case["order"].as_u64().unwrap() as usize,
        order_z: case["order_z"].as_u64().unwrap() as usize,
        ..base
    }
}

#[test]
fn resample_data_matches_nnunet() {
    for case in cases("resample_data") {
        let input: Array4<f32> = read_npy(case["input"].as_str().unwrap())
            .0
            .mapv(|v| v as f32)
            .into_dimensionality()
            .unwrap();
        let (expected, _) = read_npy(case["expected"].as_str().unwrap());
        let (current, target) = (spacing(&case["current_spacing"]), spacing(&case["new_spacing"]));
        let new_shape = shape3(&case["new_shape"]);
        let in_shape = [input.shape()[1], input.shape()[2], input.shape()[3]];
        assert_eq!(compute_new_shape(in_shape, current, target), new_shape);
        let ours =
            resample_data_to_shape(input.view(), new_shape, current, target, &options(&case, false)).unwrap();
        assert_eq!(ours.shape(), expected.shape(), "{case}");
        let err = max_rel_error(ours.iter(), &expected);
        println!("{}: max error {err:.2e} of range", case["expected"]);
        assert!(err < IMAGE_TOLERANCE, "{}: {err}", case["expected"]);
    }
}

#[test]
fn resample_seg_matches_nnunet() {
    for case in cases("resample_seg") {
        let input: Array4<i32> = read_npy(case["input"].as_str().unwrap())
            .0
            .mapv(|v| v as i32)
            .into_dimensionality()
            .unwrap();
        let (expected, _) = read_npy(case["expected"].as_str().unwrap());
        let (current, target) = (spacing(&case["current_spacing"]), spacing(&case["new_spacing"]));
        let new_shape = shape3(&case["new_shape"]);
        let ours =
            resample_seg_to_shape(input.view(), new_shape, current, target, &options(&case, true)).unwrap();
        assert_eq!(ours.shape(), expected.shape(), "{case}");
        let (wrong, fraction) = mismatch_fraction(ours.iter(), &expected);
        println!("{}: {wrong} voxels differ ({fraction:.2e})", case["expected"]);
        assert!(
            fraction < SEG_MISMATCH_TOLERANCE,
            "{}: {wrong} voxels differ",
            case["expected"]
        );
    }
}

#[test]
fn normalization_matches_nnunet() {
    for case in cases("normalize") {
        let image = f32_3d(case["input"].as_str().unwrap());
        let seg = i32_3d(case["seg"].as_str().unwrap());
        let (expected, _) = read_npy(case["expected"].as_str().unwrap());
        let stats: IntensityStats = serde_json::from_value(case["intensityproperties"].clone()).unwrap();
        let scheme = Scheme::from_class_name(case["scheme"].as_str().unwrap()).unwrap();
        let use_mask = case["use_mask_for_norm"].as_bool().unwrap();
        let ours = normalize(image.view(), Some(seg.view()), scheme, use_mask, Some(&stats)).unwrap();
        let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let err = ours
            .iter()
            .zip(expected.iter())
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max);
        println!(
            "{}: max error {:.2e} relative to max |value|",
            case["expected"],
            err / scale
        );
        assert!(err <= 1e-5 * scale, "{}: {err}", case["expected"]);
    }
}
