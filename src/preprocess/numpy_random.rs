//! numpy's legacy `np.random.RandomState(seed)` for the draws nnU-Net's preprocessing makes:
//! the MT19937 generator seeded with `init_genrand`, and `randint(0, n)` / `choice(n, k,
//! replace=True)` with numpy's masked rejection sampling. Reproducing the stream (rather than
//! using any good RNG) makes sampled statistics identical to nnU-Net's, not just close.

const STATE_LEN: usize = 624;
const SHIFT: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// `np.random.RandomState(seed)`.
#[derive(Clone)]
pub struct RandomState {
    key: [u32; STATE_LEN],
    position: usize,
}

impl RandomState {
    /// Seeds like `RandomState(seed)` with an integer seed (`mt19937_seed` / `init_genrand`).
    pub fn new(seed: u32) -> RandomState {
        let mut key = [0u32; STATE_LEN];
        key[0] = seed;
        for i in 1..STATE_LEN {
            let previous = key[i - 1];
            key[i] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(i as u32);
        }
        RandomState {
            key,
            position: STATE_LEN,
        }
    }

    /// One tempered 32-bit output (`genrand_int32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.position == STATE_LEN {
            self.twist();
        }
        let mut y = self.key[self.position];
        self.position += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..STATE_LEN {
            let y = (self.key[i] & UPPER_MASK) | (self.key[(i + 1) % STATE_LEN] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.key[i] = self.key[(i + SHIFT) % STATE_LEN] ^ (y >> 1) ^ mag;
        }
        self.position = 0;
    }

    /// `randint(0, n)` for one value: uniform in `0..n`. `n` must be positive. As in numpy, a
    /// range of one value consumes no random numbers.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "randint needs a non-empty range");
        let max = n - 1;
        if max == 0 {
            return 0;
        }
        if max == u64::from(u32::MAX) {
            return u64::from(self.next_u32());
        }
        let mask = all_ones_covering(max);
        if max < u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        }
        // Ranges beyond 2^32 (never reached by voxel counts in practice) take 64-bit draws, high
        // word first.
        loop {
            let value = ((u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())) & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// `choice(n, count, replace=False)`: numpy's legacy path, the first `count` entries of
    /// `permutation(n)` (a Fisher-Yates shuffle of `0..n` from the last position down).
    pub fn choice_without_replacement(&mut self, n: usize, count: usize) -> Vec<usize> {
        let mut permutation: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            permutation.swap(i, j);
        }
        permutation.truncate(count);
        permutation
    }

    /// `choice(n, count, replace=True)`: `count` indices uniform in `0..n`.
    pub fn choice_with_replacement(&mut self, n: usize, count: usize) -> Vec<usize> {
        (0..count).map(|_| self.below(n as u64) as usize).collect()
    }
}

/// The smallest `2^k - 1` that is >= `max` (numpy's `gen_mask`).
fn all_ones_covering(max: u64) -> u64 {
    u64::MAX >> max.leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_stream_matches_numpy() {
        // np.random.RandomState(1234).randint(0, 2**32, 3, dtype=np.uint64)
        let mut rs = RandomState::new(1234);
        let first: Vec<u32> = (0..3).map(|_| rs.next_u32()).collect();
        assert_eq!(first, NUMPY_RAW_1234);
    }

    #[test]
    fn choice_matches_numpy() {
        // np.random.RandomState(1234).choice(1000, 8, replace=True), then .choice(7, 8)
        let mut rs = RandomState::new(1234);
        assert_eq!(rs.choice_with_replacement(1000, 8), NUMPY_CHOICE_1000);
        assert_eq!(rs.choice_with_replacement(7, 8), NUMPY_CHOICE_7);
        // A one-element population draws nothing, so the stream continues unchanged.
        let mut a = RandomState::new(5);
        let mut b = RandomState::new(5);
        assert_eq!(a.choice_with_replacement(1, 4), [0, 0, 0, 0]);
        assert_eq!(a.next_u32(), b.next_u32());
    }

    #[test]
    fn mask_is_the_smallest_covering_power_of_two() {
        assert_eq!(all_ones_covering(1), 1);
        assert_eq!(all_ones_covering(6), 7);
        assert_eq!(all_ones_covering(8), 15);
        assert_eq!(all_ones_covering(999), 1023);
    }

    const NUMPY_RAW_1234: [u32; 3] = [822_569_775, 2_137_449_171, 2_671_936_806];
    const NUMPY_CHOICE_1000: [usize; 8] = [815, 723, 294, 53, 204, 372, 664, 655];
    const NUMPY_CHOICE_7: [usize; 8] = [1, 1, 2, 6, 3, 6, 4, 4];
}
