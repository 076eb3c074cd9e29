//! U-Net topology for a patch: how often each axis is downsampled, the convolution kernel of every
//! stage, the padded patch size (nnU-Net v2.8.1 `network_topology.get_pool_and_conv_props`), and the
//! feature-map volume that the planner uses as its VRAM proxy (`PlainConvUNet.compute_conv_feature_map_size`
//! of dynamic_network_architectures, without deep supervision).
//!
//! Works for 2D and 3D: every slice has one entry per axis.

/// The network layout derived from a spacing and a patch size.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    /// How many times each axis is downsampled by 2.
    pub pools_per_axis: Vec<u32>,
    /// Stride of every encoder stage; the first stage is all ones.
    pub strides: Vec<Vec<usize>>,
    /// Convolution kernel of every stage (3 where the axis is within 2x of the finest spacing, else 1).
    pub kernel_sizes: Vec<Vec<usize>>,
    /// The patch size rounded up to a multiple of `divisible_by`.
    pub patch_size: Vec<usize>,
    /// `2^pools` per axis: every patch edge must be a multiple of this.
    pub divisible_by: Vec<usize>,
}

impl Topology {
    pub fn n_stages(&self) -> usize {
        self.strides.len()
    }
}

/// nnU-Net's pooling rule: repeatedly downsample every axis that is still at least
/// `2 * min_feature_map` voxels long and whose current spacing is within 2x of the finest such axis
/// (at most `max_pools` times per axis). A lone poolable axis must be at least `3 * min_feature_map`
/// long, otherwise pooling stops. Kernels switch from 1 to 3 once an axis' spacing comes within 2x
/// of the finest spacing and stay 3; the bottleneck always gets 3.
///
/// `patch_size` is fractional because nnU-Net clips its initial patch to a (possibly fractional)
/// median image shape before calling this.
pub fn pool_and_conv_props(
    spacing: &[f64],
    patch_size: &[f64],
    min_feature_map: usize,
    max_pools: u32,
) -> Topology {
    let dim = spacing.len();
    let min_edge = min_feature_map as f64;
    let mut current_spacing = spacing.to_vec();
    let mut current_size = patch_size.to_vec();
    let mut pools_per_axis = vec![0u32; dim];
    let mut kernel = vec![1usize; dim];
    let mut strides = vec![vec![1usize; dim]];
    let mut kernel_sizes = Vec::new();

    loop {
        let large_enough: Vec<usize> = (0..dim).filter(|&d| current_size[d] >= 2.0 * min_edge).collect();
        if large_enough.is_empty() {
            break;
        }
        let finest = large_enough
            .iter()
            .map(|&d| current_spacing[d])
            .fold(f64::INFINITY, f64::min);
        let poolable: Vec<usize> = large_enough
            .into_iter()
            .filter(|&d| current_spacing[d] / finest < 2.0 && pools_per_axis[d] < max_pools)
            .collect();
        // A single remaining axis is only pooled if its bottleneck stays comfortably large.
        if poolable.len() == 1 && current_size[poolable[0]] < 3.0 * min_edge {
            break;
        }
        if poolable.is_empty() {
            break;
        }

        // Kernel sizes look at the finest spacing over all axes, not only the poolable ones.
        let finest_overall = current_spacing.iter().copied().fold(f64::INFINITY, f64::min);
        for d in 0..dim {
            if current_spacing[d] / finest_overall < 2.0 {
                kernel[d] = 3;
            }
        }

        let mut stride = vec![1usize; dim];
        for &d in &poolable {
            stride[d] = 2;
            pools_per_axis[d] += 1;
            current_spacing[d] *= 2.0;
            current_size[d] = (current_size[d] / 2.0).ceil();
        }
        strides.push(stride);
        kernel_sizes.push(kernel.clone());
    }
    kernel_sizes.push(vec![3; dim]);

    let divisible_by: Vec<usize> = pools_per_axis.iter().map(|&p| 1usize << p).collect();
    let patch_size = patch_size
        .iter()
        .zip(&divisible_by)
        .map(|(&s, &d)| pad_to_multiple(s, d))
        .collect();
    Topology {
        pools_per_axis,
        strides,
        kernel_sizes,
        patch_size,
        divisible_by,
    }
}

/// Smallest multiple of `divisor` that is >= `size` (nnU-Net's `pad_shape`, which also accepts
/// fractional sizes and truncates the result to an integer).
fn pad_to_multiple(size: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let rem = size.rem_euclid(d);
    let padded = if rem == 0.0 { size } else { size + d - rem };
    padded.max(0.0) as usize
}

/// Number of feature-map elements a PlainConvUNet produces for one sample of `patch_size`
/// (encoder convs, decoder convs, transposed convs, final segmentation layer): the planner's proxy
/// for GPU memory. `strides`, `features_per_stage` and `n_conv_encoder` have one entry per stage,
/// `n_conv_decoder` one fewer.
pub fn conv_feature_map_size(
    patch_size: &[usize],
    strides: &[Vec<usize>],
    features_per_stage: &[usize],
    n_conv_encoder: &[usize],
    n_conv_decoder: &[usize],
    num_classes: usize,
) -> u64 {
    let volume = |s: &[usize]| s.iter().map(|&v| v as u64).product::<u64>();
    // Size of every stage's output (strided conv, "same" padding, floor division).
    let mut sizes: Vec<Vec<usize>> = Vec::with_capacity(strides.len());
    let mut size = patch_size.to_vec();
    for stride in strides {
        size = size.iter().zip(stride).map(|(&v, &s)| v / s).collect();
        sizes.push(size.clone());
    }

    let encoder: u64 = sizes
        .iter()
        .zip(features_per_stage)
        .zip(n_conv_encoder)
        .map(|((size, &f), &convs)| (convs * f) as u64 * volume(size))
        .sum();

    // Decoder stage s works at the resolution of skip n-2-s: its convs plus the transposed conv that
    // feeds it. Without deep supervision only the last stage (full resolution) has a segmentation
    // layer.
    let n = sizes.len();
    let decoder: u64 = n_conv_decoder
        .iter()
        .take(n.saturating_sub(1))
        .enumerate()
        .map(|(s, &convs)| {
            let skip = n - 2 - s;
            let features = features_per_stage.get(skip).copied().unwrap_or(0);
            (convs + 1) as u64 * features as u64 * volume(&sizes[skip])
        })
        .sum();
    let segmentation = if n >= 2 {
        num_classes as u64 * volume(&sizes[0])
    } else {
        0
    };
    encoder + decoder + segmentation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isotropic_128_cube_pools_five_times() {
        // 128 -> 64 -> 32 -> 16 -> 8 -> 4: five pools, then 4 < 8 stops.
        let t = pool_and_conv_props(&[1.0, 1.0, 1.0], &[128.0, 128.0, 128.0], 4, 999_999);
        assert_eq!(t.pools_per_axis, vec![5, 5, 5]);
        assert_eq!(t.n_stages(), 6);
        assert_eq!(t.strides[0], vec![1, 1, 1]);
        assert!(t.strides[1..].iter().all(|s| s == &vec![2, 2, 2]));
        assert!(t.kernel_sizes.iter().all(|k| k == &vec![3, 3, 3]));
        assert_eq!(t.patch_size, vec![128, 128, 128]);
        assert_eq!(t.divisible_by, vec![32, 32, 32]);
    }

    #[test]
    fn anisotropic_axis_joins_pooling_once_spacing_catches_up() {
        // z spacing 4x coarser: first two stages pool only y/x with 1x3x3 kernels; after two pools
        // in-plane spacing is 4 too and all axes pool together. y/x: 160->80->40->20->10->5 (5 pools);
        // z: 20->10->5 (2 pools, starting at stage 3); a lone axis of 5 voxels cannot pool.
        let t = pool_and_conv_props(&[4.0, 1.0, 1.0], &[20.0, 160.0, 160.0], 4, 999_999);
        assert_eq!(t.pools_per_axis, vec![2, 5, 5]);
        assert_eq!(
            t.strides,
            vec![
                vec![1, 1, 1],
                vec![1, 2, 2],
                vec![1, 2, 2],
                vec![2, 2, 2],
                vec![2, 2, 2],
                vec![1, 2, 2]
            ]
        );
        assert_eq!(t.kernel_sizes[0], vec![1, 3, 3]);
        assert_eq!(t.kernel_sizes[1], vec![1, 3, 3]);
        assert_eq!(t.kernel_sizes[2], vec![3, 3, 3]);
        assert_eq!(t.kernel_sizes.len(), 6);
        assert_eq!(t.patch_size, vec![20, 160, 160]);
    }

    #[test]
    fn fractional_patch_is_padded_up() {
        // 100.5 with 4 pools (100.5 -> 51 -> 26 -> 13 -> 7) pads to 112.
        let t = pool_and_conv_props(&[1.0, 1.0], &[100.5, 100.5], 4, 999_999);
        assert_eq!(t.pools_per_axis, vec![4, 4]);
        assert_eq!(t.patch_size, vec![112, 112]);
    }

    #[test]
    fn feature_map_size_of_two_stage_net() {
        // Encoder: 2*32*8^3 + 2*64*4^3; decoder: 2*32*8^3 convs + 32*8^3 transposed + 3*8^3 seg.
        let strides = vec![vec![1, 1, 1], vec![2, 2, 2]];
        let got = conv_feature_map_size(&[8, 8, 8], &strides, &[32, 64], &[2, 2], &[2], 3);
        let expected = 2 * 32 * 512 + 2 * 64 * 64 + 2 * 32 * 512 + 32 * 512 + 3 * 512;
        assert_eq!(got, expected);
    }
}
