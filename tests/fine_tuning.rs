//! Fine-tuning as nnU-Net users do it: a model trained elsewhere (here nnU-Net's own, from
//! tests/fixtures/predict/model.zip), its plans moved onto a new dataset (`plans_from`, nnU-Net's
//! `nnUNetv2_move_plans_between_datasets`) and its weights loaded by the new training
//! (`pretrained_weights`, nnU-Net's `-pretrained_weights`), everything but the segmentation
//! outputs. Trained with learning rate 0, every loaded weight must come out unchanged, which
//! shows they were all loaded; without the moved plans the shapes differ and the error names one.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::{stderr, Project};
use nnflow::network::pth::read_checkpoint;
use nnflow::network::safetensors::read_safetensors;

const TRAIN: &str = "train[configuration=3d_fullres,fold=0]";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/predict")
        .join(name)
}

/// nnU-Net's checkpoint of the fixture model, taken out of the zip nnU-Net exported.
fn extract_checkpoint(project: &Project) -> PathBuf {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(fixture("model.zip")).unwrap()).unwrap();
    let name = "Dataset990_Tiny/nnUNetTrainerTinyCPU__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth";
    let mut bytes = Vec::new();
    archive.by_name(name).unwrap().read_to_end(&mut bytes).unwrap();
    let path = project.path().join("pretrained.pth");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn args<'a>(pretrained: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "nnunet.toml",
        "--set",
        "dataset=D",
        "--set",
        "configurations=[\"3d_fullres\"]",
        "--set",
        "folds=[0]",
        "--set",
        "train.epochs=1",
        "--set",
        "train.iterations_per_epoch=2",
        "--set",
        "train.val_iterations=1",
        "--set",
        "train.learning_rate=0",
        "--set",
        "train.validation_mirroring=false",
        "--set",
        pretrained,
    ];
    for setting in extra {
        args.extend(["--set", setting]);
    }
    args.push("train");
    args
}

#[test]
fn a_model_trained_by_nnunet_is_fine_tuned_on_another_dataset() {
    let project = Project::new();
    // one foreground label where the pretrained model has two: the outputs are not loaded
    let output = project.nnflow(&[
        "synth",
        "D",
        "--cases",
        "6",
        "--shape",
        "20,48,48",
        "--spacing",
        "2.5,1,1",
        "--foreground-labels",
        "1",
        "--seed",
        "16",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml");
    project.write("nnunet.toml", &std::fs::read_to_string(pipeline).unwrap());
    let checkpoint = extract_checkpoint(&project);
    let pretrained = format!("train.pretrained_weights={}", checkpoint.display());
    let plans_from = format!("plan.plans_from={}", fixture("plans.json").display());

    // without the pretraining dataset's plans the network differs: the first mismatch is named
    let mismatch = project.run(&args(&pretrained, &[]));
    assert_ne!(mismatch.code, 0);
    let failure = format!("{}{}", mismatch.stderr, mismatch.json);
    assert!(
        failure.contains("has shape") && failure.contains("the network's is"),
        "{failure}"
    );
    assert!(failure.contains("pretrained.pth"), "{failure}");

    let result = project.run(&args(&pretrained, &[&plans_from]));
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.outcome(TRAIN), "ran");
    let plans: serde_json::Value =
        serde_json::from_str(&project.read(".nnflow/nnunet/out/plan/plans.json")).unwrap();
    let arch = &plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"];
    assert_eq!(arch["features_per_stage"], serde_json::json!([8, 16, 32, 32]));
    assert_eq!(plans["dataset_name"], "D");

    let loaded = read_checkpoint(&checkpoint).unwrap();
    let out = project
        .path()
        .join(".nnflow/nnunet/out/train/configuration=3d_fullres,fold=0");
    let trained = read_safetensors(&out.join("checkpoint_final.safetensors")).unwrap();
    let mut compared = 0;
    for tensor in &trained {
        let (name, shape, values) = (&tensor.name, &tensor.shape, &tensor.values);
        let source = loaded
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in nnU-Net's checkpoint"));
        if name.contains(".seg_layers.") {
            // this dataset's two classes, not the pretrained model's three
            assert_eq!(shape[0], 2, "{name}");
            assert_eq!(source.shape[0], 3, "{name}");
            continue;
        }
        assert_eq!(shape, &source.shape, "{name}");
        assert!(values == &source.values, "{name}: changed with learning rate 0");
        compared += 1;
    }
    assert!(compared > 50, "only {compared} tensors compared");
    let log = std::fs::read_to_string(out.join("training_log.txt")).unwrap();
    assert!(log.contains("pretrained weights"), "{log}");
}
