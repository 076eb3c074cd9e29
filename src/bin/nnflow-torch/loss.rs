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

/// The loss terms of one output.
pub struct LossTerms {
    pub total: Tensor,
    #[allow(dead_code)] // the parts are checked against nnU-Net's by the reference tests
    pub dice: Tensor,
    #[allow(dead_code)]
    pub ce: Tensor,
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
    let total = &ce * config.weight_ce + &dice * config.weight_dice;
    LossTerms { total, dice, ce }
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
    let total = &ce * config.weight_ce + &dice * config.weight_dice;
    LossTerms { total, dice, ce }
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
        let term = loss_terms(output, target, config).total * w;
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
