//! Writes PyTorch's `torch.save` format, so that nnU-Net loads what nnflow trained. No maintained
//! crate writes it (pytorch-reader and candle only read it; serde-pickle has no persistent ids),
//! and the part a checkpoint needs is small: a zip holding `<name>/data.pkl` (a pickle, protocol 2,
//! of dicts, strings, numbers, tuples, lists and tensors), `<name>/byteorder`, one raw
//! little-endian storage per tensor under `<name>/data/<key>`, and `<name>/version`. Entries are
//! stored uncompressed with their data aligned to 64 bytes, as torch writes them.
//!
//! Tensors are float32, contiguous, rebuilt by `torch._utils._rebuild_tensor_v2` from a storage
//! named by the persistent id `('storage', torch.FloatStorage, key, 'cpu', numel)`. Those globals
//! and `collections.OrderedDict` are all the pickle names, each one `torch.load(weights_only=True)`
//! allows, so the file loads with and without `weights_only`.
//!
//! `.format_version` is left out on purpose: with it, torch may compute storage offsets from the
//! layout of its own zip writer instead of reading each entry's header.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

/// Data alignment of stored entries; torch's default `storage_alignment`.
const ALIGNMENT: u16 = 64;
/// The zip format version torch's writer records (`<name>/version`).
const VERSION: &str = "3\n";

/// A Python value as pickled into `data.pkl`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A `dict`; its items in this order.
    Dict(Vec<(String, Value)>),
    /// A `collections.OrderedDict` (what `state_dict()` returns).
    OrderedDict(Vec<(String, Value)>),
    /// A float32 tensor made by [`PthWriter::tensor`]; copies share the storage.
    Tensor(TensorRef),
}

/// A tensor of a [`PthWriter`]: which storage holds its values, and its shape (contiguous,
/// row-major, from the storage's start).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    storage: usize,
    shape: Vec<usize>,
}

impl Value {
    pub fn str(text: impl Into<String>) -> Value {
        Value::Str(text.into())
    }

    /// JSON as Python's `json.load` gives it: objects become dicts (in the order written),
    /// arrays lists, integers ints and other numbers floats. An integer beyond `i64` (JSON allows
    /// it; no plan or dataset.json holds one) becomes the nearest float.
    pub fn from_json(json: &serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::None,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Array(items) => Value::List(items.iter().map(Value::from_json).collect()),
            serde_json::Value::Object(map) => Value::Dict(
                map.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// Why a `.pth` file could not be written; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PthWriteError {
    #[error("a tensor of shape {shape:?} needs {expected} values, {got} were given")]
    Shape {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{}: a tensor refers to storage {storage}, which this writer does not hold", path.display())]
    UnknownStorage { path: PathBuf, storage: usize },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
}

/// Holds the tensors' storages and writes a value holding them as one `.pth` file.
#[derive(Debug, Default)]
pub struct PthWriter {
    storages: Vec<Vec<f32>>,
}

impl PthWriter {
    pub fn new() -> PthWriter {
        PthWriter::default()
    }

    /// A tensor of `shape` holding `values` (row-major) in a storage of its own.
    pub fn tensor(&mut self, shape: Vec<usize>, values: Vec<f32>) -> Result<Value, PthWriteError> {
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(PthWriteError::Shape {
                shape,
                expected,
                got: values.len(),
            });
        }
        self.storages.push(values);
        Ok(Value::Tensor(TensorRef {
            storage: self.storages.len() - 1,
            shape,
        }))
    }

    /// Writes `root` as `path`, the way `torch.save(root, path)` does; the archive's inner folder
    /// is the file's stem, as torch names it.
    pub fn save(&self, root: &Value, path: &Path) -> Result<(), PthWriteError> {
        let zip_error = |source| PthWriteError::Zip {
            path: path.to_path_buf(),
            source,
        };
        let io_error = |source| PthWriteError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut pickle = Pickler::default();
        pickle.value(root, self, path)?;
        let pickle = pickle.finish();

        let archive = path
            .file_stem()
            .map_or("archive".into(), |s| s.to_string_lossy().into_owned());
        let file = File::create(path).map_err(io_error)?;
        let mut zip = ZipWriter::new(BufWriter::new(file));
        let options = |size: usize| {
            SimpleFileOptions::default()
                .compression_method(CompressionMethod::Stored)
                .with_alignment(ALIGNMENT)
                .last_modified_time(DateTime::default())
                .large_file(size as u64 >= u32::MAX as u64)
        };
        let mut entry = |name: String, bytes: &[u8]| -> Result<(), PthWriteError> {
            zip.start_file(name, options(bytes.len())).map_err(zip_error)?;
            zip.write_all(bytes).map_err(io_error)
        };
        entry(format!("{archive}/data.pkl"), &pickle)?;
        entry(format!("{archive}/byteorder"), b"little")?;
        for (key, values) in self.storages.iter().enumerate() {
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for value in values {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            entry(format!("{archive}/data/{key}"), &bytes)?;
        }
        entry(format!("{archive}/version"), VERSION.as_bytes())?;
        let mut out = zip.finish().map_err(zip_error)?;
        out.flush().map_err(io_error)
    }
}

/// Pickle opcodes (protocol 2) used here.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const BINUNICODE: u8 = b'X';
    pub const MARK: u8 = b'(';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const EMPTY_LIST: u8 = b']';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEMS: u8 = b'u';
    pub const GLOBAL: u8 = b'c';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
}

/// Builds `data.pkl`. No memo: every global is written where it is used, which costs a few bytes
/// per tensor and keeps the stream a plain function of the value.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn finish(mut self) -> Vec<u8> {
        let mut bytes = vec![op::PROTO, 2];
        bytes.append(&mut self.out);
        bytes.push(op::STOP);
        bytes
    }

    fn value(&mut self, value: &Value, writer: &PthWriter, path: &Path) -> Result<(), PthWriteError> {
        match value {
            Value::None => self.out.push(op::NONE),
            Value::Bool(b) => self.out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::Tuple(items) => {
                let opcode = match items.len() {
                    0 => Some(op::EMPTY_TUPLE),
                    1 => Some(op::TUPLE1),
                    2 => Some(op::TUPLE2),
                    3 => Some(op::TUPLE3),
                    _ => None,
                };
                if opcode.is_none() {
                    self.out.push(op::MARK);
                }
                for item in items {
                    self.value(item, writer, path)?;
                }
                self.out.push(opcode.unwrap_or(op::TUPLE));
            }
            Value::List(items) => {
                self.out.push(op::EMPTY_LIST);
                if !items.is_empty() {
                    self.out.push(op::MARK);
                    for item in items {
                        self.value(item, writer, path)?;
                    }
                    self.out.push(op::APPENDS);
                }
            }
            Value::Dict(items) => {
                self.out.push(op::EMPTY_DICT);
                self.items(items, writer, path)?;
            }
            Value::OrderedDict(items) => {
                self.empty_ordered_dict();
                self.items(items, writer, path)?;
            }
            Value::Tensor(tensor) => self.tensor(tensor, writer, path)?,
        }
        Ok(())
    }

    fn items(
        &mut self,
        items: &[(String, Value)],
        writer: &PthWriter,
        path: &Path,
    ) -> Result<(), PthWriteError> {
        if items.is_empty() {
            return Ok(());
        }
        self.out.push(op::MARK);
        for (key, value) in items {
            self.str(key);
            self.value(value, writer, path)?;
        }
        self.out.push(op::SETITEMS);
        Ok(())
    }

    /// The smallest encoding Python's pickler uses for `i`.
    fn int(&mut self, i: i64) {
        if let Ok(byte) = u8::try_from(i) {
            self.out.extend_from_slice(&[op::BININT1, byte]);
        } else if let Ok(short) = u16::try_from(i) {
            self.out.push(op::BININT2);
            self.out.extend_from_slice(&short.to_le_bytes());
        } else if let Ok(int) = i32::try_from(i) {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&int.to_le_bytes());
        } else {
            // two's complement, little-endian, without the sign-extension bytes Python leaves out
            let mut bytes = i.to_le_bytes().to_vec();
            while bytes.len() > 1 {
                let last = bytes[bytes.len() - 1];
                let next_sign = bytes[bytes.len() - 2] & 0x80;
                if (last == 0 && next_sign == 0) || (last == 0xff && next_sign != 0) {
                    bytes.pop();
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[op::LONG1, bytes.len() as u8]);
            self.out.extend_from_slice(&bytes);
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(op::GLOBAL);
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
    }

    /// `_rebuild_tensor_v2(storage, 0, shape, strides, False, OrderedDict())`, the storage being
    /// the persistent id torch's own pickler writes.
    fn tensor(&mut self, tensor: &TensorRef, writer: &PthWriter, path: &Path) -> Result<(), PthWriteError> {
        let numel = writer
            .storages
            .get(tensor.storage)
            .ok_or_else(|| PthWriteError::UnknownStorage {
                path: path.to_path_buf(),
                storage: tensor.storage,
            })?
            .len();
        let ints = |values: &[usize]| Value::Tuple(values.iter().map(|&v| Value::Int(v as i64)).collect());
        let mut strides = vec![1usize; tensor.shape.len()];
        for axis in (0..tensor.shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * tensor.shape[axis + 1];
        }

        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(op::MARK);
        self.out.push(op::MARK);
        self.str("storage");
        self.global("torch", "FloatStorage");
        self.str(&tensor.storage.to_string());
        self.str("cpu");
        self.int(numel as i64);
        self.out.push(op::TUPLE);
        self.out.push(op::BINPERSID);
        self.int(0);
        self.value(&ints(&tensor.shape), writer, path)?;
        self.value(&ints(&strides), writer, path)?;
        self.out.push(op::NEWFALSE);
        self.empty_ordered_dict();
        self.out.push(op::TUPLE);
        self.out.push(op::REDUCE);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::pth::read_checkpoint;
    use pytorch_reader::{PickleValue, PytorchReader};

    /// A checkpoint as nnU-Net's predictor reads it, with one alias sharing a storage.
    fn checkpoint(writer: &mut PthWriter) -> Value {
        let conv = writer
            .tensor(vec![2, 1, 3], vec![0.5, -1.0, 2.25, 3.0, f32::MIN_POSITIVE, -0.0])
            .unwrap();
        let bias = writer.tensor(vec![2], vec![1e-7, 65504.5]).unwrap();
        let scalar = writer.tensor(vec![], vec![42.0]).unwrap();
        Value::Dict(vec![
            (
                "network_weights".into(),
                Value::OrderedDict(vec![
                    ("a.conv.weight".into(), conv.clone()),
                    ("a.conv.bias".into(), bias),
                    ("a.all_modules.0.weight".into(), conv),
                    ("scalar".into(), scalar),
                ]),
            ),
            ("current_epoch".into(), Value::Int(1000)),
            (
                "init_args".into(),
                Value::Dict(vec![
                    ("configuration".into(), Value::str("3d_fullres")),
                    ("fold".into(), Value::Int(3)),
                ]),
            ),
            ("trainer_name".into(), Value::str("nnUNetTrainer")),
            (
                "inference_allowed_mirroring_axes".into(),
                Value::Tuple(vec![Value::Int(0), Value::Int(2)]),
            ),
        ])
    }

    #[test]
    fn nnflows_reader_reads_back_the_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint_final.pth");
        let mut writer = PthWriter::new();
        let root = checkpoint(&mut writer);
        writer.save(&root, &path).unwrap();

        let read = read_checkpoint(&path).unwrap();
        assert_eq!(read.trainer_name, "nnUNetTrainer");
        assert_eq!(read.mirror_axes, [0, 2]);
        assert_eq!(read.configuration.as_deref(), Some("3d_fullres"));
        assert_eq!(read.fold.as_deref(), Some("3"));
        assert_eq!(read.current_epoch, Some(1000));
        let names: Vec<&str> = read.weights.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            ["a.all_modules.0.weight", "a.conv.bias", "a.conv.weight", "scalar"]
        );
        let conv = read.get("a.conv.weight").unwrap();
        assert_eq!(conv.shape, [2, 1, 3]);
        let expected = [0.5, -1.0, 2.25, 3.0, f32::MIN_POSITIVE, -0.0f32];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&conv.values), bits(&expected));
        let alias = read.get("a.all_modules.0.weight").unwrap();
        assert_eq!(
            (&alias.shape, bits(&alias.values)),
            (&conv.shape, bits(&expected))
        );
        assert_eq!(read.get("a.conv.bias").unwrap().values, [1e-7, 65504.5]);
        let scalar = read.get("scalar").unwrap();
        assert_eq!(
            (scalar.shape.as_slice(), scalar.values.as_slice()),
            (&[][..], &[42.0][..])
        );
    }

    #[test]
    fn plain_values_round_trip_through_a_pickle_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values.pth");
        let ints = [
            0,
            255,
            256,
            65535,
            65536,
            -1,
            -129,
            i32::MAX as i64,
            i32::MIN as i64,
            i32::MAX as i64 + 1,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ];
        let json: serde_json::Value = serde_json::json!({
            "z": [1, 2.5, "x", null, true, false, {"nested": []}],
            "a": {"spacing": [2.5, 1.0, 1.0]},
        });
        let root = Value::Dict(vec![
            (
                "ints".into(),
                Value::List(ints.iter().map(|&i| Value::Int(i)).collect()),
            ),
            (
                "floats".into(),
                Value::Tuple(vec![Value::Float(0.1), Value::Float(-1e300)]),
            ),
            (
                "long_tuple".into(),
                Value::Tuple((0..5).map(Value::Int).collect()),
            ),
            ("text".into(), Value::str("Grüße, \"quoted\"\n")),
            ("empty".into(), Value::Dict(vec![])),
            ("json".into(), Value::from_json(&json)),
        ]);
        PthWriter::new().save(&root, &path).unwrap();

        let PickleValue::Dict(read) = PytorchReader::read_pickle_data(&path, None).unwrap() else {
            panic!("not a dict")
        };
        let PickleValue::List(read_ints) = &read["ints"] else {
            panic!()
        };
        let read_ints: Vec<i64> = read_ints
            .iter()
            .map(|v| match v {
                PickleValue::Int(i) => *i,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(read_ints, ints);
        assert!(matches!(&read["floats"], PickleValue::List(f)
            if matches!(f[..], [PickleValue::Float(a), PickleValue::Float(b)] if a == 0.1 && b == -1e300)));
        assert!(matches!(&read["long_tuple"], PickleValue::List(items) if items.len() == 5));
        assert!(matches!(&read["text"], PickleValue::String(s) if s == "Grüße, \"quoted\"\n"));
        assert!(matches!(&read["empty"], PickleValue::Dict(d) if d.is_empty()));
        let PickleValue::Dict(json) = &read["json"] else {
            panic!()
        };
        let PickleValue::List(z) = &json["z"] else {
            panic!()
        };
        assert!(matches!(
            z[..],
            [
                PickleValue::Int(1),
                PickleValue::Float(f),
                PickleValue::String(_),
                PickleValue::None,
                PickleValue::Bool(true),
                PickleValue::Bool(false),
                PickleValue::Dict(_)
            ] if f == 2.5
        ));
    }

    #[test]
    fn storages_are_stored_uncompressed_and_aligned_like_torchs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint_best.pth");
        let mut writer = PthWriter::new();
        let root = checkpoint(&mut writer);
        writer.save(&root, &path).unwrap();

        let mut archive = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        let names: Vec<String> = archive
            .file_names()
            .map(|name| name.unwrap().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "checkpoint_best/data.pkl",
                "checkpoint_best/byteorder",
                "checkpoint_best/data/0",
                "checkpoint_best/data/1",
                "checkpoint_best/data/2",
                "checkpoint_best/version",
            ]
        );
        for index in 0..archive.len() {
            let entry = archive.by_index(index).unwrap();
            let name = entry.name().unwrap().into_owned();
            assert_eq!(entry.compression(), CompressionMethod::Stored, "{name}");
            assert_eq!(entry.data_start().unwrap() % ALIGNMENT as u64, 0, "{name}");
        }
        let mut storage = Vec::new();
        io::copy(
            &mut archive.by_name("checkpoint_best/data/1").unwrap(),
            &mut storage,
        )
        .unwrap();
        let mut expected = 1e-7f32.to_le_bytes().to_vec();
        expected.extend_from_slice(&65504.5f32.to_le_bytes());
        assert_eq!(storage, expected);
        // the same value writes the same bytes
        let again = dir.path().join("again/checkpoint_best.pth");
        std::fs::create_dir(again.parent().unwrap()).unwrap();
        writer.save(&root, &again).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
    }

    #[test]
    fn a_shape_that_does_not_fit_the_values_is_refused() {
        let err = PthWriter::new().tensor(vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert!(
            matches!(
                &err,
                PthWriteError::Shape {
                    expected: 6,
                    got: 5,
                    ..
                }
            ),
            "{err}"
        );
        // a tensor of another writer: this one holds no storage for it
        let foreign = PthWriter::new().tensor(vec![1], vec![1.0]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pth");
        let err = PthWriter::new().save(&foreign, &path).unwrap_err();
        assert!(
            matches!(err, PthWriteError::UnknownStorage { storage: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("x.pth"), "{err}");
    }
}
