//! What a run records, shared by the local and Slurm executors: how each selected instance
//! finished (reported as it finishes), the run's report made from that, and what the run leaves
//! in the work directory: the lock file and a line of run history.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::evaluate::display_path;
use super::executor::{Counts, Outcome, Restored, RunReport, StageReport, JSON_SCHEMA_VERSION};
use super::instance::Done;
use super::progress::Progress;
use super::record::{write_lock_file, Record};
use super::Engine;

/// How one instance finished.
pub(crate) struct Finished {
    pub index: usize,
    pub outcome: Outcome,
    /// Which cache its outputs came from, when they were restored.
    pub restored: Option<Restored>,
    /// What it left, when it completed.
    pub done: Option<Done>,
    pub seconds: f64,
    pub error: Option<String>,
}

/// How a run's selected instances have finished so far, each reported as it finishes.
pub(crate) struct Ledger<'a> {
    engine: &'a Engine,
    finished: BTreeMap<usize, Finished>,
    pub progress: Progress,
}

impl<'a> Ledger<'a> {
    /// An empty ledger for a run of `total` instances, with its progress display.
    pub(crate) fn new(engine: &'a Engine, total: usize, quiet: bool) -> Ledger<'a> {
        Ledger {
            engine,
            finished: BTreeMap::new(),
            progress: Progress::new(total, quiet),
        }
    }

    /// How the instance finished, when it has.
    pub(crate) fn get(&self, index: usize) -> Option<&Finished> {
        self.finished.get(&index)
    }

    /// Reports how an instance finished and keeps it for the run's report.
    pub(crate) fn record(&mut self, finished: Finished) {
        self.progress.report(self.engine, &finished);
        self.finished.insert(finished.index, finished);
    }

    /// Records an instance that finished without running (fresh, not applicable, or held back).
    pub(crate) fn settle(&mut self, index: usize, outcome: Outcome, error: Option<String>) {
        self.record(Finished {
            index,
            outcome,
            restored: None,
            done: None,
            seconds: 0.0,
            error,
        });
    }

    /// Why the instance cannot run, when one of its upstream instances failed or was skipped.
    pub(crate) fn upstream_not_completed(&self, index: usize) -> Option<String> {
        let engine = self.engine;
        let bad = engine.dag.dependencies(index).into_iter().find(|d| {
            self.get(*d)
                .is_some_and(|f| matches!(f.outcome, Outcome::Failed | Outcome::Skipped))
        })?;
        Some(format!(
            "upstream `{}` did not complete",
            engine.pipeline.instances[bad].id
        ))
    }

    /// Ends the progress display; the run's report (see [`conclude`]).
    pub(crate) fn conclude(self, selected: &[usize], interrupted: bool) -> RunReport {
        self.progress.finish();
        conclude(self.engine, selected, self.finished, interrupted)
    }
}

/// The run's report from how each selected instance finished (those that never started were held
/// back by a failure or the interruption); writes the lock file and the run history.
fn conclude(
    engine: &Engine,
    selected: &[usize],
    mut finished: BTreeMap<usize, Finished>,
    interrupted: bool,
) -> RunReport {
    let stages: Vec<StageReport> = selected
        .iter()
        .map(|&index| {
            let instance = &engine.pipeline.instances[index];
            let (outcome, restored_from, seconds, error) = match finished.remove(&index) {
                Some(f) => (f.outcome, f.restored, f.seconds, f.error),
                None => (
                    Outcome::Skipped,
                    None,
                    0.0,
                    Some(
                        if interrupted {
                            "interrupted"
                        } else {
                            "not started after a failure"
                        }
                        .to_string(),
                    ),
                ),
            };
            StageReport {
                id: instance.id.clone(),
                kind: instance.kind.name.to_string(),
                outcome,
                seconds,
                outputs: instance.out_dir.clone(),
                restored_from,
                error,
            }
        })
        .collect();
    // what the run computed reaches the remote before the run reports
    let remote = engine.remote.as_ref().map(|remote| remote.finish());
    write_lock(engine);
    if let Err(e) = engine.hasher.save() {
        crate::errln!("warning: cannot save the stat cache: {e}");
    }
    append_run_history(engine, selected);
    let ok = stages
        .iter()
        .all(|s| matches!(s.outcome, Outcome::Ran | Outcome::Cached | Outcome::NotApplicable));
    let count = |wanted: &[Outcome]| stages.iter().filter(|s| wanted.contains(&s.outcome)).count();
    let counts = Counts {
        ran: count(&[Outcome::Ran]),
        cached: count(&[Outcome::Cached]),
        failed: count(&[Outcome::Failed]),
        skipped: count(&[Outcome::Skipped, Outcome::NotApplicable]),
    };
    let report = RunReport {
        schema_version: JSON_SCHEMA_VERSION,
        pipeline: engine.pipeline.name.clone(),
        ok,
        interrupted,
        counts,
        remote,
        stages,
    };
    write_last_run(engine, &report);
    report
}

/// `last_run.json` in the state folder: how each stage of the latest run finished (ran, cached,
/// failed and why, skipped and why), which the records of successful runs alone cannot tell. The
/// report page shows it.
fn write_last_run(engine: &Engine, report: &RunReport) {
    let path = engine.pipeline.state_dir.join("last_run.json");
    let json = serde_json::to_vec_pretty(report).expect("the run report serializes");
    if let Err(e) = crate::atomic_file::write_atomically(&path, &json) {
        crate::errln!("warning: cannot write {}: {e}", path.display());
    }
}

/// Rewrites the lock file from the records of every instance that has one, declared outputs
/// named by where they lie.
fn write_lock(engine: &Engine) {
    let pipeline = &engine.pipeline;
    let records: Vec<Record> = engine
        .dag
        .order
        .iter()
        .filter_map(|&i| {
            let instance = &pipeline.instances[i];
            let mut record = engine.records.get(&instance.id)?;
            record.outputs = record
                .outputs
                .into_iter()
                .map(|(path, digest)| (display_path(pipeline, instance, &path), digest))
                .collect();
            Some(record)
        })
        .collect();
    let path = pipeline.state_dir.join("nnflow.lock");
    if let Err(e) = write_lock_file(&path, &pipeline.name, &records) {
        crate::errln!("warning: cannot write {}: {e}", path.display());
    }
}

/// One line per run with the keys it used, so `gc --keep-last N` can keep recent runs' entries.
fn append_run_history(engine: &Engine, selected: &[usize]) {
    use std::io::Write;
    let keys: Vec<String> = selected
        .iter()
        .filter_map(|&i| engine.records.get(&engine.pipeline.instances[i].id))
        .map(|r| r.key)
        .collect();
    let line =
        serde_json::json!({ "pipeline": engine.pipeline.name, "finished_unix": now_unix(), "keys": keys });
    let path = engine.pipeline.work_dir.join("state").join("runs.jsonl");
    let _ = fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
    if let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
