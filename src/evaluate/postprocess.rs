//! nnU-Net 2.8.1's postprocessing (`postprocessing/remove_connected_components.py`): keep only the
//! largest connected component of a set of labels, decide on the cross-validation predictions which
//! such rules improve Dice, and apply the chosen rules to new predictions.
//!
//! Connected components are those of acvl_utils' `remove_all_but_largest_component` as nnU-Net calls
//! it: `skimage.measure.label` with its default, *full* connectivity (26 neighbours in 3D, 8 within a
//! 2D slice), not scipy's faces-only default. Every component of the largest size is kept (a tie keeps
//! all of them), as acvl_utils' filter does. [`label_components`] exposes the same labelling
//! (acvl_utils' `label_with_component_sizes`) to the cascade's augmentation.
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

/// Which voxels touch: `Faces` (6 in 3D, scipy.ndimage.label's default) or `Full` (26 in 3D, 8 in 2D:
/// skimage.measure.label's default, which nnU-Net's postprocessing uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Connectivity {
    Faces,
    #[default]
    Full,
}

/// The voxels of `mask` in its largest connected component(s): every component of the largest size is
/// kept. An empty mask gives an empty mask.
pub fn largest_component_mask(mask: ArrayView3<bool>, connectivity: Connectivity) -> Array3<bool> {
    let dim = mask.dim();
    let mask = mask.as_standard_layout();
    let domain = mask.as_slice().expect("standard layout");
    let grid = Grid::new(dim, connectivity);
    let mut visited = vec![false; domain.len()];
    let mut stack = Vec::new();
    let mut components = Vec::new(); // (seed, size)
    for seed in 0..domain.len() {
        if domain[seed] && !visited[seed] {
            components.push((seed, grid.flood(seed, domain, &mut visited, &mut stack, |_| {})));
        }
    }
    let largest = components.iter().map(|&(_, size)| size).max().unwrap_or(0);
    let mut keep = vec![false; domain.len()];
    for &(seed, size) in &components {
        if size == largest {
            grid.flood(seed, domain, &mut keep, &mut stack, |_| {});
        }
    }
    Array3::from_shape_vec(dim, keep).expect("shape of the mask")
}

/// skimage.measure.label with `return_num` plus acvl_utils' component sizes: each component of `mask`
/// gets a label 1, 2, ... in the raster order of its first voxel (0 = outside the mask), and
/// `sizes[l - 1]` is the voxel count of label `l`. Full connectivity in a volume with one z plane is
/// 8-connectivity in that plane, as skimage gives for a 2D image.
pub fn label_components(mask: ArrayView3<bool>, connectivity: Connectivity) -> (Array3<u32>, Vec<usize>) {
    let dim = mask.dim();
    let mask = mask.as_standard_layout();
    let domain = mask.as_slice().expect("standard layout");
    let grid = Grid::new(dim, connectivity);
    let mut visited = vec![false; domain.len()];
    let mut labels = vec![0u32; domain.len()];
    let mut stack = Vec::new();
    let mut sizes = Vec::new();
    for seed in 0..domain.len() {
        if domain[seed] && !visited[seed] {
            let label = sizes.len() as u32 + 1;
            let size = grid.flood(seed, domain, &mut visited, &mut stack, |voxel| {
                labels[voxel] = label
            });
            sizes.push(size);
        }
    }
    (
        Array3::from_shape_vec(dim, labels).expect("shape of the mask"),
        sizes,
    )
}

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

/// A volume in C order and its neighbour offsets.
struct Grid {
    dim: (usize, usize, usize),
    offsets: Vec<(isize, isize, isize)>,
    flat: Vec<isize>,
}

impl Grid {
    fn new(dim: (usize, usize, usize), connectivity: Connectivity) -> Grid {
        let mut offsets = Vec::new();
        for dz in -1isize..=1 {
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let hops = dz.abs() + dy.abs() + dx.abs();
                    if hops > 0 && (connectivity == Connectivity::Full || hops == 1) {
                        offsets.push((dz, dy, dx));
                    }
                }
            }
        }
        let (ny, nx) = (dim.1 as isize, dim.2 as isize);
        let flat = offsets
            .iter()
            .map(|&(dz, dy, dx)| (dz * ny + dy) * nx + dx)
            .collect();
        Grid { dim, offsets, flat }
    }

    /// Marks in `visited` the component of `domain` holding `seed` (not yet visited), calling `reached`
    /// once per voxel of it; returns its size.
    fn flood(
        &self,
        seed: usize,
        domain: &[bool],
        visited: &mut [bool],
        stack: &mut Vec<usize>,
        mut reached: impl FnMut(usize),
    ) -> usize {
        let (nz, ny, nx) = self.dim;
        let plane = ny * nx;
        visited[seed] = true;
        stack.push(seed);
        let mut size = 0;
        while let Some(index) = stack.pop() {
            size += 1;
            reached(index);
            let (z, y, x) = (index / plane, index % plane / nx, index % nx);
            let interior = z > 0 && z + 1 < nz && y > 0 && y + 1 < ny && x > 0 && x + 1 < nx;
            for (n, &(dz, dy, dx)) in self.offsets.iter().enumerate() {
                let neighbour = if interior {
                    (index as isize + self.flat[n]) as usize
                } else {
                    let (z, y, x) = (z as isize + dz, y as isize + dy, x as isize + dx);
                    if z < 0 || y < 0 || x < 0 || z >= nz as isize || y >= ny as isize || x >= nx as isize {
                        continue;
                    }
                    (z as usize * ny + y as usize) * nx + x as usize
                };
                if domain[neighbour] && !visited[neighbour] {
                    visited[neighbour] = true;
                    stack.push(neighbour);
                }
            }
        }
        size
    }
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
    fn full_connectivity_joins_diagonals_and_ties_are_all_kept() {
        let mut mask = Array3::from_elem((3, 3, 4), false);
        mask[[0, 0, 0]] = true;
        mask[[1, 1, 1]] = true;
        mask[[2, 2, 3]] = true;
        mask[[2, 2, 2]] = true;
        let full = largest_component_mask(mask.view(), Connectivity::Full);
        assert_eq!(full, mask);
        let faces = largest_component_mask(mask.view(), Connectivity::Faces);
        assert_eq!(faces.iter().filter(|&&v| v).count(), 2);
        assert!(faces[[2, 2, 3]] && faces[[2, 2, 2]]);
        let empty = Array3::from_elem((2, 2, 2), false);
        assert_eq!(largest_component_mask(empty.view(), Connectivity::Full), empty);
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
