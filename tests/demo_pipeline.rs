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
    predictions_go_where_the_pipeline_says(&project, &args, &data);
}

/// Issue 14: a cache hit lands in the folder the pipeline names now; the test images and a folder
/// holding the user's files are never written over.
fn predictions_go_where_the_pipeline_says(project: &Project, args: &[&str], data: &std::path::Path) {
    let with = |predictions: &str| {
        let mut full = args.to_vec();
        full.extend(["--set", predictions]);
        project.run(&full)
    };
    let moved = with("predictions=demo-data/moved");
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    assert_eq!(moved.outcome("predict"), "cached");
    for case in ["test_000", "test_001", "test_002"] {
        let name = format!("{case}.nii.gz");
        let restored = std::fs::read(data.join("moved").join(&name)).unwrap();
        assert_eq!(
            restored,
            std::fs::read(data.join("predictions").join(&name)).unwrap()
        );
    }

    let images = data.join("Dataset900_Demo/imagesTs");
    let count = std::fs::read_dir(&images).unwrap().count();
    let onto_images = with("predictions=demo-data/Dataset900_Demo/imagesTs");
    assert_eq!(onto_images.code, 2, "{}", onto_images.stderr);
    assert!(
        onto_images.stderr.contains("overlaps the stage's own input"),
        "{}",
        onto_images.stderr
    );
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), count);

    project.write("pipelines/demo-data/mine/notes.txt", "the user's");
    let onto_user_files = with("predictions=demo-data/mine");
    assert_eq!(onto_user_files.code, 1);
    assert_eq!(onto_user_files.outcome("predict"), "failed");
    assert!(
        onto_user_files
            .json
            .to_string()
            .contains("demo-data/mine/notes.txt"),
        "{}",
        onto_user_files.json
    );
    assert_eq!(project.read("pipelines/demo-data/mine/notes.txt"), "the user's");
}
