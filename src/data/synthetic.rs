//! Synthetic datasets in nnU-Net's raw layout, for the demo, tests and benchmarks: a bright
//! ellipsoidal "body" in a zero background (so cropping to the nonzero region matters), with
//! spheres of each foreground label at random places inside it, plus Gaussian-ish noise. Written
//! in any format nnflow writes (NIfTI by default; 2D pictures when the shape has one slice).

use std::path::Path;

use ndarray::Array3;

use super::geometry::Header;
use super::image::{self, Geometry, ImageError, ImageFormat};

#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub cases: usize,
    pub shape_zyx: [usize; 3],
    pub spacing_zyx: [f64; 3],
    pub channels: usize,
    /// Foreground classes (labels 1..=n).
    pub foreground_labels: usize,
    pub seed: u64,
    /// Each case's spacing is scaled per axis by a random factor in [1 - v, 1 + v], as scanners
    /// differ (so resampling to the median spacing has work to do).
    pub spacing_variation: f64,
    /// Extra cases written to imagesTs / labelsTs (for prediction and its evaluation).
    pub test_cases: usize,
    /// The format, as dataset.json's `file_ending` (`.nii.gz`, `.nrrd`, `.mha`, `.png`, `.tiff`, ...).
    /// Pictures (`.png`, `.bmp`, `.tif`) need a shape of one slice.
    pub file_ending: String,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            cases: 8,
            shape_zyx: [24, 32, 32],
            spacing_zyx: [2.0, 1.0, 1.0],
            channels: 1,
            foreground_labels: 2,
            seed: 1,
            spacing_variation: 0.0,
            test_cases: 0,
            file_ending: ".nii.gz".to_string(),
        }
    }
}

/// Small deterministic generator (xorshift64*), so datasets are identical on every machine.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately normal (sum of uniforms), mean 0, sd 1.
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

/// Writes `root/{dataset.json, imagesTr, labelsTr}` (and `imagesTs`, `labelsTs` with test cases).
pub fn write_dataset(root: &Path, spec: &SyntheticSpec) -> Result<(), ImageError> {
    let io = |source: std::io::Error| ImageError::Write {
        path: root.to_path_buf(),
        source,
    };
    let ending = spec.file_ending.as_str();
    let picture = matches!(
        ImageFormat::from_ending(ending),
        Some(ImageFormat::Natural2d | ImageFormat::Tif)
    );
    if picture && spec.shape_zyx[0] != 1 {
        return Err(ImageError::invalid(
            root,
            format!("{ending} pictures are 2D: give a shape of one slice"),
        ));
    }
    let mut random = Random(spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let training = (0..spec.cases).map(|c| (format!("case_{c:03}"), "Tr"));
    let test = (0..spec.test_cases).map(|c| (format!("test_{c:03}"), "Ts"));
    for (id, part) in training.chain(test) {
        std::fs::create_dir_all(root.join(format!("images{part}"))).map_err(io)?;
        std::fs::create_dir_all(root.join(format!("labels{part}"))).map_err(io)?;
        let spacing = spec
            .spacing_zyx
            .map(|s| s * (1.0 + spec.spacing_variation * (2.0 * random.unit() - 1.0)));
        let geometry = if picture {
            Geometry::picture(spec.shape_zyx[1], spec.shape_zyx[2])
        } else {
            Geometry::from_nifti(Header::axis_aligned(spec.shape_zyx, spacing, [0.0, 0.0, 0.0]))
        };
        if ImageFormat::from_ending(ending) == Some(ImageFormat::Tiff3d) {
            // 3D TIFF keeps its spacing in `<case>.json`, for the images and the label alike
            for kind in ["images", "labels"] {
                let json = serde_json::json!({ "spacing": spacing });
                std::fs::write(root.join(format!("{kind}{part}/{id}.json")), json.to_string()).map_err(io)?;
            }
        }
        let label = case_label(
            &SyntheticSpec {
                spacing_zyx: spacing,
                ..spec.clone()
            },
            &mut random,
        );
        for channel in 0..spec.channels {
            let mut image = case_image(&label, channel, &mut random);
            if ending.eq_ignore_ascii_case(".bmp") {
                // BMP holds 8-bit grey: halve the intensities (the brightest object is ~ 400)
                image.mapv_inplace(|v| (v / 2).min(254));
            }
            let path = root.join(format!("images{part}/{id}_{channel:04}{ending}"));
            image::write_labels(&path, &image, &geometry)?;
        }
        let path = root.join(format!("labels{part}/{id}{ending}"));
        image::write_labels(&path, &label.mapv(|v| v.max(0) as i16), &geometry)?;
    }
    let channel_names: serde_json::Map<String, serde_json::Value> = (0..spec.channels)
        .map(|c| (c.to_string(), (if c == 0 { "CT" } else { "MR" }).into()))
        .collect();
    let mut labels = serde_json::Map::new();
    labels.insert("background".into(), 0.into());
    for label in 1..=spec.foreground_labels {
        labels.insert(format!("object_{label}"), label.into());
    }
    let json = serde_json::json!({
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": spec.cases,
        "file_ending": ending,
        "name": "synthetic",
    });
    let text = serde_json::to_vec_pretty(&json).expect("dataset.json serializes");
    std::fs::write(root.join("dataset.json"), text).map_err(io)
}

/// Label map: -1 outside the body (turned into 0 when written), 0 body, spheres of each label.
fn case_label(spec: &SyntheticSpec, random: &mut Random) -> Array3<i32> {
    let [nz, ny, nx] = spec.shape_zyx;
    let [sz, sy, sx] = spec.spacing_zyx;
    // One slice is a 2D image: a disc body, discs of each label, all in the slice's plane.
    let flat = nz == 1;
    let centre = [
        if flat { 0.0 } else { nz as f64 / 2.0 },
        ny as f64 / 2.0,
        nx as f64 / 2.0,
    ];
    let mut label = Array3::from_shape_fn((nz, ny, nx), |(z, y, x)| {
        let d = [
            (z as f64 - centre[0]) / (0.42 * nz as f64),
            (y as f64 - centre[1]) / (0.42 * ny as f64),
            (x as f64 - centre[2]) / (0.42 * nx as f64),
        ];
        if d.iter().map(|v| v * v).sum::<f64>() <= 1.0 {
            0
        } else {
            -1
        }
    });
    let extent_mm = [nz as f64 * sz, ny as f64 * sy, nx as f64 * sx];
    let in_plane = if flat { &extent_mm[1..] } else { &extent_mm[..] };
    let smallest = in_plane.iter().copied().fold(f64::INFINITY, f64::min);
    let labels = spec.foreground_labels as f64;
    for value in 1..=spec.foreground_labels as i32 {
        let radius_mm = smallest * (0.15 + 0.08 * random.unit());
        // Each label in its own slab along x, so spheres never hide each other.
        let slab = (value as f64 - 0.5) / labels - 0.5;
        let jitter =
            |random: &mut Random, axis: usize| (random.unit() - 0.5) * 0.2 * spec.shape_zyx[axis] as f64;
        let point = [
            if flat { 0.0 } else { centre[0] + jitter(random, 0) },
            centre[1] + jitter(random, 1),
            centre[2] + slab * 0.5 * nx as f64,
        ];
        for ((z, y, x), v) in label.indexed_iter_mut() {
            let d2 = (z as f64 - point[0]).powi(2) * sz * sz
                + (y as f64 - point[1]).powi(2) * sy * sy
                + (x as f64 - point[2]).powi(2) * sx * sx;
            if d2 <= radius_mm * radius_mm && *v == 0 {
                *v = value;
            }
        }
    }
    label
}

/// CT-like intensities: 0 outside the body, tissue ~ 40, objects brighter per label, noise.
fn case_image(label: &Array3<i32>, channel: usize, random: &mut Random) -> Array3<i16> {
    label.mapv(|v| {
        if v < 0 {
            return 0;
        }
        let base = 40.0 + 120.0 * v as f64 * (1.0 + 0.5 * channel as f64);
        (base + 15.0 * random.normal())
            .round()
            .clamp(1.0, i16::MAX as f64) as i16
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::Dataset;
    use crate::data::integrity::check_dataset;

    #[test]
    fn generated_dataset_passes_the_integrity_check_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec {
            cases: 3,
            shape_zyx: [8, 12, 10],
            ..SyntheticSpec::default()
        };
        write_dataset(&dir.path().join("a"), &spec).unwrap();
        write_dataset(&dir.path().join("b"), &spec).unwrap();
        let dataset = Dataset::open(&dir.path().join("a")).unwrap();
        assert_eq!(dataset.cases.len(), 3);
        let report = check_dataset(&dataset);
        assert!(report.is_ok(), "{}", report.render());
        let a = std::fs::read(dir.path().join("a/labelsTr/case_001.nii.gz")).unwrap();
        let b = std::fs::read(dir.path().join("b/labelsTr/case_001.nii.gz")).unwrap();
        assert_eq!(a, b);
        let (label, _) = image::read_labels(dir.path().join("a/labelsTr/case_000.nii.gz")).unwrap();
        for value in [1, 2] {
            assert!(label.iter().any(|&v| v == value), "label {value} present");
        }
    }
}
