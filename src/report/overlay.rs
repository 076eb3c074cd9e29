//! Prediction overlays for the report page: for each case, the slices through the largest
//! foreground structure, the way a radiologist glances at a segmentation.
//!
//! Where: the largest connected component (26-connectivity, 8 in a 2D image) of the reference's
//! foreground (label > 0), or of the prediction's if the reference has none or is absent; the
//! views go through its centroid (rounded). With no foreground anywhere, the middle slices.
//! A 3D image gives three views: axial (a z slice: rows y with y = 0 at the top, columns x),
//! coronal (a y slice: rows z with the highest z at the top, columns x) and sagittal (an x slice:
//! rows z with the highest z at the top, columns y). A 2D image gives one view, "2d" (rows y,
//! columns x). Each view is scaled with nearest neighbour so that pixels are square in mm, the long
//! side about [`TARGET_LONG_SIDE`] px but never less than one pixel per voxel.
//!
//! What is drawn, bottom to top (the page's legend repeats this):
//! 1. The image in grey: the window's low end black, its high end white, values outside clipped.
//! 2. Only when both reference and prediction are given: false negatives (reference > 0 and
//!    prediction != reference) tinted translucent cyan ([`FALSE_NEGATIVE_TINT`], half opacity),
//!    then false positives (prediction > 0 and prediction != reference) tinted translucent magenta
//!    ([`FALSE_POSITIVE_TINT`], half opacity). A voxel with the wrong foreground label is both and
//!    shows both tints mixed (violet).
//! 3. The reference contour: a solid 2 px line in the label's colour ([`label_colour`]) along the
//!    inside of each label's region in the view.
//! 4. The prediction contour: a 1 px dashed line along the inside of each predicted label's region,
//!    dashes alternating between the label's colour and white (3 px blocks). Where prediction and
//!    reference agree, the dashed line lies on the outer pixel of the solid reference line.

use ndarray::ArrayView3;

use crate::kernels::connected_components::{label_components, Connectivity};

/// The long side of a view, in pixels, unless one pixel per voxel needs more.
pub const TARGET_LONG_SIDE: f64 = 320.0;
/// The false-negative tint (reference > 0, prediction != reference), blended at half opacity.
pub const FALSE_NEGATIVE_TINT: [u8; 3] = [0, 255, 255];
/// The false-positive tint (prediction > 0, prediction != reference), blended at half opacity.
pub const FALSE_POSITIVE_TINT: [u8; 3] = [255, 0, 255];
/// Opacity of the false-negative and false-positive tints.
const TINT_ALPHA: f32 = 0.5;
/// Width of the reference contour and of the prediction contour, in pixels.
const REFERENCE_LINE_PX: usize = 2;
const PREDICTION_LINE_PX: usize = 1;
/// Length of the prediction contour's dashes, in pixels.
const DASH_PX: usize = 3;

/// Label colours, distinct from each other, from the cyan/magenta tints and readable on grey.
const PALETTE: [[u8; 3]; 10] = [
    [0, 220, 0],     // green
    [255, 210, 0],   // yellow
    [255, 120, 0],   // orange
    [30, 100, 255],  // blue
    [160, 90, 255],  // violet
    [230, 40, 40],   // red
    [150, 255, 120], // light green
    [0, 160, 130],   // teal
    [200, 150, 90],  // tan
    [255, 160, 200], // pink
];

pub struct OverlayInput<'a> {
    /// The image's first channel, [z, y, x] (C order, x fastest), on the raw grid.
    pub image: ArrayView3<'a, f32>,
    /// Reference labels on the same grid (validation / labelled test cases), if any.
    pub reference: Option<ArrayView3<'a, i32>>,
    /// Predicted labels on the same grid, if any.
    pub prediction: Option<ArrayView3<'a, i32>>,
    /// Voxel spacing (z, y, x) in mm, for the aspect ratio of the views (ignored along z for 2D).
    pub spacing_zyx: [f64; 3],
    /// A 2D image (z has one slice): one view.
    pub is_2d: bool,
    /// Intensities mapped to black..white (values outside are clipped).
    pub window: (f32, f32),
}

pub struct OverlayView {
    /// "axial" (a z slice), "coronal" (a y slice), "sagittal" (an x slice), or "2d".
    pub view: &'static str,
    /// Index of the slice shown along the fixed axis.
    pub slice: usize,
    /// The picture, PNG-encoded (RGB 8-bit).
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Pixels tinted as false negatives and as false positives (0 without both label maps).
    pub false_negative_px: usize,
    pub false_positive_px: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("the image is empty (shape {shape:?})")]
    EmptyImage { shape: [usize; 3] },
    #[error("the {what} has shape {found:?}, the image {expected:?}")]
    ShapeMismatch {
        what: &'static str,
        expected: [usize; 3],
        found: [usize; 3],
    },
    #[error("a 2D image must have one z slice, this one has {z}")]
    NotTwoD { z: usize },
    #[error("spacing {spacing:?} is not positive and finite")]
    BadSpacing { spacing: [f64; 3] },
    #[error("cannot encode the overlay as PNG: {0}")]
    Encode(#[from] png::EncodingError),
}

/// The colour of label `value` (1, 2, ...), distinct and readable on grey; used by the page's legend
/// too. The palette repeats after 10 labels; background (0) and negative values are black.
pub fn label_colour(value: i32) -> [u8; 3] {
    if value <= 0 {
        return [0, 0, 0];
    }
    PALETTE[(value as usize - 1) % PALETTE.len()]
}

/// (low, high) = the 0.5th and 99.5th percentile of the image's nonzero voxels (all voxels if none
/// are nonzero); for MR-like per-case windowing. Percentiles interpolate linearly (numpy's default);
/// non-finite voxels are ignored. An image without finite voxels gives (0, 1).
pub fn percentile_window(image: ArrayView3<f32>) -> (f32, f32) {
    let finite: Vec<f32> = image.iter().copied().filter(|v| v.is_finite()).collect();
    let mut values: Vec<f32> = finite.iter().copied().filter(|&v| v != 0.0).collect();
    if values.is_empty() {
        values = finite;
    }
    if values.is_empty() {
        return (0.0, 1.0);
    }
    values.sort_by(f32::total_cmp);
    (percentile(&values, 0.5), percentile(&values, 99.5))
}

/// The `q`th percentile of sorted, non-empty `values`, interpolated linearly.
fn percentile(values: &[f32], q: f64) -> f32 {
    let position = q / 100.0 * (values.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(values.len() - 1);
    let fraction = position - below as f64;
    (values[below] as f64 + fraction * (values[above] as f64 - values[below] as f64)) as f32
}

/// The overlay views of one case: axial, coronal and sagittal for a 3D image, one "2d" view for a
/// 2D image (see the module documentation for what is drawn).
pub fn render_overlays(input: &OverlayInput) -> Result<Vec<OverlayView>, OverlayError> {
    check(input)?;
    let (nz, ny, nx) = input.image.dim();
    let [sz, sy, sx] = input.spacing_zyx;
    let [cz, cy, cx] = focus(input);
    let planes = if input.is_2d {
        vec![Plane::new("2d", Axis::Z, 0, (ny, nx), (sy, sx), nz)]
    } else {
        vec![
            Plane::new("axial", Axis::Z, cz, (ny, nx), (sy, sx), nz),
            Plane::new("coronal", Axis::Y, cy, (nz, nx), (sz, sx), nz),
            Plane::new("sagittal", Axis::X, cx, (nz, ny), (sz, sy), nz),
        ]
    };
    planes
        .iter()
        .map(|plane| {
            let picture = render_plane(input, plane);
            Ok(OverlayView {
                view: plane.name,
                slice: plane.fixed,
                png: encode_png(&picture.rgb, picture.width, picture.height)?,
                width: picture.width as u32,
                height: picture.height as u32,
                false_negative_px: picture.false_negative_px,
                false_positive_px: picture.false_positive_px,
            })
        })
        .collect()
}

fn check(input: &OverlayInput) -> Result<(), OverlayError> {
    let (nz, ny, nx) = input.image.dim();
    let expected = [nz, ny, nx];
    if expected.contains(&0) {
        return Err(OverlayError::EmptyImage { shape: expected });
    }
    for (what, labels) in [("reference", &input.reference), ("prediction", &input.prediction)] {
        if let Some(labels) = labels {
            let (z, y, x) = labels.dim();
            if [z, y, x] != expected {
                return Err(OverlayError::ShapeMismatch {
                    what,
                    expected,
                    found: [z, y, x],
                });
            }
        }
    }
    if input.is_2d && nz != 1 {
        return Err(OverlayError::NotTwoD { z: nz });
    }
    let in_plane = if input.is_2d {
        &input.spacing_zyx[1..]
    } else {
        &input.spacing_zyx[..]
    };
    if !in_plane.iter().all(|s| s.is_finite() && *s > 0.0) {
        return Err(OverlayError::BadSpacing {
            spacing: input.spacing_zyx,
        });
    }
    Ok(())
}

/// The voxel the views go through: the rounded centroid of the largest connected component of the
/// reference's foreground, else of the prediction's; the middle of the volume without foreground.
fn focus(input: &OverlayInput) -> [usize; 3] {
    let (nz, ny, nx) = input.image.dim();
    let middle = [nz / 2, ny / 2, nx / 2];
    let foreground = [input.reference, input.prediction]
        .into_iter()
        .flatten()
        .map(|labels| labels.mapv(|l| l > 0))
        .find(|mask| mask.iter().any(|&f| f));
    let Some(mask) = foreground else {
        return middle;
    };
    let (components, sizes) = label_components(mask.view(), Connectivity::Full);
    // The first of the largest components in raster order, so ties are deterministic.
    let largest = sizes.iter().enumerate().fold(
        (0, 0),
        |best, (i, &size)| if size > best.1 { (i, size) } else { best },
    );
    let label = largest.0 as u32 + 1;
    let mut sum = [0f64; 3];
    for ((z, y, x), &l) in components.indexed_iter() {
        if l == label {
            sum[0] += z as f64;
            sum[1] += y as f64;
            sum[2] += x as f64;
        }
    }
    let n = largest.1 as f64;
    let round = |s: f64, len: usize| ((s / n).round() as usize).min(len - 1);
    [round(sum[0], nz), round(sum[1], ny), round(sum[2], nx)]
}

/// The axis a view holds fixed.
#[derive(Clone, Copy)]
enum Axis {
    Z,
    Y,
    X,
}

/// One view: a slice of the volume as rows and columns of voxels.
struct Plane {
    name: &'static str,
    axis: Axis,
    fixed: usize,
    rows: usize,
    cols: usize,
    row_mm: f64,
    col_mm: f64,
    nz: usize,
}

impl Plane {
    fn new(
        name: &'static str,
        axis: Axis,
        fixed: usize,
        (rows, cols): (usize, usize),
        (row_mm, col_mm): (f64, f64),
        nz: usize,
    ) -> Plane {
        Plane {
            name,
            axis,
            fixed,
            rows,
            cols,
            row_mm,
            col_mm,
            nz,
        }
    }

    /// The voxel [z, y, x] at row `r`, column `c`; z runs upwards in coronal and sagittal views.
    fn voxel(&self, r: usize, c: usize) -> [usize; 3] {
        match self.axis {
            Axis::Z => [self.fixed, r, c],
            Axis::Y => [self.nz - 1 - r, self.fixed, c],
            Axis::X => [self.nz - 1 - r, c, self.fixed],
        }
    }

    /// Picture size and mm per pixel: square pixels, long side about [`TARGET_LONG_SIDE`], at least
    /// one pixel per voxel.
    fn scale(&self) -> (usize, usize, f64) {
        let height_mm = self.rows as f64 * self.row_mm;
        let width_mm = self.cols as f64 * self.col_mm;
        let mm_per_px = (height_mm.max(width_mm) / TARGET_LONG_SIDE)
            .min(self.row_mm)
            .min(self.col_mm);
        let px = |mm: f64| ((mm / mm_per_px).round() as usize).max(1);
        (px(width_mm), px(height_mm), mm_per_px)
    }
}

/// A rendered view before encoding, with its counts of tinted pixels.
struct Picture {
    rgb: Vec<u8>,
    width: usize,
    height: usize,
    false_negative_px: usize,
    false_positive_px: usize,
}

fn render_plane(input: &OverlayInput, plane: &Plane) -> Picture {
    let (width, height, mm_per_px) = plane.scale();
    // Nearest neighbour: the voxel under each pixel's centre.
    let col_of: Vec<usize> = (0..width)
        .map(|j| (((j as f64 + 0.5) * mm_per_px / plane.col_mm) as usize).min(plane.cols - 1))
        .collect();
    let row_of: Vec<usize> = (0..height)
        .map(|i| (((i as f64 + 0.5) * mm_per_px / plane.row_mm) as usize).min(plane.rows - 1))
        .collect();
    let sample = |volume: ArrayView3<i32>| -> Vec<i32> {
        let mut out = Vec::with_capacity(width * height);
        for &r in &row_of {
            for &c in &col_of {
                out.push(volume[plane.voxel(r, c)]);
            }
        }
        out
    };
    let reference = input.reference.map(sample);
    let prediction = input.prediction.map(sample);

    let mut rgb = Vec::with_capacity(width * height * 3);
    for &r in &row_of {
        for &c in &col_of {
            let g = grey(input.image[plane.voxel(r, c)], input.window);
            rgb.extend_from_slice(&[g, g, g]);
        }
    }
    let (mut false_negative_px, mut false_positive_px) = (0, 0);
    if let (Some(reference), Some(prediction)) = (&reference, &prediction) {
        for (i, (&t, &p)) in reference.iter().zip(prediction).enumerate() {
            let pixel = &mut rgb[3 * i..3 * i + 3];
            if t > 0 && p != t {
                blend(pixel, FALSE_NEGATIVE_TINT);
                false_negative_px += 1;
            }
            if p > 0 && p != t {
                blend(pixel, FALSE_POSITIVE_TINT);
                false_positive_px += 1;
            }
        }
    }
    if let Some(reference) = &reference {
        let edge = inner_boundary(reference, width, height, REFERENCE_LINE_PX);
        for (i, _) in edge.iter().enumerate().filter(|(_, &e)| e) {
            rgb[3 * i..3 * i + 3].copy_from_slice(&label_colour(reference[i]));
        }
    }
    if let Some(prediction) = &prediction {
        let edge = inner_boundary(prediction, width, height, PREDICTION_LINE_PX);
        for (i, _) in edge.iter().enumerate().filter(|(_, &e)| e) {
            let (x, y) = (i % width, i / width);
            let colour = if (x / DASH_PX + y / DASH_PX).is_multiple_of(2) {
                label_colour(prediction[i])
            } else {
                [255, 255, 255]
            };
            rgb[3 * i..3 * i + 3].copy_from_slice(&colour);
        }
    }
    Picture {
        rgb,
        width,
        height,
        false_negative_px,
        false_positive_px,
    }
}

/// The grey level of `value` in `window`; a window with high <= low is a threshold at low. NaN is
/// black.
fn grey(value: f32, (low, high): (f32, f32)) -> u8 {
    if value.is_nan() {
        return 0;
    }
    let t = if high > low {
        ((value - low) / (high - low)).clamp(0.0, 1.0)
    } else if value > low {
        1.0
    } else {
        0.0
    };
    (t * 255.0).round() as u8
}

fn blend(pixel: &mut [u8], tint: [u8; 3]) {
    for (p, t) in pixel.iter_mut().zip(tint) {
        *p = ((1.0 - TINT_ALPHA) * *p as f32 + TINT_ALPHA * t as f32).round() as u8;
    }
}

/// The pixels of each foreground label's region that lie within `line_px` pixels (8-neighbourhood
/// steps) of another label or of the picture's edge: the region's contour, drawn inside it.
fn inner_boundary(labels: &[i32], width: usize, height: usize, line_px: usize) -> Vec<bool> {
    let r = line_px as isize;
    let mut edge = vec![false; labels.len()];
    for y in 0..height as isize {
        for x in 0..width as isize {
            let i = (y as usize) * width + x as usize;
            let label = labels[i];
            if label <= 0 {
                continue;
            }
            edge[i] = (-r..=r).any(|dy| {
                (-r..=r).any(|dx| {
                    let (nx, ny) = (x + dx, y + dy);
                    nx < 0
                        || ny < 0
                        || nx >= width as isize
                        || ny >= height as isize
                        || labels[ny as usize * width + nx as usize] != label
                })
            });
        }
    }
    edge
}

fn encode_png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>, png::EncodingError> {
    crate::data::image::rgb_png(rgb, width as u32, height as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array3};

    /// A 20 x 40 x 30 volume: a big blob (label 1) centred at (12, 25, 18), a small one (label 2) at
    /// (4, 6, 5); the image is bright inside the blobs.
    fn two_blobs() -> (Array3<f32>, Array3<i32>) {
        let mut labels = Array3::<i32>::zeros((20, 40, 30));
        labels.slice_mut(s![8..17, 20..31, 14..23]).fill(1);
        labels.slice_mut(s![3..6, 5..8, 4..7]).fill(2);
        let image = labels.mapv(|l| if l > 0 { 100.0 } else { 10.0 });
        (image, labels)
    }

    fn input<'a>(
        image: &'a Array3<f32>,
        reference: Option<&'a Array3<i32>>,
        prediction: Option<&'a Array3<i32>>,
    ) -> OverlayInput<'a> {
        OverlayInput {
            image: image.view(),
            reference: reference.map(|r| r.view()),
            prediction: prediction.map(|p| p.view()),
            spacing_zyx: [3.0, 1.0, 1.0],
            is_2d: false,
            window: (0.0, 120.0),
        }
    }

    /// Decodes the PNG fully and returns (width, height, RGB pixels).
    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("PNG data");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// (false-negative, false-positive) pixel counts over all views.
    fn tint_counts(input: &OverlayInput) -> (usize, usize) {
        let (nz, ny, nx) = input.image.dim();
        let [cz, cy, cx] = focus(input);
        let planes = [
            Plane::new("axial", Axis::Z, cz, (ny, nx), (1.0, 1.0), nz),
            Plane::new("coronal", Axis::Y, cy, (nz, nx), (3.0, 1.0), nz),
            Plane::new("sagittal", Axis::X, cx, (nz, ny), (3.0, 1.0), nz),
        ];
        planes.iter().fold((0, 0), |(fneg, fpos), plane| {
            let picture = render_plane(input, plane);
            (fneg + picture.false_negative_px, fpos + picture.false_positive_px)
        })
    }

    #[test]
    fn views_pass_through_the_big_blobs_centroid() {
        let (image, labels) = two_blobs();
        let views = render_overlays(&input(&image, Some(&labels), None)).unwrap();
        let names: Vec<_> = views.iter().map(|v| (v.view, v.slice)).collect();
        assert_eq!(names, [("axial", 12), ("coronal", 25), ("sagittal", 18)]);
        // Only a prediction: its largest structure decides.
        let views = render_overlays(&input(&image, None, Some(&labels))).unwrap();
        assert_eq!(views[0].slice, 12);
        // No foreground: the middle slices.
        let empty = Array3::<i32>::zeros(labels.dim());
        let views = render_overlays(&input(&image, Some(&empty), Some(&empty))).unwrap();
        let slices: Vec<_> = views.iter().map(|v| v.slice).collect();
        assert_eq!(slices, [10, 20, 15]);
    }

    #[test]
    fn pngs_decode_to_the_stated_size_with_square_mm_pixels() {
        let (image, labels) = two_blobs();
        let views = render_overlays(&input(&image, Some(&labels), Some(&labels))).unwrap();
        for view in &views {
            let (w, h, rgb) = decode(&view.png);
            assert_eq!((w, h), (view.width, view.height), "{}", view.view);
            assert_eq!(rgb.len(), (w * h * 3) as usize);
            assert!(w.max(h) >= 256 && w.max(h) <= 512, "{}: {w} x {h}", view.view);
        }
        // Axial 40 x 30 mm, coronal 60 x 30 mm (z spacing 3), sagittal 60 x 40 mm.
        let sizes: Vec<_> = views.iter().map(|v| (v.width, v.height)).collect();
        assert_eq!(sizes, [(240, 320), (160, 320), (213, 320)]);
        // The reference contour is drawn in label 1's colour.
        let (_, _, rgb) = decode(&views[0].png);
        assert!(rgb.chunks_exact(3).any(|p| p == label_colour(1)));
        // Deterministic.
        let again = render_overlays(&input(&image, Some(&labels), Some(&labels))).unwrap();
        assert!(views.iter().zip(&again).all(|(a, b)| a.png == b.png));
    }

    #[test]
    fn a_perfect_prediction_has_no_tint_and_a_shifted_one_has_both() {
        let (image, labels) = two_blobs();
        assert_eq!(tint_counts(&input(&image, Some(&labels), Some(&labels))), (0, 0));

        let mut shifted = Array3::<i32>::zeros(labels.dim());
        shifted
            .slice_mut(s![.., .., 2..])
            .assign(&labels.slice(s![.., .., ..-2]));
        let (fneg, fpos) = tint_counts(&input(&image, Some(&labels), Some(&shifted)));
        assert!(fneg > 0 && fpos > 0, "{fneg} {fpos}");

        // The tints show in the picture: a pixel of the shifted view is cyan-ish, another magenta-ish.
        let views = render_overlays(&input(&image, Some(&labels), Some(&shifted))).unwrap();
        let (_, _, rgb) = decode(&views[0].png);
        let tinted =
            |p: &[u8], low: usize, high: [usize; 2]| high.iter().all(|&h| p[h] as i32 > p[low] as i32 + 80);
        assert!(
            rgb.chunks_exact(3).any(|p| tinted(p, 0, [1, 2])),
            "no cyan-ish pixel"
        );
        assert!(
            rgb.chunks_exact(3).any(|p| tinted(p, 1, [0, 2])),
            "no magenta-ish pixel"
        );

        // No tint without both reference and prediction.
        assert_eq!(tint_counts(&input(&image, Some(&labels), None)), (0, 0));
    }

    #[test]
    fn a_2d_image_gives_one_view() {
        let mut labels = Array3::<i32>::zeros((1, 50, 100));
        labels.slice_mut(s![.., 10..20, 60..90]).fill(1);
        let image = labels.mapv(|l| l as f32);
        let mut overlay = input(&image, Some(&labels), Some(&labels));
        overlay.is_2d = true;
        overlay.spacing_zyx = [f64::NAN, 0.5, 0.5];
        let views = render_overlays(&overlay).unwrap();
        assert_eq!(views.len(), 1);
        assert_eq!((views[0].view, views[0].slice), ("2d", 0));
        assert_eq!((views[0].width, views[0].height), (320, 160));
        let (w, h, _) = decode(&views[0].png);
        assert_eq!((w, h), (320, 160));
    }

    #[test]
    fn mismatched_shapes_and_bad_inputs_are_errors() {
        let (image, _) = two_blobs();
        let wrong = Array3::<i32>::zeros((20, 40, 29));
        let err = render_overlays(&input(&image, None, Some(&wrong))).err().unwrap();
        assert!(
            matches!(
                err,
                OverlayError::ShapeMismatch {
                    what: "prediction",
                    ..
                }
            ),
            "{err}"
        );
        let err = render_overlays(&input(&image, Some(&wrong), None)).err().unwrap();
        assert!(
            matches!(
                err,
                OverlayError::ShapeMismatch {
                    what: "reference",
                    ..
                }
            ),
            "{err}"
        );

        let mut flat = input(&image, None, None);
        flat.is_2d = true;
        assert!(matches!(
            render_overlays(&flat),
            Err(OverlayError::NotTwoD { z: 20 })
        ));
        let mut bad = input(&image, None, None);
        bad.spacing_zyx = [0.0, 1.0, 1.0];
        assert!(matches!(
            render_overlays(&bad),
            Err(OverlayError::BadSpacing { .. })
        ));
        let empty = Array3::<f32>::zeros((0, 4, 4));
        assert!(matches!(
            render_overlays(&input(&empty, None, None)),
            Err(OverlayError::EmptyImage { .. })
        ));
    }

    #[test]
    fn percentile_window_of_known_values() {
        // Zeros are ignored: the nonzero values are 1..=1000, numpy.percentile(v, [0.5, 99.5]) =
        // [5.995, 995.005].
        let values: Vec<f32> = (0..=1000).map(|v| v as f32).chain([0.0; 99]).collect();
        let image = Array3::from_shape_vec((11, 10, 10), values).unwrap();
        let (low, high) = percentile_window(image.view());
        assert!((low - 5.995).abs() < 1e-3, "{low}");
        assert!((high - 995.005).abs() < 1e-3, "{high}");
        // All zero: all voxels count.
        assert_eq!(percentile_window(Array3::zeros((2, 2, 2)).view()), (0.0, 0.0));
    }

    #[test]
    fn label_colours_are_distinct() {
        let colours: Vec<_> = (1..=10).map(label_colour).collect();
        for (i, a) in colours.iter().enumerate() {
            assert!(colours[i + 1..].iter().all(|b| a != b));
            assert_ne!(*a, FALSE_NEGATIVE_TINT);
            assert_ne!(*a, FALSE_POSITIVE_TINT);
        }
        assert_eq!(label_colour(11), label_colour(1));
    }
}
