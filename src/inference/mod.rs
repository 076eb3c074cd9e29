//! Inference: turning a trained network's per-patch predictions into whole-image logits.

pub mod sliding_window;
