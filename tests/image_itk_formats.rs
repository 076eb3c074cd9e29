//! NRRD (`.nrrd`, `.nhdr`) and MetaImage (`.mha`, `.mhd`) against SimpleITK 2.5.7.
//!
//! Fixtures: `tests/fixtures/image_formats/itk/`, made by `generate.py` there (see its docstring):
//! `read/` holds files SimpleITK wrote and hand-written headers of the kinds other tools write,
//! `expected.json` what SimpleITK reads from each (size, spacing, origin, direction, voxels as
//! float32). `written_by_nnflow/` holds the label maps nnflow writes (compared byte for byte here);
//! `generate.py --check-written` reads them with SimpleITK and checks they hold what this test
//! meant to write. After a deliberate change to the writers, regenerate them with
//!
//! ```text
//! NNFLOW_BLESS=1 cargo test --test image_itk_formats
//! /root/.cache/nnflow/nnunet-venv/bin/python tests/fixtures/image_formats/itk/generate.py --check-written
//! ```

use std::path::{Path, PathBuf};

use ndarray::Array3;
use nnflow::data::image::{read, read_labels, write_labels, Geometry, ImageError};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_formats/itk")
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) || (a - b).abs() <= 1e-12
}

/// Compares nnflow's geometry with SimpleITK's (`size`, `spacing`, `origin`, `direction` as
/// SimpleITK lists them: x first, direction row-major).
fn check_geometry(
    name: &str,
    geometry: &Geometry,
    ndim: usize,
    size: &[f64],
    spacing: &[f64],
    origin: &[f64],
    direction: &[f64],
) {
    assert_eq!(usize::from(geometry.ndim), ndim, "{name}: ndim");
    let shape = if ndim == 2 {
        [1, size[1] as usize, size[0] as usize]
    } else {
        [size[2] as usize, size[1] as usize, size[0] as usize]
    };
    assert_eq!(geometry.shape_zyx, shape, "{name}: shape");
    for i in 0..ndim {
        assert!(
            close(geometry.itk_spacing[i], spacing[i]),
            "{name}: spacing {:?} vs {spacing:?}",
            geometry.itk_spacing
        );
        assert!(
            close(geometry.itk_origin[i], origin[i]),
            "{name}: origin {:?} vs {origin:?}",
            geometry.itk_origin
        );
        for j in 0..ndim {
            let (ours, theirs) = (geometry.itk_direction[i][j], direction[i * ndim + j]);
            assert!(
                close(ours, theirs),
                "{name}: direction {:?} vs {direction:?}",
                geometry.itk_direction
            );
        }
    }
    let [sx, sy, sz] = geometry.itk_spacing;
    let expected_zyx = if ndim == 2 {
        [999.0 * sx.max(sy), sy, sx]
    } else {
        [sz, sy, sx]
    };
    assert_eq!(geometry.spacing_zyx, expected_zyx, "{name}: nnU-Net spacing");
}

#[test]
fn reads_like_simpleitk() {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    let images = expected["images"].as_array().unwrap();
    assert!(images.len() >= 20);
    for image in images {
        let name = image["file"].as_str().unwrap();
        let decoded = read(fixtures().join("read").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ndim = image["ndim"].as_u64().unwrap() as usize;
        check_geometry(
            name,
            &decoded.geometry,
            ndim,
            &floats(&image["size"]),
            &floats(&image["spacing"]),
            &floats(&image["origin"]),
            &floats(&image["direction"]),
        );
        let channels = image["channels"].as_u64().unwrap() as usize;
        assert_eq!(decoded.channels.len(), channels, "{name}: channels");
        let ours: Vec<f32> = decoded.channels.iter().flat_map(|c| c.iter().copied()).collect();
        let theirs: Vec<f32> = floats(&image["values"]).into_iter().map(|v| v as f32).collect();
        assert_eq!(ours.len(), theirs.len(), "{name}: voxel count");
        if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
            panic!(
                "{name}: voxel {i} is {} here, {} in SimpleITK",
                ours[i], theirs[i]
            );
        }
    }
}

#[test]
fn reads_integer_fixtures_as_labels() {
    let (labels, geometry) = read_labels(fixtures().join("read/i16_raw.nrrd")).unwrap();
    assert_eq!(geometry.shape_zyx, [5, 6, 7]);
    assert_eq!(labels[[0, 0, 1]], 7919 % 251 * 13 - 1200);
    let error = read_labels(fixtures().join("read/u8_vector3.nrrd")).unwrap_err();
    assert!(
        matches!(error, ImageError::LabelChannels { channels: 3, .. }),
        "{error}"
    );
}

/// What the written files hold: (x + 2y + 3z) % 5, times 100 for the large ones (> 255: int16).
/// Keep in step with `WRITTEN` in generate.py.
fn written_labels(shape: [usize; 3], large: bool) -> Array3<i16> {
    Array3::from_shape_fn((shape[0], shape[1], shape[2]), |(z, y, x)| {
        let label = ((x + 2 * y + 3 * z) % 5) as i16;
        if large {
            label * 100
        } else {
            label
        }
    })
}

fn geometry_3d() -> Geometry {
    let direction = [[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]];
    Geometry::from_itk(3, [5, 6, 7], [0.7, 0.8, 2.5], [10.5, -20.25, 30.0], direction)
}

fn geometry_2d() -> Geometry {
    let direction = [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]];
    Geometry::from_itk(2, [1, 6, 7], [0.5, 0.9, 1.0], [3.0, -4.5, 0.0], direction)
}

/// (file, data file of a detached pair, large labels, 2D)
const WRITTEN: [(&str, Option<&str>, bool, bool); 8] = [
    ("u8_3d.nrrd", None, false, false),
    ("u8_3d.nhdr", Some("u8_3d.raw.gz"), false, false),
    ("u8_3d.mha", None, false, false),
    ("u8_3d.mhd", Some("u8_3d.zraw"), false, false),
    ("i16_3d.nrrd", None, true, false),
    ("i16_3d.mha", None, true, false),
    ("u8_2d.nrrd", None, false, true),
    ("u8_2d.mha", None, false, true),
];

#[test]
fn writes_what_simpleitk_reads_back() {
    let committed = fixtures().join("written_by_nnflow");
    let bless = std::env::var_os("NNFLOW_BLESS").is_some_and(|v| v == "1");
    let temp = tempfile::tempdir().unwrap();
    let out = if bless {
        std::fs::create_dir_all(&committed).unwrap();
        committed.clone()
    } else {
        temp.path().to_path_buf()
    };
    for (name, data_file, large, flat) in WRITTEN {
        let geometry = if flat { geometry_2d() } else { geometry_3d() };
        let labels = written_labels(geometry.shape_zyx, large);
        let path = out.join(name);
        write_labels(&path, &labels, &geometry).unwrap_or_else(|e| panic!("{name}: {e}"));
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");

        for file in std::iter::once(name).chain(data_file) {
            let ours = std::fs::read(out.join(file)).unwrap();
            let theirs = std::fs::read(committed.join(file))
                .unwrap_or_else(|e| panic!("{file}: {e} (run with NNFLOW_BLESS=1 to write it)"));
            assert!(
                ours == theirs,
                "{file} differs from the committed one (NNFLOW_BLESS=1 regenerates it)"
            );
        }
        // nnflow reads back what it wrote.
        let (back, back_geometry) = read_labels(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back, labels.mapv(i32::from), "{name}");
        let n = usize::from(geometry.ndim);
        let direction: Vec<f64> = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| geometry.itk_direction[i][j])
            .collect();
        let size: Vec<f64> = [7.0, 6.0, 5.0][..n].to_vec();
        check_geometry(
            name,
            &back_geometry,
            n,
            &size,
            &geometry.itk_spacing,
            &geometry.itk_origin,
            &direction,
        );
    }
}

#[test]
fn header_text_of_written_files() {
    let dir = tempfile::tempdir().unwrap();
    let labels = written_labels([5, 6, 7], true);
    write_labels(dir.path().join("a.nrrd"), &labels, &geometry_3d()).unwrap();
    let text = std::fs::read(dir.path().join("a.nrrd")).unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("type: short\n"), "{text}");
    assert!(text.contains("space: left-posterior-superior\n"), "{text}");
    assert!(text.contains("sizes: 7 6 5\n"), "{text}");
    assert!(text.contains("encoding: gzip\n"), "{text}");
    assert!(text.contains("space origin: (10.5,-20.25,30)\n"), "{text}");
    write_labels(
        dir.path().join("a.mha"),
        &labels.mapv(|v| v / 100),
        &geometry_2d().with_shape([1, 6, 7]),
    )
    .unwrap_err();
    write_labels(
        dir.path().join("b.mha"),
        &written_labels([1, 6, 7], false),
        &geometry_2d(),
    )
    .unwrap();
    let text = std::fs::read(dir.path().join("b.mha")).unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("NDims = 2\n") && text.contains("TransformMatrix = 0 -1 1 0\n"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors: every one names the file and says what is wrong.

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn error_of(path: &Path) -> String {
    let message = read(path).map(|_| ()).unwrap_err().to_string();
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(message.contains(&file), "message does not name {file}: {message}");
    message
}

const NRRD_HEAD: &str = "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 3 2\n\
                         space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\n";

#[test]
fn nrrd_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = vec![0u8; 48];

    let path = write(
        d,
        "short.nrrd",
        &[format!("{NRRD_HEAD}encoding: raw\n\n").as_bytes(), &data[..40]].concat(),
    );
    let message = error_of(&path);
    assert!(
        message.contains("truncated") && message.contains("48"),
        "{message}"
    );

    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data[..30]).unwrap();
        e.finish().unwrap()
    };
    let path = write(
        d,
        "short_gz.nrrd",
        &[format!("{NRRD_HEAD}encoding: gzip\n\n").as_bytes(), &gz].concat(),
    );
    assert!(error_of(&path).contains("truncated"));
    let path = write(
        d,
        "cut_gz.nrrd",
        &[format!("{NRRD_HEAD}encoding: gzip\n\n").as_bytes(), &gz[..12]].concat(),
    );
    let message = error_of(&path);
    assert!(
        message.contains("truncated") || message.contains("corrupt"),
        "{message}"
    );

    let path = write(
        d,
        "bzip.nrrd",
        format!("{NRRD_HEAD}encoding: bzip2\n\n").as_bytes(),
    );
    assert!(error_of(&path).contains("NRRD encoding `bzip2` is not supported"));

    let head = NRRD_HEAD.replace("type: short", "type: complex");
    let path = write(d, "complex.nrrd", format!("{head}encoding: raw\n\n").as_bytes());
    assert!(error_of(&path).contains("NRRD type `complex` is not supported"));

    let head = NRRD_HEAD.replace("endian: little\n", "");
    let path = write(
        d,
        "no_endian.nrrd",
        &[format!("{head}encoding: raw\n\n").as_bytes(), &data].concat(),
    );
    assert!(error_of(&path).contains("endian"));

    let path = write(
        d,
        "detached.nhdr",
        format!("{NRRD_HEAD}encoding: raw\ndata file: missing.raw\n").as_bytes(),
    );
    let message = error_of(&path);
    assert!(message.contains("missing.raw"), "{message}");

    let path = write(
        d,
        "list.nhdr",
        format!("{NRRD_HEAD}encoding: raw\ndata file: LIST\na.raw\n").as_bytes(),
    );
    assert!(error_of(&path).contains("LIST"));

    let four = "NRRD0004\ntype: uchar\ndimension: 4\nsizes: 4 3 2 2\nencoding: raw\n\n";
    let path = write(d, "four.nrrd", &[four.as_bytes(), &data].concat());
    assert!(error_of(&path).contains("4D"));

    let path = write(d, "not.nrrd", b"P5 not a nrrd");
    assert!(error_of(&path).contains("not a NRRD file"));

    let path = write(
        d,
        "no_sizes.nrrd",
        b"NRRD0004\ntype: uchar\ndimension: 3\nencoding: raw\n\n",
    );
    assert!(error_of(&path).contains("sizes"));

    let head = NRRD_HEAD.replace("(0,0,1)", "(0,0)");
    let path = write(
        d,
        "bad_vector.nrrd",
        &[format!("{head}encoding: raw\n\n").as_bytes(), &data].concat(),
    );
    assert!(error_of(&path).contains("space directions"));

    let head = NRRD_HEAD.replace("left-posterior-superior", "left-posterior-superior-time");
    let path = write(
        d,
        "time.nrrd",
        &[format!("{head}encoding: raw\n\n").as_bytes(), &data].concat(),
    );
    assert!(error_of(&path).contains("space has dimension 4"));
}

const MHA_HEAD: &str = "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_SHORT\n";

#[test]
fn metaimage_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = vec![0u8; 48];

    let path = write(
        d,
        "short.mha",
        &[
            format!("{MHA_HEAD}ElementDataFile = LOCAL\n").as_bytes(),
            &data[..47],
        ]
        .concat(),
    );
    assert!(error_of(&path).contains("truncated"));

    let z = {
        use std::io::Write;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data[..20]).unwrap();
        e.finish().unwrap()
    };
    let head = format!("{MHA_HEAD}CompressedData = True\nElementDataFile = LOCAL\n");
    let path = write(d, "short_z.mha", &[head.as_bytes(), &z].concat());
    assert!(error_of(&path).contains("truncated"));
    let head =
        format!("{MHA_HEAD}CompressedData = True\nCompressedDataSize = 999\nElementDataFile = LOCAL\n");
    let path = write(d, "size_z.mha", &[head.as_bytes(), &z].concat());
    assert!(error_of(&path).contains("CompressedDataSize"));

    let head = MHA_HEAD.replace("MET_SHORT", "MET_FLOAT_MATRIX");
    let path = write(
        d,
        "matrix.mha",
        format!("{head}ElementDataFile = LOCAL\n").as_bytes(),
    );
    assert!(error_of(&path).contains("ElementType `MET_FLOAT_MATRIX` is not supported"));

    let path = write(
        d,
        "missing.mhd",
        format!("{MHA_HEAD}ElementDataFile = gone.raw\n").as_bytes(),
    );
    assert!(error_of(&path).contains("gone.raw"));

    let path = write(
        d,
        "list.mhd",
        format!("{MHA_HEAD}ElementDataFile = LIST\na.raw\n").as_bytes(),
    );
    assert!(error_of(&path).contains("LIST"));

    let head = MHA_HEAD
        .replace("NDims = 3", "NDims = 4")
        .replace("4 3 2", "4 3 2 2");
    let path = write(
        d,
        "four.mha",
        &[format!("{head}ElementDataFile = LOCAL\n").as_bytes(), &data].concat(),
    );
    assert!(error_of(&path).contains("4D"));

    let head = MHA_HEAD.replace("4 3 2", "4 3");
    let path = write(
        d,
        "dims.mha",
        format!("{head}ElementDataFile = LOCAL\n").as_bytes(),
    );
    assert!(error_of(&path).contains("DimSize"));

    let path = write(d, "empty.mha", b"");
    assert!(error_of(&path).contains("NDims"));
}

/// MetaIO inflates to the end of the file without `CompressedDataSize` (SimpleITK 2.5.7 prints
/// "Uncompress failed" and returns garbage there: nnflow reads what the file holds).
#[test]
fn metaimage_compressed_without_size() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<u16> = (0..24u16).map(|v| v * 1000 + 7).collect();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for gzip in [false, true] {
        use std::io::Write;
        let stored = if gzip {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&raw).unwrap();
            e.finish().unwrap()
        } else {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&raw).unwrap();
            e.finish().unwrap()
        };
        let head =
            MHA_HEAD.replace("MET_SHORT", "MET_USHORT") + "CompressedData = True\nElementDataFile = LOCAL\n";
        let path = write(dir.path(), "nosize.mha", &[head.as_bytes(), &stored].concat());
        let decoded = read(&path).unwrap();
        let ours: Vec<f32> = decoded.channels[0].iter().copied().collect();
        assert_eq!(ours, values.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
    }
}
