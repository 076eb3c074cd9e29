//! PlainConvUNet (dynamic_network_architectures, as nnU-Net v2 builds it from a plan) in libtorch.
//!
//! Encoder stage `s`: `n_conv_per_stage[s]` blocks of conv -> instance norm -> leaky ReLU, the first
//! with the stage's stride (strided convolution instead of pooling). The decoder is the shared
//! `UNetDecoder` (`blocks.rs`): transposed convolution, concatenation with the skip, blocks like
//! the encoder's and a 1x1 segmentation head per stage. With deep supervision every decoder
//! stage's head is returned, highest resolution first; without it only the last head runs.
//!
//! Variable names are nnU-Net's state-dict names (`encoder.stages.0.0.convs.0.conv.weight`,
//! `decoder.transpconvs.0.weight`, `decoder.seg_layers.4.bias`, ...). PyTorch's state dict also lists
//! aliases of the same tensors (`...all_modules.0.weight`, `decoder.encoder.*`);
//! `nnflow::network::state_dict::nnunet_aliases` maps them so checkpoints can be exchanged both ways.

use tch::nn;
use tch::Tensor;

use nnflow::network::architecture::Encoder;
use nnflow::network::Architecture;

use crate::blocks::{run, stacked, ConvNormAct, UNetDecoder};

#[derive(Debug)]
pub struct PlainConvUNet {
    pub architecture: Architecture,
    encoder: Vec<Vec<ConvNormAct>>,
    decoder: UNetDecoder,
}

impl PlainConvUNet {
    /// Creates the network's variables in `root` (freshly initialised). `arch` must describe a
    /// plain encoder ([`Encoder::Plain`]).
    pub fn new(root: &nn::Path, arch: &Architecture) -> PlainConvUNet {
        let Encoder::Plain { n_conv_per_stage } = &arch.encoder else {
            panic!("PlainConvUNet built from a {:?} encoder", arch.encoder)
        };
        let enc = root / "encoder" / "stages";
        let mut in_ch = arch.input_channels;
        let encoder = (0..arch.n_stages())
            .map(|s| {
                let out = arch.features_per_stage[s];
                let blocks = stacked(
                    &enc / s / 0,
                    arch,
                    n_conv_per_stage[s],
                    in_ch,
                    out,
                    &arch.kernel_sizes[s],
                    &arch.strides[s],
                );
                in_ch = out;
                blocks
            })
            .collect();
        let decoder = UNetDecoder::new(&(root / "decoder"), arch);
        PlainConvUNet {
            architecture: arch.clone(),
            encoder,
            decoder,
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
        self.decoder.forward(skips, self.architecture.deep_supervision)
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
