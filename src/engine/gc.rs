//! Garbage collection of the cache: keep the entries the pipeline's current records reference,
//! plus those used by the last N runs recorded in this work directory; remove the rest.

use std::collections::HashSet;

use super::cache::GcReport;
use super::Engine;

pub fn collect(engine: &Engine, keep_last_runs: usize) -> Result<GcReport, String> {
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
    engine
        .cache
        .gc(&keep)
        .map_err(|e| format!("cache {}: {e}", engine.cache.root().display()))
}
