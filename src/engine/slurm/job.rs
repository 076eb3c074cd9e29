//! Inside a Slurm job: `nnflow slurm-job` picks its instance (the array task's line of the ids
//! file), computes the stage key on the node (upstream outputs exist only now), restores from the
//! shared cache on a hit or runs the stage and commits it, and writes its receipt.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::state::{JobOutcome, Receipt, RunDir};
use crate::engine::instance::run_alone;
use crate::engine::Engine;

/// Runs the job's instance; returns the process exit code (0 when it ran, was fresh or restored,
/// or does not apply; 1 otherwise, which makes Slurm cancel the dependent jobs).
pub fn run_job(engine: &Engine, run_dir: &Path, ids_file: &Path, cancel: &AtomicBool) -> i32 {
    let started = Instant::now();
    let started_unix = now_unix();
    let task: usize = env_number("SLURM_ARRAY_TASK_ID").unwrap_or(0);
    let ids = std::fs::read_to_string(ids_file).unwrap_or_default();
    let Some(id) = ids.lines().nth(task).map(str::to_string) else {
        crate::errln!("error: {} has no line {task}", ids_file.display());
        return 1;
    };
    let run_dir = RunDir(run_dir.to_path_buf());
    let (outcome, error) = match engine.pipeline.instances.iter().position(|i| i.id == id) {
        Some(index) => {
            // the CPUs and GPUs Slurm gave the job (not the node's: others may share it)
            let threads = env_number("SLURM_CPUS_PER_TASK")
                .or_else(|| env_number("SLURM_CPUS_ON_NODE"))
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let gpus: Vec<usize> = std::env::var("CUDA_VISIBLE_DEVICES")
                .unwrap_or_default()
                .split(',')
                .filter_map(|g| g.trim().parse().ok())
                .collect();
            let forced = std::fs::read_to_string(run_dir.forced_list()).unwrap_or_default();
            let force = forced.lines().any(|line| line == id);
            let alone = run_alone(engine, index, force, threads as u32, &gpus, cancel);
            if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                // SIGTERM: Slurm stops the job (scancel, or its time limit)
                let stopped = "stopped by Slurm (scancel or the time limit)".to_string();
                (JobOutcome::Failed, Some(stopped))
            } else {
                (JobOutcome::from(alone.outcome), alone.error)
            }
        }
        None => (
            JobOutcome::Failed,
            Some(format!(
                "the pipeline has no stage instance `{id}` (was it changed after submission?)"
            )),
        ),
    };
    let job = match (
        std::env::var("SLURM_ARRAY_JOB_ID"),
        std::env::var("SLURM_ARRAY_TASK_ID"),
    ) {
        (Ok(job), Ok(task)) => format!("{job}_{task}"),
        _ => std::env::var("SLURM_JOB_ID").unwrap_or_default(),
    };
    let receipt = Receipt {
        id: id.clone(),
        outcome,
        seconds: started.elapsed().as_secs_f64(),
        error: error.clone(),
        job,
        host: hostname(),
        started_unix,
        finished_unix: now_unix(),
    };
    if let Err(e) = run_dir.write_receipt(&receipt) {
        crate::errln!("error: cannot write the receipt: {e}");
        return 1;
    }
    crate::errln!(
        "{id}: {outcome:?}{}",
        error.map(|e| format!(": {e}")).unwrap_or_default()
    );
    match outcome {
        JobOutcome::Ran | JobOutcome::Cached | JobOutcome::NotApplicable => 0,
        JobOutcome::Failed | JobOutcome::Skipped => 1,
    }
}

fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
