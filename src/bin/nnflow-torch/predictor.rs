//! A trained network applied to a whole preprocessed image: sliding windows, each window predicted
//! with mirroring test-time augmentation as nnU-Net's `_internal_maybe_mirror_and_predict` does it
//! (the prediction averaged with the un-flipped predictions of every non-empty combination of the
//! allowed mirror axes). libtorch code: runs in the `nnflow-torch` worker only.

use ndarray::{Array4, ArrayView4};
use tch::{Device, Kind, Tensor};

use nnflow::inference::sliding_window::SlidingWindow;

use crate::unet::PlainConvUNet;

pub struct Predictor<'a> {
    /// With deep supervision switched off (one output).
    pub net: &'a PlainConvUNet,
    pub device: Device,
    pub window: SlidingWindow,
    /// Mirror axes among the network's spatial axes (3D: 0 = z, 1 = y, 2 = x; 2D: 0 = y, 1 = x).
    pub mirror_axes: Vec<usize>,
    /// fp16 autocast (CUDA only).
    pub amp: bool,
}

impl Predictor<'_> {
    /// Averaged logits `(classes, z, y, x)` for a `(channels, z, y, x)` image.
    pub fn predict_logits(&self, image: ArrayView4<f32>) -> Result<Array4<f32>, String> {
        let classes = self.net.architecture.num_classes;
        let two_d = self.net.architecture.spatial_dims == 2;
        tch::no_grad(|| {
            self.window
                .predict(
                    image,
                    classes,
                    |patch: ArrayView4<f32>| -> Result<Array4<f32>, String> {
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
                            .map_err(|e| e.to_string())
                    },
                )
                .map_err(|e| e.to_string())
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
