//! The `command` stage: a shell command with declared inputs, outputs, environment and parameters.
//! The escape hatch for custom steps (DICOM conversion, a report), as in DVC.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{build_typed, to_json, Kind, Stage, StageContext, StageInput};

pub const KIND: Kind = Kind {
    name: "command",
    version: 1,
    uses_torch: false,
    schema: |generator| generator.subschema_for::<CommandStage>(),
    build: build_typed::<CommandStage>,
};

/// Runs `cmd` with `sh -c` in the pipeline file's folder.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct CommandStage {
    /// The shell command, run by `sh -c` in the pipeline file's folder. The stage's outputs folder
    /// is `$NNFLOW_OUT`; parameters are `$NNFLOW_PARAM_<NAME>`.
    pub cmd: String,
    /// Files, folders or globs the command reads, relative to the pipeline file. An input that
    /// another stage declares as an output makes that stage a dependency.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Files, folders or globs the command writes, relative to the pipeline file. They are cached
    /// and restored there on a cache hit.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Names of environment variables the command reads; their values are part of the key.
    #[serde(default)]
    pub env: Vec<String>,
    /// Values that are part of the key, exported as `NNFLOW_PARAM_<NAME>` (upper case; strings
    /// as they are, other values as JSON).
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

impl Stage for CommandStage {
    fn inputs(&self) -> Vec<StageInput> {
        self.inputs.iter().map(|path| StageInput::at(path)).collect()
    }

    fn project_outputs(&self) -> Vec<String> {
        self.outputs.clone()
    }

    fn env(&self) -> Vec<String> {
        self.env.clone()
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), String> {
        let log = File::create(ctx.log_file)
            .map_err(|e| format!("cannot create log {}: {e}", ctx.log_file.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.cmd)
            .current_dir(ctx.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .env("NNFLOW_OUT", ctx.out_dir)
            .env("NNFLOW_THREADS", ctx.threads.to_string())
            .env("OMP_NUM_THREADS", ctx.threads.to_string())
            .process_group(0);
        if !ctx.gpus.is_empty() {
            let devices: Vec<String> = ctx.gpus.iter().map(|g| g.to_string()).collect();
            command.env("CUDA_VISIBLE_DEVICES", devices.join(","));
        }
        for (name, value) in &self.params {
            command.env(format!("NNFLOW_PARAM_{}", name.to_uppercase()), param_text(value));
        }
        // SAFETY: prctl is async-signal-safe. It makes the shell die with nnflow, so a killed run
        // leaves no command writing into outputs behind it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start `sh -c`: {e}"))?;
        wait_or_cancel(child, ctx)
    }
}

fn param_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Waits for the command; on cancellation terminates its whole process group. Polls quickly at
/// first (most commands are short) and backs off to 20 ms.
fn wait_or_cancel(mut child: Child, ctx: &StageContext) -> Result<(), String> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("command failed ({status})"))
            };
        }
        if ctx.cancel.load(Ordering::SeqCst) {
            let group = child.id() as i32;
            // SAFETY: plain signal delivery to the process group we created.
            unsafe { libc::kill(-group, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(200));
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            return Err("interrupted".to_string());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
