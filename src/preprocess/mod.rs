//! nnU-Net's preprocessing as pure functions on arrays: cropping, the dataset fingerprint,
//! experiment planning, normalization and resampling. Knows neither the engine nor tch; the
//! stage kinds call these. The one exception is `case_io`, which reads a raw case and plans.json
//! for the stages and hands the arrays to `case_steps`.

pub mod case_io;
pub mod case_steps;
pub mod class_locations;
pub mod crop;
mod error;
pub mod fingerprint;
pub mod normalize;
pub mod numpy_random;
pub mod plan;
pub mod plan_resenc;
pub mod plan_transfer;
pub mod resample;
pub mod topology;

pub use error::PreprocessError;

// The fingerprint's file format lives with the other dataset files, below the plans that read it.
pub use crate::data::fingerprint_format;
