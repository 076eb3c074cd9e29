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
