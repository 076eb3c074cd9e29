//! What nnflow knows about libtorch at run time: loading CUDA and describing the installation.
//! The only module besides the model and training code that touches tch.

use std::sync::OnceLock;

use serde::Serialize;

/// libtorch version nnflow is built against (tch 0.24 supports exactly this one).
pub const LIBTORCH_VERSION: &str = "2.11.0";

static CUDA_LOADED: OnceLock<bool> = OnceLock::new();

/// Loads `libtorch_cuda.so` once, before any tch call, so a binary linked against the CPU-only
/// libtorch sees CUDA when a CUDA-enabled PyTorch is on the loader path. Returns whether it loaded.
pub fn load_cuda() -> bool {
    *CUDA_LOADED.get_or_init(|| {
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally leaked so the
        // library stays loaded for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        !handle.is_null()
    })
}

/// Number of CUDA devices libtorch sees (0 without CUDA).
pub fn gpu_count() -> usize {
    if load_cuda() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// The facts `nnflow doctor` prints.
#[derive(Serialize, Debug)]
pub struct Doctor {
    pub nnflow_version: &'static str,
    pub libtorch_version: &'static str,
    pub libtorch_cuda_loaded: bool,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub gpu_count: usize,
    pub cpu_cores: usize,
    pub torch_threads: i32,
    pub torch_interop_threads: i32,
    pub rayon_threads: usize,
}

pub fn doctor() -> Doctor {
    let loaded = load_cuda();
    Doctor {
        nnflow_version: env!("CARGO_PKG_VERSION"),
        libtorch_version: LIBTORCH_VERSION,
        libtorch_cuda_loaded: loaded,
        cuda_available: tch::Cuda::is_available(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        gpu_count: gpu_count(),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        torch_threads: tch::get_num_threads(),
        torch_interop_threads: tch::get_num_interop_threads(),
        rayon_threads: rayon::current_num_threads(),
    }
}
