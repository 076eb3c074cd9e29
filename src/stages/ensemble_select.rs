//! The `ensemble-select` stage: nnU-Net's `find_best_configuration`. From the cross-validation
//! predictions of every trained configuration (each case predicted by the fold that held it out),
//! it evaluates each configuration and every pair (soft voting: averaged probabilities; hard
//! voting on request), picks the best by foreground mean Dice (ties go to the single model, then
//! to nnU-Net's order), and writes the decision with every score (`decision.json`,
//! `summaries/<candidate>.json`) and the chosen model's cross-validation predictions
//! (`crossval/`), which the `postprocess` stage decides on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, Ix4};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{reference_inputs, thread_pool, to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::Dataset;
use crate::data::image::{self, ImageError};
use crate::data::npy::{self, NpyError};
use crate::evaluate::ensemble::{candidates, hard_vote, select_best, soft_vote, Candidate, EnsembleError};
use crate::evaluate::folder::{evaluate_pair, evaluation_targets, foreground_dice, summary_json, CaseResult};
use crate::evaluate::EvaluateError;
use crate::file_error::FileError;
use crate::inference::export::write_label_map;
use crate::inference::InferenceError;
use crate::train::job::FoldInfo;

pub const KIND: Kind = Kind {
    name: "ensemble-select",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<EnsembleSelectStage>(),
    build: super::finite::build_finite::<EnsembleSelectStage>,
};

fn yes() -> bool {
    true
}

/// Chooses the configuration or pair of configurations to predict with.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct EnsembleSelectStage {
    /// Outputs of every training (`${train[*].outputs}`); grouped by the configuration each names.
    #[serde(skip_serializing)]
    pub trainings: Vec<String>,
    /// The dataset folder: dataset.json and the reference labels (labelsTr).
    #[serde(skip_serializing)]
    pub dataset: String,
    /// Consider pairs of configurations (nnU-Net: yes).
    #[serde(default = "yes")]
    pub ensembles: bool,
    /// Majority vote of the segmentations instead of averaging probabilities.
    #[serde(default)]
    pub hard_voting: bool,
}

/// The choice, as `decision.json` records it and `predict` reads it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Decision {
    pub best: Scored,
    pub candidates: Vec<Scored>,
    pub hard_voting: bool,
    /// Cases evaluated (the cross-validation cases every configuration predicted).
    pub cases: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Scored {
    pub name: String,
    pub configurations: Vec<String>,
    /// Foreground mean Dice over the cross-validation cases (null when undefined).
    pub foreground_dice: Option<f64>,
}

/// Why the candidates could not be scored, or the chosen one's predictions not written.
#[derive(Debug, thiserror::Error)]
pub enum EnsembleSelectError {
    #[error("no trainings to choose from")]
    NoTrainings,
    #[error("the configurations share no cross-validation case")]
    NoSharedCase,
    #[error("no candidate has a defined foreground Dice")]
    NoScore,
    #[error(transparent)]
    File(#[from] FileError),
    /// A reference label map.
    #[error(transparent)]
    Reference(#[from] ImageError),
    /// A cross-validation prediction, named first as it always was (the NIfTI error names it too).
    #[error("{}: {source}", path.display())]
    Prediction { path: PathBuf, source: ImageError },
    #[error("{}: {source}", path.display())]
    Probabilities { path: PathBuf, source: NpyError },
    #[error("{}: {source}", path.display())]
    ProbabilitiesShape {
        path: PathBuf,
        source: ndarray::ShapeError,
    },
    #[error("case {case}: {source}")]
    Vote { case: String, source: EnsembleError },
    #[error(transparent)]
    Evaluate(#[from] EvaluateError),
    #[error(transparent)]
    Write(#[from] InferenceError),
}

/// A configuration's cross-validation predictions: case id -> the `validation` folder holding it.
struct CrossValidation {
    configuration: String,
    cases: BTreeMap<String, PathBuf>,
    file_ending: String,
    probabilities: bool,
}

impl Stage for EnsembleSelectStage {
    fn inputs(&self) -> Vec<StageInput> {
        reference_inputs(&self.dataset)
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let dataset = Dataset::open(&ctx.root.join(&self.dataset))?;
        let models = cross_validations(
            &self
                .trainings
                .iter()
                .map(|t| ctx.root.join(t))
                .collect::<Vec<_>>(),
        )?;
        let case_ids: Vec<String> = models[0]
            .cases
            .keys()
            .filter(|id| models.iter().all(|m| m.cases.contains_key(*id)))
            .cloned()
            .collect();
        if case_ids.is_empty() {
            return Err(EnsembleSelectError::NoSharedCase.into());
        }
        let references: BTreeMap<&str, PathBuf> = dataset
            .cases
            .iter()
            .map(|c| (c.id.as_str(), c.label.clone()))
            .collect();
        let targets = evaluation_targets(&dataset);
        let ignore = dataset.ignore_label.map(|l| l as i32);
        let regions_order: Option<Vec<i32>> = dataset
            .regions_class_order
            .as_ref()
            .map(|o| o.iter().map(|&v| v as i32).collect());
        let pool = thread_pool(ctx)?;

        let mut scored = Vec::new();
        let mut named = Vec::new();
        for candidate in candidates(models.len(), self.ensembles) {
            let members: Vec<&CrossValidation> = match candidate {
                Candidate::Single(i) => vec![&models[i]],
                Candidate::Pair(i, j) => vec![&models[i], &models[j]],
            };
            if members.len() > 1 && !self.hard_voting && members.iter().any(|m| !m.probabilities) {
                continue; // soft voting needs probabilities (train with save_probabilities = true)
            }
            let name = members
                .iter()
                .map(|m| m.configuration.as_str())
                .collect::<Vec<_>>()
                .join("+");
            let results: Vec<CaseResult> = pool.install(|| {
                case_ids
                    .par_iter()
                    .map(|id| {
                        let reference_path = references
                            .get(id.as_str())
                            .ok_or_else(|| EvaluateError::UnknownCase { case: id.clone() })?;
                        let (reference, _) = image::read_labels(reference_path)?;
                        let prediction = combine(&members, id, self.hard_voting, regions_order.as_deref())?;
                        Ok(evaluate_pair(
                            &format!("{id}{}", dataset.file_ending),
                            &reference,
                            &prediction,
                            &targets,
                            ignore,
                        )?)
                    })
                    .collect::<Result<_, EnsembleSelectError>>()
            })?;
            let summary = summary_json(&results, &targets);
            let dice = foreground_dice(&summary);
            ctx.log(&format!(
                "{name}: foreground mean Dice {dice:.4} over {} cases",
                results.len()
            ));
            crate::atomic_file::write_json(
                &ctx.out_dir.join("summaries").join(format!("{name}.json")),
                &summary,
            )?;
            scored.push((candidate, dice));
            named.push(Scored {
                name,
                configurations: members.iter().map(|m| m.configuration.clone()).collect(),
                foreground_dice: dice.is_finite().then_some(dice),
            });
        }
        let best = select_best(&scored).ok_or(EnsembleSelectError::NoScore)?;
        let best_index = scored
            .iter()
            .position(|(c, _)| *c == best)
            .expect("selected among the scored");
        let decision = Decision {
            best: named[best_index].clone(),
            candidates: named,
            hard_voting: self.hard_voting,
            cases: case_ids.len(),
        };
        ctx.log(&format!("selected: {}", decision.best.name));
        crate::atomic_file::write_json(&ctx.out_dir.join("decision.json"), &decision)?;

        // the chosen model's cross-validation predictions, for the postprocessing decision
        let members: Vec<&CrossValidation> = decision
            .best
            .configurations
            .iter()
            .map(|c| models.iter().find(|m| &m.configuration == c).unwrap())
            .collect();
        let crossval = ctx.out_dir.join("crossval");
        Ok(pool.install(|| {
            case_ids.par_iter().try_for_each(|id| {
                let file = format!("{id}{}", dataset.file_ending);
                let (_, geometry) = image::read_labels(&references[id.as_str()])?;
                let prediction = combine(&members, id, self.hard_voting, regions_order.as_deref())?;
                let labels = prediction.mapv(|v| v as i16);
                Ok::<_, EnsembleSelectError>(write_label_map(&crossval.join(file), &labels, &geometry)?)
            })
        })?)
    }
}

/// Groups training outputs by configuration; every one must hold `fold.json` and `validation/`.
fn cross_validations(trainings: &[PathBuf]) -> Result<Vec<CrossValidation>, EnsembleSelectError> {
    let mut by_configuration: BTreeMap<String, CrossValidation> = BTreeMap::new();
    for training in trainings {
        if !training.exists() {
            continue; // a training that did not apply (its configuration is not planned)
        }
        let fold: FoldInfo = crate::atomic_file::read_json(&training.join("fold.json"))?;
        let entry = by_configuration
            .entry(fold.configuration.clone())
            .or_insert_with(|| CrossValidation {
                configuration: fold.configuration.clone(),
                cases: BTreeMap::new(),
                file_ending: fold.file_ending.clone(),
                probabilities: true,
            });
        entry.probabilities &= fold.probabilities;
        for case in fold.validation_cases {
            entry
                .cases
                .entry(case)
                .or_insert_with(|| training.join("validation"));
        }
    }
    if by_configuration.is_empty() {
        return Err(EnsembleSelectError::NoTrainings);
    }
    let mut models: Vec<CrossValidation> = by_configuration.into_values().collect();
    models.sort_by_key(|m| candidate_rank(&m.configuration));
    Ok(models)
}

/// nnU-Net's order of candidates (`default_trained_models`), which breaks ties between equal
/// scores; other configurations follow by name.
fn candidate_rank(configuration: &str) -> (usize, String) {
    use crate::preprocess::plan::CONFIGURATIONS;
    let rank = CONFIGURATIONS
        .iter()
        .position(|&c| c == configuration)
        .unwrap_or(CONFIGURATIONS.len());
    (rank, configuration.to_string())
}

/// A case's segmentation by one model (its exported file) or a pair (voting).
fn combine(
    members: &[&CrossValidation],
    id: &str,
    hard: bool,
    regions: Option<&[i32]>,
) -> Result<Array3<i32>, EnsembleSelectError> {
    let read_segmentation = |m: &CrossValidation| {
        let path = m.cases[id].join(format!("{id}{}", m.file_ending));
        image::read_labels(&path)
            .map(|(a, _)| a)
            .map_err(|source| EnsembleSelectError::Prediction { path, source })
    };
    let vote_error = |source| EnsembleSelectError::Vote {
        case: id.to_string(),
        source,
    };
    if members.len() == 1 {
        return read_segmentation(members[0]);
    }
    if hard {
        let segmentations = members
            .iter()
            .map(|m| read_segmentation(m))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = segmentations.iter().map(|s| s.view()).collect();
        return hard_vote(&views).map_err(vote_error);
    }
    let probabilities = members
        .iter()
        .map(|m| read_probabilities(&m.cases[id].join(format!("{id}.npy"))))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = probabilities.iter().map(|p| p.view()).collect();
    soft_vote(&views, regions).map_err(vote_error)
}

fn read_probabilities(path: &Path) -> Result<Array4<f32>, EnsembleSelectError> {
    npy::read::<f32>(path)
        .map_err(|source| EnsembleSelectError::Probabilities {
            path: path.to_path_buf(),
            source,
        })?
        .into_dimensionality::<Ix4>()
        .map_err(|source| EnsembleSelectError::ProbabilitiesShape {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_nnunets_order_then_names() {
        let mut names = vec![
            "3d_cascade_fullres",
            "custom",
            "3d_lowres",
            "2d",
            "3d_fullres",
            "a",
        ];
        names.sort_by_key(|c| candidate_rank(c));
        assert_eq!(
            names,
            [
                "2d",
                "3d_fullres",
                "3d_lowres",
                "3d_cascade_fullres",
                "a",
                "custom"
            ]
        );
    }
}
