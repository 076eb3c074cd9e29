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
//! re-rendered after every epoch, and a quarter of the pixels keeps that cheap.
//!
//! Everything is drawn with plotters' chart API (mesh, axis labels, secondary axis, series,
//! legends) on its bitmap backend. Text uses plotters' `ab_glyph` font support with a bundled
//! DejaVu Sans subset (`assets/fonts/`, registered from `include_bytes!`), so nothing depends on
//! system fonts, fontconfig or freetype. What stays here is what plotters has no stock option
//! for: matplotlib-like ticks (`ticks.rs`) and correct glyph placement (`text.rs`, a
//! backend that rasterises the text plotters lays out).
//!
//! Missing values: non-finite values (NaN, inf) are skipped. As matplotlib does with NaN, a line is
//! broken at them; unlike matplotlib, a point with no finite neighbour is drawn as a small dot, so
//! that a single epoch (or an isolated value) is visible at all.

mod text;
mod ticks;

use std::path::Path;

use plotters::chart::SeriesLabelPosition;
use plotters::coord::types::RangedCoordf64;
use plotters::element::{DashedPathElement, DynElement, MultiLineText};
use plotters::prelude::*;

use text::{bundled_face, Canvas};
#[cfg(test)]
use ticks::nice_ticks;
use ticks::{autoscale, tick_label, Axis};

use crate::train::TrainError;

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
    Render(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the bundled DejaVu Sans font could not be loaded")]
    Font,
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
/// Empty `logs` is an error and leaves `path` untouched. The error names `path`; see
/// [`try_plot_progress`] for the bare [`PlotError`].
pub fn plot_progress(logs: &[EpochLog], path: &Path) -> Result<(), TrainError> {
    try_plot_progress(logs, path).map_err(|source| TrainError::Plot {
        path: path.to_path_buf(),
        source,
    })
}

/// [`plot_progress`] without the path; empty `logs` gives [`PlotError::NoEpochs`].
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
    draw_figure(logs, &mut rgb).map_err(PlotError::Render)?;
    encode_png(&rgb, WIDTH, HEIGHT)
}

// ---------------------------------------------------------------------------------------------
// Style: seaborn "darkgrid" with font_scale=2.5, at half of nnU-Net's pixel size.

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

/// The text style for `points`. plotters' `ab_glyph` font size is ab_glyph's pixel scale, the
/// font's ascent + descent (DejaVu Sans: 1901 + 483 units of 2048 per em), not the em.
fn font(points: f64) -> TextStyle<'static> {
    let size = px(points) * 2384.0 / 2048.0;
    (FontFamily::SansSerif, size).into_font().color(&TEXT)
}

/// Room for a line of text: the font's ascent + descent. (plotters anchors text by a box
/// `size / 1.24` high, `style/font/ab_glyph.rs`; letters with descenders reach below it.)
fn line_height(points: f64) -> f64 {
    font(points).font.get_size()
}

/// How a series is stroked: colour, width in points, matplotlib `ls` solid or dotted.
#[derive(Clone, Copy)]
struct Pen {
    color: RGBColor,
    width_pt: f64,
    dotted: bool,
}

impl Pen {
    fn solid(color: RGBColor, width_pt: f64) -> Self {
        Pen {
            color,
            width_pt,
            dotted: false,
        }
    }
    fn dotted(color: RGBColor, width_pt: f64) -> Self {
        Pen {
            dotted: true,
            ..Pen::solid(color, width_pt)
        }
    }

    fn style(&self) -> ShapeStyle {
        self.color.stroke_width(line_width(self.width_pt))
    }

    /// A path through `points`; dotted as matplotlib's "dotted" with butt caps: dashes one line
    /// width long, gaps 1.65 widths.
    fn path<'a, DB: DrawingBackend, C: Clone + 'static>(&self, points: Vec<C>) -> DynElement<'a, DB, C> {
        if self.dotted {
            let w = px(self.width_pt);
            DashedPathElement::new(points, w.max(1.0), (1.65 * w).max(1.0), self.style()).into_dyn()
        } else {
            PathElement::new(points, self.style()).into_dyn()
        }
    }
}

struct Series {
    label: &'static str,
    pen: Pen,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn new(label: &'static str, pen: Pen, logs: &[EpochLog], f: impl Fn(&EpochLog) -> f64) -> Self {
        Series {
            label,
            pen,
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

    /// One path per finite run; a run of one point is a dot.
    fn elements<'a, DB: DrawingBackend>(&self) -> Vec<DynElement<'a, DB, (f64, f64)>> {
        let radius = line_width(self.pen.width_pt) + 1;
        self.segments()
            .into_iter()
            .map(|segment| match segment.as_slice() {
                [point] => Circle::new(*point, radius, self.pen.color.filled()).into_dyn(),
                _ => self.pen.path(segment),
            })
            .collect()
    }

    /// Adds the series to `legend`'s legend: an empty series (nothing to draw) that carries the
    /// label and a handle two font sizes long.
    fn legend_entry<'a>(&self, legend: &mut LegendChart<'a, 'a>) -> DrawResult<()> {
        let length = (2.0 * px(TICK_PT)).round() as i32;
        let pen = self.pen;
        legend
            .draw_series(std::iter::empty::<Circle<(f64, f64), u32>>())?
            .label(self.label)
            .legend(move |(x, y)| pen.path(vec![(x, y), (x + length, y)]));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing.

type Area<'a> = DrawingArea<Canvas<'a>, plotters::coord::Shift>;
type DrawResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
type LegendChart<'a, 'b> = ChartContext<'a, Canvas<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn draw_figure(logs: &[EpochLog], rgb: &mut [u8]) -> DrawResult<()> {
    let face = bundled_face()?;
    let x = Axis::new(
        autoscale(logs.iter().map(|l| l.epoch as f64)).unwrap_or((-1.0, 1.0)),
        true,
    );

    // (1) losses and pseudo Dice.
    let losses = [
        Series::new("loss_tr", Pen::solid(BLUE_DEEP, 4.0), logs, |l| l.train_loss),
        Series::new("loss_val", Pen::solid(RED_DEEP, 4.0), logs, |l| l.val_loss),
    ];
    let dice = [
        Series::new("pseudo dice", Pen::dotted(GREEN_DEEP, 3.0), logs, |l| {
            l.mean_pseudo_dice()
        }),
        Series::new(
            "pseudo dice (mov. avg.)",
            Pen::solid(GREEN_DEEP, 4.0),
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
        Pen::solid(BLUE_DEEP, 4.0),
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
        Pen::solid(BLUE_DEEP, 4.0),
        logs,
        |l| l.learning_rate,
    )];
    let y_lr = Axis::new(autoscale(lrs[0].finite_y()).unwrap_or((0.0, 1.0)), false);

    let bitmap = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT));
    let root = Canvas { bitmap, face }.into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let twin = Twin {
        axis: &y_dice,
        desc: "pseudo dice",
        series: &dice,
    };
    draw_panel(&panels[0], &x, &y_loss, "loss", &losses, Some(twin))?;
    draw_panel(&panels[1], &x, &y_time, "time [s]", &durations, None)?;
    draw_panel(&panels[2], &x, &y_lr, "learning rate", &lrs, None)?;
    root.present()?;
    Ok(())
}

/// The right-hand axis of the first panel (matplotlib `twinx`).
struct Twin<'a> {
    axis: &'a Axis,
    desc: &'static str,
    series: &'a [Series],
}

/// matplotlib legend geometry in units of the legend font size: 0.4 border padding, handle 2.0
/// long and 0.8 from its text (plotters' "legend area" holds both).
struct Legend;

impl Legend {
    fn margin() -> i32 {
        (0.4 * px(TICK_PT)).round() as i32
    }
    fn handle_area() -> i32 {
        ((2.0 + 0.8) * px(TICK_PT)).round() as i32
    }
    /// Width and height of the legend box plotters draws for `series`.
    fn size(series: &[Series]) -> DrawResult<(i32, i32)> {
        let style = font(TICK_PT);
        let mut text = MultiLineText::<_, &str>::new((0, 0), &style);
        for s in series {
            text.push_line(s.label);
        }
        let (w, h) = text.estimate_dimension()?;
        Ok((
            w + Self::handle_area() + 2 * Self::margin(),
            h + 2 * Self::margin(),
        ))
    }

    /// Draws a legend box for `series` in `strip`, `x` pixels from its left edge. plotters draws a
    /// chart's legend inside its plotting area (it clips coordinates to it), so legends that sit
    /// above the axes, as matplotlib's `loc=(0, 1)`, get a chart of their own over that strip.
    fn draw(strip: &Area, x: i32, series: &[Series]) -> DrawResult<()> {
        let mut chart = ChartBuilder::on(strip).build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        for s in series {
            s.legend_entry(&mut chart)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::Coordinate(x, 0))
            .margin(Self::margin())
            .legend_area_size(Self::handle_area())
            .label_font(font(TICK_PT))
            .background_style(LEGEND_FACE.filled())
            .border_style(LEGEND_EDGE)
            .draw()?;
        Ok(())
    }
}

fn draw_panel(
    area: &Area,
    x: &Axis,
    y: &Axis,
    y_desc: &str,
    series: &[Series],
    twin: Option<Twin>,
) -> DrawResult<()> {
    let tick_font = font(TICK_PT);
    let desc_font = font(LABEL_PT);
    let pad = px(TICK_PAD_PT);
    let label_pad = px(LABEL_PAD_PT);
    let gap = px(LABEL_PT) * 0.5;
    let max_width = |labels: &[String]| -> DrawResult<f64> {
        let mut w = 0u32;
        for l in labels {
            w = w.max(area.estimate_text_size(l, &tick_font)?.0);
        }
        Ok(w as f64)
    };

    // Label areas: tick labels, a pad, then the axis description at the outer edge (where
    // plotters draws it). plotters puts tick labels twice the tick size from the axis.
    let tick = (pad / 2.0).round() as i32;
    let desc_height = line_height(LABEL_PT);
    let bottom = 2.0 * tick as f64 + line_height(TICK_PT) + label_pad + desc_height;
    let side = |labels: &[String]| -> DrawResult<f64> {
        Ok(2.0 * tick as f64 + max_width(labels)? + label_pad + desc_height)
    };
    let left = side(&y.labels())?;
    let right = match &twin {
        Some(t) => side(&t.axis.labels())?,
        None => gap,
    };
    let (legend_w, mut legend_h) = Legend::size(series)?;
    if let Some(t) = &twin {
        legend_h = legend_h.max(Legend::size(t.series)?.1);
    }

    let secondary = twin.as_ref().map_or(y.coord(), |t| t.axis.coord());
    let mut chart = ChartBuilder::on(area)
        .margin_top(legend_h as f64 + gap)
        .margin_left(gap)
        .margin_right(gap)
        .margin_bottom(gap)
        .x_label_area_size(bottom)
        .y_label_area_size(left)
        .right_y_label_area_size(right)
        .build_cartesian_2d(x.coord(), y.coord())?
        .set_secondary_coord(x.coord(), secondary);

    // darkgrid: grey face, white grid lines at the major ticks, no spines or tick marks.
    chart.plotting_area().fill(&AXES_FACE)?;
    let x_label = |v: &f64| tick_label(*v, x.step);
    let y_label = |v: &f64| tick_label(*v, y.step);
    chart
        .configure_mesh()
        .bold_line_style(WHITE.stroke_width(line_width(1.0)))
        .light_line_style(TRANSPARENT)
        .axis_style(TRANSPARENT)
        .set_all_tick_mark_size(tick)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(tick_font.clone())
        .x_desc("epoch")
        .y_desc(y_desc)
        .axis_desc_style(desc_font.clone())
        .draw()?;
    for s in series {
        chart.draw_series(s.elements())?;
    }
    if let Some(t) = &twin {
        let twin_label = |v: &f64| tick_label(*v, t.axis.step);
        chart
            .configure_secondary_axes()
            .axis_style(TRANSPARENT)
            .set_all_tick_mark_size(tick)
            .y_label_formatter(&twin_label)
            .label_style(tick_font.clone())
            .y_desc(t.desc)
            .axis_desc_style(desc_font.clone())
            .draw()?;
        for s in t.series {
            chart.draw_secondary_series(s.elements())?;
        }
    }

    // Legends sit on top of the axes, left edges at 0 and (for the twin axis) 0.2 of the axes
    // width, like matplotlib's legend(loc=(0, 1)) and legend(loc=(0.2, 1)).
    let (plot_x, plot_y) = chart.plotting_area().get_pixel_range();
    let (base_x, base_y) = area.get_base_pixel();
    let plot_width = plot_x.end - plot_x.start;
    let strip = area.clone().shrink(
        (plot_x.start - base_x, plot_y.start - base_y - legend_h),
        (plot_width, legend_h),
    );
    Legend::draw(&strip, 0, series)?;
    if let Some(t) = &twin {
        let x0 = (0.2 * plot_width as f64).max(legend_w as f64 + gap).round() as i32;
        Legend::draw(&strip, x0, t.series)?;
    }
    Ok(())
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, PlotError> {
    Ok(crate::data::image::rgb_png(rgb, width, height)?)
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

    /// Bounding box (x0, y0, x1, y1), exclusive, of the pixels of colour `c` in `rgb`, an image
    /// `WIDTH` wide.
    fn bbox(rgb: &[u8], c: RGBColor) -> Option<(usize, usize, usize, usize)> {
        let mut b: Option<(usize, usize, usize, usize)> = None;
        for (i, p) in rgb.chunks_exact(3).enumerate() {
            if p == [c.0, c.1, c.2] {
                let (x, y) = (i % WIDTH as usize, i / WIDTH as usize);
                b = Some(b.map_or((x, y, x + 1, y + 1), |(x0, y0, x1, y1)| {
                    (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1))
                }));
            }
        }
        b
    }

    /// Pixels of colour `c` inside the box `(x0, y0, x1, y1)` of `rgb`.
    fn count_in(rgb: &[u8], (x0, y0, x1, y1): (usize, usize, usize, usize), c: RGBColor) -> usize {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (y * WIDTH as usize + x) * 3))
            .filter(|&i| rgb[i..i + 3] == [c.0, c.1, c.2])
            .count()
    }

    #[test]
    fn made_up_history_with_nan_dice_and_a_single_epoch_draws_every_panel() {
        let nan = f64::NAN;
        let epoch = |e: usize, dice: Vec<f64>, ema: f64| EpochLog {
            epoch: e,
            train_loss: 0.5 - 0.1 * e as f64,
            val_loss: 0.4 - 0.05 * e as f64,
            pseudo_dice: dice,
            ema_pseudo_dice: ema,
            learning_rate: 0.01 * (1.0 - e as f64 / 5.0),
            epoch_seconds: 100.0 + 3.0 * e as f64,
        };
        let history = [
            epoch(0, vec![nan, nan], nan),
            epoch(1, vec![0.4, nan], 0.4),
            epoch(2, vec![nan, nan], 0.4),
            epoch(3, vec![0.6, 0.5], 0.415),
            epoch(4, vec![0.7, 0.6], 0.439),
        ];
        let panel_height = HEIGHT as usize / 3;
        for logs in [&history[..], &history[..1]] {
            let rgb = decode(&render_progress_png(logs).unwrap());
            assert!(rgb.chunks_exact(3).any(|p| p != [255, 255, 255]), "blank figure");
            for panel in 0..3 {
                let rows = panel * panel_height * WIDTH as usize * 3
                    ..(panel + 1) * panel_height * WIDTH as usize * 3;
                let part = &rgb[rows];
                // The grey axes face marks the plotting area; the legend and labels are outside.
                let (x0, y0, x1, y1) = bbox(part, AXES_FACE).expect("axes drawn");
                assert!(
                    x1 - x0 > WIDTH as usize / 2 && y1 - y0 > panel_height / 2,
                    "panel {panel} axes too small"
                );
                assert!(count_color(part, TEXT) > 100, "panel {panel} has no text");
                let inside = (x0, y0, x1, y1);
                assert!(
                    count_in(part, inside, BLUE_DEEP) > 20,
                    "panel {panel}: nothing plotted"
                );
                if panel == 0 {
                    assert!(count_in(part, inside, RED_DEEP) > 20, "no loss_val");
                    if logs.len() > 1 {
                        // Isolated finite pseudo Dice values (epoch 1) and the EMA are drawn.
                        assert!(count_in(part, inside, GREEN_DEEP) > 20, "no pseudo Dice");
                    }
                }
            }
        }
    }

    #[test]
    fn empty_logs_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        assert!(matches!(try_plot_progress(&[], &path), Err(PlotError::NoEpochs)));
        assert!(plot_progress(&[], &path)
            .unwrap_err()
            .to_string()
            .contains("no epochs"));
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
