//! The `train` stage through the engine on a small synthetic 3D dataset (CPU): it learns, a killed
//! run resumes to the same weights, more epochs continue from the checkpoint, a damaged checkpoint
//! falls back to the one before it (or a fresh start), changing the augmentation re-runs training
//! only, and asking for CUDA without a GPU fails clearly.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{stderr, Project};

const TRAIN: &str = "train[configuration=3d_fullres,fold=0]";

fn project_with_dataset() -> Project {
    let project = Project::new();
    let output = project.nnflow(&[
        "synth",
        "D",
        "--cases",
        "10",
        "--shape",
        "32,32,32",
        "--spacing",
        "1,1,1",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    project
}

/// One 3d_fullres fold with the given extra settings.
fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        "configurations=[\"3d_fullres\"]",
        "--set",
        "folds=[0]",
        "--set",
        "fingerprint.foreground_samples=20000",
    ];
    for setting in extra {
        args.extend(["--set", setting]);
    }
    args.push("train"); // the target: training and what it needs, not selection and prediction
    args
}

fn train_out(project: &Project) -> PathBuf {
    project
        .path()
        .join(".nnflow/nnunet/out/train/configuration=3d_fullres,fold=0")
}

fn summary(project: &Project) -> serde_json::Value {
    let path = train_out(project).join("validation/summary.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn training_learns_the_synthetic_shapes() {
    let project = project_with_dataset();
    // 200 iterations of batch 2 on the planned patch
    let settings = [
        "train.epochs=20",
        "train.iterations_per_epoch=10",
        "train.val_iterations=2",
    ];
    let result = project.run(&args(&settings));
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.outcome(TRAIN), "ran");
    let dice = summary(&project)["foreground_mean"]["Dice"].as_f64().unwrap();
    assert!(dice > 0.8, "validation foreground Dice {dice}");
    let out = train_out(&project);
    for file in [
        "checkpoint_final.safetensors",
        "checkpoint_best.safetensors",
        "checkpoint_final.json",
        "progress.png",
        "training_log.txt",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let log = std::fs::read_to_string(out.join("training_log.txt")).unwrap();
    assert!(log.contains("epoch 19: lr"), "{log}");
    let again = project.run(&args(&settings));
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.with_outcome("ran").is_empty(),
        "second run executed {:?}",
        again.with_outcome("ran")
    );
}

/// Tiny, deterministic training settings (one thread, so libtorch's reductions keep their order).
const TINY: [&str; 7] = [
    "train.epochs=4",
    "train.iterations_per_epoch=3",
    "train.val_iterations=1",
    "train.patch_size=[16, 16, 16]",
    "train.checkpoint_every=1",
    "train.validation_mirroring=false",
    "train.threads=1",
];

fn resume_folder(project: &Project) -> PathBuf {
    project.path().join(".nnflow/nnunet/resume").join(TRAIN)
}

fn epochs_done(project: &Project) -> Option<u64> {
    let text = std::fs::read_to_string(resume_folder(project).join("checkpoint_latest.json")).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    state["epochs_done"].as_u64()
}

#[test]
fn a_killed_training_resumes_to_the_same_weights() {
    let uninterrupted = project_with_dataset();
    let result = uninterrupted.run(&args(&TINY));
    assert_eq!(result.code, 0, "{}", result.stderr);
    let expected = std::fs::read(train_out(&uninterrupted).join("checkpoint_final.safetensors")).unwrap();

    let killed = project_with_dataset();
    let mut run_args = vec!["run"];
    run_args.extend(args(&TINY));
    let mut child = killed.command(&run_args).spawn().unwrap();
    let started = Instant::now();
    while epochs_done(&killed).unwrap_or(0) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "training never reached epoch 2"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        epochs_done(&killed).unwrap() < 4,
        "the run finished before the kill"
    );

    let resumed = killed.run(&args(&TINY));
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(resumed.outcome(TRAIN), "ran");
    let log = std::fs::read_to_string(train_out(&killed).join("training_log.txt")).unwrap();
    assert!(log.contains("resuming after epoch"), "{log}");
    let weights = std::fs::read(train_out(&killed).join("checkpoint_final.safetensors")).unwrap();
    assert!(
        weights == expected,
        "resumed weights differ from the uninterrupted run's"
    );

    // More epochs continue from the stored checkpoint instead of starting over.
    let mut longer: Vec<&str> = TINY.to_vec();
    longer[0] = "train.epochs=5";
    let more = killed.run(&args(&longer));
    assert_eq!(more.code, 0, "{}", more.stderr);
    let log = std::fs::read_to_string(train_out(&killed).join("training_log.txt")).unwrap();
    assert!(log.contains("resuming after epoch 4"), "{log}");
    assert!(
        log.contains("epoch 4: lr") && !log.contains("epoch 3: lr"),
        "{log}"
    );
    assert!(resume_folder(&killed)
        .join("checkpoint_latest.optimizer.safetensors")
        .is_file());
}

/// The training's stage log (the worker's output) of the last run.
fn stage_log(project: &Project) -> String {
    project.read(&format!(".nnflow/nnunet/logs/{TRAIN}.log"))
}

/// Damages a file the way a full disk or a killed copy does: only its first bytes remain.
fn truncate(path: &Path) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(4).unwrap();
}

#[test]
fn a_damaged_resume_checkpoint_falls_back_instead_of_failing() {
    let project = project_with_dataset();
    let mut tiny: Vec<&str> = TINY.to_vec();
    tiny[0] = "train.epochs=2";
    let first = project.run(&args(&tiny));
    assert_eq!(first.code, 0, "{}", first.stderr);
    // the resume folder keeps the last two checkpoints: after epoch 2 (latest) and 1 (previous)
    let resume = resume_folder(&project);
    let latest = resume.join("checkpoint_latest.safetensors");
    truncate(&latest);

    // More epochs continue from a checkpoint: the previous one, as the latest is damaged.
    tiny[0] = "train.epochs=3";
    let second = project.run(&args(&tiny));
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.outcome(TRAIN), "ran");
    let log = stage_log(&project);
    let damaged_latest = format!(
        "resume checkpoint checkpoint_latest cannot be used: {}: damaged: 4 bytes where",
        latest.display()
    );
    assert!(
        log.contains(&damaged_latest) && log.contains("were written; falling back to checkpoint_previous"),
        "{log}"
    );
    assert!(log.contains("resuming after epoch 1 from"), "{log}");
    assert!(
        log.contains("epoch 1: lr") && !log.contains("epoch 0: lr"),
        "{log}"
    );
    let training_log = std::fs::read_to_string(train_out(&project).join("training_log.txt")).unwrap();
    assert!(training_log.contains(&damaged_latest), "{training_log}");

    // With both checkpoints damaged, training starts from scratch.
    let previous = resume.join("checkpoint_previous.optimizer.safetensors");
    truncate(&latest);
    truncate(&previous);
    tiny[0] = "train.epochs=4";
    let third = project.run(&args(&tiny));
    assert_eq!(third.code, 0, "{}", third.stderr);
    let log = stage_log(&project);
    assert!(
        log.contains(&damaged_latest) && log.contains("falling back to checkpoint_previous"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "resume checkpoint checkpoint_previous cannot be used: {}: damaged: 4 bytes where",
            previous.display()
        )) && log.contains("were written; starting training from scratch"),
        "{log}"
    );
    assert!(
        log.contains("epoch 0: lr") && !log.contains("resuming after"),
        "{log}"
    );
    // and its checkpoints are intact again
    assert_eq!(epochs_done(&project), Some(4));

    // `--force` retrains from scratch, not from the finished run's checkpoint (issue 14)
    let mut forced = args(&tiny);
    forced.extend(["--force", "train"]);
    let fourth = project.run(&forced);
    assert_eq!(fourth.code, 0, "{}", fourth.stderr);
    assert_eq!(fourth.outcome(TRAIN), "ran");
    let log = stage_log(&project);
    assert!(
        log.contains("epoch 0: lr") && !log.contains("resuming after"),
        "{log}"
    );
}

#[test]
fn changing_the_augmentation_reruns_training_only() {
    let project = project_with_dataset();
    let mut tiny: Vec<&str> = TINY.to_vec();
    tiny[0] = "train.epochs=1";
    let first = project.run(&args(&tiny));
    assert_eq!(first.code, 0, "{}", first.stderr);
    tiny.push("train.augment=[{ name = \"mirror\" }, { name = \"gaussian_noise\", p = 0.5 }]");
    let second = project.run(&args(&tiny));
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.with_outcome("ran"), [TRAIN]);
    assert_eq!(
        second.with_outcome("cached"),
        ["fingerprint", "plan", "preprocess[configuration=3d_fullres]"],
        "{:?}",
        second.json
    );
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if std::env::var_os("CUDA_VISIBLE_DEVICES").is_some_and(|v| !v.is_empty()) {
        return; // a GPU machine: the request would be honoured
    }
    let project = project_with_dataset();
    let result = project.run(&args(&["train.device=\"cuda\"", "train.epochs=1"]));
    assert_eq!(result.code, 1);
    assert_eq!(result.outcome(TRAIN), "failed");
    let error = result.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == TRAIN)
        .unwrap()["error"]
        .to_string();
    assert!(error.contains("no CUDA device is usable"), "{error}");
}

#[test]
fn region_datasets_train_with_sigmoid_outputs() {
    let project = project_with_dataset();
    let path = project.path().join("D/dataset.json");
    let mut dataset: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    dataset["labels"] = serde_json::json!({"background": 0, "whole": [1, 2], "core": 2});
    dataset["regions_class_order"] = serde_json::json!([1, 2]);
    std::fs::write(&path, dataset.to_string()).unwrap();
    let mut tiny: Vec<&str> = TINY.to_vec();
    tiny[0] = "train.epochs=2";
    let result = project.run(&args(&tiny));
    assert_eq!(result.code, 0, "{}", result.stderr);
    let summary = summary(&project);
    let keys: Vec<&String> = summary["mean"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["(1, 2)", "(2,)"]);
    let history: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(train_out(&project).join("training_history.json")).unwrap(),
    )
    .unwrap();
    // one pseudo Dice per region (no background channel with sigmoid outputs)
    assert_eq!(history[0]["pseudo_dice"].as_array().unwrap().len(), 2);
}
