//! Evaluation of predictions against references: nnU-Net's metrics and summary. Pure functions on
//! label maps; the `evaluate` stage (reading files, writing summary.json) builds on them.

pub mod ensemble;
pub mod folder;
pub mod metrics;
pub mod postprocess;
