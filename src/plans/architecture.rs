//! A configuration's `architecture`: the network's class name and the keyword arguments its
//! constructor gets (`arch_kwargs`), typed for the two classes of
//! `dynamic_network_architectures.architectures.unet` nnU-Net's planners use. A class nnflow does
//! not know is kept as written ([`NetworkKwargs::Other`]) rather than refused when the plan is
//! read: only building that network fails.
//!
//! Keyword arguments nnU-Net always writes (`norm_op`, `dropout_op`, ... possibly `null`) are
//! always written back; an absent one means the constructor's default `None` and comes back as
//! `null`. Any other keyword argument is kept in `extra`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `architecture` of a configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawArchitecture")]
pub struct ArchitecturePlan {
    /// The dotted Python class, e.g.
    /// `dynamic_network_architectures.architectures.unet.PlainConvUNet`.
    pub network_class_name: String,
    pub arch_kwargs: NetworkKwargs,
    /// The keyword arguments whose values are dotted class names to import (`conv_op`,
    /// `norm_op`, `dropout_op`, `nonlin`).
    #[serde(rename = "_kw_requires_import", skip_serializing_if = "Option::is_none")]
    pub kw_requires_import: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `arch_kwargs`, by network class.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum NetworkKwargs {
    PlainConvUNet(PlainConvUNetKwargs),
    ResidualEncoderUNet(ResidualEncoderUNetKwargs),
    /// Another class: its keyword arguments as written.
    Other(Value),
}

/// `PlainConvUNet.__init__`'s keyword arguments as nnU-Net's default planner writes them (the
/// input channels, classes and deep supervision come from elsewhere). Per-stage lists have
/// `n_stages` entries (the decoder's one fewer); per-axis lists 2 (2D) or 3 (3D) entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlainConvUNetKwargs {
    pub n_stages: usize,
    pub features_per_stage: Vec<usize>,
    /// `torch.nn.modules.conv.Conv2d` or `...Conv3d`.
    pub conv_op: String,
    /// Per stage, per axis.
    pub kernel_sizes: Vec<Vec<usize>>,
    /// Per stage, per axis; the first stage's is 1 (no downsampling).
    pub strides: Vec<Vec<usize>>,
    pub n_conv_per_stage: Vec<usize>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub conv_bias: bool,
    #[serde(default)]
    pub norm_op: Option<String>,
    #[serde(default)]
    pub norm_op_kwargs: Option<NormOpKwargs>,
    #[serde(default)]
    pub dropout_op: Option<String>,
    #[serde(default)]
    pub dropout_op_kwargs: Option<DropoutOpKwargs>,
    #[serde(default)]
    pub nonlin: Option<String>,
    #[serde(default)]
    pub nonlin_kwargs: Option<NonlinKwargs>,
    /// Other keyword arguments (`deep_supervision`, `nonlin_first`, ...), kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `ResidualEncoderUNet.__init__`'s keyword arguments as nnU-Net's ResEnc planners write them:
/// [`PlainConvUNetKwargs`] with residual blocks per encoder stage instead of convolutions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResidualEncoderUNetKwargs {
    pub n_stages: usize,
    pub features_per_stage: Vec<usize>,
    pub conv_op: String,
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    pub n_blocks_per_stage: Vec<usize>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub conv_bias: bool,
    #[serde(default)]
    pub norm_op: Option<String>,
    #[serde(default)]
    pub norm_op_kwargs: Option<NormOpKwargs>,
    #[serde(default)]
    pub dropout_op: Option<String>,
    #[serde(default)]
    pub dropout_op_kwargs: Option<DropoutOpKwargs>,
    #[serde(default)]
    pub nonlin: Option<String>,
    #[serde(default)]
    pub nonlin_kwargs: Option<NonlinKwargs>,
    /// Other keyword arguments (`block`, `bottleneck_channels`, `stem_channels`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `norm_op_kwargs` (nnU-Net: `{"eps": 1e-05, "affine": true}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NormOpKwargs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affine: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `dropout_op_kwargs` (nnU-Net: `null`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DropoutOpKwargs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inplace: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `nonlin_kwargs` (nnU-Net: `{"inplace": true}`; LeakyReLU's slope stays torch's default).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NonlinKwargs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_slope: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inplace: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ArchitecturePlan {
    /// The class name without its module (`PlainConvUNet`).
    pub fn class_name(&self) -> &str {
        class_name(&self.network_class_name)
    }
}

fn class_name(dotted: &str) -> &str {
    dotted.rsplit('.').next().unwrap_or(dotted)
}

/// `architecture` as written; its `arch_kwargs` are typed once the class is known.
#[derive(Deserialize)]
struct RawArchitecture {
    network_class_name: String,
    arch_kwargs: Value,
    #[serde(rename = "_kw_requires_import", default)]
    kw_requires_import: Option<Vec<String>>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `arch_kwargs` that do not fit the network class, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("arch_kwargs{}: {source}", if field == "." { String::new() } else { format!(".{field}") })]
pub struct ArchKwargsError {
    /// serde_path_to_error's path to the key (`features_per_stage[1]`), `.` for the whole object.
    pub field: String,
    #[source]
    pub source: serde_json::Error,
}

impl TryFrom<RawArchitecture> for ArchitecturePlan {
    type Error = ArchKwargsError;

    fn try_from(raw: RawArchitecture) -> Result<Self, ArchKwargsError> {
        fn typed<T: serde::de::DeserializeOwned>(kwargs: &Value) -> Result<T, ArchKwargsError> {
            serde_path_to_error::deserialize(kwargs).map_err(|e| ArchKwargsError {
                field: e.path().to_string(),
                source: e.into_inner(),
            })
        }
        let arch_kwargs = match class_name(&raw.network_class_name) {
            "PlainConvUNet" => NetworkKwargs::PlainConvUNet(typed(&raw.arch_kwargs)?),
            "ResidualEncoderUNet" => NetworkKwargs::ResidualEncoderUNet(typed(&raw.arch_kwargs)?),
            _ => NetworkKwargs::Other(raw.arch_kwargs),
        };
        Ok(ArchitecturePlan {
            network_class_name: raw.network_class_name,
            arch_kwargs,
            kw_requires_import: raw.kw_requires_import,
            extra: raw.extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn round_trip(value: Value) -> ArchitecturePlan {
        let plan: ArchitecturePlan = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(serde_json::to_value(&plan).unwrap(), value);
        plan
    }

    #[test]
    fn residual_encoder_and_unknown_classes_round_trip() {
        // nnU-Net's nnUNetPlannerResEncM writes this shape.
        let resenc = round_trip(json!({
            "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": 2, "features_per_stage": [32, 64], "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                "n_blocks_per_stage": [1, 3], "n_conv_per_stage_decoder": [1], "conv_bias": true,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": true}, "dropout_op": null,
                "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
        }));
        let NetworkKwargs::ResidualEncoderUNet(kwargs) = &resenc.arch_kwargs else {
            panic!("{resenc:?}");
        };
        assert_eq!(kwargs.n_blocks_per_stage, [1, 3]);
        assert_eq!(resenc.class_name(), "ResidualEncoderUNet");

        let other = round_trip(json!({
            "network_class_name": "my.nets.FancyNet", "arch_kwargs": {"depth": "deep"},
            "custom": [1, 2.5]
        }));
        assert!(matches!(other.arch_kwargs, NetworkKwargs::Other(_)));
    }

    #[test]
    fn a_wrong_kwarg_is_named() {
        let error = serde_json::from_value::<ArchitecturePlan>(json!({
            "network_class_name": "PlainConvUNet",
            "arch_kwargs": {"n_stages": 2, "features_per_stage": [32, "x"]}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("arch_kwargs.features_per_stage[1]: invalid type: string \"x\""),
            "{error}"
        );
    }
}
