//! Reading and writing single-file NIfTI-1 and NIfTI-2 images (`.nii`, `.nii.gz`).
//!
//! This module owns the on-disk format: the 348-byte NIfTI-1 and 540-byte NIfTI-2 headers (either
//! endianness), the 4-byte extension flag, `vox_offset`, the voxel data types, scl_slope/scl_inter
//! scaling and gzip (including multi-member gzip, which many tools produce and the `nifti` crate
//! rejects). Geometry math lives in [`crate::data::geometry`].
//!
//! Voxel data is returned as a C-order `Array3` indexed `[z, y, x]`, the axis order nnU-Net gets
//! from SimpleITK. NIfTI stores x fastest, so the file's data block *is* a C-order `[z, y, x]`
//! array: no transposition is needed in either direction. A 4D image (`dim[0] == 4`) stores its
//! `dim[4]` volumes one after the other; [`read_channels`] returns them as channels, as nnU-Net's
//! SimpleITK reader does, while [`read`] expects a single volume.
//!
//! NIfTI-2 keeps its sizes in i64 and its geometry in f64: [`Header`] holds the f64 values next to
//! the f32 ones (see [`Header::nifti2`]), so geometry is as exact as the file's, and [`write`]
//! writes NIfTI-2 for a header read from NIfTI-2. Image sizes above 32767 voxels per axis, which
//! only NIfTI-2 can declare, are refused.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use ndarray::Array3;

pub use crate::data::geometry::Header;
use crate::data::geometry::Nifti2Geometry;

const HEADER_SIZE: usize = 348;
/// Header + the 4-byte extension flag; where we put the data when writing.
const WRITE_VOX_OFFSET: usize = HEADER_SIZE + 4;
const NIFTI2_HEADER_SIZE: usize = 540;
const NIFTI2_WRITE_VOX_OFFSET: usize = NIFTI2_HEADER_SIZE + 4;
const NIFTI2_MAGIC: &[u8; 8] = b"n+2\0\r\n\x1a\n";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Deflate expands data at most 1032-fold (a 258-byte match coded in 2 bits), so a gzip file
/// cannot decompress to more than this many bytes per stored byte.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Errors from reading or writing a NIfTI file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("{}: cannot read file: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: corrupt or truncated gzip data: {source}", path.display())]
    Gzip { path: PathBuf, source: io::Error },
    #[error("{}: not a NIfTI file: only {len} bytes, a NIfTI-{version} header needs {needed}", path.display())]
    TooShort {
        path: PathBuf,
        len: usize,
        version: u8,
        needed: usize,
    },
    #[error("{}: not a NIfTI file: header size field is {value} (expected 348 for NIfTI-1, 540 for NIfTI-2)",
            path.display())]
    BadHeaderSize { path: PathBuf, value: i32 },
    #[error("{}: not a single-file NIfTI-{version} image: magic is {magic:?} (expected {expected:?})", path.display())]
    BadMagic {
        path: PathBuf,
        version: u8,
        magic: String,
        expected: &'static str,
    },
    #[error("{}: unsupported image dimensions: {detail}", path.display())]
    BadDims { path: PathBuf, detail: String },
    #[error("{}: unsupported NIfTI datatype {code} ({name}); supported: uint8, int8, uint16, int16, \
             uint32, int32, float32, float64", path.display())]
    UnsupportedDatatype {
        path: PathBuf,
        code: i16,
        name: &'static str,
    },
    #[error("{}: invalid vox_offset {value} in header", path.display())]
    BadVoxOffset { path: PathBuf, value: f64 },
    #[error("{}: truncated: header says {dims} {dtype} ({expected} bytes) but only {available} bytes of data",
            path.display())]
    Truncated {
        path: PathBuf,
        dims: String,
        dtype: &'static str,
        expected: usize,
        available: usize,
    },
    #[error("{}: truncated: header says {dims} {dtype} ({expected} bytes) but {stored} bytes of gzip data \
             decompress to at most {most} bytes of data", path.display())]
    GzipTooSmall {
        path: PathBuf,
        dims: String,
        dtype: &'static str,
        expected: usize,
        stored: u64,
        most: u64,
    },
    #[error("{}: label map has non-integer value {value} at voxel (z, y, x) = {zyx:?}", path.display())]
    NotInteger {
        path: PathBuf,
        zyx: [usize; 3],
        value: f64,
    },
    #[error("{}: cannot write: data shape (z, y, x) {data:?} does not match the reference header's {header:?}",
            path.display())]
    ShapeMismatch {
        path: PathBuf,
        data: [usize; 3],
        header: [usize; 3],
    },
    #[error("{}: cannot write file: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// A 3D image: voxels in `[z, y, x]` order (scaling applied) plus the header geometry.
#[derive(Debug, Clone)]
pub struct Volume {
    pub data: Array3<f32>,
    pub header: Header,
}

impl Volume {
    /// Voxel spacing in (z, y, x) order, matching `data`'s axes (SimpleITK's order reversed,
    /// as nnU-Net stores it).
    pub fn spacing_zyx(&self) -> [f64; 3] {
        self.header.spacing_zyx()
    }
}

/// Reads a `.nii` / `.nii.gz` image holding one 3D (or 2D) volume as f32, applying scl_slope /
/// scl_inter. A 4D image of several volumes is an error: read it with [`read_channels`].
pub fn read(path: impl AsRef<Path>) -> Result<Volume, NiftiError> {
    let path = path.as_ref();
    let (parsed, raw) = read_image(path, false)?;
    let data = decode_f32(path, &parsed, &raw)?;
    Ok(Volume {
        data,
        header: parsed.header,
    })
}

/// Reads every volume of an image as channels `[z, y, x]`: one for a 3D image, `dim[4]` for a 4D
/// image (stored x fastest, then y, z, t), as nnU-Net's SimpleITK reader stacks a 4D image's
/// volumes as channels. The header of a 4D image of several volumes comes back as the header of
/// one of its volumes (`dim[0]` 3, `dim[4]` 1, geometry untouched), what a 3D file holding one
/// channel (or a prediction for the image) is written with.
pub fn read_channels(path: impl AsRef<Path>) -> Result<(Vec<Array3<f32>>, Header), NiftiError> {
    let path = path.as_ref();
    let (parsed, raw) = read_image(path, true)?;
    let channels = raw
        .chunks_exact(parsed.volume_bytes())
        .map(|volume| decode_f32(path, &parsed, volume))
        .collect::<Result<Vec<_>, _>>()?;
    let header = if parsed.volumes > 1 {
        single_volume(&parsed.header)
    } else {
        parsed.header
    };
    Ok((channels, header))
}

/// Reads a segmentation: like [`read`], but values must be integers that fit in i32 (after
/// scaling). Decoded straight from the stored type, so large labels do not lose f32 precision.
pub fn read_integer_labels(path: impl AsRef<Path>) -> Result<(Array3<i32>, Header), NiftiError> {
    let path = path.as_ref();
    let (parsed, raw) = read_image(path, false)?;
    let mut values = Vec::with_capacity(parsed.volume_voxels());
    let mut first_bad: Option<(usize, f64)> = None;
    decode_each(&raw, &parsed, |v| {
        let ok = v.fract() == 0.0 && v >= f64::from(i32::MIN) && v <= f64::from(i32::MAX);
        if !ok && first_bad.is_none() {
            first_bad = Some((values.len(), v));
        }
        values.push(v as i32);
    });
    if let Some((index, value)) = first_bad {
        let [_, ny, nx] = parsed.header.shape_zyx();
        let zyx = [index / (ny * nx), (index / nx) % ny, index % nx];
        return Err(NiftiError::NotInteger {
            path: path.to_path_buf(),
            zyx,
            value,
        });
    }
    let data = to_array(path, &parsed.header, values)?;
    Ok((data, parsed.header))
}

/// Reads only the header (decompressing just its first bytes): cheap shape / spacing queries.
/// A 4D image's header is returned as stored (`dim[4]` volumes).
pub fn read_header(path: impl AsRef<Path>) -> Result<Header, NiftiError> {
    let path = path.as_ref();
    let (mut reader, gz, _) = open(path)?;
    let head = read_head(path, gz, &mut reader)?;
    Ok(parse_header(path, &head)?.header)
}

/// Reads the whole file (header, data, gzip checksums) without decoding the voxels: whether
/// [`read_channels`] would succeed, cheaply. Returns the header as stored.
pub fn verify(path: impl AsRef<Path>) -> Result<Header, NiftiError> {
    let (parsed, _) = read_image(path.as_ref(), true)?;
    Ok(parsed.header)
}

/// Splits an image into 3D images, one per volume (one for a 3D image), written to `target(i)` for
/// volume `i` (gzip-compressed if the name ends in `.gz`), as nnU-Net's MSD conversion splits a 4D
/// image into channel files. Lossless: each file keeps the stored datatype, scl_slope/scl_inter
/// and the header's spatial geometry bit for bit (so SimpleITK reads every channel with the 4D
/// image's first three spacings, origin entries and direction rows/columns), and the NIfTI version
/// of the source; the data is written little-endian. Returns the number of volumes.
pub fn split_volumes(path: impl AsRef<Path>, target: impl Fn(usize) -> PathBuf) -> Result<usize, NiftiError> {
    let path = path.as_ref();
    let (parsed, mut raw) = read_image(path, true)?;
    let size = parsed.dtype.size();
    if !parsed.little_endian {
        raw.chunks_exact_mut(size).for_each(<[u8]>::reverse);
    }
    let header = single_volume(&parsed.header);
    let (slope, inter) = parsed.scaling.unwrap_or((1.0, 0.0));
    for (i, volume) in raw.chunks_exact(parsed.volume_bytes()).enumerate() {
        let out = target(i);
        let mut bytes = header_bytes(&header, parsed.header.datatype, size, (slope, inter));
        bytes.extend_from_slice(volume);
        write_bytes(&out, &bytes)?;
    }
    Ok(parsed.volumes)
}

/// Element types that [`write`] can store.
pub trait NiftiElement: Copy {
    /// NIfTI datatype code.
    const DATATYPE: i16;
    fn put_le(self, out: &mut Vec<u8>);
}

macro_rules! nifti_element {
    ($t:ty, $code:expr) => {
        impl NiftiElement for $t {
            const DATATYPE: i16 = $code;
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
nifti_element!(u8, 2);
nifti_element!(i16, 4);
nifti_element!(i32, 8);
nifti_element!(f32, 16);

/// Writes `data` (`[z, y, x]`) as NIfTI-1, gzip-compressed if the path ends in `.gz`.
///
/// The geometry (dim, pixdim, xyzt_units, qform/sform and codes) is copied bit-for-bit from
/// `like`, so readers (nibabel, ITK) report exactly the same affine as for the source image;
/// datatype/bitpix come from `T` and scaling is reset to slope 1, intercept 0. The file is written
/// under a temporary name and renamed, so a crash never leaves a half-written image behind.
pub fn write<T: NiftiElement>(
    path: impl AsRef<Path>,
    data: &Array3<T>,
    like: &Header,
) -> Result<(), NiftiError> {
    let path = path.as_ref();
    let shape = [data.shape()[0], data.shape()[1], data.shape()[2]];
    if shape != like.shape_zyx() {
        return Err(NiftiError::ShapeMismatch {
            path: path.into(),
            data: shape,
            header: like.shape_zyx(),
        });
    }
    let mut bytes = header_bytes(like, T::DATATYPE, std::mem::size_of::<T>(), (1.0, 0.0));
    bytes.reserve(data.len() * std::mem::size_of::<T>());
    // `iter()` walks in logical C order ([z][y][x], x fastest) whatever the memory layout.
    data.iter().for_each(|v| v.put_le(&mut bytes));
    write_bytes(path, &bytes)
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), NiftiError> {
    let gz = path.extension().is_some_and(|e| e == "gz");
    write_atomically(path, bytes, gz).map_err(|source| NiftiError::Write {
        path: path.into(),
        source,
    })
}

/// The header of one volume of `header`'s image: a 4D image's with `dim[0]` 3 and `dim[4..]` 1.
fn single_volume(header: &Header) -> Header {
    let mut header = header.clone();
    if header.volumes() > 1 {
        header.dim[0] = 3;
        header.dim[4..].fill(1);
    }
    header
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Everything from the header needed to decode the data block.
struct Parsed {
    header: Header,
    dtype: DataType,
    little_endian: bool,
    /// The header's size: 348 (NIfTI-1) or 540 (NIfTI-2).
    header_size: usize,
    vox_offset: usize,
    /// (slope, intercept) when scaling must be applied.
    scaling: Option<(f64, f64)>,
    /// 3D volumes in the file: `dim[4]` of a 4D image, else 1.
    volumes: usize,
}

impl Parsed {
    /// Voxels in one 3D volume.
    fn volume_voxels(&self) -> usize {
        self.header.shape_xyz().iter().product()
    }

    /// Bytes of one 3D volume (the data size was checked for overflow before data is read).
    fn volume_bytes(&self) -> usize {
        self.volume_voxels() * self.dtype.size()
    }

    fn dims_text(&self) -> String {
        let [nx, ny, nz] = self.header.shape_xyz();
        match self.volumes {
            1 => format!("{nx}x{ny}x{nz}"),
            t => format!("{nx}x{ny}x{nz}x{t}"),
        }
    }
}

/// An open image: the (decompressing) reader, whether the file is gzip, and its size.
type Opened = (Box<dyn Read>, bool, Option<u64>);

/// Opens the file, transparently decompressing gzip (detected by magic bytes, not by extension,
/// because mislabelled files are common). Returns the reader, whether it is gzip and the file's
/// size (None for what is not a regular file, e.g. a pipe).
fn open(path: &Path) -> Result<Opened, NiftiError> {
    let io_error = |source| NiftiError::Io {
        path: path.into(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    let stored = metadata.is_file().then_some(metadata.len());
    let mut buffered = BufReader::new(file);
    let head = buffered.fill_buf().map_err(|source| NiftiError::Io {
        path: path.into(),
        source,
    })?;
    if head.starts_with(&GZIP_MAGIC) {
        // MultiGzDecoder: concatenated gzip members form one stream (valid gzip, rejected by
        // single-member decoders).
        Ok((Box::new(MultiGzDecoder::new(buffered)), true, stored))
    } else {
        Ok((Box::new(buffered), false, stored))
    }
}

fn read_error(path: &Path, gz: bool, source: io::Error) -> NiftiError {
    let path = path.to_path_buf();
    if gz {
        NiftiError::Gzip { path, source }
    } else {
        NiftiError::Io { path, source }
    }
}

/// The header's bytes: 348, or 540 when the size field says NIfTI-2 (fewer if the file ends).
fn read_head(path: &Path, gz: bool, reader: &mut dyn Read) -> Result<Vec<u8>, NiftiError> {
    let mut head = Vec::with_capacity(NIFTI2_HEADER_SIZE);
    let mut read = |head: &mut Vec<u8>, n: usize| {
        reader
            .take(n as u64)
            .read_to_end(head)
            .map_err(|source| read_error(path, gz, source))
    };
    read(&mut head, HEADER_SIZE)?;
    if head.len() == HEADER_SIZE && matches!(header_version(&head), Some((2, _))) {
        read(&mut head, NIFTI2_HEADER_SIZE - HEADER_SIZE)?;
    }
    Ok(head)
}

/// The NIfTI version (1 or 2) and byte order (little-endian?) the size field says.
fn header_version(head: &[u8]) -> Option<(u8, bool)> {
    let raw: [u8; 4] = head.get(..4)?.try_into().ok()?;
    let (le, be) = (i32::from_le_bytes(raw), i32::from_be_bytes(raw));
    match (le, be) {
        (348, _) => Some((1, true)),
        (_, 348) => Some((1, false)),
        (540, _) => Some((2, true)),
        (_, 540) => Some((2, false)),
        _ => None,
    }
}

/// The header and the data block. The header is read first, and the data size it declares is
/// checked against what the file can hold (its size; for gzip, the most its size can decompress
/// to) before any data is read: a header declaring huge dimensions is refused without allocating
/// for them, and a gzip bomb is not inflated beyond the declared size. Unless `all_volumes`, a 4D
/// image of several volumes is refused.
fn read_image(path: &Path, all_volumes: bool) -> Result<(Parsed, Vec<u8>), NiftiError> {
    let (mut reader, gz, stored) = open(path)?;
    let parsed = read_head(path, gz, &mut reader).and_then(|head| parse_header(path, &head));
    let parsed = match parsed {
        Ok(parsed) => parsed,
        // In a damaged gzip stream, the damage is the news, not what the header decoded to.
        Err(error) if gz => return Err(check_rest(path, gz, &mut reader).err().unwrap_or(error)),
        Err(error) => return Err(error),
    };
    if parsed.volumes > 1 && !all_volumes {
        return Err(NiftiError::BadDims {
            path: path.into(),
            detail: format!(
                "a 4D image of {} volumes ({}), where one 3D volume is expected (a 4D image's \
                 volumes are channels: split it into one file per channel)",
                parsed.volumes,
                parsed.dims_text()
            ),
        });
    }
    let expected = data_size(path, &parsed)?;
    let truncated = |available: usize| NiftiError::Truncated {
        path: path.into(),
        dims: parsed.dims_text(),
        dtype: parsed.dtype.name(),
        expected,
        available,
    };
    let offset = parsed.vox_offset as u64;
    match stored {
        Some(stored) if gz => {
            let most = stored.saturating_mul(MAX_DEFLATE_RATIO).saturating_sub(offset);
            if (expected as u64) > most {
                return Err(NiftiError::GzipTooSmall {
                    path: path.into(),
                    dims: parsed.dims_text(),
                    dtype: parsed.dtype.name(),
                    expected,
                    stored,
                    most,
                });
            }
        }
        Some(stored) if (expected as u64) > stored.saturating_sub(offset) => {
            return Err(truncated(stored.saturating_sub(offset) as usize));
        }
        _ => {}
    }
    // Skip the extensions between the header and the data.
    io::copy(
        &mut reader.by_ref().take(offset - parsed.header_size as u64),
        &mut io::sink(),
    )
    .map_err(|source| read_error(path, gz, source))?;
    // A gzip file's size bounds its data only loosely (and a pipe's not at all): let the buffer
    // grow with what arrives.
    let reserve = match stored {
        Some(_) if !gz => expected,
        Some(stored) => expected.min(stored.saturating_mul(8) as usize),
        None => expected.min(1 << 24),
    };
    let mut data = Vec::with_capacity(reserve);
    reader
        .by_ref()
        .take(expected as u64)
        .read_to_end(&mut data)
        .map_err(|source| read_error(path, gz, source))?;
    if data.len() < expected {
        // Data ends early; a damaged gzip stream says why.
        return Err(check_rest(path, gz, &mut reader)
            .err()
            .unwrap_or_else(|| truncated(data.len())));
    }
    check_rest(path, gz, &mut reader)?;
    Ok((parsed, data))
}

/// Reads a gzip stream to its end, so its checksums and any damage past the data are noticed.
fn check_rest(path: &Path, gz: bool, reader: &mut dyn Read) -> Result<(), NiftiError> {
    if gz {
        io::copy(reader, &mut io::sink()).map_err(|source| read_error(path, gz, source))?;
    }
    Ok(())
}

/// Fixed-offset field access in either byte order.
struct Fields<'a> {
    bytes: &'a [u8],
    little_endian: bool,
}

impl Fields<'_> {
    fn array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0; N];
        out.copy_from_slice(&self.bytes[offset..offset + N]);
        out
    }
    fn i16(&self, offset: usize) -> i16 {
        let b = self.array(offset);
        if self.little_endian {
            i16::from_le_bytes(b)
        } else {
            i16::from_be_bytes(b)
        }
    }
    fn f32(&self, offset: usize) -> f32 {
        let b = self.array(offset);
        if self.little_endian {
            f32::from_le_bytes(b)
        } else {
            f32::from_be_bytes(b)
        }
    }
    fn f32s<const N: usize>(&self, offset: usize) -> [f32; N] {
        std::array::from_fn(|i| self.f32(offset + 4 * i))
    }
    fn i32(&self, offset: usize) -> i32 {
        let b = self.array(offset);
        if self.little_endian {
            i32::from_le_bytes(b)
        } else {
            i32::from_be_bytes(b)
        }
    }
    fn i64(&self, offset: usize) -> i64 {
        let b = self.array(offset);
        if self.little_endian {
            i64::from_le_bytes(b)
        } else {
            i64::from_be_bytes(b)
        }
    }
    fn f64(&self, offset: usize) -> f64 {
        let b = self.array(offset);
        if self.little_endian {
            f64::from_le_bytes(b)
        } else {
            f64::from_be_bytes(b)
        }
    }
    fn f64s<const N: usize>(&self, offset: usize) -> [f64; N] {
        std::array::from_fn(|i| self.f64(offset + 8 * i))
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Parsed, NiftiError> {
    let too_short = |version, needed| NiftiError::TooShort {
        path: path.into(),
        len: bytes.len(),
        version,
        needed,
    };
    if bytes.len() < HEADER_SIZE {
        return Err(too_short(1, HEADER_SIZE));
    }
    match header_version(bytes) {
        Some((1, little_endian)) => parse_nifti1(path, bytes, little_endian),
        Some((_, little_endian)) if bytes.len() >= NIFTI2_HEADER_SIZE => {
            parse_nifti2(path, bytes, little_endian)
        }
        Some(_) => Err(too_short(2, NIFTI2_HEADER_SIZE)),
        None => Err(NiftiError::BadHeaderSize {
            path: path.into(),
            value: i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        }),
    }
}

fn parse_nifti1(path: &Path, bytes: &[u8], little_endian: bool) -> Result<Parsed, NiftiError> {
    check_magic(path, 1, &bytes[344..348], b"n+1\0")?;
    let f = Fields { bytes, little_endian };
    let header = Header {
        dim: std::array::from_fn(|i| f.i16(40 + 2 * i)),
        pixdim: f.f32s(76),
        xyzt_units: bytes[123],
        qform_code: f.i16(252),
        sform_code: f.i16(254),
        quatern: f.f32s(256),
        qoffset: f.f32s(268),
        srow: [f.f32s(280), f.f32s(296), f.f32s(312)],
        datatype: f.i16(70),
        nifti2: None,
    };
    let vox_offset = f64::from(f.f32(108));
    let scaling = scaling(f64::from(f.f32(112)), f64::from(f.f32(116)));
    finish_parse(path, header, little_endian, HEADER_SIZE, vox_offset, scaling)
}

/// NIfTI-2: the same fields as NIfTI-1 in other places, sizes in i64 and the rest in f64.
fn parse_nifti2(path: &Path, bytes: &[u8], little_endian: bool) -> Result<Parsed, NiftiError> {
    check_magic(path, 2, &bytes[4..12], NIFTI2_MAGIC)?;
    let f = Fields { bytes, little_endian };
    let wide_dim: [i64; 8] = std::array::from_fn(|i| f.i64(16 + 8 * i));
    let saturate = |v: i64| i16::try_from(v).unwrap_or(if v < 0 { i16::MIN } else { i16::MAX });
    let dim = wide_dim.map(saturate);
    let ndim = dim[0].clamp(0, 7) as usize;
    if let Some(axis) = (1..=ndim).find(|&a| i64::from(dim[a]) != wide_dim[a]) {
        return Err(NiftiError::BadDims {
            path: path.into(),
            detail: format!(
                "dim[{axis}] = {}: sizes above {} are not supported",
                wide_dim[axis],
                i16::MAX
            ),
        });
    }
    let precise = Nifti2Geometry {
        pixdim: f.f64s(104),
        quatern: f.f64s(352),
        qoffset: f.f64s(376),
        srow: [f.f64s(400), f.f64s(432), f.f64s(464)],
    };
    let narrow = |v: f64| v as f32;
    let code = |v: i32| i16::try_from(v).unwrap_or(if v < 0 { i16::MIN } else { i16::MAX });
    let header = Header {
        dim,
        pixdim: precise.pixdim.map(narrow),
        xyzt_units: u8::try_from(f.i32(500)).unwrap_or(0),
        qform_code: code(f.i32(344)),
        sform_code: code(f.i32(348)),
        quatern: precise.quatern.map(narrow),
        qoffset: precise.qoffset.map(narrow),
        srow: precise.srow.map(|row| row.map(narrow)),
        datatype: f.i16(12),
        nifti2: Some(precise),
    };
    let vox_offset = f.i64(168) as f64;
    let scaling = scaling(f.f64(176), f.f64(184));
    finish_parse(
        path,
        header,
        little_endian,
        NIFTI2_HEADER_SIZE,
        vox_offset,
        scaling,
    )
}

fn finish_parse(
    path: &Path,
    header: Header,
    little_endian: bool,
    header_size: usize,
    vox_offset: f64,
    scaling: Option<(f64, f64)>,
) -> Result<Parsed, NiftiError> {
    let volumes = check_dims(path, &header.dim)?;
    let dtype = DataType::from_code(header.datatype).ok_or_else(|| NiftiError::UnsupportedDatatype {
        path: path.into(),
        code: header.datatype,
        name: datatype_name(header.datatype),
    })?;
    // vox_offset must be a whole number of bytes past the header.
    if !(vox_offset >= header_size as f64 && vox_offset <= u32::MAX as f64 && vox_offset.fract() == 0.0) {
        return Err(NiftiError::BadVoxOffset {
            path: path.into(),
            value: vox_offset,
        });
    }
    Ok(Parsed {
        header,
        dtype,
        little_endian,
        header_size,
        vox_offset: vox_offset as usize,
        scaling,
        volumes,
    })
}

fn check_magic(path: &Path, version: u8, magic: &[u8], expected: &'static [u8]) -> Result<(), NiftiError> {
    if magic == expected {
        return Ok(());
    }
    let shown = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.split('\0').next().unwrap_or_default().to_string()
    };
    Err(NiftiError::BadMagic {
        path: path.into(),
        version,
        magic: shown(magic),
        expected: if version == 1 { "n+1" } else { "n+2" },
    })
}

/// Accepts 2D, 3D and 4D images, and higher-dimensional ones whose dimensions past the fourth are
/// all 1. Returns the number of 3D volumes (`dim[4]` of a 4D image, else 1).
fn check_dims(path: &Path, dim: &[i16; 8]) -> Result<usize, NiftiError> {
    let bad = |detail: String| {
        Err(NiftiError::BadDims {
            path: path.into(),
            detail,
        })
    };
    let ndim = dim[0];
    if !(1..=7).contains(&ndim) {
        return bad(format!("dim[0] = {ndim} (must be 1..7)"));
    }
    let ndim = ndim as usize;
    if let Some(axis) = (1..=ndim).find(|&a| dim[a] < 1) {
        return bad(format!("dim[{axis}] = {} (sizes must be >= 1)", dim[axis]));
    }
    if let Some(axis) = (5..=ndim).find(|&a| dim[a] != 1) {
        return bad(format!(
            "dim[{axis}] = {}: only 2D, 3D and 4D images (extra dimensions of size 1) are supported",
            dim[axis]
        ));
    }
    Ok((4..=ndim).map(|axis| dim[axis] as usize).product())
}

/// Scaling applies when slope is finite, non-zero and not the identity (1, 0), as in nibabel.
fn scaling(slope: f64, inter: f64) -> Option<(f64, f64)> {
    let inter = if inter.is_finite() { inter } else { 0.0 };
    let identity = slope == 1.0 && inter == 0.0;
    (slope.is_finite() && slope != 0.0 && !identity).then_some((slope, inter))
}

/// The size in bytes of the data block the header declares.
fn data_size(path: &Path, parsed: &Parsed) -> Result<usize, NiftiError> {
    let [nx, ny, nz] = parsed.header.shape_xyz();
    nx.checked_mul(ny)
        .and_then(|n| n.checked_mul(nz))
        .and_then(|n| n.checked_mul(parsed.volumes))
        .and_then(|n| n.checked_mul(parsed.dtype.size()))
        .ok_or_else(|| NiftiError::BadDims {
            path: path.into(),
            detail: format!("{} voxels overflow the address space", parsed.dims_text()),
        })
}

/// Calls `sink` with every voxel value in file order (x fastest), scaled, as f64 (which holds
/// every supported stored type exactly).
fn decode_each(raw: &[u8], parsed: &Parsed, sink: impl FnMut(f64)) {
    match parsed.scaling {
        Some((slope, inter)) => {
            let mut sink = sink;
            decode_raw(raw, parsed.dtype, parsed.little_endian, |v| {
                sink(v * slope + inter)
            })
        }
        None => decode_raw(raw, parsed.dtype, parsed.little_endian, sink),
    }
}

fn decode_raw(raw: &[u8], dtype: DataType, little_endian: bool, mut sink: impl FnMut(f64)) {
    macro_rules! each {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            for chunk in raw.chunks_exact(N) {
                let mut b = [0u8; N];
                b.copy_from_slice(chunk);
                let v = if little_endian {
                    <$t>::from_le_bytes(b)
                } else {
                    <$t>::from_be_bytes(b)
                };
                sink(v as f64);
            }
        }};
    }
    match dtype {
        DataType::U8 => each!(u8),
        DataType::I8 => each!(i8),
        DataType::U16 => each!(u16),
        DataType::I16 => each!(i16),
        DataType::U32 => each!(u32),
        DataType::I32 => each!(i32),
        DataType::F32 => each!(f32),
        DataType::F64 => each!(f64),
    }
}

/// One volume's voxels as f32 `[z, y, x]`, scaled.
fn decode_f32(path: &Path, parsed: &Parsed, raw: &[u8]) -> Result<Array3<f32>, NiftiError> {
    let mut values = Vec::with_capacity(raw.len() / parsed.dtype.size());
    match (parsed.scaling, parsed.dtype) {
        // Fast paths (no f64 round trip) where the f32 value is the same.
        (None, DataType::F32) if parsed.little_endian => values.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        (None, DataType::I16) if parsed.little_endian => values.extend(
            raw.chunks_exact(2)
                .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]]))),
        ),
        (None, DataType::U8) => values.extend(raw.iter().map(|&v| f32::from(v))),
        _ => decode_each(raw, parsed, |v| values.push(v as f32)),
    }
    to_array(path, &parsed.header, values)
}

fn to_array<T>(path: &Path, header: &Header, values: Vec<T>) -> Result<Array3<T>, NiftiError> {
    let [nz, ny, nx] = header.shape_zyx();
    Array3::from_shape_vec((nz, ny, nx), values).map_err(|e| NiftiError::BadDims {
        path: path.into(),
        detail: e.to_string(),
    })
}

/// The stored voxel types we decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
}

impl DataType {
    fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            256 => Self::I8,
            512 => Self::U16,
            4 => Self::I16,
            768 => Self::U32,
            8 => Self::I32,
            16 => Self::F32,
            64 => Self::F64,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::I8 => "int8",
            Self::U16 => "uint16",
            Self::I16 => "int16",
            Self::U32 => "uint32",
            Self::I32 => "int32",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
}

/// Names for every code in the NIfTI-1 standard, so errors about unsupported ones are readable.
fn datatype_name(code: i16) -> &'static str {
    if let Some(dt) = DataType::from_code(code) {
        return dt.name();
    }
    match code {
        0 => "unknown",
        1 => "binary",
        32 => "complex64",
        128 => "rgb24",
        1024 => "int64",
        1280 => "uint64",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "rgba32",
        _ => "not a NIfTI datatype",
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// A little-endian header (+ empty extension flag) copying `like`'s geometry: NIfTI-2 if `like`
/// was read from NIfTI-2, else NIfTI-1. A header declaring several volumes is written as the
/// header of one (the data written is one volume).
fn header_bytes(like: &Header, datatype: i16, elem_size: usize, (slope, inter): (f64, f64)) -> Vec<u8> {
    let like = &single_volume(like);
    let bitpix = 8 * elem_size as i16;
    if like.nifti2.is_some() {
        return nifti2_header_bytes(like, datatype, bitpix, (slope, inter));
    }
    let mut b = vec![0u8; WRITE_VOX_OFFSET];
    put(&mut b, 0, &(HEADER_SIZE as i32).to_le_bytes());
    for (i, d) in like.dim.iter().enumerate() {
        put(&mut b, 40 + 2 * i, &d.to_le_bytes());
    }
    put(&mut b, 70, &datatype.to_le_bytes());
    put(&mut b, 72, &bitpix.to_le_bytes());
    put_f32s(&mut b, 76, &like.pixdim);
    // vox_offset, scl_slope, scl_inter
    put_f32s(
        &mut b,
        108,
        &[WRITE_VOX_OFFSET as f32, slope as f32, inter as f32],
    );
    b[123] = like.xyzt_units;
    put(&mut b, 148, b"nnflow");
    put(&mut b, 252, &like.qform_code.to_le_bytes());
    put(&mut b, 254, &like.sform_code.to_le_bytes());
    put_f32s(&mut b, 256, &like.quatern);
    put_f32s(&mut b, 268, &like.qoffset);
    for (r, row) in like.srow.iter().enumerate() {
        put_f32s(&mut b, 280 + 16 * r, row);
    }
    put(&mut b, 344, b"n+1\0");
    b
}

/// The NIfTI-2 layout of [`header_bytes`]: i64 sizes, f64 geometry (the file's own values where
/// `like` holds them, see [`Header::pixdim_f64`]), i32 codes.
fn nifti2_header_bytes(like: &Header, datatype: i16, bitpix: i16, (slope, inter): (f64, f64)) -> Vec<u8> {
    let mut b = vec![0u8; NIFTI2_WRITE_VOX_OFFSET];
    put(&mut b, 0, &(NIFTI2_HEADER_SIZE as i32).to_le_bytes());
    put(&mut b, 4, NIFTI2_MAGIC);
    put(&mut b, 12, &datatype.to_le_bytes());
    put(&mut b, 14, &bitpix.to_le_bytes());
    for (i, d) in like.dim.iter().enumerate() {
        put(&mut b, 16 + 8 * i, &i64::from(*d).to_le_bytes());
    }
    put_f64s(&mut b, 104, &like.pixdim_f64());
    put(&mut b, 168, &(NIFTI2_WRITE_VOX_OFFSET as i64).to_le_bytes());
    put_f64s(&mut b, 176, &[slope, inter]);
    put(&mut b, 240, b"nnflow");
    put(&mut b, 344, &i32::from(like.qform_code).to_le_bytes());
    put(&mut b, 348, &i32::from(like.sform_code).to_le_bytes());
    put_f64s(&mut b, 352, &like.quatern_f64());
    put_f64s(&mut b, 376, &like.qoffset_f64());
    for (r, row) in like.srow_f64().iter().enumerate() {
        put_f64s(&mut b, 400 + 32 * r, row);
    }
    put(&mut b, 500, &i32::from(like.xyzt_units).to_le_bytes());
    b
}

fn put_f64s(buf: &mut [u8], offset: usize, values: &[f64]) {
    for (i, v) in values.iter().enumerate() {
        put(buf, offset + 8 * i, &v.to_le_bytes());
    }
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn put_f32s(buf: &mut [u8], offset: usize, values: &[f32]) {
    for (i, v) in values.iter().enumerate() {
        put(buf, offset + 4 * i, &v.to_le_bytes());
    }
}

fn write_atomically(path: &Path, bytes: &[u8], gz: bool) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = write_file(&tmp, bytes, gz).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the original error is what matters
    }
    result
}

fn write_file(path: &Path, bytes: &[u8], gz: bool) -> io::Result<()> {
    let file = BufWriter::new(File::create(path)?);
    if gz {
        let mut encoder = GzEncoder::new(file, flate2::Compression::default());
        encoder.write_all(bytes)?;
        encoder
            .finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
    } else {
        let mut file = file;
        file.write_all(bytes)?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()
    }
}
