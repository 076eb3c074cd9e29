//! What running through Slurm costs: per stage, the time from `nnflow run` to the stage's command
//! starting (filesystem probe, submission, scheduling, nnflow starting on the node) and from the
//! command's end to `nnflow run` returning (receipt, polling); and the total for 100 tiny stages
//! (one matrix stage: one job array) against the same pipeline run locally. Needs a Slurm cluster
//! (`scripts/slurm-cluster.sh start`). Prints figures; asserts nothing about timing. Run with
//! `cargo bench --bench slurm_overhead`.

use std::path::Path;
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Runs `nnflow run p.toml ARGS` in `dir`; returns (start ns, end ns, wall seconds).
fn run(dir: &Path, args: &[&str]) -> (u128, u128, f64) {
    let started_ns = now_ns();
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_nnflow"))
        .current_dir(dir)
        .args(["run", "p.toml"])
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("nnflow runs");
    assert!(status.success(), "nnflow run {args:?} failed");
    (started_ns, now_ns(), started.elapsed().as_secs_f64())
}

fn main() {
    let slurm = Command::new("sinfo")
        .arg("-h")
        .output()
        .is_ok_and(|o| o.status.success());
    if !slurm {
        println!("no Slurm cluster answers (scripts/slurm-cluster.sh start, as root); nothing measured");
        return;
    }
    // one stage, five times: submit-to-start and end-to-noticed
    let mut to_start = Vec::new();
    let mut to_notice = Vec::new();
    for round in 0..5 {
        let dir = tempfile::tempdir().expect("temporary folder");
        std::fs::write(
            dir.path().join("p.toml"),
            format!(
                "[stages.one]\nkind = \"command\"\ncmd = \"echo $(date +%s%N) $(date +%s%N) {round} > $NNFLOW_OUT/t.txt\"\n"
            ),
        )
        .expect("pipeline writes");
        let (begin, end, _) = run(dir.path(), &["--executor", "slurm"]);
        let text = std::fs::read_to_string(dir.path().join(".nnflow/p/out/one/t.txt")).expect("stage ran");
        let mut stamps = text.split_whitespace().map(|s| s.parse::<u128>().expect("ns"));
        let (start, stop) = (stamps.next().unwrap(), stamps.next().unwrap());
        to_start.push((start - begin) as f64 / 1e9);
        to_notice.push((end - stop) as f64 / 1e9);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("one stage through Slurm (5 runs):");
    println!(
        "  run -> command starts:   {:.2} s ({to_start:.2?})",
        mean(&to_start)
    );
    println!(
        "  command ends -> run returns: {:.2} s ({to_notice:.2?})",
        mean(&to_notice)
    );

    // 100 tiny stages
    let pipeline = "[stages.tiny]\nkind = \"command\"\nmatrix = { i = [ ".to_string()
        + &(0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        + " ] }\ncmd = \"echo ${i} > $NNFLOW_OUT/i.txt\"\n";
    let mut totals = Vec::new();
    for executor in ["local", "slurm"] {
        let dir = tempfile::tempdir().expect("temporary folder");
        std::fs::write(dir.path().join("p.toml"), &pipeline).expect("pipeline writes");
        let (_, _, seconds) = run(dir.path(), &["--executor", executor]);
        let (_, _, again) = run(dir.path(), &["--executor", executor]);
        totals.push((executor, seconds, again));
    }
    println!("100 tiny stages (one matrix stage):");
    for (executor, seconds, again) in totals {
        println!("  {executor:>5}: {seconds:.2} s; unchanged rerun {again:.2} s");
    }
}
