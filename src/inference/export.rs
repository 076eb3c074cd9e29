//! nnU-Net's export of a prediction back to the raw image (`inference/export_prediction.py`:
//! `convert_predicted_logits_to_segmentation_with_correct_shape` and
//! `export_prediction_from_logits`): preprocessing was transpose -> crop -> resample, so export
//! undoes it in reverse order: resample the logits to the cropped grid, apply the inference
//! nonlinearity and make the label map, paste it into the uncropped grid, transpose back, and write
//! it with the raw image's own geometry, in the format its path names.

use std::path::Path;

use ndarray::{s, Array3, Array4, ArrayView1, ArrayView4, ArrayViewMut1, Axis, Zip};

use crate::data::case_store::CaseProperties;
use crate::data::dataset::Dataset;
use crate::data::image::{self, Geometry};
use crate::file_error::FileError;
use crate::inference::InferenceError;
use crate::plans::ResolvedConfiguration;
use crate::preprocess::resample::resample_data_to_shape;

/// Region-based (sigmoid) training: channel `i` of the logits is a region that paints label
/// `regions_class_order[i]`, later regions over earlier ones.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionInfo {
    pub regions_class_order: Vec<i64>,
}

impl RegionInfo {
    /// The dataset's regions, or `None` for an ordinary (softmax) label dataset.
    pub fn from_dataset(dataset: &Dataset) -> Result<Option<RegionInfo>, InferenceError> {
        if !dataset.has_regions() {
            return Ok(None);
        }
        let order = dataset
            .regions_class_order
            .clone()
            .ok_or(InferenceError::NoRegionOrder)?;
        Ok(Some(RegionInfo {
            regions_class_order: order,
        }))
    }
}

/// A prediction on the raw image's voxel grid, axes (z, y, x) (the order [`image::read`] returns
/// and [`image::write_labels`] takes).
#[derive(Clone, Debug, PartialEq)]
pub struct Exported {
    /// Label map, background (0) outside the nonzero crop.
    pub segmentation: Array3<i16>,
    /// Per channel (K x z x y x): softmax or sigmoid outputs; outside the crop nnU-Net's
    /// `revert_cropping_on_probabilities` fill: background 1 and the rest 0 for softmax, all 0 for
    /// regions.
    pub probabilities: Option<Array4<f32>>,
}

/// Exports logits `(K, z, y, x)` on the preprocessed grid of a case (transposed, cropped,
/// resampled) to the raw image's grid. `configuration` is the resolved configuration of
/// plans.json (`spacing`, `resampling_fn_probabilities_kwargs`).
///
/// As in nnU-Net the segmentation comes from the logits' argmax when no probabilities are asked
/// for, and from the probabilities' argmax otherwise (the two can differ only where float32
/// softmax rounds two classes to the same value).
pub fn export_case(
    logits: ArrayView4<f32>,
    properties: &CaseProperties,
    configuration: &ResolvedConfiguration,
    regions: Option<&RegionInfo>,
    want_probabilities: bool,
) -> Result<Exported, InferenceError> {
    check_inputs(logits, properties, regions)?;
    let resampled = resample_to_cropped_grid(logits, properties, configuration)?;
    let logits = resampled.as_ref().map_or(logits, |r| r.view());
    let (cropped, probabilities) = match regions {
        Some(regions) => {
            let probabilities = logits.mapv(sigmoid);
            (paint_regions(probabilities.view(), regions)?, Some(probabilities))
        }
        None if want_probabilities => {
            let probabilities = softmax(logits);
            (argmax(probabilities.view()), Some(probabilities))
        }
        // argmax is the same on logits as on probabilities, and skips the softmax (nnU-Net's
        // fast path).
        None => (argmax(logits), None),
    };
    let segmentation = transposed_back(uncropped(&cropped, properties), properties.transpose_forward);
    let probabilities = probabilities.filter(|_| want_probabilities).map(|p| {
        let full = uncropped_probabilities(&p, properties, regions.is_none());
        transposed_back_channels(full, properties.transpose_forward)
    });
    let expected = properties.geometry.shape_zyx();
    if segmentation.shape() != expected {
        return Err(InferenceError::ExportedShape {
            found: segmentation.shape().to_vec(),
            expected,
        });
    }
    Ok(Exported {
        segmentation,
        probabilities,
    })
}

/// nnU-Net's `resample_and_save` for the cascade: logits on this configuration's preprocessed grid,
/// resampled to `target_shape` (the same case on the next stage's grid) with
/// `resampling_fn_probabilities`, then turned into labels (argmax, or regions painted in order).
/// nnU-Net passes the configuration's own spacing as both current and target spacing, so the
/// spacing only decides whether z is resampled separately.
pub fn segmentation_on_grid(
    logits: ArrayView4<f32>,
    target_shape: [usize; 3],
    configuration: &ResolvedConfiguration,
    regions: Option<&RegionInfo>,
) -> Result<Array3<i16>, InferenceError> {
    let spacing = current_spacing(configuration, [1.0; 3])?;
    let resampled = if logits.shape()[1..] == target_shape {
        None
    } else {
        let options = configuration.probabilities_resampling();
        Some(
            resample_data_to_shape(logits, target_shape, spacing, spacing, &options)
                .map_err(InferenceError::Resample)?,
        )
    };
    let logits = resampled.as_ref().map_or(logits, |r| r.view());
    match regions {
        Some(regions) => paint_regions(logits.mapv(sigmoid).view(), regions),
        None => Ok(argmax(logits)),
    }
}

/// Writes a segmentation from [`export_case`] as NIfTI with exactly the raw image's geometry
/// (dim, pixdim, units, qform and sform copied from its header), gzip-compressed for `.nii.gz`,
/// atomically. uint8 when every label is below 255, as nnU-Net writes it, int16 otherwise.
pub fn write_segmentation(
    path: &Path,
    segmentation: &Array3<i16>,
    properties: &CaseProperties,
) -> Result<(), InferenceError> {
    write_label_map(path, segmentation, &properties.geometry)
}

/// Writes a label map with `geometry` in the format `path`'s ending names (uint8 when every label
/// is below 255, as nnU-Net writes it), creating the folder, atomically.
pub fn write_label_map(
    path: &Path,
    segmentation: &Array3<i16>,
    geometry: &Geometry,
) -> Result<(), InferenceError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(FileError::io(parent))?;
    }
    image::write_labels(path, segmentation, geometry).map_err(|source| InferenceError::WriteLabelMap {
        path: path.to_path_buf(),
        source,
    })
}

fn check_inputs(
    logits: ArrayView4<f32>,
    properties: &CaseProperties,
    regions: Option<&RegionInfo>,
) -> Result<(), InferenceError> {
    let channels = logits.len_of(Axis(0));
    if logits.is_empty() {
        return Err(InferenceError::EmptyLogits {
            shape: logits.shape().to_vec(),
        });
    }
    match regions {
        Some(r) if r.regions_class_order.len() != channels => Err(InferenceError::RegionCount {
            channels,
            regions: r.regions_class_order.len(),
        }),
        Some(r) if r.regions_class_order.iter().any(|&l| i16::try_from(l).is_err()) => {
            Err(InferenceError::RegionOrderRange {
                order: r.regions_class_order.clone(),
            })
        }
        None if i16::try_from(channels).is_err() => Err(InferenceError::TooManyClasses { classes: channels }),
        _ => check_crop(properties),
    }
}

/// The crop must lie inside the uncropped shape and match the cropped shape.
fn check_crop(properties: &CaseProperties) -> Result<(), InferenceError> {
    let bbox = properties.bbox_used_for_cropping;
    let fits = (0..3).all(|a| {
        bbox[a][0] <= bbox[a][1]
            && bbox[a][1] <= properties.shape_before_cropping[a]
            && bbox[a][1] - bbox[a][0] == properties.shape_after_cropping_and_before_resampling[a]
    });
    let permutation = {
        let mut seen = properties.transpose_forward;
        seen.sort_unstable();
        seen == [0, 1, 2]
    };
    if fits && permutation {
        return Ok(());
    }
    Err(InferenceError::InconsistentProperties {
        properties: Box::new(properties.clone()),
    })
}

/// Resamples the logits (not probabilities: nnU-Net interpolates before the nonlinearity) to the
/// cropped grid with `resampling_fn_probabilities`; `None` when the grid already has that shape,
/// where nnU-Net's resampling returns its input unchanged.
fn resample_to_cropped_grid(
    logits: ArrayView4<f32>,
    properties: &CaseProperties,
    configuration: &ResolvedConfiguration,
) -> Result<Option<Array4<f32>>, InferenceError> {
    let target_shape = properties.shape_after_cropping_and_before_resampling;
    if logits.shape()[1..] == target_shape {
        return Ok(None);
    }
    // nnU-Net's properties keep the raw (untransposed) spacing; its transposed form is the spacing
    // of the cropped grid.
    let original = properties
        .transpose_forward
        .map(|a| properties.original_spacing[a]);
    let current = current_spacing(configuration, original)?;
    let options = configuration.probabilities_resampling();
    resample_data_to_shape(logits, target_shape, current, original, &options)
        .map(Some)
        .map_err(InferenceError::Resample)
}

/// The spacing of the preprocessed grid as nnU-Net's export builds it: the configuration's spacing,
/// and for 2D configurations (two entries) the raw slice spacing before it, as preprocessing kept
/// the slice axis untouched.
fn current_spacing(
    configuration: &ResolvedConfiguration,
    original_transposed: [f64; 3],
) -> Result<[f64; 3], InferenceError> {
    match configuration.spacing()? {
        [z, y, x] => Ok([*z, *y, *x]),
        [y, x] => Ok([original_transposed[0], *y, *x]),
        other => Err(InferenceError::SpacingDimensions {
            configuration: configuration.name.clone(),
            spacing: other.to_vec(),
        }),
    }
}

/// torch's float32 sigmoid; nnU-Net thresholds it at 0.5 in float32, so a tiny positive logit
/// whose sigmoid rounds to exactly 0.5 does not count.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax over channels in float32, as torch computes it: shifted by the maximum, divided by the
/// sum of exponentials.
fn softmax(logits: ArrayView4<f32>) -> Array4<f32> {
    let mut out = Array4::<f32>::zeros(logits.raw_dim());
    Zip::from(out.lanes_mut(Axis(0)))
        .and(logits.lanes(Axis(0)))
        .for_each(|mut out: ArrayViewMut1<f32>, logits: ArrayView1<f32>| {
            let max = logits.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0f32;
            Zip::from(&mut out).and(&logits).for_each(|o, &v| {
                *o = (v - max).exp();
                sum += *o;
            });
            out.mapv_inplace(|e| e / sum);
        });
    out
}

/// Index of the largest channel per voxel, the first on ties (numpy's argmax).
fn argmax(values: ArrayView4<f32>) -> Array3<i16> {
    let (_, z, y, x) = values.dim();
    let mut out = Array3::<i16>::zeros((z, y, x));
    Zip::from(&mut out)
        .and(values.lanes(Axis(0)))
        .for_each(|o, lane: ArrayView1<f32>| {
            let mut best = (0, f32::NEG_INFINITY);
            for (i, &v) in lane.iter().enumerate() {
                if v > best.1 {
                    best = (i, v);
                }
            }
            *o = best.0 as i16;
        });
    out
}

/// nnU-Net's region painting: each region whose probability exceeds 0.5 paints its label, in
/// `regions_class_order`, so later regions win.
fn paint_regions(
    probabilities: ArrayView4<f32>,
    regions: &RegionInfo,
) -> Result<Array3<i16>, InferenceError> {
    let (_, z, y, x) = probabilities.dim();
    let mut out = Array3::<i16>::zeros((z, y, x));
    for (channel, &label) in probabilities.outer_iter().zip(&regions.regions_class_order) {
        let label = i16::try_from(label).map_err(|_| InferenceError::RegionLabelRange { label })?;
        Zip::from(&mut out).and(&channel).for_each(|o, &p| {
            if p > 0.5 {
                *o = label;
            }
        });
    }
    Ok(out)
}

/// The label map pasted into the uncropped (transposed) grid, background elsewhere.
fn uncropped(cropped: &Array3<i16>, properties: &CaseProperties) -> Array3<i16> {
    let mut full = Array3::<i16>::zeros(properties.shape_before_cropping);
    let [z, y, x] = properties.bbox_used_for_cropping;
    full.slice_mut(s![z[0]..z[1], y[0]..y[1], x[0]..x[1]])
        .assign(cropped);
    full
}

/// `revert_cropping_on_probabilities`: outside the crop softmax outputs say "certainly background"
/// (channel 0 is 1), region outputs say "no region" (all 0).
fn uncropped_probabilities(cropped: &Array4<f32>, properties: &CaseProperties, softmax: bool) -> Array4<f32> {
    let [nz, ny, nx] = properties.shape_before_cropping;
    let mut full = Array4::<f32>::zeros((cropped.len_of(Axis(0)), nz, ny, nx));
    if softmax {
        full.index_axis_mut(Axis(0), 0).fill(1.0);
    }
    let [z, y, x] = properties.bbox_used_for_cropping;
    full.slice_mut(s![.., z[0]..z[1], y[0]..y[1], x[0]..x[1]])
        .assign(cropped);
    full
}

/// nnU-Net's `transpose_backward`: the permutation that undoes `transpose_forward`.
fn transpose_backward(forward: [usize; 3]) -> [usize; 3] {
    let mut backward = [0; 3];
    for (i, &axis) in forward.iter().enumerate() {
        backward[axis] = i;
    }
    backward
}

/// Back to the raw image's (z, y, x) axis order, in C order as the NIfTI writer walks it.
fn transposed_back(array: Array3<i16>, forward: [usize; 3]) -> Array3<i16> {
    if forward == [0, 1, 2] {
        return array;
    }
    array
        .permuted_axes(transpose_backward(forward))
        .as_standard_layout()
        .into_owned()
}

fn transposed_back_channels(array: Array4<f32>, forward: [usize; 3]) -> Array4<f32> {
    if forward == [0, 1, 2] {
        return array;
    }
    let [a, b, c] = transpose_backward(forward);
    array
        .permuted_axes([0, a + 1, b + 1, c + 1])
        .as_standard_layout()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::geometry::Header;
    use crate::data::nifti;

    fn properties(shape: [usize; 3]) -> CaseProperties {
        CaseProperties {
            spacing: [1.0; 3],
            original_spacing: [1.0; 3],
            transpose_forward: [0, 1, 2],
            shape_before_cropping: shape,
            bbox_used_for_cropping: shape.map(|n| [0, n]),
            shape_after_cropping_and_before_resampling: shape,
            geometry: Geometry::from_nifti(Header::axis_aligned(shape, [1.0; 3], [0.0; 3])),
            normalized: true,
            resampled: true,
            class_locations: None,
        }
    }

    fn configuration_of(values: serde_json::Value) -> ResolvedConfiguration {
        ResolvedConfiguration {
            name: "test".into(),
            values: serde_json::from_value(values).unwrap(),
        }
    }

    fn configuration() -> ResolvedConfiguration {
        configuration_of(
            serde_json::json!({"spacing": [1.0, 1.0, 1.0], "resampling_fn_probabilities_kwargs":
            {"is_seg": false, "order": 1, "order_z": 0, "force_separate_z": null}}),
        )
    }

    fn logits(shape: [usize; 3], channels: usize) -> Array4<f32> {
        let [z, y, x] = shape;
        Array4::from_shape_fn((channels, z, y, x), |(c, z, y, x)| {
            ((c * 7 + z * 5 + y * 3 + x) % 11) as f32 - 5.0
        })
    }

    #[test]
    fn identity_case_exports_the_argmax() {
        let shape = [3, 4, 5];
        let logits = logits(shape, 3);
        let exported = export_case(logits.view(), &properties(shape), &configuration(), None, true).unwrap();
        assert_eq!(exported.segmentation, argmax(logits.view()));
        let probabilities = exported.probabilities.unwrap();
        assert_eq!(probabilities.dim(), logits.dim());
        for sum in probabilities.sum_axis(Axis(0)) {
            assert!((sum - 1.0).abs() < 1e-6);
        }
        let fast = export_case(logits.view(), &properties(shape), &configuration(), None, false).unwrap();
        assert_eq!(fast.segmentation, exported.segmentation);
        assert_eq!(fast.probabilities, None);
    }

    #[test]
    fn crop_is_reverted_with_background_and_transpose_undone() {
        // Raw (z, y, x) = (4, 5, 6); transposed by [2, 0, 1] it is (6, 4, 5); cropped to 2 x 2 x 3.
        let mut p = properties([4, 5, 6]);
        p.transpose_forward = [2, 0, 1];
        p.shape_before_cropping = [6, 4, 5];
        p.bbox_used_for_cropping = [[1, 3], [2, 4], [0, 3]];
        p.shape_after_cropping_and_before_resampling = [2, 2, 3];
        let logits = logits([2, 2, 3], 2);
        let exported = export_case(logits.view(), &p, &configuration(), None, true).unwrap();
        let cropped = argmax(logits.view());
        assert_eq!(exported.segmentation.dim(), (4, 5, 6));
        let probabilities = exported.probabilities.unwrap();
        for ((z, y, x), &label) in exported.segmentation.indexed_iter() {
            // Raw (z, y, x) is transposed (x, z, y).
            let t = [x, z, y];
            let inside = (0..3)
                .all(|a| (p.bbox_used_for_cropping[a][0]..p.bbox_used_for_cropping[a][1]).contains(&t[a]));
            let expected = if inside {
                cropped[[t[0] - 1, t[1] - 2, t[2]]]
            } else {
                0
            };
            assert_eq!(label, expected, "at {:?}", (z, y, x));
            if !inside {
                assert_eq!(
                    (probabilities[[0, z, y, x]], probabilities[[1, z, y, x]]),
                    (1.0, 0.0)
                );
            }
        }
    }

    #[test]
    fn regions_paint_in_class_order_and_pad_with_zero() {
        let mut p = properties([1, 1, 3]);
        p.shape_before_cropping = [1, 1, 3];
        p.bbox_used_for_cropping = [[0, 1], [0, 1], [0, 2]];
        p.shape_after_cropping_and_before_resampling = [1, 1, 2];
        // Voxel 0: only region 0; voxel 1: both, the later region (label 2) wins.
        let logits = Array4::from_shape_vec((2, 1, 1, 2), vec![3.0, 2.0, -1.0, 4.0]).unwrap();
        let regions = RegionInfo {
            regions_class_order: vec![1, 2],
        };
        let exported = export_case(logits.view(), &p, &configuration(), Some(&regions), true).unwrap();
        assert_eq!(
            exported.segmentation.iter().copied().collect::<Vec<_>>(),
            [1, 2, 0]
        );
        let probabilities = exported.probabilities.unwrap();
        assert_eq!(probabilities[[0, 0, 0, 2]], 0.0);
        assert_eq!(probabilities[[1, 0, 0, 2]], 0.0);
        assert!((probabilities[[1, 0, 0, 1]] - sigmoid(4.0)).abs() < 1e-7);
    }

    #[test]
    fn two_d_configurations_keep_the_raw_slice_spacing() {
        let configuration = configuration_of(serde_json::json!({"spacing": [0.5, 0.7]}));
        assert_eq!(
            current_spacing(&configuration, [4.0, 1.0, 1.0]).unwrap(),
            [4.0, 0.5, 0.7]
        );
        assert_eq!(transpose_backward([2, 0, 1]), [1, 2, 0]);
    }

    #[test]
    fn mismatched_regions_and_header_are_errors() {
        let shape = [2, 2, 2];
        let logits = logits(shape, 3);
        let regions = RegionInfo {
            regions_class_order: vec![1, 2],
        };
        assert!(export_case(
            logits.view(),
            &properties(shape),
            &configuration(),
            Some(&regions),
            false
        )
        .is_err());
        let mut p = properties(shape);
        p.geometry = Geometry::from_nifti(Header::axis_aligned([2, 2, 3], [1.0; 3], [0.0; 3]));
        assert!(export_case(logits.view(), &p, &configuration(), None, false).is_err());
    }

    #[test]
    fn written_segmentation_is_uint8_with_the_raw_header() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [2, 3, 4];
        let p = properties(shape);
        let seg = Array3::from_shape_fn(shape, |(z, y, x)| ((z + y + x) % 3) as i16);
        let path = dir.path().join("out/case.nii.gz");
        write_segmentation(&path, &seg, &p).unwrap();
        let (read, header) = nifti::read_integer_labels(&path).unwrap();
        assert_eq!(read, seg.mapv(i32::from));
        assert_eq!(header.datatype, 2);
        assert_eq!(
            Header {
                datatype: 2,
                ..p.geometry.nifti_header()
            },
            header
        );
    }
}
