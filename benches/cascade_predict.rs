//! Cascade prediction against 3d_fullres alone, per case, on CPU: the synthetic large-image
//! dataset of tests/cascade_pipeline.rs (64^3, planned for a tiny GPU so nnU-Net makes a
//! 3d_lowres + 3d_cascade_fullres), briefly trained with two folds, then both `predict` stages on
//! the same test images with nnU-Net's defaults (mirroring, step 0.5, both folds). The per-case
//! time is the worker's own ("predicted in"): for the cascade it covers the 3d_lowres prediction,
//! its export and resampling to the full-resolution grid, and the cascade network. Prints
//! figures; asserts nothing about timing. Run with `cargo bench --bench cascade_predict`.

use std::path::Path;
use std::process::Command;

const PIPELINE: &str = r#"
[pipeline]
name = "bench"
extends = "nnunet.toml"

[vars]
dataset = "D"
gpu_memory_gb = 0.05
configurations = ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
folds = [0, 1]

[stages.data]
kind = "command"
cmd = "rm -rf D && $NNFLOW_EXE synth D --cases 6 --shape 64,64,64 --spacing 1,1,1 --test-cases 2"
outputs = ["D"]

[stages.train]
splits = "splits.json"
epochs = 1
iterations_per_epoch = 2
val_iterations = 1
validation_mirroring = false

[stages.predict_fullres]
kind = "predict"
images = "D/imagesTs"
output = "out_fullres"
dataset = "D"
plan = "${plan.outputs}"
trainings = "${train[*].outputs}"
configuration = "3d_fullres"
threads = 0

[stages.predict_cascade]
kind = "predict"
images = "D/imagesTs"
output = "out_cascade"
dataset = "D"
plan = "${plan.outputs}"
trainings = "${train[*].outputs}"
configuration = "3d_cascade_fullres"
threads = 0
after = ["predict_fullres"]
"#;

/// Seconds per case from a predict log's `<case>: predicted in S s` lines.
fn case_seconds(log: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    text.lines()
        .filter_map(|line| {
            line.split_once(": predicted in ")?
                .1
                .strip_suffix(" s")?
                .parse()
                .ok()
        })
        .collect()
}

fn main() {
    let nnflow = env!("CARGO_BIN_EXE_nnflow");
    let dir = tempfile::tempdir().expect("temporary folder");
    let project = dir.path();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    std::fs::copy(base, project.join("nnunet.toml")).expect("pipeline copies");
    std::fs::write(project.join("p.toml"), PIPELINE).expect("pipeline writes");
    let ids: Vec<String> = (0..6).map(|i| format!("case_{i:03}")).collect();
    let splits = serde_json::json!([
        {"train": ids[3..], "val": ids[..3]},
        {"train": ids[..3], "val": ids[3..]},
    ]);
    std::fs::write(project.join("splits.json"), splits.to_string()).expect("splits write");
    let status = Command::new(nnflow)
        .current_dir(project)
        .args(["run", "p.toml", "predict_fullres", "predict_cascade"])
        .status()
        .expect("nnflow runs");
    assert!(status.success(), "the benchmark pipeline failed");
    let logs = project.join(".nnflow/bench/logs");
    let fullres = case_seconds(&logs.join("predict_fullres.log"));
    let cascade = case_seconds(&logs.join("predict_cascade.log"));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "cascade prediction, 64^3 synthetic cases, CPU, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "  3d_fullres alone:                      {:.2} s per case ({fullres:.2?})",
        mean(&fullres)
    );
    println!(
        "  3d_lowres + resample + 3d_cascade:     {:.2} s per case ({cascade:.2?})",
        mean(&cascade)
    );
    println!(
        "  ratio:                                 {:.2}x",
        mean(&cascade) / mean(&fullres)
    );
}
