//! Images in every format nnU-Net reads (and DICOM series, which it does not), behind one API.
//!
//! The format is chosen the way nnU-Net chooses its reader: from the file ending (dataset.json's
//! `file_ending` for datasets, the file's own for prediction inputs); a folder is a DICOM series.
//! Every reader returns voxels as C-order `[z, y, x]` arrays, the axis order nnU-Net gets from its
//! readers, and a [`Geometry`] that keeps both what nnU-Net plans with (its spacing) and what it
//! writes predictions with (ITK's spacing, origin and direction, or the NIfTI header itself).

mod dicom;
mod geometry;
mod metaimage;
mod natural2d;
mod nifti_format;
mod nrrd;
mod raw_data;
mod tiff3d;

use std::path::{Path, PathBuf};

use ndarray::Array3;

pub use geometry::Geometry;

use crate::data::nifti::NiftiError;

/// The image formats, each named after the nnU-Net reader that reads it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// NIfTI-1 / NIfTI-2, `.nii` and `.nii.gz` (SimpleITKIO / NibabelIO).
    Nifti,
    /// NRRD, `.nrrd` and detached `.nhdr` (SimpleITKIO).
    Nrrd,
    /// MetaImage, `.mha` and `.mhd` (SimpleITKIO).
    MetaImage,
    /// `.tif`: one page is a 2D picture (NaturalImage2DIO), several pages a 3D TIFF (Tiff3DIO).
    Tif,
    /// 2D `.png` and `.bmp` (NaturalImage2DIO).
    Natural2d,
    /// 3D `.tiff` (Tiff3DIO): spacing from a `.json` next to the file.
    Tiff3d,
    /// A folder holding one DICOM series (beyond nnU-Net).
    DicomSeries,
}

/// The file endings nnflow reads, for messages and folder listings.
pub const FILE_ENDINGS: [&str; 10] = [
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".bmp", ".tif", ".tiff",
];

impl ImageFormat {
    /// The format for a file ending such as dataset.json's `file_ending` (case-insensitive, as
    /// nnU-Net compares them).
    pub fn from_ending(ending: &str) -> Option<ImageFormat> {
        let format = match ending.to_ascii_lowercase().as_str() {
            ".nii.gz" | ".nii" => ImageFormat::Nifti,
            ".nrrd" | ".nhdr" => ImageFormat::Nrrd,
            ".mha" | ".mhd" => ImageFormat::MetaImage,
            ".png" | ".bmp" => ImageFormat::Natural2d,
            ".tif" => ImageFormat::Tif,
            ".tiff" => ImageFormat::Tiff3d,
            _ => return None,
        };
        Some(format)
    }

    /// The format of a path: a folder is a DICOM series, a file goes by its ending.
    pub fn of_path(path: &Path) -> Option<ImageFormat> {
        if path.is_dir() {
            return Some(ImageFormat::DicomSeries);
        }
        ending_of(path).and_then(ImageFormat::from_ending)
    }
}

/// The ending of `path` that names its format (`.nii.gz` counts as one), if it has a known one.
pub fn ending_of(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    FILE_ENDINGS.into_iter().find(|ending| name.ends_with(ending))
}

/// Whether one file of this ending may hold several channels of a case: RGB(A) pictures, which
/// nnU-Net's NaturalImage2DIO splits into channels.
pub fn several_channels_per_file(ending: &str) -> bool {
    matches!(
        ImageFormat::from_ending(ending),
        Some(ImageFormat::Natural2d | ImageFormat::Tif)
    )
}

/// Whether a file is read as an image channel or as a segmentation. Only 3D TIFF cares: an image
/// `case_0000.tif` takes its spacing from `case.json`, a segmentation `case.tif` from `case.json`
/// too (nnU-Net strips the channel suffix for images only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Image,
    Label,
}

/// What a reader gives: the file's channels, each `[z, y, x]` and of one shape (one for most
/// files; 3 or 4 for RGB(A) pictures; one per volume of a 4D NIfTI), and its geometry.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub channels: Vec<Array3<f32>>,
    pub geometry: Geometry,
}

/// Errors from reading or writing an image. Every variant names the file (or series folder).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Nifti(#[from] NiftiError),
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// Malformed or unsupported content; `detail` says what and, where it helps, what is supported.
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error("{}: not an image nnflow reads: use a folder of DICOM files or one of the endings {}",
            path.display(), FILE_ENDINGS.join(", "))]
    UnknownFormat { path: PathBuf },
    #[error("{}: label map has non-integer value {value} at voxel (z, y, x) = {zyx:?}", path.display())]
    NotInteger {
        path: PathBuf,
        zyx: [usize; 3],
        value: f32,
    },
    #[error("{}: a segmentation must have one channel, this file has {channels}", path.display())]
    LabelChannels { path: PathBuf, channels: usize },
    #[error("{}: cannot write {format}: {detail}", path.display())]
    CannotWrite {
        path: PathBuf,
        format: &'static str,
        detail: String,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

impl ImageError {
    pub fn invalid(path: &Path, detail: impl Into<String>) -> ImageError {
        ImageError::Invalid {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn write(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn format_of(path: &Path) -> Result<ImageFormat, ImageError> {
    ImageFormat::of_path(path).ok_or_else(|| ImageError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// Reads an image file (or DICOM series folder): all its channels and its geometry.
pub fn read(path: impl AsRef<Path>) -> Result<Decoded, ImageError> {
    read_as(path.as_ref(), Role::Image)
}

fn read_as(path: &Path, role: Role) -> Result<Decoded, ImageError> {
    match format_of(path)? {
        ImageFormat::Nifti => nifti_format::read(path),
        ImageFormat::Nrrd => nrrd::read(path),
        ImageFormat::MetaImage => metaimage::read(path),
        ImageFormat::Natural2d => natural2d::read(path),
        // A page count decides, for images and segmentations alike. nnU-Net instead tries
        // NaturalImage2DIO and falls through to Tiff3DIO, once per dataset: it reads a 3D TIFF of 3
        // or 4 slices as an RGB(A) picture and a one-page grey + alpha TIFF as a volume.
        ImageFormat::Tif => {
            if tiff3d::page_count(path)? > 1 {
                tiff3d::read(path, role)
            } else {
                natural2d::read(path)
            }
        }
        ImageFormat::Tiff3d => tiff3d::read(path, role),
        ImageFormat::DicomSeries => dicom::read_series(path),
    }
}

/// Reads a segmentation: one channel whose values are integers (nnU-Net reads segmentations as
/// float32 too, so every format's label values up to 2^24 are exact).
pub fn read_labels(path: impl AsRef<Path>) -> Result<(Array3<i32>, Geometry), ImageError> {
    let path = path.as_ref();
    if format_of(path)? == ImageFormat::Nifti {
        // NIfTI decodes straight from the stored type: large label values stay exact.
        let (labels, header) = crate::data::nifti::read_integer_labels(path)?;
        return Ok((labels, Geometry::from_nifti(header)));
    }
    let Decoded { channels, geometry } = read_as(path, Role::Label)?;
    let [channel] = <[Array3<f32>; 1]>::try_from(channels).map_err(|channels| ImageError::LabelChannels {
        path: path.to_path_buf(),
        channels: channels.len(),
    })?;
    let bad = channel.indexed_iter().find(|(_, v)| {
        let v = f64::from(**v);
        v.fract() != 0.0 || v < f64::from(i32::MIN) || v > f64::from(i32::MAX)
    });
    if let Some(((z, y, x), &value)) = bad {
        return Err(ImageError::NotInteger {
            path: path.to_path_buf(),
            zyx: [z, y, x],
            value,
        });
    }
    Ok((channel.mapv(|v| v as i32), geometry))
}

/// Writes a label map `[z, y, x]` in the format of `path`'s ending with `geometry` (the geometry
/// of the image it was predicted for), atomically. uint8 when every label is below 255, as nnU-Net
/// writes it, else a 16-bit type.
pub fn write_labels(
    path: impl AsRef<Path>,
    labels: &Array3<i16>,
    geometry: &Geometry,
) -> Result<(), ImageError> {
    let path = path.as_ref();
    let format = ending_of(path)
        .and_then(ImageFormat::from_ending)
        .ok_or_else(|| ImageError::UnknownFormat {
            path: path.to_path_buf(),
        })?;
    match format {
        ImageFormat::Nifti => nifti_format::write_labels(path, labels, geometry),
        ImageFormat::Nrrd => nrrd::write_labels(path, labels, geometry),
        ImageFormat::MetaImage => metaimage::write_labels(path, labels, geometry),
        ImageFormat::Natural2d => natural2d::write_labels(path, labels, geometry),
        ImageFormat::Tif if geometry.ndim == 2 => natural2d::write_labels(path, labels, geometry),
        ImageFormat::Tif | ImageFormat::Tiff3d => tiff3d::write_labels(path, labels, geometry),
        ImageFormat::DicomSeries => unreachable!("a file ending never names a DICOM series"),
    }
}

/// The ending predictions for an input are written with: the input's own, except that a DICOM
/// series gives NIfTI (`.nii.gz`).
pub fn prediction_ending(input: &Path) -> &'static str {
    if input.is_dir() {
        ".nii.gz"
    } else {
        ending_of(input).unwrap_or(".nii.gz")
    }
}

/// An 8-bit RGB picture (`width * height * 3` bytes, rows top to bottom) as PNG bytes, fast
/// compression: what the report's overlays and the training progress figure are stored as.
pub fn rgb_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}
