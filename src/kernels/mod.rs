//! Numeric kernels that more than one numeric layer (`augment`, `evaluate`, `preprocess`, ...) builds
//! on. They sit below those layers: pure functions on arrays that know neither the layers above, the
//! engine nor tch.

pub mod connected_components;
