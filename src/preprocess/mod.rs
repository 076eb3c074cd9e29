//! nnU-Net's preprocessing as pure functions on arrays: cropping, the dataset fingerprint,
//! experiment planning, normalization and resampling. Knows neither the engine nor tch; the
//! stage kinds in `crate::stages` call these.

pub mod case_steps;
pub mod class_locations;
pub mod crop;
pub mod fingerprint;
pub mod fingerprint_format;
pub mod normalize;
pub mod numpy_random;
pub mod plan;
pub mod resample;
pub mod topology;
