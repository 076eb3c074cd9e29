//! What the engine knows about libtorch: its version, the facts the `nnflow-torch` worker
//! reports, and the device that training and inference ask the worker for. No tch call lives here:
//! code reachable from the `nnflow` binary must not pull libtorch in (its static initialisers cost
//! about 0.25 s per start and would dominate no-op runs).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// libtorch version nnflow is built against (tch 0.24 supports exactly this one).
pub const LIBTORCH_VERSION: &str = "2.11.0";

/// Where training runs.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, Copy, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is visible, else CPU.
    #[default]
    Auto,
    Cpu,
    /// Fails clearly when no CUDA device is usable.
    Cuda,
}

/// The libtorch facts `nnflow doctor` prints.
#[derive(Serialize, Deserialize, Debug)]
pub struct Doctor {
    pub nnflow_version: String,
    pub libtorch_version: String,
    pub libtorch_cuda_loaded: bool,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub gpu_count: usize,
    pub torch_threads: i32,
    pub torch_interop_threads: i32,
}

/// The `nnflow-torch` worker: `$NNFLOW_TORCH` when set, else the binary next to the running one.
pub fn worker_path() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("NNFLOW_TORCH") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.with_file_name("nnflow-torch")
}

/// Why the worker could not tell the libtorch facts; each names the worker binary.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start {}: {source}", worker.display())]
    Start {
        worker: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The worker ran and failed; `stderr` is what it printed.
    #[error("{} failed: {stderr}", worker.display())]
    Failed {
        worker: std::path::PathBuf,
        stderr: String,
    },
    #[error("unreadable answer from {}: {source}", worker.display())]
    Answer {
        worker: std::path::PathBuf,
        source: serde_json::Error,
    },
}

/// Asks the worker for the libtorch facts (CUDA, GPU count, threads).
pub fn query_worker() -> Result<Doctor, WorkerError> {
    let worker = worker_path();
    let output = match std::process::Command::new(&worker).arg("doctor").output() {
        Ok(output) => output,
        Err(source) => return Err(WorkerError::Start { worker, source }),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        return Err(WorkerError::Failed { worker, stderr });
    }
    serde_json::from_slice(&output.stdout).map_err(|source| WorkerError::Answer { worker, source })
}
