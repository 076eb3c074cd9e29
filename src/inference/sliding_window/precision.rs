//! Precision of the accumulation buffers.
//!
//! nnU-Net 2.8.1 allocates its logit sum and weight sum as float16 on every device (CPU included) and
//! builds the Gaussian in float16. float16 cannot hold the Gaussian's tails (they flush to the smallest
//! value) and it rounds every partial sum to 11 significant bits, so its border logits can be off by a
//! visible fraction. nnflow accumulates in float32 by default and can emulate the float16 buffers
//! bit for bit when agreement with nnU-Net's output matters more than accuracy.

/// Element type of the Gaussian map and the accumulation buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// float32 buffers (nnU-Net's algorithm with its half buffers widened).
    #[default]
    Single,
    /// float16 buffers emulated in float32 storage: every stored value is rounded to the nearest
    /// float16, as torch does when writing into a half tensor.
    Half,
}

impl Precision {
    /// Rounds a freshly computed value to what a buffer of this precision would store.
    #[inline]
    pub fn store(self, v: f32) -> f32 {
        match self {
            Precision::Single => v,
            Precision::Half => round_to_f16(v),
        }
    }
}

/// Rounds `x` to the nearest IEEE binary16 value (ties to even; overflow to infinity; subnormals kept),
/// returned as the exactly equal f32. Matches torch's float -> Half conversion.
pub fn round_to_f16(x: f32) -> f32 {
    f16_bits_to_f32(f32_to_f16_bits(x))
}

fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        // inf stays inf, NaN stays a quiet NaN
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    // The exponent re-biased for float16 (bias 15 instead of 127).
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e >= 1 {
        // Normal: keep 10 of the 23 mantissa bits; a carry out of the mantissa correctly bumps the
        // exponent, and from the largest finite value to infinity.
        let half = ((e as u32) << 10) | (man >> 13);
        let rest = man & 0x1fff;
        let round_up = rest > 0x1000 || (rest == 0x1000 && half & 1 == 1);
        return sign | (half + round_up as u32) as u16;
    }
    // Subnormal (or zero): the value in units of 2^-24 is `full >> shift`.
    let full = man | 0x80_0000;
    let shift = (14 - e) as u32;
    if shift > 24 {
        // Below half the smallest subnormal: rounds to zero.
        return sign;
    }
    let half = full >> shift;
    let rest = full & ((1 << shift) - 1);
    let midpoint = 1 << (shift - 1);
    let round_up = rest > midpoint || (rest == midpoint && half & 1 == 1);
    sign | (half + round_up as u32) as u16
}

fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => sign * man as f32 * f32::powi(2.0, -24),
        0x1f if man == 0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        _ => f32::from_bits(((h as u32 & 0x8000) << 16) | ((exp + 127 - 15) << 23) | (man << 13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representative_roundings() {
        assert_eq!(round_to_f16(1.0), 1.0);
        assert_eq!(round_to_f16(1.0 + f32::powi(2.0, -11)), 1.0); // tie to even
        assert_eq!(
            round_to_f16(1.0 + 3.0 * f32::powi(2.0, -11)),
            1.0 + f32::powi(2.0, -9)
        );
        assert_eq!(round_to_f16(65504.0), 65504.0);
        assert_eq!(round_to_f16(65520.0), f32::INFINITY);
        assert_eq!(round_to_f16(f32::powi(2.0, -25)), 0.0); // half the smallest subnormal, tie to even
        assert_eq!(round_to_f16(1.5 * f32::powi(2.0, -24)), f32::powi(2.0, -23));
        assert_eq!(round_to_f16(-0.1), -0.099975586);
    }
}
