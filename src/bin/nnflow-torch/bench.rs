//! `nnflow-torch bench-step`: milliseconds per training step (forward, loss, backward, clipping,
//! SGD; fp16 autocast and loss scaling with `--amp` on CUDA) for a network from a plan or for
//! nnU-Net's 3d_fullres topology at 128^3, on random data. Prints figures; a benchmark, not a test.
//!
//! `nnflow-torch bench-step [--plan plans.json --configuration NAME | --fullres128]
//!  [--device cpu|cuda] [--amp] [--batch N] [--steps N] [--warmup N] [--classes N]`

use std::time::Instant;

use nnflow::network::architecture::ArchitectureError;
use nnflow::network::Architecture;
use nnflow::plans::{ArchitecturePlan, Plans, PlansError};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::sorted_variables;
use crate::loss::LossConfig;
use crate::optim::{LossScaler, Sgd};
use crate::trainer::{build_network, Step};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{flag} needs a value")]
    MissingValue { flag: String },
    #[error("{flag}: {source}")]
    InvalidNumber {
        flag: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("unknown option {0}")]
    UnknownOption(String),
    #[error(transparent)]
    Plans(#[from] PlansError),
    /// The configuration's network cannot be built.
    #[error(transparent)]
    Architecture(#[from] ArchitectureError),
    #[error("device {0} is not available")]
    DeviceUnavailable(String),
    #[error("loss became {0}")]
    Diverged(f64),
}

struct Options {
    plan: Option<String>,
    configuration: String,
    device: String,
    amp: bool,
    batch: Option<usize>,
    steps: usize,
    warmup: usize,
    classes: usize,
}

fn parse(args: &[String]) -> Result<Options, BenchError> {
    let mut o = Options {
        plan: None,
        configuration: "3d_fullres".into(),
        device: "cpu".into(),
        amp: false,
        batch: None,
        steps: 10,
        warmup: 3,
        classes: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| BenchError::MissingValue { flag: flag.clone() })
        };
        let number = |v: String| {
            v.parse::<usize>().map_err(|source| BenchError::InvalidNumber {
                flag: flag.clone(),
                source,
            })
        };
        match flag.as_str() {
            "--plan" => o.plan = Some(value()?),
            "--configuration" => o.configuration = value()?,
            "--fullres128" => o.plan = None,
            "--device" => o.device = value()?,
            "--amp" => o.amp = true,
            "--batch" => o.batch = Some(number(value()?)?),
            "--steps" => o.steps = number(value()?)?,
            "--warmup" => o.warmup = number(value()?)?,
            "--classes" => o.classes = number(value()?)?,
            other => return Err(BenchError::UnknownOption(other.to_string())),
        }
    }
    Ok(o)
}

/// nnU-Net's 3d_fullres plan for a 128^3 patch: six stages of 32..320 features, 3x3x3 kernels,
/// stride 2 after the first stage, two convolutions per stage, batch 2.
fn fullres128(classes: usize) -> (Architecture, Vec<usize>, usize) {
    let plan: ArchitecturePlan = serde_json::from_value(serde_json::json!({
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": vec![vec![3, 3, 3]; 6],
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2, 2, 2],
            "conv_bias": true, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": true}, "dropout_op": null, "dropout_op_kwargs": null,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
        }
    }))
    .expect("a valid architecture");
    let arch = Architecture::from_plan(&plan, 1, classes, true).expect("a valid topology");
    (arch, vec![128, 128, 128], 2)
}

pub fn bench_step(args: &[String]) -> Result<(), BenchError> {
    let o = parse(args)?;
    let (arch, patch, planned_batch) = match &o.plan {
        None => fullres128(o.classes),
        Some(path) => {
            let plans = Plans::read(std::path::Path::new(path))?;
            let c = plans.configuration(&o.configuration)?;
            let arch = Architecture::from_plan(c.architecture()?, 1, o.classes, true)?;
            let patch = c.patch_size()?.to_vec();
            (arch, patch, c.values.batch_size.unwrap_or(2))
        }
    };
    let batch = o.batch.unwrap_or(planned_batch);
    let device = match o.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        other => return Err(BenchError::DeviceUnavailable(other.to_string())),
    };
    let amp = o.amp && device.is_cuda();
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let (vs, net) = build_network(&arch, device, 0);
    let variables: Vec<Tensor> = sorted_variables(&vs).into_iter().map(|(_, t)| t).collect();
    let mut sgd = Sgd::new(variables.len(), 0.99, 3e-5);
    let mut scaler = LossScaler::default();
    let loss = LossConfig {
        batch_dice: false,
        ignore_label: None,
        weight_ce: 1.0,
        weight_dice: 1.0,
        regions: false,
        deep_supervision_weights: arch.deep_supervision_weights(),
    };
    let mut shape = vec![batch as i64, 1];
    shape.extend(patch.iter().map(|&p| p as i64));
    let x = Tensor::randn(shape.as_slice(), (Kind::Float, device));
    let targets: Vec<Tensor> = arch
        .deep_supervision_scales()
        .iter()
        .map(|scale| {
            let mut s = vec![batch as i64, 1];
            let offset = 3 - patch.len();
            s.extend(
                patch
                    .iter()
                    .enumerate()
                    .map(|(a, &p)| (p as f64 * scale[a + offset]).round() as i64),
            );
            Tensor::randint(o.classes as i64, s.as_slice(), (Kind::Int64, device))
        })
        .collect();
    let step = Step {
        net: &net,
        variables: &variables,
        loss: &loss,
        grad_clip: 12.0,
        amp,
    };
    let mut times = Vec::new();
    for i in 0..o.warmup + o.steps {
        let started = Instant::now();
        let value = step
            .run(&x, &targets, &mut sgd, &mut scaler, 0.01)
            .double_value(&[]); // syncs
        if i >= o.warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        if !value.is_finite() && !amp {
            return Err(BenchError::Diverged(value));
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "training step: {median:.1} ms median over {} steps (min {:.1}, max {:.1}); patch {patch:?}, batch {batch}, \
         {} parameters, device {device:?}{}, {} torch threads",
        times.len(),
        times[0],
        times[times.len() - 1],
        crate::unet::parameter_count(&vs),
        if amp { " fp16 autocast" } else { " fp32" },
        tch::get_num_threads()
    );
    Ok(())
}
