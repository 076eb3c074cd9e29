//! The `architecture` block of a plans.json configuration ([`ArchitecturePlan`]), read into plain
//! numbers.
//!
//! nnU-Net stores the network as a class name plus keyword arguments with dotted torch class names
//! (`torch.nn.modules.conv.Conv3d`, `...InstanceNorm3d`, `torch.nn.LeakyReLU`). nnflow builds the two
//! U-Nets of dynamic_network_architectures that nnU-Net's planners write: PlainConvUNet (the default
//! planner) and ResidualEncoderUNet with BasicBlockD (the ResEnc M/L/XL presets), both with
//! convolution -> instance norm -> leaky ReLU blocks and the same decoder. Anything else is refused
//! with the name that was found rather than silently built differently.

use crate::plans::{ArchitecturePlan, NetworkKwargs, NonlinKwargs, NormOpKwargs, ResidualEncoderUNetKwargs};

/// An `architecture` block nnflow cannot build, naming what was found.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArchitectureError {
    #[error("network class {0} is not supported (only PlainConvUNet and ResidualEncoderUNet)")]
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
    #[error(
        "ResidualEncoderUNet block {0} is not supported (only BasicBlockD; BottleneckD is not implemented)"
    )]
    Block(String),
    #[error("ResidualEncoderUNet keyword arguments not supported: {}", .0.join(", "))]
    ResidualKwargs(Vec<String>),
}

/// How the encoder turns each resolution stage's input into its features.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoder {
    /// PlainConvUNet: per stage `n_conv_per_stage[s]` conv -> norm -> nonlin blocks, the first
    /// strided.
    Plain { n_conv_per_stage: Vec<usize> },
    /// ResidualEncoderUNet: a stem (one conv block, input channels -> `stem_channels`, stride 1),
    /// then per stage `n_blocks_per_stage[s]` BasicBlockD residual blocks, the first strided.
    Residual {
        n_blocks_per_stage: Vec<usize>,
        /// `stem_channels`, or `features_per_stage[0]` where the plan leaves it `null` (as nnU-Net's
        /// planners do).
        stem_channels: usize,
    },
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
    pub encoder: Encoder,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub conv_bias: bool,
    pub norm_eps: f64,
    pub norm_affine: bool,
    pub leaky_relu_slope: f64,
    pub deep_supervision: bool,
}

/// The keyword arguments both network classes share.
struct Common<'a> {
    n_stages: usize,
    features_per_stage: &'a [usize],
    conv_op: &'a str,
    kernel_sizes: &'a [Vec<usize>],
    strides: &'a [Vec<usize>],
    /// `n_conv_per_stage` or `n_blocks_per_stage`.
    per_stage: &'a [usize],
    n_conv_per_stage_decoder: &'a [usize],
    conv_bias: bool,
    norm_op: Option<&'a String>,
    norm_op_kwargs: Option<&'a NormOpKwargs>,
    dropout_op: Option<&'a String>,
    nonlin: Option<&'a String>,
    nonlin_kwargs: Option<&'a NonlinKwargs>,
}

/// The stem width of a ResidualEncoderUNet, after checking its extra keyword arguments: `block`
/// may name BasicBlockD (the default), `bottleneck_channels` (BottleneckD only) may be `null`,
/// `stem_channels` may be `null` or a width; anything else is refused, every name at once.
fn residual_stem_channels(kw: &ResidualEncoderUNetKwargs) -> Result<usize, ArchitectureError> {
    let mut unsupported = Vec::new();
    let mut stem_channels = kw.features_per_stage.first().copied().unwrap_or(0);
    for (key, value) in &kw.extra {
        match (key.as_str(), value) {
            ("block", serde_json::Value::String(block)) => {
                if block.rsplit('.').next() != Some("BasicBlockD") {
                    return Err(ArchitectureError::Block(block.clone()));
                }
            }
            ("bottleneck_channels" | "stem_channels", serde_json::Value::Null) => {}
            ("stem_channels", v) if v.as_u64().is_some_and(|c| c > 0) => {
                stem_channels = v.as_u64().unwrap_or_default() as usize;
            }
            _ => unsupported.push(format!("{key} = {value}")),
        }
    }
    unsupported.sort();
    if unsupported.is_empty() {
        Ok(stem_channels)
    } else {
        Err(ArchitectureError::ResidualKwargs(unsupported))
    }
}

impl Architecture {
    /// Reads a configuration's `architecture` block (as in plans.json, `inherits_from` resolved).
    pub fn from_plan(
        architecture: &ArchitecturePlan,
        input_channels: usize,
        num_classes: usize,
        deep_supervision: bool,
    ) -> Result<Architecture, ArchitectureError> {
        let (kw, encoder) = match &architecture.arch_kwargs {
            NetworkKwargs::PlainConvUNet(kw) => (
                Common {
                    n_stages: kw.n_stages,
                    features_per_stage: &kw.features_per_stage,
                    conv_op: &kw.conv_op,
                    kernel_sizes: &kw.kernel_sizes,
                    strides: &kw.strides,
                    per_stage: &kw.n_conv_per_stage,
                    n_conv_per_stage_decoder: &kw.n_conv_per_stage_decoder,
                    conv_bias: kw.conv_bias,
                    norm_op: kw.norm_op.as_ref(),
                    norm_op_kwargs: kw.norm_op_kwargs.as_ref(),
                    dropout_op: kw.dropout_op.as_ref(),
                    nonlin: kw.nonlin.as_ref(),
                    nonlin_kwargs: kw.nonlin_kwargs.as_ref(),
                },
                Encoder::Plain {
                    n_conv_per_stage: kw.n_conv_per_stage.clone(),
                },
            ),
            NetworkKwargs::ResidualEncoderUNet(kw) => (
                Common {
                    n_stages: kw.n_stages,
                    features_per_stage: &kw.features_per_stage,
                    conv_op: &kw.conv_op,
                    kernel_sizes: &kw.kernel_sizes,
                    strides: &kw.strides,
                    per_stage: &kw.n_blocks_per_stage,
                    n_conv_per_stage_decoder: &kw.n_conv_per_stage_decoder,
                    conv_bias: kw.conv_bias,
                    norm_op: kw.norm_op.as_ref(),
                    norm_op_kwargs: kw.norm_op_kwargs.as_ref(),
                    dropout_op: kw.dropout_op.as_ref(),
                    nonlin: kw.nonlin.as_ref(),
                    nonlin_kwargs: kw.nonlin_kwargs.as_ref(),
                },
                Encoder::Residual {
                    n_blocks_per_stage: kw.n_blocks_per_stage.clone(),
                    stem_channels: residual_stem_channels(kw)?,
                },
            ),
            NetworkKwargs::Other(_) => {
                return Err(ArchitectureError::NetworkClass(
                    architecture.network_class_name.clone(),
                ))
            }
        };
        let spatial_dims = match kw.conv_op.rsplit('.').next() {
            Some("Conv2d") => 2,
            Some("Conv3d") => 3,
            _ => return Err(ArchitectureError::ConvOp(kw.conv_op.to_string())),
        };
        if let Some(norm) = kw.norm_op {
            if !norm.contains("InstanceNorm") {
                return Err(ArchitectureError::NormOp(norm.clone()));
            }
        }
        if let Some(dropout) = kw.dropout_op {
            return Err(ArchitectureError::DropoutOp(dropout.clone()));
        }
        if let Some(nonlin) = kw.nonlin {
            if !nonlin.ends_with("LeakyReLU") {
                return Err(ArchitectureError::Nonlin(nonlin.clone()));
            }
        }
        let n = kw.n_stages;
        let lengths_ok = kw.features_per_stage.len() == n
            && kw.kernel_sizes.len() == n
            && kw.strides.len() == n
            && kw.per_stage.len() == n
            && kw.n_conv_per_stage_decoder.len() + 1 == n
            && kw
                .kernel_sizes
                .iter()
                .chain(kw.strides)
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
            features_per_stage: kw.features_per_stage.to_vec(),
            kernel_sizes: kw.kernel_sizes.to_vec(),
            strides: kw.strides.to_vec(),
            encoder,
            n_conv_per_stage_decoder: kw.n_conv_per_stage_decoder.to_vec(),
            conv_bias: kw.conv_bias,
            norm_eps: kw.norm_op_kwargs.and_then(|k| k.eps).unwrap_or(1e-5),
            norm_affine: kw.norm_op_kwargs.and_then(|k| k.affine).unwrap_or(true),
            // torch.nn.LeakyReLU's default slope; nnU-Net's plans only set `inplace`.
            leaky_relu_slope: kw.nonlin_kwargs.and_then(|k| k.negative_slope).unwrap_or(0.01),
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

    /// The kwargs `nnUNetPlannerResEncM` writes (n_blocks_per_stage from (1, 3, 4, 6, ...), decoder
    /// blocks all 1), as in tests/fixtures/network/generate_resenc.py.
    fn resenc_value(dims: usize) -> serde_json::Value {
        let mut v = serde_json::to_value(plan_arch(dims)).unwrap();
        v["network_class_name"] =
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet".into();
        let kw = v["arch_kwargs"].as_object_mut().unwrap();
        kw.remove("n_conv_per_stage");
        kw.insert("n_blocks_per_stage".into(), serde_json::json!([1, 3, 4]));
        kw.insert("n_conv_per_stage_decoder".into(), serde_json::json!([1, 1]));
        v
    }

    fn from_value(v: serde_json::Value) -> Result<Architecture, ArchitectureError> {
        Architecture::from_plan(&serde_json::from_value(v).unwrap(), 1, 2, true)
    }

    #[test]
    fn reads_residual_encoder_unet() {
        let a = from_value(resenc_value(3)).unwrap();
        assert_eq!(
            a.encoder,
            Encoder::Residual {
                n_blocks_per_stage: vec![1, 3, 4],
                stem_channels: 8
            }
        );
        assert_eq!(a.n_conv_per_stage_decoder, vec![1, 1]);
        assert_eq!(a.deep_supervision_scales(), vec![[1.0; 3], [0.5; 3]]);
        // the optional kwargs: BasicBlockD named explicitly, a stem width, no bottleneck
        let mut v = resenc_value(2);
        v["arch_kwargs"]["block"] =
            "dynamic_network_architectures.building_blocks.residual.BasicBlockD".into();
        v["arch_kwargs"]["stem_channels"] = 3.into();
        v["arch_kwargs"]["bottleneck_channels"] = serde_json::Value::Null;
        let a = from_value(v).unwrap();
        assert!(matches!(a.encoder, Encoder::Residual { stem_channels: 3, .. }));
        let plain = Architecture::from_plan(&plan_arch(3), 1, 2, true).unwrap();
        assert_eq!(
            plain.encoder,
            Encoder::Plain {
                n_conv_per_stage: vec![2, 2, 2]
            }
        );
    }

    #[test]
    fn refuses_bottleneck_blocks_and_unknown_kwargs() {
        let mut v = resenc_value(3);
        v["arch_kwargs"]["block"] =
            "dynamic_network_architectures.building_blocks.residual.BottleneckD".into();
        v["arch_kwargs"]["bottleneck_channels"] = serde_json::json!([2, 4, 8]);
        let err = from_value(v).unwrap_err();
        assert!(matches!(err, ArchitectureError::Block(ref b) if b.ends_with("BottleneckD")));
        assert!(err.to_string().contains("BottleneckD"), "{err}");

        let mut v = resenc_value(3);
        v["arch_kwargs"]["squeeze_excitation"] = true.into();
        v["arch_kwargs"]["bottleneck_channels"] = 4.into();
        let err = from_value(v).unwrap_err();
        assert_eq!(
            err,
            ArchitectureError::ResidualKwargs(vec![
                "bottleneck_channels = 4".into(),
                "squeeze_excitation = true".into()
            ])
        );
        assert!(err.to_string().contains("squeeze_excitation"), "{err}");
    }

    #[test]
    fn refuses_other_networks() {
        let mut v = serde_json::to_value(plan_arch(3)).unwrap();
        v["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualUNet".into();
        v["arch_kwargs"]["n_blocks_per_stage"] = serde_json::json!([1, 1, 1]);
        let err = from_value(v).unwrap_err();
        assert!(err.to_string().contains("ResidualUNet"), "{err}");
    }
}
