//! The `architecture` block of a plans.json configuration ([`ArchitecturePlan`]), read into plain
//! numbers.
//!
//! nnU-Net stores the network as a class name plus keyword arguments with dotted torch class names
//! (`torch.nn.modules.conv.Conv3d`, `...InstanceNorm3d`, `torch.nn.LeakyReLU`). nnflow builds exactly
//! one family, PlainConvUNet with convolution -> instance norm -> leaky ReLU blocks; anything else is
//! refused with the name that was found rather than silently built differently.

use crate::plans::{ArchitecturePlan, NetworkKwargs};

/// An `architecture` block nnflow cannot build, naming what was found.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArchitectureError {
    #[error("network class {0} is not supported (only PlainConvUNet)")]
    NetworkClass(String),
    #[error("conv_op {0} is not Conv2d or Conv3d")]
    ConvOp(String),
    #[error("norm_op {0} is not supported (only InstanceNorm)")]
    NormOp(String),
    #[error("dropout_op {0} is not supported")]
    DropoutOp(String),
    #[error("nonlin {0} is not supported (only LeakyReLU)")]
    Nonlin(String),
    #[error("architecture lists do not match n_stages = {n_stages} and {spatial_dims} spatial axes")]
    StageLists { n_stages: usize, spatial_dims: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// 2 or 3.
    pub spatial_dims: usize,
    pub input_channels: usize,
    pub num_classes: usize,
    pub features_per_stage: Vec<usize>,
    /// Per stage, per spatial axis.
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    pub n_conv_per_stage: Vec<usize>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub conv_bias: bool,
    pub norm_eps: f64,
    pub norm_affine: bool,
    pub leaky_relu_slope: f64,
    pub deep_supervision: bool,
}

impl Architecture {
    /// Reads a configuration's `architecture` block (as in plans.json, `inherits_from` resolved).
    pub fn from_plan(
        architecture: &ArchitecturePlan,
        input_channels: usize,
        num_classes: usize,
        deep_supervision: bool,
    ) -> Result<Architecture, ArchitectureError> {
        let NetworkKwargs::PlainConvUNet(kw) = &architecture.arch_kwargs else {
            return Err(ArchitectureError::NetworkClass(
                architecture.network_class_name.clone(),
            ));
        };
        let spatial_dims = match kw.conv_op.rsplit('.').next() {
            Some("Conv2d") => 2,
            Some("Conv3d") => 3,
            _ => return Err(ArchitectureError::ConvOp(kw.conv_op.clone())),
        };
        if let Some(norm) = &kw.norm_op {
            if !norm.contains("InstanceNorm") {
                return Err(ArchitectureError::NormOp(norm.clone()));
            }
        }
        if let Some(dropout) = &kw.dropout_op {
            return Err(ArchitectureError::DropoutOp(dropout.clone()));
        }
        if let Some(nonlin) = &kw.nonlin {
            if !nonlin.ends_with("LeakyReLU") {
                return Err(ArchitectureError::Nonlin(nonlin.clone()));
            }
        }
        let n = kw.n_stages;
        let lengths_ok = kw.features_per_stage.len() == n
            && kw.kernel_sizes.len() == n
            && kw.strides.len() == n
            && kw.n_conv_per_stage.len() == n
            && kw.n_conv_per_stage_decoder.len() + 1 == n
            && kw
                .kernel_sizes
                .iter()
                .chain(&kw.strides)
                .all(|v| v.len() == spatial_dims);
        if n < 2 || !lengths_ok {
            return Err(ArchitectureError::StageLists {
                n_stages: n,
                spatial_dims,
            });
        }
        Ok(Architecture {
            spatial_dims,
            input_channels,
            num_classes,
            features_per_stage: kw.features_per_stage.clone(),
            kernel_sizes: kw.kernel_sizes.clone(),
            strides: kw.strides.clone(),
            n_conv_per_stage: kw.n_conv_per_stage.clone(),
            n_conv_per_stage_decoder: kw.n_conv_per_stage_decoder.clone(),
            conv_bias: kw.conv_bias,
            norm_eps: kw.norm_op_kwargs.as_ref().and_then(|k| k.eps).unwrap_or(1e-5),
            norm_affine: kw.norm_op_kwargs.as_ref().and_then(|k| k.affine).unwrap_or(true),
            // torch.nn.LeakyReLU's default slope; nnU-Net's plans only set `inplace`.
            leaky_relu_slope: kw
                .nonlin_kwargs
                .as_ref()
                .and_then(|k| k.negative_slope)
                .unwrap_or(0.01),
            deep_supervision,
        })
    }

    pub fn n_stages(&self) -> usize {
        self.features_per_stage.len()
    }

    /// Per deep-supervision output (highest resolution first), the scale of its grid relative to
    /// the input: nnU-Net's `1 / cumprod(strides)` without the bottleneck. Always length 3
    /// (z, y, x); 2D networks get a leading 1.
    pub fn deep_supervision_scales(&self) -> Vec<[f64; 3]> {
        let mut cumulative = vec![1usize; self.spatial_dims];
        let mut scales = Vec::new();
        for stride in &self.strides[..self.n_stages() - 1] {
            for (c, s) in cumulative.iter_mut().zip(stride) {
                *c *= s;
            }
            let mut scale = [1.0; 3];
            for (a, c) in cumulative.iter().enumerate() {
                scale[3 - self.spatial_dims + a] = 1.0 / *c as f64;
            }
            scales.push(scale);
        }
        scales
    }

    /// nnU-Net's loss weights per deep-supervision output: `1 / 2^i`, the lowest resolution 0,
    /// normalised to sum 1. Without deep supervision, one output with weight 1.
    pub fn deep_supervision_weights(&self) -> Vec<f64> {
        if !self.deep_supervision {
            return vec![1.0];
        }
        let count = self.n_stages() - 1;
        let mut weights: Vec<f64> = (0..count).map(|i| 1.0 / 2f64.powi(i as i32)).collect();
        if let Some(last) = weights.last_mut() {
            *last = 0.0;
        }
        let sum: f64 = weights.iter().sum();
        if sum > 0.0 {
            weights.iter_mut().for_each(|w| *w /= sum);
        } else {
            // Two stages: the only output is the lowest one; keep it rather than train on nothing.
            weights = vec![1.0];
        }
        weights
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_arch(dims: usize) -> ArchitecturePlan {
        let k = if dims == 3 { vec![3, 3, 3] } else { vec![3, 3] };
        let s1 = vec![1; dims];
        let s2 = vec![2; dims];
        serde_json::from_value(serde_json::json!({
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": 3, "features_per_stage": [8, 16, 32],
                "conv_op": format!("torch.nn.modules.conv.Conv{dims}d"),
                "kernel_sizes": [k, k, k], "strides": [s1, s2, s2],
                "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": true,
                "norm_op": format!("torch.nn.modules.instancenorm.InstanceNorm{dims}d"),
                "norm_op_kwargs": {"eps": 1e-5, "affine": true}, "dropout_op": null,
                "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
            }
        }))
        .unwrap()
    }

    #[test]
    fn scales_and_weights_follow_nnunet() {
        let a = Architecture::from_plan(&plan_arch(3), 1, 2, true).unwrap();
        assert_eq!(a.deep_supervision_scales(), vec![[1.0; 3], [0.5; 3]]);
        assert_eq!(a.deep_supervision_weights(), vec![1.0, 0.0]);
        let a2 = Architecture::from_plan(&plan_arch(2), 1, 2, true).unwrap();
        assert_eq!(a2.deep_supervision_scales()[1], [1.0, 0.5, 0.5]);
        let mut five = a.clone();
        five.features_per_stage = vec![1; 5];
        five.strides = vec![vec![1, 1, 1]; 5];
        // 1, 1/2, 1/4, 0 normalised by 1.75
        let w = five.deep_supervision_weights();
        assert!((w[0] - 1.0 / 1.75).abs() < 1e-12 && (w[2] - 0.25 / 1.75).abs() < 1e-12 && w[3] == 0.0);
    }

    #[test]
    fn refuses_other_networks() {
        let mut v = serde_json::to_value(plan_arch(3)).unwrap();
        v["network_class_name"] = "ResidualEncoderUNet".into();
        v["arch_kwargs"]["n_blocks_per_stage"] = serde_json::json!([1, 1, 1]);
        let residual: ArchitecturePlan = serde_json::from_value(v).unwrap();
        assert!(Architecture::from_plan(&residual, 1, 2, true)
            .unwrap_err()
            .to_string()
            .contains("ResidualEncoderUNet"));
    }
}
