//! nnU-Net's trainer. Plain-data parts ([`params`], [`splits`], [`sampler`], [`data`],
//! [`progress_plot`]) are usable anywhere; the libtorch parts ([`loss`], [`optim`], [`checkpoint`],
//! [`trainer`]) run only inside the `nnflow-torch` worker.

pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod optim;
pub mod params;
pub mod progress_plot;
pub mod sampler;
pub mod splits;
pub mod trainer;
