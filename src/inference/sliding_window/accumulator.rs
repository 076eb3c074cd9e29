//! Weighted averaging of overlapping patch predictions (the body of nnU-Net's
//! `_internal_predict_sliding_window_return_logits`).
//!
//! Kept separate from the driver so that a caller can feed it in any grouping (batches of patches, a
//! prediction thread) as long as the adds happen in window order: with float16 buffers the order of
//! the adds changes the rounding.

use ndarray::{Array3, Array4, ArrayView4, Axis, Zip};
use rayon::prelude::*;

use super::gaussian::{gaussian_importance_map_in, SIGMA_SCALE, VALUE_SCALING_FACTOR};
use super::precision::Precision;
use super::tiling::{is_2d_patch, Slicer};

/// Sums of weighted patch logits and of weights over a (z, y, x) volume.
pub struct Accumulator {
    logits: Array4<f32>,
    weights: Array3<f32>,
    /// Per-voxel patch weights; `None` means plain averaging (nnU-Net's `gaussian = 1`).
    gaussian: Option<Array3<f32>>,
    patch: [usize; 3],
    precision: Precision,
}

/// The averaged logits hold an infinity (float16 overflow, or the network produced one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "infinite value in the averaged logits (float16 accumulation overflowed or the network returned inf)"
)]
pub struct InfiniteLogits;

impl Accumulator {
    /// Zeroed buffers for `num_classes` logits over a (z, y, x) volume of `spatial` size (at least the
    /// patch on every axis). For 2-D patches (`[1, y, x]`) the Gaussian is the 2-D one, as in nnU-Net.
    pub fn new(
        num_classes: usize,
        spatial: [usize; 3],
        patch: [usize; 3],
        use_gaussian: bool,
        precision: Precision,
    ) -> Self {
        let gaussian = use_gaussian.then(|| {
            // A 2-D configuration's map is built over (y, x) alone, as nnU-Net does, rather than with a
            // singleton z axis whose constant factor would perturb the float64 rounding.
            let axes = if is_2d_patch(patch) {
                &patch[1..]
            } else {
                &patch[..]
            };
            gaussian_importance_map_in(axes, SIGMA_SCALE, VALUE_SCALING_FACTOR, precision)
                .into_shape_with_order(patch)
                .expect("same number of elements")
        });
        Accumulator {
            logits: Array4::zeros((num_classes, spatial[0], spatial[1], spatial[2])),
            weights: Array3::zeros(spatial),
            gaussian,
            patch,
            precision,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.logits.len_of(Axis(0))
    }

    /// Adds one patch prediction, (classes, patch z, patch y, patch x), at `slicer`.
    ///
    /// Per voxel, as nnU-Net: `logits += prediction * gaussian` (product in float32, sum stored at the
    /// buffer precision) and `weights += gaussian`.
    pub fn add(&mut self, slicer: &Slicer, prediction: ArrayView4<f32>) {
        let expected = [self.num_classes(), self.patch[0], self.patch[1], self.patch[2]];
        assert_eq!(prediction.shape(), &expected, "prediction shape");
        assert_eq!(slicer.size, self.patch, "slicer size must be the patch size");
        let precision = self.precision;
        let mut logits = self.logits.slice_mut(slicer.channels_slice());
        let [z, y, x] = slicer.start;
        let [dz, dy, dx] = slicer.size;
        let mut weights = self
            .weights
            .slice_mut(ndarray::s![z..z + dz, y..y + dy, x..x + dx]);
        match &self.gaussian {
            Some(g) => {
                for (mut dst, src) in logits.outer_iter_mut().zip(prediction.outer_iter()) {
                    Zip::from(&mut dst)
                        .and(&src)
                        .and(g)
                        .for_each(|l, &p, &w| *l = precision.store(*l + p * w));
                }
                Zip::from(&mut weights)
                    .and(g)
                    .for_each(|c, &w| *c = precision.store(*c + w));
            }
            None => {
                Zip::from(&mut logits)
                    .and(&prediction)
                    .for_each(|l, &p| *l = precision.store(*l + p));
                weights.mapv_inplace(|c| precision.store(c + 1.0));
            }
        }
    }

    /// Divides the logit sums by the weight sums. Fails like nnU-Net when the result holds an infinity.
    pub fn finish(self) -> Result<Array4<f32>, InfiniteLogits> {
        let Accumulator {
            mut logits,
            weights,
            precision,
            ..
        } = self;
        let weights = weights.as_standard_layout();
        let weights = weights.as_slice().expect("standard layout");
        let plane = weights.len();
        let logits_slice = logits.as_slice_mut().expect("freshly allocated, standard layout");
        let infinite = plane > 0
            && logits_slice.par_chunks_mut(plane).any(|class| {
                let mut infinite = false;
                for (l, &w) in class.iter_mut().zip(weights) {
                    *l = precision.store(*l / w);
                    infinite |= l.is_infinite();
                }
                infinite
            });
        if infinite {
            return Err(InfiniteLogits);
        }
        Ok(logits)
    }
}
