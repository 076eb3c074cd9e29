//! nnflow: nnU-Net as a declarative pipeline engine with a content-addressed cache. The layers,
//! from the bottom up; each uses only the layers below it (README, "How the code is organised").
//!
//! - [`atomic_file`], [`file_error`], [`json_numbers`], [`errln!`]: writing files whole; the error
//!   naming the file; NaN in the JSON files stages pass on; printing that survives a closed pipe.
//! - [`engine`]: pipeline format, DAG, cache keys, cache, local and Slurm execution, and the
//!   [`engine::stage::Stage`] trait stages plug in through. It knows nothing of images, nnU-Net or
//!   libtorch (`tests/layers.rs` checks its imports).
//! - [`data`]: NIfTI and `.npy` files, datasets in nnU-Net's layout, geometry, integrity checks.
//! - [`kernels`]: numeric kernels several numeric layers share (connected components).
//! - [`plans`]: plans.json (nnU-Net's experiment plan) as types.
//! - [`preprocess`], [`augment`], [`evaluate`]: nnU-Net's fingerprint, planning and preprocessing;
//!   its training augmentations; metrics, ensembling and postprocessing: pure functions on
//!   arrays, tested against nnU-Net's numbers.
//! - [`torch_env`]: where libtorch and CUDA are at run time, and the device choice (no tch here).
//! - [`network`], [`train`], [`inference`]: the torch-free side of the model: architectures from
//!   plans and nnU-Net's `.pth` checkpoints, training jobs, sampling, splits, resume checkpoints and
//!   progress plots, trained models as users have them, prediction jobs, sliding-window tiles and
//!   export. The libtorch code itself is the `nnflow-torch` worker
//!   binary (`src/bin/nnflow-torch/`), so the `nnflow` binary never links libtorch.
//! - [`stages`]: nnU-Net's stage kinds and their registry.
//! - [`cli`], [`schema`]: the `nnflow` command line, which hands the engine the registry of stage
//!   kinds; the JSON schema of pipeline files.

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
pub mod file_error;
pub mod inference;
pub mod json_numbers;
pub mod json_sorted;
pub mod kernels;
pub mod network;
pub mod plans;
pub mod preprocess;
pub mod report;
pub mod schema;
pub mod stages;
pub mod torch_env;
pub mod train;
