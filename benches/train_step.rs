//! Training step time: the synthetic demo plan (3d_fullres of `nnflow synth`'s 32^3 cases) on CPU,
//! and, with `NNFLOW_BENCH_FULLRES=1`, nnU-Net's 3d_fullres topology at 128^3, batch 2 (on CUDA
//! when `NNFLOW_BENCH_DEVICE=cuda`, with fp16 autocast). Prints figures; asserts nothing about
//! timing. Run with `cargo bench --bench train_step`.
//!
//! For reference (../shared/TORCH.md, H100): nnU-Net's PyTorch step is 69 ms eager and 45 ms with
//! torch.compile for the 128^3 topology.

use std::path::Path;
use std::process::Command;

fn run(command: &mut Command) -> String {
    let output = command.output().expect("command starts");
    assert!(
        output.status.success(),
        "{:?} failed: {}",
        command,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn main() {
    let nnflow = env!("CARGO_BIN_EXE_nnflow");
    let worker = env!("CARGO_BIN_EXE_nnflow-torch");
    let dir = tempfile::tempdir().expect("temporary folder");
    let project = dir.path();
    run(Command::new(nnflow).current_dir(project).args([
        "synth",
        "D",
        "--cases",
        "10",
        "--shape",
        "32,32,32",
        "--spacing",
        "1,1,1",
    ]));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    std::fs::copy(pipeline, project.join("nnunet.toml")).expect("pipeline copies");
    run(Command::new(nnflow)
        .current_dir(project)
        .env("NNFLOW_CACHE_DIR", project.join("cache"))
        .args(["run", "nnunet.toml", "--set", "dataset=D", "plan"]));
    let plans = project.join(".nnflow/nnunet/out/plan/plans.json");
    println!("synthetic plan (10 cases of 32^3), 3d_fullres, CPU fp32:");
    print!(
        "  {}",
        run(Command::new(worker).args(["bench-step", "--plan", plans.to_str().unwrap(), "--steps", "20"]))
    );
    if std::env::var("NNFLOW_BENCH_FULLRES").is_ok_and(|v| v == "1") {
        let device = std::env::var("NNFLOW_BENCH_DEVICE").unwrap_or("cpu".into());
        println!("nnU-Net 3d_fullres topology, 128^3, batch 2, {device}:");
        print!(
            "  {}",
            run(Command::new(worker).args([
                "bench-step",
                "--fullres128",
                "--device",
                &device,
                "--amp",
                "--steps",
                "20"
            ]))
        );
    }
}
