//! PlainConvUNet (dynamic_network_architectures, as nnU-Net v2 builds it from a plan) in libtorch.
//!
//! Encoder stage `s`: `n_conv_per_stage[s]` blocks of conv -> instance norm -> leaky ReLU, the first
//! with the stage's stride (strided convolution instead of pooling). Decoder stage `s` (lowest
//! resolution first): a transposed convolution with kernel = stride = the encoder stride it undoes,
//! concatenation with the skip (upsampled first, skip second), blocks like the encoder's, and a 1x1
//! segmentation head. With deep supervision every decoder stage's head is returned, highest
//! resolution first; without it only the last head runs.
//!
//! Variable names are nnU-Net's state-dict names (`encoder.stages.0.0.convs.0.conv.weight`,
//! `decoder.transpconvs.0.weight`, `decoder.seg_layers.4.bias`, ...). PyTorch's state dict also lists
//! aliases of the same tensors (`...all_modules.0.weight`, `decoder.encoder.*`);
//! `nnflow::network::state_dict::nnunet_aliases` maps them so checkpoints can be exchanged both ways.

use tch::nn::{self, Init};
use tch::Tensor;

use nnflow::network::Architecture;

#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: Vec<i64>,
    padding: Vec<i64>,
    transposed: bool,
}

impl Conv {
    /// A convolution initialised as nnU-Net's `InitWeights_He(1e-2)`: Kaiming normal with leaky-ReLU
    /// slope 0.01 over PyTorch's fan-in (weight dim 1 times the kernel volume; for a transposed
    /// convolution dim 1 is its output channels), bias 0. Padding `(k - 1) / 2` keeps the size.
    fn new(
        path: nn::Path,
        in_ch: usize,
        out_ch: usize,
        kernel: &[usize],
        stride: &[usize],
        bias: bool,
        transposed: bool,
    ) -> Conv {
        let kernel: Vec<i64> = kernel.iter().map(|&k| k as i64).collect();
        let (d0, d1) = if transposed {
            (in_ch, out_ch)
        } else {
            (out_ch, in_ch)
        };
        let mut shape = vec![d0 as i64, d1 as i64];
        shape.extend(&kernel);
        let fan_in = d1 as f64 * kernel.iter().product::<i64>() as f64;
        let gain = (2.0 / (1.0 + 0.01f64.powi(2))).sqrt();
        let weight = path.var(
            "weight",
            &shape,
            Init::Randn {
                mean: 0.0,
                stdev: gain / fan_in.sqrt(),
            },
        );
        let bias = bias.then(|| path.var("bias", &[out_ch as i64], Init::Const(0.0)));
        Conv {
            weight,
            bias,
            stride: stride.iter().map(|&s| s as i64).collect(),
            padding: if transposed {
                vec![0; kernel.len()]
            } else {
                kernel.iter().map(|k| (k - 1) / 2).collect()
            },
            transposed,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dims = self.stride.len();
        x.convolution(
            &self.weight,
            self.bias.as_ref(),
            &self.stride,
            &self.padding,
            vec![1i64; dims],
            self.transposed,
            vec![0i64; dims],
            1,
        )
    }
}

#[derive(Debug)]
struct ConvNormAct {
    conv: Conv,
    norm_weight: Option<Tensor>,
    norm_bias: Option<Tensor>,
    eps: f64,
    slope: f64,
}

impl ConvNormAct {
    fn new(
        path: nn::Path,
        arch: &Architecture,
        in_ch: usize,
        out_ch: usize,
        kernel: &[usize],
        stride: &[usize],
    ) -> Self {
        let conv = Conv::new(
            &path / "conv",
            in_ch,
            out_ch,
            kernel,
            stride,
            arch.conv_bias,
            false,
        );
        let norm = &path / "norm";
        let (norm_weight, norm_bias) = if arch.norm_affine {
            (
                Some(norm.var("weight", &[out_ch as i64], Init::Const(1.0))),
                Some(norm.var("bias", &[out_ch as i64], Init::Const(0.0))),
            )
        } else {
            (None, None)
        };
        ConvNormAct {
            conv,
            norm_weight,
            norm_bias,
            eps: arch.norm_eps,
            slope: arch.leaky_relu_slope,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.conv.forward(x).instance_norm(
            self.norm_weight.as_ref(),
            self.norm_bias.as_ref(),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            self.eps,
            true,
        );
        if self.slope == 0.01 {
            y.leaky_relu()
        } else {
            y.maximum(&(&y * self.slope))
        }
    }
}

/// `n` blocks, the first with `stride`, named `convs.<i>` under `path`.
fn stacked(
    path: nn::Path,
    arch: &Architecture,
    n: usize,
    in_ch: usize,
    out_ch: usize,
    kernel: &[usize],
    stride: &[usize],
) -> Vec<ConvNormAct> {
    let ones = vec![1; stride.len()];
    (0..n)
        .map(|i| {
            let (cin, s) = if i == 0 {
                (in_ch, stride)
            } else {
                (out_ch, ones.as_slice())
            };
            ConvNormAct::new(&path / "convs" / i, arch, cin, out_ch, kernel, s)
        })
        .collect()
}

fn run(blocks: &[ConvNormAct], x: &Tensor) -> Tensor {
    blocks.iter().fold(x.shallow_clone(), |x, b| b.forward(&x))
}

#[derive(Debug)]
pub struct PlainConvUNet {
    pub architecture: Architecture,
    encoder: Vec<Vec<ConvNormAct>>,
    transpconvs: Vec<Conv>,
    decoder: Vec<Vec<ConvNormAct>>,
    seg_layers: Vec<Conv>,
}

impl PlainConvUNet {
    /// Creates the network's variables in `root` (freshly initialised).
    pub fn new(root: &nn::Path, arch: &Architecture) -> PlainConvUNet {
        let n = arch.n_stages();
        let enc = root / "encoder" / "stages";
        let mut in_ch = arch.input_channels;
        let encoder = (0..n)
            .map(|s| {
                let out = arch.features_per_stage[s];
                let blocks = stacked(
                    &enc / s / 0,
                    arch,
                    arch.n_conv_per_stage[s],
                    in_ch,
                    out,
                    &arch.kernel_sizes[s],
                    &arch.strides[s],
                );
                in_ch = out;
                blocks
            })
            .collect();
        let dec = root / "decoder";
        let (mut transpconvs, mut decoder, mut seg_layers) = (Vec::new(), Vec::new(), Vec::new());
        for s in 1..n {
            let below = arch.features_per_stage[n - s];
            let skip = arch.features_per_stage[n - s - 1];
            let stride = &arch.strides[n - s];
            transpconvs.push(Conv::new(
                &dec / "transpconvs" / (s - 1),
                below,
                skip,
                stride,
                stride,
                arch.conv_bias,
                true,
            ));
            decoder.push(stacked(
                &dec / "stages" / (s - 1),
                arch,
                arch.n_conv_per_stage_decoder[s - 1],
                2 * skip,
                skip,
                &arch.kernel_sizes[n - s - 1],
                &vec![1; arch.spatial_dims],
            ));
            let ones = vec![1; arch.spatial_dims];
            seg_layers.push(Conv::new(
                &dec / "seg_layers" / (s - 1),
                skip,
                arch.num_classes,
                &ones,
                &ones,
                true,
                false,
            ));
        }
        PlainConvUNet {
            architecture: arch.clone(),
            encoder,
            transpconvs,
            decoder,
            seg_layers,
        }
    }

    /// Logits per deep-supervision output, highest resolution first (one entry without deep
    /// supervision). Input `(batch, channels, [z,] y, x)`.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut skips = Vec::with_capacity(self.encoder.len());
        let mut x = x.shallow_clone();
        for stage in &self.encoder {
            x = run(stage, &x);
            skips.push(x.shallow_clone());
        }
        let mut outputs = Vec::new();
        let mut lower = skips.pop().expect("at least two stages");
        let last = self.decoder.len() - 1;
        for (s, (up, blocks)) in self.transpconvs.iter().zip(&self.decoder).enumerate() {
            let skip = skips.pop().expect("one skip per decoder stage");
            let merged = Tensor::cat(&[up.forward(&lower), skip], 1);
            lower = run(blocks, &merged);
            if self.architecture.deep_supervision || s == last {
                outputs.push(self.seg_layers[s].forward(&lower));
            }
        }
        outputs.reverse();
        outputs
    }

    /// Whether to return every deep-supervision head (training) or just the full-resolution one
    /// (validation and inference), as nnU-Net's `set_deep_supervision_enabled`.
    pub fn set_deep_supervision(&mut self, enabled: bool) {
        self.architecture.deep_supervision = enabled;
    }
}

/// Number of trainable parameters.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// PlainConvUNet against nnU-Net's own (fixtures from tests/fixtures/network/generate.py, which
/// builds the networks with nnunetv2 2.8.1's get_network_from_plans): parameter names and shapes,
/// parameter counts, deep-supervision output shapes, and outputs for nnU-Net's weights.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use nnflow::network::state_dict::nnunet_aliases;
    use nnflow::network::Architecture;
    use serde_json::Value;
    use tch::{nn::VarStore, Device, Kind, Tensor};

    use super::{parameter_count, PlainConvUNet};

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/network")
            .join(name)
    }

    fn load(case: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{case}.json"))).unwrap()).unwrap()
    }

    fn build(case: &Value) -> (VarStore, PlainConvUNet) {
        let arch = Architecture::from_plan(
            &serde_json::from_value(case["architecture"].clone()).unwrap(),
            case["input_channels"].as_u64().unwrap() as usize,
            case["num_classes"].as_u64().unwrap() as usize,
            true,
        )
        .unwrap();
        let vs = VarStore::new(Device::Cpu);
        let net = PlainConvUNet::new(&vs.root(), &arch);
        (vs, net)
    }

    fn shape_of(v: &Value) -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect()
    }

    #[test]
    fn names_shapes_and_counts_equal_nnunet() {
        for case_name in [
            "a_3d_iso",
            "b_3d_aniso",
            "c_2d",
            "d_3d_fullres",
            "a_small_3d_iso",
            "c_small_2d",
        ] {
            let case = load(case_name);
            let (vs, _net) = build(&case);
            let ours: BTreeMap<String, Vec<i64>> =
                vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
            let entries = case["state_dict"].as_array().unwrap();
            let canonical: BTreeMap<String, Vec<i64>> = entries
                .iter()
                .filter(|e| e["alias_of"].is_null())
                .map(|e| (e["name"].as_str().unwrap().to_string(), shape_of(&e["shape"])))
                .collect();
            assert_eq!(ours, canonical, "{case_name}: parameter names and shapes");
            assert_eq!(
                parameter_count(&vs),
                case["total_params"].as_i64().unwrap(),
                "{case_name}"
            );
            // every alias PyTorch lists points at the tensor nnU-Net says it does
            let names: Vec<String> = ours.keys().cloned().collect();
            let aliases: BTreeMap<String, String> = nnunet_aliases(&names).into_iter().collect();
            for e in entries.iter().filter(|e| !e["alias_of"].is_null()) {
                let name = e["name"].as_str().unwrap();
                assert_eq!(
                    aliases.get(name).map(String::as_str),
                    e["alias_of"].as_str(),
                    "{case_name}: {name}"
                );
            }
            assert_eq!(
                aliases.len() + names.len(),
                case["state_dict_len"].as_u64().unwrap() as usize
            );
        }
    }

    #[test]
    fn deep_supervision_output_shapes() {
        for case_name in ["a_3d_iso", "c_2d", "a_small_3d_iso"] {
            let case = load(case_name);
            let (_vs, mut net) = build(&case);
            let input = Tensor::zeros(shape_of(&case["input_shape"]), (Kind::Float, Device::Cpu));
            let outputs = tch::no_grad(|| net.forward(&input));
            let shapes: Vec<Vec<i64>> = outputs.iter().map(Tensor::size).collect();
            let expected: Vec<Vec<i64>> = case["ds_output_shapes"]
                .as_array()
                .unwrap()
                .iter()
                .map(shape_of)
                .collect();
            assert_eq!(shapes, expected, "{case_name}");
            net.set_deep_supervision(false);
            let single = tch::no_grad(|| net.forward(&input));
            assert_eq!(single.len(), 1);
            assert_eq!(
                single[0].size(),
                shape_of(&case["no_ds_output_shape"]),
                "{case_name}"
            );
        }
    }

    #[test]
    fn nnunet_weights_give_nnunet_outputs() {
        for case_name in ["a_small_3d_iso", "c_small_2d"] {
            let case = load(case_name);
            let (mut vs, net) = build(&case);
            vs.load(fixture(&format!("{case_name}.safetensors"))).unwrap();
            let io: BTreeMap<String, Tensor> =
                Tensor::read_safetensors(fixture(&format!("{case_name}_io.safetensors")))
                    .unwrap()
                    .into_iter()
                    .collect();
            let outputs = tch::no_grad(|| net.forward(&io["input"]));
            for (i, output) in outputs.iter().enumerate() {
                let expected = &io[&format!("output.{i}")];
                let diff = (output - expected).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{case_name} output {i}: max difference {diff}");
            }
        }
    }

    #[test]
    fn initialisation_follows_he_with_leaky_slope() {
        // Same distribution as nnU-Net's InitWeights_He(1e-2): compare each conv weight's sample std
        // with the expected std recorded by the generator (large tensors only, where the sample std
        // is tight), biases zero and norm weights one.
        let case = load("a_3d_iso");
        let (vs, _net) = build(&case);
        let vars = vs.variables();
        for e in case["state_dict"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["alias_of"].is_null())
        {
            let name = e["name"].as_str().unwrap();
            let t = &vars[name];
            match e["init"]["init"].as_str().unwrap() {
                "kaiming_normal" if t.numel() > 20_000 => {
                    let std = t.std(true).double_value(&[]);
                    let expected = e["init"]["std"].as_f64().unwrap();
                    assert!(
                        (std / expected - 1.0).abs() < 0.05,
                        "{name}: std {std} vs {expected}"
                    );
                }
                "constant" | "torch_default_zeros" => {
                    assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}")
                }
                "torch_default_ones" => assert_eq!(t.min().double_value(&[]), 1.0, "{name}"),
                _ => {}
            }
        }
    }
}
