//! A trained network applied to a whole preprocessed image: sliding windows, each window predicted
//! with mirroring test-time augmentation as nnU-Net's `_internal_maybe_mirror_and_predict` does it
//! (the prediction averaged with the un-flipped predictions of every non-empty combination of the
//! allowed mirror axes). On CUDA the image is uploaded once and the weighted sums accumulate on the
//! device in fp16, as nnU-Net's `perform_everything_on_device`; if that fails (out of memory) the
//! sums accumulate on the host instead (float32, the CPU path). libtorch code: worker only.

use ndarray::{Array4, ArrayView4};
use tch::{Device, Kind, Tensor};

use nnflow::inference::sliding_window::{
    gaussian_importance_map, is_2d_patch, pad_to_patch, sliding_window_slicers, SlidingWindow,
    SlidingWindowError, SIGMA_SCALE, VALUE_SCALING_FACTOR,
};

use crate::network::Network;

/// Why a whole-image prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// The network's output does not have the shape of the logits.
    #[error(transparent)]
    Shape(#[from] ndarray::ShapeError),
    #[error("infinite logits")]
    InfiniteLogits,
    #[error(transparent)]
    SlidingWindow(#[from] SlidingWindowError<ndarray::ShapeError>),
}

pub struct Predictor<'a> {
    /// With deep supervision switched off (one output).
    pub net: &'a Network,
    pub device: Device,
    pub window: SlidingWindow,
    /// Mirror axes among the network's spatial axes (3D: 0 = z, 1 = y, 2 = x; 2D: 0 = y, 1 = x).
    pub mirror_axes: Vec<usize>,
    /// fp16 autocast (CUDA only).
    pub amp: bool,
}

impl Predictor<'_> {
    /// Averaged logits `(classes, z, y, x)` for a `(channels, z, y, x)` image.
    pub fn predict_logits(&self, image: ArrayView4<f32>) -> Result<Array4<f32>, PredictorError> {
        if self.device.is_cuda() {
            match self.predict_on_device(image) {
                Ok(logits) => return Ok(logits),
                Err(error) => eprintln!("accumulating on the GPU failed ({error}); accumulating on the CPU"),
            }
        }
        self.predict_on_host(image)
    }

    /// The sliding window with the sums kept on `self.device` (fp16 on CUDA, float32 elsewhere).
    pub fn predict_on_device(&self, image: ArrayView4<f32>) -> Result<Array4<f32>, PredictorError> {
        let patch = self.window.patch;
        let classes = self.net.architecture().num_classes as i64;
        let two_d = self.net.architecture().spatial_dims == 2;
        let kind = if self.device.is_cuda() {
            Kind::Half
        } else {
            Kind::Float
        };
        let (padded, padding) = pad_to_patch(image, patch);
        let padded = padded.as_standard_layout();
        let shape: Vec<i64> = padded.shape().iter().map(|&d| d as i64).collect();
        let [c, sz, sy, sx] = [shape[0], shape[1], shape[2], shape[3]];
        let weights_2d = if is_2d_patch(patch) {
            &patch[1..]
        } else {
            &patch[..]
        };
        let gaussian: Vec<f32> = if self.window.use_gaussian {
            gaussian_importance_map(weights_2d, SIGMA_SCALE, VALUE_SCALING_FACTOR)
                .iter()
                .copied()
                .collect()
        } else {
            vec![1.0; patch.iter().product()]
        };
        let p = patch.map(|d| d as i64);
        tch::no_grad(|| -> Result<Array4<f32>, PredictorError> {
            let g = Tensor::from_slice(&gaussian)
                .view([1, p[0], p[1], p[2]])
                .to_device(self.device)
                .to_kind(kind);
            let image = Tensor::from_slice(padded.as_slice().expect("standard layout"))
                .view([c, sz, sy, sx])
                .f_to_device(self.device)?;
            let mut sums = Tensor::f_zeros([classes, sz, sy, sx], (kind, self.device))?;
            let counts = Tensor::f_zeros([1, sz, sy, sx], (kind, self.device))?;
            let spatial = [sz as usize, sy as usize, sx as usize];
            for s in sliding_window_slicers(spatial, patch, self.window.step_size) {
                let window = |t: &Tensor| {
                    t.narrow(1, s.start[0] as i64, p[0])
                        .narrow(2, s.start[1] as i64, p[1])
                        .narrow(3, s.start[2] as i64, p[2])
                };
                let mut x = window(&image).unsqueeze(0);
                if two_d {
                    x = x.squeeze_dim(2);
                }
                let mut prediction = self.mirrored(&x.contiguous());
                if two_d {
                    prediction = prediction.unsqueeze(2);
                }
                let weighted = (prediction.squeeze_dim(0) * &g).to_kind(kind);
                let _ = window(&sums).f_add_(&weighted)?;
                let _ = window(&counts).f_add_(&g)?;
            }
            sums /= &counts;
            let logits = sums.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
            let mut out = vec![0f32; logits.numel()];
            logits.copy_data(&mut out, logits.numel());
            let full = Array4::from_shape_vec((classes as usize, spatial[0], spatial[1], spatial[2]), out)?;
            if full.iter().any(|v| v.is_infinite()) {
                return Err(PredictorError::InfiniteLogits);
            }
            Ok(if padding.is_none() {
                full
            } else {
                padding.unpad(full.view()).to_owned()
            })
        })
    }

    /// The sliding window with the sums kept on the host in float32 (nnflow's checked reference
    /// implementation of nnU-Net's accumulation).
    pub fn predict_on_host(&self, image: ArrayView4<f32>) -> Result<Array4<f32>, PredictorError> {
        let classes = self.net.architecture().num_classes;
        let two_d = self.net.architecture().spatial_dims == 2;
        tch::no_grad(|| {
            self.window
                .predict(
                    image,
                    classes,
                    |patch: ArrayView4<f32>| -> Result<Array4<f32>, ndarray::ShapeError> {
                        let shape = patch.shape().to_vec();
                        let data: Vec<f32> = patch.iter().copied().collect();
                        let mut dims: Vec<i64> = std::iter::once(1)
                            .chain(shape.iter().map(|&d| d as i64))
                            .collect();
                        if two_d {
                            dims.remove(2);
                        }
                        let x = Tensor::from_slice(&data)
                            .view(dims.as_slice())
                            .to_device(self.device);
                        let logits = self
                            .mirrored(&x)
                            .to_kind(Kind::Float)
                            .to_device(Device::Cpu)
                            .contiguous();
                        let mut out = vec![0f32; logits.numel()];
                        logits.copy_data(&mut out, logits.numel());
                        Array4::from_shape_vec((classes, shape[1], shape[2], shape[3]), out)
                    },
                )
                .map_err(PredictorError::from)
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        tch::autocast(self.amp, || self.net.forward(x).swap_remove(0))
    }

    fn mirrored(&self, x: &Tensor) -> Tensor {
        let mut prediction = self.forward(x).to_kind(Kind::Float);
        let axes: Vec<i64> = self.mirror_axes.iter().map(|&a| a as i64 + 2).collect();
        let combinations = non_empty_subsets(&axes);
        for flip in &combinations {
            prediction += self
                .forward(&x.flip(flip.as_slice()))
                .flip(flip.as_slice())
                .to_kind(Kind::Float);
        }
        prediction / (combinations.len() + 1) as f64
    }
}

/// Every non-empty subset, by size then in order (itertools.combinations for sizes 1..=n).
fn non_empty_subsets(axes: &[i64]) -> Vec<Vec<i64>> {
    let mut subsets = Vec::new();
    for size in 1..=axes.len() {
        let mut pick: Vec<usize> = (0..size).collect();
        loop {
            subsets.push(pick.iter().map(|&i| axes[i]).collect());
            // next combination in lexicographic order
            let Some(i) = (0..size).rev().find(|&i| pick[i] != i + axes.len() - size) else {
                break;
            };
            pick[i] += 1;
            for j in i + 1..size {
                pick[j] = pick[j - 1] + 1;
            }
        }
    }
    subsets
}

#[cfg(test)]
mod tests {
    use super::*;
    use nnflow::network::Architecture;

    #[test]
    fn device_and_host_accumulation_agree() {
        let plan = serde_json::from_value(serde_json::json!({
            "network_class_name": "PlainConvUNet",
            "arch_kwargs": {
                "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": true,
                "norm_op": "InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": true},
                "dropout_op": null, "nonlin": "LeakyReLU", "nonlin_kwargs": {"inplace": true}
            }
        }))
        .unwrap();
        let arch = Architecture::from_plan(&plan, 1, 3, false).unwrap();
        let (_vs, net) = crate::trainer::build_network(&arch, Device::Cpu, 7);
        let image = Array4::from_shape_fn((1, 10, 13, 19), |(_, z, y, x)| {
            ((z * 7 + y * 3 + x) % 11) as f32 / 5.0
        });
        for mirror_axes in [vec![], vec![0, 1, 2]] {
            let predictor = Predictor {
                net: &net,
                device: Device::Cpu,
                window: SlidingWindow::new([8, 8, 8]),
                mirror_axes,
                amp: false,
            };
            let host = predictor.predict_on_host(image.view()).unwrap();
            let device = predictor.predict_on_device(image.view()).unwrap();
            let diff = (&host - &device).mapv(f32::abs).fold(0f32, |a, &b| a.max(b));
            assert!(diff < 1e-5, "max difference {diff}");
        }
    }

    /// A tiny network of `dims` spatial dimensions, 2 input channels and 3 classes.
    fn tiny_network(dims: usize) -> (tch::nn::VarStore, Network) {
        let (conv, kernel, stride) = match dims {
            2 => ("torch.nn.modules.conv.Conv2d", vec![3, 3], vec![2, 2]),
            _ => ("torch.nn.modules.conv.Conv3d", vec![3, 3, 3], vec![2, 2, 2]),
        };
        let ones = vec![1; dims];
        let plan = serde_json::from_value(serde_json::json!({
            "network_class_name": "PlainConvUNet",
            "arch_kwargs": {
                "n_stages": 2, "features_per_stage": [4, 8], "conv_op": conv,
                "kernel_sizes": [kernel, kernel], "strides": [ones, stride],
                "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": true,
                "norm_op": "InstanceNorm", "norm_op_kwargs": {"eps": 1e-5, "affine": true},
                "dropout_op": null, "nonlin": "LeakyReLU", "nonlin_kwargs": {"inplace": true}
            }
        }))
        .unwrap();
        let arch = Architecture::from_plan(&plan, 2, 3, false).unwrap();
        crate::trainer::build_network(&arch, Device::Cpu, 11)
    }

    /// Logits come back on the image's own grid (unpadded where the image is smaller than the
    /// patch), for 3D and 2D networks, and the same image gives bit-identical logits again.
    #[test]
    fn sliding_window_returns_the_image_grid_deterministically() {
        for (dims, patch, image_shape) in [(3, [8, 8, 8], (2, 5, 12, 9)), (2, [1, 8, 8], (2, 3, 6, 11))] {
            let (_vs, net) = tiny_network(dims);
            let image = Array4::from_shape_fn(image_shape, |(c, z, y, x)| {
                ((c * 5 + z * 7 + y * 3 + x) % 13) as f32 / 6.0 - 1.0
            });
            let predictor = Predictor {
                net: &net,
                device: Device::Cpu,
                window: SlidingWindow::new(patch),
                mirror_axes: (0..dims).collect(),
                amp: false,
            };
            let first = predictor.predict_logits(image.view()).unwrap();
            let (_, z, y, x) = image_shape;
            assert_eq!(first.dim(), (3, z, y, x), "{dims}D");
            assert!(first.iter().all(|v| v.is_finite()), "{dims}D");
            let second = predictor.predict_logits(image.view()).unwrap();
            assert_eq!(first, second, "{dims}D: the same logits again");
        }
    }

    #[test]
    fn subsets_in_itertools_order() {
        assert_eq!(
            super::non_empty_subsets(&[2, 3, 4]),
            vec![
                vec![2],
                vec![3],
                vec![4],
                vec![2, 3],
                vec![2, 4],
                vec![3, 4],
                vec![2, 3, 4]
            ]
        );
    }
}
