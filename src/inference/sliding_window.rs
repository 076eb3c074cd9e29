//! Sliding-window prediction over a whole image, as nnU-Net v2's
//! `nnUNetPredictor.predict_sliding_window_return_logits`, minus the network.
//!
//! The image is zero-padded up to the patch where it is smaller, covered by overlapping windows in
//! nnU-Net's order, each window's prediction is weighted by a Gaussian that trusts patch centres
//! more than borders, and the weighted sum is divided by the summed weights before the padding is cut
//! away. The network (and mirroring test-time augmentation, which lives inside nnU-Net's per-patch
//! call too) is the caller's closure.

mod accumulator;
mod gaussian;
mod precision;
mod tiling;

use ndarray::{Array4, ArrayView4};

pub use accumulator::{Accumulator, InfiniteLogits};
pub use gaussian::{gaussian_importance_map, gaussian_importance_map_in, SIGMA_SCALE, VALUE_SCALING_FACTOR};
pub use precision::{round_to_f16, Precision};
pub use tiling::{compute_steps, is_2d_patch, pad_to_patch, sliding_window_slicers, Padding, Slicer};

/// nnU-Net's default `tile_step_size`: windows overlap by half a patch.
pub const DEFAULT_STEP_SIZE: f64 = 0.5;

/// Why a sliding-window prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum SlidingWindowError<E> {
    /// The caller's patch predictor failed.
    #[error("patch prediction failed: {0}")]
    Predict(#[source] E),
    #[error("patch predictor returned shape {got:?}, expected {expected:?}")]
    PredictionShape { expected: [usize; 4], got: Vec<usize> },
    #[error("invalid sliding-window settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Infinite(#[from] InfiniteLogits),
}

/// Settings of a sliding-window prediction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlidingWindow {
    /// (z, y, x) patch; `[1, y, x]` runs a 2-D configuration slice by slice (see [`is_2d_patch`]).
    pub patch: [usize; 3],
    /// Largest step as a fraction of the patch, in (0, 1].
    pub step_size: f64,
    /// Gaussian weighting (nnU-Net's default) or plain averaging.
    pub use_gaussian: bool,
    /// Accumulation precision; [`Precision::Half`] reproduces nnU-Net 2.8.1's float16 buffers.
    pub precision: Precision,
}

impl SlidingWindow {
    /// nnU-Net's inference defaults (step 0.5, Gaussian on) with float32 accumulation.
    pub fn new(patch: [usize; 3]) -> Self {
        SlidingWindow {
            patch,
            step_size: DEFAULT_STEP_SIZE,
            use_gaussian: true,
            precision: Precision::Single,
        }
    }

    fn validate<E>(&self, image: &ArrayView4<f32>, num_classes: usize) -> Result<(), SlidingWindowError<E>> {
        let bad = |msg: String| Err(SlidingWindowError::Settings(msg));
        if self.patch.contains(&0) {
            return bad(format!("patch {:?} has an empty axis", self.patch));
        }
        if !(self.step_size > 0.0 && self.step_size <= 1.0) {
            return bad(format!("step_size {} outside (0, 1]", self.step_size));
        }
        if num_classes == 0 || image.shape().contains(&0) {
            return bad(format!(
                "empty input {:?} or no classes ({num_classes})",
                image.shape()
            ));
        }
        Ok(())
    }

    /// Averaged logits (classes, z, y, x) for a (channels, z, y, x) image.
    ///
    /// `predict_patch` receives one window, (channels, patch z, patch y, patch x) — for 2-D patches
    /// (channels, 1, y, x) — as a strided view into the (padded) image, and must return the logits
    /// (num_classes, same spatial shape). Windows arrive in nnU-Net's order; each is requested once.
    pub fn predict<E, F>(
        &self,
        image: ArrayView4<f32>,
        num_classes: usize,
        mut predict_patch: F,
    ) -> Result<Array4<f32>, SlidingWindowError<E>>
    where
        F: FnMut(ArrayView4<f32>) -> Result<Array4<f32>, E>,
    {
        self.validate(&image, num_classes)?;
        let (padded, padding) = pad_to_patch(image, self.patch);
        let spatial = [padded.shape()[1], padded.shape()[2], padded.shape()[3]];
        let slicers = sliding_window_slicers(spatial, self.patch, self.step_size);
        let mut accumulator = Accumulator::new(
            num_classes,
            spatial,
            self.patch,
            self.use_gaussian,
            self.precision,
        );
        let expected = [num_classes, self.patch[0], self.patch[1], self.patch[2]];
        for slicer in &slicers {
            let prediction =
                predict_patch(padded.slice(slicer.channels_slice())).map_err(SlidingWindowError::Predict)?;
            if prediction.shape() != expected {
                return Err(SlidingWindowError::PredictionShape {
                    expected,
                    got: prediction.shape().to_vec(),
                });
            }
            accumulator.add(slicer, prediction.view());
        }
        let logits = accumulator.finish()?;
        Ok(if padding.is_none() {
            logits
        } else {
            padding.unpad(logits.view()).to_owned()
        })
    }
}

/// [`SlidingWindow::predict`] with float32 accumulation: `patch`, `step_size` and `use_gaussian` as
/// nnU-Net's `configuration_manager.patch_size` (2-D as `[1, y, x]`), `tile_step_size` and
/// `use_gaussian`.
pub fn predict_sliding_window<E, F>(
    image: ArrayView4<f32>,
    patch: [usize; 3],
    step_size: f64,
    num_classes: usize,
    use_gaussian: bool,
    predict_patch: F,
) -> Result<Array4<f32>, SlidingWindowError<E>>
where
    F: FnMut(ArrayView4<f32>) -> Result<Array4<f32>, E>,
{
    let settings = SlidingWindow {
        patch,
        step_size,
        use_gaussian,
        precision: Precision::Single,
    };
    settings.predict(image, num_classes, predict_patch)
}
