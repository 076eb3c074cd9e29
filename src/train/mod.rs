//! nnU-Net's trainer, the parts without libtorch: parameters, splits, patch sampling, batches,
//! the job format, the run's setup, the progress it reports, the progress plot and the resume checkpoints' bookkeeping.
//! The libtorch parts (network, loss, optimizer, checkpoints, the training loop) are modules of
//! the `nnflow-torch` worker binary.

pub mod case_reader;
pub mod data;
mod error;
pub mod job;
pub mod params;
pub mod previous_stage;
pub mod progress;
pub mod progress_plot;
pub mod resume;
pub mod sampler;
pub mod setup;
pub mod splits;

pub use error::TrainError;
