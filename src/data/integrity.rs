//! nnU-Net's dataset integrity check: every case has all its channel files and a label file, image
//! and label agree in shape and spacing, labels hold only the values dataset.json declares, images
//! hold no NaN (nnU-Net's check) and no +Inf or -Inf (nnflow's: an infinite intensity makes the
//! fingerprint's statistics infinite or NaN, which JSON cannot hold). Every problem of every case
//! is collected into one report; origin or direction differences only warn, as in nnU-Net.

use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::Array3;
use rayon::prelude::*;

use super::dataset::{Case, Dataset};
use super::image::{self, Geometry};

/// Spacing differences below this (relative) are rounding, not a mismatch (nnU-Net uses allclose).
const SPACING_TOLERANCE: f64 = 1e-4;

/// One channel of a case, read.
pub struct Channel {
    pub data: Array3<f32>,
    /// The geometry of the file it came from.
    pub geometry: Geometry,
    /// That file (a file may hold several channels: RGB pictures, 4D NIfTI).
    pub path: PathBuf,
}

/// One case, read: its channels and its label map.
pub struct LoadedCase {
    pub id: String,
    pub channels: Vec<Channel>,
    pub label: Array3<i32>,
    pub label_geometry: Geometry,
}

#[derive(Default, Debug)]
pub struct Report {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn render(&self) -> String {
        let mut lines: Vec<String> = self.problems.iter().map(|p| format!("error: {p}")).collect();
        lines.extend(self.warnings.iter().map(|w| format!("warning: {w}")));
        if !self.problems.is_empty() {
            lines.push(format!("{} problem(s) in the dataset", self.problems.len()));
        }
        lines.join("\n")
    }
}

/// A case file that cannot be read: one problem of the integrity report.
#[derive(Debug, thiserror::Error)]
#[error("case {case}: {source}")]
pub struct UnreadableFile {
    pub case: String,
    /// Names the file.
    #[source]
    pub source: image::ImageError,
}

/// Reads a case's files; a file that cannot be read is a problem naming the case and the file.
pub fn load_case(case: &Case) -> Result<LoadedCase, Vec<UnreadableFile>> {
    let unreadable = |source| UnreadableFile {
        case: case.id.clone(),
        source,
    };
    let mut problems = Vec::new();
    let mut channels = Vec::new();
    for path in &case.images {
        match image::read(path) {
            Ok(decoded) => channels.extend(decoded.channels.into_iter().map(|data| Channel {
                data,
                geometry: decoded.geometry.clone(),
                path: path.clone(),
            })),
            Err(e) => problems.push(unreadable(e)),
        }
    }
    let label = match image::read_labels(&case.label) {
        Ok(label) => Some(label),
        Err(e) => {
            problems.push(unreadable(e));
            None
        }
    };
    match label {
        Some((label, label_geometry)) if problems.is_empty() => Ok(LoadedCase {
            id: case.id.clone(),
            channels,
            label,
            label_geometry,
        }),
        _ => Err(problems),
    }
}

/// Checks one loaded case against the dataset's declarations (its channel count and labels).
pub fn check_case(case: &LoadedCase, channel_count: usize, allowed_labels: &[i64]) -> Report {
    let mut report = Report::default();
    if case.channels.len() != channel_count {
        let files: Vec<String> = case
            .channels
            .iter()
            .map(|c| c.path.display().to_string())
            .collect();
        report.problems.push(format!(
            "case {}: dataset.json declares {channel_count} channel(s) but the files hold {} ({})",
            case.id,
            case.channels.len(),
            files.join(", ")
        ));
    }
    let label_shape = case.label.shape().to_vec();
    let label_spacing = case.label_geometry.spacing_zyx();
    for (channel, image) in case.channels.iter().enumerate() {
        if image.data.shape() != label_shape.as_slice() {
            report.problems.push(format!(
                "case {}: channel {channel} has shape {:?} (z, y, x) but the label has {:?}",
                case.id,
                image.data.shape(),
                label_shape
            ));
        }
        let spacing = image.geometry.spacing_zyx();
        if !close(&spacing, &label_spacing) {
            report.problems.push(format!(
                "case {}: channel {channel} has spacing {spacing:?} but the label has {label_spacing:?}",
                case.id
            ));
        }
        if let Some(found) = non_finite(&image.data) {
            report
                .problems
                .push(non_finite_problem(&case.id, channel, &found, &image.path));
        }
        if !image.geometry.same_position(&case.label_geometry) {
            report.warnings.push(format!(
                "case {}: channel {channel} and label differ in origin or direction",
                case.id
            ));
        }
    }
    let unexpected = undeclared_values(&case.label, allowed_labels);
    if !unexpected.is_empty() {
        report.problems.push(format!(
            "case {}: label values {unexpected:?} are not declared in dataset.json (allowed: {allowed_labels:?})",
            case.id
        ));
    }
    report
}

/// How many voxels of an image are NaN, +Inf and -Inf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonFinite {
    pub nan: usize,
    pub positive_infinity: usize,
    pub negative_infinity: usize,
}

impl fmt::Display for NonFinite {
    /// `NaN (2 voxels) and +Inf (1 voxel)`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let parts: Vec<String> = [
            ("NaN", self.nan),
            ("+Inf", self.positive_infinity),
            ("-Inf", self.negative_infinity),
        ]
        .into_iter()
        .filter(|&(_, count)| count > 0)
        .map(|(what, count)| format!("{what} ({count} voxel{})", if count == 1 { "" } else { "s" }))
        .collect();
        match parts.as_slice() {
            [] => write!(f, "no non-finite values"),
            [one] => write!(f, "{one}"),
            [first @ .., last] => write!(f, "{} and {last}", first.join(", ")),
        }
    }
}

/// The NaN, +Inf and -Inf voxels of an image, or `None` when every voxel is finite. (An image stored
/// as float64 whose values exceed float32's range reads as ±Inf, as it does in nnU-Net.)
pub fn non_finite(data: &Array3<f32>) -> Option<NonFinite> {
    // A fold without early exit vectorizes; non-finite values are rare, so exiting early gains
    // nothing. Counting is done only for a bad image.
    if data.iter().fold(true, |finite, v| finite & v.is_finite()) {
        return None;
    }
    let mut found = NonFinite::default();
    for v in data.iter().filter(|v| !v.is_finite()) {
        if v.is_nan() {
            found.nan += 1;
        } else if *v > 0.0 {
            found.positive_infinity += 1;
        } else {
            found.negative_infinity += 1;
        }
    }
    Some(found)
}

/// The problem line for an image with non-finite voxels: case, channel, what, file.
pub fn non_finite_problem(case: &str, channel: usize, found: &NonFinite, file: &Path) -> String {
    format!(
        "case {case}: channel {channel} contains {found} in {}",
        file.display()
    )
}

/// Label values not in `allowed`, sorted. Labels span a small range, so one pass finds the range
/// and a second, only when the range holds undeclared values, marks which occur.
fn undeclared_values(label: &Array3<i32>, allowed: &[i64]) -> Vec<i64> {
    let (low, high) = label
        .iter()
        .fold((i32::MAX, i32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if low > high {
        return Vec::new();
    }
    let (low, high) = (i64::from(low), i64::from(high));
    if (low..=high).all(|v| allowed.contains(&v)) {
        return Vec::new();
    }
    let mut seen = vec![false; (high - low + 1) as usize];
    label
        .iter()
        .for_each(|&v| seen[(i64::from(v) - low) as usize] = true);
    (low..=high)
        .filter(|v| seen[(v - low) as usize] && !allowed.contains(v))
        .collect()
}

fn close(a: &[f64; 3], b: &[f64; 3]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= SPACING_TOLERANCE * x.abs().max(y.abs()).max(1.0))
}

/// The whole check: layout first, then every case read and checked (in parallel, one case in
/// memory per worker).
pub fn check_dataset(dataset: &Dataset) -> Report {
    let mut report = Report {
        problems: dataset.layout_problems(),
        warnings: Vec::new(),
    };
    let allowed = dataset.allowed_label_values();
    let per_case: Vec<Report> = dataset
        .cases
        .par_iter()
        .filter(|case| case.images.iter().all(|p| p.is_file()) && case.label.is_file())
        .map(|case| match load_case(case) {
            Ok(loaded) => check_case(&loaded, dataset.channels.len(), &allowed),
            Err(unreadable) => Report {
                problems: unreadable.iter().map(ToString::to_string).collect(),
                warnings: Vec::new(),
            },
        })
        .collect();
    for case in per_case {
        report.problems.extend(case.problems);
        report.warnings.extend(case.warnings);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::geometry::Header;
    use crate::data::nifti;
    use crate::data::synthetic::{write_dataset, SyntheticSpec};

    #[test]
    fn one_report_lists_every_bad_case() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spec = SyntheticSpec {
            cases: 6,
            shape_zyx: [6, 8, 8],
            ..SyntheticSpec::default()
        };
        write_dataset(root, &spec).unwrap();
        let header = Header::axis_aligned([6, 8, 8], [2.0, 1.0, 1.0], [0.0; 3]);
        // case_000: a label value dataset.json does not declare.
        nifti::write(
            root.join("labelsTr/case_000.nii.gz"),
            &Array3::<u8>::from_elem((6, 8, 8), 5),
            &header,
        )
        .unwrap();
        // case_001: image shape differs from the label.
        let small = Header::axis_aligned([6, 8, 7], [2.0, 1.0, 1.0], [0.0; 3]);
        nifti::write(
            root.join("imagesTr/case_001_0000.nii.gz"),
            &Array3::<i16>::ones((6, 8, 7)),
            &small,
        )
        .unwrap();
        // case_002: the label file is missing.
        std::fs::remove_file(root.join("labelsTr/case_002.nii.gz")).unwrap();
        // case_003: NaN in the image; and a spacing mismatch.
        let mut nan = Array3::<f32>::ones((6, 8, 8));
        nan[[1, 1, 1]] = f32::NAN;
        let other_spacing = Header::axis_aligned([6, 8, 8], [3.0, 1.0, 1.0], [0.0; 3]);
        nifti::write(root.join("imagesTr/case_003_0000.nii.gz"), &nan, &other_spacing).unwrap();
        // case_004 stays good.
        // case_005: +Inf and -Inf.
        let mut infinite = Array3::<f32>::ones((6, 8, 8));
        infinite[[0, 0, 0]] = f32::INFINITY;
        infinite[[2, 3, 4]] = f32::NEG_INFINITY;
        infinite[[5, 7, 7]] = f32::NEG_INFINITY;
        nifti::write(root.join("imagesTr/case_005_0000.nii.gz"), &infinite, &header).unwrap();

        let dataset = Dataset::open(root).unwrap();
        let report = check_dataset(&dataset);
        let text = report.render();
        assert!(!report.is_ok());
        assert!(
            text.contains("case case_000: label values [5] are not declared"),
            "{text}"
        );
        assert!(
            text.contains("case case_001: channel 0 has shape [6, 8, 7]"),
            "{text}"
        );
        assert!(text.contains("case case_002: label file"), "{text}");
        assert!(
            text.contains("case case_003: channel 0 contains NaN (1 voxel) in ")
                && text.contains("imagesTr/case_003_0000.nii.gz"),
            "{text}"
        );
        assert!(
            text.contains("case case_005: channel 0 contains +Inf (1 voxel) and -Inf (2 voxels) in ")
                && text.contains("imagesTr/case_005_0000.nii.gz"),
            "{text}"
        );
        assert!(
            text.contains("case case_003: channel 0 has spacing [3.0, 1.0, 1.0]"),
            "{text}"
        );
        assert!(!text.contains("case_004"), "{text}");
        assert_eq!(report.problems.len(), 6, "{text}");
    }

    #[test]
    fn non_finite_counts_each_kind() {
        let mut data = Array3::<f32>::zeros((2, 2, 2));
        assert_eq!(non_finite(&data), None);
        data[[0, 0, 0]] = f32::NAN;
        data[[0, 0, 1]] = f32::NAN;
        data[[1, 1, 1]] = f32::NEG_INFINITY;
        let found = non_finite(&data).unwrap();
        assert_eq!(
            found,
            NonFinite {
                nan: 2,
                positive_infinity: 0,
                negative_infinity: 1
            }
        );
        assert_eq!(found.to_string(), "NaN (2 voxels) and -Inf (1 voxel)");
        data[[1, 0, 0]] = f32::INFINITY;
        assert_eq!(
            non_finite(&data).unwrap().to_string(),
            "NaN (2 voxels), +Inf (1 voxel) and -Inf (1 voxel)"
        );
    }
}
