//! nnU-Net's stage kinds and their registry [`KINDS`]. Each kind is a typed parameter struct plus
//! an implementation of the engine's [`Stage`] trait; the engine knows none of them and is handed
//! the registry ([`registry`]) by the command line and the schema generator. Stages depend on the
//! engine's plug-in interface ([`crate::engine::stage`]) and on the numeric, model and I/O layers,
//! never the other way round.

pub mod command;
pub mod ensemble_select;
pub mod evaluate;
pub mod fingerprint;
pub mod finite;
pub mod plan;
pub mod postprocess;
pub mod predict;
pub mod preprocess;
pub mod preprocessing;
pub mod process;
pub mod report;
pub mod train;

// The engine's plug-in interface, re-exported for the kind modules (`use super::{Kind, Stage, ...}`).
pub use crate::engine::stage::{
    build_typed, to_json, Kind, ParamError, Registry, Stage, StageContext, StageError, StageInput,
};
use crate::torch_env::LIBTORCH_VERSION;

pub static KINDS: &[Kind] = &[
    command::KIND,
    fingerprint::KIND,
    plan::KIND,
    preprocessing::NORMALIZE,
    preprocessing::RESAMPLE,
    preprocess::PREPROCESS,
    train::KIND,
    evaluate::KIND,
    ensemble_select::KIND,
    postprocess::KIND,
    predict::KIND,
    report::KIND,
];

/// nnU-Net's stage kinds, as the engine takes them.
pub fn registry() -> Registry {
    Registry::new(KINDS)
}

/// The toolchain of kinds that run libtorch code: their results may change with its version.
pub const LIBTORCH: &[(&str, &str)] = &[("libtorch", LIBTORCH_VERSION)];

/// The parts of a raw dataset its training stages read: dataset.json, imagesTr and labelsTr
/// (keyed as `dataset/...`, so imagesTs does not invalidate preprocessing).
pub fn dataset_inputs(dataset: &str) -> Vec<StageInput> {
    ["dataset.json", "imagesTr", "labelsTr"]
        .into_iter()
        .map(|part| StageInput {
            name: format!("dataset/{part}"),
            path: format!("{dataset}/{part}"),
        })
        .collect()
}

/// What stages scoring against the training labels read: dataset.json and labelsTr.
pub fn reference_inputs(dataset: &str) -> Vec<StageInput> {
    ["dataset.json", "labelsTr"]
        .into_iter()
        .map(|part| StageInput {
            name: format!("dataset/{part}"),
            path: format!("{dataset}/{part}"),
        })
        .collect()
}

/// A rayon pool of the stage's thread count, so stages running side by side share the cores.
pub fn thread_pool(ctx: &StageContext) -> Result<rayon::ThreadPool, ThreadPoolError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.threads.max(1) as usize)
        .build()
        .map_err(|source| ThreadPoolError {
            threads: ctx.threads,
            source,
        })
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} threads: {source}")]
pub struct ThreadPoolError {
    threads: u32,
    source: rayon::ThreadPoolBuildError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_names_its_parameters() {
        for kind in KINDS {
            assert!(!kind.parameter_names().is_empty(), "{}", kind.name);
        }
        let names = |kind: &str| registry().find(kind).unwrap().parameter_names();
        assert_eq!(names("command"), ["cmd", "env", "inputs", "outputs", "params"]);
        let train = names("train");
        for parameter in ["epochs", "augment", "learning_rate", "dataset", "fold"] {
            assert!(train.iter().any(|n| n == parameter), "{parameter}: {train:?}");
        }
        assert!(names("plan").iter().any(|n| n == "gpu_memory_gb"));
    }

    /// The kinds that run libtorch code put its version into their keys; the others do not.
    #[test]
    fn torch_kinds_declare_libtorch() {
        for kind in KINDS {
            let expected: &[(&str, &str)] = match kind.name {
                "train" | "predict" => &[("libtorch", LIBTORCH_VERSION)],
                _ => &[],
            };
            assert_eq!(kind.toolchain, expected, "{}", kind.name);
        }
    }
}
