//! `nnflow report PIPELINE [-o DIR] [--open]`: the report page of the pipeline as it stands (run
//! or not: a pipeline that has not run shows its DAG and what is missing).

use std::path::{Path, PathBuf};

use super::output::outln;
use super::{PipelineArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::report::{from_engine, write_page};

/// Marks a folder the report wrote, so writing it again may replace what is there.
const MARKER: &str = ".nnflow-report";

pub fn report(args: &PipelineArgs, out: Option<PathBuf>, open_in_browser: bool) -> i32 {
    let engine = match super::commands::open(args) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let out = out.unwrap_or_else(|| engine.pipeline.state_dir.join("report"));
    if let Err(why) = check_destination(&out) {
        crate::errln!("error: {why}");
        return EXIT_INVALID;
    }
    let sources = match from_engine(&engine) {
        Ok(sources) => sources,
        Err(error) => {
            crate::errln!("error: {error}");
            return EXIT_INVALID;
        }
    };
    let written = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join(MARKER), "written by nnflow report\n"))
        .map_err(|e| e.to_string())
        .and_then(|()| write_page(&sources, &out).map_err(|e| e.to_string()));
    match written {
        Ok(written) => {
            outln!(
                "report: {} ({} cases, {} pictures)",
                written.index.display(),
                written.cases,
                written.pictures
            );
            if open_in_browser {
                open(&written.index);
            }
            EXIT_OK
        }
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_FAILED
        }
    }
}

/// nnflow writes only into a folder that is new, empty, or one it wrote a report into before.
fn check_destination(out: &Path) -> Result<(), String> {
    let Ok(mut entries) = std::fs::read_dir(out) else {
        return if out.exists() {
            Err(format!("{} is not a folder", out.display()))
        } else {
            Ok(())
        };
    };
    if entries.next().is_none() || out.join(MARKER).is_file() {
        Ok(())
    } else {
        Err(format!(
            "{} holds files nnflow did not write; give an empty or new folder with -o",
            out.display()
        ))
    }
}

/// Opens the page in the desktop's browser; a machine without one just keeps the path printed.
fn open(index: &Path) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    if std::process::Command::new(opener).arg(index).spawn().is_err() {
        crate::errln!(
            "warning: cannot start {opener}; open {} yourself",
            index.display()
        );
    }
}
