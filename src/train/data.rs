//! Batches for the training thread: patches drawn by the sampler, augmented on a pool of worker
//! threads, and handed over a bounded channel in a fixed order, so the model's thread never waits
//! on augmentation it could have overlapped and the result never depends on thread timing.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rayon::prelude::*;

use super::sampler::PatchSampler;
use crate::augment::cascade::move_previous_stage_to_data;
use crate::augment::seg::downsample_seg;
use crate::augment::spatial::center_crop;
use crate::augment::{Pipeline, Sample, SampleRng};
use crate::train::TrainError;

/// A batch as plain arrays (tensors are made on the model's thread).
pub struct Batch {
    /// (batch, channels, z, y, x) flattened.
    pub data: Vec<f32>,
    pub data_shape: [usize; 5],
    /// Per deep-supervision scale, flattened with its shape: labels (batch, 1, z, y, x), or for
    /// region training one 0/1 channel per region (plus the ignore label's last).
    pub targets: Vec<(Vec<i16>, [usize; 5])>,
}

/// Which batch to make: training (augmented) or validation (patch-size crops, no augmentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    Train,
    Validation,
}

/// A distinct stream for each use of the (seed, epoch, index) space.
const SAMPLER_STREAM: u64 = 0x5a3d_1e00;
const VALIDATION_STREAM: u64 = 0x7a11_da7e;

pub struct BatchMaker {
    pub train: PatchSampler,
    pub validation: PatchSampler,
    pub augment: Pipeline,
    /// Applied to validation patches (nnU-Net's validation transforms: remove label -1 -> 0).
    pub validation_transforms: Pipeline,
    pub scales: Vec<[f64; 3]>,
    pub seed: u64,
    /// Region training: the label values of each region, the ignore label's own region last
    /// (nnU-Net's `ConvertSegmentationToRegionsTransform`); `None` trains on labels.
    pub regions: Option<Vec<Vec<i16>>>,
    /// The cascade: the foreground labels whose one-hot channels of the previous stage's
    /// segmentation (seg channel 1 of the samples) are appended to the image after augmentation.
    pub previous_stage_labels: Option<Vec<i16>>,
}

impl BatchMaker {
    pub fn make(&self, phase: Phase, epoch: usize, iteration: usize) -> Result<Batch, TrainError> {
        let (sampler, pipeline, seed) = match phase {
            Phase::Train => (&self.train, &self.augment, self.seed),
            Phase::Validation => (
                &self.validation,
                &self.validation_transforms,
                self.seed ^ VALIDATION_STREAM,
            ),
        };
        let mut rng = SampleRng::new(seed, epoch as u64, iteration as u64).fork(SAMPLER_STREAM);
        let crops = sampler.draw(&mut rng)?;
        let first = (iteration * sampler.batch_size) as u64;
        let samples: Vec<Sample> = crops
            .into_par_iter()
            .enumerate()
            .map(|(j, (_, sample))| {
                let rng = SampleRng::new(seed, epoch as u64, first + j as u64);
                let patch = to_network_patch(pipeline.apply(sample, &rng)?, sampler.patch_size);
                match &self.previous_stage_labels {
                    Some(labels) => move_previous_stage_to_data(patch, labels),
                    None => Ok(patch),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(assemble(&samples, &self.scales, self.regions.as_deref()))
    }
}

/// What every training patch needs whatever the augmentation list: the network's patch size (a list
/// without the spatial transform leaves the enlarged crop, cut centrally here) and no -1 outside
/// the nonzero mask (background for the loss, as nnU-Net's `RemoveLabelTransform`).
fn to_network_patch(mut sample: Sample, patch: [usize; 3]) -> Sample {
    let shape = sample.data.shape();
    if shape[1..] != patch {
        sample = center_crop(&sample, patch, -1);
    }
    sample.seg.mapv_inplace(|v| v.max(0));
    sample
}

fn assemble(samples: &[Sample], scales: &[[f64; 3]], regions: Option<&[Vec<i16>]>) -> Batch {
    let b = samples.len();
    let s0 = samples[0].data.shape();
    let data_shape = [b, s0[0], s0[1], s0[2], s0[3]];
    let mut data = Vec::with_capacity(data_shape.iter().product());
    for s in samples {
        data.extend(s.data.iter());
    }
    let per_sample: Vec<Vec<ndarray::Array4<i16>>> = samples
        .iter()
        .map(|s| downsample_seg(s.seg.view(), scales))
        .collect();
    let targets = (0..scales.len())
        .map(|k| {
            let shape = per_sample[0][k].shape();
            let channels = regions.map_or(1, |r| r.len());
            let target_shape = [b, channels, shape[1], shape[2], shape[3]];
            let mut labels = Vec::with_capacity(target_shape.iter().product());
            for sample in &per_sample {
                let seg = sample[k].index_axis(ndarray::Axis(0), 0);
                match regions {
                    None => labels.extend(seg.iter()),
                    Some(regions) => {
                        for region in regions {
                            labels.extend(seg.iter().map(|v| i16::from(region.contains(v))));
                        }
                    }
                }
            }
            (labels, target_shape)
        })
        .collect();
    Batch {
        data,
        data_shape,
        targets,
    }
}

/// Produces the batches of epochs `first_epoch..epochs` in training order (each epoch's training
/// batches, then its validation batches) on `threads` threads, at most `prefetch` ahead. Dropping
/// the receiver stops the producer.
pub fn spawn_producer(
    maker: Arc<BatchMaker>,
    first_epoch: usize,
    epochs: usize,
    iterations: usize,
    val_iterations: usize,
    threads: usize,
    prefetch: usize,
) -> Receiver<Result<Batch, TrainError>> {
    let (sender, receiver) = sync_channel(prefetch);
    std::thread::spawn(move || {
        let pool = match rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
        {
            Ok(pool) => pool,
            Err(e) => {
                let _ = sender.send(Err(TrainError::AugmentationThreads(e)));
                return;
            }
        };
        for epoch in first_epoch..epochs {
            let work = (0..iterations)
                .map(|i| (Phase::Train, i))
                .chain((0..val_iterations).map(|i| (Phase::Validation, i)));
            for (phase, iteration) in work {
                let batch = pool.install(|| maker.make(phase, epoch, iteration));
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    return;
                }
            }
        }
    });
    receiver
}
