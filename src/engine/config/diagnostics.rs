//! Errors found while reading and validating a pipeline, each pointing at the text that caused it.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// Index of a file in [`Sources`].
pub type FileId = usize;

/// Where a value came from: a span of a pipeline file, or a `--set` argument.
#[derive(Clone, Debug, PartialEq)]
pub enum Location {
    File { file: FileId, span: Range<usize> },
    CommandLine { arg: String },
}

/// The text of every file read, kept so diagnostics can show line, column and the offending text.
#[derive(Default, Debug)]
pub struct Sources {
    files: Vec<(PathBuf, String)>,
}

impl Sources {
    pub fn add(&mut self, path: PathBuf, text: String) -> FileId {
        self.files.push((path, text));
        self.files.len() - 1
    }

    pub fn path(&self, file: FileId) -> &PathBuf {
        &self.files[file].0
    }

    pub fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.files.iter().map(|(path, _)| path)
    }

    /// 1-based line and column of a byte offset.
    fn line_col(&self, file: FileId, offset: usize) -> (usize, usize) {
        let text = &self.files[file].1;
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn line_text(&self, file: FileId, line: usize) -> &str {
        self.files[file].1.lines().nth(line - 1).unwrap_or("")
    }
}

#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub location: Option<Location>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(location: Option<Location>, message: impl Into<String>) -> Self {
        Diagnostic {
            location,
            message: message.into(),
        }
    }

    /// `file:line:col: message`, then the offending line with the span underlined; `--set ARG:
    /// message` for a mistake in a `--set` argument. A problem without a position (the pipeline
    /// as a whole) is prefixed with the pipeline file's path, so every error names what it
    /// concerns.
    pub fn render(&self, sources: &Sources) -> String {
        let pipeline = sources.paths().next().map(|path| format!("{}: ", path.display()));
        let pipeline = pipeline.unwrap_or_default();
        match &self.location {
            None => format!("{pipeline}error: {}", self.message),
            // The argument is the place to fix, not the pipeline file.
            Some(Location::CommandLine { arg }) => {
                format!("--set {arg}: error: {}", self.message)
            }
            Some(Location::File { file, span }) => {
                let (line, col) = sources.line_col(*file, span.start);
                let text = sources.line_text(*file, line);
                let width = span
                    .len()
                    .clamp(1, text.chars().count().saturating_sub(col - 1).max(1));
                format!(
                    "{}:{line}:{col}: error: {}\n{line:>5} | {text}\n      | {}{}",
                    sources.path(*file).display(),
                    self.message,
                    " ".repeat(col - 1),
                    "^".repeat(width)
                )
            }
        }
    }
}

/// Every problem found in a pipeline, reported together.
#[derive(Debug)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    pub rendered: String,
}

impl Diagnostics {
    pub fn new(items: Vec<Diagnostic>, sources: &Sources) -> Self {
        let rendered = items
            .iter()
            .map(|d| d.render(sources))
            .collect::<Vec<_>>()
            .join("\n");
        Diagnostics { items, rendered }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n{} error(s) in the pipeline",
            self.rendered,
            self.items.len()
        )
    }
}

impl std::error::Error for Diagnostics {}

/// The candidate closest to `name` by edit distance, if it is close enough to be a likely typo
/// (for "did you mean ...?").
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|candidate| *candidate != name)
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|&(distance, candidate)| {
            let longer = name.chars().count().max(candidate.chars().count());
            distance <= (longer / 3).max(1) + 1 && distance < longer
        })
        .min_by_key(|&(distance, candidate)| (distance, candidate))
        .map(|(_, candidate)| candidate)
}

/// Names for a message, comma-separated, or "none".
pub(super) fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Levenshtein distance (insertions, deletions, substitutions), by characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_names_suggest_likely_typos_only() {
        assert_eq!(edit_distance("fold", "folds"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(nearest("fold", ["dataset", "folds"]), Some("folds"));
        assert_eq!(nearest("cmdd", ["cmd", "inputs", "outputs"]), Some("cmd"));
        assert_eq!(nearest("trian", ["train", "plan"]), Some("train"));
        assert_eq!(nearest("epoch", ["epochs", "seed"]), Some("epochs"));
        assert_eq!(nearest("x", ["ab", "folds"]), None);
        assert_eq!(nearest("nostage", ["a"]), None);
        assert_eq!(nearest("zzzzzz", ["dataset", "folds"]), None);
    }
}
