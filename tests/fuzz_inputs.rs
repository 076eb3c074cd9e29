//! Fuzzing the readers of untrusted files: the pipeline loader (`engine::load_checked`) and the
//! NIfTI reader (`nifti::read`, `read_integer_labels`, `read_header`).
//!
//! Two kinds of input for each: *generated* ones (valid-looking pipelines with random keys, values,
//! kinds, matrices, `extends`, `${...}` references and `--set` arguments; NIfTI headers with random
//! dims, datatypes, vox_offset, scaling, qform/sform and truncated, oversized or gzip-damaged
//! bodies) and *mutated* ones (byte flips, truncation, insertion and deletion applied to valid
//! files: the repository's pipelines, the NIfTI fixtures and files written by `nifti::write`).
//! Whatever the input, reading must not panic, and every error must name the file.
//!
//! Runs are seeded (the same cases every time) unless `PROPTEST_RNG_SEED` is set; a failure
//! prints the shrunk input. The counts of inputs tried, accepted and refused are printed
//! (`cargo test --test fuzz_inputs -- --nocapture`).

mod common;

use std::fmt::Debug;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use ndarray::Array3;
use nnflow::data::nifti::{self, Header, NiftiError};
use nnflow::engine::config::{Diagnostics, Location};
use nnflow::engine::load_checked;
use nnflow::stages::registry;
use proptest::collection::vec;
use proptest::option::weighted;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

use common::{stderr, Project};

/// Cases per run; each test runs a generated and a mutated run, so each reader sees twice this.
const PIPELINE_CASES: u32 = 5_000;
const NIFTI_CASES: u32 = 5_000;
/// The seed used unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0x6e6e_666c_6f77;

// ---------------------------------------------------------------------------------------------
// Harness

/// Inputs tried, and how many the reader accepted or refused.
#[derive(Default)]
struct Tally {
    tried: AtomicUsize,
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl Tally {
    fn count(&self, accepted: bool) {
        self.tried.fetch_add(1, Ordering::Relaxed);
        let counter = if accepted { &self.accepted } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> (usize, usize, usize) {
        (
            self.tried.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// Runs `test` on `cases` values of `strategy`, panicking with the shrunk failing input if any.
fn run_cases<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let mut config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    let seed = config.rng_seed;
    let mut runner = TestRunner::new(config);
    if let Err(error) = runner.run(&strategy, test) {
        panic!("{name} (seed {seed}): {error}");
    }
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// What a caught panic said.
fn panic_text(what: &str, payload: Box<dyn std::any::Any + Send>) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    format!("{what} panicked: {message}")
}

/// Applies byte-level mutations to a file's contents.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    /// Insert one of the interesting tokens (by index into the token list).
    Token(Index, Index),
    /// Delete up to this many bytes.
    Delete(Index, u8),
    /// Repeat a range of bytes (up to this many) right after itself.
    Duplicate(Index, u8),
    /// Overwrite with one of the interesting tokens.
    Overwrite(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), vec(any::<u8>(), 1..6)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Token(i, t)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Overwrite(i, t)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation], tokens: &[&[u8]]) {
    for m in mutations {
        let len = bytes.len();
        // A position in 0..=len (insertions may append).
        let at = |i: &Index| i.index(len + 1);
        match m {
            Mutation::Flip(i, mask) if len > 0 => bytes[i.index(len)] ^= mask,
            Mutation::Truncate(i) => bytes.truncate(at(i)),
            Mutation::Insert(i, b) => {
                let p = at(i);
                bytes.splice(p..p, b.iter().copied());
            }
            Mutation::Token(i, t) => {
                let p = at(i);
                bytes.splice(p..p, tokens[t.index(tokens.len())].iter().copied());
            }
            Mutation::Delete(i, n) if len > 0 => {
                let p = i.index(len);
                bytes.drain(p..(p + usize::from(*n)).min(len));
            }
            Mutation::Duplicate(i, n) if len > 0 => {
                let p = i.index(len);
                let copy = bytes[p..(p + usize::from(*n)).min(len)].to_vec();
                let end = p + copy.len();
                bytes.splice(end..end, copy);
            }
            Mutation::Overwrite(i, t) if len > 0 => {
                let p = i.index(len);
                let token = tokens[t.index(tokens.len())];
                let end = (p + token.len()).min(len);
                bytes[p..end].copy_from_slice(&token[..end - p]);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pipeline files: generation

/// A TOML value, rendered as TOML text.
#[derive(Debug, Clone)]
enum Val {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Date(&'static str),
    Arr(Vec<Val>),
    Table(Vec<(String, Val)>),
}

impl Val {
    fn toml(&self) -> String {
        match self {
            Val::Int(i) => i.to_string(),
            Val::Float(f) if f.is_nan() => "nan".into(),
            Val::Float(f) if f.is_infinite() => (if *f > 0.0 { "inf" } else { "-inf" }).into(),
            Val::Float(f) => format!("{f:?}"),
            Val::Bool(b) => b.to_string(),
            Val::Str(s) => quote(s),
            Val::Date(d) => d.to_string(),
            Val::Arr(items) => {
                let items: Vec<String> = items.iter().map(Val::toml).collect();
                format!("[{}]", items.join(", "))
            }
            Val::Table(entries) => {
                let entries: Vec<String> = unique(entries)
                    .map(|(k, v)| format!("{} = {}", key(k), v.toml()))
                    .collect();
                format!("{{ {} }}", entries.join(", "))
            }
        }
    }
}

/// Entries with a key already seen dropped (a duplicate key is a TOML error; mutation covers those).
fn unique(entries: &[(String, Val)]) -> impl Iterator<Item = &(String, Val)> {
    let mut seen = std::collections::HashSet::new();
    entries.iter().filter(move |(k, _)| seen.insert(k.clone()))
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML key: bare when it can be.
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        quote(k)
    }
}

const VARS: &[&str] = &["dataset", "folds", "configurations", "x", "y", "n"];
const MATRIX_KEYS: &[&str] = &["fold", "configuration", "c"];
const STAGE_NAMES: &[&str] = &[
    "a", "b", "data", "plan", "train", "fit-1", "evaluate", "bad name", "",
];
/// The stage kinds and their parameters (first: one every instance needs).
const KINDS: &[(&str, &[&str])] = &[
    ("command", &["cmd", "inputs", "outputs", "env", "params"]),
    (
        "fingerprint",
        &["dataset", "check_integrity", "foreground_samples"],
    ),
    (
        "plan",
        &[
            "dataset",
            "fingerprint",
            "gpu_memory_gb",
            "overrides",
            "overwrite_target_spacing",
            "plans_name",
        ],
    ),
    ("normalize", &["dataset", "configuration", "plan", "source"]),
    ("resample", &["dataset", "configuration", "plan", "source"]),
    ("preprocess", &["dataset", "configuration", "plan", "source"]),
    (
        "train",
        &[
            "dataset",
            "plan",
            "preprocessed",
            "configuration",
            "fold",
            "epochs",
            "augment",
            "batch_size",
            "patch_size",
            "device",
            "loss",
            "learning_rate",
            "previous_stage",
            "splits",
            "seed",
            "iterations_per_epoch",
            "val_iterations",
            "early_stopping",
        ],
    ),
    ("evaluate", &["predictions", "reference", "dataset"]),
    (
        "ensemble-select",
        &["trainings", "dataset", "ensembles", "hard_voting"],
    ),
    ("postprocess", &["selection", "dataset"]),
    (
        "predict",
        &[
            "images",
            "output",
            "dataset",
            "plan",
            "trainings",
            "selection",
            "postprocessing",
            "configuration",
            "step_size",
            "mirroring",
            "device",
            "amp",
        ],
    ),
];
const COMMON_KEYS: &[&str] = &[
    "threads",
    "gpus",
    "description",
    "slurm",
    "instance_overrides",
    "kind",
];
const PATHS: &[&str] = &[
    "out",
    "out/a.txt",
    "out/*.txt",
    "**",
    "data/x",
    "./out//",
    "/abs/path",
    "../up",
    "out/[",
    "*",
    "?",
    "${dataset}/raw",
    "${x}/report.txt",
    "",
];
const EXTENDS: &[&str] = &[
    "base.toml",
    "p.toml",
    "missing.toml",
    ".",
    "",
    "sub/../base.toml",
    "base.toml/",
    "\0",
];
/// Strings meant to trip the `${...}` parser and what consumes its results.
const NASTY_STRINGS: &[&str] = &[
    "${",
    "$${x}",
    "${}",
    "${a b}",
    "${x.outputs",
    "${[*].outputs}",
    "${a[k].outputs}",
    "${a[=1].outputs}",
    "${a[k=].outputs}",
    "${a[k=1,].outputs}",
    "${.outputs}",
    "${a[*]}",
    "${a.outputs.outputs}",
    "$",
    "$$",
    "}",
    "${${x}}",
    "\0",
    "é☃𝄞",
    "\"'\\\n\t",
    "${dataset}${dataset}",
    "${folds}",
    "${folds} ${folds}",
    "\u{feff}",
    "${train[fold=0,configuration=2d].outputs}",
    "${ a }",
    "${a[ * ].outputs}",
];

fn text() -> BoxedStrategy<String> {
    let names = prop_oneof![select(VARS), select(MATRIX_KEYS), Just("nope")];
    let variable = names.prop_map(|n| format!("${{{n}}}"));
    let selection = prop_oneof![
        Just(String::new()),
        Just("[*]".to_string()),
        (select(MATRIX_KEYS), "[0-9a-z_]{0,3}").prop_map(|(k, v)| format!("[{k}={v}]")),
    ];
    let outputs = (select(STAGE_NAMES), selection).prop_map(|(s, sel)| format!("${{{s}{sel}.outputs}}"));
    let piece = prop_oneof![
        3 => proptest::string::string_regex("[a-zA-Z0-9_./*? -]{0,10}").unwrap(),
        2 => variable,
        2 => outputs,
        1 => select(PATHS).prop_map(String::from),
        2 => select(NASTY_STRINGS).prop_map(String::from),
        1 => any::<String>(),
    ];
    prop_oneof![3 => piece.clone(), 1 => vec(piece, 2..4).prop_map(|p| p.concat())].boxed()
}

fn leaf() -> BoxedStrategy<Val> {
    let ints = prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(5),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(1 << 32),
        any::<i64>()
    ];
    let floats = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(0.5),
        Just(1e308),
        any::<f64>()
    ];
    let dates = select(
        &[
            "1979-05-27T07:32:00Z",
            "1979-05-27",
            "07:32:00",
            "1979-05-27T07:32:00",
        ][..],
    );
    prop_oneof![
        3 => ints.prop_map(Val::Int),
        1 => floats.prop_map(Val::Float),
        1 => any::<bool>().prop_map(Val::Bool),
        6 => text().prop_map(Val::Str),
        1 => dates.prop_map(Val::Date),
    ]
    .boxed()
}

fn any_key() -> BoxedStrategy<String> {
    let known = [VARS, MATRIX_KEYS, COMMON_KEYS, &["where", "bogus"]].concat();
    prop_oneof![4 => select(known).prop_map(String::from), 1 => any::<String>()].boxed()
}

fn value() -> BoxedStrategy<Val> {
    leaf()
        .prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..5).prop_map(Val::Arr),
                vec((any_key(), inner), 0..4).prop_map(Val::Table),
            ]
        })
        .boxed()
}

/// A stage parameter: mostly strings (paths, references) or lists of them.
fn param_value() -> BoxedStrategy<Val> {
    prop_oneof![
        5 => text().prop_map(Val::Str),
        2 => vec(text().prop_map(Val::Str), 0..4).prop_map(Val::Arr),
        2 => value(),
    ]
    .boxed()
}

fn matrix_scalar() -> BoxedStrategy<Val> {
    prop_oneof![
        3 => (0..4i64).prop_map(Val::Int),
        2 => select(&["2d", "3d_fullres", "3d_lowres", "a,b", "x=y", "", "[*]", "${x}"][..])
            .prop_map(|s| Val::Str(s.into())),
        1 => any::<bool>().prop_map(Val::Bool),
        1 => leaf(),
    ]
    .boxed()
}

fn matrix() -> BoxedStrategy<Val> {
    let dimension = prop_oneof![
        4 => vec(matrix_scalar(), 0..4).prop_map(Val::Arr),
        1 => select(&["${folds}", "${configurations}", "${x}", "${nope}", "${folds}${folds}"][..])
            .prop_map(|s| Val::Str(s.into())),
        1 => value(),
    ];
    prop_oneof![6 => vec((select(MATRIX_KEYS).prop_map(String::from), dimension), 0..3).prop_map(Val::Table), 1 => value()]
        .boxed()
}

fn after() -> BoxedStrategy<Val> {
    let target = prop_oneof![
        3 => select(STAGE_NAMES).prop_map(|s| Val::Str(s.into())),
        2 => select(STAGE_NAMES).prop_map(|s| Val::Str(format!("{s}[*]"))),
        1 => text().prop_map(Val::Str),
    ];
    prop_oneof![5 => vec(target, 0..3).prop_map(Val::Arr), 1 => value()].boxed()
}

#[derive(Debug, Clone)]
struct StageSpec {
    name: String,
    entries: Vec<(String, Val)>,
    overrides: Vec<Vec<(String, Val)>>,
}

fn stage() -> BoxedStrategy<StageSpec> {
    let kind = prop_oneof![
        12 => (0..KINDS.len()).prop_map(Some),
        1 => Just(None),
    ];
    let param = (any::<Index>(), weighted(0.1, any_key()), param_value());
    let common = (select(COMMON_KEYS), value());
    let override_entry = (
        weighted(
            0.85,
            prop_oneof![4 => vec((select(MATRIX_KEYS).prop_map(String::from), matrix_scalar()), 0..3).prop_map(Val::Table), 1 => value()],
        ),
        vec(
            (
                prop_oneof![6 => any::<Index>().prop_map(Ok), 1 => any_key().prop_map(Err)],
                param_value(),
            ),
            0..3,
        ),
    );
    (
        select(STAGE_NAMES),
        kind,
        value(),
        weighted(0.9, param_value()),
        vec(param, 0..4),
        weighted(0.4, matrix()),
        weighted(0.3, after()),
        vec(common, 0..2),
        vec(override_entry, 0..2),
    )
        .prop_map(
            |(name, kind, odd_kind, first, params, matrix, after, common, overrides)| {
                let mut entries = Vec::new();
                let keys: &[&str] = match kind {
                    Some(k) => {
                        entries.push(("kind".to_string(), Val::Str(KINDS[k].0.to_string())));
                        KINDS[k].1
                    }
                    None => {
                        entries.push(("kind".to_string(), odd_kind));
                        KINDS[0].1
                    }
                };
                if let Some(first) = first {
                    entries.push((keys[0].to_string(), first));
                }
                for (index, odd_key, value) in params {
                    entries.push((
                        odd_key.unwrap_or_else(|| keys[index.index(keys.len())].to_string()),
                        value,
                    ));
                }
                if let Some(matrix) = matrix {
                    entries.push(("matrix".into(), matrix));
                }
                if let Some(after) = after {
                    entries.push(("after".into(), after));
                }
                entries.extend(common.into_iter().map(|(k, v)| (k.to_string(), v)));
                let overrides = overrides
                    .into_iter()
                    .map(|(condition, params)| {
                        let mut entries: Vec<(String, Val)> =
                            condition.into_iter().map(|c| ("where".into(), c)).collect();
                        for (which, value) in params {
                            let key = which.map_or_else(|k| k, |i| keys[i.index(keys.len())].to_string());
                            entries.push((key, value));
                        }
                        entries
                    })
                    .collect();
                StageSpec {
                    name: name.to_string(),
                    entries,
                    overrides,
                }
            },
        )
        .boxed()
}

/// The text of one pipeline file.
#[derive(Debug, Clone)]
struct Body {
    top: Vec<(String, Val)>,
    pipeline: Option<Vec<(String, Val)>>,
    vars: Option<Vec<(String, Val)>>,
    stages: Vec<StageSpec>,
}

impl Body {
    fn render(&self) -> String {
        let mut out = String::new();
        let entries = |out: &mut String, entries: &[(String, Val)]| {
            for (k, v) in unique(entries) {
                out.push_str(&format!("{} = {}\n", key(k), v.toml()));
            }
        };
        entries(&mut out, &self.top);
        if let Some(pipeline) = &self.pipeline {
            out.push_str("[pipeline]\n");
            entries(&mut out, pipeline);
        }
        if let Some(vars) = &self.vars {
            out.push_str("[vars]\n");
            entries(&mut out, vars);
        }
        let mut seen = std::collections::HashSet::new();
        for stage in self.stages.iter().filter(|s| seen.insert(s.name.clone())) {
            out.push_str(&format!("\n[stages.{}]\n", key(&stage.name)));
            entries(&mut out, &stage.entries);
            for o in &stage.overrides {
                out.push_str(&format!("[[stages.{}.instance_overrides]]\n", key(&stage.name)));
                entries(&mut out, o);
            }
        }
        out
    }
}

fn body() -> BoxedStrategy<Body> {
    let extends = prop_oneof![6 => select(EXTENDS).prop_map(|s| Val::Str(s.into())), 1 => value()];
    let pipeline = (
        weighted(0.3, text().prop_map(Val::Str)),
        weighted(0.4, extends),
        weighted(0.2, text().prop_map(Val::Str)),
        weighted(0.2, text().prop_map(Val::Str)),
        weighted(
            0.2,
            prop_oneof![
                select(&["local", "slurm", "bogus"][..]).prop_map(|s| Val::Str(s.into())),
                value()
            ],
        ),
        weighted(0.1, value()),
        weighted(0.05, value()),
    )
        .prop_map(|(name, extends, work_dir, cache_dir, executor, slurm, bogus)| {
            [
                ("name", name),
                ("extends", extends),
                ("work_dir", work_dir),
                ("cache_dir", cache_dir),
                ("executor", executor),
                ("slurm", slurm),
                ("bogus", bogus),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect::<Vec<_>>()
        });
    let var_value = prop_oneof![
        2 => vec((0..5i64).prop_map(Val::Int), 0..5).prop_map(Val::Arr),
        1 => vec(select(&["2d", "3d_fullres", "3d_lowres"][..]).prop_map(|s| Val::Str(s.into())), 0..4).prop_map(Val::Arr),
        3 => text().prop_map(Val::Str),
        2 => value(),
    ];
    let var_name = prop_oneof![5 => select(VARS).prop_map(String::from), 1 => any::<String>()];
    (
        weighted(
            0.05,
            vec(
                (
                    select(&["bogus", "stages", "vars", "pipeline"][..]).prop_map(String::from),
                    value(),
                ),
                1..2,
            ),
        ),
        weighted(0.6, pipeline),
        weighted(0.6, vec((var_name, var_value), 0..6)),
        vec(stage(), 0..5),
    )
        .prop_map(|(top, pipeline, vars, stages)| Body {
            top: top.unwrap_or_default(),
            pipeline,
            vars,
            stages,
        })
        .boxed()
}

/// The file a generated pipeline may extend (`base.toml`).
#[derive(Debug, Clone)]
enum Base {
    None,
    Body(Body),
    Bytes(Vec<u8>),
}

fn set_arg() -> BoxedStrategy<String> {
    let stage_param = (select(STAGE_NAMES), any::<Index>(), value())
        .prop_map(|(s, i, v)| format!("{s}.{}={}", KINDS[0].1[i.index(KINDS[0].1.len())], v.toml()));
    prop_oneof![
        3 => (select(VARS), value()).prop_map(|(n, v)| format!("{n}={}", v.toml())),
        3 => stage_param,
        2 => (select(STAGE_NAMES), select(COMMON_KEYS), value()).prop_map(|(s, k, v)| format!("{s}.{k}={}", v.toml())),
        2 => (select(VARS), text()).prop_map(|(n, t)| format!("{n}={t}")),
        2 => select(
            &[
                "novalue", "=1", "a..b=1", ".x=1", "x.=1", "a.b.c.d=1", "x=[1, 2", "x=", "stages=1", "vars=1",
                "a.matrix={ fold = [0, 1, 2] }", "a=1", "x=${y}", " = ", "a.kind=bogus", "a.instance_overrides=3",
                "a.instance_overrides=[{ where = { fold = 0 }, cmd = \"x\" }]", "data.after=[\"data\"]",
                "folds=[0, 1, 2, 3, 4, 5, 6, 7]", "a.cmd.x=1", "x.y.z=1", "dataset=/", "dataset=.",
            ][..],
        )
        .prop_map(String::from),
        1 => any::<String>(),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
struct GeneratedPipeline {
    main: Body,
    base: Base,
    sets: Vec<String>,
}

/// A piece of a string in a *tame* pipeline: references only to what the pipeline defines.
#[derive(Debug, Clone)]
enum TamePiece {
    Text(String),
    /// `${dataset}`, `${x}`, `${n}` or `${folds}`.
    Var(Index),
    /// `${fold}` in a matrix stage.
    Fold,
    /// An earlier stage's outputs: matching (0), all (1) or filtered (2).
    Outputs(Index, u8),
    /// An earlier stage's output folder as a path (an implicit dependency when an input).
    Path(Index),
    /// `$${HOME}` (a literal `${HOME}`) or `$HOME`.
    Dollar(bool),
}

/// A command stage of a tame pipeline; `after` and references point at earlier stages only.
#[derive(Debug, Clone)]
struct TameStage {
    /// 0: none, 1: `{ fold = [0, 1] }`, 2: `{ fold = "${folds}" }`.
    matrix: u8,
    cmd: Vec<TamePiece>,
    inputs: Vec<Vec<TamePiece>>,
    outputs: bool,
    after: Vec<Index>,
    threads: Option<u8>,
    instance_override: bool,
}

fn tame_stage() -> BoxedStrategy<TameStage> {
    let piece = prop_oneof![
        3 => proptest::string::string_regex("[a-z ]{1,6}").unwrap().prop_map(TamePiece::Text),
        2 => any::<Index>().prop_map(TamePiece::Var),
        1 => Just(TamePiece::Fold),
        3 => (any::<Index>(), 0..3u8).prop_map(|(i, s)| TamePiece::Outputs(i, s)),
        1 => any::<Index>().prop_map(TamePiece::Path),
        1 => any::<bool>().prop_map(TamePiece::Dollar),
    ];
    (
        prop_oneof![3 => Just(0u8), 1 => 1..3u8],
        vec(piece.clone(), 1..4),
        vec(vec(piece, 1..3), 0..2),
        weighted(0.7, Just(())),
        vec(any::<Index>(), 0..2),
        weighted(0.2, 0..4u8),
        weighted(0.2, Just(())),
    )
        .prop_map(
            |(matrix, cmd, inputs, outputs, after, threads, instance_override)| TameStage {
                matrix,
                cmd,
                inputs,
                outputs: outputs.is_some(),
                after,
                threads,
                instance_override: instance_override.is_some(),
            },
        )
        .boxed()
}

/// A pipeline of command stages that is valid unless `perturbations` (wild entries put in front
/// of a stage's own, so they win) break it.
fn tame_body(extends: f64) -> BoxedStrategy<Body> {
    let perturbations = prop_oneof![
        2 => Just(Vec::new()),
        1 => vec((any::<Index>(), any_key(), value()), 1..3),
    ];
    let extends = if extends > 0.0 {
        weighted(extends, Just(())).boxed()
    } else {
        Just(None).boxed()
    };
    (vec(tame_stage(), 1..5), extends, perturbations)
        .prop_map(|(stages, extends, perturbations)| render_tame(&stages, extends.is_some(), perturbations))
        .boxed()
}

fn render_tame(stages: &[TameStage], extends: bool, perturbations: Vec<(Index, String, Val)>) -> Body {
    let str_val = |s: &str| Val::Str(s.to_string());
    let vars = vec![
        ("dataset".to_string(), str_val("data")),
        ("x".to_string(), str_val("${dataset}/x")),
        ("n".to_string(), Val::Int(3)),
        ("folds".to_string(), Val::Arr(vec![Val::Int(0), Val::Int(1)])),
    ];
    let mut specs: Vec<StageSpec> = stages
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let text = |pieces: &[TamePiece]| -> String {
                pieces
                    .iter()
                    .map(|piece| match piece {
                        TamePiece::Text(t) => t.clone(),
                        TamePiece::Var(v) => format!("${{{}}}", ["dataset", "x", "n", "folds"][v.index(4)]),
                        TamePiece::Fold if stage.matrix > 0 => "${fold}".into(),
                        TamePiece::Fold => "nofold".into(),
                        TamePiece::Outputs(_, _) | TamePiece::Path(_) if i == 0 => "first".into(),
                        TamePiece::Outputs(k, selection) => {
                            let k = k.index(i);
                            let target_matrix = stages[k].matrix > 0;
                            match selection {
                                0 if target_matrix && stage.matrix == 0 => format!("${{s{k}[*].outputs}}"),
                                0 => format!("${{s{k}.outputs}}"),
                                1 => format!("${{s{k}[*].outputs}}"),
                                _ if target_matrix => format!("${{s{k}[fold=0].outputs}}"),
                                _ => format!("${{s{k}.outputs}}"),
                            }
                        }
                        TamePiece::Path(k) => format!("out{}", k.index(i)),
                        TamePiece::Dollar(true) => "$${HOME}".into(),
                        TamePiece::Dollar(false) => "$HOME".into(),
                    })
                    .collect()
            };
            let mut entries = vec![
                ("kind".to_string(), str_val("command")),
                ("cmd".to_string(), Val::Str(text(&stage.cmd))),
            ];
            match stage.matrix {
                0 => {}
                1 => entries.push((
                    "matrix".into(),
                    Val::Table(vec![("fold".into(), Val::Arr(vec![Val::Int(0), Val::Int(1)]))]),
                )),
                _ => entries.push((
                    "matrix".into(),
                    Val::Table(vec![("fold".into(), str_val("${folds}"))]),
                )),
            }
            if stage.outputs {
                let out = if stage.matrix > 0 {
                    format!("out{i}/${{fold}}")
                } else {
                    format!("out{i}")
                };
                entries.push(("outputs".into(), Val::Arr(vec![Val::Str(out)])));
            }
            if !stage.inputs.is_empty() {
                let inputs = stage.inputs.iter().map(|p| Val::Str(text(p))).collect();
                entries.push(("inputs".into(), Val::Arr(inputs)));
            }
            if i > 0 && !stage.after.is_empty() {
                let after = stage
                    .after
                    .iter()
                    .map(|k| Val::Str(format!("s{}", k.index(i))))
                    .collect();
                entries.push(("after".into(), Val::Arr(after)));
            }
            if let Some(threads) = stage.threads {
                entries.push(("threads".into(), Val::Int(threads.into())));
            }
            let overrides = if stage.instance_override && stage.matrix > 0 {
                vec![vec![
                    (
                        "where".to_string(),
                        Val::Table(vec![("fold".into(), Val::Int(1))]),
                    ),
                    ("cmd".to_string(), str_val("echo override ${fold}")),
                ]]
            } else {
                Vec::new()
            };
            StageSpec {
                name: format!("s{i}"),
                entries,
                overrides,
            }
        })
        .collect();
    let count = specs.len();
    for (stage, key, value) in perturbations {
        specs[stage.index(count)].entries.insert(0, (key, value));
    }
    Body {
        top: Vec::new(),
        pipeline: extends.then(|| vec![("extends".to_string(), str_val("base.toml"))]),
        vars: Some(vars),
        stages: specs,
    }
}

/// `--set` arguments a tame pipeline accepts.
const TAME_SETS: &[&str] = &[
    "dataset=other",
    "n=5",
    "x=plain",
    "folds=[0, 1, 2]",
    "s0.threads=2",
    "s0.cmd=echo set",
    "s0.description=set",
];

fn generated_pipeline() -> BoxedStrategy<GeneratedPipeline> {
    let wild_base = prop_oneof![
        4 => Just(Base::None),
        4 => body().prop_map(Base::Body),
        1 => vec(any::<u8>(), 0..64).prop_map(Base::Bytes),
    ];
    let wild_sets = prop_oneof![2 => Just(Vec::new()), 1 => vec(set_arg(), 1..4)];
    let wild = (body(), wild_base, wild_sets);
    let tame_base = prop_oneof![
        3 => Just(Base::None),
        3 => tame_body(0.0).prop_map(Base::Body),
        1 => body().prop_map(Base::Body),
    ];
    let tame_sets = prop_oneof![
        4 => Just(Vec::new()),
        2 => vec(select(TAME_SETS).prop_map(String::from), 1..3),
        1 => vec(set_arg(), 1..2),
    ];
    let tame = (tame_body(0.3), tame_base, tame_sets);
    prop_oneof![wild, tame]
        .prop_map(|(main, base, sets)| GeneratedPipeline { main, base, sets })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Pipeline files: mutation

/// Tokens inserted into pipeline files.
const PIPELINE_TOKENS: &[&[u8]] = &[
    b"${",
    b"}",
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"\"",
    b"'",
    b"=",
    b"\n",
    b",",
    b"{",
    b"\n[stages.x]\n",
    b"\n[stages.x]\nkind = \"command\"\ncmd = \"true\"\nafter = [\"train\"]\n",
    b"${train[*].outputs}",
    b"${plan.outputs}",
    b"${train[configuration=3d_lowres].outputs}",
    b"$${",
    b"\xff",
    b"\0",
    b"\xef\xbb\xbf",
    b"[*]",
    b"\nmatrix = { fold = [1, 2] }\n",
    b"\nextends = \"demo.toml\"\n",
    b"\nextends = \"nnunet.toml\"\n",
    b"after = [\"fingerprint\"]\n",
    b"-",
    b"99999999999999999999999",
    b"nan",
    b"inf",
    b"-0.0",
    b"1979-05-27",
    b"\"\"\"",
    b"'''",
    b"#",
    b"\\u0000",
    b"\\",
    b"\r\n",
    b"\t",
    b"\n[[stages.train.instance_overrides]]\nwhere = { configuration = \"2d\" }\nepochs = 1\n",
    b"\n[pipeline]\nname = \"x\"\n",
    b"\n[vars]\nfolds = \"${folds}\"\n",
    b"true",
    b"[]",
    b"{}",
    "é".as_bytes(),
    "☃".as_bytes(),
    "𝄞".as_bytes(),
    "\u{200b}".as_bytes(),
    b"\r",
];

/// A small pipeline using most features (matrix, filters, overrides, `after`), as a mutation seed.
const FEATURES_PIPELINE: &str = r#"[pipeline]
name = "features"

[vars]
folds = [0, 1]
root = "data"
name = "${root}/x"

[stages.prepare]
kind = "command"
cmd = "mkdir -p ${root} && echo $${HOME} > ${name}"
outputs = ["${root}/x"]
params = { n = 3, list = ["a", "b"] }

[stages.fit]
kind = "command"
matrix = { fold = "${folds}", c = ["2d", "3d"] }
cmd = "cat ${prepare.outputs} ${root}/x > $NNFLOW_OUT/${fold}-${c}"
inputs = ["${root}/x"]
threads = 2

[[stages.fit.instance_overrides]]
where = { c = "3d" }
cmd = "echo 3d ${fold}"

[stages.report]
kind = "command"
cmd = "cat ${fit[*].outputs} ${fit[fold=0,c=2d].outputs} ${fit[c=3d].outputs}"
after = ["fit[*]", "prepare"]
env = ["HOME"]
"#;

/// One seed pipeline: its file name, text, and the file it extends (if any).
struct PipelineSeed {
    name: &'static str,
    text: String,
    base: Option<(&'static str, String)>,
}

fn pipeline_seeds() -> Vec<PipelineSeed> {
    let repo = |file: &str| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(file)).unwrap()
    };
    vec![
        PipelineSeed {
            name: "nnunet.toml",
            text: repo("nnunet.toml"),
            base: None,
        },
        PipelineSeed {
            name: "demo.toml",
            text: repo("demo.toml"),
            base: Some(("nnunet.toml", repo("nnunet.toml"))),
        },
        PipelineSeed {
            name: "commands.toml",
            text: repo("commands.toml"),
            base: None,
        },
        PipelineSeed {
            name: "features.toml",
            text: FEATURES_PIPELINE.into(),
            base: None,
        },
    ]
}

#[derive(Debug, Clone)]
struct MutatedPipeline {
    seed: Index,
    /// Mutate the extended file instead of the main one (for seeds that extend another).
    in_base: bool,
    mutations: Vec<Mutation>,
    sets: Vec<String>,
}

fn mutated_pipeline() -> BoxedStrategy<MutatedPipeline> {
    let sets = prop_oneof![4 => Just(Vec::new()), 1 => vec(set_arg(), 1..3)];
    (
        any::<Index>(),
        weighted(0.3, Just(())),
        vec(mutation(), 1..4),
        sets,
    )
        .prop_map(|(seed, in_base, mutations, sets)| MutatedPipeline {
            seed,
            in_base: in_base.is_some(),
            mutations,
            sets,
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Pipeline files: the property

/// Loads `main`, checking: no panic, and the error names the file it concerns: every problem
/// says where it is (a position in the pipeline file or a file it extends, the `--set` argument at
/// fault, or else the pipeline file), so a report names the pipeline file (or its folder's
/// extended file) unless its only problems are `--set` arguments, which name the argument instead
/// (see `set_values_that_do_not_parse_point_at_the_argument` in tests/validation.rs).
fn check_pipeline(main: &Path, sets: &[String], tally: &Tally) -> Result<Option<Diagnostics>, String> {
    let result = catch_unwind(AssertUnwindSafe(|| load_checked(main, sets, registry())))
        .map_err(|payload| panic_text("load_checked", payload))?;
    let diagnostics = match result {
        Ok(_) => {
            tally.count(true);
            return Ok(None);
        }
        Err(diagnostics) => diagnostics,
    };
    tally.count(false);
    let text = diagnostics.to_string();
    let main_text = main.display().to_string();
    let folder = main.parent().unwrap().display().to_string();
    if diagnostics.items.is_empty() {
        return Err(format!("an error without problems:\n{text}"));
    }
    for item in &diagnostics.items {
        let located = match &item.location {
            Some(Location::File { .. }) => text.contains(&folder),
            Some(Location::CommandLine { arg }) => text.contains(&format!("--set {arg}: error: ")),
            None => item.message.contains(&main_text) || text.contains(&format!("{main_text}: error: ")),
        };
        if !located {
            return Err(format!(
                "a problem does not name the file ({:?}):\n{text}",
                item.location
            ));
        }
    }
    Ok(Some(diagnostics))
}

/// Whether every problem is a `--set` argument's (such a report names the argument, not the file).
fn only_set_mistakes(diagnostics: &Diagnostics) -> bool {
    diagnostics
        .items
        .iter()
        .all(|item| matches!(item.location, Some(Location::CommandLine { .. })))
}

/// Writes a generated pipeline into `dir` (`p.toml`, and `base.toml`: empty when the case has no
/// base, so that nothing of an earlier case is left there); returns the main file and its text.
/// Files are rewritten rather than created in fresh folders: creating and deleting thousands of
/// folders is slow on some filesystems.
fn write_generated(dir: &Path, input: &GeneratedPipeline) -> (PathBuf, String) {
    let main = dir.join("p.toml");
    let text = input.main.render();
    std::fs::write(&main, &text).unwrap();
    let base = match &input.base {
        Base::None => Vec::new(),
        Base::Body(body) => body.render().into_bytes(),
        Base::Bytes(bytes) => bytes.clone(),
    };
    std::fs::write(dir.join("base.toml"), base).unwrap();
    (main, text)
}

#[test]
fn pipeline_files_never_panic_and_errors_name_the_file() {
    let root = tempfile::tempdir().unwrap();

    let generated = Tally::default();
    run_cases(
        "generated pipeline",
        PIPELINE_CASES,
        generated_pipeline(),
        |input| {
            let (main, text) = write_generated(root.path(), &input);
            let outcome = check_pipeline(&main, &input.sets, &generated);
            outcome
                .map(|_| ())
                .map_err(|e| fail(format!("{e}\n--- p.toml ---\n{text}--- --set {:?}", input.sets)))
        },
    );

    let seeds = pipeline_seeds();
    // One folder per seed, holding only that seed's files (rewritten for every case).
    for i in 0..seeds.len() {
        std::fs::create_dir(root.path().join(format!("seed{i}"))).unwrap();
    }
    let mutated = Tally::default();
    run_cases("mutated pipeline", PIPELINE_CASES, mutated_pipeline(), |input| {
        let index = input.seed.index(seeds.len());
        let (seed, dir) = (&seeds[index], root.path().join(format!("seed{index}")));
        let mut main = seed.text.clone().into_bytes();
        let mut base = seed
            .base
            .as_ref()
            .map(|(name, text)| (name, text.clone().into_bytes()));
        match &mut base {
            Some((_, bytes)) if input.in_base => mutate(bytes, &input.mutations, PIPELINE_TOKENS),
            _ => mutate(&mut main, &input.mutations, PIPELINE_TOKENS),
        }
        std::fs::write(dir.join(seed.name), &main).unwrap();
        if let Some((name, bytes)) = &base {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let outcome = check_pipeline(&dir.join(seed.name), &input.sets, &mutated);
        outcome.map(|_| ()).map_err(|e| {
            let (name, bytes) = match &base {
                Some((name, bytes)) if input.in_base => (**name, bytes),
                _ => (seed.name, &main),
            };
            let shown = String::from_utf8_lossy(bytes);
            fail(format!(
                "{e}\n--- mutated {name} ---\n{shown}--- --set {:?}",
                input.sets
            ))
        })
    });

    let (g_tried, g_accepted, g_refused) = generated.get();
    let (m_tried, m_accepted, m_refused) = mutated.get();
    eprintln!(
        "pipeline files: {} tried ({g_tried} generated: {g_accepted} accepted, {g_refused} refused; \
         {m_tried} mutated: {m_accepted} accepted, {m_refused} refused)",
        g_tried + m_tried
    );
    assert!(g_tried + m_tried >= 10_000, "too few pipeline files tried");
    // Both outcomes must be common, or the generators test only one side of the loader.
    for (what, tried, accepted, refused) in [
        ("generated", g_tried, g_accepted, g_refused),
        ("mutated", m_tried, m_accepted, m_refused),
    ] {
        assert!(
            accepted * 50 >= tried,
            "{what}: only {accepted} of {tried} pipelines accepted"
        );
        assert!(
            refused * 50 >= tried,
            "{what}: only {refused} of {tried} pipelines refused"
        );
    }
}

/// A pipeline file, the `base.toml` beside it (if any), and `--set` arguments.
type PipelineCase = (Vec<u8>, Option<Vec<u8>>, Vec<String>);

/// A few of the nastiest inputs through the real binary: `nnflow validate` exits 2 (invalid), not
/// 101 (panic), and its report names the file.
#[test]
fn validate_reports_nasty_pipelines_with_exit_2_and_the_file() {
    // Hand-picked: every problem class at once, `--set` problems alone, `extends` cycles and
    // unreadable bases, references everywhere, extreme values.
    let mut cases: Vec<PipelineCase> = vec![
        (b"\xff\xfe[stages]\n".to_vec(), None, vec![]),
        (
            b"[pipeline]\nextends = \"base.toml\"\n".to_vec(),
            Some(b"[pipeline]\nextends = \"p.toml\"\n".to_vec()),
            vec![],
        ),
        (
            b"[pipeline]\nextends = \"base.toml\"\n".to_vec(),
            Some(b"\xff\x00".to_vec()),
            vec![],
        ),
        (
            b"[stages.a]\nkind = \"command\"\ncmd = \"true\"\n".to_vec(),
            None,
            vec![
                "=1".into(),
                "a..b=2".into(),
                "nostage.x=1".into(),
                "novalue".into(),
            ],
        ),
        (
            br#"[vars]
a = "${b}"
b = "${a}"
folds = [9223372036854775807, -9223372036854775808]
[stages."bad name"]
kind = "command"
[stages.a]
kind = "command"
matrix = { fold = "${folds}", c = [nan, inf, { x = 1 }] }
cmd = "${a[k=].outputs} ${ ${x}} ${a.outputs} ${a[*].outputs} $${"
outputs = ["**", "out/[", "../up", "/"]
after = ["a", "a[*]", "", "nostage"]
threads = -1
[[stages.a.instance_overrides]]
where = { fold = 1979-05-27 }
kind = "x"
"#
            .to_vec(),
            None,
            vec!["a.matrix={ fold = [0, 1, 2] }".into(), "a.cmd.x=1".into()],
        ),
    ];
    // Plus the generated pipelines with the most problems among a seeded sample.
    let project = Project::new();
    let tally = Tally::default();
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = generated_pipeline();
    let mut ranked = Vec::new();
    for i in 0..300 {
        let input = strategy.new_tree(&mut runner).unwrap().current();
        let dir = project.path().join(format!("sample{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (main, _) = write_generated(&dir, &input);
        if let Some(diagnostics) = check_pipeline(&main, &input.sets, &tally).unwrap() {
            ranked.push((diagnostics.items.len(), input));
        }
    }
    ranked.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    assert!(ranked.len() >= 3, "too few refused samples");
    for (_, input) in ranked.into_iter().take(3) {
        let base = match &input.base {
            Base::None => None,
            Base::Body(body) => Some(body.render().into_bytes()),
            Base::Bytes(bytes) => Some(bytes.clone()),
        };
        cases.push((input.main.render().into_bytes(), base, input.sets));
    }

    for (i, (main, base, sets)) in cases.iter().enumerate() {
        let folder = format!("nasty{i}");
        std::fs::create_dir_all(project.path().join(&folder)).unwrap();
        std::fs::write(project.path().join(&folder).join("p.toml"), main).unwrap();
        if let Some(base) = base {
            std::fs::write(project.path().join(&folder).join("base.toml"), base).unwrap();
        }
        let file = format!("{folder}/p.toml");
        let mut args = vec!["validate".to_string(), file.clone()];
        for set in sets {
            args.push("--set".into());
            args.push(set.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = project.nnflow(&args);
        let report = stderr(&output);
        let shown = String::from_utf8_lossy(main);
        assert_eq!(
            output.status.code(),
            Some(2),
            "nnflow {args:?} on\n{shown}\nexited with {:?}:\n{report}",
            output.status
        );
        assert!(!report.contains("panicked"), "{report}");
        let Err(in_process) = load_checked(&project.path().join(&file), sets, registry()) else {
            panic!("{file} is valid:\n{shown}");
        };
        if only_set_mistakes(&in_process) {
            for item in &in_process.items {
                let Some(Location::CommandLine { arg }) = &item.location else {
                    unreachable!()
                };
                let named = format!("--set {arg}: error: ");
                assert!(
                    report.contains(&named),
                    "the report does not name `{arg}`:\n{report}"
                );
            }
        } else {
            assert!(
                report.contains(&format!("{folder}/")),
                "the report does not name the file:\n{report}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NIfTI files: generation

/// Datatype codes the reader decodes, with their sizes.
const DATATYPES: &[(i16, usize)] = &[
    (2, 1),
    (256, 1),
    (4, 2),
    (512, 2),
    (8, 4),
    (768, 4),
    (16, 4),
    (64, 8),
];
/// Codes of the standard the reader refuses.
const UNSUPPORTED_DATATYPES: &[i16] = &[0, 1, 32, 128, 1024, 1280, 1536, 1792, 2048, 2304];

#[derive(Debug, Clone)]
enum BodyLen {
    /// Exactly the declared data size (or a small part of it when that is huge).
    Exact,
    /// Part of the declared data.
    Short(Index),
    /// The declared data and more bytes.
    Long(u16),
    Empty,
    Fixed(u16),
}

#[derive(Debug, Clone)]
enum Fill {
    Zeros,
    /// Pseudo-random bytes from this seed.
    Random(u64),
    /// NaN, infinities, extremes and negative zero, as f32 or f64.
    Special,
}

/// How the file is stored.
#[derive(Debug, Clone)]
enum Storage {
    Plain,
    Gzip,
    /// Two gzip members, split at this point.
    MultiMember(Index),
    /// The gzip stream cut short.
    TruncatedGzip(Index),
    /// One byte of the gzip stream changed.
    CorruptGzip(Index, u8),
    /// Bytes after the gzip stream.
    TrailingGarbage(Vec<u8>),
}

#[derive(Debug, Clone)]
struct NiftiSpec {
    big_endian: bool,
    sizeof_hdr: i32,
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    vox_offset: f32,
    scl_slope: f32,
    scl_inter: f32,
    xyzt_units: u8,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 3],
    qoffset: [f32; 3],
    srow: [[f32; 4]; 3],
    magic: [u8; 4],
    extension: [u8; 4],
    body: BodyLen,
    fill: Fill,
    storage: Storage,
    /// Whether the file name ends in `.gz` (independent of the storage: the reader sniffs).
    gz_name: bool,
}

fn float_field() -> BoxedStrategy<f32> {
    prop_oneof![
        4 => -10.0f32..10.0,
        2 => select(
            &[0.0, -0.0, 1.0, -1.0, 0.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN,
              f32::MIN_POSITIVE, 1e-45, 1e30][..],
        ),
        1 => any::<f32>(),
    ]
    .boxed()
}

fn axis_size() -> BoxedStrategy<i16> {
    prop_oneof![
        30 => 1..6i16,
        1 => Just(0i16),
        1 => -3..0i16,
        1 => Just(i16::MAX),
        1 => Just(i16::MIN),
        1 => any::<i16>(),
    ]
    .boxed()
}

fn nifti_spec() -> BoxedStrategy<NiftiSpec> {
    let dim = (
        prop_oneof![8 => 2..=4i16, 1 => 0..=8i16, 1 => any::<i16>()],
        prop::array::uniform3(axis_size()),
        prop::array::uniform4(prop_oneof![8 => Just(1i16), 1 => axis_size()]),
    )
        .prop_map(|(n, xyz, extra)| [n, xyz[0], xyz[1], xyz[2], extra[0], extra[1], extra[2], extra[3]]);
    let datatype = prop_oneof![
        8 => select(DATATYPES).prop_map(|(code, _)| code),
        1 => select(UNSUPPORTED_DATATYPES),
        1 => any::<i16>(),
    ];
    let vox_offset = prop_oneof![
        10 => Just(352.0f32),
        1 => Just(348.0f32),
        1 => Just(0.0f32),
        2 => select(&[347.0f32, 352.5, 356.0, 4096.0, -352.0, 1e30, f32::NAN, f32::INFINITY, f32::MAX,
                      16777217.0, 2147483648.0, 1e19][..]),
        1 => any::<f32>(),
    ];
    let scale = prop_oneof![4 => Just(1.0f32), 2 => Just(0.0f32), 3 => float_field()];
    let inter = prop_oneof![5 => Just(0.0f32), 3 => float_field()];
    let code = prop_oneof![4 => 0..=2i16, 1 => any::<i16>()];
    let header = (
        any::<bool>(),
        prop_oneof![20 => Just(348i32), 1 => Just(540), 1 => Just(0), 1 => any::<i32>()],
        dim,
        datatype,
        prop_oneof![4 => Just(0i16), 1 => any::<i16>()],
        prop::array::uniform8(float_field()),
        vox_offset,
        (scale, inter),
        any::<u8>(),
        (code.clone(), code),
        (
            prop::array::uniform3(float_field()),
            prop::array::uniform3(float_field()),
            prop::array::uniform3(prop::array::uniform4(float_field())),
        ),
        prop_oneof![20 => Just(*b"n+1\0"), 1 => Just(*b"ni1\0"), 1 => Just(*b"n+2\0"), 1 => any::<[u8; 4]>()],
    );
    let body = prop_oneof![
        10 => Just(BodyLen::Exact),
        2 => any::<Index>().prop_map(BodyLen::Short),
        1 => (1..64u16).prop_map(BodyLen::Long),
        1 => Just(BodyLen::Empty),
        1 => (0..512u16).prop_map(BodyLen::Fixed),
    ];
    let fill = prop_oneof![2 => Just(Fill::Zeros), 3 => any::<u64>().prop_map(Fill::Random), 1 => Just(Fill::Special)];
    let storage = prop_oneof![
        6 => Just(Storage::Plain),
        6 => Just(Storage::Gzip),
        1 => any::<Index>().prop_map(Storage::MultiMember),
        1 => any::<Index>().prop_map(Storage::TruncatedGzip),
        1 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Storage::CorruptGzip(i, m)),
        1 => vec(any::<u8>(), 1..16).prop_map(Storage::TrailingGarbage),
    ];
    let rest = (
        prop_oneof![8 => Just([0u8; 4]), 1 => any::<[u8; 4]>()],
        body,
        fill,
        storage,
        any::<bool>(),
    );
    (header, rest)
        .prop_map(
            |(
                (
                    big_endian,
                    sizeof_hdr,
                    dim,
                    datatype,
                    bitpix,
                    pixdim,
                    vox_offset,
                    (scl_slope, scl_inter),
                    xyzt_units,
                    (qform_code, sform_code),
                    (quatern, qoffset, srow),
                    magic,
                ),
                (extension, body, fill, storage, gz_name),
            )| NiftiSpec {
                big_endian,
                sizeof_hdr,
                dim,
                datatype,
                bitpix,
                pixdim,
                vox_offset,
                scl_slope,
                scl_inter,
                xyzt_units,
                qform_code,
                sform_code,
                quatern,
                qoffset,
                srow,
                magic,
                extension,
                body,
                fill,
                storage,
                gz_name,
            },
        )
        .boxed()
}

/// Writes multi-byte fields in the spec's byte order.
struct HeaderWriter {
    bytes: Vec<u8>,
    big_endian: bool,
}

impl HeaderWriter {
    fn put(&mut self, offset: usize, le: &[u8]) {
        let mut b = le.to_vec();
        if self.big_endian {
            b.reverse();
        }
        self.bytes[offset..offset + b.len()].copy_from_slice(&b);
    }
    fn f32s(&mut self, offset: usize, values: &[f32]) {
        for (i, v) in values.iter().enumerate() {
            self.put(offset + 4 * i, &v.to_le_bytes());
        }
    }
}

/// Bytes past this are not written even when the header declares more: huge declared sizes get a
/// small body (the reader must refuse them without allocating what they declare).
const MAX_BODY: usize = 1 << 16;

impl NiftiSpec {
    /// The uncompressed file.
    fn nii_bytes(&self) -> Vec<u8> {
        let mut h = HeaderWriter {
            bytes: vec![0u8; 348],
            big_endian: self.big_endian,
        };
        h.put(0, &self.sizeof_hdr.to_le_bytes());
        for (i, d) in self.dim.iter().enumerate() {
            h.put(40 + 2 * i, &d.to_le_bytes());
        }
        h.put(70, &self.datatype.to_le_bytes());
        h.put(72, &self.bitpix.to_le_bytes());
        h.f32s(76, &self.pixdim);
        h.f32s(108, &[self.vox_offset, self.scl_slope, self.scl_inter]);
        h.bytes[123] = self.xyzt_units;
        h.put(252, &self.qform_code.to_le_bytes());
        h.put(254, &self.sform_code.to_le_bytes());
        h.f32s(256, &self.quatern);
        h.f32s(268, &self.qoffset);
        for (r, row) in self.srow.iter().enumerate() {
            h.f32s(280 + 16 * r, row);
        }
        h.bytes[344..348].copy_from_slice(&self.magic);
        let mut bytes = h.bytes;
        bytes.extend_from_slice(&self.extension);
        // The data goes where vox_offset says when that is a sensible place, else right here.
        let offset = self.vox_offset;
        if (352.0..=8192.0).contains(&offset) {
            bytes.resize(offset as usize, 0);
        }
        let declared = self.declared_data_size();
        let len = match &self.body {
            BodyLen::Exact => declared.min(MAX_BODY),
            BodyLen::Short(i) => i.index(declared.clamp(1, MAX_BODY)),
            BodyLen::Long(extra) => declared.min(MAX_BODY) + usize::from(*extra),
            BodyLen::Empty => 0,
            BodyLen::Fixed(n) => usize::from(*n),
        };
        let elem = DATATYPES
            .iter()
            .find(|(code, _)| *code == self.datatype)
            .map_or(1, |(_, size)| *size);
        bytes.extend(fill(&self.fill, len, elem, self.big_endian));
        bytes
    }

    /// The data size the header declares, as the reader should compute it (saturating).
    fn declared_data_size(&self) -> usize {
        let ndim = self.dim[0].clamp(0, 7) as usize;
        let elem = DATATYPES
            .iter()
            .find(|(code, _)| *code == self.datatype)
            .map_or(1, |(_, size)| *size);
        (1..=3)
            .map(|axis| {
                if axis <= ndim {
                    self.dim[axis].max(1) as usize
                } else {
                    1
                }
            })
            .fold(elem, usize::saturating_mul)
    }

    /// The file as stored.
    fn file_bytes(&self) -> Vec<u8> {
        store(self.nii_bytes(), &self.storage)
    }
}

fn fill(kind: &Fill, len: usize, elem: usize, big_endian: bool) -> Vec<u8> {
    match kind {
        Fill::Zeros => vec![0; len],
        Fill::Random(seed) => {
            let mut state = seed | 1;
            (0..len)
                .map(|_| {
                    // xorshift64
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        }
        Fill::Special => {
            let values: Vec<Vec<u8>> = if elem == 8 {
                [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, f64::MAX, 0.5]
                    .iter()
                    .map(|v| v.to_le_bytes().to_vec())
                    .collect()
            } else {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::MAX, 0.5]
                    .iter()
                    .map(|v| v.to_le_bytes().to_vec())
                    .collect()
            };
            let mut out: Vec<u8> = values
                .iter()
                .cycle()
                .flat_map(|v| {
                    let mut v = v.clone();
                    if big_endian {
                        v.reverse();
                    }
                    v
                })
                .take(len)
                .collect();
            out.resize(len, 0);
            out
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn store(nii: Vec<u8>, storage: &Storage) -> Vec<u8> {
    match storage {
        Storage::Plain => nii,
        Storage::Gzip => gzip(&nii),
        Storage::MultiMember(split) => {
            let at = split.index(nii.len() + 1);
            let mut out = gzip(&nii[..at]);
            out.extend(gzip(&nii[at..]));
            out
        }
        Storage::TruncatedGzip(cut) => {
            let mut out = gzip(&nii);
            out.truncate(cut.index(out.len()));
            out
        }
        Storage::CorruptGzip(at, mask) => {
            let mut out = gzip(&nii);
            let i = at.index(out.len());
            out[i] ^= mask;
            out
        }
        Storage::TrailingGarbage(garbage) => {
            let mut out = gzip(&nii);
            out.extend_from_slice(garbage);
            out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NIfTI files: mutation

/// Header offsets worth overwriting: sizeof_hdr, dims, datatype, bitpix, pixdim, vox_offset,
/// scl_slope/inter, qform/sform codes, quatern, qoffset, srow, magic, extension flag.
const HEADER_FIELDS: &[usize] = &[
    0, 40, 42, 44, 46, 48, 50, 70, 72, 76, 80, 88, 108, 112, 116, 252, 254, 256, 268, 280, 296, 312, 344, 348,
];

const NIFTI_TOKENS: &[&[u8]] = &[
    &[0xff, 0x7f],
    &[0x7f, 0xff],
    &[0xff, 0xff],
    &[0x00, 0x80],
    &[0x80, 0x00],
    &[0, 0],
    &[1, 0],
    &[0, 1],
    &[0, 0, 0xc0, 0x7f],
    &[0x7f, 0xc0, 0, 0],
    &[0, 0, 0x80, 0x7f],
    &[0xff, 0xff, 0x7f, 0x7f],
    &[0xca, 0xf2, 0x49, 0x71],
    &[0, 0, 0x80, 0xbf],
    &[0, 0, 0, 0x80],
    &[0x5c, 0x01, 0, 0],
    &[0, 0, 0x01, 0x5c],
    &[0x1c, 0x02, 0, 0],
    b"n+1\0",
    b"ni1\0",
    &[0x1f, 0x8b],
    &[0x1f, 0x8b, 0x08, 0x00],
];

#[derive(Debug, Clone)]
enum NiftiMutation {
    /// Any byte-level mutation.
    Bytes(Mutation),
    /// Overwrite a header field with one of the tokens.
    Field(Index, Index),
}

#[derive(Debug, Clone)]
struct MutatedNifti {
    seed: Index,
    /// Mutate the stored (compressed) bytes rather than the NIfTI bytes inside the gzip.
    on_stored_bytes: bool,
    mutations: Vec<NiftiMutation>,
    gz_name: bool,
}

fn mutated_nifti() -> BoxedStrategy<MutatedNifti> {
    let one = prop_oneof![
        3 => mutation().prop_map(NiftiMutation::Bytes),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(f, t)| NiftiMutation::Field(f, t)),
    ];
    (
        any::<Index>(),
        weighted(0.25, Just(())),
        vec(one, 1..5),
        any::<bool>(),
    )
        .prop_map(|(seed, on_stored, mutations, gz_name)| MutatedNifti {
            seed,
            on_stored_bytes: on_stored.is_some(),
            mutations,
            gz_name,
        })
        .boxed()
}

/// A seed NIfTI file: its uncompressed bytes and whether it is stored gzipped.
struct NiftiSeed {
    name: String,
    nii: Vec<u8>,
    gz: bool,
}

/// The fixtures, plus files written by `nifti::write` (each element type, 2D and 3D, both
/// storages).
fn nifti_seeds(dir: &Path) -> Vec<NiftiSeed> {
    let mut seeds = Vec::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".nii") || p.to_string_lossy().ends_with(".nii.gz"))
        .collect();
    let like = nifti::read_header(fixtures.join("oblique_sform.nii.gz")).unwrap();
    for (i, shape) in [(2, 3, 4), (1, 1, 1), (3, 1, 2)].into_iter().enumerate() {
        let mut header = like.clone();
        header.dim = [3, shape.2 as i16, shape.1 as i16, shape.0 as i16, 1, 1, 1, 1];
        let values = Array3::from_shape_fn(shape, |(z, y, x)| (z * 7 + y * 3 + x) as i32 - 5);
        for ext in ["nii", "nii.gz"] {
            let base = dir.join(format!("written{i}"));
            let path = |t: &str| PathBuf::from(format!("{}_{t}.{ext}", base.display()));
            nifti::write(path("u8"), &values.mapv(|v| v as u8), &header).unwrap();
            nifti::write(path("i16"), &values.mapv(|v| v as i16), &header).unwrap();
            nifti::write(path("i32"), &values, &header).unwrap();
            nifti::write(path("f32"), &values.mapv(|v| v as f32 * 0.25), &header).unwrap();
            paths.extend(["u8", "i16", "i32", "f32"].map(path));
        }
    }
    paths.sort();
    for path in paths {
        let stored = std::fs::read(&path).unwrap();
        let mut nii = Vec::new();
        let gz = stored.starts_with(&[0x1f, 0x8b]);
        if gz && MultiGzDecoder::new(&stored[..]).read_to_end(&mut nii).is_err() {
            // A broken gzip fixture: keep it as stored bytes.
            seeds.push(NiftiSeed {
                name: path.display().to_string(),
                nii: stored,
                gz: false,
            });
            continue;
        }
        seeds.push(NiftiSeed {
            name: path.display().to_string(),
            nii: if gz { nii } else { stored },
            gz,
        });
    }
    seeds
}

// ---------------------------------------------------------------------------------------------
// NIfTI files: the property

fn names_file(error: &NiftiError, path: &Path) -> Result<(), String> {
    let text = error.to_string();
    if text.contains(&path.display().to_string()) {
        Ok(())
    } else {
        Err(format!("the error does not name the file: {text}"))
    }
}

/// Reads `path` every way, checking: no panic; every error names the file; the three readers agree.
fn check_nifti(path: &Path, tally: &Tally) -> Result<(), String> {
    let read = catch_unwind(|| nifti::read(path)).map_err(|p| panic_text("nifti::read", p))?;
    let labels = catch_unwind(|| nifti::read_integer_labels(path))
        .map_err(|p| panic_text("nifti::read_integer_labels", p))?;
    let header =
        catch_unwind(|| nifti::read_header(path)).map_err(|p| panic_text("nifti::read_header", p))?;
    for error in [read.as_ref().err(), labels.as_ref().err(), header.as_ref().err()]
        .into_iter()
        .flatten()
    {
        names_file(error, path)?;
    }
    tally.count(read.is_ok());
    let Ok(volume) = read else {
        if labels.is_ok() {
            return Err("read_integer_labels accepted what read refused".into());
        }
        return Ok(());
    };
    let header: Header = header.map_err(|e| format!("read accepted but read_header refused: {e}"))?;
    if format!("{header:?}") != format!("{:?}", volume.header) {
        return Err(format!(
            "read_header {header:?} differs from read's {:?}",
            volume.header
        ));
    }
    let shape = volume.header.shape_zyx();
    if volume.data.shape() != shape {
        return Err(format!(
            "data shape {:?}, header shape {shape:?}",
            volume.data.shape()
        ));
    }
    match labels {
        Ok((data, _)) if data.shape() == shape => {}
        Ok((data, _)) => return Err(format!("label shape {:?}, header shape {shape:?}", data.shape())),
        Err(NiftiError::NotInteger { .. }) => {}
        Err(e) => return Err(format!("read accepted but read_integer_labels refused: {e}")),
    }
    // The geometry of any header that reads must be computable.
    catch_unwind(|| {
        let h = &volume.header;
        (
            h.affine(),
            h.itk_origin(),
            h.itk_direction(),
            h.itk_spacing(),
            volume.spacing_zyx(),
        )
    })
    .map_err(|p| panic_text("geometry", p))?;
    Ok(())
}

#[test]
fn nifti_inputs_never_panic_and_errors_name_the_file() {
    let root = tempfile::tempdir().unwrap();
    // Two files rewritten for every case (the reader sniffs gzip; the name need not match).
    let file = |gz_name: bool| root.path().join(if gz_name { "case.nii.gz" } else { "case.nii" });

    let generated = Tally::default();
    run_cases("generated NIfTI", NIFTI_CASES, nifti_spec(), |spec| {
        let path = file(spec.gz_name);
        std::fs::write(&path, spec.file_bytes()).unwrap();
        check_nifti(&path, &generated).map_err(fail)
    });

    let seeds = nifti_seeds(root.path());
    assert!(seeds.len() >= 30, "too few NIfTI seeds: {}", seeds.len());
    let mutated = Tally::default();
    run_cases("mutated NIfTI", NIFTI_CASES, mutated_nifti(), |input| {
        let seed = &seeds[input.seed.index(seeds.len())];
        let apply = |bytes: &mut Vec<u8>| {
            for m in &input.mutations {
                match m {
                    NiftiMutation::Bytes(m) => mutate(bytes, std::slice::from_ref(m), NIFTI_TOKENS),
                    NiftiMutation::Field(field, token) => {
                        let offset = HEADER_FIELDS[field.index(HEADER_FIELDS.len())];
                        let token = NIFTI_TOKENS[token.index(NIFTI_TOKENS.len())];
                        if bytes.len() >= offset + token.len() {
                            bytes[offset..offset + token.len()].copy_from_slice(token);
                        }
                    }
                }
            }
        };
        let mut bytes = seed.nii.clone();
        if input.on_stored_bytes {
            if seed.gz {
                bytes = gzip(&bytes);
            }
            apply(&mut bytes);
        } else {
            apply(&mut bytes);
            if seed.gz {
                bytes = gzip(&bytes);
            }
        }
        let path = file(input.gz_name);
        std::fs::write(&path, &bytes).unwrap();
        check_nifti(&path, &mutated).map_err(|e| fail(format!("{e}\n(seed {})", seed.name)))
    });

    let (g_tried, g_accepted, g_refused) = generated.get();
    let (m_tried, m_accepted, m_refused) = mutated.get();
    eprintln!(
        "NIfTI inputs: {} tried ({g_tried} generated: {g_accepted} accepted, {g_refused} refused; \
         {m_tried} mutated: {m_accepted} accepted, {m_refused} refused)",
        g_tried + m_tried
    );
    assert!(g_tried + m_tried >= 10_000, "too few NIfTI inputs tried");
    for (what, tried, accepted, refused) in [
        ("generated", g_tried, g_accepted, g_refused),
        ("mutated", m_tried, m_accepted, m_refused),
    ] {
        assert!(
            accepted * 50 >= tried,
            "{what}: only {accepted} of {tried} NIfTI inputs accepted"
        );
        assert!(
            refused * 50 >= tried,
            "{what}: only {refused} of {tried} NIfTI inputs refused"
        );
    }
}

/// Headers declaring more data than any file could hold (up to 32767^3 float64 voxels, ~2.8e14
/// bytes) are refused from the header and the file size, without allocating what they declare:
/// an allocation that large would abort the process, which no test could catch.
#[test]
fn huge_declared_sizes_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti/uncompressed_float32.nii");
    let original = std::fs::read(fixture).unwrap();
    for (dims, datatype) in [
        ([3i16, i16::MAX, i16::MAX, i16::MAX], 64i16),
        ([3, i16::MAX, i16::MAX, 1], 16),
        ([3, 2048, 2048, 2048], 2),
    ] {
        let mut nii = original.clone();
        for (i, d) in dims.iter().enumerate() {
            nii[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
        }
        nii[70..72].copy_from_slice(&datatype.to_le_bytes());
        for (name, bytes) in [("huge.nii", nii.clone()), ("huge.nii.gz", gzip(&nii))] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            for result in [
                nifti::read(&path).map(|_| ()),
                nifti::read_integer_labels(&path).map(|_| ()),
            ] {
                let error = result.expect_err("a header declaring more data than the file holds is refused");
                let text = error.to_string();
                assert!(text.contains(&path.display().to_string()), "{text}");
                assert!(text.contains("truncated"), "{text}");
                // Refused from the file's size: a gzip file is not even inflated.
                if name.ends_with(".gz") {
                    assert!(matches!(error, NiftiError::GzipTooSmall { .. }), "{error:?}");
                } else {
                    assert!(matches!(error, NiftiError::Truncated { .. }), "{error:?}");
                }
            }
        }
    }
}
