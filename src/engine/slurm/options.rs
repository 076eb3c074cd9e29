//! Slurm settings: pipeline-wide defaults (`[pipeline.slurm]`) and per-stage overrides (a stage's
//! `slurm = { ... }`), each becoming `sbatch` arguments.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `sbatch` settings; a stage's entries replace the pipeline's one by one.
#[derive(Deserialize, Serialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time`, the job's time limit, e.g. `"04:00:00"` or `"2-00:00:00"`.
    pub time: Option<String>,
    /// `--mem`, e.g. `"32G"`.
    pub mem: Option<String>,
    /// `--cpus-per-task`; default: the stage's `threads` (when not 0).
    pub cpus: Option<u32>,
    /// `--gres=gpu:N`; default: the stage's `gpus`.
    pub gpus: Option<u32>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// Further `sbatch` arguments, e.g. `["--constraint=a100", "--exclusive"]`.
    pub extra: Option<Vec<String>>,
}

impl SlurmOptions {
    /// These settings with `over`'s set entries on top.
    pub fn with(&self, over: &SlurmOptions) -> SlurmOptions {
        SlurmOptions {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            cpus: over.cpus.or(self.cpus),
            gpus: over.gpus.or(self.gpus),
            account: over.account.clone().or_else(|| self.account.clone()),
            qos: over.qos.clone().or_else(|| self.qos.clone()),
            extra: over.extra.clone().or_else(|| self.extra.clone()),
        }
    }

    /// `sbatch` arguments for a stage with these settings, `threads` and `gpus`.
    pub fn sbatch_args(&self, threads: u32, gpus: u32) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |flag: &str, value: &Option<String>| {
            if let Some(value) = value {
                args.push(format!("--{flag}={value}"));
            }
        };
        push("partition", &self.partition);
        push("time", &self.time);
        push("mem", &self.mem);
        push("account", &self.account);
        push("qos", &self.qos);
        let cpus = self.cpus.or((threads > 0).then_some(threads));
        if let Some(cpus) = cpus {
            args.push(format!("--cpus-per-task={cpus}"));
        }
        let gpus = self.gpus.unwrap_or(gpus);
        if gpus > 0 {
            args.push(format!("--gres=gpu:{gpus}"));
        }
        args.extend(self.extra.iter().flatten().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_settings_replace_the_pipelines_and_become_sbatch_arguments() {
        let pipeline = SlurmOptions {
            partition: Some("cpu".into()),
            time: Some("01:00:00".into()),
            extra: Some(vec!["--exclusive".into()]),
            ..Default::default()
        };
        let stage = SlurmOptions {
            partition: Some("gpu".into()),
            mem: Some("32G".into()),
            ..Default::default()
        };
        let merged = pipeline.with(&stage);
        assert_eq!(
            merged.sbatch_args(4, 1),
            [
                "--partition=gpu",
                "--time=01:00:00",
                "--mem=32G",
                "--cpus-per-task=4",
                "--gres=gpu:1",
                "--exclusive"
            ]
        );
        // threads = 0 (every core) leaves the CPU count to Slurm; an explicit count wins
        assert!(!merged
            .sbatch_args(0, 0)
            .iter()
            .any(|a| a.starts_with("--cpus") || a.starts_with("--gres")));
        let cpus = SlurmOptions {
            cpus: Some(8),
            gpus: Some(2),
            ..Default::default()
        };
        assert_eq!(cpus.sbatch_args(1, 1), ["--cpus-per-task=8", "--gres=gpu:2"]);
    }
}
