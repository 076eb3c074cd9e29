//! Printing commands whose reader goes away (`nnflow status p.toml | head -1`) end quietly: no
//! panic, no "Broken pipe" message, their usual exit code.

mod common;

use std::process::Stdio;

use common::{stderr, Project};

/// A pipeline with enough instances that its status, DAG and report fill a pipe's buffer.
fn many_instances() -> Project {
    let folds: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    Project::with_pipeline(&format!(
        "[vars]\nfolds = [{}]\n[stages.a]\nkind = \"command\"\nmatrix = {{ fold = \"${{folds}}\" }}\ncmd = \"true\"\n[stages.b]\nkind = \"command\"\ncmd = \"echo ${{a[*].outputs}} > /dev/null\"\n",
        folds.join(", ")
    ))
}

const COMMANDS: &[&[&str]] = &[
    &["validate", "p.toml"],
    &["status", "p.toml"],
    &["status", "p.toml", "--json"],
    &["dag", "p.toml"],
    &["dag", "p.toml", "--format", "dot"],
    &["dag", "p.toml", "--format", "mermaid"],
    &["run", "--dry-run", "p.toml"],
    &["run", "--dry-run", "--json", "p.toml"],
    &["schema"],
    &["run", "--json", "p.toml", "-j", "2"],
    &["gc", "p.toml"],
];

fn assert_quiet(what: &str, code: Option<i32>, err: &str) {
    assert_eq!(code, Some(0), "{what} exited with {code:?}:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("os error 32"),
        "{what}:\n{err}"
    );
}

#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    // A pipe whose reading end is closed before nnflow starts: its first write fails with EPIPE.
    let project = many_instances();
    for args in COMMANDS {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = project
            .command(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("nnflow runs");
        assert_quiet(
            &format!("nnflow {args:?}"),
            output.status.code(),
            &stderr(&output),
        );
    }
}

#[test]
fn piping_into_head_is_quiet() {
    let project = many_instances();
    let nnflow = env!("CARGO_BIN_EXE_nnflow");
    for args in COMMANDS {
        let script = format!(
            "'{nnflow}' {} 2>err.txt | head -1 > first.txt; echo ${{PIPESTATUS[0]}}",
            args.join(" ")
        );
        let output = std::process::Command::new("bash")
            .args(["-c", &script])
            .current_dir(project.path())
            .env("NNFLOW_CACHE_DIR", &project.cache)
            .output()
            .expect("bash runs");
        let code = String::from_utf8_lossy(&output.stdout).trim().parse::<i32>().ok();
        let err = project.read("err.txt");
        assert_quiet(&format!("nnflow {args:?} | head -1"), code, &err);
        assert!(
            !project.read("first.txt").is_empty(),
            "nnflow {args:?} printed nothing"
        );
    }
}

#[test]
fn a_failed_command_keeps_its_exit_code_when_its_output_is_cut() {
    let project = Project::with_pipeline("[stages.a]\nkind = \"command\"\ncmd = \"exit 3\"\n");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = project
        .command(&["run", "--json", "p.toml"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("nnflow runs");
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// stderr closed too (`nnflow run p.toml 2>&1 | head -1`): progress lines and warnings are dropped,
/// the run still completes with its exit code.
#[test]
fn a_closed_stderr_does_not_stop_a_run() {
    let project = many_instances();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = project
        .command(&["run", "p.toml"])
        .stdout(Stdio::null())
        .stderr(writer)
        .output()
        .expect("nnflow runs");
    assert_eq!(output.status.code(), Some(0));
    let again = project.run(&["p.toml"]);
    assert!(
        again.with_outcome("ran").is_empty(),
        "the closed run did not finish its stages"
    );
}
