//! ResidualEncoderUNet (dynamic_network_architectures 0.4.4, the network of nnU-Net's ResEnc
//! presets nnUNetResEncUNet{M,L,XL}Plans) in libtorch, with BasicBlockD residual blocks.
//!
//! Encoder: a stem (`StackedConvBlocks` of one conv -> norm -> leaky ReLU, input channels ->
//! `stem_channels`, the first stage's kernel, stride 1), then per stage `n_blocks_per_stage[s]`
//! BasicBlockD, the first with the stage's stride. BasicBlockD (ResNet-D):
//! `leaky_relu(norm(conv2(leaky_relu(norm(conv1(x))))) + skip(x))`, where `skip` is the identity,
//! or an average pool (kernel = stride) where the block strides, followed by a 1x1 conv (no bias)
//! -> norm where the width changes. The decoder is PlainConvUNet's (`blocks::UNetDecoder`), on the
//! outputs of the stages (not of the stem).
//!
//! Variable names are nnU-Net's state-dict names: `encoder.stem.convs.0.{conv,norm}.*`,
//! `encoder.stages.<s>.blocks.<b>.conv1.{conv,norm}.*`, `...conv2.{conv,norm}.*`, the projection
//! `...skip.1.{conv,norm}.*` after a pool (`skip.0` is the parameter-free AvgPool) or `...skip.0.*`
//! without one, and the decoder's `decoder.{transpconvs,stages,seg_layers}.*`. PyTorch's state dict
//! also lists each conv block's tensors as `...all_modules.{0,1}.*` and the encoder again under
//! `decoder.encoder.*`; those aliases are not variables here (loading ignores them).

use tch::nn;
use tch::Tensor;

use nnflow::network::architecture::Encoder;
use nnflow::network::Architecture;

use crate::blocks::{leaky_relu, ConvNormAct, UNetDecoder};

/// BasicBlockD: two conv blocks (the second without nonlinearity) plus a skip, then leaky ReLU.
#[derive(Debug)]
struct BasicBlockD {
    conv1: ConvNormAct,
    conv2: ConvNormAct,
    /// The stride, where the block strides: the skip average-pools with kernel = stride.
    pool: Option<Vec<i64>>,
    /// The 1x1 conv -> norm on the skip, where the width changes.
    projection: Option<ConvNormAct>,
    slope: f64,
}

impl BasicBlockD {
    /// nnU-Net's initialisation, including `init_last_bn_before_add_to_0`: conv2's norm starts at
    /// weight 0, bias 0, so a fresh block passes its skip through.
    fn new(
        path: nn::Path,
        arch: &Architecture,
        (in_ch, out_ch): (usize, usize),
        kernel: &[usize],
        stride: &[usize],
    ) -> BasicBlockD {
        let ones = vec![1; stride.len()];
        let conv1 = ConvNormAct::new(&path / "conv1", arch, in_ch, out_ch, kernel, stride);
        let mut conv2 = ConvNormAct::with(
            &path / "conv2",
            arch,
            (out_ch, out_ch),
            kernel,
            &ones,
            arch.conv_bias,
            false,
        );
        conv2.zero_norm_weight();
        let pool = stride
            .iter()
            .any(|&s| s != 1)
            .then(|| stride.iter().map(|&s| s as i64).collect::<Vec<i64>>());
        // `skip` is an nn.Sequential: the AvgPool (no parameters) takes index 0 where present.
        let projection = (in_ch != out_ch).then(|| {
            ConvNormAct::with(
                &path / "skip" / usize::from(pool.is_some()),
                arch,
                (in_ch, out_ch),
                &ones,
                &ones,
                false,
                false,
            )
        });
        BasicBlockD {
            conv1,
            conv2,
            pool,
            projection,
            slope: arch.leaky_relu_slope,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut residual = x.shallow_clone();
        if let Some(stride) = &self.pool {
            let zeros = vec![0i64; stride.len()];
            residual = if stride.len() == 3 {
                residual.avg_pool3d(stride, stride, &zeros, false, true, None::<i64>)
            } else {
                residual.avg_pool2d(stride, stride, &zeros, false, true, None::<i64>)
            };
        }
        if let Some(projection) = &self.projection {
            residual = projection.forward(&residual);
        }
        let out = self.conv2.forward(&self.conv1.forward(x)) + residual;
        leaky_relu(&out, self.slope)
    }
}

#[derive(Debug)]
pub struct ResidualEncoderUNet {
    pub architecture: Architecture,
    stem: ConvNormAct,
    stages: Vec<Vec<BasicBlockD>>,
    decoder: UNetDecoder,
}

impl ResidualEncoderUNet {
    /// Creates the network's variables in `root` (freshly initialised). `arch` must describe a
    /// residual encoder ([`Encoder::Residual`]).
    pub fn new(root: &nn::Path, arch: &Architecture) -> ResidualEncoderUNet {
        let Encoder::Residual {
            n_blocks_per_stage,
            stem_channels,
        } = &arch.encoder
        else {
            panic!("ResidualEncoderUNet built from a {:?} encoder", arch.encoder)
        };
        let encoder = root / "encoder";
        let ones = vec![1; arch.spatial_dims];
        let stem = ConvNormAct::new(
            &encoder / "stem" / "convs" / 0,
            arch,
            arch.input_channels,
            *stem_channels,
            &arch.kernel_sizes[0],
            &ones,
        );
        let mut in_ch = *stem_channels;
        let stages = (0..arch.n_stages())
            .map(|s| {
                let out = arch.features_per_stage[s];
                let blocks = (0..n_blocks_per_stage[s])
                    .map(|b| {
                        let (cin, stride) = if b == 0 {
                            (in_ch, arch.strides[s].as_slice())
                        } else {
                            (out, ones.as_slice())
                        };
                        BasicBlockD::new(
                            &encoder / "stages" / s / "blocks" / b,
                            arch,
                            (cin, out),
                            &arch.kernel_sizes[s],
                            stride,
                        )
                    })
                    .collect();
                in_ch = out;
                blocks
            })
            .collect();
        let decoder = UNetDecoder::new(&(root / "decoder"), arch);
        ResidualEncoderUNet {
            architecture: arch.clone(),
            stem,
            stages,
            decoder,
        }
    }

    /// Logits per deep-supervision output, highest resolution first (one entry without deep
    /// supervision). Input `(batch, channels, [z,] y, x)`.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut skips = Vec::with_capacity(self.stages.len());
        let mut x = self.stem.forward(x);
        for stage in &self.stages {
            x = stage.iter().fold(x, |x, block| block.forward(&x));
            skips.push(x.shallow_clone());
        }
        self.decoder.forward(skips, self.architecture.deep_supervision)
    }

    /// As [`crate::unet::PlainConvUNet::set_deep_supervision`].
    pub fn set_deep_supervision(&mut self, enabled: bool) {
        self.architecture.deep_supervision = enabled;
    }
}

/// ResidualEncoderUNet against nnU-Net's own (fixtures from
/// tests/fixtures/network/generate_resenc.py: nnunetv2 2.8.1's get_network_from_plans on
/// architecture blocks shaped as nnUNetPlannerResEncM writes them): parameter names and shapes,
/// counts, nnU-Net's init of the last norm per block, and outputs for nnU-Net's weights, with and
/// without deep supervision.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use nnflow::network::Architecture;
    use serde_json::Value;
    use tch::{nn::VarStore, Device, Tensor};

    use crate::network::Network;
    use crate::unet::parameter_count;

    const CASES: [&str; 3] = ["resenc_small_3d", "resenc_small_2d", "resenc_stem_2d"];

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/network")
            .join(name)
    }

    fn load(case: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{case}.json"))).unwrap()).unwrap()
    }

    fn build(case: &Value) -> (VarStore, Network) {
        let arch = Architecture::from_plan(
            &serde_json::from_value(case["architecture"].clone()).unwrap(),
            case["input_channels"].as_u64().unwrap() as usize,
            case["num_classes"].as_u64().unwrap() as usize,
            true,
        )
        .unwrap();
        let vs = VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &arch);
        assert!(matches!(net, Network::ResidualEncoder(_)));
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
        for case_name in CASES {
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
            // every other name of nnU-Net's state dict is another name of one of these tensors
            for e in entries.iter().filter(|e| !e["alias_of"].is_null()) {
                let of = e["alias_of"].as_str().unwrap();
                assert_eq!(ours.get(of), Some(&shape_of(&e["shape"])), "{case_name}: {of}");
            }
        }
    }

    /// Full-size ResEnc M topologies (3d_fullres up to 320 features, 2d up to 512): the same
    /// parameter count and number of tensors as nnU-Net's (~100M parameters each).
    #[test]
    fn full_size_parameter_counts_equal_nnunet() {
        let counts: BTreeMap<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(fixture("resenc_counts.json")).unwrap()).unwrap();
        for (name, case) in &counts {
            let (vs, _net) = build(case);
            assert_eq!(
                parameter_count(&vs),
                case["total_params"].as_i64().unwrap(),
                "{name}"
            );
            assert_eq!(
                vs.variables().len() as u64,
                case["num_tensors"].as_u64().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn last_norm_of_each_block_starts_at_zero() {
        for case_name in CASES {
            let case = load(case_name);
            let (vs, _net) = build(&case);
            let vars = vs.variables();
            let zero: Vec<&str> = case["zero_init"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            assert!(!zero.is_empty());
            for (name, t) in &vars {
                let max = t.abs().max().double_value(&[]);
                if zero.contains(&name.as_str()) {
                    assert_eq!(max, 0.0, "{case_name}: {name}");
                } else if name.ends_with("norm.weight") {
                    assert_eq!(t.min().double_value(&[]), 1.0, "{case_name}: {name}");
                } else if name.ends_with(".weight") {
                    assert!(max > 0.0, "{case_name}: {name}");
                }
            }
        }
    }

    /// Tolerance 1e-4 (outputs are O(1-10), see `output_abs_max` in the fixtures): both sides are
    /// float32 on the CPU, but nnflow's libtorch and the generator's torch may sum a convolution's
    /// products in different orders; the reference's own float32-vs-float64 error is ~5e-6
    /// (`max_abs_diff_float32_vs_float64`), so 1e-4 leaves room for that while any wrong block,
    /// name or skip would be off by orders of magnitude more.
    #[test]
    fn nnunet_weights_give_nnunet_outputs() {
        let mut worst = 0.0f64;
        for case_name in CASES {
            let case = load(case_name);
            let (mut vs, mut net) = build(&case);
            // by name, every variable present with its shape (as a trained model is loaded)
            crate::checkpoint::load_weights(&fixture(&format!("{case_name}.safetensors")), &mut vs).unwrap();
            let io: BTreeMap<String, Tensor> =
                Tensor::read_safetensors(fixture(&format!("{case_name}_io.safetensors")))
                    .unwrap()
                    .into_iter()
                    .collect();
            let outputs = tch::no_grad(|| net.forward(&io["input"]));
            let expected_shapes: Vec<Vec<i64>> = case["ds_output_shapes"]
                .as_array()
                .unwrap()
                .iter()
                .map(shape_of)
                .collect();
            let shapes: Vec<Vec<i64>> = outputs.iter().map(Tensor::size).collect();
            assert_eq!(shapes, expected_shapes, "{case_name}");
            for (i, output) in outputs.iter().enumerate() {
                let expected = &io[&format!("output.{i}")];
                let diff = (output - expected).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{case_name} output {i}: max difference {diff}");
                worst = worst.max(diff);
            }
            // evaluation: only the full-resolution head
            net.set_deep_supervision(false);
            let single = tch::no_grad(|| net.forward(&io["input"]));
            assert_eq!(single.len(), 1);
            assert_eq!(
                single[0].size(),
                shape_of(&case["no_ds_output_shape"]),
                "{case_name}"
            );
            let diff = (&single[0] - &io["output.0"]).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{case_name} eval output: max difference {diff}");
            worst = worst.max(diff);
        }
        println!("max abs difference to nnU-Net's outputs: {worst:e}");
    }
}
