//! Garbage collection of the cache: keep the entries the pipeline's current records reference,
//! plus those used by the last N runs recorded in this work directory; remove the rest.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::cache::GcReport;
use super::locks::{lock_path, remove_staging, staging_parts};
use super::record::file_safe;
use super::{Engine, RunError};

/// Staging folders of ids the pipeline no longer has are removed after this long.
const UNKNOWN_STAGING_AGE: Duration = Duration::from_secs(24 * 60 * 60);

pub fn collect(engine: &Engine, keep_last_runs: usize) -> Result<GcReport, RunError> {
    let mut keep: HashSet<String> = engine
        .dag
        .order
        .iter()
        .filter_map(|&i| engine.records.get(&engine.pipeline.instances[i].id))
        .map(|record| record.key)
        .collect();
    let history = engine.pipeline.work_dir.join("state").join("runs.jsonl");
    if keep_last_runs > 0 {
        let text = std::fs::read_to_string(&history).unwrap_or_default();
        for line in text.lines().rev().take(keep_last_runs) {
            let Ok(run) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let keys = run["keys"].as_array().into_iter().flatten();
            keep.extend(keys.filter_map(|k| k.as_str().map(str::to_string)));
        }
    }
    let mut report = engine.cache.gc(&keep).map_err(|source| RunError::Collect {
        cache: engine.cache.root().to_path_buf(),
        source,
    })?;
    report.staging_folders_removed = remove_killed_staging(engine);
    Ok(report)
}

/// Staging folders are left behind only by runs that were killed. One belongs to a running stage
/// while that instance's lock is held (on any host sharing the folder); one of an id this
/// pipeline no longer has goes once it is older than a day.
fn remove_killed_staging(engine: &Engine) -> usize {
    let state_dir = &engine.pipeline.state_dir;
    let ids: HashMap<String, &str> = engine
        .pipeline
        .instances
        .iter()
        .map(|i| (file_safe(&i.id), i.id.as_str()))
        .collect();
    remove_staging(state_dir, "", |path| {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some((safe_id, _, _)) = staging_parts(&name) else {
            return false;
        };
        match ids.get(safe_id) {
            Some(id) => {
                std::fs::File::open(lock_path(state_dir, id)).map_or(true, |lock| lock.try_lock().is_ok())
            }
            None => std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > UNKNOWN_STAGING_AGE),
        }
    })
}
