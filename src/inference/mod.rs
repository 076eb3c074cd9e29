//! Inference: turning a trained network's per-patch predictions into whole-image logits.

pub mod cases;
pub mod export;
pub mod job;
pub mod sliding_window;
pub mod writer;
