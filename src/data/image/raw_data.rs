//! What NRRD and MetaImage share: decoding a block of voxel values of one element type and byte
//! order (raw, gzip / zlib, or ASCII numbers) into f32, splitting interleaved components into
//! channels, the geometry ITK makes of spacing / origin / direction, and atomic writing.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::{MultiGzDecoder, ZlibDecoder};
use ndarray::Array3;

use super::{Geometry, ImageError};

/// The element types both formats store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Element {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl Element {
    pub(super) fn size(self) -> usize {
        match self {
            Element::U8 | Element::I8 => 1,
            Element::U16 | Element::I16 => 2,
            Element::U32 | Element::I32 | Element::F32 => 4,
            Element::U64 | Element::I64 | Element::F64 => 8,
        }
    }
}

/// How a data block is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Storage {
    Raw,
    /// gzip (possibly several members) or zlib, told apart by the first bytes.
    Compressed,
    /// Whitespace- (or comma-) separated numbers.
    Ascii,
}

/// The decoded values of `stored`, `count` elements in file order, as f32 (what nnU-Net reads
/// every image as). Fewer elements than `count` is an error naming the file; more are ignored,
/// as ITK ignores them.
pub(super) fn decode(
    path: &Path,
    stored: &[u8],
    storage: Storage,
    element: Element,
    big_endian: bool,
    count: usize,
) -> Result<Vec<f32>, ImageError> {
    let expected = count
        .checked_mul(element.size())
        .ok_or_else(|| ImageError::invalid(path, format!("{count} voxels overflow the address space")))?;
    match storage {
        Storage::Ascii => return decode_ascii(path, stored, count),
        Storage::Raw if stored.len() < expected => {
            return Err(truncated(path, expected, stored.len(), ""));
        }
        Storage::Raw => return Ok(decode_bytes(&stored[..expected], element, big_endian)),
        Storage::Compressed => {}
    }
    let bytes = inflate(path, stored, expected)?;
    Ok(decode_bytes(&bytes, element, big_endian))
}

/// Decompresses gzip or zlib data to `expected` bytes (refusing to inflate more: a corrupt size
/// field cannot make it allocate without bound).
pub(super) fn inflate(path: &Path, stored: &[u8], expected: usize) -> Result<Vec<u8>, ImageError> {
    let reader: Box<dyn Read + '_> = if stored.starts_with(&[0x1f, 0x8b]) {
        Box::new(MultiGzDecoder::new(stored))
    } else {
        Box::new(ZlibDecoder::new(stored))
    };
    let mut bytes = Vec::with_capacity(expected.min(stored.len().saturating_mul(64)));
    reader
        .take(expected as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::invalid(path, format!("corrupt compressed data: {e}")))?;
    if bytes.len() < expected {
        return Err(truncated(path, expected, bytes.len(), " after decompression"));
    }
    Ok(bytes)
}

pub(super) fn truncated(path: &Path, expected: usize, available: usize, how: &str) -> ImageError {
    ImageError::invalid(
        path,
        format!("truncated data: the header declares {expected} bytes of voxels but only {available} are there{how}"),
    )
}

fn decode_bytes(bytes: &[u8], element: Element, big_endian: bool) -> Vec<f32> {
    macro_rules! each {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            bytes
                .chunks_exact(N)
                .map(|chunk| {
                    let b: [u8; N] = chunk.try_into().expect("chunk of N bytes");
                    let v = if big_endian {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    };
                    v as f32
                })
                .collect()
        }};
    }
    match element {
        Element::U8 => each!(u8),
        Element::I8 => each!(i8),
        Element::U16 => each!(u16),
        Element::I16 => each!(i16),
        Element::U32 => each!(u32),
        Element::I32 => each!(i32),
        Element::U64 => each!(u64),
        Element::I64 => each!(i64),
        Element::F32 => each!(f32),
        Element::F64 => each!(f64),
    }
}

fn decode_ascii(path: &Path, stored: &[u8], count: usize) -> Result<Vec<f32>, ImageError> {
    let text = String::from_utf8_lossy(stored);
    let mut values = Vec::with_capacity(count.min(stored.len() / 2 + 1));
    for word in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
    {
        if values.len() == count {
            break;
        }
        let value: f64 = word.parse().map_err(|_| {
            ImageError::invalid(path, format!("ASCII voxel data holds `{word}`, not a number"))
        })?;
        values.push(value as f32);
    }
    if values.len() < count {
        return Err(ImageError::invalid(
            path,
            format!(
                "truncated data: the header declares {count} voxel values but the ASCII data holds {}",
                values.len()
            ),
        ));
    }
    Ok(values)
}

/// Splits values stored with `components` interleaved (component fastest) into one `[z, y, x]`
/// array per component.
pub(super) fn channels(values: Vec<f32>, components: usize, shape_zyx: [usize; 3]) -> Vec<Array3<f32>> {
    let [nz, ny, nx] = shape_zyx;
    if components == 1 {
        let array =
            Array3::from_shape_vec((nz, ny, nx), values).expect("value count checked against the shape");
        return vec![array];
    }
    (0..components)
        .map(|c| {
            let channel: Vec<f32> = values.iter().skip(c).step_by(components).copied().collect();
            Array3::from_shape_vec((nz, ny, nx), channel).expect("value count checked against the shape")
        })
        .collect()
}

/// The geometry ITK's image reader makes of what an ImageIO reports for `ndim` (2 or 3) axes:
/// `sizes`, `spacing`, `origin` per axis and `axes[i]` the direction of axis i. A negative spacing
/// becomes positive with its axis' direction flipped, as `itk::ImageFileReader` does.
pub(super) fn itk_geometry(
    ndim: usize,
    sizes: &[usize],
    spacing: &[f64],
    origin: &[f64],
    axes: &[Vec<f64>],
) -> Geometry {
    let mut out_spacing = [1.0; 3];
    let mut out_origin = [0.0; 3];
    let mut direction = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for i in 0..ndim {
        let flip = if spacing[i] < 0.0 { -1.0 } else { 1.0 };
        out_spacing[i] = spacing[i] * flip;
        out_origin[i] = origin[i];
        for j in 0..ndim {
            direction[j][i] = axes[i][j] * flip;
        }
    }
    let shape_zyx = if ndim == 2 {
        [1, sizes[1], sizes[0]]
    } else {
        [sizes[2], sizes[1], sizes[0]]
    };
    Geometry::from_itk(ndim as u8, shape_zyx, out_spacing, out_origin, direction)
}

/// The axes a geometry is written with: 2 or 3 sizes (x first), spacings, origin entries and the
/// direction of each axis (columns of ITK's direction).
pub(super) struct Axes {
    pub sizes: Vec<usize>,
    pub spacing: Vec<f64>,
    pub origin: Vec<f64>,
    pub directions: Vec<Vec<f64>>,
}

pub(super) fn axes_of(
    path: &Path,
    labels: &Array3<i16>,
    geometry: &Geometry,
    format: &'static str,
) -> Result<Axes, ImageError> {
    let (nz, ny, nx) = labels.dim();
    if [nz, ny, nx] != geometry.shape_zyx {
        return Err(ImageError::CannotWrite {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "label map shape (z, y, x) {:?} does not match the geometry's {:?}",
                [nz, ny, nx],
                geometry.shape_zyx
            ),
        });
    }
    let n = if geometry.ndim == 2 { 2 } else { 3 };
    if n == 2 && nz != 1 {
        return Err(ImageError::CannotWrite {
            path: path.to_path_buf(),
            format,
            detail: format!("a 2D geometry needs one slice, the label map has {nz}"),
        });
    }
    Ok(Axes {
        sizes: [nx, ny, nz][..n].to_vec(),
        spacing: geometry.itk_spacing[..n].to_vec(),
        origin: geometry.itk_origin[..n].to_vec(),
        directions: (0..n)
            .map(|i| (0..n).map(|j| geometry.itk_direction[j][i]).collect())
            .collect(),
    })
}

/// Labels as stored: uint8 when every label is in 0..255 (nnU-Net's `< 255`), else int16;
/// little-endian bytes, x fastest. Returns whether it is uint8, and the bytes.
pub(super) fn label_bytes(labels: &Array3<i16>) -> (bool, Vec<u8>) {
    if labels.iter().all(|v| (0..255).contains(v)) {
        (true, labels.iter().map(|&v| v as u8).collect())
    } else {
        (false, labels.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// gzip (`gzip: true`, NRRD) or zlib (MetaImage) at the default level, deterministic (no time stamp).
pub(super) fn compress(bytes: &[u8], gzip: bool) -> Vec<u8> {
    let level = flate2::Compression::default();
    let result = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
        encoder.write_all(bytes).and_then(|()| encoder.finish())
    } else {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
        encoder.write_all(bytes).and_then(|()| encoder.finish())
    };
    result.expect("compressing into memory cannot fail")
}

/// A number as a header writes it: the shortest text that reads back as the same f64.
pub(super) fn number(value: f64) -> String {
    let value = if value == 0.0 { 0.0 } else { value }; // no "-0"
    if value != 0.0 && !(1e-5..1e16).contains(&value.abs()) {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

/// Writes `parts` one after the other under a temporary name in `path`'s folder, then renames it
/// to `path`: a crash never leaves a half-written file behind.
pub(super) fn write_atomically(path: &Path, parts: &[&[u8]]) -> Result<(), ImageError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let write = || -> io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        for part in parts {
            file.write_all(part)?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp); // best effort: the original error is what matters
        ImageError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Reads a whole file, the error naming it.
pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(ImageError::io(path))
}

/// The file a header names, relative to the header's folder unless absolute.
pub(super) fn beside(header: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        header.parent().unwrap_or(Path::new("")).join(name)
    }
}

/// Parses whitespace-separated numbers, naming the field in the error.
pub(super) fn numbers<T: std::str::FromStr>(
    path: &Path,
    field: &str,
    value: &str,
) -> Result<Vec<T>, ImageError> {
    value
        .split_whitespace()
        .map(|word| {
            word.parse()
                .map_err(|_| ImageError::invalid(path, format!("`{field}` holds `{word}`, not a number")))
        })
        .collect()
}

/// Writes an image file: `header` followed by `data` in `path`, or, when `path` ends in
/// `.<detached_extension>`, the data into `<stem><data_suffix>` beside it first and the header last,
/// naming it with `data_line(name)` (so a header is never there before its data). `attached_line`
/// ends the header of a single file.
pub fn write_header_and_data(
    path: &Path,
    mut header: String,
    data: &[u8],
    detached_extension: &str,
    data_suffix: &str,
    data_line: impl Fn(&str) -> String,
    attached_line: &str,
) -> Result<(), ImageError> {
    let detached = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(detached_extension));
    if detached {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
        let data_name = format!("{stem}{data_suffix}");
        header += &data_line(&data_name);
        write_atomically(&beside(path, &data_name), &[data])?;
        write_atomically(path, &[header.as_bytes()])
    } else {
        header += attached_line;
        write_atomically(path, &[header.as_bytes(), data])
    }
}
