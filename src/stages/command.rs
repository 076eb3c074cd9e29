//! The `command` stage: a shell command with declared inputs, outputs, environment and parameters.
//! The escape hatch for custom steps (DICOM conversion, a report), as in DVC.

use std::collections::BTreeMap;
use std::process::Command;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::process::run_logged;
use super::{to_json, Kind, Stage, StageContext, StageError, StageInput};

pub const KIND: Kind = Kind {
    name: "command",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<CommandStage>(),
    build: super::finite::build_finite::<CommandStage>,
};

/// Runs `cmd` with `sh -c` in the pipeline file's folder.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct CommandStage {
    /// The shell command, run by `sh -c` in the pipeline file's folder. The stage's outputs folder
    /// is `$NNFLOW_OUT`; parameters are `$NNFLOW_PARAM_<NAME>`; `$NNFLOW_EXE` is nnflow itself.
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

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.cmd)
            .current_dir(ctx.root)
            .env("NNFLOW_OUT", ctx.out_dir);
        // lets commands call nnflow itself (e.g. `$NNFLOW_EXE synth`) without it being on PATH
        if let Ok(exe) = std::env::current_exe() {
            command.env("NNFLOW_EXE", exe);
        }
        for (name, value) in &self.params {
            command.env(format!("NNFLOW_PARAM_{}", name.to_uppercase()), param_text(value));
        }
        Ok(run_logged(command, ctx, "command")?)
    }
}

fn param_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
