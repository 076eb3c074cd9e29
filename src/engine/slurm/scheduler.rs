//! The Slurm commands nnflow calls: `sbatch` (retried with backoff on transient errors), `squeue`
//! (the state of every job of a run, by its shared job name) and `scancel`. The scheduler's
//! accounting (`sacct`) is not needed: jobs report through receipt files.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use super::error::SlurmError;
pub use super::error::SubmitError;

/// What `sbatch` says when the controller is busy or briefly unreachable.
const TRANSIENT: [&str; 6] = [
    "Socket timed out",
    "temporarily unavailable",
    "temporarily unable",
    "Unable to contact slurm controller",
    "Connection refused",
    "try again",
];

/// `sbatch --parsable ARGS` with `env` added to the environment the job inherits: the job id.
pub fn sbatch(args: &[String], env: &[(String, String)]) -> Result<String, SubmitError> {
    let output = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .output()
        .map_err(SubmitError::CannotRun)?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if !output.status.success() {
        return Err(if stderr.is_empty() {
            SubmitError::JobFailed(output.status)
        } else {
            let transient = TRANSIENT.iter().any(|t| stderr.contains(t));
            SubmitError::Rejected { stderr, transient }
        });
    }
    // `--parsable` prints `id` or `id;cluster`
    let stdout = String::from_utf8_lossy(&output.stdout);
    let id = stdout.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() {
        return Err(SubmitError::NoJobId { stderr });
    }
    Ok(id)
}

/// Calls `submit` until it succeeds, retrying transient failures after 1, 2, 4, ... seconds (at
/// most `attempts` calls in all).
pub fn with_retries<T>(
    attempts: usize,
    mut submit: impl FnMut() -> Result<T, SubmitError>,
    mut wait: impl FnMut(Duration),
) -> Result<T, SubmitError> {
    let mut delay = Duration::from_secs(1);
    let mut tried = 0;
    loop {
        tried += 1;
        match submit() {
            Ok(value) => return Ok(value),
            Err(e) if e.is_transient() && tried < attempts => {
                crate::errln!("warning: {e} (retrying in {} s)", delay.as_secs());
                wait(delay);
                delay *= 2;
            }
            Err(e) => return Err(e),
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
pub fn squeue(name: &str) -> Result<HashMap<String, JobState>, SlurmError> {
    let mut command = Command::new("squeue");
    command.args(["-h", "-r", "-t", "all", "--name", name, "-o", "%i|%T|%r"]);
    let stdout = run_command("squeue", command)?;
    Ok(parse_squeue(&stdout))
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
pub fn scancel(job_ids: &[String]) -> Result<(), SlurmError> {
    if job_ids.is_empty() {
        return Ok(());
    }
    let mut command = Command::new("scancel");
    command.args(job_ids);
    run_command("scancel", command).map(drop)
}

/// Runs `command` (named `name`); its standard output, or what it said on standard error.
fn run_command(name: &'static str, mut command: Command) -> Result<String, SlurmError> {
    let output = command.output().map_err(|source| SlurmError::CannotRun {
        command: name,
        source,
    })?;
    if !output.status.success() {
        return Err(SlurmError::CommandFailed {
            command: name,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
                    Err(SubmitError::Rejected {
                        stderr: "Socket timed out".into(),
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
        let result: Result<(), SubmitError> = with_retries(
            5,
            || {
                calls += 1;
                Err(SubmitError::Rejected {
                    stderr: "invalid partition".into(),
                    transient: false,
                })
            },
            |_| {},
        );
        assert_eq!(calls, 1);
        assert!(result.unwrap_err().to_string().contains("invalid partition"));

        let mut calls = 0;
        let result: Result<(), SubmitError> = with_retries(
            3,
            || {
                calls += 1;
                Err(SubmitError::Rejected {
                    stderr: "busy".into(),
                    transient: true,
                })
            },
            |_| {},
        );
        assert_eq!(calls, 3);
        assert!(result.is_err());
    }
}
