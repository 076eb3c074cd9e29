//! nnU-Net's trainer, the parts without libtorch: parameters, splits, patch sampling, batches,
//! the job format and the progress plot. The libtorch parts (network, loss, optimizer,
//! checkpoints, the training loop) are modules of the `nnflow-torch` worker binary.

pub mod data;
pub mod job;
pub mod params;
pub mod previous_stage;
pub mod progress_plot;
pub mod sampler;
pub mod splits;
