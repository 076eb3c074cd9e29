//! The demo pipeline (nnU-Net's whole pipeline on a synthetic dataset) end to end on CPU, made
//! smaller (two folds): the test predictions reach a foreground Dice an untrained model cannot,
//! they carry their input's geometry, the unplanned cascade is reported as skipped, and a second
//! run executes nothing.

mod common;

use common::Project;
use nnflow::data::nifti;

#[test]
fn the_demo_pipeline_predicts_the_test_images() {
    let project = Project::new();
    project.copy_pipelines(&["nnunet.toml", "demo.toml"]);
    let args = ["pipelines/demo.toml", "--set", "folds=[0, 1]"];
    let result = project.run(&args);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    for stage in ["data", "select", "postprocess", "predict", "evaluate"] {
        assert_eq!(result.outcome(stage), "ran", "{stage}");
    }
    // small images: nnU-Net plans no cascade, so its instances are skipped with the reason
    for configuration in ["3d_lowres", "3d_cascade_fullres"] {
        let id = format!("train[configuration={configuration},fold=0]");
        assert_eq!(result.outcome(&id), "skipped", "{id}");
        let entry = result.json["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id.as_str())
            .unwrap()
            .clone();
        let reason = entry["error"].as_str().unwrap();
        assert!(
            reason.contains(&format!("no configuration `{configuration}`")),
            "{entry}"
        );
        assert!(
            reason.contains("less than a quarter of the median image"),
            "{entry}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&project.read("pipelines/.nnflow/demo/out/evaluate/summary.json")).unwrap();
    let dice = summary["foreground_mean"]["Dice"].as_f64().unwrap();
    assert!(dice > 0.7, "test foreground Dice {dice}");
    assert_eq!(summary["metric_per_case"].as_array().unwrap().len(), 3);
    let decision: serde_json::Value =
        serde_json::from_str(&project.read("pipelines/.nnflow/demo/out/select/decision.json")).unwrap();
    assert_eq!(
        decision["candidates"].as_array().unwrap().len(),
        3,
        "2d, 3d_fullres and the pair"
    );

    let data = project.path().join("pipelines/demo-data");
    for case in ["test_000", "test_001", "test_002"] {
        let prediction = nifti::read_header(data.join(format!("predictions/{case}.nii.gz"))).unwrap();
        let image =
            nifti::read_header(data.join(format!("Dataset900_Demo/imagesTs/{case}_0000.nii.gz"))).unwrap();
        assert_eq!(prediction.affine(), image.affine(), "{case}");
        assert_eq!(prediction.shape_zyx(), image.shape_zyx(), "{case}");
    }

    let again = project.run(&args);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.with_outcome("ran").is_empty(),
        "second run executed {:?}",
        again.with_outcome("ran")
    );
}
