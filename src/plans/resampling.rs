//! How a plan resamples: the keyword arguments plans.json gives nnU-Net's resampling function, and
//! the options they resolve to (nnU-Net's defaults where one is absent).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A case is anisotropic when its largest spacing exceeds its smallest by more than this factor
/// (nnU-Net's `ANISO_THRESHOLD`).
pub const ANISO_THRESHOLD: f64 = 3.0;

/// How `resample_*_to_shape` interpolates; the constructors give nnU-Net's defaults from the plans.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResampleOptions {
    /// Spline order in-plane (or in 3D when not resampling z separately).
    pub order: usize,
    /// Spline order along the low-resolution axis when resampling it separately.
    pub order_z: usize,
    /// `Some(true)`/`Some(false)` forces the decision; `None` decides from the spacings.
    pub force_separate_z: Option<bool>,
    /// Spacing ratio above which a case counts as anisotropic.
    pub anisotropy_threshold: f64,
}

impl ResampleOptions {
    /// `resampling_fn_data_kwargs`: order 3, order_z 0.
    pub fn data() -> Self {
        Self {
            order: 3,
            order_z: 0,
            force_separate_z: None,
            anisotropy_threshold: ANISO_THRESHOLD,
        }
    }

    /// `resampling_fn_seg_kwargs`: order 1, order_z 0.
    pub fn seg() -> Self {
        Self {
            order: 1,
            ..Self::data()
        }
    }

    /// `resampling_fn_probabilities_kwargs` (logits at export): order 1, order_z 0.
    pub fn probabilities() -> Self {
        Self {
            order: 1,
            ..Self::data()
        }
    }
}

/// The keyword arguments of `resample_data_or_seg_to_shape` (`resampling_fn_*_kwargs`). The
/// function names beside them (`resampling_fn_data`, ...) are kept but not checked: nnflow
/// implements only that function.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResamplingKwargs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_seg: Option<bool>,
    /// Spline order in-plane (or in 3D when z is not resampled separately).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<usize>,
    /// Spline order along the low-resolution axis when it is resampled separately.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_z: Option<usize>,
    /// `null` (nnU-Net writes it) decides from the spacings; absent means the same and is written
    /// back as `null`.
    #[serde(default)]
    pub force_separate_z: Option<bool>,
    /// Spacing ratio above which a case counts as anisotropic (nnU-Net's default 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub separate_z_anisotropy_threshold: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ResamplingKwargs {
    /// The resampling these arguments ask for; `default` (nnU-Net's function defaults for this
    /// use) where one is absent.
    pub fn options(kwargs: Option<&ResamplingKwargs>, default: ResampleOptions) -> ResampleOptions {
        let Some(kwargs) = kwargs else {
            return default;
        };
        ResampleOptions {
            order: kwargs.order.unwrap_or(default.order),
            order_z: kwargs.order_z.unwrap_or(default.order_z),
            force_separate_z: kwargs.force_separate_z,
            anisotropy_threshold: kwargs
                .separate_z_anisotropy_threshold
                .unwrap_or(default.anisotropy_threshold),
        }
    }
}
