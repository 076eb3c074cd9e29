//! nnU-Net's dataset integrity check: every case has all its channel files and a label file, image
//! and label agree in shape and spacing, labels hold only the values dataset.json declares, images
//! hold no NaN. Every problem of every case is collected into one report; affine or origin
//! differences only warn, as in nnU-Net.

use ndarray::Array3;
use rayon::prelude::*;

use super::dataset::{Case, Dataset};
use super::geometry::Header;
use super::nifti::{self, Volume};

/// Spacing differences below this (relative) are rounding, not a mismatch (nnU-Net uses allclose).
const SPACING_TOLERANCE: f64 = 1e-4;

/// One case, read: its channel images and its label map.
pub struct LoadedCase {
    pub id: String,
    pub images: Vec<Volume>,
    pub label: Array3<i32>,
    pub label_header: Header,
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

/// Reads a case's files; a file that cannot be read is a problem naming the case and the file.
pub fn load_case(case: &Case) -> Result<LoadedCase, Vec<String>> {
    let mut problems = Vec::new();
    let mut images = Vec::new();
    for path in &case.images {
        match nifti::read(path) {
            Ok(volume) => images.push(volume),
            Err(e) => problems.push(format!("case {}: {e}", case.id)),
        }
    }
    let label = match nifti::read_integer_labels(&case.label) {
        Ok(label) => Some(label),
        Err(e) => {
            problems.push(format!("case {}: {e}", case.id));
            None
        }
    };
    match label {
        Some((label, label_header)) if problems.is_empty() => Ok(LoadedCase {
            id: case.id.clone(),
            images,
            label,
            label_header,
        }),
        _ => Err(problems),
    }
}

/// Checks one loaded case against the dataset's declarations.
pub fn check_case(case: &LoadedCase, allowed_labels: &[i64]) -> Report {
    let mut report = Report::default();
    let label_shape = case.label.shape().to_vec();
    let label_spacing = case.label_header.spacing_zyx();
    for (channel, image) in case.images.iter().enumerate() {
        if image.data.shape() != label_shape.as_slice() {
            report.problems.push(format!(
                "case {}: channel {channel} has shape {:?} (z, y, x) but the label has {:?}",
                case.id,
                image.data.shape(),
                label_shape
            ));
        }
        let spacing = image.spacing_zyx();
        if !close(&spacing, &label_spacing) {
            report.problems.push(format!(
                "case {}: channel {channel} has spacing {spacing:?} but the label has {label_spacing:?}",
                case.id
            ));
        }
        // A fold without early exit vectorizes; NaN is rare, so exiting early gains nothing.
        if image.data.iter().fold(false, |nan, v| nan | v.is_nan()) {
            report
                .problems
                .push(format!("case {}: channel {channel} contains NaN", case.id));
        }
        if !close_affine(&image.header.affine(), &case.label_header.affine()) {
            report.warnings.push(format!(
                "case {}: channel {channel} and label affines differ",
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

fn close_affine(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> bool {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .all(|(x, y)| (x - y).abs() <= 1e-4 * x.abs().max(1.0))
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
            Ok(loaded) => check_case(&loaded, &allowed),
            Err(problems) => Report {
                problems,
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
    use crate::data::synthetic::{write_dataset, SyntheticSpec};

    #[test]
    fn one_report_lists_every_bad_case() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spec = SyntheticSpec {
            cases: 5,
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
        assert!(text.contains("case case_003: channel 0 contains NaN"), "{text}");
        assert!(
            text.contains("case case_003: channel 0 has spacing [3.0, 1.0, 1.0]"),
            "{text}"
        );
        assert!(!text.contains("case_004"), "{text}");
        assert_eq!(report.problems.len(), 5, "{text}");
    }
}
