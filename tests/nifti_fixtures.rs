//! Reads the nibabel-generated fixtures (tests/fixtures/nifti, see generate.py) and compares with
//! what nibabel reported in expected.json; round-trips through `write`; checks error messages.

use std::path::{Path, PathBuf};

use ndarray::Array3;
use nnflow::data::nifti::{self, Header, NiftiError};
use serde::Deserialize;

#[derive(Deserialize)]
struct Sample {
    xyz: [usize; 3],
    value: f64,
}

#[derive(Deserialize)]
struct Expected {
    shape_zyx: [usize; 3],
    datatype: i16,
    affine: [[f64; 4]; 4],
    spacing_zyx: [f64; 3],
    pixdim_xyz: [f64; 3],
    itk_origin: [f64; 3],
    itk_direction: [[f64; 3]; 3],
    sum: f64,
    samples: Vec<Sample>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nifti")
        .join(name)
}

fn expected() -> std::collections::BTreeMap<String, Expected> {
    let text = std::fs::read_to_string(fixture("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("parse expected.json")
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

fn check_fixture(name: &str, exp: &Expected) {
    let vol = nifti::read(fixture(name)).unwrap_or_else(|e| panic!("{e}"));
    let h = &vol.header;
    assert_eq!(vol.data.shape(), exp.shape_zyx, "{name}: shape");
    assert_eq!(h.shape_zyx(), exp.shape_zyx, "{name}: header shape");
    assert_eq!(h.datatype, exp.datatype, "{name}: datatype");
    for (i, (a, b)) in vol.spacing_zyx().iter().zip(exp.spacing_zyx).enumerate() {
        assert!(close(*a, b, 1e-6), "{name}: spacing_zyx[{i}] {a} vs {b}");
    }
    for (i, (a, b)) in h.itk_spacing().iter().zip(exp.pixdim_xyz).enumerate() {
        assert!(close(*a, b, 1e-6), "{name}: itk_spacing[{i}] {a} vs {b}");
    }
    let aff = h.affine();
    for r in 0..4 {
        for c in 0..4 {
            let (a, b) = (aff[r][c], exp.affine[r][c]);
            assert!(
                (a - b).abs() <= 1e-6,
                "{name}: affine[{r}][{c}] {a} vs {b}\n{aff:?}"
            );
        }
    }
    for i in 0..3 {
        assert!(
            (h.itk_origin()[i] - exp.itk_origin[i]).abs() <= 1e-6,
            "{name}: itk_origin"
        );
        for j in 0..3 {
            assert!(
                (h.itk_direction()[i][j] - exp.itk_direction[i][j]).abs() <= 1e-6,
                "{name}: itk_dir"
            );
        }
    }
    let is_float = matches!(exp.datatype, 16 | 64);
    for s in &exp.samples {
        let [x, y, z] = s.xyz;
        let got = f64::from(vol.data[[z, y, x]]);
        let ok = if is_float {
            close(got, s.value, 1e-6)
        } else {
            got == s.value
        };
        assert!(
            ok,
            "{name}: value at nibabel [x,y,z]={:?}: got {got}, nibabel {}",
            s.xyz, s.value
        );
    }
    let sum: f64 = vol.data.iter().map(|&v| f64::from(v)).sum();
    assert!(close(sum, exp.sum, 1e-6), "{name}: sum {sum} vs {}", exp.sum);
}

macro_rules! fixture_tests {
    ($($test:ident => $file:expr),* $(,)?) => {
        $(#[test] fn $test() { check_fixture($file, &expected()[$file]); })*

        /// Every fixture in expected.json has a test above (so new fixtures are not forgotten).
        #[test]
        fn every_expected_fixture_is_tested() {
            let tested = [$($file),*];
            for name in expected().keys() {
                assert!(tested.contains(&name.as_str()), "no test for fixture {name}");
            }
        }
    };
}

fixture_tests! {
    reads_uint8 => "dtype_uint8.nii.gz",
    reads_int8 => "dtype_int8.nii.gz",
    reads_uint16 => "dtype_uint16.nii.gz",
    reads_int16 => "dtype_int16.nii.gz",
    reads_uint32 => "dtype_uint32.nii.gz",
    reads_int32 => "dtype_int32.nii.gz",
    reads_float32 => "dtype_float32.nii.gz",
    reads_float64 => "dtype_float64.nii.gz",
    applies_slope_and_intercept => "scaled_int16.nii.gz",
    qform_only_with_rotation_and_negative_qfac => "qform_only.nii.gz",
    oblique_sform_wins_over_qform => "oblique_sform.nii.gz",
    anisotropic_spacing => "anisotropic.nii.gz",
    uncompressed_nii => "uncompressed_float32.nii",
    big_endian => "bigendian_int16.nii",
    multi_member_gzip => "multimember_int16.nii.gz",
    image_2d_as_z1 => "image2d.nii.gz",
    image_4d_single_timepoint => "image4d_t1.nii.gz",
    no_sform_no_qform_falls_back_to_pixdim_diagonal => "nocodes.nii.gz",
}

#[test]
fn scaled_values_are_raw_times_slope_plus_intercept() {
    // raw int16 at (x, y, z) is x + 4y + 20z - 50; slope 2, intercept -5
    let vol = nifti::read(fixture("scaled_int16.nii.gz")).unwrap();
    assert_eq!(vol.data[[5, 4, 3]], ((3 + 16 + 100 - 50) * 2 - 5) as f32);
}

#[test]
fn read_header_matches_full_read() {
    for name in [
        "qform_only.nii.gz",
        "bigendian_int16.nii",
        "multimember_int16.nii.gz",
    ] {
        assert_eq!(
            nifti::read_header(fixture(name)).unwrap(),
            nifti::read(fixture(name)).unwrap().header
        );
    }
}

#[test]
fn integer_labels_read_exactly() {
    let (labels, header) = nifti::read_integer_labels(fixture("dtype_int32.nii.gz")).unwrap();
    let vol = nifti::read(fixture("dtype_int32.nii.gz")).unwrap();
    assert_eq!(header, vol.header);
    assert_eq!(labels.mapv(|v| v as f32), vol.data);
    let (scaled, _) = nifti::read_integer_labels(fixture("scaled_int16.nii.gz")).unwrap();
    assert_eq!(scaled[[0, 0, 0]], -105);
}

#[test]
fn non_integer_labels_are_rejected_with_file_and_voxel() {
    let err = nifti::read_integer_labels(fixture("dtype_float32.nii.gz")).unwrap_err();
    assert!(matches!(err, NiftiError::NotInteger { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("dtype_float32.nii.gz") && msg.contains("non-integer"),
        "{msg}"
    );
}

// --- writing -----------------------------------------------------------------------------------

fn assert_same_geometry(a: &Header, b: &Header, what: &str) {
    let strip = |h: &Header| Header {
        datatype: 0,
        ..h.clone()
    };
    assert_eq!(strip(a), strip(b), "{what}: header geometry");
    assert_eq!(a.affine(), b.affine(), "{what}: affine must be bit-identical");
}

fn roundtrip<T: nifti::NiftiElement + PartialEq + std::fmt::Debug>(
    name: &str,
    out_name: &str,
    convert: impl Fn(f32) -> T,
) {
    let dir = tempfile::tempdir().unwrap();
    let src = nifti::read(fixture(name)).unwrap();
    let data: Array3<T> = src.data.mapv(&convert);
    let out = dir.path().join(out_name);
    nifti::write(&out, &data, &src.header).unwrap();
    let back = nifti::read(&out).unwrap();
    assert_same_geometry(&src.header, &back.header, name);
    assert_eq!(back.data.mapv(&convert), data, "{name}: data");
    assert_eq!(back.data, src.data, "{name}: values");
}

#[test]
fn roundtrip_u8() {
    roundtrip("dtype_uint8.nii.gz", "u8.nii.gz", |v| v as u8);
}

#[test]
fn roundtrip_i16_big_endian_source() {
    roundtrip("bigendian_int16.nii", "i16.nii.gz", |v| v as i16);
}

#[test]
fn roundtrip_i32_scaled_source_to_uncompressed() {
    roundtrip("scaled_int16.nii.gz", "i32.nii", |v| v as i32);
}

#[test]
fn roundtrip_f32_keeps_every_geometry_kind() {
    for name in [
        "qform_only.nii.gz",
        "oblique_sform.nii.gz",
        "anisotropic.nii.gz",
        "nocodes.nii.gz",
        "image2d.nii.gz",
        "image4d_t1.nii.gz",
        "dtype_float64.nii.gz",
    ] {
        roundtrip(name, "f32.nii.gz", |v| v);
    }
}

#[test]
fn written_header_has_new_datatype_and_identity_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let src = nifti::read(fixture("scaled_int16.nii.gz")).unwrap();
    let out = dir.path().join("seg.nii");
    nifti::write(&out, &src.data.mapv(|v| v as u8), &src.header).unwrap();
    let b = std::fs::read(&out).unwrap();
    let i16_at = |o: usize| i16::from_le_bytes([b[o], b[o + 1]]);
    let f32_at = |o: usize| f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    assert_eq!((i16_at(70), i16_at(72)), (2, 8), "datatype/bitpix");
    assert_eq!((f32_at(108), f32_at(112), f32_at(116)), (352.0, 1.0, 0.0));
    assert_eq!(b.len(), 352 + 120);
    assert_eq!(&b[344..348], b"n+1\0");
}

#[test]
fn write_rejects_shape_that_does_not_match_header() {
    let dir = tempfile::tempdir().unwrap();
    let src = nifti::read(fixture("dtype_uint8.nii.gz")).unwrap();
    let out = dir.path().join("bad.nii.gz");
    let err = nifti::write(&out, &Array3::<u8>::zeros((1, 2, 3)), &src.header).unwrap_err();
    assert!(err.to_string().contains("bad.nii.gz"), "{err}");
    assert!(!out.exists());
}

/// Writes Rust outputs for a manual nibabel check:
/// `NIFTI_VERIFY_OUT=/tmp/out cargo test -- --ignored write_for_nibabel` then
/// `python tests/fixtures/nifti/generate.py verify REF OUT ...` (pairs printed below).
#[test]
#[ignore]
fn write_for_nibabel_verification() {
    let out_dir = PathBuf::from(std::env::var("NIFTI_VERIFY_OUT").expect("set NIFTI_VERIFY_OUT"));
    std::fs::create_dir_all(&out_dir).unwrap();
    for name in expected().keys() {
        let src = nifti::read(fixture(name)).unwrap();
        let out = out_dir.join(format!("rust_{}.nii.gz", name.split('.').next().unwrap()));
        nifti::write(&out, &src.data, &src.header).unwrap();
        println!("{} {}", fixture(name).display(), out.display());
    }
}

// --- errors ------------------------------------------------------------------------------------

fn read_err(path: &Path) -> (NiftiError, String) {
    let err = nifti::read(path).unwrap_err();
    let msg = err.to_string();
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(msg.contains(&file), "message must name the file: {msg}");
    (err, msg)
}

#[test]
fn corrupt_gzip_is_reported() {
    let (err, msg) = read_err(&fixture("corrupt.nii.gz"));
    assert!(matches!(err, NiftiError::Gzip { .. }), "{msg}");
}

#[test]
fn truncated_gzip_is_reported() {
    let (err, msg) = read_err(&fixture("truncated_gzip.nii.gz"));
    assert!(matches!(err, NiftiError::Gzip { .. }), "{msg}");
}

#[test]
fn truncated_data_is_reported_with_sizes() {
    let (err, msg) = read_err(&fixture("truncated.nii"));
    assert!(matches!(err, NiftiError::Truncated { .. }), "{msg}");
    assert!(
        msg.ends_with(
            "truncated.nii: truncated: header says 4x5x6 int16 (240 bytes) but only 100 bytes of data"
        ),
        "{msg}"
    );
}

#[test]
fn unsupported_datatype_names_code() {
    let (err, msg) = read_err(&fixture("unsupported_complex64.nii.gz"));
    assert!(
        matches!(err, NiftiError::UnsupportedDatatype { code: 32, .. }),
        "{msg}"
    );
    assert!(msg.contains("datatype 32 (complex64)"), "{msg}");
}

#[test]
fn missing_file_is_reported() {
    let (err, _) = read_err(Path::new("/nonexistent/case_404_0000.nii.gz"));
    assert!(matches!(err, NiftiError::Io { .. }));
}

/// Writes a copy of the uncompressed fixture with `patch` applied to its bytes.
fn patched(name: &str, patch: impl Fn(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("uncompressed_float32.nii")).unwrap();
    patch(&mut bytes);
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

#[test]
fn bad_header_size_is_reported() {
    let (_d, path) = patched("bad_size.nii", |b| b[0..4].copy_from_slice(&100i32.to_le_bytes()));
    let (err, msg) = read_err(&path);
    assert!(
        matches!(err, NiftiError::BadHeaderSize { value: 100, .. }),
        "{msg}"
    );
}

#[test]
fn short_file_is_reported() {
    let (_d, path) = patched("short.nii", |b| b.truncate(200));
    let (err, msg) = read_err(&path);
    assert!(matches!(err, NiftiError::TooShort { len: 200, .. }), "{msg}");
}

#[test]
fn real_4d_is_rejected() {
    let (_d, path) = patched("4d.nii", |b| {
        b[40..42].copy_from_slice(&4i16.to_le_bytes());
        b[48..50].copy_from_slice(&3i16.to_le_bytes());
    });
    let (err, msg) = read_err(&path);
    assert!(matches!(err, NiftiError::BadDims { .. }), "{msg}");
}

#[test]
fn nifti2_is_rejected() {
    let (_d, path) = patched("n2.nii", |b| b[0..4].copy_from_slice(&540i32.to_le_bytes()));
    let (err, msg) = read_err(&path);
    assert!(matches!(err, NiftiError::Nifti2 { .. }), "{msg}");
}
