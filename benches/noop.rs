//! No-op and first-run benchmark: a project of 50 `command` stages over 2,000 input files (2 GB),
//! run with the real `nnflow` binary (and, when it can be installed, the same project with DVC).
//!
//! Prints figures; asserts nothing about timing. Run with `cargo bench --bench noop`.
//!
//! Environment:
//! - `NNFLOW_BENCH_FILES`  input files in all (default 2000), spread evenly over the stages
//! - `NNFLOW_BENCH_MB`     total input size in MB (10^6 bytes; default 2000)
//! - `NNFLOW_BENCH_STAGES` command stages (default 50)
//! - `NNFLOW_BENCH_DIR`    parent of the temporary project folder (default: the system temp dir)
//! - `NNFLOW_BENCH_DVC=0`  skip the DVC comparison
//! - `NNFLOW_BENCH_KEEP=1` keep the project folder afterwards (it is removed by default)
//!
//! The DVC virtual environment is cached in `$HOME/.cache/nnflow/bench-dvc-venv`.
//!
//! All input data sits in the OS page cache (it was just written and the page cache cannot be
//! dropped here), so hashing figures are CPU-bound figures, not disk figures.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rayon::prelude::*;

const NOOP_RUNS: usize = 5;
const DVC_NOOP_RUNS: usize = 3;
const NOOP_TARGET_S: f64 = 0.3;
/// nnflow does not trust the stat record of a file modified within the last 2 s ("racy clean"), so
/// the first run waits this long after writing the data for the no-op figures to be steady-state.
const RACY_WINDOW: Duration = Duration::from_millis(2100);

struct Config {
    stages: usize,
    files_per_stage: usize,
    file_bytes: usize,
    dvc: bool,
    keep: bool,
    parent: Option<PathBuf>,
}

impl Config {
    fn from_env() -> Config {
        let number = |name: &str, default: usize| -> usize {
            match std::env::var(name) {
                Ok(text) => text
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name} must be a whole number, got `{text}`")),
                Err(_) => default,
            }
        };
        let stages = number("NNFLOW_BENCH_STAGES", 50).max(1);
        let files = number("NNFLOW_BENCH_FILES", 2000).max(1);
        let megabytes = number("NNFLOW_BENCH_MB", 2000);
        let files_per_stage = (files / stages).max(1);
        let total_files = files_per_stage * stages;
        let file_bytes = (megabytes * 1_000_000 / total_files).max(1);
        Config {
            stages,
            files_per_stage,
            file_bytes,
            dvc: std::env::var("NNFLOW_BENCH_DVC").map_or(true, |v| v != "0"),
            keep: std::env::var("NNFLOW_BENCH_KEEP").is_ok_and(|v| v == "1"),
            parent: std::env::var_os("NNFLOW_BENCH_DIR").map(PathBuf::from),
        }
    }

    fn total_files(&self) -> usize {
        self.stages * self.files_per_stage
    }

    fn total_bytes(&self) -> u64 {
        (self.total_files() * self.file_bytes) as u64
    }

    fn gigabytes(&self) -> f64 {
        self.total_bytes() as f64 / 1e9
    }
}

/// One stage of the generated project, shared by the nnflow and DVC layouts.
struct StageSpec {
    name: String,
    cmd: String,
    inputs: Vec<String>,
    output: String,
}

fn stage_name(index: usize) -> String {
    format!("stage{index:02}")
}

fn folder_of(stage: usize) -> String {
    format!("data/d{stage:02}")
}

fn file_of(stage: usize, file: usize) -> String {
    format!("{}/f{file:03}.bin", folder_of(stage))
}

/// Stage `s` reads folder `data/dNN` (its own share of the files): even stages name the folder,
/// odd ones list its files one by one. Every fifth stage also reads the outputs of one or two
/// earlier stages, which makes them dependencies (chains up to stages/5 deep).
fn stage_specs(config: &Config) -> Vec<StageSpec> {
    (0..config.stages)
        .map(|s| {
            let name = stage_name(s);
            let output = format!("out/{name}.txt");
            let mut inputs: Vec<String> = if s % 2 == 0 {
                vec![folder_of(s)]
            } else {
                (0..config.files_per_stage).map(|f| file_of(s, f)).collect()
            };
            let mut cmd = format!(
                "mkdir -p out && echo {name} $(ls {} | wc -l) > {output}",
                folder_of(s)
            );
            if s % 5 == 4 {
                let mut upstream = vec![s - 2];
                if s >= 5 {
                    upstream.push(s - 5);
                }
                let files: Vec<String> = upstream
                    .iter()
                    .map(|&u| format!("out/{}.txt", stage_name(u)))
                    .collect();
                write!(cmd, " && cat {} >> {output}", files.join(" ")).unwrap();
                inputs.extend(files);
            }
            StageSpec {
                name,
                cmd,
                inputs,
                output,
            }
        })
        .collect()
}

/// Writes every input file with xorshift64* bytes, in parallel.
fn generate_data(root: &Path, config: &Config) {
    for s in 0..config.stages {
        fs::create_dir_all(root.join(folder_of(s))).expect("create data folder");
    }
    let jobs: Vec<(usize, usize)> = (0..config.stages)
        .flat_map(|s| (0..config.files_per_stage).map(move |f| (s, f)))
        .collect();
    jobs.par_iter().for_each(|&(s, f)| {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ ((s as u64) << 32 | f as u64).wrapping_mul(0x2545_F491);
        let mut bytes = vec![0u8; config.file_bytes.div_ceil(8) * 8];
        for chunk in bytes.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            chunk.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        bytes.truncate(config.file_bytes);
        fs::write(root.join(file_of(s, f)), &bytes).expect("write input file");
    });
}

/// The same data under another project folder, hard-linked (copied where links fail).
fn link_data(from: &Path, to: &Path, config: &Config) {
    for s in 0..config.stages {
        fs::create_dir_all(to.join(folder_of(s))).expect("create data folder");
        for f in 0..config.files_per_stage {
            let (source, target) = (from.join(file_of(s, f)), to.join(file_of(s, f)));
            if fs::hard_link(&source, &target).is_err() {
                fs::copy(&source, &target).expect("copy input file");
            }
        }
    }
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("string serializes")
}

fn nnflow_pipeline(specs: &[StageSpec]) -> String {
    let mut text = String::from("[pipeline]\nname = \"bench\"\n");
    for spec in specs {
        let inputs: Vec<String> = spec.inputs.iter().map(|i| toml_string(i)).collect();
        write!(
            text,
            "\n[stages.{}]\nkind = \"command\"\ncmd = {}\ninputs = [{}]\noutputs = [{}]\n",
            spec.name,
            toml_string(&spec.cmd),
            inputs.join(", "),
            toml_string(&spec.output)
        )
        .unwrap();
    }
    text
}

fn dvc_yaml(specs: &[StageSpec]) -> String {
    let mut text = String::from("stages:\n");
    for spec in specs {
        // JSON strings are valid YAML double-quoted scalars.
        write!(
            text,
            "  {}:\n    cmd: {}\n    deps:\n",
            spec.name,
            toml_string(&spec.cmd)
        )
        .unwrap();
        for input in &spec.inputs {
            writeln!(text, "      - {}", toml_string(input)).unwrap();
        }
        writeln!(text, "    outs:\n      - {}", toml_string(&spec.output)).unwrap();
    }
    text
}

fn timed(command: &mut Command) -> (f64, Output) {
    let started = Instant::now();
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    (started.elapsed().as_secs_f64(), output)
}

fn check(what: &str, output: &Output) {
    if !output.status.success() {
        panic!(
            "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Counts the stages of a `--json` report whose `field` equals `value`, after checking the command.
fn count_json(what: &str, output: &Output, field: &str, value: &str) -> usize {
    check(what, output);
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{what}: output is not JSON ({e})"));
    json["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no `stages` in {json}"))
        .iter()
        .filter(|s| s[field] == value)
        .count()
}

fn min_median(times: &[f64]) -> (f64, f64) {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (sorted[0], median)
}

fn list(times: &[f64]) -> String {
    times
        .iter()
        .map(|t| format!("{t:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

struct NnflowFigures {
    first: f64,
    noop_min: f64,
    noop_median: f64,
    status_cold: f64,
    run_cold: f64,
}

fn bench_nnflow(project: &Path, config: &Config) -> NnflowFigures {
    let binary = env!("CARGO_BIN_EXE_nnflow");
    let nnflow = |args: &[&str]| {
        let mut command = Command::new(binary);
        command
            .args(args)
            .current_dir(project)
            .env_remove("NNFLOW_CACHE_DIR");
        command
    };
    let stages = config.stages;
    let gb = config.gigabytes();

    let (first, output) = timed(&mut nnflow(&["run", "pipeline.toml", "--json"]));
    let ran = count_json("first nnflow run", &output, "outcome", "ran");
    assert_eq!(ran, stages, "every stage should run the first time");
    println!(
        "nnflow first run (hash {gb:.2} GB + run {stages} commands): {first:.3} s ({:.2} GB/s)",
        gb / first
    );

    let mut noop = Vec::new();
    for _ in 0..NOOP_RUNS {
        let (seconds, output) = timed(&mut nnflow(&["run", "pipeline.toml", "--json"]));
        let cached = count_json("no-op nnflow run", &output, "outcome", "cached");
        assert_eq!(cached, stages, "a no-op run should find every stage fresh");
        noop.push(seconds);
    }
    let (noop_min, noop_median) = min_median(&noop);
    println!(
        "nnflow no-op run x{NOOP_RUNS}: min {noop_min:.3} s, median {noop_median:.3} s \
         (target < {NOOP_TARGET_S} s) [{}]",
        list(&noop)
    );

    // A cold stat cache: every input is read and hashed again. The records stay, so `status`
    // computes the key of every stage (it skips the keys of stages below a stage that is not fresh).
    let state = project.join(".nnflow").join("state");
    fs::remove_dir_all(&state).expect("remove .nnflow/state");
    let (status_cold, output) = timed(&mut nnflow(&["status", "pipeline.toml", "--json"]));
    let fresh = count_json("nnflow status", &output, "state", "fresh");
    assert_eq!(fresh, stages, "status should find every stage fresh");
    println!(
        "nnflow status, cold stat cache (hash only, runs nothing): {status_cold:.3} s ({:.2} GB/s)",
        gb / status_cold
    );

    fs::remove_dir_all(&state).expect("remove .nnflow/state");
    let (run_cold, output) = timed(&mut nnflow(&["run", "pipeline.toml", "--json"]));
    let cached = count_json("nnflow run with a cold stat cache", &output, "outcome", "cached");
    assert_eq!(
        cached, stages,
        "a run with a cold stat cache should find every stage fresh"
    );
    println!(
        "nnflow run, cold stat cache (hash, nothing to run): {run_cold:.3} s ({:.2} GB/s)",
        gb / run_cold
    );

    NnflowFigures {
        first,
        noop_min,
        noop_median,
        status_cold,
        run_cold,
    }
}

struct DvcFigures {
    version: String,
    first: f64,
    noop_min: f64,
    noop_median: f64,
}

fn run_quiet(command: &mut Command) -> Result<Output, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot start {command:?}: {e}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        let tail = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        Err(format!(
            "{command:?} failed ({})\n{}\n{}",
            output.status,
            tail(&output.stdout),
            tail(&output.stderr)
        ))
    }
}

/// The `dvc` executable from the cached virtual environment, installing DVC there if needed.
fn dvc_executable() -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    let venv = PathBuf::from(home).join(".cache/nnflow/bench-dvc-venv");
    let dvc = venv.join("bin/dvc");
    if dvc.exists() {
        return Ok(dvc);
    }
    println!("installing DVC into {} (once) ...", venv.display());
    let _ = fs::remove_dir_all(&venv);
    if let Some(parent) = venv.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    run_quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_quiet(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "dvc"]))?;
    if dvc.exists() {
        Ok(dvc)
    } else {
        Err(format!("pip installed DVC but {} is missing", dvc.display()))
    }
}

fn bench_dvc(project: &Path, specs: &[StageSpec], config: &Config) -> Result<DvcFigures, String> {
    let dvc_path = dvc_executable()?;
    let dvc = |args: &[&str]| {
        let mut command = Command::new(&dvc_path);
        command
            .args(args)
            .current_dir(project)
            .env("DVC_NO_ANALYTICS", "1");
        command
    };
    let version = run_quiet(&mut dvc(&["--version"]))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    run_quiet(Command::new("git").args(["init", "-q"]).current_dir(project))?;
    run_quiet(&mut dvc(&["init", "-q"]))?;
    run_quiet(&mut dvc(&["config", "core.analytics", "false"]))?;
    fs::write(project.join("dvc.yaml"), dvc_yaml(specs)).map_err(|e| e.to_string())?;
    let gb = config.gigabytes();

    let started = Instant::now();
    run_quiet(&mut dvc(&["repro", "--quiet"]))?;
    let first = started.elapsed().as_secs_f64();
    println!(
        "dvc repro, first (hash {gb:.2} GB + run {} commands): {first:.3} s ({:.2} GB/s)",
        config.stages,
        gb / first
    );

    let mut noop = Vec::new();
    for _ in 0..DVC_NOOP_RUNS {
        let (seconds, output) = timed(&mut dvc(&["repro"]));
        check("no-op dvc repro", &output);
        let text = String::from_utf8_lossy(&output.stdout);
        if text.contains("Running stage") {
            return Err(format!("a second `dvc repro` ran stages again:\n{text}"));
        }
        noop.push(seconds);
    }
    let (noop_min, noop_median) = min_median(&noop);
    println!(
        "dvc repro no-op x{DVC_NOOP_RUNS}: min {noop_min:.3} s, median {noop_median:.3} s [{}]",
        list(&noop)
    );
    Ok(DvcFigures {
        version,
        first,
        noop_min,
        noop_median,
    })
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter); this benchmark takes no arguments.
    let config = Config::from_env();
    let mut builder = tempfile::Builder::new();
    builder.prefix("nnflow-bench-");
    let temporary = match &config.parent {
        Some(parent) => {
            fs::create_dir_all(parent).expect("create NNFLOW_BENCH_DIR");
            builder.tempdir_in(parent)
        }
        None => builder.tempdir(),
    }
    .expect("temporary folder");
    let nnflow_project = temporary.path().join("nnflow");
    let dvc_project = temporary.path().join("dvc");
    let specs = stage_specs(&config);
    let dependent = specs
        .iter()
        .filter(|s| s.inputs.iter().any(|i| i.starts_with("out/")))
        .count();

    println!(
        "project: {} stages ({dependent} depending on others), {} input files of {} bytes, {:.2} GB, in {}",
        config.stages,
        config.total_files(),
        config.file_bytes,
        config.gigabytes(),
        temporary.path().display()
    );
    println!("nnflow: {}", env!("CARGO_BIN_EXE_nnflow"));
    println!("note: all input data is in the OS page cache (just written; it cannot be dropped here)");

    let started = Instant::now();
    generate_data(&nnflow_project, &config);
    fs::write(nnflow_project.join("pipeline.toml"), nnflow_pipeline(&specs)).expect("write pipeline");
    if config.dvc {
        link_data(&nnflow_project, &dvc_project, &config);
    }
    let generated = started.elapsed();
    println!("generated the data in {:.2} s", generated.as_secs_f64());
    std::thread::sleep(RACY_WINDOW.saturating_sub(generated));

    let nnflow = bench_nnflow(&nnflow_project, &config);

    let dvc = if config.dvc {
        match bench_dvc(&dvc_project, &specs, &config) {
            Ok(figures) => Some(figures),
            Err(reason) => {
                println!("DVC comparison skipped: {reason}");
                None
            }
        }
    } else {
        println!("DVC comparison skipped: NNFLOW_BENCH_DVC=0");
        None
    };

    let gb = config.gigabytes();
    println!();
    println!(
        "== summary: {} stages, {} inputs, {gb:.2} GB (data in page cache) ==",
        config.stages,
        config.total_files()
    );
    let dvc_noop = dvc.as_ref().map_or(String::new(), |d| {
        format!(
            "   dvc repro {:.3} s (median of {DVC_NOOP_RUNS}; min {:.3} s)",
            d.noop_median, d.noop_min
        )
    });
    println!(
        "no-op run:                        nnflow {:.3} s (median of {NOOP_RUNS}; min {:.3} s; target < {NOOP_TARGET_S} s){dvc_noop}",
        nnflow.noop_median, nnflow.noop_min
    );
    let dvc_first = dvc.as_ref().map_or(String::new(), |d| {
        format!("   dvc {:.3} s ({:.2} GB/s)", d.first, gb / d.first)
    });
    println!(
        "first run (hash + run {} stages): nnflow {:.3} s ({:.2} GB/s){dvc_first}",
        config.stages,
        nnflow.first,
        gb / nnflow.first
    );
    println!(
        "cold-stat-cache hashing only:     nnflow status {:.3} s ({:.2} GB/s); nnflow run {:.3} s ({:.2} GB/s)",
        nnflow.status_cold,
        gb / nnflow.status_cold,
        nnflow.run_cold,
        gb / nnflow.run_cold
    );
    if let Some(d) = &dvc {
        println!("dvc: {}", d.version);
    }

    if config.keep {
        let kept = temporary.keep();
        println!("kept {}", kept.display());
    } else {
        let path = temporary.path().to_path_buf();
        temporary
            .close()
            .unwrap_or_else(|e| panic!("cannot remove {}: {e}", path.display()));
    }
}
