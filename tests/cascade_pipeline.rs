//! nnU-Net's cascade end to end on CPU: a synthetic dataset of 64^3 images planned for a tiny GPU,
//! where nnU-Net's planner makes a 3d_lowres + 3d_cascade_fullres (tests/fixtures/plan/
//! synthetic_cascade, from tests/fixtures/plan/generate.py). The default pipeline trains 3d_lowres,
//! stores its cross-validation predictions on the full-resolution grid, trains the cascade with
//! them as extra input channels, selects among all models and predicts through the cascade. A
//! change to the 3d_lowres settings alone reruns 3d_lowres and the cascade, not 3d_fullres; the
//! cascade alone (`configurations = ["3d_lowres", "3d_cascade_fullres"]`) preprocesses 3d_fullres
//! without training it.

mod common;

use std::path::Path;

use common::Project;
use nnflow::data::case_store::{read_case, read_labels};
use nnflow::data::nifti;

const DATASET: &str = "data/Dataset950_Cascade";

fn pipeline(lowres_seed: u64) -> String {
    format!(
        r#"
[pipeline]
name = "cascade"
extends = "pipelines/nnunet.toml"

[vars]
dataset = "{DATASET}"
test_images = "{DATASET}/imagesTs"
predictions = "predictions"
gpu_memory_gb = 0.05
configurations = ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
folds = [0, 1]

[stages.data]
kind = "command"
cmd = "rm -rf ${{dataset}} && $NNFLOW_EXE synth ${{dataset}} --cases 6 --shape 64,64,64 --spacing 1,1,1 --test-cases 1"
outputs = ["${{dataset}}"]

[stages.train]
splits = "splits.json"
epochs = 2
iterations_per_epoch = 3
val_iterations = 1
validation_mirroring = false
threads = 1

# only 3d_lowres: this pipeline's override adds to the base's (the cascade's inputs)
[[stages.train.instance_overrides]]
where = {{ configuration = "3d_lowres" }}
seed = {lowres_seed}

[stages.predict]
mirroring = false

# the cascade alone on the test image, whatever the selection
[stages.predict_cascade]
kind = "predict"
images = "${{test_images}}"
output = "predictions_cascade"
dataset = "${{dataset}}"
plan = "${{plan.outputs}}"
trainings = "${{train[*].outputs}}"
configuration = "3d_cascade_fullres"
mirroring = false

# the ensemble of 3d_lowres and the cascade: 3d_lowres is predicted once, for both
[stages.predict_pair]
kind = "predict"
images = "${{test_images}}"
output = "predictions_pair"
dataset = "${{dataset}}"
plan = "${{plan.outputs}}"
trainings = "${{train[*].outputs}}"
configuration = ["3d_lowres", "3d_cascade_fullres"]
mirroring = false
"#
    )
}

/// The shape of one tensor in a safetensors file (its JSON header).
fn tensor_shape(file: &Path, name: &str) -> Vec<usize> {
    let bytes = std::fs::read(file).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    serde_json::from_value(header[name]["shape"].clone())
        .unwrap_or_else(|_| panic!("no {name} in {}", file.display()))
}

#[test]
fn the_cascade_trains_on_lowres_predictions_and_predicts_through_them() {
    let project = Project::new();
    project.copy_pipelines(&["nnunet.toml"]);
    project.write("p.toml", &pipeline(1));
    // two folds of three cases, so two 3d_lowres trainings hold out every case
    let ids: Vec<String> = (0..6).map(|i| format!("case_{i:03}")).collect();
    let splits = serde_json::json!([
        {"train": ids[3..], "val": ids[..3]},
        {"train": ids[..3], "val": ids[3..]},
    ]);
    project.write("splits.json", &splits.to_string());

    let result = project.run(&["p.toml"]);
    assert_eq!(result.code, 0, "{}\n{}", result.stderr, result.json);
    let out = project.path().join(".nnflow/cascade/out");

    // the plan has the cascade, as nnU-Net plans it for this dataset
    let plans: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/cascade/out/plan/plans.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan/synthetic_cascade/plans.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for configuration in ["3d_fullres", "3d_lowres"] {
        for key in ["patch_size", "spacing", "batch_size"] {
            assert_eq!(
                plans["configurations"][configuration][key], reference["configurations"][configuration][key],
                "{configuration} {key}"
            );
        }
    }
    assert_eq!(
        plans["configurations"]["3d_cascade_fullres"]["previous_stage"],
        "3d_lowres"
    );
    // the cascade has no preprocessing of its own: it trains on 3d_fullres's
    let ids_run: Vec<&str> = result.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids_run
            .iter()
            .any(|id| id.contains("configuration=3d_cascade_fullres]") && !id.starts_with("train")),
        "{ids_run:?}"
    );

    // every case's 3d_lowres prediction, on the 3d_fullres grid, from the fold that held it out
    let fullres = out.join("preprocess/configuration=3d_fullres");
    for (fold, held_out) in [(0, &ids[..3]), (1, &ids[3..])] {
        let training = out.join(format!("train/configuration=3d_lowres,fold={fold}"));
        for id in held_out {
            let previous =
                read_labels(&training.join(format!("next_stage/3d_cascade_fullres/{id}.zarr"))).unwrap();
            let data = read_case(&fullres, id).unwrap().data;
            assert_eq!(previous.shape()[0], 1);
            assert_eq!(previous.shape()[1..], data.shape()[1..], "{id}");
            assert!(previous.iter().all(|&v| (0..=2).contains(&v)), "{id}: labels 0-2");
        }
    }

    // the cascade's network sees the image plus one channel per foreground label
    for (configuration, channels) in [("3d_fullres", 1), ("3d_cascade_fullres", 3)] {
        let weights = out.join(format!(
            "train/configuration={configuration},fold=0/checkpoint_final.safetensors"
        ));
        let shape = tensor_shape(&weights, "encoder.stages.0.0.convs.0.conv.weight");
        assert_eq!(shape[1], channels, "{configuration}: input channels");
    }

    // every model and pair is a candidate
    let decision: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/cascade/out/select/decision.json")).unwrap();
    let candidates: Vec<Vec<String>> = decision["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::from_value(c["configurations"].clone()).unwrap())
        .collect();
    assert_eq!(candidates.len(), 6, "{candidates:?}");
    assert_eq!(candidates[2], ["3d_cascade_fullres"]);
    assert!(candidates.contains(&vec!["3d_lowres".to_string(), "3d_cascade_fullres".to_string()]));

    // predictions through the cascade, on the test image's grid
    let image = nifti::read_header(
        project
            .path()
            .join(format!("{DATASET}/imagesTs/test_000_0000.nii.gz")),
    )
    .unwrap();
    for folder in ["predictions", "predictions_cascade", "predictions_pair"] {
        let prediction =
            nifti::read_header(project.path().join(format!("{folder}/test_000.nii.gz"))).unwrap();
        assert_eq!(prediction.shape_zyx(), image.shape_zyx(), "{folder}");
        assert_eq!(prediction.affine(), image.affine(), "{folder}");
    }

    let job: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/cascade/out/predict_pair/predict_job.json")).unwrap();
    let models: Vec<(String, bool)> = job["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["configuration"].as_str().unwrap().to_string(),
                m["member"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("3d_lowres".to_string(), true),
            ("3d_cascade_fullres".to_string(), true)
        ]
    );
    let job: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/cascade/out/predict_cascade/predict_job.json")).unwrap();
    assert_eq!(job["models"][0]["configuration"], "3d_lowres");
    assert_eq!(
        job["models"][0]["member"], false,
        "the cascade's previous stage only"
    );

    // 3d_lowres settings alone: 3d_lowres, the cascade and what follows rerun; 3d_fullres does not
    project.write("p.toml", &pipeline(2));
    let rerun = project.run(&["p.toml"]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    let ran = rerun.with_outcome("ran");
    for fold in [0, 1] {
        assert!(
            ran.contains(&format!("train[configuration=3d_lowres,fold={fold}]")),
            "{ran:?}"
        );
        assert!(
            ran.contains(&format!("train[configuration=3d_cascade_fullres,fold={fold}]")),
            "{ran:?}"
        );
        assert_eq!(
            rerun.outcome(&format!("train[configuration=3d_fullres,fold={fold}]")),
            "cached"
        );
    }
    for stage in [
        "data",
        "fingerprint",
        "plan",
        "preprocess[configuration=3d_fullres]",
    ] {
        assert_eq!(rerun.outcome(stage), "cached", "{stage}");
    }

    // The cascade alone, as nnU-Net trains it: 3d_fullres is preprocessed (the cascade trains on
    // its data) but not trained. The cascade's trainings are the same as before, so cached.
    let alone = project.run(&[
        "p.toml",
        "--set",
        r#"configurations=["3d_lowres", "3d_cascade_fullres"]"#,
    ]);
    assert_eq!(alone.code, 0, "{}\n{}", alone.stderr, alone.json);
    let ids: Vec<&str> = alone.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.iter()
            .any(|id| id.starts_with("train[configuration=3d_fullres")),
        "{ids:?}"
    );
    assert!(!ids.iter().any(|id| id.contains("configuration=2d")), "{ids:?}");
    for stage in [
        "preprocess[configuration=3d_fullres]",
        "train[configuration=3d_lowres,fold=0]",
        "train[configuration=3d_cascade_fullres,fold=1]",
    ] {
        assert_eq!(alone.outcome(stage), "cached", "{stage}");
    }
    let decision: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/cascade/out/select/decision.json")).unwrap();
    let candidates = decision["candidates"].as_array().unwrap();
    assert_eq!(
        candidates.len(),
        3,
        "3d_lowres, the cascade and the pair: {candidates:?}"
    );
    assert!(project.path().join("predictions/test_000.nii.gz").is_file());
    // naming a preprocessing no stage needs says so
    let left_out = project.run(&[
        "p.toml",
        "--set",
        r#"configurations=["3d_lowres", "3d_cascade_fullres"]"#,
        "preprocess[configuration=2d]",
    ]);
    assert_ne!(left_out.code, 0);
    assert!(left_out.stderr.contains("no other stage"), "{}", left_out.stderr);
}
