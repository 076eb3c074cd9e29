//! The training progress figure, `progress.png`, drawn as nnU-Net v2 draws it in
//! `LocalLogger.plot_progress_png` (nnunetv2/training/logging/nnunet_logger.py).
//!
//! Three stacked panels sharing the epoch x axis:
//! 1. `loss_tr` (blue) and `loss_val` (red) on the left axis; `pseudo dice` (green, dotted, the
//!    mean foreground Dice of the epoch) and `pseudo dice (mov. avg.)` (green, solid, the EMA) on a
//!    twin right axis;
//! 2. `epoch duration` in seconds (blue), y axis starting at 0;
//! 3. `learning rate` (blue).
//!
//! Each panel has its legend just above its top left corner, as nnU-Net places it with
//! `legend(loc=(0, 1))` (and `loc=(0.2, 1)` for the Dice legend). Colours and the grey "darkgrid"
//! look are seaborn's: nnU-Net calls `sns.set(font_scale=2.5)`, which also remaps matplotlib's
//! `'b'`, `'r'`, `'g'` to seaborn's "deep" palette (#4C72B0, #C44E52, #55A868).
//!
//! Size: nnU-Net draws 30 x 54 inches at 100 dpi, 3000 x 5400 px. This draws the same layout at
//! half that linear scale, 1500 x 2700 px (fonts and line widths scaled likewise): the figure is
//! re-rendered after every epoch, and a quarter of the pixels keeps that cheap (tens of ms, a PNG of
//! a few hundred KB instead of a few MB) while staying easily readable.
//!
//! Lines, grid and legend boxes are drawn with plotters' bitmap backend; text is laid out and
//! rasterised with `ab_glyph` from a bundled DejaVu Sans subset (`assets/fonts/`, embedded with
//! `include_bytes!`), so nothing depends on system fonts, fontconfig or freetype. (plotters'
//! own `ab_glyph` text path misplaces glyphs; see the Text section.)
//!
//! Missing values: non-finite values (NaN, inf) are skipped. As matplotlib does with NaN, a line is
//! broken at them; unlike matplotlib, a point with no finite neighbour is drawn as a small dot, so
//! that a single epoch (or an isolated value) is visible at all.

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, Glyph, PxScale, ScaleFont};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// What the progress figure needs from one finished epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochLog {
    /// Epoch index (nnU-Net counts from 0); the x coordinate.
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    /// Pseudo Dice per foreground class or region; NaN entries (class absent) are ignored in the
    /// mean, as nnU-Net's `np.nanmean`.
    pub pseudo_dice: Vec<f64>,
    /// nnU-Net's `ema_fg_dice`: `0.9 * previous + 0.1 * mean_pseudo_dice` (the first epoch's mean
    /// for epoch 0), as computed by the trainer.
    pub ema_pseudo_dice: f64,
    pub learning_rate: f64,
    /// Wall time of the epoch (nnU-Net: end timestamp minus start timestamp).
    pub epoch_seconds: f64,
}

impl EpochLog {
    /// nnU-Net's `mean_fg_dice`: the mean over classes of the finite per-class pseudo Dice values,
    /// NaN when there are none.
    pub fn mean_pseudo_dice(&self) -> f64 {
        let finite: Vec<f64> = self
            .pseudo_dice
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        if finite.is_empty() {
            f64::NAN
        } else {
            finite.iter().sum::<f64>() / finite.len() as f64
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to plot; the destination is left untouched.
    #[error("no epochs to plot")]
    NoEpochs,
    #[error("rendering the progress plot failed: {0}")]
    Render(String),
    #[error("encoding the progress plot as PNG failed: {0}")]
    Encode(#[from] png::EncodingError),
    #[error("writing the progress plot failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Figure size in pixels: nnU-Net's 3000 x 5400 (30 x 54 in at 100 dpi) at half scale.
pub const WIDTH: u32 = 1500;
pub const HEIGHT: u32 = 2700;

/// Renders the progress figure for `logs` (in the order given; nnU-Net passes epochs 0..=current)
/// and writes it to `path` as a PNG, atomically (temporary file in the same folder, then rename).
/// Empty `logs` is an error and leaves `path` untouched. The message names `path`; see
/// [`try_plot_progress`] for the typed error.
pub fn plot_progress(logs: &[EpochLog], path: &Path) -> Result<(), String> {
    try_plot_progress(logs, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`plot_progress`] with a typed error; empty `logs` gives [`PlotError::NoEpochs`].
pub fn try_plot_progress(logs: &[EpochLog], path: &Path) -> Result<(), PlotError> {
    let png = render_progress_png(logs)?;
    crate::atomic_file::write_atomically(path, &png)?;
    Ok(())
}

/// Renders the progress figure and returns the encoded PNG.
pub fn render_progress_png(logs: &[EpochLog]) -> Result<Vec<u8>, PlotError> {
    if logs.is_empty() {
        return Err(PlotError::NoEpochs);
    }
    let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    draw_figure(logs, &mut rgb).map_err(|e| PlotError::Render(e.to_string()))?;
    encode_png(&rgb, WIDTH, HEIGHT)
}

// ---------------------------------------------------------------------------------------------
// Style: seaborn "darkgrid" with font_scale=2.5, at half of nnU-Net's pixel size.

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// Pixels per typographic point: 100 dpi / 72, at half scale.
const PX_PER_PT: f64 = 100.0 / 72.0 * 0.5;

fn px(points: f64) -> f64 {
    points * PX_PER_PT
}
fn line_width(points: f64) -> u32 {
    px(points).round().max(1.0) as u32
}

/// seaborn font_scale=2.5: axis labels 12 * 2.5 = 30 pt, tick labels and legend 11 * 2.5 = 27.5 pt.
const LABEL_PT: f64 = 30.0;
const TICK_PT: f64 = 27.5;
/// Tick length 6 pt + pad 3.5 pt between axes and tick labels (the ticks themselves are hidden in
/// darkgrid, but still take their room); axis label pad 4 pt.
const TICK_PAD_PT: f64 = 6.0 + 3.5;
const LABEL_PAD_PT: f64 = 4.0;

const BLUE_DEEP: RGBColor = RGBColor(0x4c, 0x72, 0xb0); // 'b'
const RED_DEEP: RGBColor = RGBColor(0xc4, 0x4e, 0x52); // 'r'
const GREEN_DEEP: RGBColor = RGBColor(0x55, 0xa8, 0x68); // 'g'
const AXES_FACE: RGBColor = RGBColor(0xea, 0xea, 0xf2); // darkgrid axes.facecolor
const TEXT: RGBColor = RGBColor(0x26, 0x26, 0x26); // text.color ".15"
/// Legend frame: axes face colour at framealpha 0.8 over white, with a "0.8" grey edge.
const LEGEND_FACE: RGBColor = RGBColor(0xee, 0xee, 0xf5);
const LEGEND_EDGE: RGBColor = RGBColor(0xcc, 0xcc, 0xcc);

/// How a series is stroked (matplotlib `ls`).
#[derive(Clone, Copy)]
enum Stroke {
    Solid,
    Dotted,
}

struct Series {
    label: &'static str,
    color: RGBColor,
    stroke: Stroke,
    width_pt: f64,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn new(
        label: &'static str,
        color: RGBColor,
        stroke: Stroke,
        width_pt: f64,
        logs: &[EpochLog],
        f: impl Fn(&EpochLog) -> f64,
    ) -> Self {
        Series {
            label,
            color,
            stroke,
            width_pt,
            points: logs.iter().map(|l| (l.epoch as f64, f(l))).collect(),
        }
    }

    fn finite_y(&self) -> impl Iterator<Item = f64> + '_ {
        self.points.iter().map(|p| p.1).filter(|y| y.is_finite())
    }

    /// Runs of consecutive finite points: matplotlib breaks a line at NaN.
    fn segments(&self) -> Vec<Vec<(f64, f64)>> {
        let mut out = Vec::new();
        let mut current = Vec::new();
        for &(x, y) in &self.points {
            if x.is_finite() && y.is_finite() {
                current.push((x, y));
            } else if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            out.push(current);
        }
        out
    }

    fn style(&self) -> ShapeStyle {
        self.color.stroke_width(line_width(self.width_pt))
    }
}

// ---------------------------------------------------------------------------------------------
// Text. plotters 0.3.7's own ab_glyph text path drops each glyph's left side bearing and rounds
// every glyph's vertical offset separately (letters collide, "140" reads "1 40", baselines
// jitter), so text is laid out and rasterised here with ab_glyph directly, on top of the finished
// plotters drawing.

struct Typeface {
    font: FontRef<'static>,
    /// ab_glyph scales so that ascent - descent == the requested px; this converts from em.
    height_per_em: f32,
    cap_height_per_em: f32,
}

impl Typeface {
    fn get() -> Result<&'static Typeface, String> {
        static FACE: OnceLock<Option<Typeface>> = OnceLock::new();
        FACE.get_or_init(|| {
            let font = FontRef::try_from_slice(FONT_BYTES).ok()?;
            let units = font.units_per_em()?;
            let cap = font
                .outline(font.glyph_id('H'))
                .map_or(0.73 * units, |o| (o.bounds.max.y - o.bounds.min.y).abs());
            Some(Typeface {
                height_per_em: font.height_unscaled() / units,
                cap_height_per_em: cap / units,
                font,
            })
        })
        .as_ref()
        .ok_or_else(|| "the bundled DejaVu Sans font could not be parsed".to_string())
    }

    fn scale(&self, points: f64) -> PxScale {
        PxScale::from(px(points) as f32 * self.height_per_em)
    }

    fn cap_height(&self, points: f64) -> f64 {
        px(points) * self.cap_height_per_em as f64
    }

    /// Glyphs of `text` with the baseline start at `origin`, and the advance width.
    fn layout(&self, text: &str, points: f64, origin: (f32, f32)) -> (Vec<Glyph>, f64) {
        let scaled = self.font.as_scaled(self.scale(points));
        let mut caret = 0.0f32;
        let mut previous = None;
        let mut glyphs = Vec::with_capacity(text.len());
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = previous {
                caret += scaled.kern(p, id);
            }
            glyphs.push(id.with_scale_and_position(scaled.scale(), point(origin.0 + caret, origin.1)));
            caret += scaled.h_advance(id);
            previous = Some(id);
        }
        (glyphs, caret as f64)
    }

    fn width(&self, text: &str, points: f64) -> f64 {
        self.layout(text, points, (0.0, 0.0)).1
    }
}

#[derive(Clone, Copy)]
enum HAlign {
    Left,
    Center,
    Right,
}

#[derive(Clone, Copy)]
enum VAlign {
    /// Capital letters' tops at y.
    Top,
    /// Capital letters centred on y.
    Center,
}

/// A piece of text to draw once the plotters drawing is finished.
struct Label {
    text: String,
    points: f64,
    at: (f64, f64),
    h: HAlign,
    v: VAlign,
    /// Rotated 90 degrees counter-clockwise (reads bottom to top), centred on `at`.
    vertical: bool,
}

impl Label {
    fn new(text: impl Into<String>, points: f64, at: (f64, f64), h: HAlign, v: VAlign) -> Self {
        Label {
            text: text.into(),
            points,
            at,
            h,
            v,
            vertical: false,
        }
    }
    fn vertical(text: impl Into<String>, points: f64, at: (f64, f64)) -> Self {
        Label {
            text: text.into(),
            points,
            at,
            h: HAlign::Center,
            v: VAlign::Center,
            vertical: true,
        }
    }
}

fn blend(rgb: &mut [u8], (width, height): (u32, u32), x: i64, y: i64, color: RGBColor, coverage: f32) {
    if x < 0 || y < 0 || x >= width as i64 || y >= height as i64 || coverage <= 0.0 {
        return;
    }
    let a = coverage.min(1.0);
    let i = (y as usize * width as usize + x as usize) * 3;
    for (k, c) in [color.0, color.1, color.2].into_iter().enumerate() {
        rgb[i + k] = (rgb[i + k] as f32 * (1.0 - a) + c as f32 * a).round() as u8;
    }
}

fn draw_labels(face: &Typeface, rgb: &mut [u8], size: (u32, u32), labels: &[Label]) {
    for label in labels {
        let width = face.width(&label.text, label.points);
        let cap = face.cap_height(label.points);
        if !label.vertical {
            let x = match label.h {
                HAlign::Left => label.at.0,
                HAlign::Center => label.at.0 - width / 2.0,
                HAlign::Right => label.at.0 - width,
            };
            let baseline = match label.v {
                VAlign::Top => label.at.1 + cap,
                VAlign::Center => label.at.1 + cap / 2.0,
            };
            let (glyphs, _) = face.layout(&label.text, label.points, (x as f32, baseline.round() as f32));
            for glyph in glyphs {
                if let Some(outline) = face.font.outline_glyph(glyph) {
                    let b = outline.px_bounds();
                    outline.draw(|gx, gy, c| {
                        blend(
                            rgb,
                            size,
                            b.min.x as i64 + gx as i64,
                            b.min.y as i64 + gy as i64,
                            TEXT,
                            c,
                        )
                    });
                }
            }
        } else {
            // Lay out horizontally around the origin, then map text space (tx right along the
            // baseline, ty down) to the screen turned a quarter counter-clockwise.
            let (glyphs, _) = face.layout(&label.text, label.points, (0.0, 0.0));
            let (cx, cy) = (label.at.0.round() as i64, label.at.1.round() as i64);
            let (half_w, half_cap) = ((width / 2.0).round() as i64, (cap / 2.0).round() as i64);
            for glyph in glyphs {
                if let Some(outline) = face.font.outline_glyph(glyph) {
                    let b = outline.px_bounds();
                    outline.draw(|gx, gy, c| {
                        let tx = b.min.x as i64 + gx as i64;
                        let ty = b.min.y as i64 + gy as i64;
                        blend(rgb, size, cx + ty + half_cap, cy - (tx - half_w), TEXT, c)
                    });
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Axis ranges and ticks, approximating matplotlib's autoscaling (5 % margins) and MaxNLocator.

/// matplotlib autoscale: data limits widened by 5 % of their span on each side; a degenerate span
/// is widened around the value first. `None` when there is no finite value.
fn autoscale(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
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
fn nice_ticks(lo: f64, hi: f64, max_bins: usize, integer: bool) -> (Vec<f64>, f64) {
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
fn tick_label(value: f64, step: f64) -> String {
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

struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    fn new((lo, hi): (f64, f64), integer: bool) -> Self {
        let (ticks, step) = nice_ticks(lo, hi, 9, integer);
        Axis { lo, hi, ticks, step }
    }
    fn labels(&self) -> Vec<String> {
        self.ticks.iter().map(|&t| tick_label(t, self.step)).collect()
    }
    fn coord(&self) -> TickedRange {
        TickedRange {
            lo: self.lo,
            hi: self.hi,
            ticks: self.ticks.clone(),
        }
    }
}

/// A linear f64 axis whose grid lines and labels sit exactly at the given ticks (plotters' own
/// f64 axis picks its own, and its `with_key_points` wrapper loses the label formatter).
#[derive(Clone)]
struct TickedRange {
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

// ---------------------------------------------------------------------------------------------
// Drawing.

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

fn draw_figure(logs: &[EpochLog], rgb: &mut [u8]) -> DrawResult<()> {
    let face = Typeface::get()?;
    let x = Axis::new(
        autoscale(logs.iter().map(|l| l.epoch as f64)).unwrap_or((-1.0, 1.0)),
        true,
    );

    // (1) losses and pseudo Dice.
    let losses = [
        Series::new("loss_tr", BLUE_DEEP, Stroke::Solid, 4.0, logs, |l| l.train_loss),
        Series::new("loss_val", RED_DEEP, Stroke::Solid, 4.0, logs, |l| l.val_loss),
    ];
    let dice = [
        Series::new("pseudo dice", GREEN_DEEP, Stroke::Dotted, 3.0, logs, |l| {
            l.mean_pseudo_dice()
        }),
        Series::new(
            "pseudo dice (mov. avg.)",
            GREEN_DEEP,
            Stroke::Solid,
            4.0,
            logs,
            |l| l.ema_pseudo_dice,
        ),
    ];
    let y_loss = Axis::new(
        autoscale(losses.iter().flat_map(|s| s.finite_y())).unwrap_or((0.0, 1.0)),
        false,
    );
    let y_dice = Axis::new(
        autoscale(dice.iter().flat_map(|s| s.finite_y())).unwrap_or((0.0, 1.0)),
        false,
    );

    // (2) epoch duration; nnU-Net pins the bottom of this axis at 0.
    let durations = [Series::new(
        "epoch duration",
        BLUE_DEEP,
        Stroke::Solid,
        4.0,
        logs,
        |l| l.epoch_seconds,
    )];
    let top = autoscale(durations[0].finite_y())
        .map(|(_, hi)| hi)
        .filter(|hi| *hi > 0.0)
        .unwrap_or(1.0);
    let y_time = Axis::new((0.0, top), false);

    // (3) learning rate.
    let lrs = [Series::new(
        "learning rate",
        BLUE_DEEP,
        Stroke::Solid,
        4.0,
        logs,
        |l| l.learning_rate,
    )];
    let y_lr = Axis::new(autoscale(lrs[0].finite_y()).unwrap_or((0.0, 1.0)), false);

    let mut labels = Vec::new();
    {
        let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((3, 1));
        let twin = Twin {
            axis: &y_dice,
            desc: "pseudo dice",
            series: &dice,
        };
        draw_panel(
            face,
            &root,
            &panels[0],
            &x,
            &y_loss,
            "loss",
            &losses,
            Some(twin),
            &mut labels,
        )?;
        draw_panel(
            face,
            &root,
            &panels[1],
            &x,
            &y_time,
            "time [s]",
            &durations,
            None,
            &mut labels,
        )?;
        draw_panel(
            face,
            &root,
            &panels[2],
            &x,
            &y_lr,
            "learning rate",
            &lrs,
            None,
            &mut labels,
        )?;
        root.present()?;
    }
    draw_labels(face, rgb, (WIDTH, HEIGHT), &labels);
    Ok(())
}

/// The right-hand axis of the first panel (matplotlib `twinx`).
struct Twin<'a> {
    axis: &'a Axis,
    desc: &'static str,
    series: &'a [Series],
}

fn max_width(face: &Typeface, texts: &[String], points: f64) -> f64 {
    texts.iter().map(|t| face.width(t, points)).fold(0.0, f64::max)
}

#[allow(clippy::too_many_arguments)]
fn draw_panel(
    face: &Typeface,
    root: &Area,
    area: &Area,
    x: &Axis,
    y: &Axis,
    y_desc: &str,
    series: &[Series],
    twin: Option<Twin>,
    labels: &mut Vec<Label>,
) -> DrawResult<()> {
    let pad = px(TICK_PAD_PT);
    let label_pad = px(LABEL_PAD_PT);
    let label_em = px(LABEL_PT);
    let tick_cap = face.cap_height(TICK_PT);
    let gap = px(LABEL_PT) * 0.5;
    let legend = LegendMetrics::new();
    let legend_rows = series.len().max(twin.as_ref().map_or(0, |t| t.series.len()));

    let y_labels = y.labels();
    let y_label_width = max_width(face, &y_labels, TICK_PT);
    let left = pad + y_label_width + label_pad + label_em + gap;
    let (right, twin_labels, twin_label_width) = match &twin {
        Some(t) => {
            let l = t.axis.labels();
            let w = max_width(face, &l, TICK_PT);
            (pad + w + label_pad + label_em + gap, l, w)
        }
        None => (2.0 * gap, Vec::new(), 0.0),
    };
    let bottom = pad + tick_cap + 2.0 * label_pad + label_em * 1.2 + gap;

    let chart = ChartBuilder::on(area)
        .margin_top(legend.height(legend_rows) as u32 + gap as u32)
        .margin_left(gap as u32)
        .margin_bottom(0)
        .x_label_area_size(bottom as u32)
        .y_label_area_size(left as u32)
        .right_y_label_area_size(right as u32)
        .build_cartesian_2d(x.coord(), y.coord())?;
    let (px_x, px_y) = chart.plotting_area().get_pixel_range();
    let secondary = match &twin {
        Some(t) => t.axis.coord(),
        None => y.coord(),
    };
    let mut chart = chart.set_secondary_coord(x.coord(), secondary);

    // darkgrid: grey face, white grid lines at the major ticks of the left/bottom axes.
    chart.plotting_area().fill(&AXES_FACE)?;
    let grid = WHITE.stroke_width(line_width(1.0));
    chart.draw_series(
        x.ticks
            .iter()
            .map(|&t| PathElement::new(vec![(t, y.lo), (t, y.hi)], grid)),
    )?;
    chart.draw_series(
        y.ticks
            .iter()
            .map(|&t| PathElement::new(vec![(x.lo, t), (x.hi, t)], grid)),
    )?;

    for s in series {
        draw_series(&mut chart, s, false)?;
    }
    if let Some(t) = &twin {
        for s in t.series {
            draw_series(&mut chart, s, true)?;
        }
    }

    // Tick labels and axis labels.
    let (plot_left, plot_right) = (px_x.start as f64, px_x.end as f64);
    let (plot_top, plot_bottom) = (px_y.start as f64, px_y.end as f64);
    for (&t, text) in x.ticks.iter().zip(x.labels()) {
        let at = (chart.backend_coord(&(t, y.lo)).0 as f64, plot_bottom + pad);
        labels.push(Label::new(text, TICK_PT, at, HAlign::Center, VAlign::Top));
    }
    let x_desc_at = (
        (plot_left + plot_right) / 2.0,
        plot_bottom + pad + tick_cap + 2.0 * label_pad + 0.2 * label_em,
    );
    labels.push(Label::new(
        "epoch",
        LABEL_PT,
        x_desc_at,
        HAlign::Center,
        VAlign::Top,
    ));
    for (&t, text) in y.ticks.iter().zip(y_labels) {
        let at = (plot_left - pad, chart.backend_coord(&(x.lo, t)).1 as f64);
        labels.push(Label::new(text, TICK_PT, at, HAlign::Right, VAlign::Center));
    }
    let middle = (plot_top + plot_bottom) / 2.0;
    let y_desc_x = plot_left - pad - y_label_width - label_pad - label_em / 2.0;
    labels.push(Label::vertical(y_desc, LABEL_PT, (y_desc_x, middle)));
    if let Some(t) = &twin {
        let secondary = chart.borrow_secondary();
        for (&v, text) in t.axis.ticks.iter().zip(twin_labels) {
            let at = (plot_right + pad, secondary.backend_coord(&(x.lo, v)).1 as f64);
            labels.push(Label::new(text, TICK_PT, at, HAlign::Left, VAlign::Center));
        }
        let desc_x = plot_right + pad + twin_label_width + label_pad + label_em / 2.0;
        labels.push(Label::vertical(t.desc, LABEL_PT, (desc_x, middle)));
    }

    // Legends sit on top of the axes, left edges at 0 and (for the twin axis) 0.2 of the axes
    // width, like matplotlib's legend(loc=(0, 1)) and legend(loc=(0.2, 1)).
    let primary_width = legend.width(face, series);
    draw_legend(face, root, (plot_left, plot_top), series, labels)?;
    if let Some(t) = &twin {
        let x0 = plot_left + (0.2 * (plot_right - plot_left)).max(primary_width + gap);
        draw_legend(face, root, (x0, plot_top), t.series, labels)?;
    }
    Ok(())
}

type Chart<'a, 'b> = plotters::chart::DualCoordChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<TickedRange, TickedRange>,
    Cartesian2d<TickedRange, TickedRange>,
>;

/// Dotted as matplotlib's "dotted" with butt caps: dashes one line width long, gaps 1.65 widths.
fn dotted<C: Clone>(points: Vec<C>, s: &Series) -> DashedPathElement<std::vec::IntoIter<C>, f64> {
    let w = px(s.width_pt);
    DashedPathElement::new(points, w.max(1.0), (1.65 * w).max(1.0), s.style())
}

fn draw_series(chart: &mut Chart, s: &Series, secondary: bool) -> DrawResult<()> {
    for segment in s.segments() {
        if segment.len() == 1 {
            let dot = std::iter::once(Circle::new(
                segment[0],
                line_width(s.width_pt) + 1,
                s.color.filled(),
            ));
            if secondary {
                chart.draw_secondary_series(dot)?;
            } else {
                chart.draw_series(dot)?;
            }
            continue;
        }
        match (s.stroke, secondary) {
            (Stroke::Solid, false) => chart.draw_series(LineSeries::new(segment, s.style()))?,
            (Stroke::Solid, true) => chart.draw_secondary_series(LineSeries::new(segment, s.style()))?,
            (Stroke::Dotted, false) => chart.draw_series(std::iter::once(dotted(segment, s)))?,
            (Stroke::Dotted, true) => chart.draw_secondary_series(std::iter::once(dotted(segment, s)))?,
        };
    }
    Ok(())
}

/// matplotlib legend geometry in units of the legend font size: 0.4 border padding, handle 2.0
/// long and 0.8 from its text, rows 0.5 apart.
struct LegendMetrics {
    em: f64,
}

impl LegendMetrics {
    fn new() -> Self {
        LegendMetrics { em: px(TICK_PT) }
    }
    fn row(&self) -> f64 {
        1.5 * self.em
    }
    fn height(&self, rows: usize) -> f64 {
        (2.0 * 0.4 + 1.0) * self.em + self.row() * (rows.max(1) - 1) as f64 + 0.3 * self.em
    }
    fn width(&self, face: &Typeface, series: &[Series]) -> f64 {
        let text = series
            .iter()
            .map(|s| face.width(s.label, TICK_PT))
            .fold(0.0, f64::max);
        text + (0.4 + 2.0 + 0.8 + 0.4) * self.em
    }
}

/// Draws a legend box whose bottom left corner is `bottom_left` (pixels of `root`); its texts go
/// to `labels`.
fn draw_legend(
    face: &Typeface,
    root: &Area,
    bottom_left: (f64, f64),
    series: &[Series],
    labels: &mut Vec<Label>,
) -> DrawResult<()> {
    let m = LegendMetrics::new();
    let (x0, y1) = (bottom_left.0.round() as i32, bottom_left.1.round() as i32);
    let y0 = y1 - m.height(series.len()).round() as i32;
    let x1 = x0 + m.width(face, series).round() as i32;
    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], LEGEND_FACE.filled()))?;
    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], LEGEND_EDGE.stroke_width(1)))?;
    for (i, s) in series.iter().enumerate() {
        let cy = y0 as f64 + (0.4 + 0.65) * m.em + m.row() * i as f64;
        let hx0 = x0 as f64 + 0.4 * m.em;
        let hx1 = hx0 + 2.0 * m.em;
        let handle = vec![
            (hx0.round() as i32, cy.round() as i32),
            (hx1.round() as i32, cy.round() as i32),
        ];
        match s.stroke {
            Stroke::Solid => root.draw(&PathElement::new(handle, s.style()))?,
            Stroke::Dotted => root.draw(&dotted(handle, s))?,
        }
        labels.push(Label::new(
            s.label,
            TICK_PT,
            (hx1 + 0.8 * m.em, cy),
            HAlign::Left,
            VAlign::Center,
        ));
    }
    Ok(())
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, PlotError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(n: usize) -> Vec<EpochLog> {
        let mut ema = f64::NAN;
        (0..n)
            .map(|e| {
                let t = e as f64;
                let dice = vec![
                    0.9 * (1.0 - (-t / 8.0).exp()) + 0.03 * (2.0 * t).sin(),
                    0.7 * (1.0 - (-t / 15.0).exp()) + 0.05 * t.cos(),
                ];
                let mean = (dice[0] + dice[1]) / 2.0;
                ema = if e == 0 { mean } else { 0.9 * ema + 0.1 * mean };
                EpochLog {
                    epoch: e,
                    train_loss: 0.2 - 0.9 * (1.0 - (-t / 10.0).exp()) + 0.02 * t.sin(),
                    val_loss: 0.1 - 0.8 * (1.0 - (-t / 12.0).exp()) + 0.04 * (1.3 * t).cos(),
                    pseudo_dice: dice,
                    ema_pseudo_dice: ema,
                    learning_rate: 0.01 * (1.0 - t / n as f64).powf(0.9),
                    epoch_seconds: 120.0 + 10.0 * (t / 3.0).sin() + if e == 20 { 30.0 } else { 0.0 },
                }
            })
            .collect()
    }

    /// Width and height from the IHDR chunk, after checking the PNG signature.
    fn png_dimensions(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 24, "PNG too short");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    /// Decodes the PNG fully (checks it is well formed) and returns its RGB pixels.
    fn decode(bytes: &[u8]) -> Vec<u8> {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("PNG data");
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        buf
    }

    fn count_color(rgb: &[u8], c: RGBColor) -> usize {
        rgb.chunks_exact(3)
            .filter(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2)
            .count()
    }

    fn check_file(path: &Path) -> Vec<u8> {
        let bytes = std::fs::read(path).expect("progress.png written");
        assert_eq!(png_dimensions(&bytes), (WIDTH, HEIGHT));
        let rgb = decode(&bytes);
        // All three line colours, the grey axes background and dark text are present.
        for c in [BLUE_DEEP, RED_DEEP, GREEN_DEEP, AXES_FACE, TEXT] {
            assert!(count_color(&rgb, c) > 50, "colour {c:?} missing");
        }
        rgb
    }

    #[test]
    fn renders_3_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        plot_progress(&synthetic(3), &path).unwrap();
        check_file(&path);
        // Only the final file remains: the temporary one was renamed.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("progress.png")]);
    }

    #[test]
    fn renders_50_epochs_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        plot_progress(&synthetic(3), &path).unwrap();
        plot_progress(&synthetic(50), &path).unwrap();
        check_file(&path);
    }

    #[test]
    fn renders_one_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        plot_progress(&synthetic(1), &path).unwrap();
        check_file(&path);
    }

    #[test]
    fn nan_values_do_not_panic() {
        let mut logs = synthetic(20);
        logs[0].val_loss = f64::NAN;
        logs[3].train_loss = f64::INFINITY;
        logs[5].pseudo_dice = vec![f64::NAN, f64::NAN];
        logs[6].pseudo_dice = vec![f64::NAN, 0.5];
        logs[7].ema_pseudo_dice = f64::NAN;
        logs[10].learning_rate = f64::NAN;
        logs[11].epoch_seconds = f64::NAN;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        plot_progress(&logs, &path).unwrap();
        check_file(&path);
        assert!(logs[5].mean_pseudo_dice().is_nan());
        assert_eq!(logs[6].mean_pseudo_dice(), 0.5);

        // Every value NaN: empty axes, still a valid figure.
        let all_nan: Vec<EpochLog> = (0..4)
            .map(|e| EpochLog {
                epoch: e,
                train_loss: f64::NAN,
                val_loss: f64::NAN,
                pseudo_dice: vec![],
                ema_pseudo_dice: f64::NAN,
                learning_rate: f64::NAN,
                epoch_seconds: f64::NAN,
            })
            .collect();
        let png = render_progress_png(&all_nan).unwrap();
        assert_eq!(png_dimensions(&png), (WIDTH, HEIGHT));
    }

    #[test]
    fn empty_logs_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        assert!(matches!(try_plot_progress(&[], &path), Err(PlotError::NoEpochs)));
        assert!(plot_progress(&[], &path).unwrap_err().contains("no epochs"));
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn ticks_and_labels() {
        let (t, s) = nice_ticks(-0.5, 49.5, 9, true);
        assert_eq!(s, 10.0);
        assert_eq!(t, vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        let (t, s) = nice_ticks(-0.1, 2.1, 9, true);
        assert_eq!(s, 1.0);
        assert_eq!(t, vec![0.0, 1.0, 2.0]);
        let (_, s) = nice_ticks(0.0, 0.0105, 9, false);
        assert!((s - 0.002).abs() < 1e-12);
        assert_eq!(tick_label(0.01, 0.002), "0.010");
        assert_eq!(tick_label(-0.0000000001, 0.2), "0.0");
        assert_eq!(tick_label(120.0, 20.0), "120");
        assert_eq!(tick_label(0.25, 0.25), "0.25");
    }

    /// Writes the sample figure to /tmp/progress_sample.png for eyeballing against nnU-Net's.
    #[test]
    #[ignore]
    fn write_sample() {
        plot_progress(&synthetic(50), Path::new("/tmp/progress_sample.png")).unwrap();
        plot_progress(&synthetic(1), Path::new("/tmp/progress_sample_1.png")).unwrap();
        let mut logs = synthetic(20);
        for e in [3, 4, 9] {
            logs[e].val_loss = f64::NAN;
            logs[e].pseudo_dice = vec![f64::NAN];
        }
        logs[12].learning_rate = f64::NAN;
        plot_progress(&logs, Path::new("/tmp/progress_sample_nan.png")).unwrap();
    }
}
