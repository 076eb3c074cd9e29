//! nnU-Net 2.8.1's evaluation (`evaluate_predictions.py`): per case and per label (or region) the
//! confusion counts, Dice and IoU (NaN when neither reference nor prediction has the label), voxels
//! of the ignore label left out; and the summary: per-label means over cases (NaN-ignoring) and the
//! foreground mean over labels. In JSON, NaN is written as null.

use std::collections::BTreeMap;

use ndarray::{ArrayView3, Zip};
use serde::Serialize;

pub use crate::data::target::Target;

/// One label's metrics in one case (nnU-Net's names).
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    #[serde(rename = "Dice")]
    pub dice: f64,
    #[serde(rename = "IoU")]
    pub iou: f64,
    #[serde(rename = "FP")]
    pub fp: f64,
    #[serde(rename = "TP")]
    pub tp: f64,
    #[serde(rename = "FN")]
    pub fn_: f64,
    #[serde(rename = "TN")]
    pub tn: f64,
    pub n_pred: f64,
    pub n_ref: f64,
}

impl Metrics {
    fn from_counts(tp: u64, fp: u64, fn_: u64, tn: u64) -> Metrics {
        let (tp, fp, fn_, tn) = (tp as f64, fp as f64, fn_ as f64, tn as f64);
        let (dice, iou) = if tp + fp + fn_ == 0.0 {
            (f64::NAN, f64::NAN)
        } else {
            (2.0 * tp / (2.0 * tp + fp + fn_), tp / (tp + fp + fn_))
        };
        Metrics {
            dice,
            iou,
            fp,
            tp,
            fn_,
            tn,
            n_pred: fp + tp,
            n_ref: fn_ + tp,
        }
    }

    fn values(&self) -> [f64; 8] {
        [
            self.dice,
            self.iou,
            self.fp,
            self.tp,
            self.fn_,
            self.tn,
            self.n_pred,
            self.n_ref,
        ]
    }

    fn from_values(v: [f64; 8]) -> Metrics {
        Metrics {
            dice: v[0],
            iou: v[1],
            fp: v[2],
            tp: v[3],
            fn_: v[4],
            tn: v[5],
            n_pred: v[6],
            n_ref: v[7],
        }
    }
}

/// Metrics of one case for every target, keyed as nnU-Net keys them.
pub fn case_metrics(
    reference: ArrayView3<i32>,
    prediction: ArrayView3<i32>,
    targets: &[Target],
    ignore_label: Option<i32>,
) -> BTreeMap<String, Metrics> {
    targets
        .iter()
        .map(|target| {
            let mut counts = [0u64; 4]; // tp, fp, fn, tn
            Zip::from(reference).and(prediction).for_each(|&r, &p| {
                if Some(r) == ignore_label {
                    return;
                }
                let index = match (target.contains(r), target.contains(p)) {
                    (true, true) => 0,
                    (false, true) => 1,
                    (true, false) => 2,
                    (false, false) => 3,
                };
                counts[index] += 1;
            });
            (
                target.evaluation_key(),
                Metrics::from_counts(counts[0], counts[1], counts[2], counts[3]),
            )
        })
        .collect()
}

/// nnU-Net's summary: per-label means over cases (NaN ignored, as `np.nanmean`) and the mean of
/// those over the foreground labels (NaN propagates, as `np.mean`).
pub struct Summary {
    pub mean: BTreeMap<String, Metrics>,
    pub foreground_mean: Metrics,
}

pub fn summarize(cases: &[BTreeMap<String, Metrics>], targets: &[Target]) -> Summary {
    let mut mean = BTreeMap::new();
    for target in targets {
        let key = target.evaluation_key();
        let per_case: Vec<[f64; 8]> = cases
            .iter()
            .filter_map(|c| c.get(&key))
            .map(Metrics::values)
            .collect();
        let averaged = std::array::from_fn(|m| nan_mean(per_case.iter().map(|v| v[m])));
        mean.insert(key, Metrics::from_values(averaged));
    }
    let foreground: Vec<[f64; 8]> = targets
        .iter()
        .filter(|t| !t.is_background())
        .map(|t| mean[&t.evaluation_key()].values())
        .collect();
    let foreground_mean = Metrics::from_values(std::array::from_fn(|m| {
        foreground.iter().map(|v| v[m]).sum::<f64>() / foreground.len() as f64
    }));
    Summary {
        mean,
        foreground_mean,
    }
}

fn nan_mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn absent_label_gives_nan_dice_and_ignore_label_is_left_out() {
        let reference = Array3::from_shape_vec((1, 1, 4), vec![1, 1, 0, 9]).unwrap();
        let prediction = Array3::from_shape_vec((1, 1, 4), vec![1, 0, 0, 1]).unwrap();
        let metrics = case_metrics(
            reference.view(),
            prediction.view(),
            &[Target::Label(1), Target::Label(2)],
            Some(9),
        );
        let one = metrics["1"];
        assert_eq!((one.tp, one.fp, one.fn_, one.tn), (1.0, 0.0, 1.0, 1.0));
        assert!((one.dice - 2.0 / 3.0).abs() < 1e-12);
        assert!(metrics["2"].dice.is_nan());
    }
}
