//! nnflow never deletes or overwrites what it did not create, never writes outside the project, and
//! never stores a result under a key that does not describe what the stage read (issue 14). Every
//! case runs the real binary the way a user with an ordinary mistake or a second terminal would.

mod common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{stderr, Project};

/// `nnflow validate` and `nnflow run` both refuse with exit 2 before anything runs; the report.
fn refused(project: &Project, extra: &[&str]) -> String {
    let mut validate = vec!["validate", "p.toml"];
    validate.extend_from_slice(extra);
    let output = project.nnflow(&validate);
    let report = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "validate accepted it:\n{report}");
    let mut run = vec!["run", "p.toml"];
    run.extend_from_slice(extra);
    let output = project.nnflow(&run);
    assert_eq!(
        output.status.code(),
        Some(2),
        "run accepted it:\n{}",
        stderr(&output)
    );
    assert!(
        !project.path().join("ran").exists(),
        "a stage ran although the pipeline was refused"
    );
    report
}

fn writer(output: &str) -> String {
    format!(
        r#"[stages.w]
kind = "command"
cmd = "touch ran; rm -rf {output}; mkdir -p {output}"
outputs = ["{output}"]
"#
    )
}

/// A folder beside the project with a file in it, which no run may touch.
fn victim(project: &Project) -> std::path::PathBuf {
    let victim = project.path().join("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("precious.txt"), "keep me").unwrap();
    victim
}

#[test]
fn outputs_outside_the_project_are_refused_at_their_position() {
    let project = Project::new();
    let inner = project.path().join("proj");
    fs::create_dir_all(&inner).unwrap();
    let victim = victim(&project);
    let nested = Project {
        dir: tempfile::tempdir_in(&inner).unwrap(),
        cache: project.cache.clone(),
    };
    let relative_victim = pathdiff(&victim, nested.path());
    for output in [
        relative_victim.clone(),
        victim.to_string_lossy().into_owned(),
        format!("sub/../{relative_victim}"),
    ] {
        nested.write("p.toml", &writer(&output));
        let report = refused(&nested, &[]);
        assert!(report.contains("p.toml:4:"), "no position:\n{report}");
        assert!(report.contains("outside the project folder"), "{report}");
        assert_eq!(
            fs::read_to_string(victim.join("precious.txt")).unwrap(),
            "keep me"
        );
    }
}

/// `a` relative to `base` (both absolute, `base` inside `a`'s parent chain or beside it).
fn pathdiff(target: &Path, base: &Path) -> String {
    let base: Vec<_> = base.components().collect();
    let target_parts: Vec<_> = target.components().collect();
    let common = base.iter().zip(&target_parts).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); base.len() - common];
    parts.extend(
        target_parts[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

#[test]
fn the_project_folder_itself_is_never_an_output() {
    let project = Project::with_pipeline(
        r#"[vars]
result = "results"
[stages.w]
kind = "command"
cmd = "touch ran"
outputs = ["${result}"]
"#,
    );
    project.write("data/keep.txt", "keep");
    let report = refused(&project, &["--set", "result=."]);
    assert!(report.contains("is the project folder itself"), "{report}");
    assert!(report.contains("--set result=."), "no position:\n{report}");
    assert_eq!(project.read("data/keep.txt"), "keep");
    assert!(project.path().join("p.toml").exists());
}

#[test]
fn outputs_overlapping_inputs_pipeline_files_or_work_dir_are_refused() {
    for (outputs, inputs, expected) in [
        ("data", "data/x.txt", "the stage's own input"),
        ("data/x.txt", "data", "the stage's own input"),
        ("p.toml", "", "the pipeline file"),
        (".nnflow", "", "work directory"),
        ("res", "", "its other output"),
    ] {
        let mut outputs_list = format!("\"{outputs}\"");
        if outputs == "res" {
            outputs_list = "\"res\", \"res/../res/x\"".into();
        }
        let inputs_list = if inputs.is_empty() {
            String::new()
        } else {
            format!("\"{inputs}\"")
        };
        let project = Project::with_pipeline(&format!(
            r#"[stages.w]
kind = "command"
cmd = "touch ran"
inputs = [{inputs_list}]
outputs = [{outputs_list}]
"#
        ));
        project.write("data/x.txt", "input");
        let report = refused(&project, &[]);
        assert!(report.contains(expected), "{outputs}: {report}");
        assert_eq!(project.read("data/x.txt"), "input");
    }
}

#[test]
fn aliases_of_another_stages_output_are_one_output() {
    let project = Project::new();
    let absolute = project.path().canonicalize().unwrap().join("out.txt");
    project.write(
        "p.toml",
        &format!(
            r#"[stages.a]
kind = "command"
cmd = "touch ran; echo a > out.txt"
outputs = ["out.txt"]
[stages.b]
kind = "command"
cmd = "touch ran; echo b > x/../out.txt"
outputs = ["x/../out.txt"]
[stages.c]
kind = "command"
cmd = "touch ran"
outputs = ["{}"]
"#,
            absolute.display()
        ),
    );
    let report = refused(&project, &[]);
    assert!(
        report.contains("stages `a` and `b` both claim output `out.txt`"),
        "{report}"
    );
    assert!(
        report.contains("stages `a` and `c` both claim output `out.txt`"),
        "{report}"
    );
}

#[test]
fn name_and_work_dir_stay_inside_the_project() {
    for (section, expected) in [
        ("name = \"../escape\"", "plain file name"),
        ("name = \"..\"", "plain file name"),
        ("work_dir = \"..\"", "outside the project folder"),
        ("work_dir = \".\"", "project folder itself"),
        ("work_dir = \"/tmp\"", "outside the project folder"),
    ] {
        let project = Project::with_pipeline(&format!(
            "[pipeline]\n{section}\n[stages.w]\nkind = \"command\"\ncmd = \"touch ran\"\n"
        ));
        let report = refused(&project, &[]);
        assert!(report.contains(expected), "{section}: {report}");
        assert!(report.contains("p.toml:2:"), "{section}: no position: {report}");
    }
}

#[test]
fn matrix_values_cannot_move_an_outputs_folder() {
    let project = Project::new();
    let nested = project.path().join("proj");
    fs::create_dir_all(&nested).unwrap();
    fs::write(
        nested.join("p.toml"),
        r#"[stages.w]
kind = "command"
matrix = { v = ["../../../escaped", "a/b", "a_b"] }
cmd = "echo ${v} > $NNFLOW_OUT/v.txt"
"#,
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nnflow"))
        .args(["run", "p.toml"])
        .current_dir(&nested)
        .env("NNFLOW_CACHE_DIR", &project.cache)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(!project.path().join("escaped").exists());
    let out = nested.join(".nnflow/p/out/w");
    let mut folders: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    assert_eq!(folders.len(), 3, "{folders:?}");
    for folder in &folders {
        assert!(out.join(folder).join("v.txt").is_file(), "{folder}");
    }
    // `a/b` and `a_b` are different instances with different folders and records
    let a_b = fs::read_to_string(out.join("v=a_b/v.txt")).unwrap();
    let a_slash_b = fs::read_to_string(out.join("v=a%2Fb/v.txt")).unwrap();
    assert_eq!((a_b.trim(), a_slash_b.trim()), ("a_b", "a/b"));
}

#[test]
fn an_output_folder_holding_foreign_files_is_refused_not_wiped() {
    let project = Project::with_pipeline(
        r#"[stages.w]
kind = "command"
cmd = "mkdir -p results && echo $NNFLOW_PARAM_N > results/model.txt"
outputs = ["results"]
params = { n = 1 }
"#,
    );
    project.write("results/notes.txt", "my notes");
    let run = project.run(&["p.toml"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let error = run.json["stages"][0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("results/notes.txt"), "{error}");
    assert!(error.contains("did not write"), "{error}");
    assert_eq!(project.read("results/notes.txt"), "my notes");

    // Moved away, nnflow owns the folder; changing a parameter replaces its own files only.
    fs::rename(
        project.path().join("results/notes.txt"),
        project.path().join("notes.txt"),
    )
    .unwrap();
    assert_eq!(project.run(&["p.toml"]).code, 0);
    assert_eq!(project.read("results/model.txt").trim(), "1");
    let rerun = project.run(&["p.toml", "--set", "w.params.n=2"]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_eq!(project.read("results/model.txt").trim(), "2");
    // a cache hit restores over nnflow's own file, but not over one the user put there
    project.write("results/user.txt", "mine");
    let back = project.run(&["p.toml"]);
    assert_eq!(back.code, 1, "{}", back.stderr);
    let error = back.json["stages"][0]["error"].as_str().unwrap();
    assert!(error.contains("results/user.txt"), "{error}");
    assert_eq!(project.read("results/user.txt"), "mine");
    assert_eq!(project.read("results/model.txt").trim(), "2");
}

#[test]
fn a_cache_folder_that_is_not_a_cache_is_refused() {
    let project =
        Project::with_pipeline("[stages.w]\nkind = \"command\"\ncmd = \"echo x > $NNFLOW_OUT/x\"\n");
    let documents = project.path().join("documents");
    fs::create_dir_all(documents.join("tmp")).unwrap();
    fs::write(documents.join("tmp/report.txt"), "old but mine").unwrap();
    fs::write(documents.join("letter.txt"), "mine").unwrap();
    let output = project
        .command(&["run", "p.toml"])
        .env("NNFLOW_CACHE_DIR", &documents)
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("not an nnflow cache"),
        "{}",
        stderr(&output)
    );
    assert_eq!(fs::read_to_string(documents.join("letter.txt")).unwrap(), "mine");
    assert!(documents.join("tmp/report.txt").exists());
}

/// Two runs of one pipeline on one work directory with different `--set` values, the second
/// started while the first is running: each stage reads the upstream outputs of its own run, and
/// every cache entry holds what its key describes.
#[test]
fn concurrent_runs_with_different_values_never_mix_results() {
    let project = Project::with_pipeline(
        r#"[vars]
value = "a"
[stages.a_up]
kind = "command"
cmd = "echo $NNFLOW_PARAM_V > $NNFLOW_OUT/v.txt"
params = { v = "${value}" }
[stages.b_slow]
kind = "command"
cmd = "sleep 3; echo slow > $NNFLOW_OUT/s.txt"
[stages.c_down]
kind = "command"
after = ["b_slow"]
cmd = "sleep 1; cat ${a_up.outputs}/v.txt > $NNFLOW_OUT/seen.txt"
"#,
    );
    let start = |value: &str| {
        project
            .command(&[
                "run",
                "--json",
                "-j",
                "1",
                "p.toml",
                "--set",
                &format!("value={value}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // With one job at a time, `a` writes `a_up`, then runs `b_slow`, during which `b` replaces
    // `a_up`; `a`'s `c_down` must still read `a` (and `b`'s must read `b`).
    let first = start("a");
    std::thread::sleep(Duration::from_millis(1200));
    let second = start("b");
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    for value in ["a", "b", "a"] {
        let run = project.run(&["p.toml", "--set", &format!("value={value}")]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(run.outcome("c_down"), "cached", "{}", run.stderr);
        let seen = project.read(".nnflow/p/out/c_down/seen.txt");
        assert_eq!(
            seen.trim(),
            value,
            "the result cached for value={value} read another run's input"
        );
    }
}

#[test]
fn an_input_edited_while_the_stage_runs_is_not_cached() {
    let project = Project::with_pipeline(
        r#"[stages.w]
kind = "command"
inputs = ["data.txt"]
cmd = "cat data.txt > $NNFLOW_OUT/copy.txt; echo more >> data.txt"
"#,
    );
    project.write("data.txt", "first\n");
    let run = project.run(&["p.toml"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let error = run.json["stages"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("inputs changed while the stage ran") && error.contains("data.txt"),
        "{error}"
    );
    let entries = fs::read_dir(project.cache.join("entries")).unwrap().count();
    assert_eq!(entries, 0, "a result was stored under a key it does not match");
}

#[test]
fn a_failed_stage_shows_only_this_runs_log() {
    let project =
        Project::with_pipeline("[stages.w]\nkind = \"command\"\ncmd = \"echo OLD-RUN-LINE; exit 1\"\n");
    let first = project.run(&["p.toml"]);
    assert!(first.stderr.contains("OLD-RUN-LINE") || first.json.to_string().contains("OLD-RUN-LINE"));
    project.write("p.toml", "[stages.w]\nkind = \"command\"\ncmd = \"exit 3\"\n");
    let second = project.run(&["p.toml"]);
    assert_eq!(second.code, 1);
    let error = second.json["stages"][0]["error"].as_str().unwrap();
    assert!(!error.contains("OLD-RUN-LINE"), "{error}");
}

#[test]
fn staging_folders_of_killed_runs_are_removed() {
    let project = Project::with_pipeline(
        "[stages.w]\nkind = \"command\"\ncmd = \"echo partial > $NNFLOW_OUT/x; sleep 30\"\n",
    );
    let mut child = project
        .command(&["run", "p.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = project.path().join(".nnflow/p/tmp");
    let staged = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let entries: Vec<_> = fs::read_dir(&tmp).ok()?.flatten().collect();
        let folder = entries.first()?.path();
        folder.join("x").exists().then_some(folder)
    });
    let staged = staged.expect("the stage never started");
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(staged.exists());
    // a run of that instance holds its lock while staging; this folder's run is dead
    let other = tmp.join("w.4242.1");
    fs::create_dir_all(&other).unwrap();
    let gc = project.nnflow(&["gc", "p.toml"]);
    assert_eq!(gc.status.code(), Some(0), "{}", stderr(&gc));
    assert!(
        common::stdout(&gc).contains("removed 2 staging folders"),
        "{}",
        common::stdout(&gc)
    );
    assert!(!staged.exists() && !other.exists());

    // while an instance is running (its lock held), its staging folder stays
    let lock = project.path().join(".nnflow/p/locks/w.lock");
    let held = fs::File::open(&lock).unwrap();
    held.lock_shared().unwrap();
    fs::create_dir_all(&other).unwrap();
    let gc = project.nnflow(&["gc", "p.toml"]);
    assert!(common::stdout(&gc).contains("removed 0 staging folders"));
    assert!(other.exists());
}

#[test]
fn force_starts_from_scratch() {
    let project =
        Project::with_pipeline("[stages.w]\nkind = \"command\"\ncmd = \"echo x > $NNFLOW_OUT/x\"\n");
    assert_eq!(project.run(&["p.toml"]).code, 0);
    let resume = project.path().join(".nnflow/p/resume/w");
    fs::create_dir_all(&resume).unwrap();
    fs::write(
        resume.join("checkpoint_latest.safetensors"),
        "from the finished run",
    )
    .unwrap();
    let forced = project.run(&["p.toml", "--force", "w"]);
    assert_eq!(forced.outcome("w"), "ran");
    assert!(!resume.exists(), "--force kept the resume folder");
}
