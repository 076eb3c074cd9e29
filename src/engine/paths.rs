//! Where a pipeline may write. Declared outputs, the work directory and the cache are resolved to
//! one spelling (absolute, `.` and `..` applied the way the operating system applies them, symlinks
//! followed), so aliases such as `x/../out.txt` or an absolute path to the same place compare
//! equal, and a path that leaves the project folder is refused before anything runs.

use std::path::{Component, Path, PathBuf};

use super::config::{Diagnostic, Instance, Location, Pipeline};
use super::evaluate::is_glob;
use super::graph::paths_overlap;
use super::RunError;

/// Symlinks followed in one path before giving up (a loop).
const MAX_LINKS: u32 = 40;

/// `path` (relative to `base`, or absolute) as the place it names: every symlink along it followed
/// (dangling ones too, since writing through one creates its target) and `..` applied after that,
/// as the kernel does. Nothing needs to exist.
pub fn real_path(base: &Path, path: &Path) -> PathBuf {
    resolve(&base.join(path), 0)
}

fn resolve(absolute: &Path, depth: u32) -> PathBuf {
    let mut real = PathBuf::from("/");
    for component in absolute.components() {
        match component {
            Component::Normal(name) => {
                let next = real.join(name);
                match std::fs::read_link(&next) {
                    Ok(target) if depth < MAX_LINKS => real = resolve(&real.join(target), depth + 1),
                    _ => real = next,
                }
            }
            Component::ParentDir => {
                real.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    real
}

/// Why a declared path may not be written.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("`{declared}` has `..` after a wildcard; write the folder it names")]
    ParentAfterWildcard { declared: String },
    #[error("`{declared}` resolves to {}, outside the project folder {}", real.display(), root.display())]
    OutsideProject {
        declared: String,
        real: PathBuf,
        root: PathBuf,
    },
    #[error("`{declared}` is the project folder itself")]
    ProjectFolder { declared: String },
}

/// A declared output as a path relative to the project folder (`/`-separated, wildcards kept), or
/// why it may not be written.
pub fn project_relative(root: &Path, declared: &str) -> Result<String, PathError> {
    let components: Vec<&str> = declared.split('/').collect();
    let first_glob = components
        .iter()
        .position(|c| is_glob(c))
        .unwrap_or(components.len());
    let (literal, pattern) = components.split_at(first_glob);
    if pattern.contains(&"..") {
        return Err(PathError::ParentAfterWildcard {
            declared: declared.to_string(),
        });
    }
    let literal = literal.join("/");
    let real = real_path(root, Path::new(if literal.is_empty() { "." } else { &literal }));
    let real_root = real_path(root, Path::new("."));
    let Ok(inside) = real.strip_prefix(&real_root) else {
        return Err(PathError::OutsideProject {
            declared: declared.to_string(),
            real,
            root: real_root,
        });
    };
    let mut parts: Vec<String> = inside
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.extend(
        pattern
            .iter()
            .filter(|p| !p.is_empty() && **p != ".")
            .map(|p| p.to_string()),
    );
    if parts.is_empty() {
        return Err(PathError::ProjectFolder {
            declared: declared.to_string(),
        });
    }
    Ok(parts.join("/"))
}

/// An instance's declared project outputs, relative to the project folder. `load_checked` has
/// refused a pipeline where this fails; it is asked again before anything is deleted, in case a
/// symlink changed since.
pub fn declared_outputs(pipeline: &Pipeline, instance: &Instance) -> Result<Vec<String>, RunError> {
    instance
        .implementation
        .project_outputs()
        .iter()
        .map(|declared| {
            project_relative(&pipeline.root, declared).map_err(|source| RunError::OutputPath {
                id: instance.id.clone(),
                source,
            })
        })
        .collect()
}

/// Everything wrong with where the pipeline would write, each at the offending value: the work
/// directory and every declared output must lie inside the project folder without being it; an
/// output may not overlap nnflow's own folders, the pipeline files, the stage's inputs, another of
/// its outputs or another stage's output.
pub fn check(pipeline: &Pipeline) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let root = &pipeline.root;
    let work_dir = project_relative(root, &pipeline.work_dir.to_string_lossy());
    if let Err(problem) = &work_dir {
        errors.push(Diagnostic::new(
            None,
            format!("[pipeline] work_dir {problem}: nnflow writes and deletes there"),
        ));
    }
    let cache_dir = real_path(root, &pipeline.cache_dir);
    if real_path(root, Path::new(".")).starts_with(&cache_dir) {
        errors.push(Diagnostic::new(
            None,
            format!(
                "the cache folder {} is the project folder or one of its parents",
                cache_dir.display()
            ),
        ));
    }
    let pipeline_files: Vec<String> = pipeline
        .sources
        .paths()
        .filter_map(|file| project_relative(root, &file.to_string_lossy()).ok())
        .collect();
    let mut claimed: Vec<(usize, String)> = Vec::new();
    for (index, instance) in pipeline.instances.iter().enumerate() {
        let inputs: Vec<String> = instance
            .implementation
            .inputs()
            .iter()
            .filter_map(|input| project_relative(root, &input.path).ok())
            .collect();
        for declared in instance.implementation.project_outputs() {
            let location = instance.value_location(&declared);
            let fail = |message: String| {
                Diagnostic::new(
                    location.clone(),
                    format!("stage `{}`: output {message}", instance.id),
                )
            };
            let output = match project_relative(root, &declared) {
                Ok(output) => output,
                Err(problem) => {
                    errors.push(fail(problem.to_string()));
                    continue;
                }
            };
            let mut clash = |what: String, other: &str| {
                if paths_overlap(&output, other) {
                    errors.push(fail(format!("`{declared}` overlaps {what}")));
                    true
                } else {
                    false
                }
            };
            let _ = work_dir
                .as_ref()
                .map(|w| clash(format!("nnflow's work directory `{w}`"), w));
            if let Ok(cache) = project_relative(root, &cache_dir.to_string_lossy()) {
                clash(format!("the cache folder `{cache}`"), &cache);
            }
            for file in &pipeline_files {
                clash(format!("the pipeline file `{file}`"), file);
            }
            for input in &inputs {
                clash(format!("the stage's own input `{input}`"), input);
            }
            for (_, path) in claimed.iter().filter(|(other, _)| *other == index) {
                clash(format!("its other output `{path}`"), path);
            }
            for (other, path) in claimed.iter().filter(|(other, _)| *other != index) {
                if paths_overlap(&output, path) {
                    let location = instance.key_locations.get("outputs").cloned();
                    let message = format!(
                        "stages `{}` and `{}` both claim output `{output}` (overlaps `{path}`)",
                        pipeline.instances[*other].id, instance.id
                    );
                    errors.push(Diagnostic::new(
                        location.or(Some(instance.location.clone())),
                        message,
                    ));
                }
            }
            claimed.push((index, output));
        }
    }
    errors
}

impl Instance {
    /// Where a string parameter value is written (for pointing an error at it); the stage's
    /// table when no parameter holds exactly that text.
    pub fn value_location(&self, value: &str) -> Option<Location> {
        self.params_node
            .find_string(value)
            .map(|node| node.location.clone())
            .or_else(|| Some(self.location.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_to_one_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("x")).unwrap();
        assert_eq!(project_relative(&root, "x/../out.txt").unwrap(), "out.txt");
        assert_eq!(project_relative(&root, "./results/").unwrap(), "results");
        let absolute = root.join("out.txt");
        assert_eq!(
            project_relative(&root, &absolute.to_string_lossy()).unwrap(),
            "out.txt"
        );
        assert_eq!(project_relative(&root, "res/*.txt").unwrap(), "res/*.txt");
    }

    #[test]
    fn paths_leaving_the_project_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        std::fs::create_dir(&root).unwrap();
        let root = root.canonicalize().unwrap();
        for bad in ["../victim", ".", "", "x/../..", "/etc/passwd", "*/../../x"] {
            assert!(project_relative(&root, bad).is_err(), "{bad:?} was accepted");
        }
        // A symlink leading out, followed by `..`: the kernel applies `..` after the link.
        let outside = dir.path().join("outside/deep");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        assert!(project_relative(&root, "link/file").is_err());
        assert!(project_relative(&root, "link/../victim").is_err());
        // A dangling link: writing through it would create its target outside.
        std::os::unix::fs::symlink(dir.path().join("nowhere"), root.join("dangling")).unwrap();
        assert!(project_relative(&root, "dangling/x").is_err());
    }
}
