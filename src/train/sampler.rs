//! nnU-Net's training patch sampler (`nnUNetDataLoader`) over memory-mapped preprocessed cases.
//!
//! A batch picks `batch_size` cases uniformly with replacement. Sample `j` is forced to contain
//! foreground when `j >= round(batch_size * (1 - oversample))` (the last third by default): it is
//! centred on a stored location of a randomly chosen class present in the case. Other samples are
//! placed uniformly, allowing the patch to hang over the border by half the padding nnU-Net
//! computes (`need_to_pad`). The crop is the enlarged patch the spatial augmentation needs; outside
//! the image, data is 0 and the segmentation -1. Two-dimensional configurations sample one slice
//! (patch depth 1). The randomness comes from the sample's own stream, so a batch depends only on
//! (seed, epoch, iteration), never on thread timing.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::Array4;

use crate::augment::{Sample, SampleRng};
use crate::data::case_store::read_properties;
use crate::data::npy::{parse_header, HeaderError};
use crate::file_error::FileError;
use crate::train::TrainError;

/// One preprocessed case: its arrays mapped from disk, its class locations in memory.
pub struct MappedCase {
    pub id: String,
    data: Mmap,
    data_offset: usize,
    seg: MappedLabels,
    /// The cascade's previous-stage segmentation, cropped along as a second seg channel.
    previous_stage: Option<MappedLabels>,
    /// (channels, z, y, x)
    pub shape: [usize; 4],
    /// Foreground classes with at least one location, and the ignore-label "annotated" key if any.
    class_locations: Vec<(String, Vec<[usize; 4]>)>,
}

/// What is wrong with one memory-mapped `.npy` array of a preprocessed case; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum MappedArrayError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: {source}", .path.display())]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{}: expected 4 axes, got {shape:?}", .path.display())]
    Axes { path: PathBuf, shape: Vec<usize> },
    #[error("{}: labels of shape {shape:?} do not match the image's (z, y, x) {spatial:?}", .path.display())]
    LabelShape {
        path: PathBuf,
        shape: Vec<usize>,
        spatial: Vec<usize>,
    },
    #[error("{}: truncated", .path.display())]
    Truncated { path: PathBuf },
    #[error("{}: truncated or misaligned", .path.display())]
    TruncatedOrMisaligned { path: PathBuf },
}

fn map(path: &Path) -> Result<Mmap, MappedArrayError> {
    let file = File::open(path).map_err(FileError::io(path))?;
    // SAFETY: preprocessed outputs are written once and renamed into place, never modified after;
    // the mapping is read-only.
    Ok(unsafe { Mmap::map(&file) }.map_err(FileError::io(path))?)
}

/// For `map_err`: `parse_header`'s error, with the file.
fn header(path: &Path) -> impl FnOnce(HeaderError) -> MappedArrayError + '_ {
    move |source| MappedArrayError::Header {
        path: path.to_path_buf(),
        source,
    }
}

/// A `(1, z, y, x)` label array (int8 or int16 `.npy`) mapped from disk.
struct MappedLabels {
    map: Mmap,
    offset: usize,
    is_i8: bool,
}

impl MappedLabels {
    /// Maps `path`, checking it holds `(1, z, y, x)` labels of this spatial shape.
    fn open(path: &Path, spatial: &[usize]) -> Result<MappedLabels, MappedArrayError> {
        let map = map(path)?;
        let (shape, offset, is_i8) = match parse_header(&map, "|i1") {
            Ok((s, o)) => (s, o, true),
            Err(_) => {
                let (s, o) = parse_header(&map, "<i2").map_err(header(path))?;
                (s, o, false)
            }
        };
        if shape.len() != 4 || shape[0] != 1 || shape[1..] != *spatial {
            return Err(MappedArrayError::LabelShape {
                path: path.to_path_buf(),
                shape,
                spatial: spatial.to_vec(),
            });
        }
        let bytes = if is_i8 { 1 } else { 2 };
        if map.len() < offset + spatial.iter().product::<usize>() * bytes {
            return Err(MappedArrayError::Truncated {
                path: path.to_path_buf(),
            });
        }
        Ok(MappedLabels { map, offset, is_i8 })
    }

    fn at(&self, flat: usize) -> i16 {
        if self.is_i8 {
            self.map[self.offset + flat] as i8 as i16
        } else {
            let at = self.offset + 2 * flat;
            i16::from_le_bytes([self.map[at], self.map[at + 1]])
        }
    }
}

/// Maps a case's `(channels, z, y, x)` float32 image; returns it with its shape and data offset.
fn map_data(path: &Path) -> Result<(Mmap, [usize; 4], usize), MappedArrayError> {
    let data = map(path)?;
    let (shape, offset) = parse_header(&data, "<f4").map_err(header(path))?;
    let shape: [usize; 4] = shape.try_into().map_err(|shape| MappedArrayError::Axes {
        path: path.to_path_buf(),
        shape,
    })?;
    let expected = offset + shape.iter().product::<usize>() * 4;
    if data.len() < expected || offset % 4 != 0 {
        return Err(MappedArrayError::TruncatedOrMisaligned {
            path: path.to_path_buf(),
        });
    }
    Ok((data, shape, offset))
}

impl MappedCase {
    pub fn open(folder: &Path, id: &str) -> Result<MappedCase, TrainError> {
        let data_path = folder.join(format!("{id}_data.npy"));
        let seg_path = folder.join(format!("{id}_seg.npy"));
        let (data, shape, data_offset) = map_data(&data_path).map_err(TrainError::CaseData)?;
        let seg = MappedLabels::open(&seg_path, &shape[1..]).map_err(|source| TrainError::CaseLabels {
            case: id.to_string(),
            source,
        })?;
        let properties = read_properties(folder, id)?;
        let class_locations = properties
            .class_locations
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Ok(MappedCase {
            id: id.to_string(),
            data,
            data_offset,
            seg,
            previous_stage: None,
            shape,
            class_locations,
        })
    }

    /// Adds the cascade's previous-stage segmentation of this case (on the same grid).
    pub fn with_previous_stage(mut self, path: &Path) -> Result<MappedCase, TrainError> {
        let labels =
            MappedLabels::open(path, &self.shape[1..]).map_err(|source| TrainError::PreviousStageLabels {
                case: self.id.clone(),
                source,
            })?;
        self.previous_stage = Some(labels);
        Ok(self)
    }

    fn data(&self) -> &[f32] {
        let n = self.shape.iter().product::<usize>();
        bytemuck::cast_slice(&self.data[self.data_offset..self.data_offset + n * 4])
    }

    /// Copies `[lb, lb + size)` per spatial axis, padding outside the case (data 0, seg -1). The
    /// previous-stage segmentation, if any, becomes seg channel 1.
    pub fn crop(&self, lb: [i64; 3], size: [usize; 3]) -> Sample {
        let [c, dz, dy, dx] = self.shape;
        let data = self.data();
        let mut out = Array4::<f32>::zeros((c, size[0], size[1], size[2]));
        let labels: Vec<&MappedLabels> = std::iter::once(&self.seg).chain(&self.previous_stage).collect();
        let mut seg = Array4::<i16>::from_elem((labels.len(), size[0], size[1], size[2]), -1);
        // the x-run that lies inside the case, shared by every row
        let x0 = lb[2].max(0);
        let x1 = (lb[2] + size[2] as i64).min(dx as i64);
        for z in 0..size[0] {
            let sz = lb[0] + z as i64;
            if sz < 0 || sz >= dz as i64 {
                continue;
            }
            for y in 0..size[1] {
                let sy = lb[1] + y as i64;
                if sy < 0 || sy >= dy as i64 || x0 >= x1 {
                    continue;
                }
                let row = (sz as usize * dy + sy as usize) * dx;
                let (from, to) = (row + x0 as usize, row + x1 as usize);
                let at = (x0 - lb[2]) as usize;
                for ch in 0..c {
                    let src = &data[ch * dz * dy * dx + from..ch * dz * dy * dx + to];
                    out.slice_mut(ndarray::s![ch, z, y, at..at + src.len()])
                        .as_slice_mut()
                        .expect("contiguous row")
                        .copy_from_slice(src);
                }
                for (channel, source) in labels.iter().enumerate() {
                    let mut seg_row = seg.slice_mut(ndarray::s![channel, z, y, at..at + (to - from)]);
                    for (i, v) in seg_row.iter_mut().enumerate() {
                        *v = source.at(from + i);
                    }
                }
            }
        }
        Sample { data: out, seg }
    }
}

pub struct PatchSampler {
    pub cases: Vec<MappedCase>,
    /// The crop size (nnU-Net's `patch_size` of the loader: the enlarged patch for training).
    pub crop_size: [usize; 3],
    /// The network's patch; `crop_size - patch_size` is the padding allowance.
    pub patch_size: [usize; 3],
    pub batch_size: usize,
    pub oversample_foreground: f64,
    pub has_ignore_label: bool,
}

impl PatchSampler {
    /// Whether sample `j` of a batch must contain foreground.
    pub fn force_foreground(&self, j: usize) -> bool {
        let random_count = (self.batch_size as f64 * (1.0 - self.oversample_foreground)).round_ties_even();
        (j as f64) >= random_count
    }

    /// One batch of crops (before augmentation). `rng` is the batch's own stream.
    pub fn draw(&self, rng: &mut SampleRng) -> Vec<(usize, Sample)> {
        (0..self.batch_size)
            .map(|j| {
                let case_index = (rng.next_u64() % self.cases.len() as u64) as usize;
                let case = &self.cases[case_index];
                let lb = self.bbox_lower(case, self.force_foreground(j), rng);
                (case_index, case.crop(lb, self.crop_size))
            })
            .collect()
    }

    /// nnU-Net's `get_bbox`: the lower corner of the crop.
    pub fn bbox_lower(&self, case: &MappedCase, force_fg: bool, rng: &mut SampleRng) -> [i64; 3] {
        let shape = [case.shape[1], case.shape[2], case.shape[3]];
        let mut lbs = [0i64; 3];
        let mut ubs = [0i64; 3];
        for d in 0..3 {
            let mut need = self.crop_size[d] as i64 - self.patch_size[d] as i64;
            if need + (shape[d] as i64) < self.crop_size[d] as i64 {
                need = self.crop_size[d] as i64 - shape[d] as i64;
            }
            // Python's `-need // 2` floors the negated value
            lbs[d] = (-need).div_euclid(2);
            ubs[d] = shape[d] as i64 + need / 2 + need % 2 - self.crop_size[d] as i64;
        }
        let uniform = |rng: &mut SampleRng| -> [i64; 3] {
            [0, 1, 2].map(|d| lbs[d] + (rng.next_u64() % (ubs[d] - lbs[d] + 1) as u64) as i64)
        };
        if !force_fg && !self.has_ignore_label {
            return uniform(rng);
        }
        let annotated = |key: &str| key.starts_with("[-1");
        let eligible: Vec<&(String, Vec<[usize; 4]>)> = if force_fg {
            let fg: Vec<_> = case
                .class_locations
                .iter()
                .filter(|(k, _)| !annotated(k))
                .collect();
            // only the annotated-voxels key left: nnU-Net then samples from it
            if fg.is_empty() {
                case.class_locations.iter().collect()
            } else {
                fg
            }
        } else {
            case.class_locations
                .iter()
                .filter(|(k, _)| annotated(k))
                .collect()
        };
        if eligible.is_empty() {
            return uniform(rng);
        }
        let (_, voxels) = eligible[(rng.next_u64() % eligible.len() as u64) as usize];
        let voxel = voxels[(rng.next_u64() % voxels.len() as u64) as usize];
        [0, 1, 2].map(|d| lbs[d].max(voxel[d + 1] as i64 - (self.crop_size[d] / 2) as i64))
    }
}

/// Per-class location counts of the mapped cases, for the log.
pub fn class_location_summary(cases: &[MappedCase]) -> BTreeMap<String, usize> {
    let mut summary = BTreeMap::new();
    for case in cases {
        for (key, voxels) in &case.class_locations {
            *summary.entry(key.clone()).or_default() += voxels.len();
        }
    }
    summary
}
