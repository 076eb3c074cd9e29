//! Medical image data: datasets in nnU-Net's raw layout. Knows neither the engine nor tch.

pub mod dataset;
