//! nnU-Net's network as a plan describes it ([`architecture`], plain data) and its state-dict
//! names ([`state_dict`]). The libtorch networks built from it (PlainConvUNet, ResidualEncoderUNet)
//! live in the `nnflow-torch` worker (`src/bin/nnflow-torch/`), so the engine binary never links
//! libtorch. [`pth`] reads the weights of a network nnU-Net trained from its `.pth` checkpoint,
//! [`pth_writer`] writes such checkpoints (export to nnU-Net), and [`safetensors`] reads nnflow's
//! own weights files, all without torch.

pub mod architecture;
pub mod pth;
pub mod pth_writer;
pub mod safetensors;
pub mod state_dict;

pub use architecture::Architecture;
pub use pth::{read_checkpoint, NamedWeights, NnunetCheckpoint, PthError};
