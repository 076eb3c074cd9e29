//! Validation before anything runs: every mistake in a pipeline file is reported at once, each with
//! `file:line:column`, the offending source line and a caret under it; exit code 2; never a panic.

mod common;

use common::{stderr, stdout, Project};

/// Exit code and stderr of `nnflow ARGS`, checking that nnflow did not panic.
fn nnflow(project: &Project, args: &[&str]) -> (i32, String) {
    let output = project.nnflow(args);
    let err = stderr(&output);
    assert!(!err.contains("panicked"), "nnflow {args:?} panicked:\n{err}");
    (output.status.code().unwrap_or(-1), err)
}

/// `nnflow validate p.toml` and `nnflow run p.toml` both fail with exit code 2 and the same report,
/// and no stage ran (every stage in these tests writes a `ran-*` marker file).
fn invalid(project: &Project, extra: &[&str]) -> String {
    let mut validate = vec!["validate", "p.toml"];
    validate.extend_from_slice(extra);
    let (code, report) = nnflow(project, &validate);
    assert_eq!(code, 2, "validate should fail with exit code 2:\n{report}");
    let mut run = vec!["run", "p.toml"];
    run.extend_from_slice(extra);
    let (code, run_report) = nnflow(project, &run);
    assert_eq!(code, 2, "run should fail with exit code 2:\n{run_report}");
    assert_eq!(run_report, report, "run reports what validate reports");
    let markers: Vec<String> = std::fs::read_dir(project.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ran-"))
        .collect();
    assert!(
        markers.is_empty(),
        "stages ran although the pipeline is invalid: {markers:?}"
    );
    report
}

/// Asserts `report` holds `FILE:LINE:COL: error: ...MESSAGE...`, then the source line `SOURCE`
/// numbered LINE, then a caret under column COL.
fn assert_diagnostic(report: &str, file: &str, line: usize, col: usize, message: &str, source: &str) {
    let head = format!("{file}:{line}:{col}: error: ");
    let lines: Vec<&str> = report.lines().collect();
    let Some(at) = lines
        .iter()
        .position(|l| l.starts_with(&head) && l.contains(message))
    else {
        panic!("no `{head}...{message}...` in the report:\n{report}");
    };
    assert_eq!(
        lines.get(at + 1).copied(),
        Some(format!("{line:>5} | {source}").as_str()),
        "{report}"
    );
    let caret = format!("      | {}^", " ".repeat(col - 1));
    assert!(
        lines.get(at + 2).is_some_and(|l| l.starts_with(&caret)),
        "no caret at column {col}:\n{report}"
    );
}

/// Asserts the report's summary counts `n` errors.
fn assert_count(report: &str, n: usize) {
    assert!(
        report
            .trim_end()
            .ends_with(&format!("\n{n} error(s) in the pipeline")),
        "expected {n} error(s):\n{report}"
    );
}

fn project(pipeline: &str) -> Project {
    Project::with_pipeline(pipeline)
}

// ---------------------------------------------------------------------------------------------
// Unknown keys

#[test]
fn unknown_stage_key_points_at_the_key() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
  cmdd = "x"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        3,
        "stage `a`: unknown field `cmdd`, expected one of `cmd`",
        "  cmdd = \"x\"",
    );
    assert!(
        report.contains("      |   ^^^^\n"),
        "the caret underlines the key:\n{report}"
    );
    assert_count(&report, 1);
}

#[test]
fn unknown_common_key_in_a_matrix_stage_is_reported_once() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
matrix = { fold = [0, 1, 2] }
afterr = ["b"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        5,
        1,
        "unknown field `afterr`",
        "afterr = [\"b\"]",
    );
    assert_count(&report, 1);
}

#[test]
fn unknown_top_level_key_and_unknown_pipeline_key() {
    let p = project(
        r#"[pipeline]
name = "t"
nmae = "typo"
[stagez.a]
kind = "command"
[stages.a]
kind = "command"
cmd = "touch ran-a"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        2,
        "unknown top-level key `stagez` (expected one of: pipeline, vars, stages)",
        "[stagez.a]",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        3,
        1,
        "unknown field `nmae`, expected one of `name`",
        "nmae = \"typo\"",
    );
    assert_count(&report, 2);
}

// ---------------------------------------------------------------------------------------------
// Wrong types

#[test]
fn wrong_types_point_at_the_value() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
threads = "two"
[stages.b]
kind = "command"
cmd = "touch ran-b"
inputs = "a.txt"
[stages.c]
kind = "command"
cmd = "touch ran-c"
gpus = -1
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        11,
        "`threads`: invalid type: string \"two\", expected u32",
        "threads = \"two\"",
    );
    assert!(
        report.contains("      |           ^^^^^\n"),
        "the caret underlines the whole value:\n{report}"
    );
    assert_diagnostic(
        &report,
        "p.toml",
        8,
        10,
        "stage `b`: `inputs`: invalid type: string \"a.txt\", expected a sequence",
        "inputs = \"a.txt\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        12,
        8,
        "`gpus`: invalid value: integer `-1`, expected u32",
        "gpus = -1",
    );
    assert_count(&report, 3);
}

#[test]
fn wrong_type_inside_a_list_points_at_the_element() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
outputs = ["x.txt", 3]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        21,
        "`outputs.1`: invalid type: integer `3`, expected a string",
        "outputs = [\"x.txt\", 3]",
    );
}

// ---------------------------------------------------------------------------------------------
// Unknown kinds and references

#[test]
fn unknown_kind_lists_the_known_kinds() {
    let p = project(
        r#"[stages.a]
kind = "comand"
cmd = "touch ran-a"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        2,
        8,
        "unknown stage kind `comand` (known kinds: command, fingerprint, plan, normalize, resample, preprocess, train, evaluate, ensemble-select, postprocess, predict, report)",
        "kind = \"comand\"",
    );
    assert_count(&report, 1);
}

#[test]
fn unknown_stages_and_variables_in_references() {
    let p = project(
        r#"[vars]
data = "d"
[stages.a]
kind = "command"
cmd = "touch ran-a"
after = ["prep", "nope"]
[stages.b]
kind = "command"
cmd = "cat ${nope.outputs} > ran-b"
[stages.c]
kind = "command"
cmd = "echo ${data} ${missing} > ran-c"
[stages.prep]
kind = "command"
cmd = "touch ran-prep"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        6,
        18,
        "unknown stage `nope` (stages: a, b, c, prep)",
        "after = [\"prep\", \"nope\"]",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        9,
        7,
        "unknown stage `nope` (stages: a, b, c, prep)",
        "cmd = \"cat ${nope.outputs} > ran-b\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        12,
        7,
        "unknown variable `${missing}` (known: data; write `$${` for a literal `${`)",
        "cmd = \"echo ${data} ${missing} > ran-c\"",
    );
    assert_count(&report, 3);
}

#[test]
fn a_reference_to_a_stage_with_its_own_error_is_not_reported_as_unknown() {
    // `b` exists; its typo is the one mistake. Saying "unknown stage `b`" at every use would be false.
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "cat ${b.outputs} ${b[*].outputs} > ran-a"
after = ["b", "b[*]"]
[stages.b]
kind = "comand"
cmd = "touch ran-b"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        6,
        8,
        "unknown stage kind `comand`",
        "kind = \"comand\"",
    );
    assert!(!report.contains("unknown stage `b`"), "{report}");
    assert_count(&report, 1);
}

// ---------------------------------------------------------------------------------------------
// Cycles and output claims

#[test]
fn cycle_through_after_names_the_stages() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
after = ["b"]
[stages.b]
kind = "command"
cmd = "touch ran-b"
after = ["a"]
[stages.c]
kind = "command"
cmd = "touch ran-c"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        1,
        9,
        "dependency cycle between stages: a -> b",
        "[stages.a]",
    );
    assert!(!report.contains("stages: a -> b -> c"), "{report}");
    assert_count(&report, 1);
}

#[test]
fn cycle_through_inputs_and_outputs_names_the_stages() {
    let p = project(
        r#"[stages.other]
kind = "command"
cmd = "touch ran-other"
[stages.reads-x]
kind = "command"
cmd = "touch ran-a; cat x > y"
inputs = ["x"]
outputs = ["y"]
[stages.reads-y]
kind = "command"
cmd = "touch ran-b; cat y > x"
inputs = ["./y"]
outputs = ["x"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        9,
        "dependency cycle between stages: reads-x -> reads-y",
        "[stages.reads-x]",
    );
    assert_count(&report, 1);
}

#[test]
fn self_dependency_is_a_cycle() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
after = ["a"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        1,
        9,
        "dependency cycle between stages: a",
        "[stages.a]",
    );
}

#[test]
fn two_stages_claiming_one_output() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
outputs = ["out/x.txt"]
[stages.b]
kind = "command"
cmd = "touch ran-b"
outputs = ["out/y.txt", "./out/x.txt"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        8,
        11,
        "stages `a` and `b` both claim output `out/x.txt` (overlaps `out/x.txt`)",
        "outputs = [\"out/y.txt\", \"./out/x.txt\"]",
    );
    assert_count(&report, 1);
}

#[test]
fn a_folder_output_and_a_file_inside_it_overlap() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
outputs = ["out/"]
[stages.b]
kind = "command"
cmd = "touch ran-b"
outputs = ["out/sub/x.txt"]
[stages.c]
kind = "command"
cmd = "touch ran-c"
outputs = ["out2/x.txt"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        8,
        11,
        "stages `a` and `b` both claim output `out/sub/x.txt` (overlaps `out`)",
        "outputs = [\"out/sub/x.txt\"]",
    );
    assert!(!report.contains("`c`"), "out2 does not overlap out:\n{report}");
    assert_count(&report, 1);
}

#[test]
fn instances_of_one_matrix_stage_claiming_one_output() {
    let p = project(
        r#"[stages.a]
kind = "command"
matrix = { fold = [0, 1] }
cmd = "touch ran-a"
outputs = ["out/model.txt"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        5,
        11,
        "stages `a[fold=0]` and `a[fold=1]` both claim output `out/model.txt`",
        "outputs = [\"out/model.txt\"]",
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed TOML

#[test]
fn unclosed_string_points_at_the_end_of_the_line() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        3,
        19,
        "invalid TOML: invalid basic string",
        "cmd = \"touch ran-a",
    );
    assert_count(&report, 1);
}

#[test]
fn bad_syntax_and_duplicate_keys_are_located() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = = "touch ran-a"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        3,
        7,
        "invalid TOML: extra `=`",
        "cmd = = \"touch ran-a\"",
    );

    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
kind = "command"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        1,
        "invalid TOML: duplicate key",
        "kind = \"command\"",
    );
    assert_count(&report, 1);
}

// ---------------------------------------------------------------------------------------------
// Everything at once

#[test]
fn all_errors_are_reported_in_one_run() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
cmdd = "x"
[stages.b]
kind = "comand"
cmd = "touch ran-b"
[stages.c]
kind = "command"
cmd = "touch ran-c"
threads = "two"
[stages.d]
kind = "command"
cmd = "touch ran-d"
after = ["nope"]
[stages.fine]
kind = "command"
cmd = "touch ran-fine"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        1,
        "stage `a`: unknown field `cmdd`",
        "cmdd = \"x\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        6,
        8,
        "unknown stage kind `comand`",
        "kind = \"comand\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        11,
        11,
        "`threads`: invalid type",
        "threads = \"two\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        15,
        10,
        "unknown stage `nope`",
        "after = [\"nope\"]",
    );
    assert_eq!(report.matches(": error: ").count(), 4, "{report}");
    assert_count(&report, 4);
}

#[test]
fn every_wrong_key_and_value_of_a_stage_is_reported() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = 3
cmdd = "x"
inputs = "a.txt"
outputs = ["o", 2, "p", false]
threads = "two"
gpus = -1
[stages.b]
kind = "command"
cmd = "touch ran-b"
env = [1]
paramz = {}
[stages.c]
kind = "plan"
dataset = 4
gpu_memory_gb = "much"
[stages.fine]
kind = "command"
cmd = "touch ran-fine"
"#,
    );
    let report = invalid(&p, &[]);
    let expected = [
        (
            3,
            7,
            "stage `a`: `cmd`: invalid type: integer `3`, expected a string",
            "cmd = 3",
        ),
        (4, 1, "stage `a`: unknown field `cmdd`", "cmdd = \"x\""),
        (
            5,
            10,
            "stage `a`: `inputs`: invalid type: string \"a.txt\", expected a sequence",
            "inputs = \"a.txt\"",
        ),
        (
            6,
            17,
            "stage `a`: `outputs.1`: invalid type: integer `2`",
            "outputs = [\"o\", 2, \"p\", false]",
        ),
        (
            6,
            25,
            "stage `a`: `outputs.3`: invalid type: boolean `false`",
            "outputs = [\"o\", 2, \"p\", false]",
        ),
        (
            7,
            11,
            "`threads`: invalid type: string \"two\", expected u32",
            "threads = \"two\"",
        ),
        (
            8,
            8,
            "`gpus`: invalid value: integer `-1`, expected u32",
            "gpus = -1",
        ),
        (
            12,
            8,
            "stage `b`: `env.0`: invalid type: integer `1`, expected a string",
            "env = [1]",
        ),
        (13, 1, "stage `b`: unknown field `paramz`", "paramz = {}"),
        (
            16,
            11,
            "stage `c`: `dataset`: invalid type: integer `4`, expected a string",
            "dataset = 4",
        ),
        (
            17,
            17,
            "stage `c`: `gpu_memory_gb`: invalid type: string \"much\"",
            "gpu_memory_gb = \"much\"",
        ),
        (14, 9, "stage `c`: missing field `fingerprint`", "[stages.c]"),
    ];
    for (line, col, message, source) in expected {
        assert_diagnostic(&report, "p.toml", line, col, message, source);
    }
    // No error that repairing an earlier one caused (e.g. `cmd` reported missing once set aside).
    assert_eq!(report.matches("missing field").count(), 1, "{report}");
    assert_count(&report, expected.len());
}

#[test]
fn parameters_are_checked_beside_a_failed_substitution() {
    // The unknown variable is one mistake; the stage's other keys are still read, but the value
    // that could not be substituted is not judged (its type is unknown).
    let p = project(
        r#"[stages.a]
kind = "plan"
dataset = "${nope}"
fingerprint = 3
gpu_memory_gb = "${nope}"
extra = 1
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        3,
        11,
        "unknown variable `${nope}`",
        "dataset = \"${nope}\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        4,
        15,
        "stage `a`: `fingerprint`: invalid type",
        "fingerprint = 3",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        6,
        1,
        "stage `a`: unknown field `extra`",
        "extra = 1",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        5,
        17,
        "unknown variable `${nope}`",
        "gpu_memory_gb = \"${nope}\"",
    );
    assert!(!report.contains("`dataset`:"), "{report}");
    assert!(!report.contains("`gpu_memory_gb`:"), "{report}");
    assert_count(&report, 4);
}

#[test]
fn syntax_and_graph_errors_are_reported_together_with_key_errors() {
    // Key errors and a cycle in one file: the DAG is still checked when the stages have mistakes.
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
after = ["b"]
threads = "x"
[stages.b]
kind = "command"
cmd = "touch ran-b"
after = ["c"]
[stages.c]
kind = "command"
cmd = "touch ran-c"
after = ["b"]
outputs = ["o"]
[stages.d]
kind = "command"
cmd = "touch ran-d"
outputs = ["o"]
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        5,
        11,
        "`threads`: invalid type",
        "threads = \"x\"",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        6,
        9,
        "dependency cycle between stages: b -> c",
        "[stages.b]",
    );
    assert_diagnostic(
        &report,
        "p.toml",
        18,
        11,
        "stages `c` and `d` both claim output `o`",
        "outputs = [\"o\"]",
    );
    assert_count(&report, 3);
}

// ---------------------------------------------------------------------------------------------
// `extends` and `--set`

#[test]
fn errors_in_a_base_file_name_the_base_file() {
    let p = project(
        r#"[pipeline]
extends = "base.toml"
[stages.mine]
kind = "command"
cmd = "touch ran-mine"
"#,
    );
    p.write(
        "base.toml",
        r#"[stages.base]
kind = "command"
cmd = "touch ran-base"
  threadz = 2
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "base.toml",
        4,
        3,
        "stage `base`: unknown field `threadz`",
        "  threadz = 2",
    );
    assert!(!report.contains("p.toml:"), "{report}");
    assert_count(&report, 1);
}

#[test]
fn missing_or_circular_base_file_is_located_at_extends() {
    let p = project(
        r#"[pipeline]
extends = "nothere.toml"
[stages.a]
kind = "command"
cmd = "touch ran-a"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        2,
        11,
        "cannot read pipeline file nothere.toml",
        "extends = \"nothere.toml\"",
    );

    let p = project(
        r#"[pipeline]
extends = "base.toml"
"#,
    );
    p.write("base.toml", "[pipeline]\nextends = \"p.toml\"\n");
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "base.toml",
        2,
        11,
        "`extends` cycle through p.toml",
        "extends = \"p.toml\"",
    );
}

#[test]
fn set_mistakes_are_reported_as_such() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
"#,
    );
    let report = invalid(&p, &["--set", "nostage.x=1"]);
    assert!(
        report.contains("--set nostage.x=1: error: no stage named `nostage` (stages: a)\n"),
        "{report}"
    );
    assert_count(&report, 1);
    let report = invalid(&p, &["--set", "a.cmdd=1"]);
    assert!(
        report.contains("--set a.cmdd=1: error: stage `a` has no parameter `cmdd` (did you mean `cmd`?)\n"),
        "{report}"
    );
    let report = invalid(&p, &["--set", "a.threads=two"]);
    assert!(
        report.contains("--set a.threads=two: error: `threads`: invalid type: string \"two\""),
        "{report}"
    );
    let report = invalid(&p, &["--set", "novalue"]);
    assert!(
        report.contains("--set novalue: error: expected NAME=VALUE"),
        "{report}"
    );
}

/// A pipeline with variables, a matrix and stages of two kinds, for the `--set` tests.
const SETTABLE: &str = r#"[vars]
folds = [0, 1, 2, 3, 4]
data = "d"
[stages.train]
kind = "command"
matrix = { fold = "${folds}" }
cmd = "echo ${fold} > $NNFLOW_OUT/fold.txt && touch ran-train-${fold}"
[stages.plan]
kind = "plan"
dataset = "${data}"
fingerprint = "f"
"#;

#[test]
fn set_of_an_unknown_name_suggests_the_nearest_and_runs_nothing() {
    let p = project(SETTABLE);
    // The typo that would otherwise train all five folds.
    let report = invalid(&p, &["--set", "fold=[0]"]);
    assert!(
        report.contains("--set fold=[0]: error: unknown variable `fold` (did you mean `folds`?)\n"),
        "{report}"
    );
    assert_count(&report, 1);
    let report = invalid(&p, &["--set", "zzzzzz=1"]);
    assert!(
        report.contains("--set zzzzzz=1: error: unknown variable `zzzzzz` (variables: data, folds)\n"),
        "{report}"
    );
    let report = invalid(&p, &["--set", "trian.cmd=x"]);
    assert!(
        report.contains("--set trian.cmd=x: error: no stage named `trian` (did you mean `train`?)\n"),
        "{report}"
    );
    // A parameter of the stage's kind that the file does not set is still recognised as a neighbour.
    let report = invalid(&p, &["--set", "plan.gpu_memory=4"]);
    assert!(
        report.contains("--set plan.gpu_memory=4: error: stage `plan` has no parameter `gpu_memory` (did you mean `gpu_memory_gb`?)\n"),
        "{report}"
    );
    let report = invalid(&p, &["--set", "train.thread=2"]);
    assert!(
        report.contains("(did you mean `threads`?)"),
        "common stage keys are candidates too:\n{report}"
    );
    let report = invalid(&p, &["--set", "train.qqqqqqqqq=2"]);
    assert!(
        report.contains("stage `train` has no parameter `qqqqqqqqq` (parameters of kind `command`: cmd, env, inputs, outputs, params; keys of every stage: kind, "),
        "without a near name the valid ones are listed:\n{report}"
    );
    // Every mistaken `--set` is reported, with the pipeline's own mistakes.
    let report = invalid(&p, &["--set", "fold=[0]", "--set", "train.cmdd=x"]);
    assert!(report.contains("did you mean `folds`?"), "{report}");
    assert!(report.contains("did you mean `cmd`?"), "{report}");
    assert_count(&report, 2);
    // A pipeline without variables says so.
    let p = project("[stages.a]\nkind = \"command\"\ncmd = \"touch ran-a\"\n");
    let report = invalid(&p, &["--set", "folds=[0]"]);
    assert!(
        report.contains("--set folds=[0]: error: unknown variable `folds` (the pipeline has no variables)\n"),
        "{report}"
    );
}

#[test]
fn set_of_a_key_the_file_leaves_at_its_default_works() {
    let p = project(SETTABLE);
    // Kind parameters the file does not write, and keys every stage has.
    for set in [
        "plan.gpu_memory_gb=4",
        "plan.overrides={ \"3d_fullres\" = { batch_size = 4 } }",
        "plan.plans_name=mine",
        "train.env=[\"LANG\"]",
        "train.threads=2",
        "train.gpus=0",
        "train.description=x",
        "train.slurm={ partition = \"p\" }",
        "folds=[0]",
    ] {
        let (code, report) = nnflow(&p, &["validate", "p.toml", "--set", set]);
        assert_eq!(code, 0, "--set {set}:\n{report}");
    }
    let run = p.run(&[
        "p.toml",
        "train",
        "--set",
        "folds=[3]",
        "--set",
        "train.params={ x = 1 }",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.with_outcome("ran"), ["train[fold=3]"]);
    assert_eq!(p.read(".nnflow/p/out/train/fold=3/fold.txt"), "3\n");
}

#[test]
fn set_values_that_do_not_parse_point_at_the_argument() {
    let p = project(SETTABLE);
    for (set, message) in [
        ("folds=[0,x]", "`[0,x]` is not a valid TOML value: "),
        ("folds=[0, 1", "`[0, 1` is not a valid TOML value: "),
        ("train.params={ a = }", "`{ a = }` is not a valid TOML value: "),
        ("data=\"open", "`\"open` is not a valid TOML value: "),
        ("folds", "expected NAME=VALUE or STAGE.PARAM=VALUE"),
        ("=1", "`` is not a variable or STAGE.PARAM name"),
    ] {
        let report = invalid(&p, &["--set", set]);
        assert!(
            report.starts_with(&format!("--set {set}: error: {message}")),
            "--set {set}:\n{report}"
        );
        assert!(
            !report.lines().any(|line| line.starts_with("p.toml")),
            "--set {set} is not the file's mistake:\n{report}"
        );
        assert_count(&report, 1);
    }
    // A well-formed value of the wrong type, given whole to a variable: the argument is at fault.
    let report = invalid(&p, &["--set", "folds=x"]);
    assert!(
        report.starts_with(
            "--set folds=x: error: `matrix.fold`: invalid type: string \"x\", expected a sequence\n"
        ),
        "{report}"
    );
    assert_count(&report, 1);
}

#[test]
fn extends_and_set_work_when_valid() {
    let p = project(
        r#"[pipeline]
extends = "base.toml"
[stages.greet]
params = { who = "child" }
[stages.copy]
kind = "command"
cmd = "cat greet.txt > copy.txt"
inputs = ["greet.txt"]
outputs = ["copy.txt"]
"#,
    );
    p.write(
        "base.toml",
        r#"[vars]
folds = [0]
[stages.greet]
kind = "command"
cmd = "echo hello $NNFLOW_PARAM_WHO > greet.txt"
outputs = ["greet.txt"]
params = { who = "base" }
[stages.s]
kind = "command"
matrix = { fold = "${folds}" }
cmd = "echo ${fold} > $NNFLOW_OUT/fold.txt"
"#,
    );
    let (code, report) = nnflow(&p, &["validate", "p.toml"]);
    assert_eq!(code, 0, "{report}");
    let run = p.run(&["p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.with_outcome("ran"), ["copy", "greet", "s[fold=0]"]);
    assert_eq!(
        p.read("greet.txt"),
        "hello child\n",
        "the extending file's params win"
    );
    assert_eq!(p.read("copy.txt"), "hello child\n");

    let dag = p.nnflow(&["dag", "p.toml", "--set", "folds=[0,1]"]);
    assert_eq!(dag.status.code(), Some(0), "{}", stderr(&dag));
    let text = stdout(&dag);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&"s[fold=0] (command)") && lines.contains(&"s[fold=1] (command)"),
        "{text}"
    );
    assert!(lines.contains(&"copy (command)  <- greet"), "{text}");

    let run = p.run(&["p.toml", "--set", "greet.params.who=set"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        p.read("copy.txt"),
        "hello set\n",
        "--set overrides a stage parameter"
    );
}

// ---------------------------------------------------------------------------------------------
// Matrix stages

const MATRIX: &str = r#"[stages.train]
kind = "command"
matrix = { config = ["2d", "3d"], fold = [0, 1] }
cmd = "echo ${config} ${fold} > $NNFLOW_OUT/m.txt"
[stages.evaluate]
kind = "command"
matrix = { config = ["2d", "3d"] }
cmd = "true"
after = ["train"]
[stages.summary]
kind = "command"
cmd = "true"
after = ["train[*]"]
"#;

#[test]
fn matrix_dependencies_match_shared_values() {
    let p = project(MATRIX);
    let dag = p.nnflow(&["dag", "p.toml"]);
    assert_eq!(dag.status.code(), Some(0), "{}", stderr(&dag));
    let text = stdout(&dag);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "evaluate[config=2d] (command)  <- train[config=2d,fold=0], train[config=2d,fold=1]",
            "evaluate[config=3d] (command)  <- train[config=3d,fold=0], train[config=3d,fold=1]",
            "summary (command)  <- train[config=2d,fold=0], train[config=2d,fold=1], train[config=3d,fold=0], train[config=3d,fold=1]",
            "train[config=2d,fold=0] (command)",
            "train[config=2d,fold=1] (command)",
            "train[config=3d,fold=0] (command)",
            "train[config=3d,fold=1] (command)",
        ],
        "{text}"
    );
    let (code, out) = {
        let o = p.nnflow(&["validate", "p.toml"]);
        (o.status.code(), stdout(&o))
    };
    assert_eq!(code, Some(0));
    assert!(out.contains("7 stage instance(s), valid"), "{out}");
}

#[test]
fn single_outputs_reference_to_a_multi_instance_stage_suggests_all() {
    let p = project(&format!(
        "{MATRIX}[stages.bad]\nkind = \"command\"\ncmd = \"cat ${{train.outputs}} > ran-bad\"\n"
    ));
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        16,
        7,
        "`${train.outputs}` matches 4 instances; write `${train[*].outputs}` for the list of all",
        "cmd = \"cat ${train.outputs} > ran-bad\"",
    );
    assert_count(&report, 1);
}

#[test]
fn matrix_from_an_unknown_variable_is_located() {
    let p = project(
        r#"[stages.a]
kind = "command"
matrix = { fold = "${folds}" }
cmd = "touch ran-a"
"#,
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        3,
        19,
        "unknown variable `${folds}`",
        "matrix = { fold = \"${folds}\" }",
    );
}

// ---------------------------------------------------------------------------------------------
// Never a panic

#[test]
fn odd_inputs_never_panic() {
    // (pipeline text, expected exit code, text expected in stderr)
    let cases: &[(&str, i32, &str)] = &[
        ("", 2, "p.toml:1:1: error: the pipeline has no stages"),
        (
            "stages = 3\n",
            2,
            "p.toml:1:10: error: `stages` must be a table of stage tables",
        ),
        ("vars = 3\n", 2, "p.toml:1:8: error: `vars` must be a table"),
        (
            "[stages.x]\ncmd = \"touch ran-x\"\n",
            2,
            "p.toml:1:9: error: missing field `kind`",
        ),
        (
            "[stages.x]\nkind = 3\n",
            2,
            "p.toml:2:8: error: `kind`: invalid type: integer `3`, expected a string",
        ),
        (
            "[stages]\nx = 1\n",
            2,
            "p.toml:2:5: error: stage `x` must be a table",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"touch ran-x\"\nmatrix = { fold = [] }\n",
            0,
            "",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"touch ran-x\"\nmatrix = 5\n",
            2,
            "p.toml:4:10: error: `matrix`",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"touch ran-x\"\nmatrix = { f = [1.5] }\n",
            2,
            "p.toml:4:17: error: `matrix.f.0`",
        ),
        (
            "[stages.\"a.b\"]\nkind = \"command\"\ncmd = \"touch ran-x\"\n",
            2,
            "p.toml:1:9: error: stage name `a.b` may only contain",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"touch ran-x ${\"\n",
            2,
            "p.toml:3:7: error: unclosed `${`",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"${a b}\"\n",
            2,
            "p.toml:3:7: error: `${a b}` is not a variable",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"touch ran-x\"\ngpus = 99999999999999999999\n",
            2,
            "p.toml:4:8: error: `99999999999999999999` is out of range",
        ),
        (
            "[pipeline]\nextends = 3\n",
            2,
            "p.toml:2:11: error: `extends` must be a string",
        ),
        (
            "[stages.x]\nkind = \"command\"\ncmd = \"é ${nope} touch ran-x\"\n",
            2,
            "p.toml:3:7: error: unknown variable `${nope}`",
        ),
        (
            "\u{feff}[stages.x]\nkind = \"command\"\ncmd = [1]\n",
            2,
            "p.toml:3:7: error: stage `x`: `cmd`: invalid type",
        ),
        (
            "[[stages]]\nkind = \"command\"\n",
            2,
            "p.toml:1:1: error: `stages` must be a table",
        ),
    ];
    for (text, expected, message) in cases {
        let p = project(text);
        for command in ["validate", "run", "dag", "status"] {
            let (code, report) = nnflow(&p, &[command, "p.toml"]);
            assert_eq!(code, *expected, "nnflow {command} on {text:?}:\n{report}");
            assert!(
                report.contains(message),
                "nnflow {command} on {text:?}: no {message:?} in\n{report}"
            );
        }
        assert!(!p.path().join("ran-x").exists(), "{text:?}");
    }
}

#[test]
fn a_pipeline_without_stages_is_an_error_naming_the_file() {
    for text in [
        "",
        "\n\n",
        "# nothing yet\n",
        "[vars]\nfolds = [0]\n",
        "[stages]\n",
        "[pipeline]\nname = \"x\"\n",
    ] {
        let p = project(text);
        let report = invalid(&p, &[]);
        assert!(
            report.starts_with(
                "p.toml:1:1: error: the pipeline has no stages (a pipeline needs at least one `[stages.NAME]` table)\n"
            ),
            "{text:?}:\n{report}"
        );
        assert_count(&report, 1);
        for command in ["dag", "status", "gc"] {
            let (code, report) = nnflow(&p, &[command, "p.toml"]);
            assert_eq!(code, 2, "nnflow {command} on {text:?}:\n{report}");
            assert!(report.contains("the pipeline has no stages"), "{report}");
        }
    }
    // Stages from the base file count; an empty extending file is a complete pipeline.
    let p = project("[pipeline]\nextends = \"base.toml\"\n");
    p.write("base.toml", "[stages.a]\nkind = \"command\"\ncmd = \"true\"\n");
    let (code, report) = nnflow(&p, &["validate", "p.toml"]);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn a_stage_may_have_its_own_slurm_settings() {
    // README: "`[pipeline.slurm]` for every stage and a stage's `slurm = { ... }` on top".
    let p = project(
        "[stages.a]\nkind = \"command\"\ncmd = \"true\"\nslurm = { partition = \"gpu\", time = \"1:00:00\" }\n",
    );
    let (code, report) = nnflow(&p, &["validate", "p.toml"]);
    assert_eq!(code, 0, "{report}");
    p.write(
        "p.toml",
        "[stages.a]\nkind = \"command\"\ncmd = \"touch ran-a\"\nslurm = { partitoin = \"gpu\" }\n",
    );
    let report = invalid(&p, &[]);
    assert!(
        report.contains("p.toml:4:11: error: unknown field `partitoin`"),
        "{report}"
    );
}

#[test]
fn lists_spliced_into_a_word_distribute_its_text() {
    let p = project(
        r#"[vars]
names = ["x", "y"]
[stages.fit]
kind = "command"
matrix = { fold = [0, 1] }
cmd = "echo model ${fold} > $NNFLOW_OUT/model.txt"
[stages.report]
kind = "command"
cmd = "cat ${fit[*].outputs}/model.txt > report.txt; for m in ${fit[*].outputs}; do cat $m/model.txt; done >> report.txt; echo pre-${names}-post ${names}/${names} [${names}]|cat > words.txt"
outputs = ["report.txt", "words.txt"]
"#,
    );
    let run = p.run(&["p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(p.read("report.txt"), "model 0\nmodel 1\nmodel 0\nmodel 1\n");
    assert_eq!(
        p.read("words.txt"),
        "pre-x-post pre-y-post x/x x/y y/x y/y [x] [y]\n"
    );
}

#[test]
fn missing_and_unreadable_pipeline_files_are_errors_not_panics() {
    let p = Project::new();
    p.write("dir.toml/inner", "");
    std::fs::write(p.path().join("bad.toml"), b"\xff\xfe[stages]\n").unwrap();
    for (file, message) in [
        (
            "nothere.toml",
            "error: cannot read pipeline file nothere.toml: No such file",
        ),
        ("dir.toml", "error: cannot read pipeline file dir.toml"),
        ("bad.toml", "error: cannot read pipeline file bad.toml"),
    ] {
        for command in ["validate", "run", "dag"] {
            let (code, report) = nnflow(&p, &[command, file]);
            assert_eq!(code, 2, "nnflow {command} {file}:\n{report}");
            assert!(report.contains(message), "{report}");
            assert_count(&report, 1);
        }
    }
}

#[test]
fn variables_resolve_through_each_other_keep_escapes_and_report_cycles() {
    let project = Project::new();
    project.write(
        "p.toml",
        "[vars]\nroot = \"data\"\nimages = \"${root}/images\"\nliteral = \"$${HOME}\"\n[stages.s]\nkind = \"command\"\ncmd = \"echo '${images} ${literal}' > $NNFLOW_OUT/o\"\n",
    );
    let output = project.nnflow(&["run", "p.toml"]);
    assert_eq!(output.status.code(), Some(0), "{}", common::stderr(&output));
    assert_eq!(project.read(".nnflow/p/out/s/o"), "data/images ${HOME}\n");

    project.write("p.toml", "[vars]\na = \"${b}\"\nb = \"x${a}\"\n");
    let output = project.nnflow(&["validate", "p.toml"]);
    assert_eq!(output.status.code(), Some(2));
    let text = common::stderr(&output);
    assert!(
        text.contains("variables refer to each other in a cycle: a -> b -> a"),
        "{text}"
    );
}

#[test]
fn overrides_and_filtered_references_are_checked() {
    let p = project(
        r#"[stages.a]
kind = "command"
cmd = "touch ran-a"
matrix = { fold = [0, 1] }
[[stages.a.instance_overrides]]
where = { fodl = 0 }
cmd = "touch ran-b"
[[stages.a.instance_overrides]]
where = { fold = 1 }
threads = 2
[[stages.a.instance_overrides]]
cmd = "touch ran-c"
[stages.b]
kind = "command"
cmd = "cat ${a[fodl=0].outputs}"
[stages.c]
kind = "command"
cmd = "cat ${a[fold=7].outputs}"
"#,
    );
    let report = invalid(&p, &[]);
    assert!(
        report.contains("`fodl` is not a matrix key of this stage (its keys: fold)"),
        "{report}"
    );
    assert!(
        report.contains("`threads` cannot be overridden per instance"),
        "{report}"
    );
    assert!(report.contains("an override needs `where"), "{report}");
    assert!(
        report.contains("`fodl` is not a matrix key of stage `a` (its keys: fold)"),
        "{report}"
    );
    assert!(
        report.contains("no instance of `a` has fold=7 (instances: a[fold=0], a[fold=1])"),
        "{report}"
    );
}

/// Numbers TOML allows but 64 bits cannot hold are errors, not the largest integer or infinity.
#[test]
fn out_of_range_numbers_are_reported_at_their_position() {
    let p = project(
        "[vars]\nbig = 99999999999999999999\nhuge = 1e400\nfine = -inf\n[stages.a]\nkind = \"command\"\ncmd = \"touch ran-a\"\n",
    );
    let report = invalid(&p, &[]);
    assert_diagnostic(
        &report,
        "p.toml",
        2,
        7,
        "`99999999999999999999` is out of range",
        "big = 99999999999999999999",
    );
    assert_diagnostic(&report, "p.toml", 3, 8, "`1e400` is out of range", "huge = 1e400");
    assert_count(&report, 2);
}

/// Variables that repeat each other grow exponentially: stopped with an error, not by the kernel.
#[test]
fn exponential_variable_expansion_is_an_error_not_an_allocation() {
    let mut text = String::from("[vars]\nv0 = \"0123456789\"\n");
    for level in 1..=12 {
        let previous = format!("${{v{}}}", level - 1);
        text.push_str(&format!("v{level} = \"{}\"\n", previous.repeat(10)));
    }
    text.push_str("[stages.a]\nkind = \"command\"\ncmd = \"echo ${v12}; touch ran-a\"\n");
    let p = project(&text);
    let report = invalid(&p, &[]);
    assert!(report.contains("substitution expands to more than"), "{report}");
}
