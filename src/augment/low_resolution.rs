//! `low_resolution`: simulates a coarser acquisition per channel by nearest-exact downsampling to
//! `round(size * scale)` and linear upsampling back (batchgeneratorsv2 `SimulateLowResolutionTransform`,
//! torch `interpolate(mode='nearest-exact')` then `(tri)linear`, `align_corners=False`). Both steps are
//! separable, so they run one axis at a time.

use ndarray::{Array3, ArrayView3, ArrayViewMut3, Axis, Zip};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_axes, check_prob, check_range, sample_range, AugmentError, Sample, SampleRng};

fn yes() -> bool {
    true
}

/// `low_resolution` parameters (nnU-Net: p 0.25, zoom U(0.5, 1) shared by all axes, channel p 0.5;
/// dummy-2D patches ignore axis 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LowResolutionParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub scale: [f64; 2],
    pub synchronize_channels: bool,
    pub synchronize_axes: bool,
    /// Axes (0 = z, 1 = y, 2 = x) kept at full resolution.
    pub ignore_axes: Vec<usize>,
    pub p_per_channel: f64,
}

impl Default for LowResolutionParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.25,
            scale: [0.5, 1.0],
            synchronize_channels: false,
            synchronize_axes: true,
            ignore_axes: Vec::new(),
            p_per_channel: 0.5,
        }
    }
}

impl LowResolutionParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "low_resolution";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_channel", self.p_per_channel)?;
        check_range(T, "scale", self.scale)?;
        check_axes(T, "ignore_axes", &self.ignore_axes)?;
        if self.scale[0] <= 0.0 {
            return Err(AugmentError::Invalid {
                transform: T,
                message: "`scale` must be > 0".into(),
            });
        }
        Ok(())
    }

    /// The coarsened channels and each one's zoom along (z, y, x), 1 on the ignored axes.
    pub fn draw(&self, rng: &mut SampleRng, channels: usize) -> Vec<(usize, [f64; 3])> {
        let picked: Vec<usize> = (0..channels)
            .filter(|_| rng.bernoulli(self.p_per_channel))
            .collect();
        let draw = |rng: &mut SampleRng| -> [f64; 3] {
            if self.synchronize_axes {
                [sample_range(rng, self.scale); 3]
            } else {
                [0, 1, 2].map(|_| sample_range(rng, self.scale))
            }
        };
        let shared = draw(rng);
        picked
            .into_iter()
            .map(|c| {
                let mut scales = if self.synchronize_channels {
                    shared
                } else {
                    draw(rng)
                };
                for &a in &self.ignore_axes {
                    scales[a] = 1.0;
                }
                (c, scales)
            })
            .collect()
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        for (c, scales) in self.draw(rng, sample.data.len_of(Axis(0))) {
            simulate_low_resolution(sample.data.index_axis_mut(Axis(0), c), scales);
        }
    }
}

/// The reduced size of an axis: torch stores the scale as float32, Python rounds half to even, and we
/// keep at least one voxel (torch would fail on zero).
fn reduced_len(n: usize, scale: f64) -> usize {
    let s = scale as f32 as f64;
    ((n as f64 * s).round_ties_even() as usize).max(1)
}

/// Down- then up-samples one channel in place.
pub fn simulate_low_resolution(mut x: ArrayViewMut3<f32>, scales: [f64; 3]) {
    let shape = [x.len_of(Axis(0)), x.len_of(Axis(1)), x.len_of(Axis(2))];
    let small = [0, 1, 2].map(|a| reduced_len(shape[a], scales[a]));
    if small == shape {
        return;
    }
    let mut cur = x.to_owned();
    for (a, &n) in small.iter().enumerate() {
        cur = resize_axis(cur.view(), a, n, nearest_exact_taps);
    }
    for (a, &n) in shape.iter().enumerate() {
        cur = resize_axis(cur.view(), a, n, linear_taps);
    }
    x.assign(&cur);
}

/// Source taps of one output position: up to two (index, weight) pairs.
type Taps = [(usize, f32); 2];

/// torch 'nearest-exact': `min(floor((dst + 0.5) * in / out), in - 1)`, in float32 as torch does.
fn nearest_exact_taps(dst: usize, n_in: usize, n_out: usize) -> Taps {
    let scale = n_in as f32 / n_out as f32;
    let src = (((dst as f32 + 0.5) * scale).floor() as usize).min(n_in - 1);
    [(src, 1.0), (src, 0.0)]
}

/// torch 'linear' with `align_corners=False`: half-pixel source coordinate clamped at 0.
fn linear_taps(dst: usize, n_in: usize, n_out: usize) -> Taps {
    let scale = n_in as f32 / n_out as f32;
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n_in - 1);
    let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
    let l1 = src - i0 as f32;
    [(i0, 1.0 - l1), (i1, l1)]
}

/// Resamples `x` along `axis` to `n_out` samples with the given tap rule.
fn resize_axis(
    x: ArrayView3<f32>,
    axis: usize,
    n_out: usize,
    taps: fn(usize, usize, usize) -> Taps,
) -> Array3<f32> {
    let n_in = x.len_of(Axis(axis));
    let mut shape = [x.len_of(Axis(0)), x.len_of(Axis(1)), x.len_of(Axis(2))];
    shape[axis] = n_out;
    let mut out = Array3::<f32>::zeros(shape);
    if n_in == n_out {
        out.assign(&x);
        return out;
    }
    let table: Vec<Taps> = (0..n_out).map(|d| taps(d, n_in, n_out)).collect();
    if x.stride_of(Axis(axis)).unsigned_abs() == 1 {
        for (src_lane, mut dst_lane) in x.lanes(Axis(axis)).into_iter().zip(out.lanes_mut(Axis(axis))) {
            for (d, t) in dst_lane.iter_mut().zip(&table) {
                *d = src_lane[t[0].0] * t[0].1 + src_lane[t[1].0] * t[1].1;
            }
        }
    } else {
        // across planes: the same two products per voxel, over contiguous planes instead of gathering
        // strided lanes (several times faster on 128^3 patches)
        for (d, t) in table.iter().enumerate() {
            Zip::from(out.index_axis_mut(Axis(axis), d))
                .and(x.index_axis(Axis(axis), t[0].0))
                .and(x.index_axis(Axis(axis), t[1].0))
                .for_each(|o, &a, &b| *o = a * t[0].1 + b * t[1].1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_half_to_even() {
        assert_eq!(reduced_len(5, 0.5), 2);
        assert_eq!(reduced_len(7, 0.5), 4);
        assert_eq!(reduced_len(1, 0.5), 1);
        assert_eq!(reduced_len(128, 0.6), 77);
    }

    #[test]
    fn constant_survives_and_unit_scale_is_identity() {
        let mut a = Array3::<f32>::from_elem((6, 7, 8), 1.5);
        simulate_low_resolution(a.view_mut(), [0.5, 0.6, 0.7]);
        assert!(a.iter().all(|&v| (v - 1.5).abs() < 1e-6));
        let b0 = Array3::from_shape_fn((4, 5, 6), |(z, y, x)| (z * 30 + y * 6 + x) as f32);
        let mut b = b0.clone();
        simulate_low_resolution(b.view_mut(), [1.0, 1.0, 1.0]);
        assert_eq!(b, b0);
    }
}
