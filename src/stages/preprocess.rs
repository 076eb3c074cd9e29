//! The `preprocess` stage: nnU-Net's whole preprocessing of every training case for one
//! configuration in one pass, as `nnUNetv2_preprocess` does it per case: read, transpose, crop to
//! nonzero, normalize, resample, sample class locations, write. Each raw image is decoded once and
//! each case written once; `normalize` followed by `resample` gives the same cases but writes
//! (and reads back) the normalized full-resolution arrays in between, which costs as much as the
//! preprocessing itself on CT.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::preprocessing::{unchanged_grid, PreprocessParams};
use super::{thread_pool, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::case_store::read_properties;
use crate::preprocess::case_steps;
use crate::preprocess::PreprocessError;

pub const PREPROCESS: Kind = Kind {
    name: "preprocess",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<PreprocessStage>(),
    build: super::finite::build_finite::<PreprocessStage>,
};

/// Normalizes (the planned schemes) then resamples (the configuration's spacing) every case and
/// samples its class locations: `normalize` and `resample` in nnU-Net's order, in one pass. With
/// `source` (a normalize or resample stage's outputs) only the steps still missing are applied.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(transparent)]
pub struct PreprocessStage(pub PreprocessParams);

impl Stage for PreprocessStage {
    fn not_applicable(&self, root: &std::path::Path) -> Option<String> {
        self.0.not_applicable(root)
    }

    fn inputs(&self) -> Vec<StageInput> {
        self.0.inputs()
    }

    fn params_json(&self) -> Value {
        super::to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let pool = thread_pool(ctx)?;
        Ok(self.0.process(
            ctx,
            &pool,
            // A normalized source case already on the grid keeps its arrays, as in `resample`.
            |folder, id, plan, dataset| {
                if !read_properties(folder, id)?.normalized {
                    return Ok(None);
                }
                unchanged_grid(folder, id, plan, dataset)
            },
            |mut case, plan, dataset| {
                if case.properties.normalized && case.properties.resampled {
                    return Err(PreprocessError::AlreadyPreprocessed);
                }
                if !case.properties.normalized {
                    case_steps::normalize(&mut case, plan)?;
                }
                if !case.properties.resampled {
                    case = case_steps::resample(case, plan)?;
                    case_steps::add_class_locations(&mut case, &case_steps::location_targets(dataset));
                }
                Ok(case)
            },
        )?)
    }
}
