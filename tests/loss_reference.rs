//! The training loss and the validation pseudo Dice against nnU-Net's own (fixtures from
//! tests/fixtures/loss/generate.py, which calls nnunetv2 2.8.1's `_build_loss` and
//! `validation_step`), and the cross-validation splits against `generate_crossval_split`.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[path = "../src/bin/nnflow-torch/loss.rs"]
mod loss;

use loss::{deep_supervision_loss, loss_terms, pseudo_dice_counts, LossConfig};
use nnflow::train::splits::crossval_splits;
use serde_json::Value;
use tch::Tensor;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fixture {
    cases: Value,
    tensors: BTreeMap<String, Tensor>,
}

fn load() -> Fixture {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("loss/expected.json")).unwrap())
            .unwrap();
    let tensors = Tensor::read_safetensors(fixtures().join("loss/tensors.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    Fixture {
        cases: expected["cases"].clone(),
        tensors,
    }
}

impl Fixture {
    fn tensor(&self, reference: &Value) -> Tensor {
        self.tensors[reference["key"].as_str().unwrap()].shallow_clone()
    }

    fn tensors(&self, reference: &Value) -> Vec<Tensor> {
        match reference.as_array() {
            Some(list) => list.iter().map(|r| self.tensor(r)).collect(),
            None => vec![self.tensor(reference)],
        }
    }
}

fn config(case: &Value) -> LossConfig {
    let s = &case["settings"];
    LossConfig {
        batch_dice: s["batch_dice"].as_bool().unwrap(),
        ignore_label: s["ignore_label"].as_i64(),
        weight_ce: s["weight_ce"].as_f64().unwrap(),
        weight_dice: s["weight_dice"].as_f64().unwrap(),
        regions: s["has_regions"].as_bool().unwrap(),
        deep_supervision_weights: s["ds_weights"]
            .as_array()
            .map(|w| w.iter().map(|v| v.as_f64().unwrap()).collect())
            .unwrap_or(vec![1.0]),
    }
}

fn close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= 1e-5 * expected.abs().max(1.0),
        "{what}: {actual} vs nnU-Net {expected}"
    );
}

fn label_cases(f: &Fixture) -> Vec<(String, Value)> {
    f.cases
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, c)| c["settings"]["loss_class"] == "DC_and_CE_loss")
        .map(|(n, c)| (n.clone(), c.clone()))
        .collect()
}

#[test]
fn single_output_loss_equals_nnunet() {
    let f = load();
    let mut checked = 0;
    for (name, case) in label_cases(&f)
        .into_iter()
        .filter(|(n, c)| c.get("dice").is_some() && !n.starts_with("ds"))
    {
        let terms = loss_terms(
            &f.tensor(&case["logits"]),
            &f.tensor(&case["target"]),
            &config(&case),
        );
        close(
            terms.dice.double_value(&[]),
            case["dice"].as_f64().unwrap(),
            &format!("{name} dice"),
        );
        close(
            terms.ce.double_value(&[]),
            case["ce"].as_f64().unwrap(),
            &format!("{name} ce"),
        );
        close(
            terms.total.double_value(&[]),
            case["loss"].as_f64().unwrap(),
            &format!("{name} loss"),
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} cases");
}

#[test]
fn deep_supervision_loss_equals_nnunet() {
    let f = load();
    for name in ["ds3", "ds3_ignore"] {
        let case = &f.cases[name];
        let (logits, targets) = (f.tensors(&case["logits"]), f.tensors(&case["target"]));
        let cfg = config(case);
        for (i, expected) in case["per_scale"].as_array().unwrap().iter().enumerate() {
            let terms = loss_terms(&logits[i], &targets[i], &cfg);
            close(
                terms.total.double_value(&[]),
                expected["loss"].as_f64().unwrap(),
                &format!("{name} scale {i}"),
            );
        }
        let total = deep_supervision_loss(&logits, &targets, &cfg).double_value(&[]);
        close(total, case["loss"].as_f64().unwrap(), name);
    }
}

#[test]
fn pseudo_dice_counts_equal_nnunet() {
    let f = load();
    for name in [
        "pseudo_dice_softmax",
        "pseudo_dice_softmax_ignore",
        "pseudo_dice_ds",
        "pseudo_dice_regions_ignore",
    ] {
        let case = &f.cases[name];
        let logits = f.tensors(&case["logits"]);
        let targets = f.tensors(&case["target"]);
        let counts = pseudo_dice_counts(&logits[0], &targets[0], &config(case));
        for (k, key) in ["tp_hard", "fp_hard", "fn_hard"].iter().enumerate() {
            let expected: Vec<f64> = case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(counts[k], expected, "{name} {key}");
        }
        let loss = deep_supervision_loss(&logits, &targets, &config(case)).double_value(&[]);
        close(loss, case["loss"].as_f64().unwrap(), &format!("{name} loss"));
    }
}

#[test]
fn region_loss_equals_nnunet() {
    let f = load();
    for name in ["regions_bce", "regions_bce_ignore"] {
        let case = &f.cases[name];
        let terms = loss_terms(
            &f.tensor(&case["logits"]),
            &f.tensor(&case["target"]),
            &config(case),
        );
        close(
            terms.dice.double_value(&[]),
            case["dice"].as_f64().unwrap(),
            &format!("{name} dice"),
        );
        close(
            terms.ce.double_value(&[]),
            case["bce"].as_f64().unwrap(),
            &format!("{name} bce"),
        );
        close(
            terms.total.double_value(&[]),
            case["loss"].as_f64().unwrap(),
            &format!("{name} loss"),
        );
    }
}

#[test]
fn crossval_splits_equal_nnunet() {
    let expected: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("splits/splits.json")).unwrap())
            .unwrap();
    for (n, splits) in expected {
        let ids: Vec<String> = (0..n.parse::<usize>().unwrap())
            .map(|i| format!("case_{i:03}"))
            .collect();
        let ours = serde_json::to_value(crossval_splits(&ids, 12345, 5).unwrap()).unwrap();
        assert_eq!(ours, splits, "{n} cases");
    }
}
