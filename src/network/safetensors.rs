//! nnflow's weights files (`checkpoint_final.safetensors`: tch's safetensors, float32), read
//! without libtorch: for export to nnU-Net's `.pth` and for tests that compare weights.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::file_error::FileError;

/// Why a weights file could not be read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: not a safetensors file: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: tensor {tensor} is {dtype}; nnflow's checkpoints hold float32 (F32)", path.display())]
    DType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The float32 tensors of a safetensors file (an 8-byte little-endian header length, a JSON
/// header naming each tensor's dtype, shape and byte range, then the data), in header order.
pub fn read_safetensors(path: &Path) -> Result<Vec<F32Tensor>, SafetensorsError> {
    let invalid = |reason: String| SafetensorsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(FileError::io(path))?;
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| invalid("shorter than its header length".into()))?;
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| invalid(format!("header length {header_len} runs past the file's end")))?;
    // sorted by name whatever serde_json's map keeps (insertion order under `preserve_order`)
    let header: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| invalid(format!("header: {e}")))?;
    let data = &bytes[data_start..];
    let mut tensors = Vec::with_capacity(header.len());
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry["dtype"].as_str().unwrap_or_default();
        if dtype != "F32" {
            return Err(SafetensorsError::DType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: dtype.to_string(),
            });
        }
        let numbers = |key: &str| -> Option<Vec<usize>> {
            entry[key]
                .as_array()?
                .iter()
                .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        };
        let shape = numbers("shape").ok_or_else(|| invalid(format!("{name}: no shape")))?;
        let range = numbers("data_offsets")
            .filter(|r| r.len() == 2 && r[0] <= r[1] && r[1] <= data.len())
            .ok_or_else(|| invalid(format!("{name}: data_offsets outside the file")))?;
        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel.and_then(|n| n.checked_mul(4)) != Some(range[1] - range[0]) {
            return Err(invalid(format!(
                "{name}: {} bytes for shape {shape:?}",
                range[1] - range[0]
            )));
        }
        let values = data[range[0]..range[1]]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.push(F32Tensor {
            name: name.clone(),
            shape,
            values,
        });
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file as `tch` writes one (header, then the tensors' bytes).
    fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn reads_float32_safetensors_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut data = Vec::new();
        for v in [1.5f32, -2.0, 3.25, 0.0, 7.0] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        let header = r#"{"__metadata__":{"a":"b"},"b.bias":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        std::fs::write(&path, safetensors(header, &data)).unwrap();
        let tensors = read_safetensors(&path).unwrap();
        let tensor = |name: &str, shape: Vec<usize>, values: Vec<f32>| F32Tensor {
            name: name.into(),
            shape,
            values,
        };
        assert_eq!(
            tensors,
            [
                tensor("a.weight", vec![2, 2], vec![1.5, -2.0, 3.25, 0.0]),
                tensor("b.bias", vec![1], vec![7.0]),
            ]
        );

        let half = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
        std::fs::write(&path, safetensors(half, &data[..4])).unwrap();
        let err = read_safetensors(&path).unwrap_err();
        assert!(
            matches!(&err, SafetensorsError::DType { tensor, dtype, .. } if tensor == "a" && dtype == "F16"),
            "{err}"
        );

        let short = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        std::fs::write(&path, safetensors(short, &data)).unwrap();
        let err = read_safetensors(&path).unwrap_err();
        assert!(
            err.to_string().contains("w.safetensors") && err.to_string().contains("shape [3]"),
            "{err}"
        );

        std::fs::write(&path, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        assert!(matches!(
            read_safetensors(&path),
            Err(SafetensorsError::Invalid { .. })
        ));
    }
}
