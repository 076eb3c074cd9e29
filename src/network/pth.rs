//! nnU-Net v2's training checkpoints (`checkpoint_final.pth`, `checkpoint_best.pth`), read without
//! torch and without executing anything: `pytorch-reader` parses `torch.save`'s zip of a pickle
//! and interprets only the calls that rebuild tensors and dicts, leaving every other object
//! (the pickled `torch.device`, numpy scalars) as an opaque name.
//!
//! nnU-Net's `save_checkpoint` writes a dict: `network_weights` (the state dict), `optimizer_state`,
//! `grad_scaler_state`, `logging`, `_best_ema`, `current_epoch`, `init_args` (plans,
//! configuration, fold, dataset_json, device), `trainer_name` and
//! `inference_allowed_mirroring_axes`. Prediction needs the weights, the trainer's name and the
//! mirroring axes; the rest is read where it is plain data and otherwise left alone.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use pytorch_reader::{DType, PickleValue, PytorchError, PytorchReader};

/// One tensor of the state dict, as `f32` in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedWeights {
    /// nnU-Net's state-dict name, e.g. `encoder.stages.0.0.convs.0.conv.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// What an nnU-Net checkpoint holds that prediction needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NnunetCheckpoint {
    /// The trainer class that wrote it (`trainer_name`), e.g. `nnUNetTrainer`.
    pub trainer_name: String,
    /// `inference_allowed_mirroring_axes`: the spatial axes (0-based, after the batch and channel
    /// axes) test-time mirroring may flip. Empty where the trainer allows none (it stores `None`).
    pub mirror_axes: Vec<usize>,
    /// `init_args['configuration']`, where present.
    pub configuration: Option<String>,
    /// `init_args['fold']` as text (`"0"`..`"4"`, `"all"`), where present.
    pub fold: Option<String>,
    /// `current_epoch`, where present.
    pub current_epoch: Option<i64>,
    /// `network_weights`, sorted by name. Every name the state dict gives is kept, including
    /// PyTorch's aliases of the same tensor (`...all_modules.0...`, `decoder.encoder.*`): see
    /// [`crate::network::state_dict::nnunet_aliases`] to tell them apart.
    pub weights: Vec<NamedWeights>,
}

impl NnunetCheckpoint {
    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedWeights> {
        self.weights
            .binary_search_by(|w| w.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.weights[i])
    }
}

/// Why a checkpoint could not be read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    /// Not a PyTorch file, a damaged one, or a pickle the reader refuses.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: PytorchError },
    #[error("{}: no `{key}` entry; is it a checkpoint nnU-Net v2 wrote?", path.display())]
    MissingEntry { path: PathBuf, key: &'static str },
    #[error("{}: `{key}` is {found}, expected {expected}", path.display())]
    EntryType {
        path: PathBuf,
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error(
        "{}: tensor {tensor} is {}; only floating-point weights \
         (float32, float16, bfloat16, float64) are read",
        path.display(),
        torch_name(*dtype)
    )]
    DType {
        path: PathBuf,
        tensor: String,
        dtype: DType,
    },
    #[error("{}: {source}", path.display())]
    Tensor { path: PathBuf, source: io::Error },
}

/// Reads an nnU-Net v2 checkpoint: its weights (converted to `f32`), trainer name and mirroring
/// axes.
pub fn read_checkpoint(path: &Path) -> Result<NnunetCheckpoint, PthError> {
    let read = |source| PthError::Read {
        path: path.to_path_buf(),
        source,
    };
    let PickleValue::Dict(root) = PytorchReader::read_pickle_data(path, None).map_err(read)? else {
        return Err(PthError::EntryType {
            path: path.to_path_buf(),
            key: "<root>",
            expected: "a dict",
            found: "another object".into(),
        });
    };
    let meta = Entries { path, dict: &root };
    let trainer_name = meta.string("trainer_name")?;
    let mirror_axes = meta.mirror_axes()?;
    let current_epoch = meta.optional_int("current_epoch")?;
    let (configuration, fold) = meta.init_args();
    if !root.contains_key("network_weights") {
        return Err(PthError::MissingEntry {
            path: path.to_path_buf(),
            key: "network_weights",
        });
    }

    let reader = PytorchReader::with_top_level_key(path, "network_weights").map_err(read)?;
    let mut weights = reader
        .into_tensors()
        .into_values()
        .map(|tensor| to_f32(path, tensor))
        .collect::<Result<Vec<_>, _>>()?;
    weights.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(NnunetCheckpoint {
        trainer_name,
        mirror_axes,
        configuration,
        fold,
        current_epoch,
        weights,
    })
}

/// The checkpoint's top-level entries, read with errors that name the file and the key.
struct Entries<'a> {
    path: &'a Path,
    dict: &'a HashMap<String, PickleValue>,
}

impl Entries<'_> {
    fn get(&self, key: &'static str) -> Result<&PickleValue, PthError> {
        self.dict.get(key).ok_or_else(|| PthError::MissingEntry {
            path: self.path.to_path_buf(),
            key,
        })
    }

    fn wrong(&self, key: &'static str, expected: &'static str, found: &PickleValue) -> PthError {
        PthError::EntryType {
            path: self.path.to_path_buf(),
            key,
            expected,
            found: describe(found),
        }
    }

    fn string(&self, key: &'static str) -> Result<String, PthError> {
        match self.get(key)? {
            PickleValue::String(s) => Ok(s.clone()),
            other => Err(self.wrong(key, "a str", other)),
        }
    }

    fn optional_int(&self, key: &'static str) -> Result<Option<i64>, PthError> {
        match self.dict.get(key) {
            None | Some(PickleValue::None) => Ok(None),
            Some(PickleValue::Int(i)) => Ok(Some(*i)),
            Some(other) => Err(self.wrong(key, "an int", other)),
        }
    }

    /// `inference_allowed_mirroring_axes`: a tuple of ints, or `None` for no mirroring.
    fn mirror_axes(&self) -> Result<Vec<usize>, PthError> {
        const KEY: &str = "inference_allowed_mirroring_axes";
        let expected = "a tuple of axes or None";
        match self.get(KEY)? {
            PickleValue::None => Ok(Vec::new()),
            PickleValue::List(items) => items
                .iter()
                .map(|item| match item {
                    PickleValue::Int(axis) if *axis >= 0 => Ok(*axis as usize),
                    _ => Err(self.wrong(KEY, expected, item)),
                })
                .collect(),
            other => Err(self.wrong(KEY, expected, other)),
        }
    }

    /// `init_args`' configuration and fold, where they are plain values. They only document
    /// the checkpoint (the folder it lies in says the same), so their absence is no error.
    fn init_args(&self) -> (Option<String>, Option<String>) {
        let Some(PickleValue::Dict(args)) = self.dict.get("init_args") else {
            return (None, None);
        };
        let configuration = match args.get("configuration") {
            Some(PickleValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        let fold = match args.get("fold") {
            Some(PickleValue::Int(i)) => Some(i.to_string()),
            Some(PickleValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        (configuration, fold)
    }
}

/// PyTorch's name of an element type.
fn torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "torch.float64",
        DType::F32 => "torch.float32",
        DType::F16 => "torch.float16",
        DType::BF16 => "torch.bfloat16",
        DType::I64 => "torch.int64",
        DType::I32 => "torch.int32",
        DType::I16 => "torch.int16",
        DType::I8 => "torch.int8",
        DType::U64 => "torch.uint64",
        DType::U32 => "torch.uint32",
        DType::U16 => "torch.uint16",
        DType::U8 => "torch.uint8",
        DType::Bool => "torch.bool",
    }
}

/// A short description of a pickled value for an error message.
fn describe(value: &PickleValue) -> String {
    match value {
        PickleValue::None => "None".into(),
        PickleValue::Bool(b) => format!("the bool {b}"),
        PickleValue::Int(i) => format!("the int {i}"),
        PickleValue::Float(f) => format!("the float {f}"),
        PickleValue::String(s) => format!("the str {s:?}"),
        PickleValue::List(items) => format!("a sequence of {}", items.len()),
        PickleValue::Dict(_) => "a dict".into(),
        PickleValue::Bytes(b) => format!("{} bytes", b.len()),
        PickleValue::Unsupported(type_name) => format!("a {type_name}"),
    }
}

/// Reads one tensor's bytes and converts them to `f32`.
fn to_f32(path: &Path, tensor: pytorch_reader::Tensor) -> Result<NamedWeights, PthError> {
    let dtype = tensor.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        return Err(PthError::DType {
            path: path.to_path_buf(),
            tensor: tensor.name,
            dtype,
        });
    }
    // Native-endian bytes (the reader refuses big-endian files), contiguous, row-major.
    let bytes = tensor.read().map_err(|source| PthError::Tensor {
        path: path.to_path_buf(),
        source,
    })?;
    let values = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_ne_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_ne_bytes([b[0], b[1]])))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_ne_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        _ => unreachable!("checked above"),
    };
    Ok(NamedWeights {
        shape: tensor.shape().to_vec(),
        name: tensor.name,
        values,
    })
}

/// IEEE half precision to single precision, exactly (every f16 is an f32).
fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exponent = ((bits >> 10) & 0x1f) as u32;
    let mantissa = (bits & 0x3ff) as u32;
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        // subnormal: mantissa * 2^-24, exact in f32
        (0, m) => (m as f32 * 2f32.powi(-24)).to_bits(),
        (0x1f, m) => 0x7f80_0000 | (m << 13),
        (e, m) => ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(sign | magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// `tests/fixtures/pth/<name>`, made by `generate.py` there with torch.
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pth")
            .join(name)
    }

    fn expected(file: &str) -> Value {
        let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()[file].clone()
    }

    /// The checkpoint holds exactly the state dict torch wrote, every alias included, with the
    /// values torch gives after `.float()`.
    fn assert_matches(checkpoint: &NnunetCheckpoint, expected: &Value) {
        assert_eq!(checkpoint.trainer_name, expected["trainer_name"]);
        let axes: Vec<usize> = serde_json::from_value(expected["mirror_axes"].clone()).unwrap();
        assert_eq!(checkpoint.mirror_axes, axes);
        assert_eq!(checkpoint.fold.as_deref(), expected["fold"].as_str());
        assert_eq!(
            checkpoint.configuration.as_deref(),
            expected["configuration"].as_str()
        );
        assert_eq!(checkpoint.current_epoch, expected["current_epoch"].as_i64());
        let tensors = expected["weights"].as_object().unwrap();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let read: Vec<&String> = checkpoint.weights.iter().map(|w| &w.name).collect();
        assert_eq!(read, names);
        for (name, tensor) in tensors {
            let weights = checkpoint.get(name).unwrap();
            let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone()).unwrap();
            let values: Vec<f32> = serde_json::from_value(tensor["values"].clone()).unwrap();
            assert_eq!(weights.shape, shape, "{name}");
            assert_eq!(weights.values, values, "{name}");
        }
    }

    #[test]
    fn reads_what_nnunets_trainer_saves() {
        let path = fixture("nnunet_like.pth");
        let checkpoint = read_checkpoint(&path).unwrap();
        assert_matches(&checkpoint, &expected("nnunet_like.pth"));
        assert_eq!(checkpoint.mirror_axes, [0, 1, 2]);
        // PyTorch's aliases share the canonical tensor's storage and are kept as they are
        let canonical = checkpoint.get("encoder.stages.1.conv.weight").unwrap();
        for alias in [
            "encoder.stages.1.all_modules.0.weight",
            "decoder.encoder.stages.1.conv.weight",
            "decoder.encoder.stages.1.all_modules.0.weight",
        ] {
            assert_eq!(checkpoint.get(alias).unwrap().values, canonical.values);
        }
    }

    #[test]
    fn converts_half_bfloat16_and_double_weights_and_reads_no_mirroring() {
        let checkpoint = read_checkpoint(&fixture("dtypes.pth")).unwrap();
        assert_matches(&checkpoint, &expected("dtypes.pth"));
        assert!(checkpoint.mirror_axes.is_empty());
        assert_eq!(checkpoint.fold.as_deref(), Some("all"));
    }

    #[test]
    fn refuses_integer_tensors_naming_them() {
        let path = fixture("int_buffer.pth");
        let err = read_checkpoint(&path).unwrap_err();
        assert!(
            matches!(&err, PthError::DType { tensor, dtype: DType::I64, .. }
                if tensor == "1.num_batches_tracked"),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(message.contains("torch.int64"), "{message}");
    }

    #[test]
    fn a_bare_state_dict_is_no_trainer_checkpoint() {
        let path = fixture("state_dict.pth");
        let err = read_checkpoint(&path).unwrap_err();
        assert!(
            matches!(
                err,
                PthError::MissingEntry {
                    key: "trainer_name",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_no_checkpoint_is_named() {
        let path = fixture("expected.json");
        let err = read_checkpoint(&path).unwrap_err();
        assert!(matches!(err, PthError::Read { .. }), "{err}");
        assert!(err.to_string().contains("expected.json"), "{err}");
    }

    #[test]
    fn half_precision_converts_exactly() {
        for (bits, value) in [
            (0x0000u16, 0.0f32),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x03ff, 6.097_555e-5),
            (0x7c00, f32::INFINITY),
            (0xfc00, f32::NEG_INFINITY),
        ] {
            assert_eq!(f16_to_f32(bits), value, "{bits:#06x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }
}
