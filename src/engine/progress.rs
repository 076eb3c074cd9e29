//! The progress display of a run, local or on Slurm: a bar on a terminal (its message the running
//! stage's own status line), plain lines otherwise, nothing with `--json`.

use std::io::IsTerminal;

use super::executor::{Outcome, Restored};
use super::run_record::Finished;
use super::Engine;

/// The progress bar's message, for a running stage to say how far it is (a no-op without a bar).
#[derive(Clone, Default)]
pub(super) struct StatusLine(Option<indicatif::ProgressBar>);

impl StatusLine {
    pub(super) fn set(&self, id: &str, text: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(format!("{id}: {text}"));
        }
    }
}

/// Progress on a terminal (a bar), plain lines otherwise, nothing with `--json`.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    pub(crate) fn new(total: usize, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress { bar, quiet }
    }

    pub(super) fn status_line(&self) -> StatusLine {
        StatusLine(self.bar.clone())
    }

    pub(crate) fn started(&self, id: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("running {id}"));
        }
    }

    pub(crate) fn report(&self, engine: &Engine, finished: &Finished) {
        let instance = &engine.pipeline.instances[finished.index];
        let outcome = match finished.outcome {
            Outcome::Ran => "ran",
            Outcome::Cached => "cached",
            Outcome::Failed => "FAILED",
            Outcome::Skipped | Outcome::NotApplicable => "skipped",
        };
        let from = match finished.restored {
            Some(Restored::Remote) => ", from the remote cache",
            _ => "",
        };
        let mut line = format!("{outcome:>8}  {} ({:.2}s{from})", instance.id, finished.seconds);
        if let Some(error) = &finished.error {
            line.push_str(&format!(": {error}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.println(line);
            }
            None if !self.quiet => crate::errln!("{line}"),
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
