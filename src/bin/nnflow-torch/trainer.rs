//! The training run, as nnU-Net's `nnUNetTrainer.run_training`: per epoch, the poly learning rate,
//! `iterations_per_epoch` SGD steps on augmented patches, `val_iterations` validation patches
//! (loss and pseudo Dice), logging, checkpoints (latest, best by moving-average pseudo Dice,
//! final) and `progress.png`; after the last epoch, the full validation of the held-out cases.
//!
//! Runs inside the `nnflow-torch` worker. Resumable: the latest checkpoint lives in the stage's
//! resume folder with the parameters it belongs to; a run with the same parameters (only `epochs`
//! and validation settings may differ) continues from it, so a killed run loses at most
//! `checkpoint_every` epochs and raising `epochs` continues training instead of restarting. The
//! checkpoint before it is kept too, and both are checksummed: a damaged latest one falls back to
//! the previous one, or to a fresh start, with a line in the log (`nnflow::train::resume`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tch::{nn::VarStore, Device, Kind, Tensor};

use nnflow::data::case_store::read_case;
use nnflow::data::dataset::Dataset;
use nnflow::data::{nifti, npy};
use nnflow::evaluate::folder::{evaluate_pair, evaluation_targets, foreground_dice, summary_json};
use nnflow::inference::export::{export_case, segmentation_on_grid, write_segmentation, RegionInfo};
use nnflow::inference::sliding_window::SlidingWindow;
use nnflow::network::Architecture;
use nnflow::torch_env::DeviceChoice;
use nnflow::train::data::{spawn_producer, Batch};
use nnflow::train::job::FoldInfo;
use nnflow::train::job::TrainJob;
use nnflow::train::previous_stage::{next_stage_shape, prediction_path, with_previous_stage};
use nnflow::train::progress_plot;
use nnflow::train::setup::{as_3d, batch_maker, read_previous_stage, Setup};

use crate::checkpoint::{self, EpochRecord, TrainerState};
use crate::loss::{deep_supervision_loss, pseudo_dice_counts, LossConfig};
use crate::optim::{clip_grad_norm, poly_lr, zero_grad, LossScaler, Sgd};
use crate::predictor::Predictor;
use crate::unet::PlainConvUNet;

/// Chooses the device; `cuda` without a usable GPU is an error rather than a silent CPU run.
pub fn select_device(choice: DeviceChoice) -> Result<Device, String> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        DeviceChoice::Cuda if cuda => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err("device = \"cuda\" was requested but no CUDA device is usable \
             (check `nnflow doctor`: libtorch_cuda must load and a GPU must be visible)"
            .into()),
    }
}

/// Builds the network for a setup on a device, initialised from `seed`.
pub fn build_network(arch: &Architecture, device: Device, seed: u64) -> (VarStore, PlainConvUNet) {
    tch::manual_seed(seed as i64);
    let vs = VarStore::new(device);
    let net = PlainConvUNet::new(&vs.root(), arch);
    (vs, net)
}

fn batch_tensors(batch: &Batch, spatial_dims: usize, device: Device) -> (Tensor, Vec<Tensor>) {
    let shape = |s: &[usize; 5]| -> Vec<i64> {
        let mut v: Vec<i64> = s.iter().map(|&d| d as i64).collect();
        if spatial_dims == 2 {
            v.remove(2); // the z axis of length 1
        }
        v
    };
    let data = Tensor::from_slice(&batch.data)
        .view(shape(&batch.data_shape).as_slice())
        .to_device(device);
    let targets = batch
        .targets
        .iter()
        .map(|(labels, s)| {
            Tensor::from_slice(labels)
                .view(shape(s).as_slice())
                .to_device(device)
                .to_kind(Kind::Int64)
        })
        .collect();
    (data, targets)
}

struct Logger {
    file: std::fs::File,
}

impl Logger {
    fn line(&mut self, text: &str) {
        println!("{text}");
        let _ = writeln!(self.file, "{text}");
    }
}

pub fn train(job: &TrainJob) -> Result<(), String> {
    let params = &job.params;
    params.validate()?;
    tch::set_num_threads(job.threads.max(1) as i32);
    let setup = Setup::read(params)?;
    let device = select_device(params.device)?;
    let amp = params.amp && device.is_cuda();
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    std::fs::create_dir_all(&job.out_dir).map_err(|e| format!("{}: {e}", job.out_dir.display()))?;
    let mut log = Logger {
        file: std::fs::File::create(job.out_dir.join("training_log.txt")).map_err(|e| e.to_string())?,
    };
    let arch = &setup.architecture;
    log.line(&format!(
        "configuration {} fold {}: {} training / {} validation cases, patch {:?}, batch {}, device {device:?}{}",
        params.configuration,
        params.fold.text(),
        setup.split.train.len(),
        setup.split.val.len(),
        setup.patch_size,
        setup.batch_size,
        if amp { " (fp16 autocast)" } else { "" }
    ));

    let maker = Arc::new(batch_maker(params, &setup)?);
    let (mut vs, mut net) = build_network(arch, device, params.seed);
    let variables: Vec<Tensor> = checkpoint::sorted_variables(&vs)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let mut sgd = Sgd::new(variables.len(), params.momentum, params.weight_decay);
    log.line(&format!(
        "network: {} parameters",
        crate::unet::parameter_count(&vs)
    ));

    let identity = job.identity.clone();
    let mut state = match resume(&job.resume_dir, &identity, &mut vs, &mut sgd, &mut log) {
        Some((state, slot)) => {
            log.line(&format!(
                "resuming after epoch {} from {}",
                state.epochs_done,
                job.resume_dir.join(slot).display()
            ));
            state
        }
        None => TrainerState {
            identity: identity.clone(),
            epochs_done: 0,
            logs: Vec::new(),
            best_ema: None,
            best_epoch: None,
            scaler: LossScaler::default(),
        },
    };
    let loss_config = LossConfig {
        batch_dice: setup.batch_dice,
        ignore_label: setup.ignore_label,
        weight_ce: params.loss.ce,
        weight_dice: params.loss.dice,
        regions: setup.regions.is_some(),
        deep_supervision_weights: arch.deep_supervision_weights(),
    };
    let stop_at = params.epochs;
    let batches = spawn_producer(
        maker.clone(),
        state.epochs_done,
        stop_at,
        params.iterations_per_epoch,
        params.val_iterations,
        job.threads,
        2,
    );
    // Time spent waiting for augmented batches: nonzero means the data pipeline, not the
    // network, limits the speed.
    let waited = std::cell::Cell::new(0.0f64);
    let next_batch = || -> Result<Batch, String> {
        let started = Instant::now();
        let batch = batches
            .recv()
            .map_err(|_| "the augmentation threads stopped".to_string())?;
        waited.set(waited.get() + started.elapsed().as_secs_f64());
        batch
    };
    for epoch in state.epochs_done..stop_at {
        let started = Instant::now();
        waited.set(0.0);
        let lr = poly_lr(params.learning_rate, epoch, params.epochs);
        net.set_deep_supervision(params.deep_supervision);
        let mut train_losses = Vec::with_capacity(params.iterations_per_epoch);
        for _ in 0..params.iterations_per_epoch {
            let (x, targets) = batch_tensors(&next_batch()?, arch.spatial_dims, device);
            let step = Step {
                net: &net,
                variables: &variables,
                loss: &loss_config,
                grad_clip: params.grad_clip,
                amp,
            };
            let loss = step.run(&x, &targets, &mut sgd, &mut state.scaler, lr);
            let value = loss.double_value(&[]);
            if !value.is_finite() && !amp {
                return Err(format!(
                    "epoch {epoch}: the training loss is {value}; training diverged"
                ));
            }
            train_losses.push(value);
        }
        let (val_loss, pseudo_dice) = tch::no_grad(|| -> Result<(f64, Vec<f64>), String> {
            let mut losses = Vec::new();
            let mut totals: Option<[Vec<f64>; 3]> = None;
            for _ in 0..params.val_iterations {
                let (x, targets) = batch_tensors(&next_batch()?, arch.spatial_dims, device);
                let outputs = tch::autocast(amp, || net.forward(&x));
                losses.push(deep_supervision_loss(&outputs, &targets, &loss_config).double_value(&[]));
                let counts = pseudo_dice_counts(&outputs[0], &targets[0], &loss_config);
                totals = Some(match totals {
                    None => counts,
                    Some(t) => [0, 1, 2].map(|k| t[k].iter().zip(&counts[k]).map(|(a, b)| a + b).collect()),
                });
            }
            let dice = match totals {
                Some([tp, fp, fn_]) => (0..tp.len())
                    .map(|c| 2.0 * tp[c] / (2.0 * tp[c] + fp[c] + fn_[c]))
                    .collect(),
                None => Vec::new(),
            };
            Ok((mean(&losses), dice))
        })?;
        let mean_dice = nanmean(&pseudo_dice);
        let ema = match state.logs.last() {
            Some(previous) if previous.ema_pseudo_dice.is_finite() => {
                0.9 * previous.ema_pseudo_dice + 0.1 * mean_dice
            }
            _ => mean_dice,
        };
        let record = EpochRecord {
            epoch,
            train_loss: mean(&train_losses),
            val_loss,
            pseudo_dice: pseudo_dice.clone(),
            mean_pseudo_dice: mean_dice,
            ema_pseudo_dice: ema,
            learning_rate: lr,
            epoch_seconds: started.elapsed().as_secs_f64(),
        };
        log.line(&format!(
            "epoch {epoch}: lr {lr:.5} train_loss {:.4} val_loss {:.4} pseudo_dice {:?} ema {:.4} time {:.2} s (waiting for data {:.2} s)",
            record.train_loss,
            record.val_loss,
            pseudo_dice.iter().map(|d| (d * 1e4).round() / 1e4).collect::<Vec<_>>(),
            ema,
            record.epoch_seconds,
            waited.get()
        ));
        state.logs.push(record);
        state.epochs_done = epoch + 1;
        if state.best_ema.is_none_or(|best| ema > best) {
            state.best_ema = Some(ema);
            state.best_epoch = Some(epoch);
            log.line(&format!("new best moving-average pseudo Dice: {ema:.4}"));
            checkpoint::save(&job.resume_dir, "checkpoint_best", &vs, None, &state)?;
        }
        let last = epoch + 1 == stop_at;
        if (epoch + 1) % params.checkpoint_every == 0 || last {
            checkpoint::save_latest(&job.resume_dir, &vs, &sgd, &state)?;
        }
        plot(&state, &job.out_dir)?;
        report_progress(job, &state, stop_at);
        if let (Some(patience), Some(best_epoch)) = (params.early_stopping, state.best_epoch) {
            if epoch >= best_epoch + patience && !last {
                log.line(&format!("early stopping: no improvement for {patience} epochs"));
                checkpoint::save_latest(&job.resume_dir, &vs, &sgd, &state)?;
                break;
            }
        }
    }
    drop(batches);
    finish(job, &vs, &state, &mut log)?;
    net.set_deep_supervision(false);
    let predictor = Predictor {
        net: &net,
        device,
        window: SlidingWindow {
            step_size: params.validation_step_size,
            ..SlidingWindow::new(as_3d(&setup.patch_size))
        },
        mirror_axes: if params.validation_mirroring {
            (0..arch.spatial_dims).collect()
        } else {
            Vec::new()
        },
        amp,
    };
    validate_held_out(job, &setup, &predictor, &mut log)
}

/// nnU-Net's final validation: every held-out case predicted whole (sliding window, mirroring),
/// exported to its original image (resampled back, un-cropped, un-transposed) as
/// `validation/<case><ending>` with its probabilities (`<case>.npy`, classes x z x y x, for
/// ensembling) and compared with the raw reference label: `validation/summary.json` in nnU-Net's
/// layout, and `fold.json` naming the configuration, fold and validation cases.
fn validate_held_out(
    job: &TrainJob,
    setup: &Setup,
    predictor: &Predictor,
    log: &mut Logger,
) -> Result<(), String> {
    let params = &job.params;
    let dataset = Dataset::open(Path::new(&params.dataset)).map_err(|e| e.to_string())?;
    let regions = RegionInfo::from_dataset(&dataset)?;
    let targets = evaluation_targets(&dataset);
    let ignore = dataset.ignore_label.map(|l| l as i32);
    let out = job.out_dir.join("validation");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut results = Vec::new();
    for id in &setup.split.val {
        let started = Instant::now();
        let case = read_case(Path::new(&params.preprocessed), id).map_err(|e| e.to_string())?;
        let logits = match &setup.previous_stage {
            Some(previous) => {
                let seg = read_previous_stage(previous, id)?;
                predictor.predict_logits(
                    with_previous_stage(case.data.view(), seg.view(), &previous.labels).view(),
                )?
            }
            None => predictor.predict_logits(case.data.view())?,
        };
        for next in &setup.next_stages {
            // nnU-Net's `resample_and_save`: the cascade's input for this case
            let shape = next_stage_shape(&case.properties, next).map_err(|e| format!("case {id}: {e}"))?;
            let seg = segmentation_on_grid(logits.view(), shape, &setup.configuration, regions.as_ref())
                .map_err(|e| format!("case {id}: {e}"))?;
            let path = prediction_path(&job.out_dir, &next.configuration.name, id);
            std::fs::create_dir_all(path.parent().expect("a folder")).map_err(|e| e.to_string())?;
            npy::write(&path, seg.insert_axis(ndarray::Axis(0)).view())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let exported = export_case(
            logits.view(),
            &case.properties,
            &setup.configuration,
            regions.as_ref(),
            params.save_probabilities,
        )
        .map_err(|e| format!("case {id}: {e}"))?;
        let file = format!("{id}{}", dataset.file_ending);
        write_segmentation(&out.join(&file), &exported.segmentation, &case.properties)?;
        if let Some(probabilities) = &exported.probabilities {
            npy::write(&out.join(format!("{id}.npy")), probabilities.view())
                .map_err(|e| format!("case {id}: {e}"))?;
        }
        let reference_path = dataset
            .case(id)
            .map(|c| c.label.clone())
            .ok_or_else(|| format!("case {id} is not in the dataset's training cases"))?;
        let (reference, _) = nifti::read_integer_labels(&reference_path).map_err(|e| e.to_string())?;
        let result = evaluate_pair(
            &file,
            &reference,
            &exported.segmentation.mapv(i32::from),
            &targets,
            ignore,
        )?;
        log.line(&format!(
            "validation {id}: Dice {} ({:.1} s)",
            result
                .metrics
                .iter()
                .map(|(k, m)| format!("{k}={:.4}", m.dice))
                .collect::<Vec<_>>()
                .join(" "),
            started.elapsed().as_secs_f64()
        ));
        results.push(result);
    }
    let summary = summary_json(&results, &targets);
    log.line(&format!(
        "validation foreground mean Dice: {:.4}",
        foreground_dice(&summary)
    ));
    nnflow::atomic_file::write_json(&out.join("summary.json"), &summary)?;
    let fold = FoldInfo {
        configuration: params.configuration.clone(),
        fold: params.fold.text(),
        validation_cases: setup.split.val.clone(),
        file_ending: dataset.file_ending.clone(),
        probabilities: params.save_probabilities,
    };
    nnflow::atomic_file::write_json(&job.out_dir.join("fold.json"), &fold)
}

/// One SGD step: forward (fp16 autocast on CUDA when `amp`), deep-supervision loss, backward
/// (scaled when `amp`), gradient clipping, the update (skipped on overflow), as nnU-Net's
/// `train_step`. Returns the loss.
pub struct Step<'a> {
    pub net: &'a PlainConvUNet,
    pub variables: &'a [Tensor],
    pub loss: &'a LossConfig,
    pub grad_clip: f64,
    pub amp: bool,
}

impl Step<'_> {
    pub fn run(
        &self,
        x: &Tensor,
        targets: &[Tensor],
        sgd: &mut Sgd,
        scaler: &mut LossScaler,
        lr: f64,
    ) -> Tensor {
        zero_grad(self.variables);
        let outputs = tch::autocast(self.amp, || self.net.forward(x));
        let loss = deep_supervision_loss(&outputs, targets, self.loss);
        if self.amp {
            (&loss * scaler.scale).backward();
            let finite = scaler.unscale(self.variables);
            clip_grad_norm(self.variables, self.grad_clip);
            if finite {
                sgd.step(self.variables, lr);
            }
            scaler.update(!finite);
        } else {
            loss.backward();
            clip_grad_norm(self.variables, self.grad_clip);
            sgd.step(self.variables, lr);
        }
        loss
    }
}

/// Loads the newest intact resume checkpoint that belongs to these parameters and inputs; returns
/// its state and slot name. A damaged checkpoint is passed over with a line in the log (the stage
/// log and training_log.txt) and never fails the run: at worst training starts from scratch.
fn resume(
    dir: &Path,
    identity: &serde_json::Value,
    vs: &mut VarStore,
    sgd: &mut Sgd,
    log: &mut Logger,
) -> Option<(TrainerState, &'static str)> {
    nnflow::train::resume::resume(
        dir,
        |slot| {
            let state = checkpoint::read_state(slot)?;
            if &state.identity != identity {
                return Ok(None); // other parameters or inputs: train anew
            }
            checkpoint::load(slot, vs, sgd)?;
            Ok(Some(state))
        },
        |line| log.line(line),
    )
}

/// Tells the `train` stage how far training is (shown next to the stage on the terminal).
fn report_progress(job: &TrainJob, state: &TrainerState, epochs: usize) {
    let Some(last) = state.logs.last() else { return };
    let progress = nnflow::stages::train::Progress {
        epoch: state.epochs_done,
        epochs,
        train_loss: last.train_loss,
        ema_pseudo_dice: last.ema_pseudo_dice,
        epoch_seconds: last.epoch_seconds,
    };
    let json = serde_json::to_vec(&progress).expect("progress serializes");
    let _ = nnflow::atomic_file::write_atomically(&job.resume_dir.join("progress.json"), &json);
}

fn plot(state: &TrainerState, out_dir: &Path) -> Result<(), String> {
    let logs: Vec<progress_plot::EpochLog> = state
        .logs
        .iter()
        .map(|r| progress_plot::EpochLog {
            epoch: r.epoch,
            train_loss: r.train_loss,
            val_loss: r.val_loss,
            pseudo_dice: r.pseudo_dice.clone(),
            ema_pseudo_dice: r.ema_pseudo_dice,
            learning_rate: r.learning_rate,
            epoch_seconds: r.epoch_seconds,
        })
        .collect();
    progress_plot::plot_progress(&logs, &out_dir.join("progress.png"))
}

/// Writes the stage's outputs: final and best weights, the trainer state, and the logs.
fn finish(job: &TrainJob, vs: &VarStore, state: &TrainerState, log: &mut Logger) -> Result<(), String> {
    checkpoint::save(&job.out_dir, "checkpoint_final", vs, None, state)?;
    let best = checkpoint::paths(&job.resume_dir, "checkpoint_best");
    if best.weights.exists() {
        std::fs::copy(&best.weights, job.out_dir.join("checkpoint_best.safetensors"))
            .map_err(|e| format!("{}: {e}", best.weights.display()))?;
    }
    nnflow::atomic_file::write_json(&job.out_dir.join("training_history.json"), &state.logs)?;
    log.line(&format!("training done after {} epochs", state.epochs_done));
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

fn nanmean(values: &[f64]) -> f64 {
    let finite: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    mean(&finite)
}
