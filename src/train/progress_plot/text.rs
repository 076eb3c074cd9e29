//! Text in the progress figure. plotters lays out every text (tick labels, axis descriptions,
//! legends) with its `ab_glyph` font metrics and asks the backend to draw it; the font is the
//! bundled one, registered from bytes. Only the glyph rasterising is done here (see `Canvas`):
//! it is what plotters 0.3.7 gets wrong.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, ScaleFont};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};
use plotters::style::{register_font, FontStyle};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

use super::PlotError;
// `ab_glyph` font metrics and asks the backend to draw it; the font is the bundled one,
// registered from bytes. Only the glyph rasterising is done here (see `Canvas`).

pub(super) static FONT_BYTES: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans-subset.ttf");

pub(super) struct Face {
    font: FontRef<'static>,
    /// Height of capitals and digits, in font units.
    cap_height: f32,
}

/// The bundled font, registered (once per process) as plotters' "sans-serif", so that nothing
/// plotters draws looks for system fonts.
pub(super) fn bundled_face() -> Result<&'static Face, PlotError> {
    static FACE: OnceLock<Option<Face>> = OnceLock::new();
    FACE.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, FONT_BYTES).ok()?;
        let font = FontRef::try_from_slice(FONT_BYTES).ok()?;
        let h = font.outline(font.glyph_id('H'))?.bounds;
        Some(Face {
            cap_height: (h.max.y - h.min.y).abs(),
            font,
        })
    })
    .as_ref()
    .ok_or(PlotError::Font)
}

/// plotters' bitmap backend, except that it rasterises text itself.
///
/// plotters 0.3.7's own `ab_glyph` glyph drawing (`style/font/ab_glyph.rs`) drops each glyph's
/// left side bearing and sub-pixel position, so digits drift by up to 2 px ("140" reads "1 40"),
/// and puts the baseline half a font size below the anchor box's top, so labels centred on a
/// tick sit ~4 px above it. A backend may draw text its own way (plotters' SVG and canvas
/// backends do): this one draws the same glyphs at the positions plotters measured them at, with
/// capitals centred in the box plotters anchors the text by. Everything else is the bitmap
/// backend's.
pub(super) struct Canvas<'a> {
    pub bitmap: BitMapBackend<'a>,
    pub face: &'static Face,
}

type CanvasError = <BitMapBackend<'static> as DrawingBackend>::ErrorType;
type CanvasResult = Result<(), DrawingErrorKind<CanvasError>>;

impl DrawingBackend for Canvas<'_> {
    type ErrorType = CanvasError;

    fn get_size(&self) -> (u32, u32) {
        self.bitmap.get_size()
    }
    fn ensure_prepared(&mut self) -> CanvasResult {
        self.bitmap.ensure_prepared()
    }
    fn present(&mut self) -> CanvasResult {
        self.bitmap.present()
    }
    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> CanvasResult {
        self.bitmap.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> CanvasResult {
        self.bitmap.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> CanvasResult {
        self.bitmap.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_text<S: BackendTextStyle>(&mut self, text: &str, style: &S, pos: BackendCoord) -> CanvasResult {
        let color = style.color();
        let font = self.face.font.as_scaled(style.size() as f32);
        // Glyph origins along the baseline, kerned, as plotters measures the text.
        let mut caret = 0.0f32;
        let mut previous = None;
        let mut glyphs = Vec::with_capacity(text.len());
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = previous {
                caret += font.kern(p, id);
            }
            glyphs.push((id, caret));
            caret += font.h_advance(id);
            previous = Some(id);
        }
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -caret / 2.0,
            HPos::Right => -caret,
        };
        let box_height = (style.size() / 1.24).floor() as f32;
        let top = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -box_height / 2.0,
            VPos::Bottom => -box_height,
        };
        let baseline = (top + (box_height + self.face.cap_height * font.v_scale_factor()) / 2.0).round();
        let transform = style.transform();
        let mut result = Ok(());
        for (id, x) in glyphs {
            let glyph = id.with_scale_and_position(font.scale(), point(dx + x, baseline));
            let Some(outline) = self.face.font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let (x, y) =
                    transform.transform(bounds.min.x as i32 + gx as i32, bounds.min.y as i32 + gy as i32);
                let alpha = color.alpha * coverage.min(1.0) as f64;
                if result.is_ok() && alpha > 0.0 {
                    result = self
                        .bitmap
                        .draw_pixel((pos.0 + x, pos.1 + y), BackendColor { alpha, ..color });
                }
            });
        }
        result
    }
}
