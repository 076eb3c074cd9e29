//! Child processes of stages: started in their own process group, killed with nnflow, and
//! terminated (SIGTERM, then SIGKILL) when the run is interrupted.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::StageContext;

/// Why a stage's child process did not run to success; `what` names it ("training", "command").
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot create log {}: {source}", log.display())]
    CreateLog { log: PathBuf, source: io::Error },
    /// The log's second handle (for stderr).
    #[error("{source}")]
    ShareLog { log: PathBuf, source: io::Error },
    #[error("cannot start {what}: {source}")]
    Start { what: String, source: io::Error },
    #[error("{source}")]
    Wait { what: String, source: io::Error },
    #[error("{what} failed ({status})")]
    Failed { what: String, status: ExitStatus },
    #[error("interrupted")]
    Interrupted { what: String },
}

/// Sends the command's output to the stage log, sets the thread and GPU environment, and runs it
/// to completion (or until the run is cancelled).
pub fn run_logged(command: Command, ctx: &StageContext, what: &str) -> Result<(), ProcessError> {
    run_logged_polling(command, ctx, what, || {})
}

/// As [`run_logged`], calling `poll` about twice a second while the child runs (to report its
/// progress).
pub fn run_logged_polling(
    mut command: Command,
    ctx: &StageContext,
    what: &str,
    poll: impl FnMut(),
) -> Result<(), ProcessError> {
    let log = File::create(ctx.log_file).map_err(|source| ProcessError::CreateLog {
        log: ctx.log_file.to_path_buf(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| ProcessError::ShareLog {
        log: ctx.log_file.to_path_buf(),
        source,
    })?;
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .env("NNFLOW_THREADS", ctx.threads.to_string())
        .env("OMP_NUM_THREADS", ctx.threads.to_string())
        .process_group(0);
    if !ctx.gpus.is_empty() {
        let devices: Vec<String> = ctx.gpus.iter().map(|g| g.to_string()).collect();
        command.env("CUDA_VISIBLE_DEVICES", devices.join(","));
    }
    // SAFETY: prctl is async-signal-safe. It makes the child die with nnflow, so a killed run
    // leaves nothing writing into outputs behind it.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| ProcessError::Start {
        what: what.to_string(),
        source,
    })?;
    wait_or_cancel(child, ctx, what, poll)
}

/// Waits for the child; on cancellation terminates its whole process group. Polls quickly at
/// first (most commands are short) and backs off to 20 ms.
fn wait_or_cancel(
    mut child: Child,
    ctx: &StageContext,
    what: &str,
    mut poll: impl FnMut(),
) -> Result<(), ProcessError> {
    let mut pause = Duration::from_millis(1);
    let mut last_poll = std::time::Instant::now();
    loop {
        if last_poll.elapsed() >= Duration::from_millis(500) {
            poll();
            last_poll = std::time::Instant::now();
        }
        let finished = child.try_wait().map_err(|source| ProcessError::Wait {
            what: what.to_string(),
            source,
        })?;
        if let Some(status) = finished {
            return if status.success() {
                Ok(())
            } else {
                Err(ProcessError::Failed {
                    what: what.to_string(),
                    status,
                })
            };
        }
        if ctx.cancel.load(Ordering::SeqCst) {
            let group = child.id() as i32;
            // SAFETY: plain signal delivery to the process group we created.
            unsafe { libc::kill(-group, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(200));
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            return Err(ProcessError::Interrupted {
                what: what.to_string(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
