//! nnflow's training batches are statistically nnU-Net 2.8.1's.
//!
//! `tests/fixtures/loader_stats/generate.py` ran nnU-Net's own `nnUNetDataLoader` with the
//! transforms of `nnUNetTrainer.get_training_transforms` over thousands of samples of three small
//! preprocessed cases (committed under `cases/`, stored here with nnflow's own case writer) and
//! recorded, by observing nnU-Net's objects, aggregated seed-independent properties in
//! `expected.json`. Here nnflow's [`PatchSampler::place`] (where crops go and on which class) and
//! [`Pipeline::draw`] (what every augmentation draws, through the functions `apply` draws with)
//! produce the same aggregates over as many samples, and [`BatchMaker::make`] the final patches of
//! every [`MAKE_EVERY`]-th batch, for the same three configurations (3D, anisotropic 3D with
//! in-plane augmentation, 2D).
//!
//! Every comparison is a two-sample test at [`Z`] standard errors (or the Kolmogorov-Smirnov
//! equivalent), so an unchanged implementation passes whatever the seeds while a probability of 0.2
//! instead of 0.1, a range of (0.7, 1.3) instead of (0.7, 1.4) or a shifted crop fails. Run with
//! `--nocapture` to see every figure side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use nnflow::augment::pipeline::{TransformDraw, TransformSpec};
use nnflow::augment::{DaConfig, Pipeline, SampleRng};
use nnflow::data::case_store::{read_properties, write_case, StoredCase};
use nnflow::data::npy;
use nnflow::train::case_reader::CaseReader;
use nnflow::train::data::{BatchMaker, Phase};
use nnflow::train::sampler::PatchSampler;
use nnflow::train::setup::as_3d;
use serde_json::Value;

/// Standard errors a difference may reach; a false alarm per comparison has probability ~6e-7.
const Z: f64 = 5.0;
/// Kolmogorov-Smirnov `c(alpha)` for alpha ~ 1e-6 (conservative for discrete distributions).
const KS_C: f64 = 2.7;
/// Extremes: the gap between the largest of n uniform draws and the range's end exceeds
/// `t * width` with probability `(1 - t)^n`; `t = EXTREME / n` keeps that below `e^-EXTREME`.
const EXTREME: f64 = 15.0;
const SEED: u64 = 7;
/// Image channels of the fixture cases.
const CHANNELS: usize = 2;
/// Full training batches (crops read from disk and augmented) are made for every `MAKE_EVERY`-th
/// iteration; the cheaper observations cover all of them.
const MAKE_EVERY: usize = 2;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loader_stats")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| u(x) as usize).collect()
}

/// Every comparison, printed side by side; failures are collected so one run reports them all.
#[derive(Default)]
struct Report {
    lines: String,
    failures: Vec<String>,
}

impl Report {
    fn record(&mut self, ok: bool, line: String) {
        let _ = writeln!(self.lines, "[{}] {line}", if ok { "ok" } else { "FAIL" });
        if !ok {
            self.failures.push(line);
        }
    }

    fn exact<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, nnunet: T, nnflow: T) {
        let ok = nnunet == nnflow;
        self.record(ok, format!("{what}: nnU-Net {nnunet:?} nnflow {nnflow:?}"));
    }

    /// Two proportions `k1 / n1` (nnU-Net) and `k2 / n2` (nnflow): pooled two-sample z-test.
    fn proportion(&mut self, what: &str, (k1, n1): (u64, u64), (k2, n2): (u64, u64)) {
        assert!(n1 > 0 && n2 > 0, "{what}: no samples");
        let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
        let pooled = (k1 + k2) as f64 / (n1 + n2) as f64;
        let se = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
        let ok = if se == 0.0 {
            p1 == p2
        } else {
            (p1 - p2).abs() <= Z * se
        };
        self.record(
            ok,
            format!(
                "{what}: nnU-Net {p1:.4} ({k1}/{n1}) nnflow {p2:.4} ({k2}/{n2}) |d| {:.4} tol {:.4}",
                (p1 - p2).abs(),
                Z * se
            ),
        );
    }

    /// Means with their sample standard deviations: Welch's two-sample z-test.
    fn mean(&mut self, what: &str, (m1, s1, n1): (f64, f64, u64), (m2, s2, n2): (f64, f64, u64)) {
        let se = (s1 * s1 / n1 as f64 + s2 * s2 / n2 as f64).sqrt();
        let ok = if se == 0.0 {
            (m1 - m2).abs() < 1e-9
        } else {
            (m1 - m2).abs() <= Z * se
        };
        self.record(
            ok,
            format!(
                "{what} mean: nnU-Net {m1:.4} (sd {s1:.4}, n {n1}) nnflow {m2:.4} (sd {s2:.4}, n {n2}) \
                 |d| {:.4} tol {:.4}",
                (m1 - m2).abs(),
                Z * se
            ),
        );
    }

    /// Two distributions given as counts over the same ordered cells: the Kolmogorov-Smirnov
    /// distance of their cumulative distributions.
    fn ks(&mut self, what: &str, nnunet: &[u64], nnflow: &[u64]) {
        let (n1, n2) = (nnunet.iter().sum::<u64>(), nnflow.iter().sum::<u64>());
        assert!(n1 > 0 && n2 > 0, "{what}: no samples");
        let (mut c1, mut c2, mut d) = (0u64, 0u64, 0f64);
        for (a, b) in nnunet.iter().zip(nnflow) {
            c1 += a;
            c2 += b;
            d = d.max((c1 as f64 / n1 as f64 - c2 as f64 / n2 as f64).abs());
        }
        let tol = KS_C * ((n1 + n2) as f64 / (n1 * n2) as f64).sqrt();
        self.record(
            d <= tol,
            format!("{what} distribution: KS distance {d:.4} tol {tol:.4} (n {n1} vs {n2})"),
        );
    }

    /// Smallest and largest draws of a bounded distribution.
    fn extremes(&mut self, what: &str, expected: &Value, h: &Hist) {
        let (n1, n2) = (u(&expected["n"]) as f64, h.values.len() as f64);
        let width = f(&expected["hi"]) - f(&expected["lo"]);
        let tol = EXTREME * width * (1.0 / n1 + 1.0 / n2);
        let (lo1, hi1) = (f(&expected["min"]), f(&expected["max"]));
        let (lo2, hi2) = h.extremes();
        let ok = (lo1 - lo2).abs() <= tol && (hi1 - hi2).abs() <= tol;
        self.record(
            ok,
            format!("{what} range: nnU-Net [{lo1:.4}, {hi1:.4}] nnflow [{lo2:.4}, {hi2:.4}] tol {tol:.4}"),
        );
    }

    /// A continuous parameter: mean, distribution over the generator's bins, extremes.
    fn continuous(&mut self, what: &str, expected: &Value, h: &Hist) {
        let n1 = u(&expected["n"]);
        let (m, s) = h.moments();
        self.mean(
            what,
            (f(&expected["mean"]), f(&expected["std"]), n1),
            (m, s, h.values.len() as u64),
        );
        let counts: Vec<u64> = expected["counts"].as_array().unwrap().iter().map(u).collect();
        self.ks(
            what,
            &counts,
            &h.counts(f(&expected["lo"]), f(&expected["hi"]), counts.len() - 2),
        );
        self.extremes(what, expected, h);
    }

    /// An integer distribution (a crop corner along one axis): mean and KS over all values.
    fn discrete(&mut self, what: &str, expected: &Value, values: &[i64]) {
        let reference: BTreeMap<i64, u64> = expected["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| (pair[0].as_i64().unwrap(), u(&pair[1])))
            .collect();
        let mut ours: BTreeMap<i64, u64> = BTreeMap::new();
        for &v in values {
            *ours.entry(v).or_default() += 1;
        }
        let cells: std::collections::BTreeSet<i64> = reference.keys().chain(ours.keys()).copied().collect();
        let count =
            |m: &BTreeMap<i64, u64>| -> Vec<u64> { cells.iter().map(|c| *m.get(c).unwrap_or(&0)).collect() };
        let h = Hist {
            values: values.iter().map(|&v| v as f64).collect(),
        };
        let (m, s) = h.moments();
        self.mean(
            what,
            (f(&expected["mean"]), f(&expected["std"]), u(&expected["n"])),
            (m, s, values.len() as u64),
        );
        self.ks(what, &count(&reference), &count(&ours));
        let range = |m: &BTreeMap<i64, u64>| (*m.keys().next().unwrap(), *m.keys().last().unwrap());
        // with several hundred draws over a few dozen values, uniform crops reach both ends
        if expected["uniform"].as_bool().unwrap_or(false) {
            self.exact(&format!("{what} range"), range(&reference), range(&ours));
        }
    }
}

/// Drawn values of one parameter.
#[derive(Default)]
struct Hist {
    values: Vec<f64>,
}

impl Hist {
    fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    fn moments(&self) -> (f64, f64) {
        let n = self.values.len() as f64;
        let mean = self.values.iter().sum::<f64>() / n;
        let var = self.values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        (mean, var.sqrt())
    }

    fn extremes(&self) -> (f64, f64) {
        let lo = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    }

    /// Counts below `lo`, in `bins` equal bins of `[lo, hi]` (the last one closed, as numpy's), above `hi`.
    fn counts(&self, lo: f64, hi: f64, bins: usize) -> Vec<u64> {
        let mut counts = vec![0u64; bins + 2];
        for &v in &self.values {
            let cell = if v < lo {
                0
            } else if v > hi {
                bins + 1
            } else {
                1 + (((v - lo) / (hi - lo) * bins as f64) as usize).min(bins - 1)
            };
            counts[cell] += 1;
        }
        counts
    }
}

/// Stores the fixture cases as nnflow's preprocessing does for a configuration with this patch
/// (its own writer, so the test follows nnflow's case format), in `folder`.
fn store_cases(folder: &Path, ids: &[String], patch: &[usize]) {
    let source = fixtures().join("cases");
    for id in ids {
        let array = |suffix: &str| source.join(format!("{id}_{suffix}.npy"));
        let data = npy::read::<f32>(&array("data"))
            .unwrap()
            .into_dimensionality()
            .unwrap();
        let seg = npy::read_labels(&array("seg"))
            .unwrap()
            .into_dimensionality()
            .unwrap();
        let case = StoredCase {
            data,
            seg: Some(seg),
            properties: read_properties(&source, id).unwrap(),
        };
        write_case(folder, id, &case, patch).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

fn open_cases(folder: &Path, ids: &[String]) -> Vec<CaseReader> {
    ids.iter()
        .map(|id| CaseReader::open(folder, id).unwrap_or_else(|e| panic!("{id}: {e}")))
        .collect()
}

/// nnflow's batches for one configuration, as `setup::batch_maker` builds them from a plan with
/// nnU-Net's defaults (no mask for normalisation, no deep supervision, no cascade, no regions).
fn batch_maker(config: &Value, folder: &Path, ids: &[String], da: &DaConfig) -> BatchMaker {
    let patch = as_3d(&da.patch_size);
    let sampler = |crop_size| PatchSampler {
        cases: open_cases(folder, ids),
        crop_size,
        patch_size: patch,
        batch_size: u(&config["batch_size"]) as usize,
        oversample_foreground: f(&config["oversample_foreground_percent"]),
        has_ignore_label: false,
    };
    BatchMaker {
        train: sampler(as_3d(&da.initial_patch_size)),
        validation: sampler(patch),
        augment: Pipeline::nnunet_default(da).with_mask_for_norm(&[false; CHANNELS]),
        validation_transforms: Pipeline {
            transforms: vec![TransformSpec::RemoveLabel(Default::default())],
        },
        scales: vec![[1.0; 3]],
        seed: SEED,
        regions: None,
        previous_stage_labels: None,
    }
}

/// One channel's draw of an intensity transform: its value per (z, y, x) axis (one value repeated
/// where the transform draws one), and gamma's flags.
#[derive(Default)]
struct ChannelDraw {
    values: [f64; 3],
    invert: bool,
    retain_stats: bool,
}

impl ChannelDraw {
    fn value(v: f64) -> Self {
        Self {
            values: [v; 3],
            ..Default::default()
        }
    }
}

/// What nnflow drew per transform over all samples, aggregated like the generator does.
#[derive(Default)]
struct AugmentCounts {
    samples: u64,
    fired: BTreeMap<&'static str, u64>,
    /// Per transform: per-channel entries `(values along the recorded axes, invert, retain)`.
    channels: BTreeMap<&'static str, Vec<ChannelDraw>>,
    rotation: u64,
    scaling: u64,
    elastic: u64,
    unsynchronized_scales: u64,
    angles_deg: [Hist; 3],
    scales: Hist,
    flipped: [u64; 3],
}

impl AugmentCounts {
    fn add(&mut self, pipeline: &Pipeline, rng: &SampleRng, spatial_dim: usize) {
        self.samples += 1;
        for drawn in pipeline.draw(CHANNELS, rng) {
            if drawn.fired {
                *self.fired.entry(drawn.name).or_default() += 1;
            }
            let Some(params) = drawn.params else { continue };
            let entries = self.channels.entry(drawn.name).or_default();
            match params {
                TransformDraw::Spatial(s) => {
                    self.rotation += s.rotation as u64;
                    self.scaling += s.scaling as u64;
                    self.elastic += s.elastic as u64;
                    if s.rotation {
                        for (h, a) in self.angles_deg.iter_mut().zip(&s.angles_rad[..spatial_dim]) {
                            h.push(a.to_degrees());
                        }
                    }
                    if s.scaling {
                        self.scales.push(s.scales[0]);
                        let drawn = &s.scales[..spatial_dim];
                        self.unsynchronized_scales += drawn.iter().any(|&v| v != drawn[0]) as u64;
                    }
                }
                TransformDraw::GaussianNoise(v)
                | TransformDraw::Brightness(v)
                | TransformDraw::Contrast(v) => {
                    entries.extend(v.into_iter().map(|(_, x)| ChannelDraw::value(x)));
                }
                TransformDraw::GaussianBlur(v) | TransformDraw::LowResolution(v) => {
                    entries.extend(v.into_iter().map(|(_, values)| ChannelDraw {
                        values,
                        ..Default::default()
                    }));
                }
                TransformDraw::Gamma(v) => {
                    entries.extend(v.into_iter().map(|g| ChannelDraw {
                        invert: g.invert,
                        retain_stats: g.retain_stats,
                        ..ChannelDraw::value(g.gamma)
                    }));
                }
                TransformDraw::Mirror(axes) => {
                    for a in axes {
                        self.flipped[a] += 1;
                    }
                }
            }
        }
    }
}

/// nnflow's per-sample observations of one configuration.
struct Observed {
    samples: u64,
    slots_forced: Vec<bool>,
    case_counts: Vec<u64>,
    /// Per case and kind (0 forced, 1 random): chosen class keys ("none" for uniform crops) and
    /// lower corners.
    classes: Vec<[BTreeMap<String, u64>; 2]>,
    lower: Vec<[[Vec<i64>; 3]; 2]>,
    /// Per kind: samples, and final patches containing class k (index k - 1).
    foreground: [(u64, [u64; 3]); 2],
    augment: AugmentCounts,
}

fn observe(config: &Value, maker: &BatchMaker, spatial_dim: usize) -> Observed {
    let sampler = &maker.train;
    let batch_size = sampler.batch_size;
    let batches = u(&config["batches"]) as usize;
    let n_cases = sampler.cases.len();
    let mut o = Observed {
        samples: 0,
        slots_forced: (0..batch_size).map(|j| sampler.force_foreground(j)).collect(),
        case_counts: vec![0; n_cases],
        classes: (0..n_cases).map(|_| Default::default()).collect(),
        lower: (0..n_cases).map(|_| Default::default()).collect(),
        foreground: Default::default(),
        augment: AugmentCounts::default(),
    };
    for iteration in 0..batches {
        // where crops go: a stream of its own (make's sampler stream is internal to it), same law
        let mut rng = SampleRng::new(SEED, 1, iteration as u64);
        for (j, (case, placement)) in sampler.place(&mut rng).into_iter().enumerate() {
            let kind = usize::from(!o.slots_forced[j]);
            o.case_counts[case] += 1;
            *o.classes[case][kind]
                .entry(placement.class.unwrap_or("none").to_string())
                .or_default() += 1;
            for (axis, &v) in placement.lower.iter().enumerate() {
                o.lower[case][kind][axis].push(v);
            }
        }
        // what the augmentation draws: `make` augments sample j of iteration i with
        // SampleRng::new(seed, epoch, i * batch_size + j)
        for j in 0..batch_size {
            let rng = SampleRng::new(SEED, 0, (iteration * batch_size + j) as u64);
            o.augment.add(&maker.augment, &rng, spatial_dim);
            o.samples += 1;
        }
        // the training batches themselves (reading and augmenting crops is the slow part: a
        // share of the iterations is enough for the per-class foreground presence)
        if iteration % MAKE_EVERY == 0 {
            let batch = maker.make(Phase::Train, 0, iteration).expect("batch");
            let (labels, shape) = &batch.targets[0];
            let per_sample: usize = shape[1..].iter().product();
            for (j, seg) in labels.chunks(per_sample).enumerate() {
                let kind = usize::from(!o.slots_forced[j]);
                o.foreground[kind].0 += 1;
                for k in 1..=3 {
                    o.foreground[kind].1[k - 1] += seg.contains(&(k as i16)) as u64;
                }
            }
        }
    }
    o
}

fn compare_config(report: &mut Report, config: &Value, ids: &[String]) {
    let name = config["name"].as_str().unwrap();
    let patch = usizes(&config["patch_size"]);
    let da = DaConfig::from_patch_size(&patch).unwrap();

    // the trainer's geometry decisions the loader and the transforms start from
    report.exact(
        &format!("{name} initial patch size"),
        usizes(&config["initial_patch_size"]),
        da.initial_patch_size.clone(),
    );
    report.exact(
        &format!("{name} dummy 2D"),
        config["dummy_2d"].as_bool().unwrap(),
        da.dummy_2d,
    );
    let rotation = f(&config["rotation_deg"]);
    report.record(
        (rotation - da.rotation_deg[1]).abs() < 1e-9 && da.rotation_deg[0] == -da.rotation_deg[1],
        format!(
            "{name} rotation range: nnU-Net +-{rotation:.4} nnflow {:?}",
            da.rotation_deg
        ),
    );
    // nnflow counts mirror axes of (z, y, x) samples; nnU-Net's 2D samples have no z
    let offset = 3 - patch.len();
    report.exact(
        &format!("{name} mirror axes"),
        usizes(&config["mirror_axes"])
            .iter()
            .map(|a| a + offset)
            .collect::<Vec<_>>(),
        da.mirror_axes.clone(),
    );

    let folder = tempfile::tempdir().unwrap();
    store_cases(folder.path(), ids, &patch);
    let maker = batch_maker(config, folder.path(), ids, &da);
    let spatial_dim = u(&config["augment"]["spatial"]["dim"]) as usize;
    let o = observe(config, &maker, spatial_dim);
    let n = o.samples;
    report.exact(&format!("{name} samples"), u(&config["samples"]), n);

    // which slots are forced to contain foreground
    let forced: Vec<bool> = config["slots_forced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    report.exact(&format!("{name} forced slots"), forced, o.slots_forced.clone());

    // case choice, class choice and crop positions, per case and kind
    for (c, id) in ids.iter().enumerate() {
        report.proportion(
            &format!("{name} case {id} chosen"),
            (u(&config["case_counts"][id]), u(&config["samples"])),
            (o.case_counts[c], n),
        );
        for (kind, label) in [(0, "forced"), (1, "random")] {
            let expected = &config["placement"][id][label];
            let n1 = u(&expected["n"]);
            let n2: u64 = o.classes[c][kind].values().sum();
            let keys: std::collections::BTreeSet<String> = expected["classes"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .chain(o.classes[c][kind].keys().cloned())
                .chain(["1", "2", "3"].map(String::from))
                .collect();
            for key in keys {
                let k1 = expected["classes"].get(&key).map_or(0, u);
                let k2 = *o.classes[c][kind].get(&key).unwrap_or(&0);
                report.proportion(
                    &format!("{name} {id} {label} crops centred on class {key}"),
                    (k1, n1),
                    (k2, n2),
                );
            }
            for (axis, axis_name) in ["z", "y", "x"].iter().enumerate() {
                let mut e = expected["lower"][axis].clone();
                // uniform crops: every corner between nnU-Net's bounds is likely, so the extremes
                // must agree exactly
                e["uniform"] = Value::Bool(expected["classes"].get("none").is_some_and(|v| u(v) == n1));
                report.discrete(
                    &format!("{name} {id} {label} crop corner {axis_name}"),
                    &e,
                    &o.lower[c][kind][axis],
                );
            }
        }
    }

    // what the network gets: final patches containing each class
    for (kind, label) in [(0, "forced"), (1, "random")] {
        let expected = &config["foreground"][label];
        for k in 1..=3 {
            report.proportion(
                &format!("{name} {label} patches containing class {k}"),
                (u(&expected[k.to_string()]), u(&expected["n"])),
                (o.foreground[kind].1[k - 1], o.foreground[kind].0),
            );
        }
    }

    compare_augment(report, name, &config["augment"], &o.augment);
}

fn compare_augment(report: &mut Report, name: &str, expected: &Value, a: &AugmentCounts) {
    let n = a.samples;
    let spatial = &expected["spatial"];
    let n1 = u(&spatial["n"]);
    for (field, ours) in [
        ("rotation", a.rotation),
        ("scaling", a.scaling),
        ("elastic", a.elastic),
    ] {
        report.proportion(
            &format!("{name} spatial {field} p"),
            (u(&spatial[field]), n1),
            (ours, n),
        );
    }
    for (i, h) in a.angles_deg.iter().enumerate().take(u(&spatial["dim"]) as usize) {
        report.continuous(
            &format!("{name} spatial angle {i} (deg)"),
            &spatial["angles_deg"][i],
            h,
        );
    }
    report.continuous(&format!("{name} spatial scale"), &spatial["scales"], &a.scales);
    let one_draw = spatial["scale_draws_per_sample"] == serde_json::json!([1]);
    report.exact(
        &format!("{name} spatial scale shared by all axes"),
        one_draw,
        a.unsynchronized_scales == 0,
    );

    for t in [
        "gaussian_noise",
        "gaussian_blur",
        "brightness",
        "contrast",
        "low_resolution",
        "gamma_inverted",
        "gamma",
    ] {
        let e = &expected[t];
        let fired = *a.fired.get(t).unwrap_or(&0);
        report.proportion(&format!("{name} {t} p"), (u(&e["fired"]), u(&e["n"])), (fired, n));
        let entries = a.channels.get(t).map(Vec::as_slice).unwrap_or(&[]);
        report.proportion(
            &format!("{name} {t} channel p"),
            (u(&e["channels"]), u(&e["channel_draws"])),
            (entries.len() as u64, fired * CHANNELS as u64),
        );
        if let Some(per_axis) = e.get("values_per_axis").and_then(Value::as_object) {
            let axes: Vec<usize> = per_axis.keys().map(|k| k.parse().unwrap()).collect();
            for (key, values) in per_axis {
                let axis: usize = key.parse().unwrap();
                let h = Hist {
                    values: entries.iter().map(|e| e.values[axis]).collect(),
                };
                report.continuous(&format!("{name} {t} axis {axis}"), values, &h);
            }
            if let Some(equal) = e.get("axes_equal") {
                let ours = entries
                    .iter()
                    .filter(|e| axes.iter().all(|&ax| e.values[ax] == e.values[axes[0]]))
                    .count() as u64;
                report.proportion(
                    &format!("{name} {t} one value for all axes"),
                    (u(equal), u(&e["channels"])),
                    (ours, entries.len() as u64),
                );
            }
        } else {
            let h = Hist {
                values: entries.iter().map(|e| e.values[0]).collect(),
            };
            report.continuous(&format!("{name} {t} value"), &e["values"], &h);
            if t != "gaussian_noise" {
                // BGContrast: half the factors shrink, half grow, whatever the range's asymmetry
                let below = h.values.iter().filter(|&&v| v < 1.0).count() as u64;
                report.proportion(
                    &format!("{name} {t} value below 1"),
                    (u(&e["below_one"]), u(&e["channels"])),
                    (below, entries.len() as u64),
                );
            }
        }
        if t.starts_with("gamma") {
            let count = |pick: fn(&ChannelDraw) -> bool| entries.iter().filter(|e| pick(e)).count() as u64;
            let total = entries.len() as u64;
            report.proportion(
                &format!("{name} {t} inverted"),
                (u(&e["inverted"]), u(&e["channels"])),
                (count(|e| e.invert), total),
            );
            report.proportion(
                &format!("{name} {t} stats retained"),
                (u(&e["retained"]), u(&e["channels"])),
                (count(|e| e.retain_stats), total),
            );
        }
    }

    let mirror = &expected["mirror"];
    let flipped = mirror["flipped"].as_object().unwrap();
    report.exact(
        &format!("{name} mirror axes considered"),
        flipped
            .keys()
            .map(|k| k.parse::<usize>().unwrap())
            .collect::<Vec<_>>(),
        (0..3).filter(|&ax| a.flipped[ax] > 0).collect::<Vec<_>>(),
    );
    for (axis, k) in flipped {
        let ax: usize = axis.parse().unwrap();
        report.proportion(
            &format!("{name} mirror axis {ax} p"),
            (u(k), u(&mirror["n"])),
            (a.flipped[ax], n),
        );
    }
}

#[test]
fn training_batches_match_nnunet_statistically() {
    let path = fixtures().join("expected.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("expected.json"))
        .expect("expected.json is JSON");
    let mut report = Report::default();

    // nnUNetDataLoader._oversample_last_XX_percent over batch sizes and percentages
    let table = expected["oversample_table"].as_array().unwrap();
    let mut differing: Vec<String> = Vec::new();
    for row in table {
        let batch_size = u(&row["batch_size"]) as usize;
        let percent = f(&row["percent"]);
        let sampler = PatchSampler {
            cases: Vec::new(),
            crop_size: [1; 3],
            patch_size: [1; 3],
            batch_size,
            oversample_foreground: percent,
            has_ignore_label: false,
        };
        let ours: Vec<bool> = (0..batch_size).map(|j| sampler.force_foreground(j)).collect();
        let theirs: Vec<bool> = row["forced"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        if ours != theirs {
            differing.push(format!(
                "batch {batch_size} oversample {percent}: {theirs:?} vs {ours:?}"
            ));
        }
    }
    report.exact(
        &format!(
            "forced slots differing, of {} (batch size, percent) pairs",
            table.len()
        ),
        Vec::<String>::new(),
        differing,
    );

    let ids: Vec<String> = expected["cases"].as_object().unwrap().keys().cloned().collect();
    for config in expected["configs"].as_array().unwrap() {
        compare_config(&mut report, config, &ids);
    }
    println!("{}", report.lines);
    assert!(
        report.failures.is_empty(),
        "{} statistics differ from nnU-Net's:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}

/// The observation hook reports the parameters `apply` uses: same stream, same draw functions.
#[test]
fn draw_reports_what_apply_uses() {
    use ndarray::Array4;
    use nnflow::augment::mirror::flip;
    use nnflow::augment::Sample;

    let pipeline = Pipeline::from_json(r#"[{"name": "brightness", "p": 0.5}, {"name": "mirror"}]"#).unwrap();
    let sample = Sample {
        data: Array4::from_shape_fn((2, 3, 4, 5), |(c, z, y, x)| {
            (1 + c * 60 + z * 20 + y * 5 + x) as f32
        }),
        seg: Array4::from_shape_fn((1, 3, 4, 5), |(_, z, y, x)| (z * 20 + y * 5 + x) as i16),
    };
    for index in 0..32 {
        let rng = SampleRng::new(3, 0, index);
        let mut expected = sample.clone();
        for drawn in pipeline.draw(CHANNELS, &rng) {
            match drawn.params {
                Some(TransformDraw::Brightness(factors)) => {
                    for (c, m) in factors {
                        expected
                            .data
                            .index_axis_mut(ndarray::Axis(0), c)
                            .mapv_inplace(|v| v * m as f32);
                    }
                }
                Some(TransformDraw::Mirror(axes)) => flip(&mut expected, &axes),
                None => assert!(!drawn.fired, "{}", drawn.name),
                Some(other) => panic!("{other:?}"),
            }
        }
        let out = pipeline.apply(sample.clone(), &rng).unwrap();
        assert_eq!(
            out.data,
            expected.data.as_standard_layout().into_owned(),
            "{index}"
        );
        assert_eq!(out.seg, expected.seg.as_standard_layout().into_owned(), "{index}");
    }
}
