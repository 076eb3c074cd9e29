//! Binary morphology with skimage's `ball` / `disk` footprints, equal voxel for voxel to
//! batchgeneratorsv2's FFT-convolution operators (`binary_dilation_torch` and the erosion, opening and
//! closing built from it), which nnU-Net's cascade uses to perturb the previous stage's segmentation.
//!
//! batchgeneratorsv2 dilates by correlating the mask with the footprint (`fft_conv`, padding 'same')
//! and keeping voxels whose rounded count is positive: voxel `i` is set when some footprint member at
//! kernel index `j` sees a set voxel at `i + j - floor((k - 1) / 2)`, `k` the kernel size (even sizes
//! pad one less before than after). Voxels outside the volume count as unset, and erosion is
//! `!dilate(!mask)`, so for erosion the outside counts as *set*.
//!
//! Footprints up to radius 8 have ~2000 members, too many for a per-voxel loop over them. Both skimage
//! footprints are `{(k_z, k_y, k_x): (f_x(k_x) + f_y(k_y)) + f_z(k_z) <= r²}` with `f` the squared
//! grid coordinate, so "some member sees a set voxel" is "the smallest such sum is <= r²", and that
//! minimum separates into one min-plus pass per axis (x, then y, then z: float additions are monotone,
//! so taking the minimum before adding the next axis gives the very sum numpy forms, bit for bit).

use ndarray::{Array3, ArrayView3};

/// A footprint as one table of squared coordinates per axis (z, y, x) and the squared radius.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    squares: [Vec<f64>; 3],
    radius_sq: f64,
}

/// skimage 0.26 `ball(radius)` for a float radius: `n = 2r + 1` and `mgrid[-r:r:n*1j]` gives `int(n)`
/// evenly spaced coordinates from `-r` to `r` (so non-integer radii give even sizes and coordinates
/// that miss 0), members where `X² + Y² + Z² <= r * r`.
pub fn ball(radius: f64) -> Footprint {
    let n = (2.0 * radius + 1.0) as usize;
    // mgrid computes `i * step + start`; with one point, step is irrelevant (the point is -r).
    let step = if n > 1 {
        (radius - -radius) / (n - 1) as f64
    } else {
        1.0
    };
    let squares: Vec<f64> = (0..n)
        .map(|i| {
            let c = i as f64 * step + -radius;
            c * c
        })
        .collect();
    Footprint {
        squares: [squares.clone(), squares.clone(), squares],
        radius_sq: radius * radius,
    }
}

/// skimage 0.26 `disk(radius)` for a float radius: coordinates `arange(-r, r + 1)`, which start at
/// `-r` in steps of one (so `disk(2.7)` spans -2.7 .. 3.3 and is not symmetric), members where
/// `X² + Y² <= r²`. The footprint has one z plane.
pub fn disk(radius: f64) -> Footprint {
    let (start, stop) = (-radius, radius + 1.0);
    let n = (stop - start).ceil() as usize;
    // numpy's arange writes start and start + 1, then fills `start + i * delta` with the rounded step
    // `delta = (start + 1) - start`.
    let second = start + 1.0;
    let delta = second - start;
    let squares: Vec<f64> = (0..n)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .map(|c| c * c)
        .collect();
    Footprint {
        squares: [vec![0.0], squares.clone(), squares],
        radius_sq: radius * radius,
    }
}

impl Footprint {
    /// Kernel size per axis (z, y, x).
    pub fn shape(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.squares[a].len())
    }

    /// The footprint as a dense mask `(z, y, x)`, as skimage returns it (with a z axis of one for `disk`).
    pub fn mask(&self) -> Array3<bool> {
        let [fz, fy, fx] = &self.squares;
        let shape = self.shape();
        Array3::from_shape_fn((shape[0], shape[1], shape[2]), |(z, y, x)| {
            (fx[x] + fy[y]) + fz[z] <= self.radius_sq
        })
    }

    /// Offset of kernel index 0 relative to the output voxel along `axis` (fft_conv's 'same' padding).
    fn first_offset(&self, axis: usize) -> isize {
        -(((self.squares[axis].len() - 1) / 2) as isize)
    }
}

/// The four operators batchgeneratorsv2 draws from, in its `any_of_these` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOperator {
    Dilation,
    Erosion,
    Closing,
    Opening,
}

impl BinaryOperator {
    pub const ALL: [BinaryOperator; 4] = [Self::Dilation, Self::Erosion, Self::Closing, Self::Opening];

    pub fn apply(self, mask: ArrayView3<bool>, footprint: &Footprint) -> Array3<bool> {
        match self {
            Self::Dilation => dilate(mask, footprint),
            Self::Erosion => erode(mask, footprint),
            Self::Closing => erode(dilate(mask, footprint).view(), footprint),
            Self::Opening => dilate(erode(mask, footprint).view(), footprint),
        }
    }
}

/// `binary_erosion_torch`: `!dilate(!mask)`, so voxels near the border only need their in-volume
/// neighbours to be set.
pub fn erode(mask: ArrayView3<bool>, footprint: &Footprint) -> Array3<bool> {
    let inverted = mask.map(|&v| !v);
    let mut out = dilate(inverted.view(), footprint);
    out.mapv_inplace(|v| !v);
    out
}

/// `binary_dilation_torch`: voxel `i` is set when a footprint member at offset `d` sees a set voxel at
/// `i + d` inside the volume.
pub fn dilate(mask: ArrayView3<bool>, footprint: &Footprint) -> Array3<bool> {
    let dim = mask.dim();
    if mask.is_empty() {
        return Array3::from_elem(dim, false);
    }
    let (nz, ny, nx) = dim;
    let mask = mask.as_standard_layout();
    let mask = mask.as_slice().expect("standard layout");
    let [fz, fy, fx] = &footprint.squares;
    let plane = ny * nx;

    // x: smallest f_x over the set voxels each output voxel's row of the footprint sees
    let mut best_x = vec![f64::INFINITY; mask.len()];
    let first_x = footprint.first_offset(2);
    for (row, out) in mask.chunks_exact(nx).zip(best_x.chunks_exact_mut(nx)) {
        if !row.iter().any(|&v| v) {
            continue;
        }
        for (j, &f) in fx.iter().enumerate() {
            let d = first_x + j as isize;
            let (lo, hi) = shifted_range(nx, d);
            for i in lo..hi {
                if row[(i as isize + d) as usize] && f < out[i] {
                    out[i] = f;
                }
            }
        }
    }
    // y: then (f_x + f_y), row by row within each z plane
    let mut best_xy = vec![f64::INFINITY; mask.len()];
    for (src, out) in best_x.chunks_exact(plane).zip(best_xy.chunks_exact_mut(plane)) {
        min_plus_rows(out, src, ny, nx, footprint.first_offset(1), fy);
    }
    // z: then ((f_x + f_y) + f_z), plane by plane
    let mut best = vec![f64::INFINITY; mask.len()];
    min_plus_rows(&mut best, &best_xy, nz, plane, footprint.first_offset(0), fz);

    let r2 = footprint.radius_sq;
    Array3::from_shape_vec(dim, best.into_iter().map(|s| s <= r2).collect()).expect("shape of the mask")
}

/// The min-plus pass along an axis of `n` lines of `len` contiguous values: line `i` of `out` becomes
/// the minimum over kernel indices `j` of line `i + first + j` of `src` plus `f[j]`.
fn min_plus_rows(out: &mut [f64], src: &[f64], n: usize, len: usize, first: isize, f: &[f64]) {
    for (j, &fj) in f.iter().enumerate() {
        let d = first + j as isize;
        let (lo, hi) = shifted_range(n, d);
        for i in lo..hi {
            let from = (i as isize + d) as usize;
            let src_line = &src[from * len..][..len];
            let out_line = &mut out[i * len..][..len];
            for (o, &s) in out_line.iter_mut().zip(src_line) {
                let candidate = s + fj;
                if candidate < *o {
                    *o = candidate;
                }
            }
        }
    }
}

/// Output indices `i` in `0..n` whose source `i + d` also lies in `0..n`.
fn shifted_range(n: usize, d: isize) -> (usize, usize) {
    let lo = (-d).clamp(0, n as isize) as usize;
    let hi = (n as isize - d).clamp(0, n as isize) as usize;
    (lo, hi.max(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one member at a time: out[i] |= mask[i + j - floor((k - 1) / 2)].
    fn dilate_naive(mask: ArrayView3<bool>, footprint: &Footprint) -> Array3<bool> {
        let fp = footprint.mask();
        let first = [0, 1, 2].map(|a| footprint.first_offset(a));
        let (nz, ny, nx) = mask.dim();
        let mut out = Array3::from_elem(mask.dim(), false);
        for ((kz, ky, kx), &member) in fp.indexed_iter() {
            if !member {
                continue;
            }
            let d = [
                kz as isize + first[0],
                ky as isize + first[1],
                kx as isize + first[2],
            ];
            for ((z, y, x), o) in out.indexed_iter_mut() {
                let s = [z as isize + d[0], y as isize + d[1], x as isize + d[2]];
                if s.iter().zip([nz, ny, nx]).all(|(&s, n)| s >= 0 && s < n as isize) {
                    *o |= mask[[s[0] as usize, s[1] as usize, s[2] as usize]];
                }
            }
        }
        out
    }

    fn pseudo_random_mask(dim: (usize, usize, usize), density: u64) -> Array3<bool> {
        let mut state = 0x1234_5678u64;
        Array3::from_shape_fn(dim, |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % 100 < density
        })
    }

    #[test]
    fn separable_dilation_equals_member_by_member_dilation() {
        let mask = pseudo_random_mask((9, 10, 11), 3);
        for r in [1.0, 1.5, 2.7, 3.5] {
            let fp = ball(r);
            assert_eq!(
                dilate(mask.view(), &fp),
                dilate_naive(mask.view(), &fp),
                "ball {r}"
            );
        }
        let flat = pseudo_random_mask((1, 17, 19), 4);
        for r in [1.0, 1.5, 2.7, 3.5] {
            let fp = disk(r);
            assert_eq!(
                dilate(flat.view(), &fp),
                dilate_naive(flat.view(), &fp),
                "disk {r}"
            );
        }
    }

    #[test]
    fn footprint_shapes_follow_skimage() {
        assert_eq!(ball(1.0).shape(), [3, 3, 3]);
        assert_eq!(ball(1.5).shape(), [4, 4, 4]);
        assert_eq!(ball(7.9).shape(), [16, 16, 16]);
        assert_eq!(disk(2.7).shape(), [1, 7, 7]);
        assert_eq!(disk(1.5).shape(), [1, 4, 4]);
        // ball(1) is the 6-neighbourhood cross plus centre
        assert_eq!(ball(1.0).mask().iter().filter(|&&v| v).count(), 7);
        // disk(2.7) spans -2.7 .. 3.3: its last row and column are empty, its first are not all empty
        let d = disk(2.7).mask();
        assert!(d.slice(ndarray::s![0, 6, ..]).iter().all(|&v| !v));
        assert!(d.slice(ndarray::s![0, 1, ..]).iter().any(|&v| v));
    }

    #[test]
    fn erosion_treats_the_outside_as_set_and_operators_compose() {
        let full = Array3::from_elem((4, 5, 6), true);
        assert_eq!(erode(full.view(), &ball(2.7)), full);
        let empty = Array3::from_elem((4, 5, 6), false);
        assert_eq!(dilate(empty.view(), &ball(2.7)), empty);
        let no_voxels = Array3::from_elem((3, 0, 2), false);
        assert_eq!(erode(no_voxels.view(), &ball(2.7)), no_voxels);
        let mask = pseudo_random_mask((8, 9, 10), 20);
        let fp = ball(1.5);
        let closed = BinaryOperator::Closing.apply(mask.view(), &fp);
        let opened = BinaryOperator::Opening.apply(mask.view(), &fp);
        assert_eq!(closed, erode(dilate(mask.view(), &fp).view(), &fp));
        assert_eq!(opened, dilate(erode(mask.view(), &fp).view(), &fp));
    }
}
