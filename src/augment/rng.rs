//! Small, hand-written, seeded randomness: xoshiro256++ seeded through splitmix64.
//!
//! Every sample's stream is derived from `(seed, epoch, index)` alone, so a sample's augmentation does
//! not depend on which worker thread handled it or in which order (nnU-Net draws from per-process global
//! generators and cannot be replayed). Each transform of a pipeline draws from its own [`SampleRng::fork`],
//! so disabling or reordering one transform leaves the others' draws unchanged.

/// splitmix64 step: the recommended way to expand a 64-bit seed into xoshiro state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++ generator for one sample (or one transform of one sample).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRng {
    s: [u64; 4],
    /// A second Gaussian from the last Box-Muller pair.
    spare_normal: Option<u64>,
}

impl SampleRng {
    /// The stream of sample `index` in `epoch` of a run seeded with `seed`.
    pub fn new(seed: u64, epoch: u64, index: u64) -> Self {
        // Mix the three keys one after another so (1, 2, 3) and (2, 1, 3) give unrelated streams.
        let mut sm = seed;
        let mut key = splitmix64(&mut sm);
        sm = key ^ epoch;
        key = splitmix64(&mut sm);
        sm = key ^ index;
        Self::from_key(splitmix64(&mut sm))
    }

    fn from_key(key: u64) -> Self {
        let mut sm = key;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self {
            s,
            spare_normal: None,
        }
    }

    /// An independent stream for sub-task `stream` (e.g. one transform slot), not advancing `self`.
    pub fn fork(&self, stream: u64) -> Self {
        let mut sm = self.s[0] ^ self.s[3].rotate_left(17) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self::from_key(splitmix64(&mut sm))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[0]
            .wrapping_add(self.s[3])
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// True with probability `p` (the `rand() < p` test batchgeneratorsv2 uses everywhere).
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Standard normal via Box-Muller, caching the second value of each pair.
    pub fn normal(&mut self) -> f64 {
        if let Some(bits) = self.spare_normal.take() {
            return f64::from_bits(bits);
        }
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare_normal = Some((r * s).to_bits());
        r * c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_keys_same_stream_different_keys_differ() {
        let a: Vec<u64> = (0..4).map(|_| SampleRng::new(1, 2, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let first = |s, e, i| SampleRng::new(s, e, i).next_u64();
        assert_ne!(first(1, 2, 3), first(1, 2, 4));
        assert_ne!(first(1, 2, 3), first(1, 3, 3));
        assert_ne!(first(1, 2, 3), first(2, 1, 3));
        let base = SampleRng::new(1, 2, 3);
        assert_ne!(base.fork(0).next_u64(), base.fork(1).next_u64());
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut rng = SampleRng::new(7, 0, 0);
        let n = 200_000;
        let u: Vec<f64> = (0..n).map(|_| rng.next_f64()).collect();
        let mean_u = u.iter().sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 0.005, "{mean_u}");
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "{mean} {var}");
    }
}
