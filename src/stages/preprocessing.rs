//! The `normalize` and `resample` stages: nnU-Net's preprocessing of every training case for one
//! configuration, as two cached stages composable in either order. Each reads cases from the raw
//! dataset (then reading, transposing and cropping them first) or from another of these stages'
//! outputs, and writes the preprocessed case format (`crate::data::case_store`). Parallel over
//! cases; one case in memory per worker.

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{dataset_inputs, thread_pool, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::case_store::{
    list_cases, read_case, read_properties, read_seg, write_case, write_case_linked, CaseProperties,
    StoredCase,
};
use crate::data::dataset::Dataset;
use crate::plans::Plans;
use crate::preprocess::case_io;
use crate::preprocess::case_steps::{self, PlanView};
use crate::preprocess::class_locations;
use crate::preprocess::PreprocessError;

/// Version 2: cases in the chunked, compressed layout (`<id>.zarr`), not `.npy`.
pub const NORMALIZE: Kind = Kind {
    name: "normalize",
    version: 2,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<NormalizeStage>(),
    build: super::finite::build_finite::<NormalizeStage>,
};

/// Version 2: as [`NORMALIZE`]'s.
pub const RESAMPLE: Kind = Kind {
    name: "resample",
    version: 2,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<ResampleStage>(),
    build: super::finite::build_finite::<ResampleStage>,
};

/// Where the cases come from and which planned configuration to prepare.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct PreprocessParams {
    /// The dataset folder in nnU-Net's raw layout (for dataset.json, and the cases when `source` is
    /// not given). Relative to the pipeline file, or absolute.
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The outputs folder of another normalize or resample stage to continue from, e.g.
    /// `${normalize.outputs}`. Without it the raw cases are read, transposed and cropped.
    #[serde(skip_serializing)]
    pub source: Option<String>,
    /// The plan stage's outputs folder (holding plans.json): `${plan.outputs}`.
    #[serde(skip_serializing)]
    pub plan: String,
    /// The planned configuration to prepare, e.g. `3d_fullres` (one of nnU-Net's: 2d, 3d_fullres,
    /// 3d_lowres, 3d_cascade_fullres).
    #[serde(deserialize_with = "crate::preprocess::plan::deserialize_configuration")]
    pub configuration: String,
}

/// Normalizes every case's channels with the planned schemes (CT, z-score with nnU-Net's mask rule,
/// none, rescale to [0, 1], RGB to [0, 1]).
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(transparent)]
pub struct NormalizeStage(pub PreprocessParams);

/// Resamples every case to the configuration's spacing (order-3 images, order-1 one-hot
/// segmentations, nnU-Net's separate-z rule) and samples class locations for oversampling.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(transparent)]
pub struct ResampleStage(pub PreprocessParams);

impl PreprocessParams {
    pub(super) fn not_applicable(&self, root: &std::path::Path) -> Option<String> {
        let plans = root.join(&self.plan).join("plans.json");
        case_io::unplanned_configuration(&plans, &self.configuration)
            .or_else(|| case_io::shared_preprocessing(&plans, &self.configuration))
    }

    pub(super) fn inputs(&self) -> Vec<StageInput> {
        let mut inputs = match &self.source {
            // The source stage's outputs are keyed through the dependency; only dataset.json matters.
            Some(_) => vec![StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{}/dataset.json", self.dataset),
            }],
            None => dataset_inputs(&self.dataset),
        };
        inputs.push(StageInput {
            name: "plan".into(),
            path: format!("{}/plans.json", self.plan),
        });
        inputs
    }

    /// Loads each case, applies `step`, writes it to the stage's outputs. `pass_through` may answer
    /// a case's new properties when its arrays stay as they are in the source folder; they are then
    /// linked, not read and written.
    pub(super) fn process(
        &self,
        ctx: &StageContext,
        pool: &rayon::ThreadPool,
        pass_through: impl Fn(&std::path::Path, &str, &PlanView, &Dataset) -> Result<Option<CaseProperties>, PreprocessError>
            + Sync,
        step: impl Fn(StoredCase, &PlanView, &Dataset) -> Result<StoredCase, PreprocessError> + Sync,
    ) -> Result<(), PreprocessError> {
        let dataset = Dataset::open(&ctx.root.join(&self.dataset))?;
        let plans_path = ctx.root.join(&self.plan).join("plans.json");
        let plans = Plans::read(&plans_path)?;
        let plan = PlanView::new(&plans, &self.configuration)?;
        // the cases' chunks are sized for the patches training reads
        let patch = plan.configuration.patch_size()?.to_vec();
        let source = self.source.as_ref().map(|s| ctx.root.join(s));
        let ids: Vec<String> = match &source {
            Some(folder) => list_cases(folder),
            None => dataset.cases.iter().map(|c| c.id.clone()).collect(),
        };
        if ids.is_empty() {
            return Err(PreprocessError::NoCases);
        }
        pool.install(|| {
            ids.par_iter().try_for_each(|id| {
                if ctx.cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(PreprocessError::Interrupted);
                }
                if let Some(folder) = &source {
                    if let Some(properties) = pass_through(folder, id, &plan, &dataset)? {
                        return Ok(write_case_linked(folder, ctx.out_dir, id, &properties)?);
                    }
                }
                let case = match &source {
                    Some(folder) => read_case(folder, id)?,
                    None => {
                        let raw = dataset.case(id).expect("listed case");
                        case_io::load_raw(raw, true, plan.transpose_forward)?
                    }
                };
                let case = step(case, &plan, &dataset).map_err(PreprocessError::in_case(id))?;
                Ok(write_case(ctx.out_dir, id, &case, &patch)?)
            })
        })
    }
}

impl Stage for NormalizeStage {
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
            |_, _, _, _| Ok(None),
            |mut case, plan, _| {
                if case.properties.normalized {
                    return Err(PreprocessError::AlreadyNormalized);
                }
                case_steps::normalize(&mut case, plan)?;
                Ok(case)
            },
        )?)
    }
}

impl Stage for ResampleStage {
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
        Ok(self
            .0
            .process(ctx, &pool, unchanged_grid, |case, plan, dataset| {
                if case.properties.resampled {
                    return Err(PreprocessError::AlreadyResampled);
                }
                let mut case = case_steps::resample(case, plan)?;
                case_steps::add_class_locations(&mut case, &case_steps::location_targets(dataset));
                Ok(case)
            })?)
    }
}

/// A case already on the configuration's grid (nnU-Net then leaves its arrays untouched): only its
/// spacing and class locations change, so the arrays are linked from the source.
pub(super) fn unchanged_grid(
    folder: &std::path::Path,
    id: &str,
    plan: &PlanView,
    dataset: &Dataset,
) -> Result<Option<CaseProperties>, PreprocessError> {
    let mut properties = read_properties(folder, id)?;
    if properties.resampled {
        return Ok(None); // the step reports this
    }
    let seg = read_seg(folder, id)?;
    let Some(seg) = seg else { return Ok(None) };
    let shape = [seg.shape()[1], seg.shape()[2], seg.shape()[3]];
    if case_steps::resampled_shape(&properties, shape, plan)? != shape {
        return Ok(None);
    }
    properties.spacing = plan.target_spacing(properties.spacing)?;
    properties.resampled = true;
    let targets = case_steps::location_targets(dataset);
    properties.class_locations = Some(class_locations::sample(seg.view(), &targets));
    Ok(Some(properties))
}
