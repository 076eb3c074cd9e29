//! Medical image data: NIfTI files and datasets in nnU-Net's raw layout. Knows neither the engine
//! nor tch.

pub mod case_store;
pub mod chunked;
pub mod dataset;
pub mod fingerprint_format;
pub mod geometry;
pub mod image;
pub mod import;
pub mod integrity;
pub mod msd_import;
pub mod nifti;
pub mod npy;
pub mod synthetic;
pub mod target;
