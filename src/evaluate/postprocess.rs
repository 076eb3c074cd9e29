//! nnU-Net 2.8.1's postprocessing (`postprocessing/remove_connected_components.py`): keep only the
//! largest connected component of a set of labels, decide on the cross-validation predictions which
//! such rules improve Dice, and apply the chosen rules to new predictions.
//!
//! Connected components are those of acvl_utils' `remove_all_but_largest_component` as nnU-Net calls
//! it: `skimage.measure.label` with its default, *full* connectivity (26 neighbours in 3D, 8 within a
//! 2D slice), not scipy's faces-only default. Every component of the largest size is kept (a tie keeps
//! all of them), as acvl_utils' filter does. The labelling itself is the shared kernel
//! [`crate::kernels::connected_components`], which the cascade's augmentation uses too.
//!
//! The decision ([`determine_postprocessing`]) follows nnU-Net's order and comparisons:
//! 1. all foreground labels as one region: accepted when the foreground mean Dice rises strictly and
//!    no target's mean Dice falls (NaN compares false both times, as in Python);
//! 2. only when there are several targets, each target (label or region) in the given order, applied
//!    on top of the rules accepted so far: accepted when that target's mean Dice rises strictly.
//!
//! nnU-Net pickles the chosen functions (`postprocessing.pkl`); here [`Postprocessing`] is plain JSON:
//! the accepted rules in order plus every score the decision compared.

use std::collections::BTreeMap;

use ndarray::{Array3, ArrayView3, Zip};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::evaluate::metrics::{case_metrics, summarize, Metrics, Target};
use crate::kernels::connected_components::{largest_component_mask, Connectivity};

/// nnU-Net's `remove_all_but_largest_component_from_segmentation`: the voxels whose label is in
/// `labels` (one label, a region's labels or the union of several) form one mask; those outside its
/// largest component(s) become `background`. Other voxels are unchanged.
pub fn remove_all_but_largest_component(
    seg: ArrayView3<i32>,
    labels: &[i32],
    background: i32,
) -> Array3<i32> {
    let mask = seg.map(|v| labels.contains(v));
    let keep = largest_component_mask(mask.view(), Connectivity::Full);
    let mut out = seg.to_owned();
    Zip::from(&mut out).and(&mask).and(&keep).for_each(|v, &m, &k| {
        if m && !k {
            *v = background;
        }
    });
    out
}

/// One postprocessing rule: keep only the largest connected component of the union of `labels`
/// (removed voxels become background, label 0).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Rule {
    /// What was tested: `"foreground"` (all foreground labels) or the target's evaluation key
    /// (`"2"`, `"(1, 2)"`).
    pub target: String,
    pub labels: Vec<i32>,
}

/// Mean Dice over the cases: per target (keyed as nnU-Net's summary keys them) and their mean.
/// NaN (a label absent everywhere) is written as null.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Scores {
    #[serde(with = "crate::json_numbers::nan_as_null")]
    pub foreground_mean_dice: f64,
    #[serde(with = "crate::json_numbers::nan_as_null_map")]
    pub mean_dice: BTreeMap<String, f64>,
}

/// One tested rule: the scores before (the predictions with the rules accepted so far) and after.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Step {
    pub rule: Rule,
    pub before: Scores,
    pub after: Scores,
    pub accepted: bool,
}

/// The decision: accepted rules in the order to apply them, every step tested, and the scores of the
/// predictions as given and after the accepted rules (nnU-Net's `postprocessing.json` `input_folder` and
/// `postprocessed`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Postprocessing {
    pub rules: Vec<Rule>,
    pub steps: Vec<Step>,
    pub input: Scores,
    pub postprocessed: Scores,
}

/// Applies the rules in order (nnU-Net's `apply_postprocessing`).
pub fn apply_postprocessing(seg: ArrayView3<i32>, rules: &[Rule]) -> Array3<i32> {
    let mut out = seg.to_owned();
    for rule in rules {
        out = remove_all_but_largest_component(out.view(), &rule.labels, 0);
    }
    out
}

/// nnU-Net's `determine_postprocessing` on `num_cases` cases; `load_case(i)` gives case `i`'s
/// (reference, prediction), and is called once per case and tested rule (from several threads), so a
/// dataset need not fit in memory. `targets` are what is evaluated (foreground labels, or regions for
/// region-based training); `foreground_labels` are all labels but background and the ignore label.
/// Give the cases in nnU-Net's order (sorted file names) for means equal to the last bit.
pub fn determine_postprocessing<E, F>(
    num_cases: usize,
    load_case: F,
    targets: &[Target],
    foreground_labels: &[i32],
    ignore_label: Option<i32>,
) -> Result<Postprocessing, E>
where
    E: Send,
    F: Fn(usize) -> Result<(Array3<i32>, Array3<i32>), E> + Sync,
{
    // Scores of the predictions after `accepted` and then `candidate`.
    let score = |accepted: &[Rule], candidate: Option<&Rule>| -> Result<Scores, E> {
        let cases: Vec<BTreeMap<String, Metrics>> = (0..num_cases)
            .into_par_iter()
            .map(|i| {
                let (reference, prediction) = load_case(i)?;
                let mut seg = apply_postprocessing(prediction.view(), accepted);
                if let Some(rule) = candidate {
                    seg = remove_all_but_largest_component(seg.view(), &rule.labels, 0);
                }
                Ok(case_metrics(reference.view(), seg.view(), targets, ignore_label))
            })
            .collect::<Result<_, E>>()?;
        let summary = summarize(&cases, targets);
        Ok(Scores {
            foreground_mean_dice: summary.foreground_mean.dice,
            mean_dice: summary.mean.into_iter().map(|(k, m)| (k, m.dice)).collect(),
        })
    };

    let input = score(&[], None)?;
    let mut rules = Vec::new();
    let mut steps = Vec::new();
    let mut current = input.clone();

    let foreground = Rule {
        target: "foreground".into(),
        labels: foreground_labels.to_vec(),
    };
    let after = score(&rules, Some(&foreground))?;
    let accepted = foreground_step_improves(&current, &after);
    steps.push(Step {
        rule: foreground.clone(),
        before: current.clone(),
        after: after.clone(),
        accepted,
    });
    if accepted {
        rules.push(foreground);
        current = after;
    }

    if targets.len() > 1 {
        for target in targets {
            let key = target.evaluation_key();
            let rule = Rule {
                target: key.clone(),
                labels: target.labels(),
            };
            let after = score(&rules, Some(&rule))?;
            // NaN on either side compares false: not accepted.
            let accepted = after.mean_dice[&key] > current.mean_dice[&key];
            steps.push(Step {
                rule: rule.clone(),
                before: current.clone(),
                after: after.clone(),
                accepted,
            });
            if accepted {
                rules.push(rule);
                current = after;
            }
        }
    }
    Ok(Postprocessing {
        rules,
        steps,
        input,
        postprocessed: current,
    })
}

/// nnU-Net's test for the all-foreground rule: the foreground mean Dice rises strictly and no target's
/// mean Dice falls (comparisons with NaN are false: a NaN mean neither accepts nor vetoes).
pub fn foreground_step_improves(before: &Scores, after: &Scores) -> bool {
    // "Not worse" is Python's `not (after < before)`: true when either side is NaN.
    let not_worse = |after: f64, before: f64| after.partial_cmp(&before) != Some(std::cmp::Ordering::Less);
    after.foreground_mean_dice > before.foreground_mean_dice
        && after
            .mean_dice
            .iter()
            .all(|(key, &dice)| not_worse(dice, before.mean_dice.get(key).copied().unwrap_or(f64::NAN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(foreground: f64, per_target: &[(&str, f64)]) -> Scores {
        Scores {
            foreground_mean_dice: foreground,
            mean_dice: per_target.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
        }
    }

    #[test]
    fn foreground_rule_is_vetoed_by_any_class_that_gets_worse() {
        let before = scores(0.7, &[("1", 0.6), ("2", 0.8)]);
        assert!(foreground_step_improves(
            &before,
            &scores(0.75, &[("1", 0.7), ("2", 0.8)])
        ));
        assert!(!foreground_step_improves(
            &before,
            &scores(0.75, &[("1", 0.71), ("2", 0.79)])
        ));
        assert!(!foreground_step_improves(
            &before,
            &scores(0.7, &[("1", 0.6), ("2", 0.8)])
        ));
        // NaN neither accepts (foreground mean) nor vetoes (a class).
        assert!(foreground_step_improves(
            &before,
            &scores(0.75, &[("1", f64::NAN), ("2", 0.9)])
        ));
        assert!(!foreground_step_improves(
            &scores(f64::NAN, &[]),
            &scores(0.9, &[])
        ));
    }

    #[test]
    fn scores_round_trip_nan_as_null() {
        let s = scores(f64::NAN, &[("1", f64::NAN), ("2", 0.5)]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"foreground_mean_dice":null,"mean_dice":{"1":null,"2":0.5}}"#
        );
        let back: Scores = serde_json::from_str(&json).unwrap();
        assert!(back.foreground_mean_dice.is_nan() && back.mean_dice["1"].is_nan());
    }
}
