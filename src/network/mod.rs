//! nnU-Net's network as a plan describes it ([`architecture`], plain data) and its state-dict
//! names ([`state_dict`]). The libtorch PlainConvUNet built from it lives in the `nnflow-torch`
//! worker (`src/bin/nnflow-torch/unet.rs`), so the engine binary never links libtorch.

pub mod architecture;
pub mod state_dict;

pub use architecture::Architecture;
