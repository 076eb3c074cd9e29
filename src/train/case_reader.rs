//! One preprocessed case opened for training: its arrays' chunk layout read once and their chunk
//! files checked, its class locations in memory. A crop reads and decodes only the chunks the
//! patch touches ([`crate::data::chunked`]), never the whole case.

use std::path::Path;

use ndarray::{s, Array4};

use crate::augment::Sample;
use crate::data::case_store::{open_case, open_labels, read_properties, CaseStoreError};
use crate::data::chunked::{ChunkedArray, ChunkedError};
use crate::train::TrainError;

pub struct CaseReader {
    pub id: String,
    data: ChunkedArray,
    seg: ChunkedArray,
    /// The cascade's previous-stage segmentation, cropped along as a second seg channel.
    previous_stage: Option<ChunkedArray>,
    /// (channels, z, y, x)
    pub shape: [usize; 4],
    /// Foreground classes with at least one location, and the ignore-label "annotated" key if any.
    pub class_locations: Vec<(String, Vec<[usize; 4]>)>,
}

impl CaseReader {
    pub fn open(folder: &Path, id: &str) -> Result<CaseReader, TrainError> {
        let opened = open_case(folder, id)?;
        let seg = opened
            .seg
            .ok_or_else(|| CaseStoreError::NoSegmentation { case: id.to_string() })?;
        let properties = read_properties(folder, id)?;
        let class_locations = properties
            .class_locations
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Ok(CaseReader {
            id: id.to_string(),
            shape: opened.data.shape(),
            data: opened.data,
            seg,
            previous_stage: None,
            class_locations,
        })
    }

    /// Adds the cascade's previous-stage segmentation of this case (on the same grid), the label
    /// array at `path`.
    pub fn with_previous_stage(mut self, path: &Path) -> Result<CaseReader, TrainError> {
        let error = |source| TrainError::PreviousStageLabels {
            case: self.id.clone(),
            source,
        };
        let labels = open_labels(path).map_err(error)?;
        if labels.shape()[1..] != self.shape[1..] {
            return Err(error(ChunkedError::Layout {
                path: path.to_path_buf(),
                expected: format!("labels on the case's grid {:?}", &self.shape[1..]),
                found: format!("shape {:?}", labels.shape()),
            }));
        }
        self.previous_stage = Some(labels);
        Ok(self)
    }

    /// Copies `[lb, lb + size)` per spatial axis, padding outside the case (data 0, seg -1). The
    /// previous-stage segmentation, if any, becomes seg channel 1.
    pub fn crop(&self, lb: [i64; 3], size: [usize; 3]) -> Result<Sample, TrainError> {
        let channels = self.shape[0];
        let mut data = Array4::<f32>::zeros((channels, size[0], size[1], size[2]));
        let seg_channels = 1 + usize::from(self.previous_stage.is_some());
        let mut seg = Array4::<i16>::from_elem((seg_channels, size[0], size[1], size[2]), -1);
        // the part of the crop inside the case, in case and in crop coordinates
        let lo = [0, 1, 2].map(|d| lb[d].max(0) as usize);
        let hi = [0, 1, 2].map(|d| (lb[d] + size[d] as i64).clamp(0, self.shape[d + 1] as i64) as usize);
        if (0..3).any(|d| lo[d] >= hi[d]) {
            return Ok(Sample { data, seg });
        }
        let extent = [0, 1, 2].map(|d| hi[d] - lo[d]);
        let at = [0, 1, 2].map(|d| (lo[d] as i64 - lb[d]) as usize);
        let inside = s![
            ..,
            at[0]..at[0] + extent[0],
            at[1]..at[1] + extent[1],
            at[2]..at[2] + extent[2]
        ];
        let read = |source| {
            TrainError::CaseStore(CaseStoreError::Chunked {
                case: self.id.clone(),
                source,
            })
        };
        let start = [0, lo[0], lo[1], lo[2]];
        let image = self
            .data
            .read_box::<f32>(start, [channels, extent[0], extent[1], extent[2]])
            .map_err(read)?;
        data.slice_mut(inside).assign(&image);
        let labels_shape = [1, extent[0], extent[1], extent[2]];
        let labels = self.seg.read_labels_box(start, labels_shape).map_err(read)?;
        seg.slice_mut(s![0..1, .., .., ..])
            .slice_mut(inside)
            .assign(&labels);
        if let Some(previous) = &self.previous_stage {
            let labels = previous.read_labels_box(start, labels_shape).map_err(|source| {
                TrainError::PreviousStageLabels {
                    case: self.id.clone(),
                    source,
                }
            })?;
            seg.slice_mut(s![1..2, .., .., ..])
                .slice_mut(inside)
                .assign(&labels);
        }
        Ok(Sample { data, seg })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::case_store::{sample_properties as properties, write_case, write_labels, StoredCase};
    use crate::data::chunked::ChunkShapes;

    /// The crop of the full arrays, as the memory-mapped reader made it: zeros and -1 outside.
    fn crop_of_full(data: &Array4<f32>, seg: &Array4<i16>, lb: [i64; 3], size: [usize; 3]) -> Sample {
        let c = data.shape()[0];
        let mut out = Array4::<f32>::zeros((c, size[0], size[1], size[2]));
        let mut labels = Array4::<i16>::from_elem((seg.shape()[0], size[0], size[1], size[2]), -1);
        for z in 0..size[0] {
            for y in 0..size[1] {
                for x in 0..size[2] {
                    let p = [lb[0] + z as i64, lb[1] + y as i64, lb[2] + x as i64];
                    if (0..3).any(|d| p[d] < 0 || p[d] >= data.shape()[d + 1] as i64) {
                        continue;
                    }
                    let p = p.map(|v| v as usize);
                    for ch in 0..c {
                        out[[ch, z, y, x]] = data[[ch, p[0], p[1], p[2]]];
                    }
                    for ch in 0..seg.shape()[0] {
                        labels[[ch, z, y, x]] = seg[[ch, p[0], p[1], p[2]]];
                    }
                }
            }
        }
        Sample {
            data: out,
            seg: labels,
        }
    }

    /// Crops from the chunked store equal crops of the full arrays, inside, across chunk and shard
    /// borders and hanging over every side (padded), with the previous stage as seg channel 1.
    #[test]
    fn crops_from_chunks_equal_crops_of_the_full_arrays() {
        let dir = tempfile::tempdir().unwrap();
        // odd sizes, no multiple of the chunks; a patch whose chunks split the case several ways
        let (z, y, x) = (21, 37, 29);
        let data = Array4::from_shape_fn((2, z, y, x), |(c, i, j, k)| {
            (c * 100_000 + i * 1000 + j * 10 + k) as f32 * 0.5 - 3.0
        });
        let seg = Array4::from_shape_fn((1, z, y, x), |(_, i, j, k)| ((i + 2 * j + 3 * k) % 5) as i16 - 1);
        let previous = Array4::from_shape_fn((1, z, y, x), |(_, i, j, k)| ((i * j + k) % 3) as i16);
        let patch = [8, 16, 8];
        let shapes = ChunkShapes::for_patch([2, z, y, x], &patch, 4);
        assert!(
            shapes.shard[1] < z && shapes.inner[2] < shapes.shard[2],
            "{shapes:?}"
        );
        let case = StoredCase {
            data: data.clone(),
            seg: Some(seg.clone()),
            properties: properties(),
        };
        write_case(dir.path(), "c", &case, &patch).unwrap();
        let previous_path = dir.path().join("previous/c.zarr");
        write_labels(&previous_path, previous.view(), &patch).unwrap();
        let reader = CaseReader::open(dir.path(), "c")
            .unwrap()
            .with_previous_stage(&previous_path)
            .unwrap();
        assert_eq!(reader.shape, [2, z, y, x]);
        assert_eq!(reader.class_locations, [("1".to_string(), vec![[0, 1, 2, 3]])]);
        let both = ndarray::concatenate(ndarray::Axis(0), &[seg.view(), previous.view()]).unwrap();
        for (lb, size) in [
            ([0, 0, 0], [z, y, x]),
            ([3, 5, 7], [8, 16, 8]),
            ([7, 15, 7], [10, 20, 12]),
            ([-4, -6, -3], [12, 20, 9]),
            ([15, 30, 25], [12, 20, 9]),
            ([-2, -3, -1], [z + 5, y + 7, x + 3]),
            ([30, 0, 0], [4, 4, 4]),
            ([0, -10, 0], [4, 4, 4]),
        ] {
            let ours = reader.crop(lb, size).unwrap();
            let expected = crop_of_full(&data, &both, lb, size);
            assert_eq!(ours.data, expected.data, "{lb:?} {size:?}");
            assert_eq!(ours.seg, expected.seg, "{lb:?} {size:?}");
        }
    }

    #[test]
    fn a_previous_stage_on_another_grid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let case = StoredCase {
            data: Array4::zeros((1, 4, 5, 6)),
            seg: Some(Array4::zeros((1, 4, 5, 6))),
            properties: properties(),
        };
        write_case(dir.path(), "c", &case, &[4, 4, 4]).unwrap();
        let path = dir.path().join("p.zarr");
        write_labels(&path, Array4::zeros((1, 4, 5, 7)).view(), &[4, 4, 4]).unwrap();
        let reader = CaseReader::open(dir.path(), "c").unwrap();
        let err = reader.with_previous_stage(&path).err().unwrap().to_string();
        assert!(
            err.contains("case c: previous stage") && err.contains("p.zarr"),
            "{err}"
        );
    }
}
