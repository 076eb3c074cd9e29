//! 2D pictures (PNG, BMP, TIFF) and 3D TIFF through `nnflow::data::image`, against what nnU-Net's
//! own readers (NaturalImage2DIO, Tiff3DIO) return for the same files.
//!
//! Fixtures: tests/fixtures/image_formats/pictures/, made by its `generate.py` (run with nnU-Net's
//! Python environment): `inputs/` holds the files, `expected.json` + `expected/*.npy` what nnU-Net
//! read (channels `(c, z, y, x)` as float32, spacing) or the error it raised.
//!
//! `written_by_nnflow/` holds label maps written by nnflow's writers; `written_files_are_stable`
//! rewrites them and compares byte for byte. After a deliberate change to a writer, re-create them
//! with `NNFLOW_BLESS=1 cargo test --test image_pictures written_files_are_stable`, then run
//! `generate.py --check-written`, which reads them with skimage / tifffile and nnU-Net's readers
//! and checks the values, the dtype (uint8 / uint16) and the spacing JSON byte for byte against
//! what nnU-Net writes.

use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayD};
use nnflow::data::image::{read, read_labels, write_labels, Geometry, ImageError};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_formats/pictures")
}

fn input(name: &str) -> PathBuf {
    fixtures().join("inputs").join(name)
}

#[derive(Deserialize)]
struct Case {
    file: String,
    reader: String,
    role: String,
    nnunet_error: Option<String>,
    shape: Option<[usize; 4]>,
    spacing: Option<[f64; 3]>,
    values: Option<String>,
}

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str::<Expected>(&text).unwrap().cases
}

fn expected_values(case: &Case) -> ArrayD<f32> {
    let name = case.values.as_ref().unwrap();
    nnflow::data::npy::read::<f32>(&fixtures().join("expected").join(name)).unwrap()
}

/// Every fixture reads as nnU-Net reads it: same channels, shape, values (bit for bit) and
/// spacing; a file nnU-Net refuses, nnflow refuses too.
#[test]
fn reads_like_nnunet() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let path = input(&case.file);
        let label = case.role == "label";
        let what = format!("{} ({}, {})", case.file, case.reader, case.role);
        let result = if label {
            read_labels(&path).map(|(labels, geometry)| (vec![labels.mapv(|v| v as f32)], geometry))
        } else {
            read(&path).map(|decoded| (decoded.channels, decoded.geometry))
        };
        let mut failures_here = Vec::new();
        let failures = if KNOWN_DIVERGENCES.contains(&case.file.as_str()) {
            &mut failures_here
        } else {
            &mut failures
        };
        match (&case.nnunet_error, result) {
            (Some(_), Err(e)) => {
                let message = e.to_string();
                assert!(
                    message.contains(&case.file),
                    "{what}: error does not name the file: {message}"
                );
            }
            (Some(error), Ok((channels, _))) => failures.push(format!(
                "{what}: nnU-Net raises `{error}`, nnflow reads {} channels",
                channels.len()
            )),
            (None, Err(e)) => failures.push(format!("{what}: nnflow fails: {e}")),
            (None, Ok((channels, geometry))) => {
                let [c, z, y, x] = case.shape.unwrap();
                let want = expected_values(case);
                if channels.len() != c {
                    failures.push(format!("{what}: {} channels, nnU-Net {c}", channels.len()));
                    continue;
                }
                for (i, channel) in channels.iter().enumerate() {
                    if channel.dim() != (z, y, x) {
                        failures.push(format!(
                            "{what}: channel {i} has shape {:?}, nnU-Net {:?}",
                            channel.dim(),
                            (z, y, x)
                        ));
                        continue;
                    }
                    let differ = channel
                        .indexed_iter()
                        .find(|&((k, j, l), v)| v.to_bits() != want[[i, k, j, l]].to_bits());
                    if let Some(((k, j, l), v)) = differ {
                        failures.push(format!(
                            "{what}: channel {i} voxel {:?} is {v}, nnU-Net {}",
                            (k, j, l),
                            want[[i, k, j, l]]
                        ));
                    }
                }
                let spacing = case.spacing.unwrap();
                if geometry.spacing_zyx != spacing {
                    failures.push(format!(
                        "{what}: spacing {:?}, nnU-Net {spacing:?}",
                        geometry.spacing_zyx
                    ));
                }
                assert_eq!(geometry.shape_zyx, [z, y, x], "{what}");
                assert_eq!(
                    geometry.ndim,
                    if case.reader == "natural2d" { 2 } else { 3 },
                    "{what}"
                );
            }
        }
        for failure in failures_here {
            eprintln!("known divergence: {failure}");
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `.tif` files where nnflow's choice (several pages: 3D TIFF, else a 2D picture) differs from
/// nnU-Net's (NaturalImage2DIO if it reads the file, else Tiff3DIO): a single page of grey +
/// alpha (nnU-Net: a `(y, x, 2)` volume; nnflow: refused as a picture) and 3 or 4 pages (nnU-Net:
/// skimage moves that axis last and reads an RGB(A) picture; nnflow: a 3D volume).
const KNOWN_DIVERGENCES: [&str; 2] = ["tif2d_grey_alpha.tif", "tif_3pages.tif"];

#[test]
fn single_page_tiff_is_not_3d() {
    let error = read(input("single_page_0000.tiff")).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ImageError::Invalid { .. }), "{message}");
    assert!(
        message.contains("single_page_0000.tiff") && message.contains("3D"),
        "{message}"
    );
}

#[test]
fn truncated_png_is_an_error() {
    let message = read(input("truncated.png")).unwrap_err().to_string();
    assert!(
        message.contains("truncated.png") && message.contains("PNG"),
        "{message}"
    );
}

#[test]
fn bad_spacing_json_names_the_json_file() {
    let message = read(input("bad_spacing_0000.tiff")).unwrap_err().to_string();
    assert!(message.contains("bad_spacing.json"), "{message}");
    assert!(message.contains("3 numbers"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(input("vol_uint8_0000.tiff"), dir.path().join("v_0000.tiff")).unwrap();
    for (json, says) in [
        ("{\"spacing\": [1, 0, 1]}", "> 0"),
        ("{\"spacings\": [1, 1, 1]}", "no \"spacing\""),
        ("{\"spacing\": [1, 1,", "not JSON"),
        ("{\"spacing\": [1, \"a\", 1]}", "3 numbers"),
    ] {
        std::fs::write(dir.path().join("v.json"), json).unwrap();
        let message = read(dir.path().join("v_0000.tiff")).unwrap_err().to_string();
        assert!(
            message.contains("v.json") && message.contains(says),
            "{json}: {message}"
        );
    }
}

#[test]
fn grey_alpha_is_refused_as_nnunet_does() {
    let message = read(input("png_grey_alpha8.png")).unwrap_err().to_string();
    assert!(
        message.contains("(y, x, 3 or 4)") && message.contains("[6, 9, 2]"),
        "{message}"
    );
}

/// The label maps the writers are tested with (keep in sync with generate.py's `intended_labels`).
fn intended_labels(shape: [usize; 3], wide: bool) -> Array3<i16> {
    Array3::from_shape_fn(shape, |(z, y, x)| {
        let label = ((x * 7 + y * 3 + z * 5) % 6) as i16;
        if wide {
            label * 150 + (x % 2) as i16
        } else {
            label
        }
    })
}

/// A written case: file, shape, wide (16-bit), spacing of the JSON (None for 2D).
type WrittenCase = (&'static str, [usize; 3], bool, Option<[f64; 3]>);

/// As in generate.py's WRITTEN_CASES.
const WRITTEN: [WrittenCase; 7] = [
    ("labels_small.png", [1, 7, 11], false, None),
    ("labels_wide.png", [1, 7, 11], true, None),
    ("labels_small.bmp", [1, 7, 11], false, None),
    ("labels_small.tif", [1, 7, 11], false, None),
    ("labels_wide.tif", [1, 7, 11], true, None),
    ("labels3d_small.tiff", [4, 7, 11], false, Some([2.5, 0.75, 0.5])),
    ("labels3d_wide.tif", [4, 7, 11], true, Some([1.0, 1.0, 1.0])),
];

fn json_name(file: &str) -> String {
    format!("{}.json", &file[..file.rfind('.').unwrap()])
}

/// Writes every label map, reads it back with nnflow, and compares the bytes with the committed
/// files generate.py checked against skimage / tifffile / nnU-Net (NNFLOW_BLESS=1: replace them).
#[test]
fn written_files_are_stable() {
    let dir = tempfile::tempdir().unwrap();
    let committed = fixtures().join("written_by_nnflow");
    let bless = std::env::var_os("NNFLOW_BLESS").is_some_and(|v| v == "1");
    for (file, shape, wide, spacing) in WRITTEN {
        let labels = intended_labels(shape, wide);
        let geometry = match spacing {
            None => Geometry::picture(shape[1], shape[2]),
            Some(spacing) => Geometry::from_spacing_zyx(shape, spacing),
        };
        let path = dir.path().join(file);
        write_labels(&path, &labels, &geometry).unwrap();

        let (back, back_geometry) = read_labels(&path).unwrap();
        assert_eq!(back, labels.mapv(i32::from), "{file}");
        assert_eq!(back_geometry.spacing_zyx, geometry.spacing_zyx, "{file}");
        assert_eq!(back_geometry.ndim, geometry.ndim, "{file}");

        let mut files = vec![file.to_string()];
        if spacing.is_some() {
            files.push(json_name(file));
        }
        for name in files {
            let ours = std::fs::read(dir.path().join(&name)).unwrap();
            if bless {
                std::fs::create_dir_all(&committed).unwrap();
                std::fs::write(committed.join(&name), &ours).unwrap();
            } else {
                let theirs = std::fs::read(committed.join(&name))
                    .unwrap_or_else(|e| panic!("{name}: {e} (create with NNFLOW_BLESS=1)"));
                assert!(
                    ours == theirs,
                    "{name}: nnflow now writes other bytes than the committed file"
                );
            }
        }
    }
    // Atomic writes leave no temporary files behind.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 9, "{names:?}");
}

#[test]
fn bmp_holds_8_bit_labels_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.bmp");
    let labels = intended_labels([1, 4, 5], true);
    let error = write_labels(&path, &labels, &Geometry::picture(4, 5)).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ImageError::CannotWrite { .. }), "{message}");
    assert!(
        message.contains("wide.bmp")
            && message.contains("BMP")
            && message.contains(&labels.iter().max().unwrap().to_string()),
        "{message}"
    );
    assert!(!path.exists());
    // 254 is the largest label nnU-Net writes as uint8.
    let labels = Array3::from_elem((1, 2, 3), 254i16);
    write_labels(&path, &labels, &Geometry::picture(2, 3)).unwrap();
    assert_eq!(read_labels(&path).unwrap().0, labels.mapv(i32::from));
}

#[test]
fn writers_refuse_what_they_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let negative = Array3::from_elem((1, 2, 3), -1i16);
    let message = write_labels(dir.path().join("n.png"), &negative, &Geometry::picture(2, 3))
        .unwrap_err()
        .to_string();
    assert!(message.contains("n.png") && message.contains(">= 0"), "{message}");
    let volume = Array3::from_elem((2, 2, 3), 1i16);
    let message = write_labels(dir.path().join("v.png"), &volume, &Geometry::picture(2, 3))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("v.png") && message.contains("one slice"),
        "{message}"
    );
}

/// A 3D label map written as `.tif` (several pages) reads back as 3D with its spacing; a 2D one
/// as a picture.
#[test]
fn tif_dispatch_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let labels = intended_labels([3, 5, 4], false);
    let path = dir.path().join("case.tif");
    write_labels(
        &path,
        &labels,
        &Geometry::from_spacing_zyx([3, 5, 4], [0.3, 0.2, 0.1]),
    )
    .unwrap();
    let (back, geometry) = read_labels(&path).unwrap();
    assert_eq!(back, labels.mapv(i32::from));
    assert_eq!(geometry.ndim, 3);
    assert_eq!(geometry.spacing_zyx, [0.3, 0.2, 0.1]);
    let json = std::fs::read_to_string(dir.path().join("case.json")).unwrap();
    assert_eq!(
        json,
        "{\n    \"spacing\": [\n        0.3,\n        0.2,\n        0.1\n    ]\n}"
    );
    // As an image channel `case_0000.tif` it takes `case.json` as well.
    std::fs::rename(&path, dir.path().join("case_0000.tif")).unwrap();
    let decoded = read(dir.path().join("case_0000.tif")).unwrap();
    assert_eq!(decoded.geometry.spacing_zyx, [0.3, 0.2, 0.1]);
}
