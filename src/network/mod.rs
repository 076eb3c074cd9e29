//! nnU-Net's network: the architecture a plan describes ([`architecture`], plain data) and the
//! PlainConvUNet built from it with libtorch ([`unet`]; reachable only from the `nnflow-torch`
//! worker, so the engine binary never links libtorch).

pub mod architecture;
pub mod unet;

pub use architecture::Architecture;
pub use unet::PlainConvUNet;
