//! The demo pipeline (nnU-Net's whole pipeline on a synthetic dataset) end to end on CPU, made
//! smaller (two folds): the test predictions reach a foreground Dice an untrained model cannot,
//! they carry their input's geometry, the unplanned cascade is reported as skipped, and a second
//! run executes nothing.

mod common;

use common::browser::check_page;
use common::report_check::check_report_folder;
use common::{stdout, Project};
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

    report_pages(&project, &args);

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

/// Issue 18: the report stage's page and `nnflow report`'s: well-formed, every picture there and
/// decoding, every test case with a row and three overlays; in Chromium no console error and every
/// image loaded.
fn report_pages(project: &Project, args: &[&str]) {
    let stage_page = check_report_folder(&project.path().join("pipelines/.nnflow/demo/out/report"));
    let mut command = vec!["report"];
    command.extend(args);
    command.extend(["-o", "report"]);
    let output = project.nnflow(&command);
    assert_eq!(output.status.code(), Some(0), "{}", common::stderr(&output));
    assert!(
        stdout(&output).contains("report/index.html"),
        "{}",
        stdout(&output)
    );
    let page = check_report_folder(&project.path().join("report"));
    assert!(common::report_check::referenced_pictures(&page).len() >= 4 + 3 * 11);
    for html in [&stage_page, &page] {
        for case in ["test_000", "test_001", "test_002"] {
            assert!(html.contains(&format!(">{case}</a></td>")), "{case} has a row");
            for view in ["axial", "coronal", "sagittal"] {
                let picture = format!("img/case-test-{case}_{view}.png");
                assert!(html.contains(&picture), "{picture}");
            }
        }
        for section in ["id=\"dataset\"", "id=\"training\"", "id=\"crossval\"", "(chosen)"] {
            assert!(html.contains(section), "{section}");
        }
    }
    // the command's page knows each stage's state and the latest run's outcome
    assert!(page.contains("<td>train[configuration=2d,fold=0]</td><td>train</td><td>fresh</td>"));
    assert!(page.contains("no configuration `3d_lowres`"), "skipped, and why");
    // asked again, the folder it wrote is replaced; a folder of the user's is refused
    assert_eq!(project.nnflow(&command).status.code(), Some(0));
    project.write("mine/notes.txt", "the user's");
    let mut onto_user_files = vec!["report"];
    onto_user_files.extend(args);
    onto_user_files.extend(["-o", "mine"]);
    let refused = project.nnflow(&onto_user_files);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        common::stderr(&refused).contains("did not write"),
        "{}",
        common::stderr(&refused)
    );
    assert_eq!(project.read("mine/notes.txt"), "the user's");

    let Some(browser) = check_page(&project.path().join("report/index.html"), (1280, 2000)) else {
        return;
    };
    assert!(browser.console_errors.is_empty(), "{:?}", browser.console_errors);
    assert!(browser.images.len() >= 3 * 11, "{} images", browser.images.len());
    let unloaded: Vec<_> = browser.images.iter().filter(|(_, width)| *width == 0).collect();
    assert!(unloaded.is_empty(), "not loaded: {unloaded:?}");
    assert_eq!(browser.title, "nnflow report: demo");
    assert!(browser.screenshot_png.starts_with(b"\x89PNG"));
    if let Some(path) = std::env::var_os("NNFLOW_REPORT_SCREENSHOT") {
        std::fs::write(path, &browser.screenshot_png).unwrap();
    }
}

/// A pipeline that has not run: the page shows the DAG, every stage new, and says what is missing.
#[test]
fn the_report_of_a_pipeline_that_has_not_run() {
    let project = Project::new();
    project.copy_pipelines(&["nnunet.toml", "demo.toml"]);
    let output = project.nnflow(&["report", "pipelines/demo.toml", "-o", "report"]);
    assert_eq!(output.status.code(), Some(0), "{}", common::stderr(&output));
    let page = check_report_folder(&project.path().join("report"));
    assert!(common::report_check::referenced_pictures(&page).is_empty());
    assert!(page.contains("Nothing has run yet"), "{page}");
    assert!(
        page.contains("<td>fingerprint</td><td>fingerprint</td><td>new</td>"),
        "{page}"
    );
    assert!(page.contains("No finished training yet"), "{page}");
}
