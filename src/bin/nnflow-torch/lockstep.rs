//! nnflow's training step in lockstep with nnU-Net 2.8.1's: from nnU-Net's initial weights, on the
//! exact batches nnU-Net's `nnUNetTrainer.train_step` trained on (after its augmentation, with its
//! deep-supervision targets), nnflow's `Step` must reproduce nnU-Net's loss, gradient norm and
//! learning rate at every step and its weights after the last. This isolates the network, the
//! loss, the optimiser and the poly schedule from sampling and augmentation. The fixture comes from
//! `tests/fixtures/lockstep/generate.py` (see the README there).
//!
//! Tolerances. Two correct float32 implementations do not follow one trajectory. The generator
//! replays nnU-Net's own steps in float64, on 2, 3 and 4 torch threads and from initial weights
//! moved by one ulp (three seeds), and records how far each lands from the recorded run. Those
//! differences start at rounding level (at most 2e-7 at step 0) and grow in jumps (a
//! preactivation that rounding moves across a leaky ReLU's kink changes that voxel's gradient by a
//! finite amount), so after 20 steps nnU-Net's own replays disagree with it by up to 3e-5 in the
//! loss, 1.5e-3 in the gradient norm and 2e-2 of a tensor's largest value in the weights. The
//! envelope is the largest difference any of those seven replays shows, per step (a running
//! maximum: a difference persists in the weights once it appears) and per final tensor. nnflow is
//! one more float32 implementation with its own rounding, so it must stay within `FACTOR` times
//! that envelope, and within a floor of a few ulps where every replay happened to agree.
//!
//! The test fails for real differences: with momentum 0.98 instead of 0.99 the loss is off by
//! 7e-5 at step 1 (tolerance 4e-6); learning rate 0.011, gradient clipping at 0.8, a CE weight of
//! 0.95, `batch_dice` flipped or other deep-supervision weights fail at step 0 or 1; weight decay
//! 0 instead of 3e-5 leaves `decoder.seg_layers.1.bias` 2.4e-6 away (tolerance 1.0e-6).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use nnflow::data::dataset::Dataset;
use nnflow::network::Architecture;
use nnflow::plans::Plans;
use nnflow::train::data::Batch;
use nnflow::train::params::TrainParams;

use crate::loss::LossConfig;
use crate::optim::{poly_lr, LossScaler};
use crate::trainer::{batch_tensors, build_network, loss_config, optimiser, Step};

/// How many times the float32 envelope nnflow may drift (see the module docs): room for nnflow to
/// meet a few more kink events than the worst of seven replays. Measured, nnflow uses at most 21%
/// of the resulting tolerance anywhere, on 1 to 8 threads.
const FACTOR: f64 = 4.0;
/// Below the envelope's resolution: relative differences of a few float32 ulps (loss and grad
/// norm), and for tensors no replay moved, a few ulps of the tensor's scale.
const FLOOR_RELATIVE: f64 = 1e-6;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lockstep")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn shape5(t: &Tensor) -> [usize; 5] {
    let s = t.size();
    [0, 1, 2, 3, 4].map(|a| s[a] as usize)
}

/// Step `i` of the fixture as the batch the producer would have handed the trainer.
fn batch(tensors: &BTreeMap<String, Tensor>, i: usize, outputs: usize) -> Batch {
    let data = &tensors[&format!("step{i}.data")];
    Batch {
        data: Vec::<f32>::try_from(data.flatten(0, -1)).unwrap(),
        data_shape: shape5(data),
        targets: (0..outputs)
            .map(|k| {
                let t = &tensors[&format!("step{i}.target{k}")];
                let labels = Vec::<i16>::try_from(t.to_kind(Kind::Int16).flatten(0, -1)).unwrap();
                (labels, shape5(t))
            })
            .collect(),
    }
}

fn relative(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected.abs()
}

/// What nnflow computed in the run: per step the loss, gradient norm and learning rate, and the
/// final variables by name.
struct Run {
    loss: Vec<f64>,
    grad_norm: Vec<f64>,
    lr: Vec<f64>,
    final_weights: BTreeMap<String, Tensor>,
}

/// Sets up the network, optimiser and loss as `Trainer::set_up` does (from the fixture's
/// plans.json and dataset.json and the `train` stage's default parameters), loads nnU-Net's
/// initial weights and runs the fixture's steps.
fn run_nnflow(expected: &Value) -> Run {
    let dir = fixture();
    let settings = &expected["settings"];
    let params: TrainParams = serde_json::from_value(serde_json::json!({
        "dataset": dir, "plan": dir, "preprocessed": dir,
        "configuration": settings["configuration"],
        "epochs": settings["epochs"],
        "iterations_per_epoch": settings["iterations_per_epoch"],
        "device": "cpu",
    }))
    .unwrap();
    let plans = Plans::read(&dir.join("plans.json")).unwrap();
    let configuration = plans.configuration(&params.configuration).unwrap();
    let dataset = Dataset::open(&dir).unwrap();
    let arch = Architecture::from_plan(
        configuration.architecture().unwrap(),
        dataset.channels.len(),
        dataset.num_segmentation_heads(),
        params.deep_supervision,
    )
    .unwrap();
    let (vs, mut net) = build_network(&arch, Device::Cpu, params.seed);
    let weights = read_tensors(&dir.join("weights.safetensors"));
    let variables = vs.variables();
    assert_eq!(
        2 * variables.len(),
        weights.len(),
        "one initial and one final tensor per variable"
    );
    tch::no_grad(|| {
        for (name, mut variable) in variables {
            variable.copy_(&weights[&format!("initial.{name}")]);
        }
    });
    net.set_deep_supervision(params.deep_supervision);
    let (parameters, mut sgd) = optimiser(&vs, &params);
    let loss = loss_config(
        &params,
        &arch,
        configuration.batch_dice(),
        dataset.ignore_label,
        dataset.has_regions(),
    );
    assert_same_set_up(&params, &loss, settings);
    let step = Step {
        net: &net,
        variables: &parameters,
        loss: &loss,
        grad_clip: params.grad_clip,
        amp: false,
    };
    let batches = read_tensors(&dir.join("batches.safetensors"));
    let outputs = loss.deep_supervision_weights.len();
    let mut scaler = LossScaler::default();
    let mut run = Run {
        loss: Vec::new(),
        grad_norm: Vec::new(),
        lr: Vec::new(),
        final_weights: BTreeMap::new(),
    };
    for epoch in 0..params.epochs {
        let lr = poly_lr(params.learning_rate, epoch, params.epochs);
        for iteration in 0..params.iterations_per_epoch {
            let i = epoch * params.iterations_per_epoch + iteration;
            let (x, targets) = batch_tensors(&batch(&batches, i, outputs), arch.spatial_dims, Device::Cpu);
            let (value, norm) = step.run_with_grad_norm(&x, &targets, &mut sgd, &mut scaler, lr);
            run.loss.push(value.double_value(&[]));
            run.grad_norm.push(norm);
            run.lr.push(lr);
        }
    }
    run.final_weights = vs.variables().into_iter().collect();
    run
}

/// The hyperparameters nnflow's defaults and the plan give equal those nnU-Net's trainer used, so
/// a failure below is about the computation, not the configuration.
fn assert_same_set_up(params: &TrainParams, loss: &LossConfig, settings: &Value) {
    let number = |key: &str| settings[key].as_f64().unwrap();
    assert_eq!(
        params.learning_rate,
        number("initial_lr"),
        "initial learning rate"
    );
    assert_eq!(params.momentum, number("momentum"), "momentum");
    assert_eq!(params.weight_decay, number("weight_decay"), "weight decay");
    assert_eq!(params.grad_clip, number("grad_clip"), "gradient clipping");
    assert_eq!(
        loss.batch_dice,
        settings["batch_dice"].as_bool().unwrap(),
        "batch_dice"
    );
    let weights = floats(&settings["deep_supervision_weights"]);
    assert_eq!(
        loss.deep_supervision_weights.len(),
        weights.len(),
        "deep-supervision outputs"
    );
    for (ours, theirs) in loss.deep_supervision_weights.iter().zip(&weights) {
        assert!(
            (ours - theirs).abs() < 1e-15,
            "deep-supervision weights {:?} vs nnU-Net {weights:?}",
            loss.deep_supervision_weights
        );
    }
    assert_eq!(
        (loss.weight_ce, loss.weight_dice, loss.regions, loss.ignore_label),
        (1.0, 1.0, false, None)
    );
}

#[test]
fn training_steps_equal_nnunet() {
    let expected = read_json(&fixture().join("expected.json"));
    let steps = expected["steps"].as_array().unwrap();
    assert!(steps.len() >= 20);
    let run = run_nnflow(&expected);
    assert_eq!(run.loss.len(), steps.len());
    let envelope = &expected["envelope"];
    let (loss_envelope, norm_envelope) = (floats(&envelope["loss_rel"]), floats(&envelope["grad_norm_rel"]));
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let lr = s["lr"].as_f64().unwrap();
        if relative(run.lr[i], lr) > 1e-15 {
            failures.push(format!("step {i}: lr {} vs nnU-Net {lr}", run.lr[i]));
        }
        for (what, actual, reference, envelope) in [
            ("loss", run.loss[i], s["loss"].as_f64().unwrap(), loss_envelope[i]),
            (
                "grad norm",
                run.grad_norm[i],
                s["grad_norm"].as_f64().unwrap(),
                norm_envelope[i],
            ),
        ] {
            let diff = relative(actual, reference);
            let tolerance = FACTOR * envelope.max(FLOOR_RELATIVE);
            report.push(format!(
                "step {i:2} {what:9}: {actual:.8} vs {reference:.8}, relative {diff:.2e} (tolerance {tolerance:.2e})"
            ));
            if diff > tolerance {
                failures.push(format!(
                    "step {i}: {what} {actual} vs nnU-Net {reference}: relative {diff:.3e} > {tolerance:.3e}"
                ));
            }
        }
    }
    let weights = read_tensors(&fixture().join("weights.safetensors"));
    for (name, ours) in &run.final_weights {
        let reference = weights[&format!("final.{name}")].to_kind(Kind::Double);
        let scale = expected["final_scale"][name].as_f64().unwrap();
        let diff = (ours.to_kind(Kind::Double) - &reference)
            .abs()
            .max()
            .double_value(&[]);
        let envelope = envelope["final_abs"][name].as_f64().unwrap();
        let tolerance = FACTOR * envelope.max(FLOOR_RELATIVE * scale);
        report.push(format!(
            "final {name}: max diff {diff:.2e}, scale {scale:.2e} (tolerance {tolerance:.2e})"
        ));
        if diff > tolerance {
            failures.push(format!("final {name}: max diff {diff:.3e} > {tolerance:.3e}"));
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "nnflow left nnU-Net's trajectory:\n{}",
        failures.join("\n")
    );
}
