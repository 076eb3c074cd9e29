//! Where each foreground class (or region) lies, sampled per case at preprocessing time so that
//! training can centre a third of its patches on foreground (nnU-Net's oversampling). Reproduces
//! nnU-Net 2.8.1's `_sample_foreground_locations`: voxels of the requested labels in C order,
//! grouped by label (stable), then `max(min(10000, n), ceil(1% of n))` drawn without replacement
//! with numpy's `RandomState(1234)`.

use std::collections::BTreeMap;

use ndarray::ArrayView4;

use super::numpy_random::RandomState;

pub const SEED: u32 = 1234;
const MIN_SAMPLES: usize = 10_000;
const MIN_COVERAGE: f64 = 0.01;

pub use crate::data::target::Target;

/// Sampled `[c, z, y, x]` coordinates per target key. `seg` is (1, z, y, x).
pub fn sample(seg: ArrayView4<i16>, targets: &[Target]) -> BTreeMap<String, Vec<[usize; 4]>> {
    let mut random = RandomState::new(SEED);
    let wanted: std::collections::BTreeSet<i32> = targets.iter().flat_map(Target::labels).collect();
    // Coordinates of every wanted voxel, grouped by label, each group in C order (what a stable
    // sort by label of numpy's argwhere gives).
    let mut by_label: BTreeMap<i32, Vec<[usize; 4]>> = BTreeMap::new();
    for ((c, z, y, x), &value) in seg.indexed_iter() {
        let value = i32::from(value);
        if wanted.contains(&value) {
            by_label.entry(value).or_default().push([c, z, y, x]);
        }
    }
    let mut locations = BTreeMap::new();
    for target in targets {
        // The union of the target's labels, in the order the target lists them (nnU-Net's ranges).
        let groups: Vec<&Vec<[usize; 4]>> = target.labels().iter().filter_map(|l| by_label.get(l)).collect();
        let total: usize = groups.iter().map(|g| g.len()).sum();
        if total == 0 {
            locations.insert(target.location_key(), Vec::new());
            continue;
        }
        let count = MIN_SAMPLES
            .min(total)
            .max((total as f64 * MIN_COVERAGE).ceil() as usize);
        let picked = random
            .choice_without_replacement(total, count)
            .into_iter()
            .map(|mut offset| {
                for group in &groups {
                    if offset < group.len() {
                        return group[offset];
                    }
                    offset -= group.len();
                }
                unreachable!("offset below the total")
            })
            .collect();
        locations.insert(target.location_key(), picked);
    }
    locations
}
