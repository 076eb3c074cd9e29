//! `nnflow doctor` asks the libtorch worker (`nnflow-torch`) for its facts.

mod common;

#[test]
fn doctor_reports_libtorch_through_the_worker() {
    let project = common::Project::new();
    let output = project.nnflow(&["doctor", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", common::stderr(&output));
    let facts: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(facts["nnflow_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(facts["torch"]["libtorch_version"], "2.11.0");
    let cuda = facts["torch"]["cuda_available"].as_bool().unwrap();
    let gpus = facts["torch"]["gpu_count"].as_u64().unwrap();
    assert_eq!(
        cuda,
        gpus > 0,
        "CUDA available exactly when GPUs are counted: {facts}"
    );
    assert!(facts["torch"]["torch_threads"].as_i64().unwrap() >= 1);
}

/// The engine binary must not load libtorch: its static initialisers cost about 0.25 s per start,
/// which would dominate every no-op run. Torch code belongs to the `nnflow-torch` worker.
#[test]
fn the_engine_binary_does_not_link_libtorch() {
    let output = std::process::Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_nnflow")])
        .output()
        .expect("readelf (binutils) is installed with the C toolchain");
    let dynamic = String::from_utf8_lossy(&output.stdout);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(!needed.is_empty(), "readelf listed no NEEDED entries: {dynamic}");
    assert!(
        needed.iter().all(|l| !l.contains("torch") && !l.contains("c10")),
        "nnflow links libtorch: {needed:#?}"
    );
    let worker = std::process::Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_nnflow-torch")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&worker.stdout).contains("libtorch_cpu.so"),
        "the worker does link it"
    );
}
