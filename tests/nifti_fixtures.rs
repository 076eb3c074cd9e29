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
fn real_4d_is_rejected_by_read_but_read_as_channels() {
    let (_d, path) = patched("4d.nii", |b| {
        b[40..42].copy_from_slice(&4i16.to_le_bytes());
        b[48..50].copy_from_slice(&3i16.to_le_bytes());
        b.truncate(352 + 4 * 5 * 6 * 4 * 3);
    });
    let (err, msg) = read_err(&path);
    assert!(matches!(err, NiftiError::BadDims { .. }), "{msg}");
    assert!(msg.contains("a 4D image of 3 volumes (4x5x6x3)"), "{msg}");
    let labels = nifti::read_integer_labels(&path).unwrap_err().to_string();
    assert!(labels.contains("4D image of 3 volumes"), "{labels}");
    // The fixture has only one volume of data: read_channels says so.
    let err = nifti::read_channels(&path).unwrap_err().to_string();
    assert!(
        err.contains("4x5x6x3 float32 (1440 bytes) but only 480 bytes"),
        "{err}"
    );
}

#[test]
fn five_dimensional_images_are_rejected() {
    let (_d, path) = patched("5d.nii", |b| {
        b[40..42].copy_from_slice(&5i16.to_le_bytes());
        b[48..50].copy_from_slice(&1i16.to_le_bytes());
        b[50..52].copy_from_slice(&2i16.to_le_bytes());
    });
    let err = nifti::read_channels(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NiftiError::BadDims { .. }), "{msg}");
    assert!(msg.contains("5d.nii") && msg.contains("dim[5] = 2"), "{msg}");
}

#[test]
fn nifti2_with_a_bad_magic_is_reported() {
    let (_d, path) = patched("n2.nii", |b| b[0..4].copy_from_slice(&540i32.to_le_bytes()));
    let (err, msg) = read_err(&path);
    assert!(matches!(err, NiftiError::BadMagic { version: 2, .. }), "{msg}");
    assert!(msg.contains("not a single-file NIfTI-2 image"), "{msg}");
}

// --- NIfTI-2 and 4D images (expected_channels.json) ---------------------------------------------

#[derive(Deserialize)]
struct ChannelSample {
    xyzt: [usize; 4],
    value: f64,
}

#[derive(Deserialize)]
struct ExpectedChannels {
    nifti2: bool,
    shape_zyx: [usize; 3],
    channels: usize,
    datatype: i16,
    nibabel_affine: [[f64; 4]; 4],
    itk_spacing: [f64; 3],
    itk_origin: [f64; 3],
    itk_direction: [[f64; 3]; 3],
    channel_sums: Vec<f64>,
    samples: Vec<ChannelSample>,
}

fn expected_channels() -> std::collections::BTreeMap<String, ExpectedChannels> {
    let text = std::fs::read_to_string(fixture("expected_channels.json")).expect("expected_channels.json");
    serde_json::from_str(&text).expect("parse expected_channels.json")
}

fn check_channels(name: &str) {
    let exp = &expected_channels()[name];
    let (channels, h) = nifti::read_channels(fixture(name)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(channels.len(), exp.channels, "{name}: channels");
    assert_eq!(h.nifti2.is_some(), exp.nifti2, "{name}: NIfTI-2");
    assert_eq!(h.datatype, exp.datatype, "{name}: datatype");
    assert_eq!(h.shape_zyx(), exp.shape_zyx, "{name}: shape");
    if exp.channels > 1 {
        assert_eq!((h.dim[0], h.dim[4]), (3, 1), "{name}: a channel's header is 3D");
    }
    let aff = h.affine();
    for (r, (row, expected_row)) in aff.iter().zip(&exp.nibabel_affine).enumerate() {
        for (c, (&a, &b)) in row.iter().zip(expected_row).enumerate() {
            // NIfTI-2 keeps f64 geometry: nibabel's affine to rounding of the last bits.
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "{name}: affine[{r}][{c}] {a} vs {b}"
            );
        }
    }
    for i in 0..3 {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        assert!(
            close(h.itk_spacing()[i], exp.itk_spacing[i]),
            "{name}: spacing {:?}",
            h.itk_spacing()
        );
        assert!(
            close(h.itk_origin()[i], exp.itk_origin[i]),
            "{name}: origin {:?}",
            h.itk_origin()
        );
        for j in 0..3 {
            assert!(
                close(h.itk_direction()[i][j], exp.itk_direction[i][j]),
                "{name}: direction"
            );
        }
    }
    for (t, (channel, sum)) in channels.iter().zip(&exp.channel_sums).enumerate() {
        assert_eq!(channel.shape(), exp.shape_zyx, "{name}: channel {t} shape");
        let got: f64 = channel.iter().map(|&v| f64::from(v)).sum();
        assert!(close(got, *sum, 1e-6), "{name}: channel {t} sum {got} vs {sum}");
    }
    for s in &exp.samples {
        let [x, y, z, t] = s.xyzt;
        let got = f64::from(channels[t][[z, y, x]]);
        assert!(
            close(got, s.value, 1e-6),
            "{name}: [x,y,z,t]={:?}: {got} vs {}",
            s.xyzt,
            s.value
        );
    }
    if exp.channels == 1 {
        let vol = nifti::read(fixture(name)).unwrap();
        assert_eq!(vol.data, channels[0], "{name}: read == read_channels");
        assert_eq!(vol.header, h, "{name}: read's header");
        assert_eq!(
            nifti::read_header(fixture(name)).unwrap(),
            h,
            "{name}: read_header"
        );
    } else {
        let (err, msg) = read_err(&fixture(name));
        assert!(matches!(err, NiftiError::BadDims { .. }), "{msg}");
        assert!(
            msg.contains(&format!("4D image of {} volumes", exp.channels)),
            "{msg}"
        );
    }
}

#[test]
fn nifti2_oblique_float32() {
    check_channels("nifti2_oblique_float32.nii.gz");
}

#[test]
fn nifti2_big_endian_qform_only() {
    check_channels("nifti2_bigendian_qform_int16.nii");
}

#[test]
fn image_4d_volumes_are_channels() {
    check_channels("image4d_t3_int16.nii.gz");
}

#[test]
fn nifti2_4d_volumes_are_channels() {
    check_channels("nifti2_4d_t2_float32.nii.gz");
}

#[test]
fn every_channel_fixture_is_tested() {
    let tested = [
        "nifti2_oblique_float32.nii.gz",
        "nifti2_bigendian_qform_int16.nii",
        "image4d_t3_int16.nii.gz",
        "nifti2_4d_t2_float32.nii.gz",
    ];
    for name in expected_channels().keys() {
        assert!(tested.contains(&name.as_str()), "no test for fixture {name}");
    }
}

#[test]
fn nifti2_keeps_f64_geometry() {
    let h = nifti::read_header(fixture("nifti2_oblique_float32.nii.gz")).unwrap();
    let precise = h.nifti2.as_ref().expect("NIfTI-2");
    assert_eq!(precise.pixdim[1], 0.7, "f64 spacing, not 0.7f32");
    assert_eq!(h.itk_spacing()[0], 0.7);
    assert_eq!(h.pixdim[1], 0.7f32);
    // JSON (a preprocessed case's properties) keeps the f64 values.
    let back: Header = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
    assert_eq!(back, h);
}

/// A prediction for a NIfTI-2 image is NIfTI-2, with bit-for-bit the same f64 geometry.
#[test]
fn nifti2_roundtrip_writes_nifti2() {
    for name in [
        "nifti2_oblique_float32.nii.gz",
        "nifti2_bigendian_qform_int16.nii",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = nifti::read(fixture(name)).unwrap();
        for out in ["seg.nii.gz", "seg.nii"] {
            let out = dir.path().join(out);
            nifti::write(&out, &src.data.mapv(|v| v as i16), &src.header).unwrap();
            let back = nifti::read(&out).unwrap();
            assert_same_geometry(&src.header, &back.header, name);
            assert_eq!(back.data, src.data.mapv(|v| f32::from(v as i16)), "{name}");
        }
        let raw = std::fs::read(dir.path().join("seg.nii")).unwrap();
        assert_eq!(
            &raw[0..12],
            b"\x1c\x02\0\0n+2\0\r\n\x1a\n",
            "{name}: NIfTI-2 header"
        );
        assert_eq!(raw.len(), 544 + 4 * 5 * 6 * 2);
    }
}

/// nnflow's NIfTI-2 output, byte for byte as committed; generate.py checks that nibabel reads
/// the committed file exactly as its source (SimpleITK 2.5.7 reads no NIfTI-2). Re-create it with
/// `NNFLOW_BLESS=1 cargo test --test nifti_fixtures nifti2_write` after a deliberate change.
#[test]
fn nifti2_write_matches_committed_bytes() {
    let src = nifti::read(fixture("nifti2_oblique_float32.nii.gz")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("written.nii");
    nifti::write(&out, &src.data, &src.header).unwrap();
    let written = std::fs::read(&out).unwrap();
    let committed = fixture("nnflow_written_nifti2.nii");
    if std::env::var_os("NNFLOW_BLESS").is_some() {
        std::fs::write(&committed, &written).unwrap();
    }
    let expected = std::fs::read(&committed).expect("nnflow_written_nifti2.nii (NNFLOW_BLESS=1 creates it)");
    assert!(
        written == expected,
        "nnflow's NIfTI-2 bytes changed (NNFLOW_BLESS=1 to accept)"
    );
}

#[test]
fn split_volumes_keeps_datatype_scaling_and_geometry() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "image4d_t3_int16.nii.gz",
        "nifti2_4d_t2_float32.nii.gz",
        "scaled_int16.nii.gz",
        "bigendian_int16.nii",
    ] {
        let (channels, header) = nifti::read_channels(fixture(name)).unwrap();
        let target = |i: usize| {
            dir.path()
                .join(format!("{}_{i:04}.nii.gz", name.split('.').next().unwrap()))
        };
        let n = nifti::split_volumes(fixture(name), target).unwrap();
        assert_eq!(n, channels.len(), "{name}");
        for (i, channel) in channels.iter().enumerate() {
            let vol = nifti::read(target(i)).unwrap();
            assert_eq!(&vol.data, channel, "{name}: channel {i}");
            assert_eq!(vol.header, header, "{name}: channel {i} header");
        }
    }
    let h = nifti::read_header(dir.path().join("scaled_int16_0000.nii.gz")).unwrap();
    assert_eq!(h.datatype, 4, "stored type kept");
}

#[test]
fn four_d_channel_header_writes_a_3d_file() {
    let dir = tempfile::tempdir().unwrap();
    let (channels, header) = nifti::read_channels(fixture("image4d_t3_int16.nii.gz")).unwrap();
    let out = dir.path().join("pred.nii.gz");
    nifti::write(&out, &channels[2].mapv(|v| v as i16), &header).unwrap();
    let back = nifti::read(&out).unwrap();
    assert_eq!(back.data, channels[2]);
    assert_eq!(back.header.dim[0], 3);
}
