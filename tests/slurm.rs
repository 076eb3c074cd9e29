//! The Slurm executor on a real one-node cluster (`scripts/slurm-cluster.sh`, started by
//! `scripts/test` when it can; `.ci/run` sets `NNFLOW_REQUIRE_SLURM=1` so a missing cluster fails
//! there instead of skipping): job arrays, dependencies, GPUs, failures, detach / status / cancel,
//! and the demo pipeline giving the same predictions as locally.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{stdout, Project};

/// The tests share one small cluster: run one at a time, so each gets its CPUs and GPUs.
static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the cluster for one test; `None` when no Slurm cluster answers, which passes vacuously
/// only where a cluster is not required.
fn cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cluster_answers().then_some(guard)
}

fn cluster_answers() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty());
    if !up {
        assert!(
            std::env::var("NNFLOW_REQUIRE_SLURM").as_deref() != Ok("1"),
            "NNFLOW_REQUIRE_SLURM=1 but no Slurm cluster answers (scripts/slurm-cluster.sh start)"
        );
        eprintln!("skipped: no Slurm cluster (start one with scripts/slurm-cluster.sh start, as root)");
    }
    up
}

fn slurm_run(project: &Project, args: &[&str]) -> common::RunResult {
    let mut full = vec!["p.toml", "--executor", "slurm"];
    full.extend_from_slice(args);
    project.run(&full)
}

/// The latest Slurm run's `run.json`.
fn latest_run(project: &Project, pipeline: &str) -> serde_json::Value {
    let state = project.path().join(".nnflow").join(pipeline).join("slurm");
    let id = std::fs::read_to_string(state.join("latest")).unwrap();
    serde_json::from_str(&std::fs::read_to_string(state.join(id.trim()).join("run.json")).unwrap()).unwrap()
}

/// `<start> <end>` in nanoseconds, written by a stage.
fn interval(project: &Project, file: &str) -> (u128, u128) {
    let text = project.read(file);
    let mut parts = text.split_whitespace().map(|p| p.parse::<u128>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn a_matrix_stage_is_one_job_array_and_its_dependent_waits_for_it() {
    let Some(_cluster) = cluster() else {
        return;
    };
    let project = Project::with_pipeline(
        r#"
[pipeline]
name = "s"
[stages.fit]
kind = "command"
matrix = { fold = [0, 1, 2] }
cmd = "s=$(date +%s%N); sleep 1; echo $s $(date +%s%N) > $NNFLOW_OUT/time.txt # fold ${fold}"
[stages.report]
kind = "command"
cmd = "echo $(date +%s%N) $(date +%s%N) > $NNFLOW_OUT/time.txt"
after = ["fit"]
"#,
    );
    let first = slurm_run(&project, &[]);
    assert_eq!(first.code, 0, "{}\n{}", first.stderr, first.json);
    assert_eq!(
        first.with_outcome("ran"),
        ["fit[fold=0]", "fit[fold=1]", "fit[fold=2]", "report"]
    );
    let run = latest_run(&project, "s");
    let jobs = run["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{run}");
    assert_eq!(jobs[0]["stage"], "fit");
    assert_eq!(
        jobs[0]["instances"].as_array().unwrap().len(),
        3,
        "one array of three"
    );
    let name = run["job_name"].as_str().unwrap();
    let squeue = Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "--name", name, "-o", "%i"])
        .output()
        .unwrap();
    // the filesystem probe, three array tasks and the report
    assert_eq!(
        String::from_utf8_lossy(&squeue.stdout).lines().count(),
        5,
        "one job name covers the run"
    );
    let report_start = interval(&project, ".nnflow/s/out/report/time.txt").0;
    for fold in 0..3 {
        let (_, end) = interval(&project, &format!(".nnflow/s/out/fit/fold={fold}/time.txt"));
        assert!(report_start > end, "report started before fit[fold={fold}] ended");
    }

    let second = slurm_run(&project, &[]);
    assert_eq!(second.code, 0);
    assert!(second.with_outcome("ran").is_empty());
    assert_eq!(
        latest_run(&project, "s")["run_id"],
        run["run_id"],
        "nothing was submitted"
    );
}

#[test]
fn a_work_directory_the_jobs_cannot_reach_fails_before_anything_is_submitted() {
    let Some(_cluster) = cluster() else {
        return;
    };
    // Jobs run as `nobody`, who cannot enter the project's private (0700) temporary folder: the
    // one-node cluster's way of not sharing the filesystem.
    let project = Project::with_pipeline(
        r#"
[pipeline]
name = "u"
slurm = { extra = ["--uid=nobody"] }
[stages.one]
kind = "command"
cmd = "echo never > $NNFLOW_OUT/x.txt"
"#,
    );
    let result = slurm_run(&project, &[]);
    assert_eq!(result.code, 1, "{}", result.stderr);
    assert!(
        result.stderr.contains("cannot use this work directory"),
        "{}",
        result.stderr
    );
    assert!(
        result.stderr.contains("Nothing was submitted"),
        "{}",
        result.stderr
    );
    assert!(!project.path().join(".nnflow/u/slurm/latest").exists());
    assert!(!project.path().join(".nnflow/u/out/one").exists());
}

#[test]
fn two_gpu_stages_run_side_by_side_on_different_devices() {
    let Some(_cluster) = cluster() else {
        return;
    };
    let project = Project::with_pipeline(
        r#"
[pipeline]
name = "g"
[stages.gpu]
kind = "command"
matrix = { fold = [0, 1] }
gpus = 1
cmd = "s=$(date +%s%N); sleep 2; echo $s $(date +%s%N) > $NNFLOW_OUT/time.txt; echo $CUDA_VISIBLE_DEVICES > $NNFLOW_OUT/gpu.txt # ${fold}"
"#,
    );
    let result = slurm_run(&project, &[]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    let gpu = |fold: usize| {
        project
            .read(&format!(".nnflow/g/out/gpu/fold={fold}/gpu.txt"))
            .trim()
            .to_string()
    };
    assert_ne!(gpu(0), gpu(1));
    assert!(!gpu(0).is_empty() && !gpu(1).is_empty());
    let (a0, a1) = interval(&project, ".nnflow/g/out/gpu/fold=0/time.txt");
    let (b0, b1) = interval(&project, ".nnflow/g/out/gpu/fold=1/time.txt");
    assert!(a0 < b1 && b0 < a1, "the two GPU jobs did not overlap");
}

#[test]
fn a_failing_stage_cancels_its_descendants_and_the_run_exits_1() {
    let Some(_cluster) = cluster() else {
        return;
    };
    let project = Project::with_pipeline(
        r#"
[pipeline]
name = "f"
[stages.good]
kind = "command"
cmd = "echo ok > $NNFLOW_OUT/ok.txt"
[stages.bad]
kind = "command"
cmd = "echo broken >&2; exit 3"
[stages.child]
kind = "command"
cmd = "echo never"
after = ["bad"]
[stages.grandchild]
kind = "command"
cmd = "echo never"
after = ["child", "good"]
"#,
    );
    let result = slurm_run(&project, &[]);
    assert_eq!(result.code, 1, "{}\n{}", result.stderr, result.json);
    assert_eq!(result.outcome("good"), "ran");
    assert_eq!(result.outcome("bad"), "failed");
    assert_eq!(result.outcome("child"), "skipped");
    assert_eq!(result.outcome("grandchild"), "skipped");
    let bad = result.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "bad")
        .unwrap()
        .clone();
    assert!(bad["error"].as_str().unwrap().contains("broken"), "{bad}");
    // Slurm itself cancelled the descendants' jobs (--kill-on-invalid-dep) rather than leaving
    // them pending
    let run = latest_run(&project, "f");
    let name = run["job_name"].as_str().unwrap();
    let squeue = Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "--name", name, "-o", "%i|%T"])
        .output()
        .unwrap();
    let states = String::from_utf8_lossy(&squeue.stdout).into_owned();
    for stage in ["child", "grandchild"] {
        let job = run["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["stage"] == stage)
            .unwrap();
        let task = format!("{}_0|", job["job_id"].as_str().unwrap());
        let line = states.lines().find(|l| l.starts_with(&task)).unwrap_or_default();
        assert!(line.ends_with("CANCELLED"), "{stage}: {line:?} in\n{states}");
    }
}

#[test]
fn detach_status_and_cancel_then_the_next_run_submits_only_what_is_missing() {
    let Some(_cluster) = cluster() else {
        return;
    };
    let project = Project::new();
    let pipeline = |seconds: u32| {
        format!(
            r#"
[pipeline]
name = "d"
[stages.quick]
kind = "command"
cmd = "echo quick > $NNFLOW_OUT/q.txt"
[stages.slow]
kind = "command"
cmd = "sleep {seconds}; echo slow > $NNFLOW_OUT/s.txt"
after = ["quick"]
"#
        )
    };
    project.write("p.toml", &pipeline(300));
    let submitted = project.nnflow(&["run", "p.toml", "--executor", "slurm", "--detach", "--json"]);
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let run: serde_json::Value = serde_json::from_str(&stdout(&submitted)).unwrap();
    assert_eq!(run["jobs"].as_array().unwrap().len(), 2);

    // status follows the run: quick finishes, slow runs
    let state_of = |id: &str| -> String {
        let output = project.nnflow(&["status", "p.toml", "--json"]);
        let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        value["slurm"]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .map(|i| i["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(state_of("quick") == "done" && state_of("slow") == "running") {
        assert!(
            Instant::now() < deadline,
            "quick {} / slow {}",
            state_of("quick"),
            state_of("slow")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let cancelled = project.nnflow(&["cancel", "p.toml"]);
    assert!(
        cancelled.status.success(),
        "{}",
        String::from_utf8_lossy(&cancelled.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !state_of("slow").starts_with("failed") {
        assert!(Instant::now() < deadline, "slow is {}", state_of("slow"));
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !state_of("slow").contains("CANCELLED") {
        assert!(Instant::now() < deadline, "slow is {}", state_of("slow"));
        std::thread::sleep(Duration::from_millis(300));
    }

    // the next run resubmits only the cancelled stage
    project.write("p.toml", &pipeline(0));
    let rerun = slurm_run(&project, &[]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_eq!(rerun.outcome("quick"), "cached");
    assert_eq!(rerun.outcome("slow"), "ran");
    let jobs = latest_run(&project, "d")["jobs"].clone();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["stage"], "slow");
}

#[test]
fn the_demo_pipeline_through_slurm_predicts_what_it_predicts_locally() {
    let Some(_cluster) = cluster() else {
        return;
    };
    let predictions = |executor: &str| -> Vec<Vec<u8>> {
        let project = Project::new();
        project.copy_pipelines(&["nnunet.toml", "demo.toml"]);
        let args = [
            "pipelines/demo.toml",
            "--executor",
            executor,
            "--set",
            "folds=[0, 1]",
            "--set",
            "train.epochs=4",
        ];
        let result = project.run(&args);
        assert_eq!(result.code, 0, "{executor}: {}\n{}", result.stderr, result.json);
        assert_eq!(result.outcome("predict"), "ran", "{executor}");
        (0..3)
            .map(|i| {
                let path = project
                    .path()
                    .join(format!("pipelines/demo-data/predictions/test_{i:03}.nii.gz"));
                let (labels, _) = nnflow::data::nifti::read_integer_labels(&path).unwrap();
                labels.iter().map(|&v| v as u8).collect()
            })
            .collect()
    };
    assert_eq!(predictions("slurm"), predictions("local"));
}
