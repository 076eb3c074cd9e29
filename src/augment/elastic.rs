//! The elastic displacement field of batchgeneratorsv2's `SpatialTransform` (the method of
//! `augment_spatial_2` in batchgenerators v1).
//!
//! Per patch axis `d` it draws standard normal noise over the whole output patch, smooths it with a
//! periodic Gaussian of one sigma `sigma_d` (in voxels) along every axis, and rescales it so that its
//! largest absolute value is `magnitude_d` voxels. The fields displace the output grid before the affine
//! (`A (x + offset)`); batchgeneratorsv2 then re-centres the warped grid on its mean, which for a centred
//! grid is the same as removing each field's mean, done here.
//!
//! batchgeneratorsv2 smooths with `scipy.ndimage.fourier_gaussian` on the FFT of the noise: it multiplies
//! frequency `k` (in `fftfreq` order) of an axis of length `n` by `exp(-2 pi^2 sigma^2 (k / n)^2)`. That
//! filter is separable and real, so along each axis it is exactly a circular convolution with the
//! inverse DFT of the 1D factor, and equally a sum over the frequencies it passes. We apply whichever
//! is cheaper (no FFT needed): the convolution for small sigmas (short kernels), the few surviving
//! Fourier modes for large ones. Kernel taps below 1e-10 of the peak and modes damped below 1e-10 are
//! dropped, far under float32 resolution.

use super::SampleRng;

/// Elastic offsets over an output patch, in output voxels before the affine.
#[derive(Debug, Clone, PartialEq)]
pub struct Displacement {
    /// The patch the field covers: (z, y, x), or (y, x) for 2D (then every z slice shares it).
    pub shape: Vec<usize>,
    /// One field per patch axis, in the order of `shape`, each row-major over `shape`.
    pub fields: Vec<Vec<f32>>,
}

impl Displacement {
    /// batchgeneratorsv2's field for the drawn per-axis sigmas (voxels) and magnitudes (voxels), with
    /// `torch.normal` noise replaced by our generator (field 0 first, row-major). `center` removes each
    /// field's mean (`center_deformation`).
    pub fn draw(
        shape: &[usize],
        sigmas: &[f64],
        magnitudes: &[f64],
        rng: &mut SampleRng,
        center: bool,
    ) -> Self {
        let len: usize = shape.iter().product();
        let noise = (0..shape.len())
            .map(|_| (0..len).map(|_| rng.normal() as f32).collect())
            .collect();
        Self::from_noise(shape, noise, sigmas, magnitudes, center)
    }

    /// The deterministic part: smoothing, magnitude scaling and centring of given noise fields.
    pub fn from_noise(
        shape: &[usize],
        noise: Vec<Vec<f32>>,
        sigmas: &[f64],
        magnitudes: &[f64],
        center: bool,
    ) -> Self {
        let fields = noise
            .into_iter()
            .enumerate()
            .map(|(d, mut field)| {
                for axis in 0..shape.len() {
                    let (taps, modes) = (
                        gaussian_taps(shape[axis], sigmas[d]),
                        gaussian_modes(shape[axis], sigmas[d]),
                    );
                    // per voxel: one multiply-add per tap, or two per mode (analysis and synthesis)
                    field = if taps.len() <= 2 * modes.len() {
                        convolve_periodic(&field, shape, axis, &taps)
                    } else {
                        filter_modes(&field, shape, axis, &modes)
                    };
                }
                scale_to_magnitude(&mut field, magnitudes[d]);
                if center {
                    remove_mean(&mut field);
                }
                field
            })
            .collect();
        Self {
            shape: shape.to_vec(),
            fields,
        }
    }
}

/// `fourier_gaussian`'s factor for frequency index `k` (`fftfreq` order: 0, 1, ..., then negative; only
/// `k^2` matters, so the Nyquist sign is irrelevant) on an axis of length `n`.
fn gaussian_response(n: usize, k: usize, sigma: f64) -> f64 {
    let nf = n as f64;
    let kk = if k < n.div_ceil(2) {
        k as f64
    } else {
        k as f64 - nf
    };
    (-2.0 * (std::f64::consts::PI * sigma * kk / nf).powi(2)).exp()
}

/// `cos` / `sin` of `2 pi k j / n`, with `k j` reduced mod `n` first so the argument stays small.
fn phase(k: usize, j: usize, n: usize) -> f64 {
    std::f64::consts::TAU * ((k * j) % n) as f64 / n as f64
}

/// Circular taps `(shift, weight)` equal to `fourier_gaussian` with `sigma` on an axis of length `n`:
/// `h[m] = 1/n sum_k exp(-2 pi^2 sigma^2 (k/n)^2) cos(2 pi k m / n)`, `k` in `fftfreq` order.
pub fn gaussian_taps(n: usize, sigma: f64) -> Vec<(usize, f32)> {
    let nf = n as f64;
    let response: Vec<f64> = (0..n).map(|k| gaussian_response(n, k, sigma)).collect();
    let h: Vec<f64> = (0..n)
        .map(|m| {
            let sum: f64 = (0..n).map(|k| response[k] * phase(k, m, n).cos()).sum();
            sum / nf
        })
        .collect();
    let peak = h.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    h.iter()
        .enumerate()
        .filter(|(_, &w)| w.abs() > 1e-10 * peak)
        .map(|(m, &w)| (m, w as f32))
        .collect()
}

/// The same filter as the real Fourier modes it passes: `(analysis, synthesis)` rows of length `n` with
/// `y[i] = sum_modes synthesis[i] * sum_j analysis[j] x[j]`. Frequencies `k` and `-k` pair into a cosine
/// and a sine mode of weight `2 H_k / n`; the mean and the Nyquist frequency stand alone with `H_k / n`.
pub fn gaussian_modes(n: usize, sigma: f64) -> Vec<(Vec<f32>, Vec<f32>)> {
    let nf = n as f64;
    let mut modes = Vec::new();
    // the response falls with |k|, so the kept frequencies are 0..=k_max
    for k in 0..=n / 2 {
        let h = gaussian_response(n, k, sigma);
        if h <= 1e-10 {
            break;
        }
        let basis = |f: fn(f64) -> f64, weight: f64| -> (Vec<f32>, Vec<f32>) {
            let b: Vec<f64> = (0..n).map(|j| f(phase(k, j, n))).collect();
            (
                b.iter().map(|&v| v as f32).collect(),
                b.iter().map(|&v| (weight * v) as f32).collect(),
            )
        };
        if k == 0 || 2 * k == n {
            modes.push(basis(f64::cos, h / nf));
        } else {
            modes.push(basis(f64::cos, 2.0 * h / nf));
            modes.push(basis(f64::sin, 2.0 * h / nf));
        }
    }
    modes
}

/// Applies [`gaussian_modes`] along `axis` of a row-major array of `shape`.
pub fn filter_modes(x: &[f32], shape: &[usize], axis: usize, modes: &[(Vec<f32>, Vec<f32>)]) -> Vec<f32> {
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut y = vec![0f32; x.len()];
    let mut coeff = vec![0f32; inner];
    for o in 0..outer {
        let (src, dst) = (
            &x[o * n * inner..][..n * inner],
            &mut y[o * n * inner..][..n * inner],
        );
        if inner == 1 {
            // along the contiguous axis: a dot product for the coefficient, an axpy to add the mode
            for (analysis, synthesis) in modes {
                let c: f32 = analysis.iter().zip(src).map(|(a, s)| a * s).sum();
                for (d, b) in dst.iter_mut().zip(synthesis) {
                    *d += b * c;
                }
            }
            continue;
        }
        for (analysis, synthesis) in modes {
            // the mode's coefficient for every lane of this block, then its contribution to every row
            coeff.fill(0.0);
            for (j, &a) in analysis.iter().enumerate() {
                for (c, s) in coeff.iter_mut().zip(&src[j * inner..][..inner]) {
                    *c += a * s;
                }
            }
            for (i, &b) in synthesis.iter().enumerate() {
                for (d, c) in dst[i * inner..][..inner].iter_mut().zip(&coeff) {
                    *d += b * c;
                }
            }
        }
    }
    y
}

/// `y[i] = sum_m w_m x[(i - m) mod n]` along `axis` of a row-major array of `shape`.
pub fn convolve_periodic(x: &[f32], shape: &[usize], axis: usize, taps: &[(usize, f32)]) -> Vec<f32> {
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut y = vec![0f32; x.len()];
    for o in 0..outer {
        let (src, dst) = (
            &x[o * n * inner..][..n * inner],
            &mut y[o * n * inner..][..n * inner],
        );
        if inner == 1 {
            // along the contiguous axis: each tap is a rotated axpy over the whole line
            for &(m, w) in taps {
                for (d, s) in dst[m..].iter_mut().zip(&src[..n - m]) {
                    *d += w * s;
                }
                for (d, s) in dst[..m].iter_mut().zip(&src[n - m..]) {
                    *d += w * s;
                }
            }
        } else {
            // across rows: axpy of whole contiguous rows, which vectorises
            for i in 0..n {
                let row = &mut dst[i * inner..][..inner];
                for &(m, w) in taps {
                    let j = (i + n - m) % n;
                    for (d, s) in row.iter_mut().zip(&src[j * inner..][..inner]) {
                        *d += w * s;
                    }
                }
            }
        }
    }
    y
}

/// `field *= max(magnitude, 1e-8) / max|field|`, batchgeneratorsv2's clip keeping a zero magnitude finite.
fn scale_to_magnitude(field: &mut [f32], magnitude: f64) {
    let peak = field.iter().fold(0.0f32, |a, &b| a.max(b.abs())) as f64;
    if peak > 0.0 {
        let factor = (magnitude.max(1e-8) / peak) as f32;
        field.iter_mut().for_each(|v| *v *= factor);
    }
}

fn remove_mean(field: &mut [f32]) {
    let mean = field.iter().map(|&v| v as f64).sum::<f64>() / field.len().max(1) as f64;
    field.iter_mut().for_each(|v| *v = (*v as f64 - mean) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_narrow_sigma_is_identity() {
        for (n, sigma) in [(16, 2.0), (17, 3.5), (128, 25.6)] {
            let sum: f32 = gaussian_taps(n, sigma).iter().map(|t| t.1).sum();
            assert!((sum - 1.0).abs() < 1e-5, "{n} {sigma}: {sum}");
        }
        assert_eq!(gaussian_taps(9, 0.0), vec![(0, 1.0)]);
    }

    #[test]
    fn periodic_convolution_along_each_axis_matches_direct_sum() {
        let shape = [3, 4, 5];
        let x: Vec<f32> = (0..60).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let taps = [(0, 0.5), (1, 0.25), (3, 0.125)];
        for axis in 0..3 {
            let got = convolve_periodic(&x, &shape, axis, &taps);
            let strides = [20, 5, 1];
            for (i, &g) in got.iter().enumerate() {
                let pos = [i / 20, (i / 5) % 4, i % 5];
                let want: f32 = taps
                    .iter()
                    .map(|&(m, w)| {
                        let mut q = pos;
                        q[axis] = (pos[axis] + shape[axis] - m % shape[axis]) % shape[axis];
                        w * x[q[0] * strides[0] + q[1] * strides[1] + q[2] * strides[2]]
                    })
                    .sum();
                assert!((g - want).abs() < 1e-5, "axis {axis} voxel {i}");
            }
        }
    }

    #[test]
    fn fourier_modes_filter_like_the_kernel() {
        let shape = [6, 16, 15];
        let x: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
            .collect();
        for sigma in [0.8, 2.5, 6.0] {
            for axis in 0..3 {
                let direct = convolve_periodic(&x, &shape, axis, &gaussian_taps(shape[axis], sigma));
                let modes = filter_modes(&x, &shape, axis, &gaussian_modes(shape[axis], sigma));
                let diff = direct
                    .iter()
                    .zip(&modes)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-5, "sigma {sigma} axis {axis}: {diff}");
            }
        }
    }

    #[test]
    fn fields_peak_near_magnitude_and_have_zero_mean() {
        let mut rng = SampleRng::new(3, 0, 0);
        let d = Displacement::draw(&[12, 10, 14], &[2.0, 1.0, 3.0], &[1.5, 0.5, 2.0], &mut rng, true);
        for (field, mag) in d.fields.iter().zip([1.5f32, 0.5, 2.0]) {
            let mean = field.iter().sum::<f32>() / field.len() as f32;
            let peak = field.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
            assert!(mean.abs() < 1e-5, "{mean}");
            // centring moves the peak by the (small) mean of the scaled field
            assert!(peak > 0.5 * mag && peak < 2.0 * mag, "{peak} vs {mag}");
        }
    }
}
