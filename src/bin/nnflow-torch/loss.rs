//! nnU-Net's training loss (`DC_and_CE_loss` with `MemoryEfficientSoftDiceLoss`, wrapped in
//! `DeepSupervisionWrapper`) and the validation pseudo Dice counts, in libtorch.
//!
//! Soft Dice over softmax probabilities without the background channel, smoothed by 1e-5, either per
//! sample or over the whole batch (`batch_dice` from the plan), plus cross-entropy. With an ignore
//! label, ignored voxels count as background for Dice and are masked out of it, cross-entropy
//! ignores them, and a batch with no annotated voxel contributes no cross-entropy.
//!
//! Region datasets use `DC_and_BCE_loss` instead: sigmoid Dice over every region (background
//! included) plus binary cross-entropy, with the ignore label's channel (last) as the mask.

use tch::{Kind, Reduction, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub batch_dice: bool,
    pub ignore_label: Option<i64>,
    pub weight_ce: f64,
    pub weight_dice: f64,
    /// Targets are region channels (sigmoid outputs) rather than labels.
    pub regions: bool,
    /// Per deep-supervision output, highest resolution first (see
    /// `Architecture::deep_supervision_weights`).
    pub deep_supervision_weights: Vec<f64>,
}

const SMOOTH: f64 = 1e-5;

/// The loss terms of one output: Dice (minus the mean Dice), and cross-entropy (BCE for regions).
pub struct LossTerms {
    pub dice: Tensor,
    pub ce: Tensor,
    weight_ce: f64,
    weight_dice: f64,
}

impl LossTerms {
    fn new(dice: Tensor, ce: Tensor, config: &LossConfig) -> LossTerms {
        LossTerms {
            dice,
            ce,
            weight_ce: config.weight_ce,
            weight_dice: config.weight_dice,
        }
    }

    /// The weighted sum, nnU-Net's `weight_ce * ce + weight_dice * dice`.
    pub fn total(&self) -> Tensor {
        &self.ce * self.weight_ce + &self.dice * self.weight_dice
    }
}

fn spatial_axes(x: &Tensor) -> Vec<i64> {
    (2..x.dim() as i64).collect()
}

/// Label targets with the ignore label: the labels with ignored voxels as background, and the mask
/// of annotated voxels (bool).
fn split_labels(target: &Tensor, ignore_label: Option<i64>) -> (Tensor, Option<Tensor>) {
    match ignore_label {
        Some(ignore) => {
            let mask = target.ne(ignore);
            (target.where_self(&mask, &target.zeros_like()), Some(mask))
        }
        None => (target.shallow_clone(), None),
    }
}

/// Region targets `(b, R[+1], ...)`: the region channels, and the annotated mask (1 minus the
/// ignore label's last channel) when the dataset has an ignore label.
fn split_regions(target: &Tensor, has_ignore: bool) -> (Tensor, Option<Tensor>) {
    let target = target.to_kind(Kind::Float);
    let channels = target.size()[1];
    if has_ignore {
        (
            target.narrow(1, 0, channels - 1),
            Some(1.0 - target.narrow(1, channels - 1, 1)),
        )
    } else {
        (target, None)
    }
}

/// The loss of one output: Dice + CE for labels, Dice + BCE for regions.
pub fn loss_terms(logits: &Tensor, target: &Tensor, config: &LossConfig) -> LossTerms {
    if config.regions {
        dc_and_bce(logits, target, config)
    } else {
        dc_and_ce(logits, target, config)
    }
}

/// Dice + BCE of one output. `target (b, R[+1], ...)` holds 0/1 per region, with the ignore
/// label's channel last when the dataset has one.
pub fn dc_and_bce(logits: &Tensor, target: &Tensor, config: &LossConfig) -> LossTerms {
    let logits = logits.to_kind(Kind::Float);
    let (regions, mask) = split_regions(target, config.ignore_label.is_some());
    let dice = dice_from_probabilities(&logits.sigmoid(), &regions, mask.as_ref(), config.batch_dice);
    let ce = match &mask {
        Some(m) => {
            let bce =
                logits.binary_cross_entropy_with_logits::<Tensor>(&regions, None, None, Reduction::None);
            (bce * m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1e-8)
        }
        None => logits.binary_cross_entropy_with_logits::<Tensor>(&regions, None, None, Reduction::Mean),
    };
    LossTerms::new(dice, ce, config)
}

/// Dice + CE of one output. `logits (b, K, ...)` any float kind (computed in float32);
/// `target (b, 1, ...)` integer labels.
pub fn dc_and_ce(logits: &Tensor, target: &Tensor, config: &LossConfig) -> LossTerms {
    let logits = logits.to_kind(Kind::Float);
    let target = target.to_kind(Kind::Int64);
    let (target_dice, mask) = split_labels(&target, config.ignore_label);
    let dice = soft_dice_loss(&logits, &target_dice, mask.as_ref(), config.batch_dice);
    let ce_target = target.squeeze_dim(1);
    let annotated = mask.as_ref().is_none_or(|m| m.any().int64_value(&[]) != 0);
    let ce = if annotated {
        logits.cross_entropy_loss::<Tensor>(
            &ce_target,
            None,
            Reduction::Mean,
            config.ignore_label.unwrap_or(-100),
            0.0,
        )
    } else {
        Tensor::zeros([], (Kind::Float, logits.device()))
    };
    LossTerms::new(dice, ce, config)
}

/// `MemoryEfficientSoftDiceLoss` with `do_bg = False`: minus the mean Dice over foreground classes
/// (and samples, unless `batch_dice`).
fn soft_dice_loss(logits: &Tensor, target: &Tensor, mask: Option<&Tensor>, batch_dice: bool) -> Tensor {
    let classes = logits.size()[1];
    let probabilities = logits.softmax(1, Kind::Float).narrow(1, 1, classes - 1);
    let onehot = Tensor::zeros(logits.size(), (Kind::Float, logits.device()))
        .scatter_value(1, target, 1.0)
        .narrow(1, 1, classes - 1);
    dice_from_probabilities(&probabilities, &onehot, mask, batch_dice)
}

/// Minus the mean smoothed Dice of `probabilities` against the 0/1 `onehot`, both masked.
fn dice_from_probabilities(
    probabilities: &Tensor,
    onehot: &Tensor,
    mask: Option<&Tensor>,
    batch_dice: bool,
) -> Tensor {
    let axes = spatial_axes(probabilities);
    let (onehot, probabilities) = match mask {
        Some(m) => {
            let m = m.to_kind(Kind::Float);
            (onehot * &m, probabilities * m)
        }
        None => (onehot.shallow_clone(), probabilities.shallow_clone()),
    };
    let mut intersect = (&probabilities * &onehot).sum_dim_intlist(axes.as_slice(), false, Kind::Float);
    let mut sum_pred = probabilities.sum_dim_intlist(axes.as_slice(), false, Kind::Float);
    let mut sum_gt = onehot.sum_dim_intlist(axes.as_slice(), false, Kind::Float);
    if batch_dice {
        intersect = intersect.sum_dim_intlist(0, false, Kind::Float);
        sum_pred = sum_pred.sum_dim_intlist(0, false, Kind::Float);
        sum_gt = sum_gt.sum_dim_intlist(0, false, Kind::Float);
    }
    let dice = (intersect * 2.0 + SMOOTH) / (sum_gt + sum_pred + SMOOTH).clamp_min(1e-8);
    -dice.mean(Kind::Float)
}

/// The weighted sum over deep-supervision outputs (zero weights skipped, as nnU-Net does).
pub fn deep_supervision_loss(outputs: &[Tensor], targets: &[Tensor], config: &LossConfig) -> Tensor {
    assert_eq!(outputs.len(), targets.len(), "one target per output");
    let mut total: Option<Tensor> = None;
    for ((output, target), &w) in outputs.iter().zip(targets).zip(&config.deep_supervision_weights) {
        if w == 0.0 {
            continue;
        }
        let term = loss_terms(output, target, config).total() * w;
        total = Some(match total {
            Some(t) => t + term,
            None => term,
        });
    }
    total.expect("at least one deep-supervision weight is nonzero")
}

/// Hard true positives, false positives and false negatives per foreground class (or region),
/// summed over the batch, of the argmax (or sigmoid > 0.5) prediction, as nnU-Net's
/// `validation_step`; ignored voxels do not count.
pub fn pseudo_dice_counts(logits: &Tensor, target: &Tensor, config: &LossConfig) -> [Vec<f64>; 3] {
    let (pred, gt, mask, first) = if config.regions {
        let (gt, mask) = split_regions(target, config.ignore_label.is_some());
        let pred = logits.to_kind(Kind::Float).sigmoid().gt(0.5).to_kind(Kind::Float);
        (pred, gt, mask, 0)
    } else {
        let onehot = |labels: &Tensor| {
            Tensor::zeros(logits.size(), (Kind::Float, logits.device())).scatter_value(1, labels, 1.0)
        };
        let (labels, mask) = split_labels(&target.to_kind(Kind::Int64), config.ignore_label);
        // background is not scored
        (
            onehot(&logits.argmax(1, true)),
            onehot(&labels),
            mask.map(|m| m.to_kind(Kind::Float)),
            1,
        )
    };
    let (pred, gt) = match &mask {
        Some(m) => (pred * m, gt * m),
        None => (pred, gt),
    };
    let mut axes = vec![0i64];
    axes.extend(spatial_axes(logits));
    let sum = |t: Tensor| -> Vec<f64> {
        let v = t
            .sum_dim_intlist(axes.as_slice(), false, Kind::Double)
            .to_device(tch::Device::Cpu);
        (first..v.size()[0]).map(|c| v.double_value(&[c])).collect()
    };
    [
        sum(&pred * &gt),
        sum(&pred * (1.0 - &gt)),
        sum((1.0 - &pred) * &gt),
    ]
}

/// The training loss and the validation pseudo Dice against nnU-Net's own (fixtures from
/// tests/fixtures/loss/generate.py, which calls nnunetv2 2.8.1's `_build_loss` and
/// `validation_step`).
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde_json::Value;
    use tch::Tensor;

    use super::{deep_supervision_loss, loss_terms, pseudo_dice_counts, LossConfig};

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
                terms.total().double_value(&[]),
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
                    terms.total().double_value(&[]),
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
                terms.total().double_value(&[]),
                case["loss"].as_f64().unwrap(),
                &format!("{name} loss"),
            );
        }
    }
}
