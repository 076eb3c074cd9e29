//! The building blocks nnU-Net's two U-Nets share (dynamic_network_architectures'
//! `building_blocks`): a convolution, `ConvDropoutNormReLU` (conv -> instance norm -> leaky ReLU,
//! no dropout), `StackedConvBlocks` and the `UNetDecoder`. PlainConvUNet (`unet.rs`) and
//! ResidualEncoderUNet (`resenc.rs`) differ only in their encoders.
//!
//! Variables are created under nnU-Net's state-dict names relative to the path they are given
//! (`conv.weight`, `norm.bias`, `convs.<i>.…`, `transpconvs.<s>.weight`, `stages.<s>.convs.<i>.…`,
//! `seg_layers.<s>.bias`).

use tch::nn::{self, Init};
use tch::Tensor;

use nnflow::network::Architecture;

#[derive(Debug)]
pub struct Conv {
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
    pub fn new(
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

    pub fn forward(&self, x: &Tensor) -> Tensor {
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

/// `torch.nn.LeakyReLU(negative_slope)`.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Tensor {
    if slope == 0.01 {
        x.leaky_relu()
    } else {
        x.maximum(&(x * slope))
    }
}

/// `ConvDropoutNormReLU` without dropout: conv -> instance norm -> (optionally) leaky ReLU, with
/// variables `conv.{weight,bias}` and `norm.{weight,bias}`.
#[derive(Debug)]
pub struct ConvNormAct {
    conv: Conv,
    norm_weight: Option<Tensor>,
    norm_bias: Option<Tensor>,
    eps: f64,
    /// The leaky ReLU's slope; `None` where the block has no nonlinearity.
    slope: Option<f64>,
}

impl ConvNormAct {
    /// The plan's block: conv bias as `conv_bias`, followed by the nonlinearity.
    pub fn new(
        path: nn::Path,
        arch: &Architecture,
        in_ch: usize,
        out_ch: usize,
        kernel: &[usize],
        stride: &[usize],
    ) -> Self {
        Self::with(path, arch, (in_ch, out_ch), kernel, stride, arch.conv_bias, true)
    }

    /// A block with the conv's bias and the nonlinearity chosen (BasicBlockD's `conv2` has no
    /// nonlinearity; its skip projection neither, and no bias whatever the plan says).
    pub fn with(
        path: nn::Path,
        arch: &Architecture,
        (in_ch, out_ch): (usize, usize),
        kernel: &[usize],
        stride: &[usize],
        bias: bool,
        nonlin: bool,
    ) -> Self {
        let conv = Conv::new(&path / "conv", in_ch, out_ch, kernel, stride, bias, false);
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
            slope: nonlin.then_some(arch.leaky_relu_slope),
        }
    }

    /// Sets the norm's affine weight to 0 (its bias already is): nnU-Net's
    /// `init_last_bn_before_add_to_0` for the last norm of a residual block, so each block starts
    /// as its skip.
    pub fn zero_norm_weight(&mut self) {
        if let Some(weight) = self.norm_weight.as_mut() {
            tch::no_grad(|| {
                let _ = weight.fill_(0.0);
            });
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
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
        match self.slope {
            Some(slope) => leaky_relu(&y, slope),
            None => y,
        }
    }
}

/// `StackedConvBlocks`: `n` blocks, the first with `stride`, named `convs.<i>` under `path`.
pub fn stacked(
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

pub fn run(blocks: &[ConvNormAct], x: &Tensor) -> Tensor {
    blocks.iter().fold(x.shallow_clone(), |x, b| b.forward(&x))
}

/// `UNetDecoder`. Stage `s` (lowest resolution first): a transposed convolution with kernel =
/// stride = the encoder stride it undoes, concatenation with the skip (upsampled first, skip
/// second), `n_conv_per_stage_decoder[s]` blocks, and a 1x1 segmentation head (always built, so
/// weights load with or without deep supervision).
#[derive(Debug)]
pub struct UNetDecoder {
    transpconvs: Vec<Conv>,
    stages: Vec<Vec<ConvNormAct>>,
    seg_layers: Vec<Conv>,
}

impl UNetDecoder {
    /// Variables under `path` (`decoder`), created per stage in the order transposed conv, blocks,
    /// head (the order fixes what a seed draws).
    pub fn new(path: &nn::Path, arch: &Architecture) -> UNetDecoder {
        let n = arch.n_stages();
        let ones = vec![1; arch.spatial_dims];
        let (mut transpconvs, mut stages, mut seg_layers) = (Vec::new(), Vec::new(), Vec::new());
        for s in 1..n {
            let below = arch.features_per_stage[n - s];
            let skip = arch.features_per_stage[n - s - 1];
            let stride = &arch.strides[n - s];
            transpconvs.push(Conv::new(
                path / "transpconvs" / (s - 1),
                below,
                skip,
                stride,
                stride,
                arch.conv_bias,
                true,
            ));
            stages.push(stacked(
                path / "stages" / (s - 1),
                arch,
                arch.n_conv_per_stage_decoder[s - 1],
                2 * skip,
                skip,
                &arch.kernel_sizes[n - s - 1],
                &ones,
            ));
            seg_layers.push(Conv::new(
                path / "seg_layers" / (s - 1),
                skip,
                arch.num_classes,
                &ones,
                &ones,
                true,
                false,
            ));
        }
        UNetDecoder {
            transpconvs,
            stages,
            seg_layers,
        }
    }

    /// `skips`: every encoder stage's output, highest resolution first (the last is the
    /// bottleneck). Returns logits per deep-supervision output, highest resolution first; without
    /// deep supervision only the last head runs and one output comes back.
    pub fn forward(&self, mut skips: Vec<Tensor>, deep_supervision: bool) -> Vec<Tensor> {
        let mut outputs = Vec::new();
        let mut lower = skips.pop().expect("at least two stages");
        let last = self.stages.len() - 1;
        for (s, (up, blocks)) in self.transpconvs.iter().zip(&self.stages).enumerate() {
            let skip = skips.pop().expect("one skip per decoder stage");
            let merged = Tensor::cat(&[up.forward(&lower), skip], 1);
            lower = run(blocks, &merged);
            if deep_supervision || s == last {
                outputs.push(self.seg_layers[s].forward(&lower));
            }
        }
        outputs.reverse();
        outputs
    }
}
