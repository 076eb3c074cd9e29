//! Preprocessing benchmark: nnflow's fingerprint + plan + preprocess for `3d_fullres` against
//! nnU-Net 2.8.1's on the same synthetic CT-like dataset (20 cases of 100x512x512 int16 voxels,
//! spacing 2.5x0.7x0.7 mm), with as many processes as cores on both sides, in two timed phases:
//! - planning: `nnflow run … plan` against `nnUNetv2_plan_and_preprocess --no_pp` (fingerprint,
//!   integrity check, plans);
//! - preprocessing with the plan given: `nnflow run … preprocess` (fingerprint and plan cached)
//!   against `nnUNetv2_preprocess -c 3d_fullres`. Each tool decodes each raw image once here; the
//!   speed-up target (5x) is this phase's.
//!
//! Prints wall time and peak memory side by side; asserts nothing about timing. Run with
//! `cargo bench --bench preprocess`.
//!
//! Peak memory is that of the whole process tree: nnU-Net forks worker processes, so a sampler reads
//! the resident set of the launched process and all its descendants from `/proc` every 50 ms and
//! keeps the largest sum. Summed RSS counts pages shared between processes (Python, torch and numpy
//! libraries in every nnU-Net worker) once per process; the proportional set size (PSS) splits them,
//! so the PSS sum is the fairer figure for "memory the run needs". Both are printed, with the largest
//! single process.
//!
//! Environment:
//! - `NNFLOW_BENCH_DIR`      the dataset folder (default
//!   `$HOME/.cache/nnflow/bench-preprocess/Dataset900_SynthCT`); written by `nnflow synth` when
//!   missing or when it was written with other sizes (recorded in `<folder>.spec` next to it)
//! - `NNFLOW_BENCH_CASES`    cases (default 20)
//! - `NNFLOW_BENCH_SHAPE`    shape z,y,x (default `100,512,512`)
//! - `NNFLOW_BENCH_SPACING`  spacing z,y,x in mm (default `2.5,0.7,0.7`)
//! - `NNFLOW_BENCH_JOBS`     processes / jobs on both sides (default: CPU cores)
//! - `NNFLOW_BENCH_PIPELINE` the nnflow pipeline (default `pipelines/nnunet.toml` of this crate)
//! - `NNFLOW_BENCH_TARGETS`  the pipeline stages of the preprocessing phase, comma-separated
//!   (default `preprocess`; what they depend on runs in the planning phase or is cached)
//! - `NNFLOW_BENCH_NNUNET_VENV` virtual environment with nnunetv2 2.8.1 (default
//!   `$HOME/.cache/nnflow/nnunet-venv`; created with pip when missing)
//! - `NNFLOW_BENCH_NNUNET=0` / `NNFLOW_BENCH_NNFLOW=0` skip one side
//! - `NNFLOW_BENCH_TIMEOUT_S` kill a side's process tree after this many seconds (default 7200)
//! - `NNFLOW_BENCH_KEEP=1`   keep the temporary work folders (logs, outputs) and print where they are
//!
//! Both sides read the dataset from the OS page cache (it cannot be dropped here), and each starts
//! from an empty work folder and an empty nnflow cache, so the nnflow figure is a first run.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nnflow::data::case_store::list_cases;

const SAMPLE_EVERY: Duration = Duration::from_millis(50);
const NNUNET_VERSION: &str = "2.8.1";
const DATASET_ID: u32 = 900;
const DATASET_NAME: &str = "Dataset900_SynthCT";
const TARGET_SPEEDUP: f64 = 5.0;
const TARGET_MEMORY_RATIO: f64 = 1.0;
const GB: f64 = 1e9;

struct Config {
    dataset: PathBuf,
    cases: usize,
    shape_zyx: [usize; 3],
    spacing_zyx: [f64; 3],
    jobs: usize,
    pipeline: PathBuf,
    targets: Vec<String>,
    venv: PathBuf,
    nnunet: bool,
    nnflow: bool,
    timeout: Duration,
    keep: bool,
}

fn env_text(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|text| !text.trim().is_empty())
}

fn parse_or_panic<T: std::str::FromStr>(name: &str, text: &str) -> T {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}: cannot read `{text}` as a number"))
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    env_text(name).map_or(default, |text| parse_or_panic(name, &text))
}

fn env_triple<T: std::str::FromStr + Copy>(name: &str, default: [T; 3]) -> [T; 3] {
    let Some(text) = env_text(name) else {
        return default;
    };
    let values: Vec<T> = text.split(',').map(|part| parse_or_panic(name, part)).collect();
    values
        .try_into()
        .unwrap_or_else(|_| panic!("{name} must be three comma-separated numbers z,y,x, got `{text}`"))
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
}

impl Config {
    fn from_env() -> Config {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let switch = |name: &str| std::env::var(name).map_or(true, |v| v != "0");
        Config {
            dataset: env_text("NNFLOW_BENCH_DIR").map_or_else(
                || home().join(".cache/nnflow/bench-preprocess").join(DATASET_NAME),
                PathBuf::from,
            ),
            cases: env_number("NNFLOW_BENCH_CASES", 20).max(1),
            shape_zyx: env_triple("NNFLOW_BENCH_SHAPE", [100, 512, 512]),
            spacing_zyx: env_triple("NNFLOW_BENCH_SPACING", [2.5, 0.7, 0.7]),
            jobs: env_number("NNFLOW_BENCH_JOBS", cores).max(1),
            pipeline: env_text("NNFLOW_BENCH_PIPELINE")
                .map_or_else(|| crate_dir.join("pipelines/nnunet.toml"), PathBuf::from),
            targets: env_text("NNFLOW_BENCH_TARGETS")
                .unwrap_or_else(|| "preprocess".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            venv: env_text("NNFLOW_BENCH_NNUNET_VENV")
                .map_or_else(|| home().join(".cache/nnflow/nnunet-venv"), PathBuf::from),
            nnunet: switch("NNFLOW_BENCH_NNUNET"),
            nnflow: switch("NNFLOW_BENCH_NNFLOW"),
            timeout: Duration::from_secs(env_number("NNFLOW_BENCH_TIMEOUT_S", 7200)),
            keep: std::env::var("NNFLOW_BENCH_KEEP").is_ok_and(|v| v == "1"),
        }
    }

    fn voxels(&self) -> usize {
        self.cases * self.shape_zyx.iter().product::<usize>()
    }

    fn joined<T: ToString>(values: &[T; 3], separator: &str) -> String {
        values
            .iter()
            .map(T::to_string)
            .collect::<Vec<_>>()
            .join(separator)
    }

    /// What `nnflow synth` was asked for; the dataset is reused only when this matches.
    fn synth_spec(&self) -> String {
        format!(
            "cases={} shape={} spacing={}\n",
            self.cases,
            Config::joined(&self.shape_zyx, ","),
            Config::joined(&self.spacing_zyx, ",")
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Dataset

fn spec_file(dataset: &Path) -> PathBuf {
    let name = dataset
        .file_name()
        .expect("dataset folder has a name")
        .to_string_lossy();
    dataset.with_file_name(format!("{name}.spec"))
}

/// Writes the dataset with `nnflow synth` unless a complete one of the same sizes is there.
fn ensure_dataset(config: &Config) {
    let spec = config.synth_spec();
    let stamp = spec_file(&config.dataset);
    let complete = config.dataset.join("dataset.json").is_file();
    if complete && fs::read_to_string(&stamp).is_ok_and(|text| text == spec) {
        println!("dataset: {} (cached)", config.dataset.display());
        return;
    }
    println!(
        "dataset: writing {} ({}) ...",
        config.dataset.display(),
        spec.trim()
    );
    let _ = fs::remove_file(&stamp);
    if config.dataset.exists() {
        fs::remove_dir_all(&config.dataset).expect("remove the stale dataset");
    }
    if let Some(parent) = config.dataset.parent() {
        fs::create_dir_all(parent).expect("create the dataset's parent folder");
    }
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_nnflow"))
        .arg("synth")
        .arg(&config.dataset)
        .args(["--cases", &config.cases.to_string()])
        .args(["--shape", &Config::joined(&config.shape_zyx, ",")])
        .args(["--spacing", &Config::joined(&config.spacing_zyx, ",")])
        .output()
        .expect("start nnflow synth");
    if !output.status.success() {
        panic!(
            "nnflow synth failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::write(&stamp, spec).expect("write the dataset's spec file");
    println!("dataset: written in {:.1} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Process-tree memory

/// Parent of every process now alive, from `/proc/<pid>/stat` (processes that vanish while the
/// table is read are skipped).
fn parent_table() -> HashMap<i32, i32> {
    let mut parents = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return parents;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split after the last `)`.
        let ppid = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().nth(1))
            .and_then(|field| field.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// `root` and all its descendants alive now.
fn process_tree(root: i32) -> Vec<i32> {
    let parents = parent_table();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in &parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(kids) = children.get(&tree[next]) {
            tree.extend(kids);
        }
        next += 1;
    }
    tree
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// Resident set size in bytes (`/proc/<pid>/statm`, second field, in pages).
fn rss_bytes(pid: i32, page: u64) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    Some(statm.split_whitespace().nth(1)?.parse::<u64>().ok()? * page)
}

/// Proportional set size in bytes (`Pss:` of `/proc/<pid>/smaps_rollup`, in kB).
fn pss_bytes(pid: i32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[derive(Clone, Copy, Default, Debug)]
struct Peaks {
    tree_rss: u64,
    tree_pss: u64,
    process_rss: u64,
    processes: usize,
    samples: usize,
}

impl Peaks {
    fn sample(&mut self, root: i32, page: u64) {
        let (mut rss, mut pss, mut processes) = (0, 0, 0);
        for pid in process_tree(root) {
            // A process that exits between listing and reading counts as nothing.
            let Some(resident) = rss_bytes(pid, page) else {
                continue;
            };
            rss += resident;
            pss += pss_bytes(pid).unwrap_or(resident);
            processes += 1;
            self.process_rss = self.process_rss.max(resident);
        }
        self.tree_rss = self.tree_rss.max(rss);
        self.tree_pss = self.tree_pss.max(pss);
        self.processes = self.processes.max(processes);
        self.samples += 1;
    }
}

/// User + system CPU seconds of all waited-for descendants so far.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Busy CPU seconds of the whole machine so far (`cpu` line of `/proc/stat`: all but idle and
/// iowait), to tell how much else ran during a measurement.
fn machine_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    busy as f64 / per_second as f64
}

struct Measured {
    seconds: f64,
    cpu_seconds: f64,
    /// CPU seconds other processes of the machine used meanwhile (other builds skew the figures).
    other_cpu_seconds: f64,
    peaks: Peaks,
    status: ExitStatus,
    timed_out: bool,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Measured {
    fn ok(&self) -> bool {
        self.status.success() && !self.timed_out
    }

    fn describe_failure(&self, what: &str) -> String {
        let tail = |path: &Path| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        let how = if self.timed_out {
            "timed out".to_string()
        } else {
            self.status.to_string()
        };
        format!(
            "{what} failed ({how}) after {:.1} s\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
            self.seconds,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

/// Runs `command` in its own process group with stdout and stderr in `<logs>/<label>.{out,err}`,
/// sampling the memory of its process tree until it exits; the group is killed after `timeout`.
fn measure(command: &mut Command, logs: &Path, label: &str, timeout: Duration) -> Measured {
    let stdout = logs.join(format!("{label}.out"));
    let stderr = logs.join(format!("{label}.err"));
    command
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).expect("create stdout log"))
        .stderr(fs::File::create(&stderr).expect("create stderr log"))
        .process_group(0);
    let cpu_before = children_cpu_seconds();
    let busy_before = machine_busy_seconds();
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let root = i32::try_from(child.id()).expect("pid fits i32");

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let page = page_size();
            let mut peaks = Peaks::default();
            let mut timed_out = false;
            while !done.load(Ordering::Relaxed) {
                peaks.sample(root, page);
                if !timed_out && started.elapsed() > timeout {
                    // SAFETY: signals the process group this function created.
                    unsafe { libc::kill(-root, libc::SIGKILL) };
                    timed_out = true;
                }
                thread::sleep(SAMPLE_EVERY);
            }
            (peaks, timed_out)
        })
    };
    let status = child.wait().expect("wait for the benchmarked command");
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (peaks, timed_out) = sampler.join().expect("sampler thread");
    // Workers that outlived their parent would keep running into the next measurement.
    // SAFETY: signals the process group this function created; it may already be gone.
    unsafe { libc::kill(-root, libc::SIGKILL) };
    let cpu_seconds = children_cpu_seconds() - cpu_before;
    Measured {
        seconds,
        cpu_seconds,
        other_cpu_seconds: (machine_busy_seconds() - busy_before - cpu_seconds).max(0.0),
        peaks,
        status,
        timed_out,
        stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// nnU-Net

fn run_checked(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot start {command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(format!(
            "{command:?} failed ({})\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn installed_nnunet_version(python: &Path) -> Result<String, String> {
    run_checked(Command::new(python).args([
        "-c",
        "import importlib.metadata as m, nnunetv2; print(m.version('nnunetv2'))",
    ]))
}

/// The venv's `nnUNetv2_plan_and_preprocess`, installing nnunetv2 from PyPI when the venv lacks it.
fn nnunet_executable(venv: &Path) -> Result<(PathBuf, String), String> {
    let python = venv.join("bin/python");
    let executable = venv.join("bin/nnUNetv2_plan_and_preprocess");
    if executable.exists() {
        if let Ok(version) = installed_nnunet_version(&python) {
            return Ok((executable, version));
        }
    }
    println!(
        "installing nnunetv2=={NNUNET_VERSION} into {} (once) ...",
        venv.display()
    );
    if !python.exists() {
        run_checked(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    run_checked(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("nnunetv2=={NNUNET_VERSION}"),
    ]))?;
    let version = installed_nnunet_version(&python)?;
    Ok((executable, version))
}

struct NnunetFigures {
    version: String,
    planning: Measured,
    preprocessing: Measured,
    plans: Option<serde_json::Value>,
    preprocessed_cases: usize,
    output_bytes: u64,
}

fn bench_nnunet(config: &Config, work: &Path) -> Result<NnunetFigures, String> {
    let (executable, version) = nnunet_executable(&config.venv)?;
    let (raw, preprocessed, results) = (work.join("raw"), work.join("preprocessed"), work.join("results"));
    for folder in [&raw, &preprocessed, &results] {
        fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    }
    // nnU-Net finds datasets by folder name (`Dataset<ID>_<name>`), whatever the cache folder is called.
    std::os::unix::fs::symlink(&config.dataset, raw.join(DATASET_NAME))
        .map_err(|e| format!("cannot link the dataset into {}: {e}", raw.display()))?;
    let jobs = config.jobs.to_string();
    let dataset_id = DATASET_ID.to_string();
    let nnunet = |name: &str| {
        let mut command = Command::new(executable.with_file_name(name));
        command
            .args(["-d", &dataset_id])
            .env("nnUNet_raw", &raw)
            .env("nnUNet_preprocessed", &preprocessed)
            .env("nnUNet_results", &results);
        command
    };
    let mut command = nnunet("nnUNetv2_plan_and_preprocess");
    command
        .args(["-npfp", &jobs, "--verify_dataset_integrity", "--no_pp"])
        .arg("--no_pbar");
    println!("nnU-Net {version}, planning: {command:?} ...");
    let planning = measure(&mut command, work, "nnunet-plan", config.timeout);
    if !planning.ok() {
        return Err(planning.describe_failure("nnUNetv2_plan_and_preprocess --no_pp"));
    }
    let mut command = nnunet("nnUNetv2_preprocess");
    command.args(["-c", "3d_fullres", "-np", &jobs]);
    println!("nnU-Net {version}, preprocessing: {command:?} ...");
    let preprocessing = measure(&mut command, work, "nnunet-preprocess", config.timeout);
    if !preprocessing.ok() {
        return Err(preprocessing.describe_failure("nnUNetv2_preprocess"));
    }
    let output = preprocessed.join(DATASET_NAME);
    let plans = read_json(&output.join("nnUNetPlans.json"));
    let preprocessed_cases = count_files(&output.join("nnUNetPlans_3d_fullres"), |name| {
        name.ends_with(".b2nd") && !name.ends_with("_seg.b2nd")
    });
    Ok(NnunetFigures {
        version,
        planning,
        preprocessing,
        plans,
        preprocessed_cases,
        output_bytes: disk_bytes(&output),
    })
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

/// Bytes of all files under `path` (symbolic links not followed).
fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).map_or(0, |entries| {
        entries.flatten().map(|entry| disk_bytes(&entry.path())).sum()
    })
}

fn count_files(folder: &Path, wanted: impl Fn(&str) -> bool) -> usize {
    fs::read_dir(folder).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|entry| wanted(&entry.file_name().to_string_lossy()))
            .count()
    })
}

// ---------------------------------------------------------------------------------------------
// nnflow

struct StageFigure {
    id: String,
    outcome: String,
    seconds: f64,
}

struct NnflowFigures {
    planning: Measured,
    preprocessing: Measured,
    stages: Vec<StageFigure>,
    plans: Option<serde_json::Value>,
    preprocessed_cases: usize,
    output_bytes: u64,
}

fn bench_nnflow(config: &Config, work: &Path) -> Result<NnflowFigures, String> {
    if !config.pipeline.is_file() {
        return Err(format!("no pipeline at {}", config.pipeline.display()));
    }
    // A copy of the pipeline in an empty folder: its `.nnflow` work folder starts empty.
    let project = work.join("project");
    fs::create_dir_all(&project).map_err(|e| format!("cannot create {}: {e}", project.display()))?;
    let pipeline = project.join("nnunet.toml");
    fs::copy(&config.pipeline, &pipeline).map_err(|e| format!("cannot copy the pipeline: {e}"))?;
    let run = |targets: &[String]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nnflow"));
        command
            .arg("run")
            .arg(&pipeline)
            .args(targets)
            .arg("--set")
            .arg(format!("dataset={}", config.dataset.display()))
            .args(["--set", "configurations=[\"3d_fullres\"]"])
            .args(["-j", &config.jobs.to_string(), "--json"])
            .current_dir(&project)
            .env("NNFLOW_CACHE_DIR", work.join("cache"));
        command
    };
    let mut command = run(&["plan".to_string()]);
    println!("nnflow, planning: {command:?} ...");
    let planning = measure(&mut command, work, "nnflow-plan", config.timeout);
    if !planning.ok() {
        return Err(planning.describe_failure("nnflow run … plan"));
    }
    let mut command = run(&config.targets);
    println!("nnflow, preprocessing: {command:?} ...");
    let preprocessing = measure(&mut command, work, "nnflow-preprocess", config.timeout);
    if !preprocessing.ok() {
        return Err(preprocessing.describe_failure("nnflow run"));
    }
    let text =
        fs::read_to_string(&preprocessing.stdout).map_err(|e| format!("cannot read nnflow's output: {e}"))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("nnflow's output is not JSON ({e}):\n{text}"))?;
    let entries = report["stages"].as_array().cloned().unwrap_or_default();
    let stages = entries
        .iter()
        .map(|stage| StageFigure {
            id: stage["id"].as_str().unwrap_or("?").to_string(),
            outcome: stage["outcome"].as_str().unwrap_or("?").to_string(),
            seconds: stage["seconds"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    let plans = entries
        .iter()
        .filter_map(|stage| stage["outputs"].as_str())
        .flat_map(|outputs| {
            [
                Path::new(outputs).join("plans.json"),
                Path::new(outputs).join("nnUNetPlans.json"),
            ]
        })
        .find_map(|path| read_json(&path));
    // The last stage's outputs hold the preprocessed cases.
    let preprocessed_cases = entries
        .last()
        .and_then(|stage| stage["outputs"].as_str())
        .map_or(0, |outputs| list_cases(Path::new(outputs)).len());
    Ok(NnflowFigures {
        planning,
        preprocessing,
        stages,
        plans,
        preprocessed_cases,
        output_bytes: disk_bytes(&project.join(".nnflow")) + disk_bytes(&work.join("cache")),
    })
}

// ---------------------------------------------------------------------------------------------
// Report

/// Picks one phase's measurement from each tool's figures.
type Phase = (fn(&NnunetFigures) -> &Measured, fn(&NnflowFigures) -> &Measured);

fn gb(bytes: u64) -> f64 {
    bytes as f64 / GB
}

fn figure_row(name: &str, measured: &Measured) {
    let peaks = &measured.peaks;
    println!(
        "{name:<18} {:>9.1} {:>10.2} {:>10.2} {:>12.2} {:>6} {:>9.1} {:>9.1}",
        measured.seconds,
        gb(peaks.tree_rss),
        gb(peaks.tree_pss),
        gb(peaks.process_rss),
        peaks.processes,
        measured.cpu_seconds,
        measured.other_cpu_seconds
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn print_table(config: &Config, nnunet: Option<&NnunetFigures>, nnflow: Option<&NnflowFigures>) {
    println!();
    println!(
        "preprocess 3d_fullres: {} cases of {} int16 voxels (z,y,x), spacing {} mm, {:.2} GB of voxels, \
         {} processes/jobs on {} cores",
        config.cases,
        Config::joined(&config.shape_zyx, "x"),
        Config::joined(&config.spacing_zyx, "x"),
        config.voxels() as f64 * 2.0 / GB,
        config.jobs,
        thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<18} {:>9} {:>10} {:>10} {:>12} {:>6} {:>9} {:>9}",
        "", "wall s", "tree RSS", "tree PSS", "max proc RSS", "procs", "CPU s", "other CPU"
    );
    println!(
        "{:<18} {:>9} {:>10} {:>10} {:>12} {:>6} {:>9} {:>9}",
        "", "", "GB", "GB", "GB", "", "", "s"
    );
    let phases: [(&str, Phase); 2] = [
        ("planning", (|n| &n.planning, |f| &f.planning)),
        (
            "preprocessing, plan given",
            (|n| &n.preprocessing, |f| &f.preprocessing),
        ),
    ];
    for (phase, pick) in phases {
        println!("{phase}:");
        if let Some(nnunet) = nnunet {
            figure_row(&format!("  nnU-Net {}", nnunet.version), pick.0(nnunet));
        }
        if let Some(nnflow) = nnflow {
            figure_row("  nnflow", pick.1(nnflow));
        }
    }
    if let (Some(nnunet), Some(nnflow)) = (nnunet, nnflow) {
        let total = |a: &Measured, b: &Measured| a.seconds + b.seconds;
        println!(
            "speed-up, planning and preprocessing (nnU-Net wall / nnflow wall): {:.2}x",
            total(&nnunet.planning, &nnunet.preprocessing) / total(&nnflow.planning, &nnflow.preprocessing)
        );
        let (a, b) = (&nnunet.preprocessing, &nnflow.preprocessing);
        let speedup = a.seconds / b.seconds;
        let rss_ratio = b.peaks.tree_rss as f64 / a.peaks.tree_rss as f64;
        let pss_ratio = b.peaks.tree_pss as f64 / a.peaks.tree_pss as f64;
        println!(
            "speed-up, preprocessing with the plan given: {speedup:.2}x   target >= {TARGET_SPEEDUP}x: {}",
            verdict(speedup >= TARGET_SPEEDUP)
        );
        println!(
            "memory, preprocessing (nnflow / nnU-Net peak tree): RSS {rss_ratio:.2}x, PSS {pss_ratio:.2}x   \
             target <= {TARGET_MEMORY_RATIO}x: {}",
            verdict(rss_ratio <= TARGET_MEMORY_RATIO)
        );
    }
    if let Some(nnflow) = nnflow {
        println!("nnflow stages:");
        for stage in &nnflow.stages {
            println!("  {:<40} {:<7} {:>8.2} s", stage.id, stage.outcome, stage.seconds);
        }
    }
    if let (Some(nnunet), Some(nnflow)) = (nnunet, nnflow) {
        compare_plans(nnunet, nnflow);
    }
}

/// Numbers equal to float32 precision: nnU-Net's spacings went through float32 NIfTI headers.
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0)
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        _ => a == b,
    }
}

fn compare_plans(nnunet: &NnunetFigures, nnflow: &NnflowFigures) {
    println!(
        "preprocessed cases: nnU-Net {}, nnflow {}; written to disk: nnU-Net {:.2} GB \
         (preprocessed folder), nnflow {:.2} GB (work folder and cache)",
        nnunet.preprocessed_cases,
        nnflow.preprocessed_cases,
        gb(nnunet.output_bytes),
        gb(nnflow.output_bytes)
    );
    println!("3d_fullres plans:");
    let (Some(theirs), Some(ours)) = (&nnunet.plans, &nnflow.plans) else {
        println!(
            "  not compared: plans found for nnU-Net: {}, for nnflow: {}",
            nnunet.plans.is_some(),
            nnflow.plans.is_some()
        );
        return;
    };
    let (theirs, ours) = (
        &theirs["configurations"]["3d_fullres"],
        &ours["configurations"]["3d_fullres"],
    );
    for key in [
        "patch_size",
        "spacing",
        "batch_size",
        "median_image_size_in_voxels",
    ] {
        let (a, b) = (&theirs[key], &ours[key]);
        let same = if same_value(a, b) { "same" } else { "DIFFERENT" };
        println!("  {key:<28} nnU-Net {a}  nnflow {b}  {same}");
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a harness-less benchmark has nothing to filter.
    let config = Config::from_env();
    ensure_dataset(&config);
    let work = tempfile::Builder::new()
        .prefix("nnflow-bench-preprocess-")
        .tempdir()
        .expect("create the temporary work folder");

    let nnflow = if config.nnflow {
        let folder = work.path().join("nnflow");
        fs::create_dir_all(&folder).expect("create nnflow's work folder");
        bench_nnflow(&config, &folder)
            .inspect_err(|error| println!("nnflow side skipped: {error}"))
            .ok()
    } else {
        None
    };
    let nnunet = if config.nnunet {
        let folder = work.path().join("nnunet");
        fs::create_dir_all(&folder).expect("create nnU-Net's work folder");
        bench_nnunet(&config, &folder)
            .inspect_err(|error| println!("nnU-Net side skipped: {error}"))
            .ok()
    } else {
        None
    };
    print_table(&config, nnunet.as_ref(), nnflow.as_ref());

    if config.keep {
        println!("work folder kept: {}", work.keep().display());
    }
}
