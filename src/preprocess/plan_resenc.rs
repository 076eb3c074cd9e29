//! What nnU-Net v2.8.1's residual-encoder planner presets (`nnUNetPlannerResEncM`, `...L`,
//! `...XL` in `residual_unets/residual_encoder_unet_planners.py`) change in the default planner:
//! the network (`ResidualEncoderUNet`: residual blocks in the encoder, one conv per decoder stage),
//! its feature-map volume as VRAM proxy, and each preset's reference values. The search itself
//! (patch shrinking, batch size, lowres) is the default planner's, in `plan`.

use serde_json::Value;

use crate::plans::{NonlinKwargs, NormOpKwargs, ResidualEncoderUNetKwargs};
use crate::preprocess::topology::{conv_feature_map_size, Topology};

pub const NETWORK_CLASS: &str = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet";

/// Residual blocks per encoder stage (`UNet_blocks_per_stage_encoder`), cut to the number of stages.
const BLOCKS_PER_STAGE_ENCODER: [usize; 13] = [1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6];
/// Convolutions per decoder stage (`UNet_blocks_per_stage_decoder`).
const CONVS_PER_STAGE_DECODER: usize = 1;

/// A preset's memory model: feature-map volumes that fit `gpu_gb` at the default reference batch
/// sizes (2 in 3D, 12 in 2D). nnU-Net tuned them by hand per preset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reference {
    pub volume_3d: f64,
    pub volume_2d: f64,
    pub gpu_gb: f64,
}

/// `nnUNetPlannerResEncM`: "~9-11 GB VRAM", the default 8 GB target with a heavier network.
pub const RESENC_M: Reference = Reference {
    volume_3d: 680_000_000.0,
    volume_2d: 135_000_000.0,
    gpu_gb: 8.0,
};
/// `nnUNetPlannerResEncL`: 24 GB.
pub const RESENC_L: Reference = Reference {
    volume_3d: 2_100_000_000.0,
    volume_2d: 380_000_000.0,
    gpu_gb: 24.0,
};
/// `nnUNetPlannerResEncXL`: 40 GB.
pub const RESENC_XL: Reference = Reference {
    volume_3d: 3_600_000_000.0,
    volume_2d: 560_000_000.0,
    gpu_gb: 40.0,
};

/// The presets let a batch cover the whole dataset (`max_dataset_covered = 1`) instead of 5%.
pub const MAX_DATASET_COVERED: f64 = 1.0;

fn blocks_per_stage(n_stages: usize) -> Vec<usize> {
    BLOCKS_PER_STAGE_ENCODER[..n_stages.min(BLOCKS_PER_STAGE_ENCODER.len())].to_vec()
}

fn convs_per_stage_decoder(n_stages: usize) -> Vec<usize> {
    vec![CONVS_PER_STAGE_DECODER; n_stages.saturating_sub(1)]
}

/// Number of feature-map elements a ResidualEncoderUNet produces for one sample of `patch_size`
/// (`ResidualEncoderUNet.compute_conv_feature_map_size` of dynamic_network_architectures, without
/// deep supervision): the stem conv, two convs per residual block plus the 1x1 projection of a
/// stage's first block where it changes channels or resolution, then the plain U-Net decoder.
pub fn residual_feature_map_size(
    patch_size: &[usize],
    strides: &[Vec<usize>],
    features_per_stage: &[usize],
    num_classes: usize,
) -> u64 {
    let n = strides.len();
    let volume = |s: &[usize]| s.iter().map(|&v| v as u64).product::<u64>();
    let blocks = blocks_per_stage(n);
    // The stem: one stride-1 conv to the first stage's features.
    let mut encoder = features_per_stage[0] as u64 * volume(patch_size);
    let mut size = patch_size.to_vec();
    let mut in_features = features_per_stage[0];
    for ((stride, &features), &n_blocks) in strides.iter().zip(features_per_stage).zip(&blocks) {
        let strided: Vec<usize> = size.iter().zip(stride).map(|(&v, &s)| v / s).collect();
        let per_conv = features as u64 * volume(&strided);
        let projection = in_features != features || strided != size;
        encoder += 2 * n_blocks as u64 * per_conv + if projection { per_conv } else { 0 };
        size = strided;
        in_features = features;
    }
    // The decoder is PlainConvUNet's: without encoder convs the plain count is the decoder's alone.
    let decoder = conv_feature_map_size(
        patch_size,
        strides,
        features_per_stage,
        &vec![0; n],
        &convs_per_stage_decoder(n),
        num_classes,
    );
    encoder + decoder
}

/// `arch_kwargs` of a planned configuration, in nnU-Net's key order.
pub fn arch_kwargs(topology: &Topology, features: &[usize], conv_op: &str, norm_op: &str) -> Value {
    let n = topology.n_stages();
    let kwargs = ResidualEncoderUNetKwargs {
        n_stages: n,
        features_per_stage: features.to_vec(),
        conv_op: conv_op.into(),
        kernel_sizes: topology.kernel_sizes.clone(),
        strides: topology.strides.clone(),
        n_blocks_per_stage: blocks_per_stage(n),
        n_conv_per_stage_decoder: convs_per_stage_decoder(n),
        conv_bias: true,
        norm_op: Some(norm_op.into()),
        norm_op_kwargs: Some(NormOpKwargs {
            eps: Some(1e-5),
            affine: Some(true),
            ..NormOpKwargs::default()
        }),
        dropout_op: None,
        dropout_op_kwargs: None,
        nonlin: Some("torch.nn.LeakyReLU".into()),
        nonlin_kwargs: Some(NonlinKwargs {
            inplace: Some(true),
            ..NonlinKwargs::default()
        }),
        extra: Default::default(),
    };
    serde_json::to_value(kwargs).expect("arch kwargs serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_map_size_matches_dynamic_network_architectures() {
        // ResidualEncoderUNet(input_channels=1, n_stages=6, features_per_stage=(32, 64, 128, 256,
        // 320, 320), conv_op=Conv3d, kernel_sizes=3, strides=(1, 2, 2, 2, 2, 2), n_blocks_per_stage=
        // (1, 3, 4, 6, 6, 6), num_classes=3, n_conv_per_stage_decoder=(1, 1, 1, 1, 1),
        // deep_supervision=False).compute_conv_feature_map_size((128, 128, 128)) == 557420544
        let strides: Vec<Vec<usize>> = std::iter::once(vec![1, 1, 1])
            .chain(std::iter::repeat_n(vec![2, 2, 2], 5))
            .collect();
        let got = residual_feature_map_size(&[128, 128, 128], &strides, &[32, 64, 128, 256, 320, 320], 3);
        assert_eq!(got, 557_420_544);
        // The same in 2D with n_stages=4, features (32, 64, 128, 256), strides ((1, 1), (2, 1),
        // (2, 2), (2, 2)), blocks (1, 3, 4, 6), decoder (1, 1, 1), num_classes=4, size (40, 24):
        // 702720.
        let strides = vec![vec![1, 1], vec![2, 1], vec![2, 2], vec![2, 2]];
        let got = residual_feature_map_size(&[40, 24], &strides, &[32, 64, 128, 256], 4);
        assert_eq!(got, 702_720);
    }
}
