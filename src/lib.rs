//! nnflow: nnU-Net as a declarative pipeline engine with a content-addressed cache.
//!
//! - [`engine`]: pipeline format, DAG, cache keys, cache, execution (knows nothing of images).
//! - [`stages`]: stage kinds plugged into the engine through one trait and a registry.
//! - [`data`], [`preprocess`], [`augment`]: NIfTI and datasets, nnU-Net's preprocessing and its
//!   training augmentations, as pure functions on arrays.
//! - [`cli`]: the `nnflow` command line.
//! - [`torch_env`]: libtorch and CUDA at run time.

pub mod atomic_file;
pub mod augment;
pub mod cli;
pub mod data;
pub mod engine;
pub mod evaluate;
pub mod inference;
pub mod network;
pub mod preprocess;
pub mod schema;
pub mod stages;
pub mod torch_env;
pub mod train;
