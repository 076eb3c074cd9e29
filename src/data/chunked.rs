//! Chunked, compressed four-dimensional arrays on disk, the storage of preprocessed cases: Zarr v3
//! arrays written and read through `zarrs`. An array `(c, z, y, x)` is cut into shards (one file
//! each) of inner chunks (compressed alone, found through the shard's index), as nnU-Net's blosc2
//! files are cut into chunks of blocks, so a patch read decodes only the inner chunks it touches.
//! Inner chunks are zstd-compressed with a frame checksum, after byte shuffling where that makes
//! an array smaller (chosen per array, as nnU-Net chooses its blosc2 filter); the shard index
//! carries a crc32c, so a damaged file is an error, never wrong numbers.
//!
//! Every shard is written, also one of fill values, and [`ChunkedArray::open`] checks they are all
//! there: a missing file is an error naming it, not a region read as zeros.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{s, Array4, ArrayView4};
use rayon::prelude::*;
use zarrs::array::codec::{ShuffleCodec, ZstdCodec};
use zarrs::array::{
    data_type, Array, ArrayBuilder, ArrayCreateError, ArrayError, ArraySubset, BytesToBytesCodecTraits,
    CodecOptions, DataType, ElementOwned, FillValue,
};
use zarrs::filesystem::{FilesystemStore, FilesystemStoreCreateError};
use zarrs::group::{GroupBuilder, GroupCreateError};
use zarrs::storage::StorageError;

use crate::file_error::FileError;

/// nnU-Net's caps for its blosc2 blocks and chunks (`comp_blosc2_params`): the compressed unit
/// (here the inner chunk) at most 128 KiB, the chunk (here the shard) at most 6 MiB and 1.5 times
/// the patch per axis.
const MAX_BLOCK_BYTES: usize = 128 * 1024;
const MAX_CHUNK_BYTES: usize = 6 * 1024 * 1024;
const MAX_CHUNK_TO_PATCH_RATIO: f64 = 1.5;

/// zstd's level for the inner chunks: zstd's default. With the filter chosen per array it stores
/// cases smaller than nnU-Net 2.8.1's blosc2 (LZ4HC level 5) on `benches/case_format.rs`'s data,
/// resampled or not; level 1 writes faster but loses ~13% on quantized intensities.
pub const ZSTD_LEVEL: i32 = 3;

/// The element types stored: float32 images, int8 and int16 labels.
pub trait Stored: ElementOwned + bytemuck::Pod + Default + Into<FillValue> + Send + Sync + 'static {
    /// The Zarr name, for messages.
    const NAME: &'static str;
    fn data_type() -> DataType;
}

impl Stored for f32 {
    const NAME: &'static str = "float32";
    fn data_type() -> DataType {
        data_type::float32()
    }
}

impl Stored for i8 {
    const NAME: &'static str = "int8";
    fn data_type() -> DataType {
        data_type::int8()
    }
}

impl Stored for i16 {
    const NAME: &'static str = "int16";
    fn data_type() -> DataType {
        data_type::int16()
    }
}

/// What is wrong with one chunked array; each error names the file (or the array's folder).
#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("{}: missing (no array metadata)", .path.display())]
    Missing { path: PathBuf },
    #[error("{}: missing chunk file (the array is incomplete)", .path.display())]
    MissingChunk { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<ArrayCreateError>,
    },
    #[error("{}: expected {expected}, found {found}", .path.display())]
    Layout {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// A chunk file that cannot be read or decoded (damaged or truncated).
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Box<ArrayError>,
    },
    #[error("{}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Box<ArrayError>,
    },
    #[error("{}: {source}", .path.display())]
    Metadata {
        path: PathBuf,
        #[source]
        source: Box<StorageError>,
    },
    #[error("{}: {source}", .path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: Box<FilesystemStoreCreateError>,
    },
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{}: {source}", .path.display())]
    Group {
        path: PathBuf,
        #[source]
        source: Box<GroupCreateError>,
    },
    #[error("{}: box {start:?} + {shape:?} lies outside the array's {array:?}", .path.display())]
    OutOfBounds {
        path: PathBuf,
        start: Box<[usize; 4]>,
        shape: Box<[usize; 4]>,
        array: Box<[usize; 4]>,
    },
}

/// Shapes of an array's inner chunks (the compressed unit, nnU-Net's blosc2 block) and shards
/// (one file, nnU-Net's blosc2 chunk rounded up to whole inner chunks, as Zarr requires).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkShapes {
    pub inner: [usize; 4],
    pub shard: [usize; 4],
}

impl ChunkShapes {
    /// The shapes for an array `(c, z, y, x)` of `bytes_per_voxel`-byte elements read in patches of
    /// `patch` (`(z, y, x)`, or `(y, x)` for 2D configurations).
    pub fn for_patch(image: [usize; 4], patch: &[usize], bytes_per_voxel: usize) -> ChunkShapes {
        let (inner, chunk) = blosc2_params(image, patch, bytes_per_voxel);
        let shard = [0, 1, 2, 3].map(|a| chunk[a].div_ceil(inner[a]) * inner[a]);
        ChunkShapes { inner, shard }
    }
}

/// nnU-Net's `comp_blosc2_params` (nnunetv2/training/dataloading/nnunet_dataset.py, 2.8.1): the
/// blosc2 (block, chunk) shapes of a `(c, z, y, x)` array for a patch. Blocks are the patch rounded
/// up to powers of two and halved, most over-represented axis first, until they fit 128 KiB; chunks
/// grow block by block along the most under-covered axis up to 1.5 patches, the image and 6 MiB.
/// The channel axis stays 1; a 2D patch grows no chunk along z.
pub fn blosc2_params(image: [usize; 4], patch: &[usize], bytes_per_voxel: usize) -> ([usize; 4], [usize; 4]) {
    let ceil_pow2 = |n: usize| n.max(1).next_power_of_two();
    let prev_pow2_below = |n: usize| {
        if n <= 1 {
            1
        } else {
            1 << (usize::BITS - 1 - (n - 1).leading_zeros())
        }
    };
    let nbytes = |shape: &[usize; 4]| shape.iter().product::<usize>() * bytes_per_voxel;
    let is_2d = patch.len() == 2;
    let patch: [usize; 3] = match patch {
        [y, x] => [1, *y, *x],
        [z, y, x] => [*z, *y, *x],
        _ => [128, 128, 128],
    };
    let spatial = [image[1], image[2], image[3]].map(|n| n.max(1));
    let target: [usize; 3] = [0, 1, 2].map(|a| {
        let capped = (MAX_CHUNK_TO_PATCH_RATIO * patch[a] as f64).floor() as usize;
        spatial[a].min(capped).max(1)
    });

    let mut block = [1, 0, 0, 0];
    for a in 0..3 {
        block[a + 1] = ceil_pow2(patch[a]).min(spatial[a]);
    }
    let block_cap = MAX_BLOCK_BYTES.min(MAX_CHUNK_BYTES);
    while nbytes(&block) > block_cap {
        // the axis largest relative to its target; ties go to the later axis
        let Some(axis) = (0..3).filter(|&a| block[a + 1] > 1).max_by(|&a, &b| {
            let ra = block[a + 1] as f64 / target[a] as f64;
            let rb = block[b + 1] as f64 / target[b] as f64;
            ra.total_cmp(&rb).then(a.cmp(&b))
        }) else {
            break;
        };
        block[axis + 1] = prev_pow2_below(block[axis + 1]).max(1);
    }

    let mut chunk = block;
    loop {
        let grown = (0..3)
            .filter(|&a| {
                !(is_2d && a == 0) && patch[a] != 1 && chunk[a + 1] < spatial[a] && chunk[a + 1] < target[a]
            })
            .filter_map(|a| {
                let mut candidate = chunk;
                candidate[a + 1] = (chunk[a + 1] + block[a + 1]).min(spatial[a]).min(target[a]);
                (candidate[a + 1] != chunk[a + 1] && nbytes(&candidate) <= MAX_CHUNK_BYTES)
                    .then_some((a, candidate))
            })
            // nnU-Net's `min` over (coverage, -image extent, axis, -bytes): the most under-covered
            // axis, ties to the larger image axis, the earlier axis, the larger chunk
            .min_by(|(a, x), (b, y)| {
                let coverage = |axis: usize| chunk[axis + 1] as f64 / target[axis] as f64;
                coverage(*a)
                    .total_cmp(&coverage(*b))
                    .then(spatial[*b].cmp(&spatial[*a]))
                    .then(a.cmp(b))
                    .then(nbytes(y).cmp(&nbytes(x)))
            });
        match grown {
            Some((_, candidate)) => chunk = candidate,
            None => break,
        }
    }
    (block, chunk)
}

fn store_at(folder: &Path) -> Result<Arc<FilesystemStore>, ChunkedError> {
    FilesystemStore::new(folder)
        .map(Arc::new)
        .map_err(|source| ChunkedError::Store {
            path: folder.to_path_buf(),
            source: Box::new(source),
        })
}

/// The Zarr node path of array `name` under a store's root (`""`: the root itself) and its folder.
fn node(folder: &Path, name: &str) -> (String, PathBuf) {
    if name.is_empty() {
        ("/".into(), folder.to_path_buf())
    } else {
        (format!("/{name}"), folder.join(name))
    }
}

/// Makes `folder` a Zarr group (its `zarr.json`), so Zarr readers see the arrays under it.
pub fn write_group(folder: &Path) -> Result<(), ChunkedError> {
    let group = |source| ChunkedError::Group {
        path: folder.to_path_buf(),
        source: Box::new(source),
    };
    GroupBuilder::new()
        .build(store_at(folder)?, "/")
        .map_err(group)?
        .store_metadata()
        .map_err(|source| ChunkedError::Metadata {
            path: folder.to_path_buf(),
            source: Box::new(source),
        })
}

fn to_u64(values: [usize; 4]) -> Vec<u64> {
    values.iter().map(|&v| v as u64).collect()
}

/// The shard indices of an array, in order.
fn shard_indices(grid: [usize; 4]) -> Vec<[usize; 4]> {
    let mut all = Vec::with_capacity(grid.iter().product());
    for c in 0..grid[0] {
        for z in 0..grid[1] {
            for y in 0..grid[2] {
                for x in 0..grid[3] {
                    all.push([c, z, y, x]);
                }
            }
        }
    }
    all
}

/// Writes `values` as the Zarr array `name` (a folder; `""`: `folder` itself) under `folder`, with
/// its shard files. Not atomic by itself: callers write into a temporary folder and rename it.
pub fn write<T: Stored>(
    folder: &Path,
    name: &str,
    values: ArrayView4<T>,
    shapes: ChunkShapes,
) -> Result<(), ChunkedError> {
    let (node, path) = node(folder, name);
    let shape: [usize; 4] = values.shape().try_into().expect("four axes");
    let mut codecs: Vec<Arc<dyn BytesToBytesCodecTraits>> = Vec::new();
    if shuffle_helps(values, shapes.shard) {
        codecs.push(Arc::new(ShuffleCodec::new(size_of::<T>())));
    }
    codecs.push(Arc::new(ZstdCodec::new(ZSTD_LEVEL, true)));
    let fill: FillValue = T::default().into();
    let array = ArrayBuilder::new(to_u64(shape), to_u64(shapes.shard), T::data_type(), fill)
        .subchunk_shape(to_u64(shapes.inner))
        .bytes_to_bytes_codecs(codecs)
        .dimension_names(Some(["c", "z", "y", "x"]))
        .build(store_at(folder)?, &node)
        .map_err(|source| ChunkedError::Open {
            path: path.clone(),
            source: Box::new(source),
        })?;
    array.store_metadata().map_err(|source| ChunkedError::Metadata {
        path: path.clone(),
        source: Box::new(source),
    })?;
    // Every shard is stored, also one of fill values, so a missing file always means damage.
    let options = CodecOptions::default().with_store_empty_chunks(true);
    let grid = [0, 1, 2, 3].map(|a| shape[a].div_ceil(shapes.shard[a]));
    shard_indices(grid).into_par_iter().try_for_each(|index| {
        let origin = [0, 1, 2, 3].map(|a| index[a] * shapes.shard[a]);
        let end = [0, 1, 2, 3].map(|a| (origin[a] + shapes.shard[a]).min(shape[a]));
        let mut shard = Array4::<T>::default(shapes.shard);
        shard
            .slice_mut(s![
                ..end[0] - origin[0],
                ..end[1] - origin[1],
                ..end[2] - origin[2],
                ..end[3] - origin[3]
            ])
            .assign(&values.slice(s![
                origin[0]..end[0],
                origin[1]..end[1],
                origin[2]..end[2],
                origin[3]..end[3]
            ]));
        let (elements, _) = shard.into_raw_vec_and_offset();
        let index = to_u64(index);
        array
            .store_chunk_opt(&index, elements, &options)
            .map_err(|source| ChunkedError::Write {
                path: shard_path(folder, &array, &index),
                source: Box::new(source),
            })
    })
}

/// nnU-Net's filter choice (`nnUNetDatasetBlosc2._select_filter`): byte shuffling (bytes of
/// equal significance together) shrinks continuous, resampled intensities and inflates quantized
/// ones, a property of the image with no cheap proxy, so a centred slab of one shard is compressed
/// both ways and the smaller wins; ties and failures go to no shuffling.
fn shuffle_helps<T: Stored>(values: ArrayView4<T>, shard: [usize; 4]) -> bool {
    let size = size_of::<T>();
    if size == 1 || values.is_empty() {
        return false;
    }
    let range = |a: usize| {
        let n = shard[a].min(values.shape()[a]);
        let start = (values.shape()[a] - n) / 2;
        start..start + n
    };
    let slab: Vec<T> = values
        .slice(s![range(0), range(1), range(2), range(3)])
        .iter()
        .copied()
        .collect();
    let raw: &[u8] = bytemuck::cast_slice(&slab);
    let options = CodecOptions::default();
    let zstd = ZstdCodec::new(ZSTD_LEVEL, false);
    let plain = zstd.encode(Cow::Borrowed(raw), &options).map(|c| c.len());
    let shuffled = ShuffleCodec::new(size)
        .encode(Cow::Borrowed(raw), &options)
        .and_then(|bytes| zstd.encode(bytes, &options))
        .map(|c| c.len());
    matches!((plain, shuffled), (Ok(plain), Ok(shuffled)) if shuffled < plain)
}

fn shard_path(folder: &Path, array: &Array<FilesystemStore>, index: &[u64]) -> PathBuf {
    folder.join(array.chunk_key(index).as_str().trim_start_matches('/'))
}

/// An opened array: its metadata read, its shard files all present.
pub struct ChunkedArray {
    array: Array<FilesystemStore>,
    /// The folder the array's path is relative to, for the shard files' names.
    folder: PathBuf,
    /// The array's own folder, for messages.
    path: PathBuf,
    shape: [usize; 4],
    shard: [usize; 4],
}

impl ChunkedArray {
    /// Opens the array `name` under `folder` (`""`: `folder` itself), checking it has four axes
    /// and every shard file.
    pub fn open(folder: &Path, name: &str) -> Result<ChunkedArray, ChunkedError> {
        let (node, path) = node(folder, name);
        if !path.join("zarr.json").is_file() {
            return Err(ChunkedError::Missing { path });
        }
        let array = Array::open(store_at(folder)?, &node).map_err(|source| ChunkedError::Open {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let layout = |found: String| ChunkedError::Layout {
            path: path.clone(),
            expected: "a 4-axis float32, int8 or int16 array".into(),
            found,
        };
        let shape: [usize; 4] = array
            .shape()
            .iter()
            .map(|&n| n as usize)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|shape| layout(format!("shape {shape:?}")))?;
        let shard: [usize; 4] = array
            .chunk_shape(&[0; 4])
            .map_err(|source| ChunkedError::Read {
                path: path.clone(),
                source: Box::new(source),
            })?
            .iter()
            .map(|n| n.get() as usize)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|shape| layout(format!("chunk shape {shape:?}")))?;
        let opened = ChunkedArray {
            array,
            folder: folder.to_path_buf(),
            path,
            shape,
            shard,
        };
        let grid = [0, 1, 2, 3].map(|a| shape[a].div_ceil(shard[a]));
        for index in shard_indices(grid) {
            let file = shard_path(folder, &opened.array, &to_u64(index));
            if !file.is_file() {
                return Err(ChunkedError::MissingChunk { path: file });
            }
        }
        Ok(opened)
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the array holds `T`s.
    pub fn holds<T: Stored>(&self) -> bool {
        *self.array.data_type() == T::data_type()
    }

    fn expect<T: Stored>(&self) -> Result<(), ChunkedError> {
        if self.holds::<T>() {
            return Ok(());
        }
        Err(ChunkedError::Layout {
            path: self.path.clone(),
            expected: format!("{} values", T::NAME),
            found: self.array.data_type().to_string(),
        })
    }

    /// The box `[start, start + shape)`, which must lie inside the array. Reads only the inner
    /// chunks it touches, shard by shard.
    pub fn read_box<T: Stored>(
        &self,
        start: [usize; 4],
        shape: [usize; 4],
    ) -> Result<Array4<T>, ChunkedError> {
        self.expect::<T>()?;
        if (0..4).any(|a| start[a] + shape[a] > self.shape[a]) {
            return Err(ChunkedError::OutOfBounds {
                path: self.path.clone(),
                start: Box::new(start),
                shape: Box::new(shape),
                array: Box::new(self.shape),
            });
        }
        let mut out = Array4::<T>::default(shape);
        if shape.contains(&0) {
            return Ok(out);
        }
        let end = [0, 1, 2, 3].map(|a| start[a] + shape[a]);
        let first = [0, 1, 2, 3].map(|a| start[a] / self.shard[a]);
        let last = [0, 1, 2, 3].map(|a| (end[a] - 1) / self.shard[a]);
        let options = CodecOptions::default();
        let count = [0, 1, 2, 3].map(|a| last[a] - first[a] + 1);
        for offset in shard_indices(count) {
            let index = [0, 1, 2, 3].map(|a| first[a] + offset[a]);
            let origin = [0, 1, 2, 3].map(|a| index[a] * self.shard[a]);
            let lo = [0, 1, 2, 3].map(|a| start[a].max(origin[a]));
            let hi = [0, 1, 2, 3].map(|a| end[a].min(origin[a] + self.shard[a]));
            let size = [0, 1, 2, 3].map(|a| hi[a] - lo[a]);
            let within = ArraySubset::new_with_start_shape(
                to_u64([0, 1, 2, 3].map(|a| lo[a] - origin[a])),
                to_u64(size),
            )
            .expect("four axes");
            let index = to_u64(index);
            let read = |source| ChunkedError::Read {
                path: shard_path(&self.folder, &self.array, &index),
                source: Box::new(source),
            };
            let values: Vec<T> = self
                .array
                .retrieve_chunk_subset_opt(&index, &within, &options)
                .map_err(read)?;
            let values = ArrayView4::from_shape(size, &values).expect("the subset's shape");
            out.slice_mut(s![
                lo[0] - start[0]..hi[0] - start[0],
                lo[1] - start[1]..hi[1] - start[1],
                lo[2] - start[2]..hi[2] - start[2],
                lo[3] - start[3]..hi[3] - start[3]
            ])
            .assign(&values);
        }
        Ok(out)
    }

    /// The whole array.
    pub fn read_all<T: Stored>(&self) -> Result<Array4<T>, ChunkedError> {
        self.read_box([0; 4], self.shape)
    }

    /// A box of labels, stored as int8 or int16, as int16.
    pub fn read_labels_box(&self, start: [usize; 4], shape: [usize; 4]) -> Result<Array4<i16>, ChunkedError> {
        if self.holds::<i8>() {
            Ok(self.read_box::<i8>(start, shape)?.mapv(i16::from))
        } else {
            self.read_box::<i16>(start, shape)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned against nnU-Net 2.8.1's `comp_blosc2_params` (run in its venv).
    #[test]
    fn chunk_shapes_follow_nnunet_blosc2_params() {
        for (image, patch, bytes, block, chunk) in [
            (
                [1, 100, 512, 512],
                vec![80, 192, 160],
                4,
                [1, 16, 64, 32],
                [1, 64, 192, 128],
            ),
            (
                [1, 100, 512, 512],
                vec![80, 192, 160],
                1,
                [1, 32, 64, 64],
                [1, 100, 256, 240],
            ),
            (
                [2, 64, 64, 64],
                vec![128, 128, 128],
                4,
                [1, 32, 32, 32],
                [1, 64, 64, 64],
            ),
            (
                [1, 1, 400, 300],
                vec![384, 320],
                4,
                [1, 1, 256, 128],
                [1, 1, 400, 300],
            ),
            (
                [1, 33, 47, 21],
                vec![32, 48, 16],
                2,
                [1, 32, 47, 16],
                [1, 33, 47, 21],
            ),
            (
                [1, 62, 227, 227],
                vec![64, 160, 160],
                4,
                [1, 16, 64, 32],
                [1, 48, 192, 160],
            ),
            (
                [1, 62, 227, 227],
                vec![64, 160, 160],
                1,
                [1, 32, 64, 64],
                [1, 62, 227, 227],
            ),
        ] {
            assert_eq!(
                blosc2_params(image, &patch, bytes),
                (block, chunk),
                "{image:?} {patch:?} {bytes}"
            );
        }
    }

    /// Shuffling is kept where it shrinks the array: continuous intensities (resampled), not
    /// quantized ones (few distinct values) nor one-byte labels.
    #[test]
    fn byte_shuffling_is_chosen_per_array() {
        let dir = tempfile::tempdir().unwrap();
        let shapes = ChunkShapes::for_patch([1, 16, 32, 32], &[16, 32, 32], 4);
        let smooth = Array4::from_shape_fn((1, 16, 32, 32), |(_, z, y, x)| {
            ((z as f32 * 0.37).sin() + (y as f32 * 0.11).cos() * (x as f32 * 0.05).sin()) * 3.3
        });
        // a CT's integer intensities, normalized: a hundred levels of unrelated mantissas
        let quantized = Array4::from_shape_fn((1, 16, 32, 32), |(_, z, y, x)| {
            let level = (z * 7919 + y * 104_729 + x * 1_299_709) * 2_654_435_761 % 100;
            (level as f32 - 50.0) / 7.3
        });
        let labels = Array4::from_shape_fn((1, 16, 32, 32), |(_, z, y, _)| (z * y % 3) as i8);
        write(dir.path(), "smooth", smooth.view(), shapes).unwrap();
        write(dir.path(), "quantized", quantized.view(), shapes).unwrap();
        write(dir.path(), "labels", labels.view(), shapes).unwrap();
        let shuffled = |name: &str| {
            std::fs::read_to_string(dir.path().join(name).join("zarr.json"))
                .unwrap()
                .contains("numcodecs.shuffle")
        };
        assert!(shuffled("smooth"));
        assert!(!shuffled("quantized"));
        assert!(!shuffled("labels"));
        let read = ChunkedArray::open(dir.path(), "smooth").unwrap();
        assert_eq!(read.read_all::<f32>().unwrap(), smooth);
        let read = ChunkedArray::open(dir.path(), "quantized").unwrap();
        assert_eq!(read.read_all::<f32>().unwrap(), quantized);
    }

    #[test]
    fn shards_are_whole_inner_chunks() {
        let shapes = ChunkShapes::for_patch([1, 33, 47, 21], &[32, 48, 16], 2);
        assert_eq!(shapes.inner, [1, 32, 47, 16]);
        assert_eq!(shapes.shard, [1, 64, 47, 32]);
    }
}
