//! The network the trainer, the predictor and the benchmark run: whichever of nnU-Net's U-Nets
//! the plan's architecture names, behind one interface.

use tch::nn;
use tch::Tensor;

use nnflow::network::architecture::Encoder;
use nnflow::network::Architecture;

use crate::resenc::ResidualEncoderUNet;
use crate::unet::PlainConvUNet;

#[derive(Debug)]
pub enum Network {
    /// `dynamic_network_architectures.architectures.unet.PlainConvUNet`.
    Plain(PlainConvUNet),
    /// `dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`.
    ResidualEncoder(ResidualEncoderUNet),
}

impl Network {
    /// Creates the network `arch` describes, its variables in `root` (freshly initialised).
    pub fn new(root: &nn::Path, arch: &Architecture) -> Network {
        match arch.encoder {
            Encoder::Plain { .. } => Network::Plain(PlainConvUNet::new(root, arch)),
            Encoder::Residual { .. } => Network::ResidualEncoder(ResidualEncoderUNet::new(root, arch)),
        }
    }

    pub fn architecture(&self) -> &Architecture {
        match self {
            Network::Plain(net) => &net.architecture,
            Network::ResidualEncoder(net) => &net.architecture,
        }
    }

    /// Logits per deep-supervision output, highest resolution first (one entry without deep
    /// supervision). Input `(batch, channels, [z,] y, x)`.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        match self {
            Network::Plain(net) => net.forward(x),
            Network::ResidualEncoder(net) => net.forward(x),
        }
    }

    /// Whether to return every deep-supervision head (training) or just the full-resolution one
    /// (validation and inference), as nnU-Net's `set_deep_supervision_enabled`.
    pub fn set_deep_supervision(&mut self, enabled: bool) {
        match self {
            Network::Plain(net) => net.set_deep_supervision(enabled),
            Network::ResidualEncoder(net) => net.set_deep_supervision(enabled),
        }
    }
}
