//! The Slurm commands nnflow calls: `sbatch` (retried with backoff on transient errors), `squeue`
//! (the state of every job of a run, by its shared job name) and `scancel`. The scheduler's
//! accounting (`sacct`) is not needed: jobs report through receipt files.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// An `sbatch` failure, and whether trying again may help.
#[derive(Debug)]
pub struct SubmitError {
    pub message: String,
    pub transient: bool,
}

/// What `sbatch` says when the controller is busy or briefly unreachable.
const TRANSIENT: [&str; 6] = [
    "Socket timed out",
    "temporarily unavailable",
    "temporarily unable",
    "Unable to contact slurm controller",
    "Connection refused",
    "try again",
];

/// `sbatch --parsable ARGS`: the job id.
pub fn sbatch(args: &[String]) -> Result<String, SubmitError> {
    let output = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .output()
        .map_err(|e| SubmitError {
            message: format!("cannot run sbatch: {e} (is Slurm installed here?)"),
            transient: false,
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if !output.status.success() {
        let transient = TRANSIENT.iter().any(|t| stderr.contains(t));
        let message = if stderr.is_empty() {
            // `--wait` passes on the job's failure without a message
            format!("sbatch: the job failed ({})", output.status)
        } else {
            format!("sbatch failed: {stderr}")
        };
        return Err(SubmitError { message, transient });
    }
    // `--parsable` prints `id` or `id;cluster`
    let stdout = String::from_utf8_lossy(&output.stdout);
    let id = stdout.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() {
        return Err(SubmitError {
            message: format!("sbatch printed no job id ({stderr})"),
            transient: false,
        });
    }
    Ok(id)
}

/// Calls `submit` until it succeeds, retrying transient failures after 1, 2, 4, ... seconds (at
/// most `attempts` calls in all).
pub fn with_retries<T>(
    attempts: usize,
    mut submit: impl FnMut() -> Result<T, SubmitError>,
    mut wait: impl FnMut(Duration),
) -> Result<T, String> {
    let mut delay = Duration::from_secs(1);
    let mut tried = 0;
    loop {
        tried += 1;
        match submit() {
            Ok(value) => return Ok(value),
            Err(e) if e.transient && tried < attempts => {
                crate::errln!("warning: {} (retrying in {} s)", e.message, delay.as_secs());
                wait(delay);
                delay *= 2;
            }
            Err(e) => return Err(e.message),
        }
    }
}

/// A job (or array task) as `squeue` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobState {
    pub state: String,
    pub reason: String,
}

/// Every job and array task named `name`, finished ones included (for `MinJobAge`), by id
/// (`123` or `123_4`).
pub fn squeue(name: &str) -> Result<HashMap<String, JobState>, String> {
    let output = Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "--name", name, "-o", "%i|%T|%r"])
        .output()
        .map_err(|e| format!("cannot run squeue: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "squeue failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse_squeue(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_squeue(text: &str) -> HashMap<String, JobState> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(3, '|');
            let id = parts.next()?.to_string();
            let state = parts.next()?.to_string();
            let reason = parts.next().unwrap_or_default().to_string();
            Some((id, JobState { state, reason }))
        })
        .collect()
}

/// `scancel` of these jobs.
pub fn scancel(job_ids: &[String]) -> Result<(), String> {
    if job_ids.is_empty() {
        return Ok(());
    }
    let output = Command::new("scancel")
        .args(job_ids)
        .output()
        .map_err(|e| format!("cannot run scancel: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scancel failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Whether a job in this state will not run (any more).
pub fn is_finished(state: &str) -> bool {
    !matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "RESIZING"
            | "STAGE_OUT"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_by_job_or_task_id() {
        let jobs = parse_squeue("12_0|COMPLETED|None\n12_1|RUNNING|None\n13|PENDING|Dependency\n");
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs["12_1"].state, "RUNNING");
        assert_eq!(jobs["13"].reason, "Dependency");
        assert!(is_finished("TIMEOUT") && is_finished("CANCELLED") && !is_finished("PENDING"));
    }

    #[test]
    fn transient_failures_are_retried_with_growing_waits_and_others_are_not() {
        let mut calls = 0;
        let mut waits = Vec::new();
        let result = with_retries(
            5,
            || {
                calls += 1;
                if calls < 3 {
                    Err(SubmitError {
                        message: "sbatch failed: Socket timed out".into(),
                        transient: true,
                    })
                } else {
                    Ok("42")
                }
            },
            |d| waits.push(d.as_secs()),
        );
        assert_eq!(result.unwrap(), "42");
        assert_eq!(waits, [1, 2]);

        let mut calls = 0;
        let result: Result<(), String> = with_retries(
            5,
            || {
                calls += 1;
                Err(SubmitError {
                    message: "sbatch failed: invalid partition".into(),
                    transient: false,
                })
            },
            |_| {},
        );
        assert_eq!(calls, 1);
        assert!(result.unwrap_err().contains("invalid partition"));

        let mut calls = 0;
        let result: Result<(), String> = with_retries(
            3,
            || {
                calls += 1;
                Err(SubmitError {
                    message: "busy".into(),
                    transient: true,
                })
            },
            |_| {},
        );
        assert_eq!(calls, 3);
        assert!(result.is_err());
    }
}
