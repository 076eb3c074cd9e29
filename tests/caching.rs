//! The cache from the user's side: what runs, what is restored, and why.

mod common;

use common::{stdout, Project};

/// prep -> train[fold=0|1] -> report, with a command stage writing a declared project output.
fn three_stage_project() -> Project {
    let project = Project::new();
    project.write("data/a.txt", "hello\n");
    project.write("data/b.txt", "world\n");
    project.write(
        "p.toml",
        r#"
[pipeline]
name = "t"
[vars]
folds = [0, 1]
[stages.prep]
kind = "command"
cmd = "mkdir -p out && cat data/a.txt data/b.txt | tr a-z A-Z > out/prep.txt"
inputs = ["data/a.txt", "data/b.txt"]
outputs = ["out/prep.txt"]
params = { level = 3 }
[stages.train]
kind = "command"
matrix = { fold = "${folds}" }
cmd = "cat out/prep.txt > $NNFLOW_OUT/model.txt && echo fold ${fold} lr $NNFLOW_PARAM_LR >> $NNFLOW_OUT/model.txt"
inputs = ["out/prep.txt"]
params = { lr = 0.01 }
[stages.report]
kind = "command"
cmd = "mkdir -p out && for m in ${train[*].outputs}; do cat $m/model.txt; done > out/report.txt"
outputs = ["out/report.txt"]
"#,
    );
    project
}

const ALL: [&str; 4] = ["prep", "report", "train[fold=0]", "train[fold=1]"];

#[test]
fn first_run_executes_everything_and_second_run_nothing() {
    let project = three_stage_project();
    let first = project.run(&["p.toml"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.with_outcome("ran"), ALL);
    assert_eq!(
        project.read("out/report.txt"),
        "HELLO\nWORLD\nfold 0 lr 0.01\nHELLO\nWORLD\nfold 1 lr 0.01\n"
    );
    let second = project.run(&["p.toml"]);
    assert_eq!(second.code, 0);
    assert_eq!(second.with_outcome("cached"), ALL);
    assert!(second.with_outcome("ran").is_empty());
}

#[test]
fn changed_parameter_reruns_exactly_that_stage_and_descendants_and_status_names_it() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let status = project.nnflow(&["status", "p.toml", "--set", "train.params.lr=0.02"]);
    let text = stdout(&status);
    assert!(text.contains("params.params.lr: 0.01 -> 0.02"), "{text}");
    assert!(text.contains("fresh  prep"), "{text}");

    let rerun = project.run(&["p.toml", "--set", "train.params.lr=0.02"]);
    assert_eq!(
        rerun.with_outcome("ran"),
        ["report", "train[fold=0]", "train[fold=1]"]
    );
    assert_eq!(rerun.with_outcome("cached"), ["prep"]);
    assert!(project.read("out/report.txt").contains("lr 0.02"));
}

#[test]
fn changed_variable_on_the_command_line_reruns_only_affected_instances() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let rerun = project.run(&["p.toml", "--set", "folds=[0, 1, 2]"]);
    assert_eq!(rerun.with_outcome("ran"), ["report", "train[fold=2]"]);
    assert_eq!(
        rerun.with_outcome("cached"),
        ["prep", "train[fold=0]", "train[fold=1]"]
    );
}

#[test]
fn touching_a_file_reruns_nothing_but_changing_it_reruns_its_consumers() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let input = project.path().join("data/b.txt");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&input)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let touched = project.run(&["p.toml"]);
    assert!(touched.with_outcome("ran").is_empty(), "{}", touched.json);

    project.write("data/b.txt", "there\n");
    let status = stdout(&project.nnflow(&["status", "p.toml"]));
    assert!(status.contains("input data/b.txt changed"), "{status}");
    let changed = project.run(&["p.toml"]);
    assert_eq!(changed.with_outcome("ran"), ALL);
    assert!(project.read("out/report.txt").starts_with("HELLO\nTHERE\n"));
}

#[test]
fn unchanged_upstream_output_stops_the_rerun() {
    // A change that leaves prep's output identical re-runs prep only: its consumers key on the
    // content of what it produced, not on the fact that it ran.
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let rerun = project.run(&["p.toml", "--set", "prep.params.level=4"]);
    assert_eq!(rerun.with_outcome("ran"), ["prep"]);
    assert_eq!(
        rerun.with_outcome("cached"),
        ["report", "train[fold=0]", "train[fold=1]"]
    );
}

#[test]
fn a_copy_of_the_project_with_the_same_cache_is_all_cached() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let copy = Project::new();
    for file in ["p.toml", "data/a.txt", "data/b.txt"] {
        copy.write(file, &project.read(file));
    }
    let mut command = copy.command(&["run", "--json", "p.toml"]);
    command.env("NNFLOW_CACHE_DIR", &project.cache);
    let output = command.output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let outcomes: Vec<&str> = json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["cached"; 4], "{json}");
    // Restored, not recomputed: the outputs are back in the copy's folder.
    assert_eq!(copy.read("out/report.txt"), project.read("out/report.txt"));
    assert_eq!(copy.read("out/prep.txt"), "HELLO\nWORLD\n");
}

#[test]
fn deleted_output_is_restored_from_the_cache() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    std::fs::remove_file(project.path().join("out/prep.txt")).unwrap();
    let status = stdout(&project.nnflow(&["status", "p.toml"]));
    assert!(
        status.contains("output project/out/prep.txt is missing"),
        "{status}"
    );
    let rerun = project.run(&["p.toml"]);
    assert!(rerun.with_outcome("ran").is_empty(), "{}", rerun.json);
    assert_eq!(project.read("out/prep.txt"), "HELLO\nWORLD\n");
}

#[test]
fn altered_cache_entry_is_detected_and_recomputed() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    // Damage every blob, then remove the work folder so outputs must come from the cache.
    for entry in walk(&project.cache.join("blobs")) {
        std::fs::write(&entry, b"garbage").unwrap();
    }
    std::fs::remove_dir_all(project.path().join(".nnflow")).unwrap();
    std::fs::remove_dir_all(project.path().join("out")).unwrap();
    let rerun = project.run(&["p.toml"]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_eq!(rerun.with_outcome("ran"), ALL);
    assert!(rerun.stderr.contains("damaged"), "{}", rerun.stderr);
    assert_eq!(project.read("out/prep.txt"), "HELLO\nWORLD\n");
}

#[test]
fn failed_stage_leaves_no_cache_entry_and_keep_going_runs_the_rest() {
    let project = Project::new();
    project.write(
        "p.toml",
        r#"
[stages.bad]
kind = "command"
cmd = "echo partial > $NNFLOW_OUT/x; echo oops >&2; exit 3"
[stages.after_bad]
kind = "command"
cmd = "true"
after = ["bad"]
[stages.independent]
kind = "command"
cmd = "echo fine > $NNFLOW_OUT/x"
"#,
    );
    let result = project.run(&["p.toml", "--keep-going", "-j", "1"]);
    assert_eq!(result.code, 1);
    assert_eq!(result.outcome("bad"), "failed");
    assert_eq!(result.outcome("after_bad"), "skipped");
    assert_eq!(result.outcome("independent"), "ran");
    let error = result.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "bad")
        .unwrap()["error"]
        .to_string();
    assert!(error.contains("oops"), "the log tail names the failure: {error}");
    // Only the independent stage's entry exists.
    assert_eq!(walk(&project.cache.join("entries")).len(), 1);
}

#[test]
fn without_keep_going_a_failure_stops_the_run() {
    let project = Project::new();
    project.write(
        "p.toml",
        r#"
[stages.a]
kind = "command"
cmd = "exit 1"
[stages.b]
kind = "command"
cmd = "true"
after = ["a"]
"#,
    );
    let result = project.run(&["p.toml"]);
    assert_eq!(result.code, 1);
    assert_eq!(result.outcome("a"), "failed");
    assert_eq!(result.outcome("b"), "skipped");
}

#[test]
fn force_reruns_a_fresh_stage_and_dry_run_runs_nothing() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let forced = project.run(&["p.toml", "--force", "prep"]);
    // prep's output is identical, so its consumers stay cached.
    assert_eq!(forced.with_outcome("ran"), ["prep"]);

    let dry = project.nnflow(&["run", "--dry-run", "p.toml", "--set", "train.params.lr=1"]);
    let text = stdout(&dry);
    assert!(text.contains("run  train[fold=0]"), "{text}");
    assert!(!project.read("out/report.txt").contains("lr 1\n"));
    assert_eq!(project.run(&["p.toml"]).with_outcome("cached"), ALL);
}

#[test]
fn running_a_named_stage_runs_its_ancestors_only() {
    let project = three_stage_project();
    let result = project.run(&["p.toml", "train[fold=1]"]);
    assert_eq!(result.with_outcome("ran"), ["prep", "train[fold=1]"]);
    let unknown = project.nnflow(&["run", "p.toml", "nope"]);
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn declared_environment_is_part_of_the_key() {
    let project = Project::new();
    project.write(
        "p.toml",
        "[stages.e]\nkind = \"command\"\ncmd = \"echo $GREETING > $NNFLOW_OUT/g\"\nenv = [\"GREETING\"]\n",
    );
    let run = |value: &str| {
        let output = project
            .command(&["run", "--json", "p.toml"])
            .env("GREETING", value)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["stages"][0]["outcome"].as_str().unwrap().to_string()
    };
    assert_eq!(run("hello"), "ran");
    assert_eq!(run("hello"), "cached");
    assert_eq!(run("bye"), "ran");
    let status = project
        .command(&["status", "p.toml"])
        .env("GREETING", "again")
        .output()
        .unwrap();
    assert!(
        stdout(&status).contains("environment $GREETING changed"),
        "{}",
        stdout(&status)
    );
}

#[test]
fn gc_removes_unreferenced_entries_and_keeps_current_ones() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    assert_eq!(project.run(&["p.toml", "--set", "train.params.lr=0.5"]).code, 0);
    let before = walk(&project.cache.join("entries")).len();
    let gc = project.nnflow(&["gc", "p.toml", "--set", "train.params.lr=0.5"]);
    assert_eq!(gc.status.code(), Some(0));
    let text = stdout(&gc);
    assert!(text.contains("removed 3 cache entries"), "{text}");
    let freed: u64 = text
        .split("freed ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(freed > 0, "{text}");
    assert_eq!(walk(&project.cache.join("entries")).len(), before - 3);
    std::fs::remove_dir_all(project.path().join(".nnflow")).unwrap();
    let again = project.run(&["p.toml", "--set", "train.params.lr=0.5"]);
    assert_eq!(again.with_outcome("cached"), ALL);
}

#[test]
fn lock_file_records_key_components_and_output_digests() {
    let project = three_stage_project();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let lock: serde_json::Value = serde_json::from_str(&project.read(".nnflow/t/nnflow.lock")).unwrap();
    let prep = &lock["stages"][0];
    assert_eq!(prep["id"], "prep");
    assert_eq!(prep["components"]["params"]["params"]["level"], 3);
    assert_eq!(
        prep["components"]["inputs"]["data/a.txt"],
        blake3::hash(b"hello\n").to_hex().as_str()
    );
    assert_eq!(
        prep["outputs"]["project/out/prep.txt"],
        blake3::hash(b"HELLO\nWORLD\n").to_hex().as_str()
    );
    assert_eq!(lock["stages"].as_array().unwrap().len(), 4);
}

/// The key of a fixed stage definition. If this changes, every user's cache is invalidated:
/// change it only on purpose (and say so in the release notes).
#[test]
fn pinned_key_of_a_fixed_stage() {
    let project = Project::new();
    project.write("in.txt", "fixed input\n");
    project.write(
        "p.toml",
        "[stages.s]\nkind = \"command\"\ncmd = \"cat in.txt > $NNFLOW_OUT/o\"\ninputs = [\"in.txt\"]\nparams = { a = 1, b = \"x\" }\n",
    );
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let lock: serde_json::Value = serde_json::from_str(&project.read(".nnflow/p/nnflow.lock")).unwrap();
    assert_eq!(
        lock["stages"][0]["key"], PINNED_KEY,
        "{}",
        lock["stages"][0]["components"]
    );
}

/// Changed when the key's `libtorch_version` became `toolchain` (issue 15).
const PINNED_KEY: &str = "c115a305385e7e29bc6612d247a14996bfa0a83ce4ee5cd8eaf7cfc40ed5f277";

fn walk(folder: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(folder) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A matrix stage whose instances take different parameters and inputs: an override for one
/// configuration, and a stage reading only the instances of one configuration
/// (`${train[config=low].outputs}`), as nnU-Net's cascade reads its low-resolution trainings.
fn override_pipeline(low_lr: &str) -> String {
    format!(
        r#"
[pipeline]
name = "t"
[stages.train]
kind = "command"
matrix = {{ config = ["full", "low"], fold = [0, 1] }}
cmd = "echo ${{config}} ${{fold}} lr $NNFLOW_PARAM_LR > $NNFLOW_OUT/model.txt"
params = {{ lr = 0.01 }}
[[stages.train.instance_overrides]]
where = {{ config = "low" }}
params = {{ lr = {low_lr} }}
[stages.next]
kind = "command"
cmd = "for m in ${{train[config=low].outputs}}; do cat $m/model.txt; done > $NNFLOW_OUT/all.txt && cat ${{train[config=full,fold=1].outputs}}/model.txt >> $NNFLOW_OUT/all.txt"
"#
    )
}

#[test]
fn overrides_apply_to_their_instances_and_filtered_references_depend_on_those_only() {
    let project = Project::new();
    project.write("p.toml", &override_pipeline("0.5"));
    let first = project.run(&["p.toml"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let out = project.path().join(".nnflow/t/out");
    let read = |file: &str| std::fs::read_to_string(out.join(file)).unwrap();
    assert_eq!(read("train/config=low,fold=0/model.txt"), "low 0 lr 0.5\n");
    assert_eq!(read("train/config=full,fold=0/model.txt"), "full 0 lr 0.01\n");
    assert_eq!(
        read("next/all.txt"),
        "low 0 lr 0.5\nlow 1 lr 0.5\nfull 1 lr 0.01\n"
    );

    // Changing the override reruns the low instances and their consumer only.
    project.write("p.toml", &override_pipeline("0.7"));
    let rerun = project.run(&["p.toml"]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_eq!(
        rerun.with_outcome("ran"),
        ["next", "train[config=low,fold=0]", "train[config=low,fold=1]"]
    );
    assert_eq!(
        rerun.with_outcome("cached"),
        ["train[config=full,fold=0]", "train[config=full,fold=1]"]
    );
    assert!(read("next/all.txt").contains("low 1 lr 0.7"));
}
