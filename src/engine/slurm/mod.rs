//! The Slurm executor: the same pipeline, with its stage instances run as Slurm jobs. What is
//! fresh is decided here as for a local run, and only the rest is submitted: one job array per
//! stage (per dependency level, so a stage whose instances depend on each other, like the cascade's
//! trainings, gets one array per level), each waiting on its upstream jobs with
//! `--dependency=afterok:...` and `--kill-on-invalid-dep=yes` so a failure cancels its descendants.
//! All jobs of a run share one job name. Each job runs `nnflow slurm-job` on its node, which
//! computes the stage key there, restores from the shared cache or runs the stage, and writes a
//! receipt ([`job`]). Attached runs poll `squeue` and the receipts with backoff and report like a
//! local run; `--detach` returns after submission, and `nnflow status` / `nnflow cancel` find the
//! run again.

mod error;
pub mod job;
pub mod options;
pub mod scheduler;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use self::error::{SlurmError, SubmitError};
use self::scheduler::{is_finished, sbatch, scancel, squeue, with_retries, JobState};
use self::state::{RunDir, SlurmRun, Submitted};
use super::executor::{selection, Outcome, RunOptions, RunReport};
use super::run_record::{Finished, Ledger};
use super::status::{self, State};
use super::{Engine, FsError, Operation};
use crate::file_error::FileError;

/// What `nnflow run --executor slurm` needs besides the local options.
pub struct SlurmRunOptions {
    /// Submit and return.
    pub detach: bool,
    /// The `--set` arguments, repeated for every job so it loads the same pipeline.
    pub sets: Vec<String>,
    /// Environment variables the jobs get besides this process's own (the remote cache the
    /// command line chose: kept out of job scripts, which would write a URL's credentials down).
    pub env: Vec<(String, String)>,
}

/// An attached run's report, or the submission of a detached one.
pub enum SlurmOutcome {
    Finished(RunReport),
    Detached(SlurmRun),
}

/// sbatch is tried this many times when the controller is busy or unreachable.
const SUBMIT_ATTEMPTS: usize = 5;

pub fn run(
    engine: &Engine,
    options: &RunOptions,
    slurm: &SlurmRunOptions,
    cancel: &AtomicBool,
) -> Result<SlurmOutcome, SlurmError> {
    let (selected, forced) = selection(engine, options)?;
    let mut ledger = Ledger::new(engine, selected.len(), options.quiet);
    // What is up to date needs no job; its descendants' jobs read its records.
    let states: HashMap<String, (State, Vec<String>)> = status::status(engine, &options.targets)?
        .into_iter()
        .map(|s| (s.id, (s.state, s.reasons)))
        .collect();
    let mut pending = Vec::new();
    for &index in &selected {
        let id = &engine.pipeline.instances[index].id;
        let upstream_pending = engine
            .dag
            .dependencies(index)
            .into_iter()
            .any(|d| pending.contains(&d));
        let outcome = match states.get(id) {
            _ if forced.contains(&index) || upstream_pending => None,
            Some((State::Fresh, _)) => Some((Outcome::Cached, None)),
            Some((State::Skipped, reasons)) => Some((Outcome::NotApplicable, reasons.first().cloned())),
            _ => None,
        };
        match outcome {
            Some((outcome, error)) => ledger.settle(index, outcome, error),
            None => pending.push(index),
        }
    }
    if pending.is_empty() {
        return Ok(SlurmOutcome::Finished(ledger.conclude(&selected, false)));
    }

    let run_id = format!("{}-{}", job::now_unix(), std::process::id());
    let run_dir = RunDir::new(&engine.pipeline.state_dir, &run_id);
    for folder in [run_dir.logs(), run_dir.scripts(), run_dir.0.join("receipts")] {
        std::fs::create_dir_all(&folder).map_err(FsError::on(Operation::Create, &folder))?;
    }
    let forced_ids: Vec<&str> = pending
        .iter()
        .filter(|i| forced.contains(i))
        .map(|&i| engine.pipeline.instances[i].id.as_str())
        .collect();
    std::fs::write(run_dir.forced_list(), forced_ids.join("\n"))
        .map_err(FileError::io(&run_dir.forced_list()))?;
    let job_name = format!("nnflow.{}.{run_id}", engine.pipeline.name);
    check_shared_filesystem(engine, &run_dir, &job_name)?;
    let run = submit(engine, &pending, &run_dir, &job_name, &run_id, slurm)?;
    run_dir.save(&engine.pipeline.state_dir, &run)?;
    if !options.quiet {
        crate::errln!(
            "submitted {} instance(s) as {} job array(s) named {job_name}",
            pending.len(),
            run.jobs.len()
        );
    }
    if slurm.detach {
        ledger.progress.finish();
        return Ok(SlurmOutcome::Detached(run));
    }
    let interrupted = wait(engine, &run, &run_dir, &pending, &mut ledger, cancel)?;
    Ok(SlurmOutcome::Finished(ledger.conclude(&selected, interrupted)))
}

/// Submits the pending instances, upstream first: one job array per (dependency level, stage).
fn submit(
    engine: &Engine,
    pending: &[usize],
    run_dir: &RunDir,
    job_name: &str,
    run_id: &str,
    slurm: &SlurmRunOptions,
) -> Result<SlurmRun, SlurmError> {
    let instances = &engine.pipeline.instances;
    // level: the longest chain of pending upstream instances; arrays of one level never wait on
    // each other, so the groups can be submitted level by level
    let mut level: HashMap<usize, usize> = HashMap::new();
    for &index in pending {
        let own = engine
            .dag
            .dependencies(index)
            .into_iter()
            .filter_map(|d| level.get(&d).map(|l| l + 1))
            .max()
            .unwrap_or(0);
        level.insert(index, own);
    }
    let mut groups: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for &index in pending {
        let key = (level[&index], instances[index].stage.as_str());
        groups.entry(key).or_default().push(index);
    }
    let exe = std::env::current_exe().map_err(SlurmError::NoBinary)?;
    let pipeline_file = absolute(&engine.pipeline.file);
    let mut job_of: HashMap<usize, String> = HashMap::new();
    let mut jobs = Vec::new();
    for (number, members) in groups.values().enumerate() {
        let first = &instances[members[0]];
        let ids: Vec<String> = members.iter().map(|&i| instances[i].id.clone()).collect();
        let ids_file = run_dir.scripts().join(format!("{number}-{}.ids", first.stage));
        std::fs::write(&ids_file, ids.join("\n") + "\n").map_err(FileError::io(&ids_file))?;
        let script = run_dir.scripts().join(format!("{number}-{}.sh", first.stage));
        let mut command = vec![
            exe.to_string_lossy().into_owned(),
            "slurm-job".into(),
            pipeline_file.to_string_lossy().into_owned(),
            "--run-dir".into(),
            run_dir.0.to_string_lossy().into_owned(),
            "--ids".into(),
            ids_file.to_string_lossy().into_owned(),
        ];
        for set in &slurm.sets {
            command.push("--set".into());
            command.push(set.clone());
        }
        let text = format!(
            "#!/bin/bash\n# nnflow run {run_id}: {} instance(s) of stage {}\ncd {}\nexec {}\n",
            ids.len(),
            first.stage,
            shell_quote(&engine.pipeline.root.to_string_lossy()),
            command
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        std::fs::write(&script, text).map_err(FileError::io(&script))?;
        let mut upstream: Vec<String> = members
            .iter()
            .flat_map(|&i| engine.dag.dependencies(i))
            .filter_map(|d| job_of.get(&d).cloned())
            .collect();
        upstream.sort();
        upstream.dedup();
        let settings = engine.pipeline.slurm.with(&first.slurm);
        let mut args = vec![
            format!("--job-name={job_name}"),
            format!("--array=0-{}", ids.len() - 1),
            format!(
                "--output={}",
                run_dir
                    .logs()
                    .join(format!("{number}-{}-%a.out", first.stage))
                    .display()
            ),
            "--kill-on-invalid-dep=yes".into(),
        ];
        if !upstream.is_empty() {
            args.push(format!("--dependency=afterok:{}", upstream.join(":")));
        }
        args.extend(settings.sbatch_args(first.threads, first.gpus));
        args.push(script.to_string_lossy().into_owned());
        let job_id = with_retries(SUBMIT_ATTEMPTS, || sbatch(&args, &slurm.env), std::thread::sleep)
            .map_err(|source| SlurmError::Submit {
                stage: first.stage.clone(),
                source,
            })?;
        for &i in members {
            job_of.insert(i, job_id.clone());
        }
        jobs.push(Submitted {
            job_id,
            stage: first.stage.clone(),
            instances: ids,
        });
    }
    Ok(SlurmRun {
        run_id: run_id.to_string(),
        job_name: job_name.to_string(),
        submitted_unix: job::now_unix(),
        jobs,
    })
}

/// Polls receipts and `squeue` until every submitted instance has ended; returns whether the run
/// was interrupted (its jobs are then cancelled).
fn wait(
    engine: &Engine,
    run: &SlurmRun,
    run_dir: &RunDir,
    pending: &[usize],
    ledger: &mut Ledger,
    cancel: &AtomicBool,
) -> Result<bool, SlurmError> {
    let task_of: HashMap<usize, String> = pending
        .iter()
        .map(|&i| {
            let id = &engine.pipeline.instances[i].id;
            let task = run.jobs.iter().find_map(|j| j.task_id(id)).expect("submitted");
            (i, task)
        })
        .collect();
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    let mut unseen: HashMap<usize, usize> = HashMap::new();
    for &index in pending {
        ledger.progress.started(&engine.pipeline.instances[index].id);
    }
    loop {
        if cancel.load(Ordering::SeqCst) {
            let ids: Vec<String> = run.jobs.iter().map(|j| j.job_id.clone()).collect();
            scancel(&ids)?;
            return Ok(true);
        }
        let queue = squeue(&run.job_name).unwrap_or_else(|e| {
            crate::errln!("warning: {e}");
            HashMap::new()
        });
        let mut changed = false;
        for &index in pending {
            if ledger.get(index).is_some() {
                continue;
            }
            let id = &engine.pipeline.instances[index].id;
            let ended = match run_dir.receipt(id) {
                Some(receipt) => {
                    // what Slurm says about a stopped job (TIMEOUT, CANCELLED) completes the story
                    let slurm_state = queue
                        .get(&task_of[&index])
                        .filter(|j| receipt.outcome == state::JobOutcome::Failed && is_finished(&j.state))
                        .map(|j| format!(" (Slurm: {})", j.state));
                    let error = receipt.error.map(|e| e + slurm_state.as_deref().unwrap_or(""));
                    Some((receipt.outcome.into(), receipt.seconds, error))
                }
                None => {
                    let upstream_failed = ledger.upstream_not_completed(index);
                    let misses = unseen.entry(index).or_default();
                    without_receipt(queue.get(&task_of[&index]), misses).map(|reason| match upstream_failed {
                        Some(upstream) => (Outcome::Skipped, 0.0, Some(upstream)),
                        None => (
                            Outcome::Failed,
                            started.elapsed().as_secs_f64(),
                            Some(format!("Slurm job {}: {reason}", task_of[&index])),
                        ),
                    })
                }
            };
            if let Some((outcome, seconds, error)) = ended {
                ledger.record(Finished {
                    index,
                    outcome,
                    restored: None,
                    done: None,
                    seconds,
                    error,
                });
                changed = true;
            }
        }
        if pending.iter().all(|&i| ledger.get(i).is_some()) {
            return Ok(false);
        }
        // poll quickly while things happen, then back off to a few seconds
        delay = if changed {
            Duration::from_millis(200)
        } else {
            (delay * 3 / 2).min(Duration::from_secs(5))
        };
        let until = Instant::now() + delay;
        while Instant::now() < until && !cancel.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Why a job without a receipt has ended, or `None` while it may still write one. `misses` counts
/// polls that did not find the job at all.
fn without_receipt(job: Option<&JobState>, misses: &mut usize) -> Option<String> {
    match job {
        Some(job) if !is_finished(&job.state) => None,
        Some(job) => Some(match job.state.as_str() {
            "TIMEOUT" => "killed by Slurm at its time limit (TIMEOUT)".to_string(),
            "OUT_OF_MEMORY" => "killed by Slurm: out of memory".to_string(),
            "CANCELLED" => format!("cancelled ({})", job.reason),
            state => format!("ended {state} ({}) without a receipt; see its log", job.reason),
        }),
        None => {
            // a job leaves squeue after MinJobAge; give a just-written receipt time to appear
            *misses += 1;
            (*misses >= 3).then(|| "left the queue without a receipt; see its log".to_string())
        }
    }
}

/// Makes sure the compute nodes see the work directory, the cache and the nnflow binary: a
/// one-second job looks for a token written here.
fn check_shared_filesystem(engine: &Engine, run_dir: &RunDir, job_name: &str) -> Result<(), SlurmError> {
    let token = run_dir.0.join("probe-token");
    std::fs::write(&token, job_name).map_err(FileError::io(&token))?;
    let cache_token = engine.pipeline.cache_dir.join(format!(".probe-{job_name}"));
    std::fs::create_dir_all(&engine.pipeline.cache_dir)
        .and_then(|()| std::fs::write(&cache_token, job_name))
        .map_err(FileError::io(&cache_token))?;
    let exe = std::env::current_exe().map_err(SlurmError::NoBinary)?;
    let script = format!(
        "test -f {t} || {{ echo 'work directory {w} not visible'; exit 1; }}; \
         test -f {c} || {{ echo 'cache {cd} not visible'; exit 1; }}; \
         test -x {e} || {{ echo 'nnflow binary {e} not visible'; exit 1; }}",
        t = shell_quote(&token.to_string_lossy()),
        w = engine.pipeline.work_dir.display(),
        c = shell_quote(&cache_token.to_string_lossy()),
        cd = engine.pipeline.cache_dir.display(),
        e = shell_quote(&exe.to_string_lossy()),
    );
    let output = run_dir.logs().join("probe.out");
    let mut args = vec![
        "--wait".to_string(),
        format!("--job-name={job_name}"),
        format!("--output={}", output.display()),
        "--time=5".into(),
    ];
    args.extend(engine.pipeline.slurm.sbatch_args(1, 0));
    args.push(format!("--wrap={script}"));
    let result = with_retries(SUBMIT_ATTEMPTS, || sbatch(&args, &[]), std::thread::sleep);
    let _ = std::fs::remove_file(&cache_token);
    result.map(|_| ()).map_err(|source| {
        let said = std::fs::read_to_string(&output).unwrap_or_default();
        let said = if said.trim().is_empty() {
            String::new()
        } else {
            format!("{}; ", said.trim())
        };
        SlurmError::NotShared {
            said,
            source,
            work_dir: engine.pipeline.work_dir.clone(),
            cache_dir: engine.pipeline.cache_dir.clone(),
        }
    })
}

/// An instance of a Slurm run as `nnflow status` shows it: id, state, Slurm task id.
pub type InstanceState = (String, String, String);

/// The state of each instance of the latest Slurm run (for `nnflow status`): queued, running, done
/// or failed, with its Slurm task id.
pub fn reconcile(engine: &Engine) -> Option<(SlurmRun, Vec<InstanceState>)> {
    let (run_dir, run) = RunDir::latest(&engine.pipeline.state_dir)?;
    let queue = squeue(&run.job_name).unwrap_or_default();
    let mut rows = Vec::new();
    for job in &run.jobs {
        for (task, id) in job.instances.iter().enumerate() {
            let task_id = format!("{}_{task}", job.job_id);
            let state = match (run_dir.receipt(id), queue.get(&task_id)) {
                (Some(receipt), job) => match receipt.outcome {
                    state::JobOutcome::Failed => match job.filter(|j| is_finished(&j.state)) {
                        Some(job) => format!("failed ({})", job.state),
                        None => {
                            let error = receipt.error.unwrap_or_default();
                            format!("failed ({})", error.lines().next().unwrap_or_default())
                        }
                    },
                    state::JobOutcome::Skipped => "skipped".to_string(),
                    _ => "done".to_string(),
                },
                (None, Some(job)) if job.state == "PENDING" => format!("queued ({})", job.reason),
                (None, Some(job)) if !is_finished(&job.state) => "running".to_string(),
                (None, Some(job)) => format!("failed ({})", job.state),
                (None, None) => "failed (no receipt, not in the queue)".to_string(),
            };
            rows.push((id.clone(), state, task_id));
        }
    }
    Some((run, rows))
}

/// Cancels every job of the latest Slurm run; returns the run.
pub fn cancel(engine: &Engine) -> Result<SlurmRun, SlurmError> {
    let (_, run) = RunDir::latest(&engine.pipeline.state_dir).ok_or_else(|| SlurmError::NoRunToCancel {
        pipeline: engine.pipeline.name.clone(),
    })?;
    let ids: Vec<String> = run.jobs.iter().map(|j| j.job_id.clone()).collect();
    scancel(&ids)?;
    Ok(run)
}

fn absolute(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// `text` as one single-quoted shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_job_states_without_receipts() {
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
        let mut misses = 0;
        let running = JobState {
            state: "RUNNING".into(),
            reason: "None".into(),
        };
        assert_eq!(without_receipt(Some(&running), &mut misses), None);
        let timeout = JobState {
            state: "TIMEOUT".into(),
            reason: "TimeLimit".into(),
        };
        assert!(without_receipt(Some(&timeout), &mut misses)
            .unwrap()
            .contains("time limit"));
        assert_eq!(without_receipt(None, &mut misses), None);
        assert_eq!(without_receipt(None, &mut misses), None);
        assert!(without_receipt(None, &mut misses)
            .unwrap()
            .contains("left the queue"));
    }
}
