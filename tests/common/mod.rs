//! Test harness: a pipeline project in a temporary folder and the real `nnflow` binary run in it.
#![allow(dead_code)]

pub mod browser;
pub mod nginx;
pub mod report_check;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
    /// Cache shared by every command in this project unless a test points elsewhere.
    pub cache: PathBuf,
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::tempdir().expect("temporary folder");
        let cache = dir.path().join("shared-cache");
        Project { dir, cache }
    }

    /// A project holding `p.toml` with this text.
    pub fn with_pipeline(pipeline: &str) -> Project {
        let project = Project::new();
        project.write("p.toml", pipeline);
        project
    }

    /// Copies the repository's `pipelines/<file>` into the project's `pipelines/`.
    pub fn copy_pipelines(&self, files: &[&str]) {
        for file in files {
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(file);
            self.write(
                &format!("pipelines/{file}"),
                &std::fs::read_to_string(source).unwrap(),
            );
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path().join(relative))
            .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
    }

    /// `nnflow ARGS` in the project folder with the project's cache.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nnflow"));
        command
            .args(args)
            .current_dir(self.path())
            .env("NNFLOW_CACHE_DIR", &self.cache);
        command
    }

    pub fn nnflow(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("nnflow runs")
    }

    /// `nnflow run --json ARGS`: the outcome of every stage instance, by id.
    pub fn run(&self, args: &[&str]) -> RunResult {
        let mut full = vec!["run", "--json"];
        full.extend_from_slice(args);
        let output = self.nnflow(&full);
        RunResult::parse(output)
    }
}

pub struct RunResult {
    pub code: i32,
    pub json: serde_json::Value,
    pub stderr: String,
}

impl RunResult {
    fn parse(output: Output) -> RunResult {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
        RunResult {
            code: output.status.code().unwrap_or(-1),
            json,
            stderr,
        }
    }

    pub fn outcome(&self, id: &str) -> String {
        self.json["stages"]
            .as_array()
            .and_then(|stages| stages.iter().find(|s| s["id"] == id))
            .and_then(|s| s["outcome"].as_str())
            .unwrap_or_else(|| panic!("no stage {id} in {}\nstderr: {}", self.json, self.stderr))
            .to_string()
    }

    /// Ids of the instances with this outcome, sorted.
    pub fn with_outcome(&self, outcome: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.json["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["outcome"] == outcome)
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}
