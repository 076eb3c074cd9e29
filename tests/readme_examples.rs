//! The README's examples work as written: its pipeline file validates and runs (the report cats
//! every fold's model), its command lines' `--set` arguments are accepted by the pipelines they
//! name, and the parameter values it shows are valid.

mod common;

use common::{stderr, stdout, Project};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The fenced code blocks of language `language`.
fn code_blocks(text: &str, language: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) if info.trim() == language => current = Some(String::new()),
            (Some(block), Some(_)) => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), None) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// Inline code spans (which may run over a line break, read as a space).
fn inline_code(text: &str) -> Vec<String> {
    let prose: String = code_blocks_removed(text);
    let mut spans = Vec::new();
    let mut rest = prose.as_str();
    while let Some(start) = rest.find('`') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('`') else { break };
        let span: Vec<&str> = after[..end].split('\n').map(str::trim).collect();
        spans.push(span.join(" "));
        rest = &after[end + 1..];
    }
    spans
}

fn code_blocks_removed(text: &str) -> String {
    let mut inside = false;
    let mut prose = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if !inside {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose
}

/// Splits a command line into words as `sh` would for the simple quoting the README uses.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The README's pipeline example in a project, with what its commands read and a stand-in for
/// `python` (`prepare.py` and `fit.py` are the reader's own scripts).
fn example_project() -> (Project, String) {
    let blocks = code_blocks(&readme(), "toml");
    assert_eq!(blocks.len(), 1, "the README's TOML examples: {blocks:#?}");
    let example = blocks[0].clone();
    let project = Project::with_pipeline(&example);
    project.write("base.toml", "# the base pipeline `extends` names\n");
    project.write("prepare.py", "# prepares\n");
    project.write("fit.py", "# fits\n");
    project.write("data/cases.txt", "1\n2\n");
    project.write(
        "bin/python",
        "#!/bin/sh\nscript=$1; shift\ncase $script in\n  prepare.py) echo \"prepared $*\" ;;\n  fit.py) echo \"model $*\" ;;\n  *) exit 9 ;;\nesac\n",
    );
    let bin = project.path().join("bin/python");
    let mut permissions = std::fs::metadata(&bin).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&bin, permissions).unwrap();
    (project, example)
}

#[test]
fn the_pipeline_example_validates_and_its_report_cats_every_model() {
    let (project, example) = example_project();
    assert!(
        example.contains("cmd = \"cat ${fit[*].outputs}/model.txt\""),
        "the README's example changed; update this test:\n{example}"
    );
    let validate = project.nnflow(&["validate", "p.toml"]);
    assert_eq!(validate.status.code(), Some(0), "{}", stderr(&validate));
    assert!(
        stdout(&validate).contains("5 stage instance(s), valid"),
        "{}",
        stdout(&validate)
    );

    let path = format!(
        "{}:{}",
        project.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = project
        .command(&["run", "--json", "p.toml"])
        .env("PATH", path)
        .output()
        .expect("nnflow runs");
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}\n{}", stdout(&output));
    assert_eq!(project.read("prepared.csv"), "prepared data\n");
    let report = project.read(".nnflow/demo/logs/report.log");
    for fold in 0..3 {
        assert!(
            report.contains(&format!("model --fold {fold}\n")),
            "the report cats fold {fold}'s model:\n{report}"
        );
    }
    assert!(!report.contains("No such file"), "{report}");
}

/// `--set` arguments the README shows as refused (besides the `fold=[0]` typo).
const SHOWN_REFUSED: &[&str] = &["result=."];

#[test]
fn the_set_examples_are_accepted() {
    let text = readme();
    let (project, _) = example_project();
    project.copy_pipelines(&["nnunet.toml", "demo.toml"]);
    let validate = |pipeline: &str, sets: &[String]| {
        let mut args = vec!["validate".to_string(), pipeline.to_string()];
        for set in sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = project.nnflow(&args);
        (output.status.code(), stderr(&output))
    };

    // Command lines in the README's shell blocks (continued lines joined).
    let mut checked = 0;
    for block in code_blocks(&text, "sh") {
        for line in block.replace("\\\n", " ").lines() {
            let line = line.split(" #").next().unwrap_or_default();
            let words = shell_words(line);
            let Some(pipeline) = words.iter().find(|w| w.starts_with("pipelines/")) else {
                continue;
            };
            let sets: Vec<String> = words
                .windows(2)
                .filter(|pair| pair[0] == "--set")
                .map(|pair| pair[1].clone())
                .collect();
            if sets.is_empty() {
                continue;
            }
            let (code, report) = validate(pipeline, &sets);
            assert_eq!(code, Some(0), "README: `{line}`:\n{report}");
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "only {checked} README command lines with --set found"
    );

    // `--set` in the prose: each is accepted by the example pipeline or by nnunet.toml, except
    // the mistakes the README shows being caught.
    let spans: Vec<String> = inline_code(&text)
        .into_iter()
        .filter_map(|span| span.strip_prefix("--set ").map(str::to_string))
        .collect();
    assert!(spans.len() >= 4, "{spans:?}");
    for set in spans {
        let set = set.trim_matches('\'').to_string();
        let sets = std::slice::from_ref(&set);
        let on_example = validate("p.toml", sets);
        let on_nnunet = validate("pipelines/nnunet.toml", sets);
        if set == "fold=[0]" {
            assert!(on_example.1.contains("did you mean `folds`?"), "{}", on_example.1);
            assert!(on_nnunet.1.contains("did you mean `folds`?"), "{}", on_nnunet.1);
            continue;
        }
        if SHOWN_REFUSED.contains(&set.as_str()) {
            assert_eq!(on_example.0, Some(2), "{}", on_example.1);
            assert_eq!(on_nnunet.0, Some(2), "{}", on_nnunet.1);
            continue;
        }
        assert!(
            on_example.0 == Some(0) || on_nnunet.0 == Some(0),
            "README: `--set {set}` is accepted by no pipeline:\n{}\n{}",
            on_example.1,
            on_nnunet.1
        );
    }

    // Parameter values the README shows, on the stages they belong to.
    for (stage, start) in [
        ("train", "augment = ["),
        ("train", "loss = {"),
        ("plan", "overrides = {"),
    ] {
        let span = inline_code(&text)
            .into_iter()
            .find(|span| span.starts_with(start))
            .unwrap_or_else(|| panic!("no `{start}...` in the README"));
        let (key, value) = span.split_once(" = ").unwrap();
        let set = format!("{stage}.{key}={value}");
        let (code, report) = validate("pipelines/nnunet.toml", std::slice::from_ref(&set));
        assert_eq!(code, Some(0), "README: `{span}`:\n{report}");
    }
}
