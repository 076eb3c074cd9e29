//! `gaussian_blur`: separable Gaussian smoothing per channel (batchgeneratorsv2 `GaussianBlurTransform`
//! with `blur_dimension`: kernel truncated at 6 sigma, odd size, reflect padding).

use ndarray::{ArrayViewMut3, Axis, Zip};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_prob, check_range, sample_range, AugmentError, Sample, SampleRng};

/// `blur_dimension` calls `_build_kernel` with truncate = 6 (not scipy's 4).
const TRUNCATE: f64 = 6.0;

fn yes() -> bool {
    true
}

/// `gaussian_blur` parameters (nnU-Net: p 0.2, sigma U(0.5, 1) per axis and channel, channel p 0.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GaussianBlurParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub sigma: [f64; 2],
    pub synchronize_channels: bool,
    /// One sigma for all axes of a channel (nnU-Net: false, each axis draws its own).
    pub synchronize_axes: bool,
    pub p_per_channel: f64,
}

impl Default for GaussianBlurParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.2,
            sigma: [0.5, 1.0],
            synchronize_channels: false,
            synchronize_axes: false,
            p_per_channel: 0.5,
        }
    }
}

impl GaussianBlurParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "gaussian_blur";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_channel", self.p_per_channel)?;
        check_range(T, "sigma", self.sigma)?;
        if self.sigma[0] <= 0.0 {
            return Err(AugmentError::Invalid {
                transform: T,
                message: "`sigma` must be > 0".into(),
            });
        }
        Ok(())
    }

    /// The blurred channels and each one's sigmas along (z, y, x) (a 2D sample's z is drawn but
    /// unused).
    pub fn draw(&self, rng: &mut SampleRng, channels: usize) -> Vec<(usize, [f64; 3])> {
        let picked: Vec<usize> = (0..channels)
            .filter(|_| rng.bernoulli(self.p_per_channel))
            .collect();
        let draw = |rng: &mut SampleRng| -> [f64; 3] {
            if self.synchronize_axes {
                [sample_range(rng, self.sigma); 3]
            } else {
                [0, 1, 2].map(|_| sample_range(rng, self.sigma))
            }
        };
        let shared = draw(rng);
        picked
            .into_iter()
            .map(|c| {
                (
                    c,
                    if self.synchronize_channels {
                        shared
                    } else {
                        draw(rng)
                    },
                )
            })
            .collect()
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        for (c, sigmas) in self.draw(rng, sample.data.len_of(Axis(0))) {
            blur_channel(sample.data.index_axis_mut(Axis(0), c), sigmas);
        }
    }
}

/// Blurs one channel along z, y, x in turn; axes of length 1 (2D samples) are left alone.
pub fn blur_channel(mut x: ArrayViewMut3<f32>, sigmas: [f64; 3]) {
    for (axis, &sigma) in sigmas.iter().enumerate() {
        if x.len_of(Axis(axis)) > 1 {
            blur_axis(x.view_mut(), axis, sigma);
        }
    }
}

/// Python's `round` (half to even) followed by batchgeneratorsv2's "nearest odd" adjustment.
fn kernel_size(sigma: f64) -> usize {
    let n = sigma * TRUNCATE + 0.5;
    let rounded = n.round_ties_even();
    let k = if rounded as i64 % 2 == 1 {
        rounded
    } else if n - rounded >= 0.0 {
        rounded + 1.0
    } else {
        rounded - 1.0
    };
    k.max(1.0) as usize
}

/// Normalised Gaussian taps on `linspace(-(k-1)/2, (k-1)/2, k)`.
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let k = kernel_size(sigma);
    let half = (k as f64 - 1.0) / 2.0;
    let taps: Vec<f64> = (0..k)
        .map(|i| (-0.5 * ((i as f64 - half) / sigma).powi(2)).exp())
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.iter().map(|t| t / sum).collect()
}

/// torch's 'reflect' padding (mirror about the edge sample, edge not repeated), folded repeatedly so
/// that kernels longer than the axis stay defined where torch would raise.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Convolves every lane along `axis` with the Gaussian of `sigma`.
///
/// Each output is `sum_k w_k * x[reflect(i + k - r)]` accumulated in f64 in tap order, whichever loop
/// computes it. The reflection is tabulated once per axis (a remainder per tap and voxel used to cost
/// more than the arithmetic), and axes other than the contiguous one are convolved plane by plane, so
/// the inner loop runs over contiguous memory instead of gathering strided lanes.
pub fn blur_axis(mut x: ArrayViewMut3<f32>, axis: usize, sigma: f64) {
    let kernel = gaussian_kernel(sigma);
    let taps = kernel.len();
    let r = (taps / 2) as isize;
    let n = x.len_of(Axis(axis));
    // source position of tap k for output i, at src_of[i * taps + k]
    let src_of: Vec<usize> = (0..n)
        .flat_map(|i| (0..taps).map(move |k| reflect(i as isize + k as isize - r, n)))
        .collect();
    if x.stride_of(Axis(axis)).unsigned_abs() == 1 {
        let mut lane_copy = vec![0f32; n];
        for mut lane in x.lanes_mut(Axis(axis)) {
            for (dst, src) in lane_copy.iter_mut().zip(lane.iter()) {
                *dst = *src;
            }
            for (i, out) in lane.iter_mut().enumerate() {
                let src = &src_of[i * taps..][..taps];
                let acc: f64 = kernel
                    .iter()
                    .zip(src)
                    .map(|(w, &j)| w * lane_copy[j] as f64)
                    .sum();
                *out = acc as f32;
            }
        }
    } else {
        let source = x.to_owned();
        let plane_dim = source.index_axis(Axis(axis), 0).raw_dim();
        let mut acc = ndarray::Array2::<f64>::zeros(plane_dim);
        for i in 0..n {
            // -0.0 is where `Iterator::sum` starts, so this adds exactly what the lane loop adds
            acc.fill(-0.0);
            for (w, &j) in kernel.iter().zip(&src_of[i * taps..][..taps]) {
                Zip::from(&mut acc)
                    .and(source.index_axis(Axis(axis), j))
                    .for_each(|a, &v| *a += w * v as f64);
            }
            Zip::from(x.index_axis_mut(Axis(axis), i))
                .and(&acc)
                .for_each(|out, &a| *out = a as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_sizes_match_batchgeneratorsv2() {
        // sigma 0.5 -> round(3.5) = 4 (half to even) -> 3; sigma 1 -> round(6.5) = 6 -> 7
        assert_eq!(kernel_size(0.5), 3);
        assert_eq!(kernel_size(1.0), 7);
        assert_eq!(kernel_size(0.8), 5);
        let k = gaussian_kernel(1.0);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((k[0] - k[6]).abs() < 1e-15 && k[3] > k[2]);
    }

    #[test]
    fn reflect_matches_torch_padding() {
        let idx: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(idx, vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn constant_image_is_unchanged() {
        let mut a = ndarray::Array3::<f32>::from_elem((5, 6, 7), 2.5);
        blur_channel(a.view_mut(), [0.7, 0.9, 1.0]);
        assert!(a.iter().all(|&v| (v - 2.5).abs() < 1e-6));
    }
}
