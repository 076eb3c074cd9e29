//! `nnflow-torch`: the process that runs libtorch code for `nnflow`. The engine binary does not
//! link libtorch (loading it costs a quarter of a second per start, which would dominate no-op
//! runs) and starts this worker where torch is needed. A separate process per torch stage is also
//! what lets each one see only its own GPUs through CUDA_VISIBLE_DEVICES.
//!
//! Usage: `nnflow-torch doctor` prints the libtorch facts as JSON; `nnflow-torch train JOB.json`
//! runs a training job written by the `train` stage.

use std::path::Path;
use std::sync::OnceLock;

use nnflow::torch_env::{Doctor, LIBTORCH_VERSION};

// The libtorch code lives in this binary, not in the library, so the engine binary never links
// libtorch (the linker keeps libtorch's static initialisers once any of its objects is pulled in).
mod bench;
mod blocks;
mod checkpoint;
mod held_out;
#[cfg(test)]
mod lockstep;
mod loss;
mod network;
mod optim;
mod predict;
mod predictor;
mod resenc;
mod trainer;
mod unet;

fn main() {
    // Before any tch call, so CUDA-enabled libtorch is visible when present.
    load_cuda();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("doctor") => {
            println!(
                "{}",
                serde_json::to_string_pretty(&doctor()).expect("doctor facts serialize")
            );
        }
        Some("bench-step") => {
            if let Err(error) = bench::bench_step(&args[1..]) {
                eprintln!("error: {error}");
                std::process::exit(1);
            }
        }
        Some("predict") if args.len() == 2 => {
            if let Err(error) = run_predict(&args[1]) {
                eprintln!("error: {error}");
                std::process::exit(1);
            }
        }
        Some("train") if args.len() == 2 => {
            if let Err(error) = train(&args[1]) {
                eprintln!("error: {error}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!(
                "usage: nnflow-torch doctor | train JOB.json | predict JOB.json | bench-step [options]"
            );
            std::process::exit(2);
        }
    }
}

static CUDA_LOADED: OnceLock<bool> = OnceLock::new();

/// Loads `libtorch_cuda.so` once, so a binary linked against the CPU-only libtorch sees CUDA when a
/// CUDA-enabled PyTorch is on the loader path. Returns whether it loaded.
fn load_cuda() -> bool {
    *CUDA_LOADED.get_or_init(|| {
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally leaked so the
        // library stays loaded for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        !handle.is_null()
    })
}

fn doctor() -> Doctor {
    let loaded = load_cuda();
    Doctor {
        nnflow_version: env!("CARGO_PKG_VERSION").to_string(),
        libtorch_version: LIBTORCH_VERSION.to_string(),
        libtorch_cuda_loaded: loaded,
        cuda_available: tch::Cuda::is_available(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        gpu_count: if loaded {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        },
        torch_threads: tch::get_num_threads(),
        torch_interop_threads: tch::get_num_interop_threads(),
    }
}

// The edge: any error of a job is printed (its Display) and ends the worker with status 1.
type EdgeResult = Result<(), Box<dyn std::error::Error>>;

fn train(job_file: &str) -> EdgeResult {
    let job: nnflow::train::job::TrainJob = nnflow::atomic_file::read_json(Path::new(job_file))?;
    Ok(trainer::train(&job)?)
}

fn run_predict(job_file: &str) -> EdgeResult {
    let job: nnflow::inference::job::PredictJob = nnflow::atomic_file::read_json(Path::new(job_file))?;
    Ok(predict::predict(&job)?)
}
