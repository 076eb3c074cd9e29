//! Per-channel intensity transforms: Gaussian noise, multiplicative brightness, contrast and gamma
//! (batchgeneratorsv2 `GaussianNoiseTransform`, `MultiplicativeBrightnessTransform`,
//! `ContrastTransform`, `GammaTransform`). Statistics are computed over the whole channel, as there.

use ndarray::{ArrayViewMut3, Axis};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_prob, check_range, sample_bg_contrast, sample_range, AugmentError, Sample, SampleRng};

const GAMMA_EPS: f64 = 1e-7;

fn yes() -> bool {
    true
}

/// Channels drawn with probability `p_per_channel`, one Bernoulli draw per channel in order.
fn pick_channels(rng: &mut SampleRng, n: usize, p_per_channel: f64) -> Vec<usize> {
    (0..n).filter(|_| rng.bernoulli(p_per_channel)).collect()
}

/// `gaussian_noise`: adds zero-mean Gaussian noise to the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GaussianNoiseParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Probability of applying the transform to a sample.
    pub p: f64,
    /// Range of the noise *standard deviation*. batchgeneratorsv2 calls it `noise_variance` but passes
    /// the drawn value to `normal_(std=...)`; we keep its name and its behaviour.
    pub variance: [f64; 2],
    pub p_per_channel: f64,
    /// One noise level for all channels.
    pub synchronize_channels: bool,
}

impl Default for GaussianNoiseParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.1,
            variance: [0.0, 0.1],
            p_per_channel: 1.0,
            synchronize_channels: true,
        }
    }
}

impl GaussianNoiseParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "gaussian_noise";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_channel", self.p_per_channel)?;
        check_range(T, "variance", self.variance)?;
        if self.variance[0] < 0.0 {
            return Err(AugmentError::Invalid {
                transform: T,
                message: "`variance` must be >= 0".into(),
            });
        }
        Ok(())
    }

    /// The noised channels and each one's standard deviation, all drawn before any noise (the
    /// order of batchgeneratorsv2's `get_parameters`).
    pub fn draw(&self, rng: &mut SampleRng, channels: usize) -> Vec<(usize, f64)> {
        let picked = pick_channels(rng, channels, self.p_per_channel);
        let shared = sample_range(rng, self.variance);
        picked
            .into_iter()
            .map(|c| {
                let sigma = if self.synchronize_channels {
                    shared
                } else {
                    sample_range(rng, self.variance)
                };
                (c, sigma)
            })
            .collect()
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        for (c, sigma) in self.draw(rng, sample.data.len_of(Axis(0))) {
            sample
                .data
                .index_axis_mut(Axis(0), c)
                .mapv_inplace(|v| v + (sigma * rng.normal()) as f32);
        }
    }
}

/// `brightness`: multiplies each chosen channel by a factor drawn like `BGContrast`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BrightnessParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub multiplier: [f64; 2],
    pub synchronize_channels: bool,
    pub p_per_channel: f64,
}

/// The channels a brightness or contrast change touches and each one's factor, drawn in
/// batchgeneratorsv2's order: the channel choice, one shared factor, then one per channel unless
/// the channels are synchronized.
fn channel_factors(
    rng: &mut SampleRng,
    channels: usize,
    p_per_channel: f64,
    range: [f64; 2],
    synchronize: bool,
) -> Vec<(usize, f64)> {
    let picked = pick_channels(rng, channels, p_per_channel);
    let shared = sample_bg_contrast(rng, range);
    picked
        .into_iter()
        .map(|c| {
            (
                c,
                if synchronize {
                    shared
                } else {
                    sample_bg_contrast(rng, range)
                },
            )
        })
        .collect()
}

impl Default for BrightnessParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.15,
            multiplier: [0.75, 1.25],
            synchronize_channels: false,
            p_per_channel: 1.0,
        }
    }
}

impl BrightnessParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "brightness";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_channel", self.p_per_channel)?;
        check_range(T, "multiplier", self.multiplier)
    }

    /// The scaled channels and each one's multiplier.
    pub fn draw(&self, rng: &mut SampleRng, channels: usize) -> Vec<(usize, f64)> {
        channel_factors(
            rng,
            channels,
            self.p_per_channel,
            self.multiplier,
            self.synchronize_channels,
        )
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        for (c, m) in self.draw(rng, sample.data.len_of(Axis(0))) {
            multiply_channel(sample.data.index_axis_mut(Axis(0), c), m);
        }
    }
}

/// Scales one channel; the building block of `brightness`, public for tests and reuse.
pub fn multiply_channel(mut x: ArrayViewMut3<f32>, factor: f64) {
    let f = factor as f32;
    x.mapv_inplace(|v| v * f);
}

/// `contrast`: stretches each chosen channel about its mean, optionally clipped to its old range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ContrastParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub contrast: [f64; 2],
    pub preserve_range: bool,
    pub synchronize_channels: bool,
    pub p_per_channel: f64,
}

impl Default for ContrastParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.15,
            contrast: [0.75, 1.25],
            preserve_range: true,
            synchronize_channels: false,
            p_per_channel: 1.0,
        }
    }
}

impl ContrastParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "contrast";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_channel", self.p_per_channel)?;
        check_range(T, "contrast", self.contrast)
    }

    /// The stretched channels and each one's factor.
    pub fn draw(&self, rng: &mut SampleRng, channels: usize) -> Vec<(usize, f64)> {
        channel_factors(
            rng,
            channels,
            self.p_per_channel,
            self.contrast,
            self.synchronize_channels,
        )
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        for (c, m) in self.draw(rng, sample.data.len_of(Axis(0))) {
            contrast_channel(sample.data.index_axis_mut(Axis(0), c), m, self.preserve_range);
        }
    }
}

/// `(x - mean) * factor + mean`, clipped to the channel's previous [min, max] if `preserve_range`.
pub fn contrast_channel(mut x: ArrayViewMut3<f32>, factor: f64, preserve_range: bool) {
    let Some(stats) = Stats::of(x.view()) else { return };
    let (mean, f) = (stats.mean as f32, factor as f32);
    let (lo, hi) = (stats.min as f32, stats.max as f32);
    x.mapv_inplace(|v| {
        let y = (v - mean) * f + mean;
        if preserve_range {
            y.clamp(lo, hi)
        } else {
            y
        }
    });
}

/// `gamma` (and `gamma_inverted` with `p_invert_image = 1`): a power curve on the channel rescaled to
/// [0, 1], optionally on the negated image and with mean and standard deviation restored afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GammaParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    /// Gamma range, drawn like `BGContrast` (half the draws below 1, half above).
    pub gamma: [f64; 2],
    pub p_invert_image: f64,
    pub synchronize_channels: bool,
    pub p_per_channel: f64,
    pub p_retain_stats: f64,
}

impl Default for GammaParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.3,
            gamma: [0.7, 1.5],
            p_invert_image: 0.0,
            synchronize_channels: false,
            p_per_channel: 1.0,
            p_retain_stats: 1.0,
        }
    }
}

impl GammaParams {
    /// nnU-Net's second gamma transform: always on the inverted image, p 0.1.
    pub fn inverted_default() -> Self {
        Self {
            p: 0.1,
            p_invert_image: 1.0,
            ..Self::default()
        }
    }

    pub fn validate(&self, name: &'static str) -> Result<(), AugmentError> {
        check_prob(name, "p", self.p)?;
        check_prob(name, "p_per_channel", self.p_per_channel)?;
        check_prob(name, "p_invert_image", self.p_invert_image)?;
        check_prob(name, "p_retain_stats", self.p_retain_stats)?;
        check_range(name, "gamma", self.gamma)?;
        if self.gamma[0] <= 0.0 {
            return Err(AugmentError::Invalid {
                transform: name,
                message: "`gamma` must be > 0".into(),
            });
        }
        Ok(())
    }

    /// The changed channels with their gamma and flags.
    pub fn draw(&self, rng: &mut SampleRng, channels: usize) -> Vec<GammaDraw> {
        let picked = pick_channels(rng, channels, self.p_per_channel);
        // draw order as in batchgeneratorsv2: all retain flags, all invert flags, then the gammas
        let retain: Vec<bool> = picked
            .iter()
            .map(|_| rng.bernoulli(self.p_retain_stats))
            .collect();
        let invert: Vec<bool> = picked
            .iter()
            .map(|_| rng.bernoulli(self.p_invert_image))
            .collect();
        let shared = sample_bg_contrast(rng, self.gamma);
        picked
            .into_iter()
            .enumerate()
            .map(|(k, channel)| GammaDraw {
                channel,
                gamma: if self.synchronize_channels {
                    shared
                } else {
                    sample_bg_contrast(rng, self.gamma)
                },
                invert: invert[k],
                retain_stats: retain[k],
            })
            .collect()
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        for d in self.draw(rng, sample.data.len_of(Axis(0))) {
            gamma_channel(
                sample.data.index_axis_mut(Axis(0), d.channel),
                d.gamma,
                d.invert,
                d.retain_stats,
            );
        }
    }
}

/// One channel's gamma draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaDraw {
    pub channel: usize,
    pub gamma: f64,
    pub invert: bool,
    pub retain_stats: bool,
}

/// `gamma_inverted`: the same transform with nnU-Net's defaults for the inverted variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GammaInvertedParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub gamma: [f64; 2],
    pub p_invert_image: f64,
    pub synchronize_channels: bool,
    pub p_per_channel: f64,
    pub p_retain_stats: f64,
}

impl Default for GammaInvertedParams {
    fn default() -> Self {
        Self::from(GammaParams::inverted_default())
    }
}

impl From<GammaParams> for GammaInvertedParams {
    fn from(g: GammaParams) -> Self {
        let GammaParams {
            enabled,
            p,
            gamma,
            p_invert_image,
            synchronize_channels,
            p_per_channel,
            p_retain_stats,
        } = g;
        Self {
            enabled,
            p,
            gamma,
            p_invert_image,
            synchronize_channels,
            p_per_channel,
            p_retain_stats,
        }
    }
}

impl GammaInvertedParams {
    /// The shared implementation's view of these parameters.
    pub fn as_gamma(&self) -> GammaParams {
        GammaParams {
            enabled: self.enabled,
            p: self.p,
            gamma: self.gamma,
            p_invert_image: self.p_invert_image,
            synchronize_channels: self.synchronize_channels,
            p_per_channel: self.p_per_channel,
            p_retain_stats: self.p_retain_stats,
        }
    }
}

/// Gamma on one channel, exactly the sequence of batchgeneratorsv2's `GammaTransform._apply_to_image`
/// (unbiased std, `eps = 1e-7` guarding both divisions).
pub fn gamma_channel(mut x: ArrayViewMut3<f32>, gamma: f64, invert: bool, retain_stats: bool) {
    if invert {
        x.mapv_inplace(|v| -v);
    }
    let Some(before) = Stats::of(x.view()) else { return };
    let range = before.max - before.min;
    let denom = range.max(GAMMA_EPS);
    x.mapv_inplace(|v| ((((v as f64 - before.min) / denom).powf(gamma)) * range + before.min) as f32);
    if retain_stats {
        if let Some(after) = Stats::of(x.view()) {
            let scale = before.std / after.std.max(GAMMA_EPS);
            x.mapv_inplace(|v| ((v as f64 - after.mean) * scale + before.mean) as f32);
        }
    }
    if invert {
        x.mapv_inplace(|v| -v);
    }
}

/// Mean, unbiased standard deviation, min and max of a channel, accumulated in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for an empty channel.
    pub fn of(x: ndarray::ArrayView3<f32>) -> Option<Self> {
        let n = x.len();
        if n == 0 {
            return None;
        }
        let (mut sum, mut lo, mut hi) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for &v in x.iter() {
            let v = v as f64;
            sum += v;
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let mean = sum / n as f64;
        let ss: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        // torch.std is unbiased; a single voxel has std NaN there, 0 here (then retain_stats is a no-op)
        let std = if n > 1 { (ss / (n - 1) as f64).sqrt() } else { 0.0 };
        Some(Self {
            mean,
            std,
            min: lo,
            max: hi,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn ramp(n: usize) -> Array4<f32> {
        Array4::from_shape_fn((1, n, n, n), |(_, z, y, x)| {
            ((z * 7 + y * 3 + x) % 17) as f32 * 0.3 - 1.0
        })
    }

    #[test]
    fn gamma_with_retain_stats_keeps_mean_and_std() {
        for (g, inv) in [(0.7, false), (1.5, false), (0.8, true), (1.3, true)] {
            let mut d = ramp(12);
            let before = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
            gamma_channel(d.index_axis_mut(Axis(0), 0), g, inv, true);
            let after = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
            assert!(
                (after.mean - before.mean).abs() < 1e-5,
                "{g} {inv}: {after:?} {before:?}"
            );
            assert!(
                (after.std - before.std).abs() < 1e-5,
                "{g} {inv}: {after:?} {before:?}"
            );
            // and it really changed the values
            assert_ne!(d, ramp(12));
        }
    }

    #[test]
    fn gamma_without_retain_keeps_range_and_is_a_power_curve() {
        let mut d = ramp(6);
        gamma_channel(d.index_axis_mut(Axis(0), 0), 2.0, false, false);
        let src = ramp(6);
        let (lo, hi) = (-1.0f64, 16.0 * 0.3 - 1.0);
        for (a, b) in d.iter().zip(src.iter()) {
            let want = ((*b as f64 - lo) / (hi - lo)).powi(2) * (hi - lo) + lo;
            assert!((*a as f64 - want).abs() < 1e-5);
        }
    }

    #[test]
    fn contrast_with_preserve_range_keeps_min_and_max() {
        for f in [0.75, 1.25] {
            let mut d = ramp(10);
            let before = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
            contrast_channel(d.index_axis_mut(Axis(0), 0), f, true);
            let after = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
            // preserve_range clips to the old range: never outside it, and a stretch hits both ends
            assert!(
                after.min >= before.min - 1e-6 && after.max <= before.max + 1e-6,
                "{f}"
            );
            if f > 1.0 {
                assert!((after.min - before.min).abs() < 1e-6 && (after.max - before.max).abs() < 1e-6);
            } else {
                assert!(after.std < before.std * 0.8);
            }
        }
        let mut d = ramp(10);
        contrast_channel(d.index_axis_mut(Axis(0), 0), 1.25, false);
        let after = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
        assert!(
            after.max > 16.0 * 0.3 - 1.0 + 0.1,
            "without preserve_range the range grows"
        );
    }

    #[test]
    fn brightness_scales_mean_by_factor() {
        let mut d = ramp(10) + 3.0;
        let before = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
        multiply_channel(d.index_axis_mut(Axis(0), 0), 1.2);
        let after = Stats::of(d.index_axis(Axis(0), 0)).unwrap();
        assert!((after.mean - 1.2 * before.mean).abs() < 1e-5);
    }

    #[test]
    fn noise_adds_sigma_squared_variance() {
        let mut s = Sample {
            data: Array4::zeros((2, 48, 48, 48)),
            seg: Array4::zeros((1, 48, 48, 48)),
        };
        let params = GaussianNoiseParams {
            variance: [0.09, 0.09],
            ..Default::default()
        };
        params.apply(&mut s, &mut SampleRng::new(3, 0, 0));
        for c in 0..2 {
            let st = Stats::of(s.data.index_axis(Axis(0), c)).unwrap();
            assert!(st.mean.abs() < 0.002, "{st:?}");
            assert!((st.std * st.std - 0.09 * 0.09).abs() < 0.0002, "{st:?}");
        }
    }

    #[test]
    fn bg_contrast_draws_both_sides_of_one() {
        let mut rng = SampleRng::new(0, 0, 0);
        let draws: Vec<f64> = (0..2000)
            .map(|_| sample_bg_contrast(&mut rng, [0.7, 1.5]))
            .collect();
        let below = draws.iter().filter(|&&g| g < 1.0).count();
        assert!((900..1100).contains(&below), "{below}");
        assert!(draws.iter().all(|&g| (0.7..1.5).contains(&g)));
    }
}
