//! Where the windows go: step positions, the ordered window list, and padding of small images.

use ndarray::{s, Array4, ArrayView4, CowArray, Ix4, SliceInfo, SliceInfoElem};

/// nnU-Net's `compute_steps_for_sliding_window`: window start positions per axis.
///
/// The step is at most `patch * step_size` voxels; the number of windows is the fewest that keep to
/// that, and they are then spread evenly so the first starts at 0 and the last ends at the image edge
/// (positions rounded half to even, like `np.round`). Example: image 110, patch 64, step 0.5 gives
/// 0, 23, 46.
///
/// Panics unless `0 < step_size <= 1` and every image axis is at least the patch (nnU-Net states the
/// same precondition but its assert is vacuous; callers pad first, see [`pad_to_patch`]).
pub fn compute_steps(image_size: &[usize], patch: &[usize], step_size: f64) -> Vec<Vec<usize>> {
    assert!(
        step_size > 0.0 && step_size <= 1.0,
        "step_size must be in (0, 1], got {step_size}"
    );
    assert_eq!(
        image_size.len(),
        patch.len(),
        "image and patch need the same number of axes"
    );
    image_size
        .iter()
        .zip(patch)
        .map(|(&image, &tile)| {
            assert!(
                tile > 0 && image >= tile,
                "image size {image_size:?} smaller than patch {patch:?}"
            );
            let target_step = tile as f64 * step_size;
            let num_steps = ((image - tile) as f64 / target_step).ceil() as usize + 1;
            let max_start = image - tile;
            // With one window the step is irrelevant: it starts at 0.
            let actual_step = if num_steps > 1 {
                max_start as f64 / (num_steps - 1) as f64
            } else {
                0.0
            };
            (0..num_steps)
                .map(|i| (actual_step * i as f64).round_ties_even() as usize)
                .collect()
        })
        .collect()
}

/// One window over the (z, y, x) axes of an image: `start[a]..start[a] + size[a]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slicer {
    pub start: [usize; 3],
    pub size: [usize; 3],
}

impl Slicer {
    /// Slice of a (channels, z, y, x) array covering this window for all channels.
    pub fn channels_slice(&self) -> SliceInfo<[SliceInfoElem; 4], Ix4, Ix4> {
        let [z, y, x] = self.start;
        let [dz, dy, dx] = self.size;
        s![.., z..z + dz, y..y + dy, x..x + dx]
    }

    pub fn end(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.start[a] + self.size[a])
    }
}

/// Whether a patch describes a 2-D configuration: nnU-Net's 2-D patches are `[y, x]`, carried here as
/// `[1, y, x]` and run slice by slice. (No 3-D plan has a patch of 1 along an axis: pooling forbids it.)
pub fn is_2d_patch(patch: [usize; 3]) -> bool {
    patch[0] == 1
}

/// All windows over an image of (z, y, x) size `image_size` (already at least the patch), in nnU-Net's
/// order (`_internal_get_sliding_window_slicers`): for 3-D, z outermost and x innermost; for 2-D
/// (see [`is_2d_patch`]), every slice in turn, each covered by its own y-then-x grid.
pub fn sliding_window_slicers(image_size: [usize; 3], patch: [usize; 3], step_size: f64) -> Vec<Slicer> {
    let mut slicers = Vec::new();
    if is_2d_patch(patch) {
        let steps = compute_steps(&image_size[1..], &patch[1..], step_size);
        for z in 0..image_size[0] {
            for &y in &steps[0] {
                for &x in &steps[1] {
                    slicers.push(Slicer {
                        start: [z, y, x],
                        size: patch,
                    });
                }
            }
        }
    } else {
        let steps = compute_steps(&image_size, &patch, step_size);
        for &z in &steps[0] {
            for &y in &steps[1] {
                for &x in &steps[2] {
                    slicers.push(Slicer {
                        start: [z, y, x],
                        size: patch,
                    });
                }
            }
        }
    }
    slicers
}

/// Padding added around the spatial axes of an image smaller than the patch, and how to undo it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    /// Voxels added before the content on (z, y, x).
    pub before: [usize; 3],
    /// Voxels added after the content; gets the extra voxel when the difference is odd.
    pub after: [usize; 3],
}

impl Padding {
    pub fn is_none(&self) -> bool {
        self.before == [0; 3] && self.after == [0; 3]
    }

    /// The original content of a padded (channels, z, y, x) array (acvl_utils' returned slicer).
    pub fn unpad<'a, T>(&self, padded: ArrayView4<'a, T>) -> ArrayView4<'a, T> {
        let sh = padded.shape();
        let [bz, by, bx] = self.before;
        let [az, ay, ax] = self.after;
        padded.slice_move(s![.., bz..sh[1] - az, by..sh[2] - ay, bx..sh[3] - ax])
    }
}

/// acvl_utils' `pad_nd_image(image, patch, 'constant', value 0)` as nnU-Net calls it: every spatial axis
/// shorter than the patch is zero-padded to the patch size with the content centred, `diff / 2` before
/// and the rest after. Larger axes are never cropped. Borrows the image when nothing needs padding.
pub fn pad_to_patch(image: ArrayView4<'_, f32>, patch: [usize; 3]) -> (CowArray<'_, f32, Ix4>, Padding) {
    let spatial = [image.shape()[1], image.shape()[2], image.shape()[3]];
    let diff = [0, 1, 2].map(|a| patch[a].saturating_sub(spatial[a]));
    let padding = Padding {
        before: diff.map(|d| d / 2),
        after: diff.map(|d| d - d / 2),
    };
    if padding.is_none() {
        return (CowArray::from(image), padding);
    }
    let shape = [0, 1, 2].map(|a| spatial[a] + diff[a]);
    let mut padded = Array4::<f32>::zeros((image.shape()[0], shape[0], shape[1], shape[2]));
    let [bz, by, bx] = padding.before;
    padded
        .slice_mut(s![
            ..,
            bz..bz + spatial[0],
            by..by + spatial[1],
            bx..bx + spatial[2]
        ])
        .assign(&image);
    (CowArray::from(padded), padding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example() {
        assert_eq!(compute_steps(&[110], &[64], 0.5), vec![vec![0, 23, 46]]);
    }

    #[test]
    fn odd_padding_goes_after() {
        let image = Array4::<f32>::ones((1, 3, 4, 5));
        let (padded, padding) = pad_to_patch(image.view(), [4, 4, 8]);
        assert_eq!(padded.shape(), &[1, 4, 4, 8]);
        assert_eq!(
            padding,
            Padding {
                before: [0, 0, 1],
                after: [1, 0, 2]
            }
        );
        assert_eq!(padding.unpad(padded.view()), image);
    }
}
