//! The Gaussian importance map that weights each patch prediction (nnU-Net's `compute_gaussian`).
//!
//! nnU-Net puts a unit impulse at the patch centre (`size // 2` per axis) and blurs it with
//! `scipy.ndimage.gaussian_filter(mode='constant', cval=0, truncate=4.0)`, sigma = `size * sigma_scale`
//! per axis. A blurred impulse is just the outer product of the 1-D kernels around the centre, so that is
//! computed directly, multiplying the axes in scipy's order (axis 0 first) so the float64 rounding
//! matches. The map is then divided by `max / value_scaling_factor`, cast, and its zeros are replaced
//! by the smallest non-zero value because the accumulated weights are later used as divisors.

use ndarray::{ArrayD, IxDyn};

use super::precision::{round_to_f16, Precision};

/// nnU-Net's `sigma_scale` for inference.
pub const SIGMA_SCALE: f64 = 1.0 / 8.0;
/// nnU-Net's `value_scaling_factor` for inference (it multiplies the map so its peak is 10).
pub const VALUE_SCALING_FACTOR: f64 = 10.0;
/// scipy's default `truncate`: the kernel reaches `int(4 * sigma + 0.5)` samples either side.
const TRUNCATE: f64 = 4.0;
/// scipy skips axes whose sigma is at most this.
const MIN_SIGMA: f64 = 1e-15;

/// The importance map for `patch` (any number of axes), as nnU-Net builds it on the CPU in float32.
/// A 2-D configuration may pass `[1, y, x]`: the singleton axis only scales the map by a constant
/// that the division by the maximum removes.
pub fn gaussian_importance_map(patch: &[usize], sigma_scale: f64, value_scaling_factor: f64) -> ArrayD<f32> {
    gaussian_importance_map_in(patch, sigma_scale, value_scaling_factor, Precision::Single)
}

/// As [`gaussian_importance_map`], with the values rounded to `precision` before the zero
/// replacement, which is where nnU-Net's default float16 map loses its tails.
pub fn gaussian_importance_map_in(
    patch: &[usize],
    sigma_scale: f64,
    value_scaling_factor: f64,
    precision: Precision,
) -> ArrayD<f32> {
    assert!(
        patch.iter().all(|&p| p > 0),
        "patch sizes must be positive: {patch:?}"
    );
    let profiles: Vec<Vec<f64>> = patch
        .iter()
        .map(|&n| axis_profile(n, n as f64 * sigma_scale))
        .collect();
    let impulse = ArrayD::<f64>::from_shape_fn(IxDyn(patch), |idx| {
        // Each 1-D pass multiplies the running value by one tap (the other taps meet zeros).
        let mut v = 1.0;
        for (axis, profile) in profiles.iter().enumerate() {
            v *= profile[idx[axis]];
        }
        v
    });
    let max = impulse.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let divisor = max / value_scaling_factor;
    // torch casts float64 -> float16 through float32 (c10::Half is built from a float), so rounding to
    // float32 first is also what the half map sees.
    let mut map = impulse.mapv(|v| {
        let single = (v / divisor) as f32;
        match precision {
            Precision::Single => single,
            Precision::Half => round_to_f16(single),
        }
    });
    let smallest = map
        .iter()
        .copied()
        .filter(|&v| v != 0.0)
        .fold(f32::INFINITY, f32::min);
    map.mapv_inplace(|v| if v == 0.0 { smallest } else { v });
    map
}

/// The filtered impulse along one axis of length `n`: kernel taps around the centre `n / 2`, zero
/// beyond the kernel's reach (scipy's constant mode with cval 0).
fn axis_profile(n: usize, sigma: f64) -> Vec<f64> {
    let centre = n / 2;
    if sigma <= MIN_SIGMA {
        // scipy leaves such an axis unfiltered: the impulse stays an impulse.
        return (0..n).map(|i| if i == centre { 1.0 } else { 0.0 }).collect();
    }
    let radius = (TRUNCATE * sigma + 0.5) as usize;
    let kernel = scipy_gaussian_kernel(sigma, radius);
    (0..n)
        .map(|i| {
            let d = i.abs_diff(centre);
            if d <= radius {
                kernel[radius + d]
            } else {
                0.0
            }
        })
        .collect()
}

/// scipy's `_gaussian_kernel1d` (order 0): `exp(-0.5 / sigma^2 * x^2)` on `-radius..=radius`,
/// normalised by its numpy sum.
fn scipy_gaussian_kernel(sigma: f64, radius: usize) -> Vec<f64> {
    let coefficient = -0.5 / (sigma * sigma);
    let r = radius as i64;
    let taps: Vec<f64> = (-r..=r).map(|x| (coefficient * (x * x) as f64).exp()).collect();
    let sum = numpy_pairwise_sum(&taps);
    taps.iter().map(|t| t / sum).collect()
}

/// numpy's pairwise summation for contiguous float64 (8 interleaved partial sums per block of at most
/// 128, recursive halving above), so the kernel normalisation rounds like `phi_x.sum()`.
fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |acc, &x| acc + x)
    } else if n <= BLOCK {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        for chunk in a[8..whole].chunks_exact(8) {
            for (acc, &x) in r.iter_mut().zip(chunk) {
                *acc += x;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[whole..] {
            res += x;
        }
        res
    } else {
        let mut half = n / 2;
        half -= half % 8;
        numpy_pairwise_sum(&a[..half]) + numpy_pairwise_sum(&a[half..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_scaling_factor_at_the_centre() {
        let map = gaussian_importance_map(&[6, 7], SIGMA_SCALE, VALUE_SCALING_FACTOR);
        assert_eq!(map[[3, 3]], 10.0);
        assert!(map.iter().all(|&v| v > 0.0 && v <= 10.0));
    }

    #[test]
    fn pairwise_sum_matches_plain_sum_on_exact_values() {
        let v: Vec<f64> = (0..300).map(f64::from).collect();
        assert_eq!(numpy_pairwise_sum(&v), 44850.0);
    }
}
