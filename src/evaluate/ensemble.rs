//! nnU-Net 2.8.1's ensembling (`ensembling/ensemble.py`) and model selection
//! (`evaluation/find_best_configuration.py`).
//!
//! Soft voting is nnU-Net's: the models' probabilities are summed in float32 in the given order and
//! divided by their number, then turned into a segmentation as `LabelManager` does: argmax over
//! channels (the first maximal channel wins a tie, NaN counts as the maximum, as numpy's argmax), or
//! for regions, each region in `regions_class_order` paints its label where its probability is `> 0.5`
//! (later regions over earlier ones).
//!
//! Hard voting (a majority vote of label maps) is not in nnU-Net; a tie goes to the lowest label.
//!
//! Model selection: nnU-Net scores each model and each pair (ensemble) by the foreground mean Dice of
//! its cross-validation and picks the highest; of equal scores (`==`), the first in its order wins:
//! single models in the order given, then pairs `(i, j)`, `i < j`, in lexicographic order, so a single
//! model beats an ensemble with the same score. A NaN score is never picked (nnU-Net skips it too,
//! except when it is the very first score, where Python's `max` keeps NaN and nnU-Net fails).

use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis, Zip};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnsembleError {
    #[error("ensembling needs at least one model")]
    NoModels,
    #[error("model {index} has shape {found:?}, the first has {expected:?}")]
    ShapeMismatch {
        index: usize,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{channels} probability channels for {regions} regions in regions_class_order")]
    RegionCount { channels: usize, regions: usize },
}

fn check_shapes(shapes: &[&[usize]]) -> Result<(), EnsembleError> {
    let first = shapes.first().ok_or(EnsembleError::NoModels)?;
    match shapes.iter().position(|s| s != first) {
        Some(index) => Err(EnsembleError::ShapeMismatch {
            index,
            expected: first.to_vec(),
            found: shapes[index].to_vec(),
        }),
        None => Ok(()),
    }
}

/// nnU-Net's `average_probabilities`: (channels, z, y, x) arrays summed in order in float32, then
/// divided by the number of models.
pub fn average_probabilities(models: &[ArrayView4<f32>]) -> Result<Array4<f32>, EnsembleError> {
    check_shapes(&models.iter().map(|m| m.shape()).collect::<Vec<_>>())?;
    let mut sum = models[0].to_owned();
    for model in &models[1..] {
        sum += model;
    }
    let n = models.len() as f32;
    sum.mapv_inplace(|v| v / n);
    Ok(sum)
}

/// nnU-Net's `LabelManager.convert_probabilities_to_segmentation`: argmax over channels (labels), or
/// with `regions_class_order`, each region's label where its probability is above 0.5, in that order.
pub fn probabilities_to_segmentation(
    probabilities: ArrayView4<f32>,
    regions_class_order: Option<&[i32]>,
) -> Result<Array3<i32>, EnsembleError> {
    let channels = probabilities.len_of(Axis(0));
    let (_, z, y, x) = probabilities.dim();
    match regions_class_order {
        Some(order) => {
            if order.len() != channels {
                return Err(EnsembleError::RegionCount {
                    channels,
                    regions: order.len(),
                });
            }
            let mut seg = Array3::zeros((z, y, x));
            for (channel, &label) in probabilities.outer_iter().zip(order) {
                Zip::from(&mut seg).and(&channel).for_each(|s, &p| {
                    if p > 0.5 {
                        *s = label;
                    }
                });
            }
            Ok(seg)
        }
        None => {
            let mut seg = Array3::zeros((z, y, x));
            let mut best = probabilities.index_axis(Axis(0), 0).to_owned();
            for (c, channel) in probabilities.outer_iter().enumerate().skip(1) {
                Zip::from(&mut seg)
                    .and(&mut best)
                    .and(&channel)
                    .for_each(|s, b, &p| {
                        // numpy's argmax: strictly greater replaces; the first NaN is the maximum.
                        if !b.is_nan() && (p > *b || p.is_nan()) {
                            *b = p;
                            *s = c as i32;
                        }
                    });
            }
            Ok(seg)
        }
    }
}

/// Soft voting: the average of the models' probabilities, then the segmentation.
pub fn soft_vote(
    models: &[ArrayView4<f32>],
    regions_class_order: Option<&[i32]>,
) -> Result<Array3<i32>, EnsembleError> {
    probabilities_to_segmentation(average_probabilities(models)?.view(), regions_class_order)
}

/// Hard voting (not in nnU-Net): per voxel the label most models predict; a tie goes to the lowest
/// label.
pub fn hard_vote(segmentations: &[ArrayView3<i32>]) -> Result<Array3<i32>, EnsembleError> {
    check_shapes(&segmentations.iter().map(|s| s.shape()).collect::<Vec<_>>())?;
    let mut out = segmentations[0].to_owned();
    let mut votes: Vec<(i32, usize)> = Vec::with_capacity(segmentations.len());
    for (index, value) in out.indexed_iter_mut() {
        votes.clear();
        for seg in segmentations {
            let label = seg[index];
            match votes.iter_mut().find(|(l, _)| *l == label) {
                Some((_, count)) => *count += 1,
                None => votes.push((label, 1)),
            }
        }
        *value = votes
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .expect("at least one model")
            .0;
    }
    Ok(out)
}

/// A model (its index among the trained models) or an ensemble of two. The derived order is nnU-Net's:
/// single models first, then pairs lexicographically.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Candidate {
    Single(usize),
    Pair(usize, usize),
}

/// The candidates nnU-Net's find_best_configuration scores, in its order: every model, then (when
/// ensembling is allowed) every pair `(i, j)` with `i < j`.
pub fn candidates(num_models: usize, allow_ensembling: bool) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = (0..num_models).map(Candidate::Single).collect();
    if allow_ensembling {
        for i in 0..num_models {
            for j in i + 1..num_models {
                all.push(Candidate::Pair(i, j));
            }
        }
    }
    all
}

/// The best candidate by foreground mean Dice; among equal scores the first in nnU-Net's order (see
/// [`Candidate`]), whatever order `scored` is in. NaN scores are skipped; `None` if nothing is left.
pub fn select_best(scored: &[(Candidate, f64)]) -> Option<Candidate> {
    scored
        .iter()
        .filter(|(_, score)| !score.is_nan())
        .min_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)))
        .map(|&(candidate, _)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    #[test]
    fn hard_vote_majority_and_ties_to_the_lowest_label() {
        let a = Array::from_shape_vec((1, 1, 3), vec![1, 2, 3]).unwrap();
        let b = Array::from_shape_vec((1, 1, 3), vec![1, 3, 0]).unwrap();
        let c = Array::from_shape_vec((1, 1, 3), vec![2, 3, 2]).unwrap();
        let voted = hard_vote(&[a.view(), b.view(), c.view()]).unwrap();
        assert_eq!(voted.into_raw_vec_and_offset().0, vec![1, 3, 0]);
        assert_eq!(hard_vote(&[]), Err(EnsembleError::NoModels));
    }

    #[test]
    fn selection_prefers_single_models_on_ties_and_skips_nan() {
        let scored = [
            (Candidate::Pair(0, 1), 0.9),
            (Candidate::Single(1), 0.9),
            (Candidate::Single(0), f64::NAN),
        ];
        assert_eq!(select_best(&scored), Some(Candidate::Single(1)));
        assert_eq!(select_best(&[(Candidate::Single(0), f64::NAN)]), None);
        assert_eq!(
            candidates(3, true),
            vec![
                Candidate::Single(0),
                Candidate::Single(1),
                Candidate::Single(2),
                Candidate::Pair(0, 1),
                Candidate::Pair(0, 2),
                Candidate::Pair(1, 2)
            ]
        );
    }
}
