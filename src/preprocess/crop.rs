//! Cropping to the nonzero region, as nnU-Net's `preprocessing/cropping/cropping.py` does it: the
//! mask is "any channel != 0" with enclosed holes filled (scipy's `binary_fill_holes`, 6-connected),
//! every channel and the segmentation are cut to the mask's bounding box, and segmentation voxels
//! that are background *and* outside the mask become -1 (masked normalization skips them; data
//! augmentation turns them back into 0).
//!
//! Arrays are `[z, y, x]`; bounding boxes are half-open, as nnU-Net's.

use ndarray::{s, Array3, ArrayView3, Zip};

/// Label written into the segmentation outside the nonzero mask (nnU-Net's `nonzero_label`).
pub const OUTSIDE_NONZERO_LABEL: i32 = -1;

/// A half-open box `[start, end)` per axis, (z, y, x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundingBox {
    pub start: [usize; 3],
    pub end: [usize; 3],
}

impl BoundingBox {
    /// The box covering a whole array of `shape`.
    pub fn full(shape: [usize; 3]) -> BoundingBox {
        BoundingBox {
            start: [0; 3],
            end: shape,
        }
    }

    pub fn shape(&self) -> [usize; 3] {
        [0, 1, 2].map(|axis| self.end[axis] - self.start[axis])
    }

    /// The part of `array` inside the box.
    pub fn cut<'a, T>(&self, array: &'a Array3<T>) -> ArrayView3<'a, T> {
        let [z0, y0, x0] = self.start;
        let [z1, y1, x1] = self.end;
        array.slice(s![z0..z1, y0..y1, x0..x1])
    }
}

/// The result of [`crop_to_nonzero`].
#[derive(Clone, Debug, PartialEq)]
pub struct Cropped {
    /// Every channel cut to `bbox`.
    pub channels: Vec<Array3<f32>>,
    /// The segmentation cut to `bbox`, with -1 where it was 0 outside the nonzero mask. Without an
    /// input segmentation (inference) it is 0 inside the mask and -1 outside, as nnU-Net returns
    /// it: masked normalization needs it either way.
    pub seg: Array3<i32>,
    pub bbox: BoundingBox,
    pub shape_before: [usize; 3],
}

/// True where any channel is nonzero, with holes (background not connected to the array border
/// through face neighbours) filled.
///
/// Panics if `channels` is empty or the channels differ in shape (callers check the files first).
pub fn nonzero_mask(channels: &[Array3<f32>]) -> Array3<bool> {
    fill_holes(&any_nonzero(channels))
}

/// Where any channel is nonzero, holes not filled.
fn any_nonzero(channels: &[Array3<f32>]) -> Array3<bool> {
    let first = channels.first().expect("nonzero_mask needs at least one channel");
    let mut mask = first.mapv(|v| v != 0.0);
    for channel in &channels[1..] {
        assert_eq!(channel.shape(), first.shape(), "channels must share one shape");
        Zip::from(&mut mask).and(channel).for_each(|m, &v| *m |= v != 0.0);
    }
    mask
}

/// The crop box of [`crop_to_nonzero`] without building the cropped arrays. Filling holes never
/// moves the bounding box (a hole lies inside it), so the unfilled mask is enough.
pub fn nonzero_bounding_box(channels: &[Array3<f32>]) -> BoundingBox {
    let first = channels
        .first()
        .expect("nonzero_bounding_box needs at least one channel");
    let shape: [usize; 3] = first.shape().try_into().expect("3D");
    // The box of "any channel nonzero" is the union of each channel's box; no mask is built.
    let boxes = channels.iter().filter_map(|channel| {
        assert_eq!(channel.shape(), first.shape(), "channels must share one shape");
        nonzero_box_of(channel)
    });
    boxes
        .reduce(|a, b| BoundingBox {
            start: [0, 1, 2].map(|i| a.start[i].min(b.start[i])),
            end: [0, 1, 2].map(|i| a.end[i].max(b.end[i])),
        })
        .unwrap_or(BoundingBox::full(shape))
}

/// The box of one channel's nonzero voxels, scanning rows for their first and last nonzero.
fn nonzero_box_of(channel: &Array3<f32>) -> Option<BoundingBox> {
    let mut start = [usize::MAX; 3];
    let mut end = [0; 3];
    for ((z, y), row) in channel
        .lanes(ndarray::Axis(2))
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let ny = channel.shape()[1];
            ((i / ny, i % ny), row)
        })
    {
        let Some(first) = row.iter().position(|&v| v != 0.0) else {
            continue;
        };
        let last = row.len()
            - 1
            - row
                .iter()
                .rev()
                .position(|&v| v != 0.0)
                .expect("a nonzero exists");
        start = [start[0].min(z), start[1].min(y), start[2].min(first)];
        end = [end[0].max(z + 1), end[1].max(y + 1), end[2].max(last + 1)];
    }
    (start[0] != usize::MAX).then_some(BoundingBox { start, end })
}

/// scipy's `binary_fill_holes` with its default structure (6-connectivity in 3D): background that
/// cannot be reached from outside the array through face neighbours becomes foreground.
pub fn fill_holes(mask: &Array3<bool>) -> Array3<bool> {
    let (nz, ny, nx) = mask.dim();
    // Work on a copy padded with one voxel of background on every side: the padding is one
    // connected region standing for "beyond the array", so a single seed reaches all outside
    // background.
    let (pz, py, px) = (nz + 2, ny + 2, nx + 2);
    let (plane, row) = (py * px, px);
    const BACKGROUND: u8 = 0;
    const FOREGROUND: u8 = 1;
    const OUTSIDE: u8 = 2;
    let mut state = vec![BACKGROUND; pz * plane];
    for ((z, y, x), &m) in mask.indexed_iter() {
        if m {
            state[(z + 1) * plane + (y + 1) * row + x + 1] = FOREGROUND;
        }
    }
    state[0] = OUTSIDE;
    let mut stack = vec![0usize];
    while let Some(i) = stack.pop() {
        // A flat step that leaves a row or a plane wraps from padding to padding (both sides of
        // every wrap are padding, which is outside anyway), and a step off either end of the array
        // fails the bounds check: no coordinates are needed.
        for offset in [plane, row, 1] {
            for j in [i.wrapping_sub(offset), i + offset] {
                if j < state.len() && state[j] == BACKGROUND {
                    state[j] = OUTSIDE;
                    stack.push(j);
                }
            }
        }
    }
    Array3::from_shape_fn((nz, ny, nx), |(z, y, x)| {
        state[(z + 1) * plane + (y + 1) * row + x + 1] != OUTSIDE
    })
}

/// The smallest box holding every `true` voxel; `None` if there is none.
pub fn bounding_box(mask: &Array3<bool>) -> Option<BoundingBox> {
    let mut start = [usize::MAX; 3];
    let mut end = [0; 3];
    for ((z, y, x), _) in mask.indexed_iter().filter(|(_, &m)| m) {
        for (axis, position) in [z, y, x].into_iter().enumerate() {
            start[axis] = start[axis].min(position);
            end[axis] = end[axis].max(position + 1);
        }
    }
    (start[0] != usize::MAX).then_some(BoundingBox { start, end })
}

/// Crops all channels and the segmentation to the bounding box of [`nonzero_mask`]. An all-zero
/// image keeps its full extent (acvl_utils' `get_bbox_from_mask` returns the whole array then).
///
/// Panics if `channels` is empty or channels and segmentation differ in shape.
pub fn crop_to_nonzero(channels: Vec<Array3<f32>>, seg: Option<Array3<i32>>) -> Cropped {
    let shape_before: [usize; 3] = channels[0].shape().try_into().expect("3D");
    if let Some(seg) = &seg {
        assert_eq!(
            seg.shape(),
            channels[0].shape(),
            "segmentation must have the image's shape"
        );
    }
    let bbox = nonzero_bounding_box(&channels);
    let channels: Vec<Array3<f32>> = channels.iter().map(|c| bbox.cut(c).to_owned()).collect();
    // Filling holes inside the box gives the same mask there as filling the whole array: every
    // voxel outside the box is background connected to the array's border.
    let mask = fill_holes(&any_nonzero(&channels));
    let seg = match seg {
        Some(seg) => {
            let mut seg = bbox.cut(&seg).to_owned();
            Zip::from(&mut seg).and(&mask).for_each(|label, &inside| {
                if *label == 0 && !inside {
                    *label = OUTSIDE_NONZERO_LABEL;
                }
            });
            seg
        }
        None => mask.mapv(|inside| if inside { 0 } else { OUTSIDE_NONZERO_LABEL }),
    };
    Cropped {
        channels,
        seg,
        bbox,
        shape_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference flood fill on coordinates, to check the flat-index version (and its wrap-around
    /// reasoning) on random masks.
    fn fill_holes_reference(mask: &Array3<bool>) -> Array3<bool> {
        let (nz, ny, nx) = mask.dim();
        let mut outside = Array3::from_elem((nz, ny, nx), false);
        let mut stack = Vec::new();
        for ((z, y, x), &m) in mask.indexed_iter() {
            let border = z == 0 || y == 0 || x == 0 || z + 1 == nz || y + 1 == ny || x + 1 == nx;
            if border && !m {
                outside[(z, y, x)] = true;
                stack.push([z as isize, y as isize, x as isize]);
            }
        }
        while let Some([z, y, x]) = stack.pop() {
            for [dz, dy, dx] in [
                [1, 0, 0],
                [-1, 0, 0],
                [0, 1, 0],
                [0, -1, 0],
                [0, 0, 1],
                [0, 0, -1],
            ] {
                let (a, b, c) = (z + dz, y + dy, x + dx);
                if a < 0 || b < 0 || c < 0 || a >= nz as isize || b >= ny as isize || c >= nx as isize {
                    continue;
                }
                let p = (a as usize, b as usize, c as usize);
                if !mask[p] && !outside[p] {
                    outside[p] = true;
                    stack.push([a, b, c]);
                }
            }
        }
        outside.mapv(|o| !o)
    }

    #[test]
    fn fill_holes_matches_a_coordinate_flood_fill_on_random_masks() {
        let mut state = 0x2545_f491_u64;
        let mut rounds_with_holes = 0;
        for round in 0..40 {
            let shape = (3 + round % 5, 4 + round % 7, 2 + round % 6);
            let mask = Array3::from_shape_fn(shape, |_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % 100 < 55
            });
            let filled = fill_holes(&mask);
            assert_eq!(
                filled,
                fill_holes_reference(&mask),
                "round {round}, shape {shape:?}"
            );
            rounds_with_holes += usize::from(filled != mask);
        }
        assert!(
            rounds_with_holes >= 10,
            "the random masks have holes to fill ({rounds_with_holes})"
        );
    }

    fn hollow_cube(n: usize) -> Array3<bool> {
        Array3::from_shape_fn((n, n, n), |(z, y, x)| {
            let shell = |p: usize| p == 1 || p == n - 2;
            let inside = |p: usize| (1..n - 1).contains(&p);
            inside(z) && inside(y) && inside(x) && (shell(z) || shell(y) || shell(x))
        })
    }

    #[test]
    fn fill_holes_fills_a_hollow_cube() {
        let shell = hollow_cube(7);
        assert!(!shell[(3, 3, 3)]);
        let filled = fill_holes(&shell);
        let solid = Array3::from_shape_fn((7, 7, 7), |(z, y, x)| {
            [z, y, x].iter().all(|p| (1..6).contains(p))
        });
        assert_eq!(filled, solid);
    }

    #[test]
    fn fill_holes_keeps_a_hole_that_touches_the_border() {
        // A cube shell flush with the array on one face and open there: its inside is connected
        // to the outside, so nothing is filled.
        let mut shell = hollow_cube(7);
        shell.slice_mut(s![1..6, 1..6, 6]).fill(false);
        shell.slice_mut(s![2..5, 2..5, 5]).fill(false);
        assert_eq!(fill_holes(&shell), shell);
    }

    #[test]
    fn fill_holes_ignores_diagonal_leaks() {
        // A hole whose only link to the outside is an edge-diagonal step is still a hole with
        // 6-connectivity.
        let mut mask = Array3::from_elem((3, 3, 3), true);
        mask[(1, 1, 1)] = false;
        mask[(0, 0, 0)] = false;
        let filled = fill_holes(&mask);
        assert!(filled[(1, 1, 1)]);
        assert!(!filled[(0, 0, 0)]);
    }

    #[test]
    fn bounding_box_is_half_open_and_none_when_empty() {
        let mut mask = Array3::from_elem((4, 5, 6), false);
        assert_eq!(bounding_box(&mask), None);
        mask[(1, 2, 3)] = true;
        mask[(2, 4, 1)] = true;
        let bbox = bounding_box(&mask).unwrap();
        assert_eq!(
            bbox,
            BoundingBox {
                start: [1, 2, 1],
                end: [3, 5, 4]
            }
        );
        assert_eq!(bbox.shape(), [2, 3, 3]);
    }

    #[test]
    fn crop_marks_background_outside_the_mask() {
        // Channel 0 nonzero on a ring in one slice, channel 1 on one more voxel; the ring's
        // centre is a hole and belongs to the mask.
        let mut a = Array3::<f32>::zeros((3, 6, 6));
        for (y, x) in [(1, 1), (1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2), (3, 3)] {
            a[(1, y, x)] = 5.0;
        }
        let mut b = Array3::<f32>::zeros((3, 6, 6));
        b[(1, 4, 4)] = -2.0;
        let mut seg = Array3::<i32>::zeros((3, 6, 6));
        seg[(1, 4, 1)] = 2; // labelled but outside the mask: stays 2
        seg[(1, 2, 2)] = 1;
        let cropped = crop_to_nonzero(vec![a, b], Some(seg));
        assert_eq!(
            cropped.bbox,
            BoundingBox {
                start: [1, 1, 1],
                end: [2, 5, 5]
            }
        );
        assert_eq!(cropped.shape_before, [3, 6, 6]);
        assert_eq!(cropped.channels[1][(0, 3, 3)], -2.0);
        let seg = &cropped.seg;
        assert_eq!(seg[(0, 1, 1)], 1, "the filled hole is inside the mask");
        assert_eq!(seg[(0, 3, 0)], 2);
        assert_eq!(seg[(0, 3, 3)], 0, "nonzero in channel 1 only");
        assert_eq!(seg[(0, 3, 2)], OUTSIDE_NONZERO_LABEL);
        assert_eq!(
            seg.iter().filter(|&&l| l == OUTSIDE_NONZERO_LABEL).count(),
            16 - 10 - 1
        );
    }

    #[test]
    fn crop_without_seg_returns_the_mask_as_labels_and_all_zero_keeps_everything() {
        let mut a = Array3::<f32>::zeros((2, 3, 4));
        a[(1, 1, 1)] = 1.0;
        a[(1, 2, 2)] = 1.0;
        let cropped = crop_to_nonzero(vec![a], None);
        assert_eq!(cropped.seg, ndarray::array![[[0, -1], [-1, 0]]]);
        let empty = crop_to_nonzero(vec![Array3::zeros((2, 3, 4))], Some(Array3::zeros((2, 3, 4))));
        assert_eq!(empty.bbox, BoundingBox::full([2, 3, 4]));
        assert!(empty.seg.iter().all(|&l| l == OUTSIDE_NONZERO_LABEL));
    }
}
