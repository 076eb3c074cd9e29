//! nnflow: nnU-Net as a declarative pipeline engine with a content-addressed cache.
//!
//! - [`engine`]: pipeline format, DAG, cache keys, cache, execution (knows nothing of images).
//! - [`stages`]: stage kinds plugged into the engine through one trait and a registry.
//! - [`data`], [`preprocess`], [`augment`]: NIfTI and datasets, nnU-Net's preprocessing and its
//!   training augmentations, as pure functions on arrays.
//! - [`cli`]: the `nnflow` command line.
//! - [`torch_env`]: libtorch and CUDA at run time.

/// `eprintln!` that survives a closed stderr (`nnflow run p.toml 2>&1 | head -1`): the line is
/// dropped instead of panicking.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod atomic_file;
pub mod augment;
pub mod cli;
pub mod data;
pub mod engine;
pub mod evaluate;
pub mod inference;
pub mod json_numbers;
pub mod network;
pub mod preprocess;
pub mod schema;
pub mod stages;
pub mod torch_env;
pub mod train;
