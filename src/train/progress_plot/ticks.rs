//! Axis ranges and ticks, approximating matplotlib's autoscaling (5 % margins) and MaxNLocator,
//! which plotters has no stock option for.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};

/// matplotlib autoscale: data limits widened by 5 % of their span on each side; a degenerate span
/// is widened around the value first. `None` when there is no finite value.
pub(super) fn autoscale(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()).max(1e-300) {
        let half = if lo == 0.0 { 0.05 } else { 0.05 * lo.abs() };
        lo -= half;
        hi += half;
    }
    let margin = 0.05 * (hi - lo);
    Some((lo - margin, hi + margin))
}

/// "Nice" tick positions inside [lo, hi]: steps 1, 2, 2.5, 5 x 10^k, at most `max_bins` intervals
/// (matplotlib's default locator uses up to 9 bins on large axes). `integer` restricts steps to
/// whole numbers (epochs). Returns the ticks and the step.
pub(super) fn nice_ticks(lo: f64, hi: f64, max_bins: usize, integer: bool) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / max_bins as f64;
    let mut magnitude = 10f64.powf(raw.log10().floor());
    let mut step = f64::NAN;
    'search: for _ in 0..3 {
        for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
            let s = m * magnitude;
            if integer && (s < 1.0 || s.fract() != 0.0) {
                continue;
            }
            if s >= raw * (1.0 - 1e-9) {
                step = s;
                break 'search;
            }
        }
        magnitude *= 10.0;
    }
    if !step.is_finite() {
        step = if integer { raw.ceil().max(1.0) } else { raw };
    }
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    let ticks = (first..=last).map(|i| i as f64 * step).collect();
    (ticks, step)
}

/// Tick label with as many decimals as the step needs ("0.010", "0.2", "120").
pub(super) fn tick_label(value: f64, step: f64) -> String {
    let mut decimals = 0usize;
    while decimals < 12 {
        let scaled = step * 10f64.powi(decimals as i32);
        if (scaled - scaled.round()).abs() < 1e-6 * scaled.abs().max(1.0) {
            break;
        }
        decimals += 1;
    }
    let v = if value.abs() < step * 1e-6 { 0.0 } else { value };
    format!("{v:.decimals$}")
}

/// One axis of a panel: its limits and ticks.
pub(super) struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub ticks: Vec<f64>,
    pub step: f64,
}

impl Axis {
    pub fn new((lo, hi): (f64, f64), integer: bool) -> Self {
        let (ticks, step) = nice_ticks(lo, hi, 9, integer);
        Axis { lo, hi, ticks, step }
    }
    pub fn labels(&self) -> Vec<String> {
        self.ticks.iter().map(|&t| tick_label(t, self.step)).collect()
    }
    pub fn coord(&self) -> TickedRange {
        TickedRange {
            lo: self.lo,
            hi: self.hi,
            ticks: self.ticks.clone(),
        }
    }
}

/// A linear f64 axis whose grid lines and labels sit exactly at the given ticks. plotters' own
/// f64 axis only steps 1-2-5 (no 2.5, no whole-epoch steps), and its `with_key_points` wrapper
/// drops the label formatter that `configure_mesh` requires, so the ticks come in through this
/// small [`Ranged`] implementation (the labels through `*_label_formatter`).
#[derive(Clone)]
pub(super) struct TickedRange {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickedRange {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = (value - self.lo) / (self.hi - self.lo);
        let pixel = limit.0 as f64 + fraction * (limit.1 - limit.0) as f64;
        if pixel.is_finite() {
            pixel.round().clamp(-1e6, 1e6) as i32
        } else {
            (limit.0 + limit.1) / 2
        }
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}
