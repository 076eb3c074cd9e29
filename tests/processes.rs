//! Runs that are killed, interrupted, concurrent or watching.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::Project;

/// Waits (bounded) until `condition` holds.
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(project: &Project, args: &[&str]) -> Child {
    project
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn count_files(folder: &Path) -> usize {
    std::fs::read_dir(folder).map_or(0, |entries| entries.count())
}

/// a -> slow -> c; `slow` blocks while the file `hold` exists, after writing half its output.
fn killable_project() -> Project {
    let project = Project::new();
    project.write(
        "p.toml",
        r#"
[stages.a]
kind = "command"
cmd = "echo a > $NNFLOW_OUT/a.txt"
[stages.slow]
kind = "command"
cmd = "echo half > $NNFLOW_OUT/part.txt; touch started; while [ -f hold ]; do sleep 0.05; done; echo done > $NNFLOW_OUT/full.txt"
after = ["a"]
[stages.c]
kind = "command"
cmd = "cat ${slow.outputs}/full.txt > $NNFLOW_OUT/c.txt"
"#,
    );
    project
}

#[test]
fn sigkill_mid_stage_then_rerun_runs_only_the_killed_stage_and_descendants() {
    let project = killable_project();
    project.write("hold", "");
    let mut child = spawn(&project, &["run", "p.toml"]);
    wait_for("the slow stage to start", || {
        project.path().join("started").exists()
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Only `a` was committed; nothing of `slow` is in the cache.
    assert_eq!(count_files(&project.cache.join("entries")), 1);
    assert!(
        !project.path().join(".nnflow/p/out/slow").exists(),
        "a partial output folder looks complete"
    );

    std::fs::remove_file(project.path().join("hold")).unwrap();
    let rerun = project.run(&["p.toml"]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_eq!(rerun.outcome("a"), "cached");
    assert_eq!(rerun.outcome("slow"), "ran");
    assert_eq!(rerun.outcome("c"), "ran");
    assert_eq!(project.read(".nnflow/p/out/c/c.txt"), "done\n");
}

#[test]
fn sigterm_stops_the_running_stage_and_keeps_finished_ones() {
    let project = killable_project();
    project.write("hold", "");
    let child = spawn(&project, &["run", "--json", "p.toml"]);
    wait_for("the slow stage to start", || {
        project.path().join("started").exists()
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", common::stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["interrupted"], true);
    assert_eq!(json["stages"][0]["outcome"], "ran");
    assert_eq!(json["stages"][1]["outcome"], "failed");
    assert_eq!(count_files(&project.cache.join("entries")), 1);

    std::fs::remove_file(project.path().join("hold")).unwrap();
    let rerun = project.run(&["p.toml"]);
    assert_eq!(rerun.with_outcome("ran"), ["c", "slow"]);
}

#[test]
fn independent_stages_run_side_by_side() {
    // Each stage waits for a file the other creates: it only succeeds if both run at once.
    let project = Project::new();
    project.write(
        "p.toml",
        r#"
[stages.left]
kind = "command"
cmd = "touch left; for i in $(seq 200); do [ -f right ] && exit 0; sleep 0.05; done; exit 1"
[stages.right]
kind = "command"
cmd = "touch right; for i in $(seq 200); do [ -f left ] && exit 0; sleep 0.05; done; exit 1"
"#,
    );
    let result = project.run(&["p.toml", "-j", "2"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.with_outcome("ran"), ["left", "right"]);
}

#[test]
fn gpu_stages_get_distinct_devices() {
    let project = Project::new();
    project.write(
        "p.toml",
        r#"
[stages.train]
kind = "command"
matrix = { fold = [0, 1] }
gpus = 1
cmd = "echo $CUDA_VISIBLE_DEVICES > $NNFLOW_OUT/devices; touch started-${fold}; for i in $(seq 200); do [ -f started-0 ] && [ -f started-1 ] && exit 0; sleep 0.05; done; exit 1"
"#,
    );
    let result = project.run(&["p.toml", "-j", "2", "--gpus", "0,1"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    let mut devices = vec![
        project.read(".nnflow/p/out/train/fold=0/devices"),
        project.read(".nnflow/p/out/train/fold=1/devices"),
    ];
    devices.sort();
    assert_eq!(devices, ["0\n", "1\n"]);

    let too_many = project.nnflow(&["run", "p.toml", "--gpus", "0", "--set", "train.gpus=2"]);
    assert_eq!(too_many.status.code(), Some(2));
    assert!(common::stderr(&too_many).contains("needs 2 GPU(s) but 1 are available"));
}

#[test]
fn two_runs_on_one_work_directory_run_each_stage_once() {
    let project = Project::new();
    project.write(
        "p.toml",
        r#"
[stages.a]
kind = "command"
cmd = "echo run >> executions.log; sleep 0.5; echo a > $NNFLOW_OUT/a.txt"
[stages.b]
kind = "command"
cmd = "echo run >> executions.log; cat ${a.outputs}/a.txt > $NNFLOW_OUT/b.txt"
"#,
    );
    let first = spawn(&project, &["run", "p.toml"]);
    let second = spawn(&project, &["run", "p.toml"]);
    assert!(first.wait_with_output().unwrap().status.success());
    assert!(second.wait_with_output().unwrap().status.success());
    assert_eq!(project.read("executions.log"), "run\nrun\n");
    assert_eq!(project.read(".nnflow/p/out/b/b.txt"), "a\n");
    assert!(project.run(&["p.toml"]).with_outcome("ran").is_empty());
}

#[test]
fn watch_reruns_a_stage_after_its_input_changes() {
    let project = Project::new();
    project.write("in.txt", "one\n");
    project.write(
        "p.toml",
        r#"
[stages.copy]
kind = "command"
cmd = "mkdir -p out && cat in.txt > out/copy.txt"
inputs = ["in.txt"]
outputs = ["out/copy.txt"]
"#,
    );
    let mut watcher = spawn(&project, &["watch", "p.toml", "--debounce-ms", "100"]);
    let copy = project.path().join("out/copy.txt");
    wait_for("the first run", || {
        std::fs::read_to_string(&copy).is_ok_and(|t| t == "one\n")
    });
    project.write("in.txt", "two\n");
    wait_for("the re-run after the change", || {
        std::fs::read_to_string(&copy).is_ok_and(|t| t == "two\n")
    });
    // A failing change keeps the watcher alive; the next good change runs again.
    project.write(
        "p.toml",
        "[stages.copy]\nkind = \"command\"\ncmd = \"exit 1\"\ninputs = [\"in.txt\"]\noutputs = [\"out/copy.txt\"]\n",
    );
    std::thread::sleep(Duration::from_millis(500));
    project.write(
        "p.toml",
        "[stages.copy]\nkind = \"command\"\ncmd = \"mkdir -p out && cat in.txt in.txt > out/copy.txt\"\ninputs = [\"in.txt\"]\noutputs = [\"out/copy.txt\"]\n",
    );
    wait_for("the run after the pipeline changed", || {
        std::fs::read_to_string(&copy).is_ok_and(|t| t == "two\ntwo\n")
    });
    assert!(
        watcher.try_wait().unwrap().is_none(),
        "the watcher is still running"
    );
    watcher.kill().unwrap();
    watcher.wait().unwrap();
}
