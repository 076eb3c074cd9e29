//! Connected components of a binary volume, as skimage.measure.label finds them: labelling with
//! component sizes (acvl_utils' `label_with_component_sizes`) and the largest component(s) of a mask
//! (acvl_utils' `remove_all_but_largest_component`). nnU-Net's postprocessing (`evaluate::postprocess`)
//! and the cascade's augmentation (`augment::cascade`) both build on it.

use ndarray::{Array3, ArrayView3};

/// Which voxels touch: `Faces` (6 in 3D, scipy.ndimage.label's default) or `Full` (26 in 3D, 8 in 2D:
/// skimage.measure.label's default, which nnU-Net's postprocessing uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Connectivity {
    Faces,
    #[default]
    Full,
}

/// The voxels of `mask` in its largest connected component(s): every component of the largest size is
/// kept. An empty mask gives an empty mask.
pub fn largest_component_mask(mask: ArrayView3<bool>, connectivity: Connectivity) -> Array3<bool> {
    let dim = mask.dim();
    let mask = mask.as_standard_layout();
    let domain = mask.as_slice().expect("standard layout");
    let grid = Grid::new(dim, connectivity);
    let mut visited = vec![false; domain.len()];
    let mut stack = Vec::new();
    let mut components = Vec::new(); // (seed, size)
    for seed in 0..domain.len() {
        if domain[seed] && !visited[seed] {
            components.push((seed, grid.flood(seed, domain, &mut visited, &mut stack, |_| {})));
        }
    }
    let largest = components.iter().map(|&(_, size)| size).max().unwrap_or(0);
    let mut keep = vec![false; domain.len()];
    for &(seed, size) in &components {
        if size == largest {
            grid.flood(seed, domain, &mut keep, &mut stack, |_| {});
        }
    }
    Array3::from_shape_vec(dim, keep).expect("shape of the mask")
}

/// skimage.measure.label with `return_num` plus acvl_utils' component sizes: each component of `mask`
/// gets a label 1, 2, ... in the raster order of its first voxel (0 = outside the mask), and
/// `sizes[l - 1]` is the voxel count of label `l`. Full connectivity in a volume with one z plane is
/// 8-connectivity in that plane, as skimage gives for a 2D image.
pub fn label_components(mask: ArrayView3<bool>, connectivity: Connectivity) -> (Array3<u32>, Vec<usize>) {
    let dim = mask.dim();
    let mask = mask.as_standard_layout();
    let domain = mask.as_slice().expect("standard layout");
    let grid = Grid::new(dim, connectivity);
    let mut visited = vec![false; domain.len()];
    let mut labels = vec![0u32; domain.len()];
    let mut stack = Vec::new();
    let mut sizes = Vec::new();
    for seed in 0..domain.len() {
        if domain[seed] && !visited[seed] {
            let label = sizes.len() as u32 + 1;
            let size = grid.flood(seed, domain, &mut visited, &mut stack, |voxel| {
                labels[voxel] = label
            });
            sizes.push(size);
        }
    }
    (
        Array3::from_shape_vec(dim, labels).expect("shape of the mask"),
        sizes,
    )
}

/// A volume in C order and its neighbour offsets.
struct Grid {
    dim: (usize, usize, usize),
    offsets: Vec<(isize, isize, isize)>,
    flat: Vec<isize>,
}

impl Grid {
    fn new(dim: (usize, usize, usize), connectivity: Connectivity) -> Grid {
        let mut offsets = Vec::new();
        for dz in -1isize..=1 {
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let hops = dz.abs() + dy.abs() + dx.abs();
                    if hops > 0 && (connectivity == Connectivity::Full || hops == 1) {
                        offsets.push((dz, dy, dx));
                    }
                }
            }
        }
        let (ny, nx) = (dim.1 as isize, dim.2 as isize);
        let flat = offsets
            .iter()
            .map(|&(dz, dy, dx)| (dz * ny + dy) * nx + dx)
            .collect();
        Grid { dim, offsets, flat }
    }

    /// Marks in `visited` the component of `domain` holding `seed` (not yet visited), calling `reached`
    /// once per voxel of it; returns its size.
    fn flood(
        &self,
        seed: usize,
        domain: &[bool],
        visited: &mut [bool],
        stack: &mut Vec<usize>,
        mut reached: impl FnMut(usize),
    ) -> usize {
        let (nz, ny, nx) = self.dim;
        let plane = ny * nx;
        visited[seed] = true;
        stack.push(seed);
        let mut size = 0;
        while let Some(index) = stack.pop() {
            size += 1;
            reached(index);
            let (z, y, x) = (index / plane, index % plane / nx, index % nx);
            let interior = z > 0 && z + 1 < nz && y > 0 && y + 1 < ny && x > 0 && x + 1 < nx;
            for (n, &(dz, dy, dx)) in self.offsets.iter().enumerate() {
                let neighbour = if interior {
                    (index as isize + self.flat[n]) as usize
                } else {
                    let (z, y, x) = (z as isize + dz, y as isize + dy, x as isize + dx);
                    if z < 0 || y < 0 || x < 0 || z >= nz as isize || y >= ny as isize || x >= nx as isize {
                        continue;
                    }
                    (z as usize * ny + y as usize) * nx + x as usize
                };
                if domain[neighbour] && !visited[neighbour] {
                    visited[neighbour] = true;
                    stack.push(neighbour);
                }
            }
        }
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_connectivity_joins_diagonals_and_ties_are_all_kept() {
        let mut mask = Array3::from_elem((3, 3, 4), false);
        mask[[0, 0, 0]] = true;
        mask[[1, 1, 1]] = true;
        mask[[2, 2, 3]] = true;
        mask[[2, 2, 2]] = true;
        let full = largest_component_mask(mask.view(), Connectivity::Full);
        assert_eq!(full, mask);
        let faces = largest_component_mask(mask.view(), Connectivity::Faces);
        assert_eq!(faces.iter().filter(|&&v| v).count(), 2);
        assert!(faces[[2, 2, 3]] && faces[[2, 2, 2]]);
        let empty = Array3::from_elem((2, 2, 2), false);
        assert_eq!(largest_component_mask(empty.view(), Connectivity::Full), empty);
    }
}
