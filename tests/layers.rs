//! Dependencies point one way (STYLE.md principle 10, issue 15): the engine at the bottom knows
//! nothing of images, nnU-Net or libtorch. Stages plug into it through its `Stage` trait and a
//! registry handed to it, so nothing under `src/engine/` may name the rest of the crate. The
//! compiler cannot enforce that within one crate, so this test reads the engine's source.

use std::path::{Path, PathBuf};

/// What the engine may use of the crate outside itself: bottom utilities that know no stage.
const ALLOWED: &[&str] = &["engine", "atomic_file", "file_error", "errln", "json_sorted"];

/// External crates of the image and network layers; the engine needs neither.
const FORBIDDEN_CRATES: &[&str] = &["tch", "ndarray"];

#[test]
fn the_engine_imports_nothing_above_it() {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let files = rust_files(&engine);
    assert!(
        files.len() > 10,
        "no engine sources found under {}",
        engine.display()
    );
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let relative = file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap();
        for (line, path) in outside_paths(&text, module_depth(relative)) {
            problems.push(format!("{}:{line}: {path}", relative.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "the engine must not depend on the modules above it (allowed: crate::{{{}}}); \
         hand it what it needs (a `Kind` in the registry, a field of `StageContext`) instead:\n{}",
        ALLOWED.join(", "),
        problems.join("\n")
    );
}

/// The scanner finds every way of writing a path out of the engine.
#[test]
fn the_scanner_finds_every_form_of_path() {
    let text = "use crate::engine::key::StageKey;\n\
                use crate::stages::Kind;\n\
                use crate::{atomic_file, torch_env::LIBTORCH_VERSION};\n\
                let v = nnflow::stages::KINDS;\n\
                crate::errln!(\"warning\");\n\
                // crate::stages in a comment is no dependency\n\
                /// [`crate::stages::Stage`] in a doc link is one\n\
                use super::super::data::nifti;\n\
                use super::hashing::Digest;\n\
                let t = tch::Tensor::zeros();\n";
    let found: Vec<(usize, String)> = outside_paths(text, 2);
    let expected = [
        (2, "crate::stages"),
        (3, "crate::torch_env"),
        (4, "nnflow::stages"),
        (7, "crate::stages"),
        (8, "super::super::data"),
        (10, "tch::"),
    ];
    let expected: Vec<(usize, String)> = expected.iter().map(|&(l, p)| (l, p.to_string())).collect();
    assert_eq!(found, expected);
}

fn rust_files(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// How deep below the crate root a file's module lies: `src/engine/mod.rs` 1, `src/engine/key.rs`
/// 2. A `super::` chain at least this long leaves the engine. (An inline `mod tests` lies one
/// deeper, so the check is only ever stricter than the truth there.)
fn module_depth(relative: &Path) -> usize {
    let parts = relative.components().count() - 1; // without `src`
    if relative.ends_with("mod.rs") {
        parts - 1
    } else {
        parts
    }
}

/// Every path in `text` that leaves the engine, with its line (1-based). Plain `//` comments are
/// skipped; doc comments are not (rustdoc resolves their links).
fn outside_paths(text: &str, depth: usize) -> Vec<(usize, String)> {
    paths_out_of_module(text, depth)
        .into_iter()
        // a `super::` chain out of the engine is always outside; a crate path may name a base
        // module the engine is allowed
        .filter(|path| match &path.module {
            Some(module) if !path.written.starts_with("super::") => !ALLOWED.contains(&module.as_str()),
            _ => true,
        })
        .map(|path| (path.line, path.written))
        .collect()
}

/// A path in the source that leaves the module it is written in.
struct PathOut {
    line: usize,
    /// As written up to the first module: `crate::stages`, `super::super::data`, `tch::`.
    written: String,
    /// The crate's top-level module it names; `None` for a forbidden external crate.
    module: Option<String>,
}

/// The `crate::`/`nnflow::` paths (each item of a `{...}` group), the `super::` chains at least
/// `depth` long, and the uses of [`FORBIDDEN_CRATES`] in `text`, with their lines (1-based).
fn paths_out_of_module(text: &str, depth: usize) -> Vec<PathOut> {
    let code: String = text
        .lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[at + 2..].starts_with(['/', '!']) => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
    let mut found = Vec::new();
    for start in path_starts(&code) {
        let rest = &code[start..];
        let root = identifier(rest);
        let after = &rest[root.len()..];
        if !after.starts_with("::") {
            continue;
        }
        match root {
            "crate" | "nnflow" => {
                for (offset, name) in first_segments(&after[2..], start + root.len() + 2) {
                    found.push(PathOut {
                        line: line_of(offset),
                        written: format!("{root}::{name}"),
                        module: Some(name.to_string()),
                    });
                }
            }
            "super" => {
                let mut chain = 0;
                while rest[chain * 7..].starts_with("super::") {
                    chain += 1;
                }
                if chain >= depth {
                    let name = identifier(&rest[chain * 7..]);
                    found.push(PathOut {
                        line: line_of(start),
                        written: format!("{}{name}", "super::".repeat(chain)),
                        module: Some(name.to_string()),
                    });
                }
            }
            _ if FORBIDDEN_CRATES.contains(&root) => found.push(PathOut {
                line: line_of(start),
                written: format!("{root}::"),
                module: None,
            }),
            _ => {}
        }
    }
    found
}

/// Offsets where a path begins: an identifier not preceded by another path segment or identifier.
fn path_starts(code: &str) -> Vec<usize> {
    let bytes = code.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    (0..bytes.len())
        .filter(|&i| word(bytes[i]) && (i == 0 || !(word(bytes[i - 1]) || bytes[i - 1] == b':')))
        .collect()
}

/// The first segments after `crate::`: one name, or each item of a `{...}` group, with offsets.
fn first_segments(text: &str, offset: usize) -> Vec<(usize, &str)> {
    let trimmed = text.trim_start();
    let offset = offset + text.len() - trimmed.len();
    let Some(group) = trimmed.strip_prefix('{') else {
        return vec![(offset, identifier(trimmed))];
    };
    let mut items = Vec::new();
    let (mut depth, mut item_start) = (0, 1);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(item_start..i + 1);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(item_start..i + 1);
                item_start = i + 2;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .filter_map(|range| {
            let item = &trimmed[range.clone()];
            let name = item.trim_start();
            let at = offset + range.start + item.len() - name.len();
            let name = identifier(name);
            (!name.is_empty()).then_some((at, name))
        })
        .collect()
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The layers of the README's "How the code is organised", bottom up: what each top-level module
/// uses directly. A module may use these and, transitively, what they may use; nothing beside or
/// above it (shared pieces go to the layer below both).
const MAY_USE: &[(&str, &[&str])] = &[
    ("errln", &[]),
    ("file_error", &[]),
    ("json_numbers", &[]),
    ("json_sorted", &[]),
    ("kernels", &[]),
    ("torch_env", &[]),
    ("atomic_file", &["file_error"]),
    ("engine", &["atomic_file", "errln", "json_sorted"]),
    ("data", &["atomic_file", "json_numbers"]),
    ("plans", &["data"]),
    ("preprocess", &["plans", "kernels"]),
    ("augment", &["kernels"]),
    ("evaluate", &["data", "kernels"]),
    ("network", &["plans"]),
    ("inference", &["preprocess", "evaluate", "network", "torch_env"]),
    (
        "train",
        &["preprocess", "augment", "evaluate", "network", "torch_env"],
    ),
    // the libtorch worker: the model layers, never the engine or the stages
    ("bin/nnflow-torch", &["train", "inference"]),
    // the report page: reads stage states and the outputs of nnU-Net's stages
    ("report", &["engine", "plans", "kernels"]),
    ("stages", &["engine", "train", "inference", "report"]),
    ("schema", &["engine", "stages"]),
];

/// Everything `module` may use: its entries in [`MAY_USE`] and, transitively, theirs.
fn may_use(module: &str) -> std::collections::BTreeSet<&'static str> {
    let mut allowed = std::collections::BTreeSet::new();
    let mut pending = vec![module];
    while let Some(name) = pending.pop() {
        let (_, direct) = MAY_USE.iter().find(|(n, _)| *n == name).expect("in MAY_USE");
        for &used in *direct {
            if allowed.insert(used) {
                pending.push(used);
            }
        }
    }
    allowed
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut checked = std::collections::BTreeSet::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap();
        let module = top_module(relative);
        if !MAY_USE.iter().any(|(name, _)| *name == module) {
            continue; // the command line and the crate root may use everything
        }
        let allowed = may_use(&module);
        checked.insert(module.clone());
        let text = std::fs::read_to_string(&file).unwrap();
        // in a binary, `crate::` is the binary's own modules; the library is `nnflow::`
        let binary = module.starts_with("bin/");
        let depth = module_depth(&Path::new("src").join(relative));
        for (line, used) in crate_modules_used(&text, depth, binary) {
            if used != module && !allowed.contains(used.as_str()) {
                problems.push(format!("src/{}:{line}: {module} uses {used}", relative.display()));
            }
        }
    }
    let unchecked: Vec<&str> = MAY_USE
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| *name != "errln" && !checked.contains(*name))
        .collect();
    assert!(unchecked.is_empty(), "no sources found for {unchecked:?}");
    assert!(
        problems.is_empty(),
        "modules reach past their layer (see MAY_USE and the README's \"How the code is organised\"):\n{}",
        problems.join("\n")
    );
}

/// The scanner sees `crate::`/`nnflow::` paths, their `{...}` groups and `super::` chains that
/// leave the top module, but not plain comments.
#[test]
fn the_module_scanner_finds_crate_paths() {
    let text = "use crate::{data::nifti, plans::Plans};\n\
                // crate::stages in a comment is no dependency\n\
                let p = nnflow::train::job::TrainJob::default();\n\
                use super::super::engine::key;\n\
                use super::sibling;\n";
    let found = crate_modules_used(text, 2, false);
    let names: Vec<(usize, &str)> = found.iter().map(|(l, n)| (*l, n.as_str())).collect();
    assert_eq!(names, [(1, "data"), (1, "plans"), (3, "train"), (4, "engine")]);
}

/// `engine/key.rs` -> `engine`, `bin/nnflow-torch/trainer.rs` -> `bin/nnflow-torch`,
/// `atomic_file.rs` -> `atomic_file`.
fn top_module(relative: &Path) -> String {
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts[0] == "bin" && parts.len() > 2 {
        return format!("bin/{}", parts[1]);
    }
    parts[0].trim_end_matches(".rs").to_string()
}

/// The top-level modules of the crate that `text` names, with their lines (1-based).
/// In a binary (`binary`), only the library's paths (`nnflow::`) count.
fn crate_modules_used(text: &str, depth: usize, binary: bool) -> Vec<(usize, String)> {
    paths_out_of_module(text, depth)
        .into_iter()
        .filter(|path| !binary || path.written.starts_with("nnflow::"))
        .filter_map(|path| Some((path.line, path.module?)))
        // `use super::*` in a file's inline `mod tests` is the file's own module
        .filter(|(_, module)| !module.is_empty())
        .collect()
}
