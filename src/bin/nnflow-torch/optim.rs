//! SGD with Nesterov momentum, the poly learning rate, gradient clipping and dynamic loss scaling,
//! written over the network's tensors so their state can be checkpointed (tch's optimizers keep
//! their momentum buffers out of reach, which rules out exact resumption).
//!
//! The update is PyTorch's `torch.optim.SGD(nesterov=True, dampening=0)`:
//! `g += wd * p; b = g` on the first step, else `b = momentum * b + g`; `p -= lr * (g + momentum * b)`.

use tch::{Kind, Tensor};

/// nnU-Net's `PolyLRScheduler`: `lr0 * (1 - epoch / epochs)^0.9`, set at the start of each epoch.
pub fn poly_lr(initial: f64, epoch: usize, epochs: usize) -> f64 {
    initial * (1.0 - epoch as f64 / epochs as f64).powf(0.9)
}

pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    /// One per parameter, in parameter order; `None` until its first step (PyTorch's lazy buffers).
    pub buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(parameter_count: usize, momentum: f64, weight_decay: f64) -> Sgd {
        Sgd {
            momentum,
            weight_decay,
            buffers: (0..parameter_count).map(|_| None).collect(),
        }
    }

    pub fn step(&mut self, parameters: &[Tensor], lr: f64) {
        tch::no_grad(|| {
            for (p, buffer) in parameters.iter().zip(&mut self.buffers) {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let g = if self.weight_decay != 0.0 {
                    &grad + p * self.weight_decay
                } else {
                    grad.shallow_clone()
                };
                match buffer {
                    Some(b) => {
                        let _ = b.g_mul_scalar_(self.momentum).g_add_(&g);
                    }
                    None => *buffer = Some(g.detach().copy()),
                }
                let b = buffer.as_ref().expect("set above");
                let update = g + b * self.momentum;
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(update * lr));
            }
        });
    }
}

/// Zeroes (drops) every gradient.
pub fn zero_grad(parameters: &[Tensor]) {
    for p in parameters {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.detach_().zero_();
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scales all gradients by `max_norm / (norm + 1e-6)` when the
/// global 2-norm exceeds `max_norm`. Returns the norm before clipping (non-finite when a gradient
/// overflowed).
pub fn clip_grad_norm(parameters: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = parameters
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.norm().to_kind(Kind::Float))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coefficient = max_norm / (total + 1e-6);
        if coefficient < 1.0 {
            for p in parameters {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coefficient);
                }
            }
        }
        total
    })
}

/// PyTorch's `GradScaler` (start 2^16, x2 after 2000 finite steps, x0.5 and skip the step on
/// overflow), for fp16 training on CUDA.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_tracker: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            growth_tracker: 0,
        }
    }
}

impl LossScaler {
    /// Divides the gradients by the scale; returns whether all are finite.
    pub fn unscale(&self, parameters: &[Tensor]) -> bool {
        tch::no_grad(|| {
            let mut finite = true;
            for p in parameters {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(1.0 / self.scale);
                    finite &= g.isfinite().all().int64_value(&[]) != 0;
                }
            }
            finite
        })
    }

    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == 2000 {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_schedule() {
        assert_eq!(poly_lr(0.01, 0, 1000), 0.01);
        assert!((poly_lr(0.01, 500, 1000) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
    }

    #[test]
    fn nesterov_matches_pytorch_formula() {
        // Two steps on f(p) = p^2 / 2 (grad = p), lr 0.1, momentum 0.9, wd 0.01, by hand.
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut sgd = Sgd::new(1, 0.9, 0.01);
        let mut expected = 1.0f64;
        let mut b = 0.0f64;
        for step in 0..2 {
            zero_grad(std::slice::from_ref(&p));
            (&p * &p * 0.5).sum(Kind::Float).backward();
            sgd.step(std::slice::from_ref(&p), 0.1);
            let g = expected + 0.01 * expected;
            b = if step == 0 { g } else { 0.9 * b + g };
            expected -= 0.1 * (g + 0.9 * b);
            assert!((p.double_value(&[0]) - expected).abs() < 1e-6, "step {step}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&p * &p * 0.5).sum(Kind::Float).backward(); // grad = (3, 4), norm 5
        let norm = clip_grad_norm(std::slice::from_ref(&p), 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((p.grad().norm().double_value(&[]) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn scaler_backs_off_and_grows() {
        let mut s = LossScaler::default();
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..2000 {
            s.update(false);
        }
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
    }
}
