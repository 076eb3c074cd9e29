//! NumPy `.npy` files (format version 1.0, C order, little-endian): the preprocessed data format.
//! Uncompressed on purpose: training memory-maps a case and reads random patches without
//! decompressing the whole volume, and numpy (`np.load(..., mmap_mode="r")`) reads the same files.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, ArrayView, Dimension, IxDyn};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types stored in preprocessed data.
pub trait NpyElement: Copy + Default + bytemuck::Pod {
    /// NumPy's dtype descriptor, e.g. `<f4`.
    const DESCR: &'static str;
    const SIZE: usize;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! npy_element {
    ($t:ty, $descr:expr) => {
        impl NpyElement for $t {
            const DESCR: &'static str = $descr;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("slice of the element size"))
            }
        }
    };
}

npy_element!(f32, "<f4");
npy_element!(i16, "<i2");
npy_element!(i8, "|i1");
npy_element!(i64, "<i8");

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a .npy file this reader supports: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error(
        "{path}: not a .npy file this reader supports: truncated: {got} bytes of data for shape {shape:?}"
    )]
    Truncated {
        path: PathBuf,
        got: usize,
        shape: Vec<usize>,
    },
}

/// A .npy header this reader does not accept.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeaderError {
    #[error("missing the \\x93NUMPY magic")]
    NoMagic,
    #[error("unsupported version {0}")]
    Version(u8),
    #[error("truncated header")]
    Truncated,
    #[error("header is not text")]
    NotText,
    #[error("expected dtype {expected}, header is {header}")]
    Dtype { expected: String, header: String },
    #[error("Fortran order is not supported")]
    FortranOrder,
    #[error("no shape in header")]
    NoShape,
    #[error("bad shape {0}")]
    BadShape(String),
}

/// Writes an array (any dimension, standard or not: it is written in logical C order).
pub fn write<T: NpyElement, D: Dimension>(path: &Path, array: ArrayView<T, D>) -> Result<(), NpyError> {
    let io = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let shape: Vec<String> = array.shape().iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        T::DESCR
    );
    // Pad so the data starts on a 64-byte boundary (as numpy does), header ends with a newline.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    // Volumes are hundreds of megabytes: write a standard-layout array's memory as it is (on a
    // little-endian machine it already is the file's byte order) instead of building a copy.
    let contiguous = array.as_slice().filter(|_| cfg!(target_endian = "little"));
    let converted;
    let bytes: &[u8] = match contiguous {
        Some(values) => bytemuck::cast_slice(values),
        None => {
            let mut buffer = Vec::with_capacity(array.len() * T::SIZE);
            array.iter().for_each(|&value| value.write_le(&mut buffer));
            converted = buffer;
            &converted
        }
    };
    let mut file = BufWriter::new(File::create(path).map_err(io)?);
    file.write_all(MAGIC).map_err(io)?;
    file.write_all(&[1, 0]).map_err(io)?;
    file.write_all(&(header.len() as u16).to_le_bytes()).map_err(io)?;
    file.write_all(header.as_bytes()).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.flush().map_err(io)
}

/// Reads an integer label array stored as int8 or int16 (nnU-Net stores int8 when labels fit).
pub fn read_labels(path: &Path) -> Result<ArrayD<i16>, NpyError> {
    let mut head = vec![0u8; 256];
    let mut file = File::open(path).map_err(|source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let length = read_up_to(&mut file, &mut head).map_err(|source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if String::from_utf8_lossy(&head[..length]).contains("'descr': '|i1'") {
        Ok(read::<i8>(path)?.mapv(i16::from))
    } else {
        read::<i16>(path)
    }
}

/// Reads a whole array written by [`write`] or numpy (version 1/2 headers, C order, matching dtype).
pub fn read<T: NpyElement>(path: &Path) -> Result<ArrayD<T>, NpyError> {
    let io = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = vec![0u8; 4096];
    let read = read_up_to(&mut file, &mut head).map_err(io)?;
    head.truncate(read);
    let (shape, offset) = parse_header(&head, T::DESCR).map_err(|source| NpyError::Header {
        path: path.to_path_buf(),
        source,
    })?;
    let count: usize = shape.iter().product();
    // Read the data straight into the typed buffer (no intermediate byte copy).
    let mut values = vec![T::default(); count];
    let target: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
    let already = head.len().saturating_sub(offset).min(target.len());
    target[..already].copy_from_slice(&head[offset..offset + already]);
    let got = already + read_up_to(&mut file, &mut target[already..]).map_err(io)?;
    if got < target.len() {
        return Err(NpyError::Truncated {
            path: path.to_path_buf(),
            got,
            shape,
        });
    }
    if cfg!(target_endian = "big") {
        values
            .iter_mut()
            .for_each(|v| *v = T::read_le(bytemuck::bytes_of(v)));
    }
    // `values` holds exactly the shape's element count.
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), values).expect("one value per element"))
}

/// Reads until `buffer` is full or the file ends; returns how many bytes were read.
fn read_up_to(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Parses the header: the shape and the offset of the data.
pub fn parse_header(bytes: &[u8], descr: &str) -> Result<(Vec<usize>, usize), HeaderError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(HeaderError::NoMagic);
    }
    let (length, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        version => return Err(HeaderError::Version(version)),
    };
    let header = bytes.get(start..start + length).ok_or(HeaderError::Truncated)?;
    let header = std::str::from_utf8(header).map_err(|_| HeaderError::NotText)?;
    if !header.contains(&format!("'descr': '{descr}'")) {
        return Err(HeaderError::Dtype {
            expected: descr.to_string(),
            header: header.trim().to_string(),
        });
    }
    if header.contains("'fortran_order': True") {
        return Err(HeaderError::FortranOrder);
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|rest| rest.split('(').nth(1))
        .and_then(|rest| rest.split(')').next())
        .ok_or(HeaderError::NoShape)?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| HeaderError::BadShape(shape_text.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((shape, start + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_numpy_header_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let array = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| (i[0] * 12 + i[1] * 4 + i[2]) as f32 * 0.5);
        write(&path, array.view()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0, "data aligned to 64 bytes");
        assert!(std::str::from_utf8(&bytes[10..10 + header_len])
            .unwrap()
            .starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }"));
        assert_eq!(read::<f32>(&path).unwrap(), array);
        let labels = ArrayD::from_shape_fn(IxDyn(&[5]), |i| i[0] as i16 - 1);
        write(&path, labels.view()).unwrap();
        assert_eq!(read::<i16>(&path).unwrap(), labels);
    }

    #[test]
    fn wrong_dtype_or_garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.npy");
        write(&path, ArrayD::<f32>::zeros(IxDyn(&[3])).view()).unwrap();
        let error = read::<i16>(&path).unwrap_err().to_string();
        assert!(error.contains("b.npy") && error.contains("<i2"), "{error}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(read::<f32>(&path).unwrap_err().to_string().contains("magic"));
    }
}
