//! The preprocessing steps applied to one case, in nnU-Net's terms: crop (transpose, crop to
//! nonzero), normalize, resample (and sample class locations). Each takes and returns arrays or a
//! [`StoredCase`], so the normalize and resample stages can run in either order; nnU-Net's order is
//! load -> normalize -> resample. No file is read or written here: `super::case_io` reads a raw
//! case and the plans, the stages write the results.

use ndarray::{Array3, Array4, ArrayView3, Axis};

use super::class_locations::{self, Target};
use super::crop::crop_to_nonzero;
use super::normalize::{normalize_in_place, Scheme};
use super::resample::{compute_new_shape, resample_data_to_shape, resample_seg_to_shape};
use super::PreprocessError;
use crate::data::case_store::{CaseProperties, StoredCase};
use crate::data::dataset::{Dataset, LabelValue};
use crate::data::fingerprint_format::IntensityStats;
use crate::data::image::Geometry;
use crate::plans::{Plans, ResolvedConfiguration};

/// What the steps need from plans.json.
#[derive(Clone)]
pub struct PlanView {
    pub transpose_forward: [usize; 3],
    pub intensity_properties: Vec<Option<IntensityStats>>,
    pub configuration: ResolvedConfiguration,
}

impl PlanView {
    pub fn new(plans: &Plans, configuration: &str) -> Result<PlanView, PreprocessError> {
        Ok(PlanView {
            transpose_forward: plans.transpose_forward,
            intensity_properties: plans.intensity_properties(),
            configuration: plans.configuration(configuration)?,
        })
    }

    /// Target spacing for the case's current spacing: 2D configurations keep the slice spacing.
    pub fn target_spacing(&self, current: [f64; 3]) -> Result<[f64; 3], PreprocessError> {
        match self.configuration.spacing()? {
            [z, y, x] => Ok([*z, *y, *x]),
            [y, x] => Ok([current[0], *y, *x]),
            other => Err(PreprocessError::SpacingDimensions {
                configuration: self.configuration.name.clone(),
                spacing: other.to_vec(),
            }),
        }
    }
}

/// Why a configuration does not apply: the plans lack it. `None` when it is planned.
pub fn unplanned_reason(plans: &Plans, name: &str) -> Option<String> {
    plans.configuration(name).err().map(|reason| {
        let hint = if name == "3d_lowres" || name == "3d_cascade_fullres" {
            " (nnU-Net plans the low-resolution cascade only when the full-resolution patch covers less \
             than a quarter of the median image)"
        } else {
            ""
        };
        format!("{reason}{hint}")
    })
}

/// Why a configuration needs no preprocessing of its own: it inherits the `data_identifier` of the
/// configuration it `inherits_from` (the cascade's 3d_cascade_fullres trains on 3d_fullres's data).
pub fn shared_preprocessing_reason(plans: &Plans, name: &str) -> Option<String> {
    let parent = plans.configurations.get(name)?.inherits_from.as_deref()?;
    let shared = plans.configuration(name).ok()?.values.data_identifier;
    let parents = plans.configuration(parent).ok()?.values.data_identifier;
    (shared.is_some() && shared == parents)
        .then(|| format!("{name} trains on the preprocessed data of {parent} (same data_identifier)"))
}

/// A raw case as read from its files, in the files' (z, y, x) axis order.
pub struct RawCase {
    /// One volume per image channel, all of one shape.
    pub channels: Vec<Array3<f32>>,
    /// The label volume, of the channels' shape; `None` for an image to predict.
    pub seg: Option<Array3<i32>>,
    /// The first channel's geometry.
    pub geometry: Geometry,
    /// The first channel's voxel spacing, (z, y, x).
    pub spacing: [f64; 3],
}

/// Transposes a raw case as planned and crops it to its nonzero region. Errors name what does not
/// fit; the caller adds which case.
pub fn crop_raw(raw: RawCase, transpose: [usize; 3]) -> Result<StoredCase, PreprocessError> {
    let RawCase {
        channels,
        seg,
        geometry,
        spacing,
    } = raw;
    let Some(first) = channels.first() else {
        return Err(PreprocessError::NoChannels);
    };
    if let Some(channel) = channels.iter().position(|c| c.shape() != first.shape()) {
        return Err(PreprocessError::ChannelShape { channel });
    }
    let seg = match seg {
        Some(label) if label.shape() != first.shape() => {
            return Err(PreprocessError::LabelShape {
                label: label.shape().to_vec(),
                image: first.shape().to_vec(),
            });
        }
        Some(label) => Some(transposed(label, transpose)),
        None => None,
    };
    let channels: Vec<Array3<f32>> = channels.into_iter().map(|c| transposed(c, transpose)).collect();
    let shape_before_cropping = shape3(channels[0].shape());
    let cropped = crop_to_nonzero(channels, seg);
    let data = match <[Array3<f32>; 1]>::try_from(cropped.channels) {
        // One channel (the usual case): a view as (1, z, y, x), no copy.
        Ok([channel]) => channel.insert_axis(Axis(0)),
        Err(channels) => {
            let views: Vec<_> = channels.iter().map(|c| c.view()).collect();
            // The shapes were checked above, so stacking cannot fail.
            ndarray::stack(Axis(0), &views).expect("channels of one shape")
        }
    };
    let bbox = cropped.bbox;
    let properties = CaseProperties {
        spacing: transpose.map(|axis| spacing[axis]),
        original_spacing: spacing,
        transpose_forward: transpose,
        shape_before_cropping,
        bbox_used_for_cropping: [0, 1, 2].map(|a| [bbox.start[a], bbox.end[a]]),
        shape_after_cropping_and_before_resampling: bbox.shape(),
        geometry,
        normalized: false,
        resampled: false,
        class_locations: None,
    };
    let seg = cropped.seg.mapv(|v| v as i16).insert_axis(Axis(0));
    Ok(StoredCase {
        data,
        seg: Some(seg),
        properties,
    })
}

fn transposed<T: Clone>(array: Array3<T>, transpose: [usize; 3]) -> Array3<T> {
    if transpose == [0, 1, 2] {
        return array; // the common case: no copy
    }
    array.permuted_axes(transpose).as_standard_layout().into_owned()
}

fn shape3(shape: &[usize]) -> [usize; 3] {
    [shape[0], shape[1], shape[2]]
}

/// Normalizes every channel with its planned scheme (masked z-score where planned). nnU-Net
/// normalizes before resampling, because a resampled nonzero mask no longer fits the image exactly;
/// resampling first is allowed here as an explicit choice of the pipeline.
pub fn normalize(case: &mut StoredCase, plan: &PlanView) -> Result<(), PreprocessError> {
    let schemes = plan.configuration.normalization_schemes()?;
    let use_mask = plan.configuration.use_mask_for_norm();
    if schemes.len() != case.data.shape()[0] {
        return Err(PreprocessError::ChannelCount {
            schemes: schemes.len(),
            channels: case.data.shape()[0],
        });
    }
    let seg = case
        .seg
        .as_ref()
        .map(|s| s.index_axis(Axis(0), 0).mapv(i32::from));
    for (channel, scheme_name) in schemes.iter().enumerate() {
        let scheme = Scheme::from_class_name(scheme_name).map_err(PreprocessError::Scheme)?;
        let stats = plan.intensity_properties.get(channel).and_then(Option::as_ref);
        let mask = use_mask.get(channel).copied().unwrap_or(false);
        normalize_in_place(
            case.data.index_axis_mut(Axis(0), channel),
            seg.as_ref().map(|s| s.view()),
            scheme,
            mask,
            stats,
        )
        .map_err(|source| PreprocessError::Normalize { channel, source })?;
    }
    case.properties.normalized = true;
    Ok(())
}

/// The grid shape a case of this spacing and shape gets in this configuration.
pub fn resampled_shape(
    properties: &CaseProperties,
    shape: [usize; 3],
    plan: &PlanView,
) -> Result<[usize; 3], PreprocessError> {
    Ok(compute_new_shape(
        shape,
        properties.spacing,
        plan.target_spacing(properties.spacing)?,
    ))
}

/// Resamples data and segmentation to the configuration's spacing.
pub fn resample(case: StoredCase, plan: &PlanView) -> Result<StoredCase, PreprocessError> {
    let current = case.properties.spacing;
    let target = plan.target_spacing(current)?;
    let shape = shape3(&case.data.shape()[1..]);
    let new_shape = compute_new_shape(shape, current, target);
    if new_shape == shape {
        // nnU-Net leaves data and segmentation untouched when the grid size does not change.
        let mut properties = case.properties;
        properties.spacing = target;
        properties.resampled = true;
        return Ok(StoredCase {
            data: case.data,
            seg: case.seg,
            properties,
        });
    }
    let data_options = plan.configuration.data_resampling();
    let seg_options = plan.configuration.seg_resampling();
    let data = resample_data_to_shape(case.data.view(), new_shape, current, target, &data_options)?;
    let seg = match &case.seg {
        Some(seg) => {
            let seg: Array4<i32> = seg.mapv(i32::from);
            let resampled = resample_seg_to_shape(seg.view(), new_shape, current, target, &seg_options)?;
            Some(resampled.mapv(|v| v as i16))
        }
        None => None,
    };
    let mut properties = case.properties;
    properties.spacing = target;
    properties.resampled = true;
    Ok(StoredCase {
        data,
        seg,
        properties,
    })
}

/// A segmentation of the raw image (NIfTI axis order) brought onto a preprocessed case's grid the
/// way preprocessing treats labels: transposed, cropped to the case's nonzero box, resampled with
/// the plan's segmentation resampling. The cascade feeds the previous stage's prediction of a new
/// image to the second stage this way, as nnU-Net's predictor preprocesses `seg_from_prev_stage`.
/// (nnU-Net also marks background outside the nonzero mask -1; no foreground label depends on it.)
pub fn segmentation_to_grid(
    seg: ArrayView3<i16>,
    properties: &CaseProperties,
    plan: &PlanView,
) -> Result<Array3<i16>, PreprocessError> {
    let expected = properties.geometry.shape_zyx();
    if seg.shape() != expected {
        return Err(PreprocessError::SegmentationShape {
            found: seg.shape().to_vec(),
            expected,
        });
    }
    let transposed = seg.permuted_axes(properties.transpose_forward);
    let bbox = properties.bbox_used_for_cropping;
    let cropped = transposed
        .slice(ndarray::s![
            bbox[0][0]..bbox[0][1],
            bbox[1][0]..bbox[1][1],
            bbox[2][0]..bbox[2][1]
        ])
        .mapv(i32::from);
    let current = properties
        .transpose_forward
        .map(|a| properties.original_spacing[a]);
    let target = plan.target_spacing(current)?;
    let shape = properties.shape_after_cropping_and_before_resampling;
    let new_shape = compute_new_shape(shape, current, target);
    if new_shape == shape {
        return Ok(cropped.mapv(|v| v as i16));
    }
    let options = plan.configuration.seg_resampling();
    let resampled = resample_seg_to_shape(
        cropped.insert_axis(Axis(0)).view(),
        new_shape,
        current,
        target,
        &options,
    )?;
    Ok(resampled.index_axis(Axis(0), 0).mapv(|v| v as i16))
}

/// The foreground classes (or regions) nnU-Net collects locations for, from dataset.json.
pub fn location_targets(dataset: &Dataset) -> Vec<Target> {
    let mut targets: Vec<Target> = if dataset.has_regions() {
        dataset
            .labels
            .iter()
            .filter_map(|label| match &label.value {
                LabelValue::Region(values) => {
                    Some(Target::Region(values.iter().map(|&v| v as i32).collect()))
                }
                LabelValue::Single(0) => None,
                LabelValue::Single(v) => Some(Target::Region(vec![*v as i32])),
            })
            .collect()
    } else {
        dataset
            .labels
            .iter()
            .filter_map(|label| match label.value {
                LabelValue::Single(v) if v != 0 => Some(Target::Label(v as i32)),
                _ => None,
            })
            .collect()
    };
    if dataset.ignore_label.is_some() {
        // With an ignore label, nnU-Net also samples uniformly from all annotated voxels.
        let mut all: Vec<i32> = vec![-1];
        all.extend(
            dataset
                .allowed_label_values()
                .iter()
                .filter(|&&v| Some(v) != dataset.ignore_label)
                .map(|&v| v as i32),
        );
        targets.push(Target::Region(all));
    }
    targets
}

/// Samples class locations on the case's final grid (cases with a label only).
pub fn add_class_locations(case: &mut StoredCase, targets: &[Target]) {
    if let Some(seg) = &case.seg {
        case.properties.class_locations = Some(class_locations::sample(seg.view(), targets));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(channels: Vec<Array3<f32>>, seg: Option<Array3<i32>>) -> RawCase {
        RawCase {
            channels,
            seg,
            geometry: Geometry::from_spacing_zyx([2, 3, 4], [3.0, 1.0, 2.0]),
            spacing: [3.0, 1.0, 2.0],
        }
    }

    #[test]
    fn crop_raw_transposes_and_crops_to_nonzero() {
        let mut image = Array3::<f32>::zeros((2, 3, 4));
        image[[1, 1, 2]] = 5.0;
        image[[1, 2, 3]] = 7.0;
        let case = crop_raw(raw(vec![image], None), [2, 0, 1]).unwrap();
        // transposed shape (4, 2, 3); nonzero box x 2..4, z 1..2, y 1..3
        assert_eq!(case.data.shape(), &[1, 2, 1, 2]);
        assert_eq!(case.data[[0, 0, 0, 0]], 5.0);
        assert_eq!(case.data[[0, 1, 0, 1]], 7.0);
        let p = &case.properties;
        assert_eq!(p.spacing, [2.0, 3.0, 1.0]);
        assert_eq!(p.original_spacing, [3.0, 1.0, 2.0]);
        assert_eq!(p.shape_before_cropping, [4, 2, 3]);
        assert_eq!(p.bbox_used_for_cropping, [[2, 4], [1, 2], [1, 3]]);
        assert_eq!(p.shape_after_cropping_and_before_resampling, [2, 1, 2]);
        assert_eq!(case.seg.unwrap().shape(), &[1, 2, 1, 2]);
    }

    #[test]
    fn crop_raw_names_what_does_not_fit() {
        let image = || Array3::<f32>::ones((2, 3, 4));
        let message = |result: Result<StoredCase, PreprocessError>| result.err().map(|e| e.to_string());
        let no_channels = message(crop_raw(raw(vec![], None), [0, 1, 2]));
        assert_eq!(no_channels.as_deref(), Some("no image channels"));
        let channels = message(crop_raw(
            raw(vec![image(), Array3::ones((2, 3, 5))], None),
            [0, 1, 2],
        ));
        assert_eq!(
            channels.as_deref(),
            Some("channel 1 differs in shape from channel 0")
        );
        let label = message(crop_raw(
            raw(vec![image()], Some(Array3::zeros((2, 3, 5)))),
            [0, 1, 2],
        ));
        assert_eq!(
            label.as_deref(),
            Some("label shape [2, 3, 5] differs from image shape [2, 3, 4]")
        );
    }
}
