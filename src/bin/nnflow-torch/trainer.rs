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
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use tch::{nn::VarStore, Device, Kind, Tensor};

use nnflow::file_error::FileError;
use nnflow::inference::sliding_window::SlidingWindow;
use nnflow::network::Architecture;
use nnflow::torch_env::DeviceChoice;
use nnflow::train::data::{spawn_producer, Batch, BatchMaker};
use nnflow::train::job::TrainJob;
use nnflow::train::params::TrainParams;
use nnflow::train::progress_plot;
use nnflow::train::setup::{as_3d, batch_maker, Setup};
use nnflow::train::TrainError;

use crate::checkpoint::{self, CheckpointError, EpochRecord, TrainerState};
use crate::held_out::{validate_held_out, HeldOutError};
use crate::loss::{deep_supervision_loss, pseudo_dice_counts, LossConfig};
use crate::network::Network;
use crate::optim::{clip_grad_norm, poly_lr, zero_grad, LossScaler, Sgd};
use crate::predictor::Predictor;

/// Why the worker's training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Device(#[from] NoCudaDevice),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    HeldOut(#[from] HeldOutError),
    #[error("the augmentation threads stopped")]
    AugmentationStopped,
    #[error("epoch {epoch}: the training loss is {loss}; training diverged")]
    Diverged { epoch: usize, loss: f64 },
}

/// `device = "cuda"` without a usable GPU.
#[derive(Debug, thiserror::Error)]
#[error(
    "device = \"cuda\" was requested but no CUDA device is usable \
     (check `nnflow doctor`: libtorch_cuda must load and a GPU must be visible)"
)]
pub struct NoCudaDevice;

/// Chooses the device; `cuda` without a usable GPU is an error rather than a silent CPU run.
pub fn select_device(choice: DeviceChoice) -> Result<Device, NoCudaDevice> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        DeviceChoice::Cuda if cuda => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(NoCudaDevice),
    }
}

/// Builds the network for a setup on a device, initialised from `seed`.
pub fn build_network(arch: &Architecture, device: Device, seed: u64) -> (VarStore, Network) {
    tch::manual_seed(seed as i64);
    let vs = VarStore::new(device);
    let net = Network::new(&vs.root(), arch);
    (vs, net)
}

/// A batch as the network's input and the deep-supervision targets (int64 labels or regions).
pub(crate) fn batch_tensors(batch: &Batch, spatial_dims: usize, device: Device) -> (Tensor, Vec<Tensor>) {
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

/// The network's variables in checkpoint order and the SGD optimiser over them, with the run's
/// momentum and weight decay.
pub(crate) fn optimiser(vs: &VarStore, params: &TrainParams) -> (Vec<Tensor>, Sgd) {
    let variables: Vec<Tensor> = checkpoint::sorted_variables(vs)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let sgd = Sgd::new(variables.len(), params.momentum, params.weight_decay);
    (variables, sgd)
}

/// The training loss of a run: the run's Dice and CE weights, the plan's `batch_dice`, the
/// dataset's ignore label and regions, and the network's deep-supervision weights.
pub(crate) fn loss_config(
    params: &TrainParams,
    architecture: &Architecture,
    batch_dice: bool,
    ignore_label: Option<i64>,
    regions: bool,
) -> LossConfig {
    LossConfig {
        batch_dice,
        ignore_label,
        weight_ce: params.loss.ce,
        weight_dice: params.loss.dice,
        regions,
        deep_supervision_weights: architecture.deep_supervision_weights(),
    }
}

/// Where the run's lines go: the worker's stdout (the stage log) and `training_log.txt`.
pub struct Logger {
    file: std::fs::File,
}

impl Logger {
    /// Creates the output folder and a fresh `training_log.txt` in it.
    fn create(out_dir: &Path) -> Result<Logger, FileError> {
        std::fs::create_dir_all(out_dir).map_err(FileError::io(out_dir))?;
        let path = out_dir.join("training_log.txt");
        let file = std::fs::File::create(&path).map_err(FileError::io(&path))?;
        Ok(Logger { file })
    }

    pub fn line(&mut self, text: &str) {
        println!("{text}");
        let _ = writeln!(self.file, "{text}");
    }
}

/// Runs one training job from start (or the latest resume checkpoint) to the final validation.
pub fn train(job: &TrainJob) -> Result<(), TrainerError> {
    let mut trainer = Trainer::set_up(job)?;
    let mut state = trainer.resume_or_start()?;
    let mut feed = trainer.start_batches(state.epochs_done);
    for epoch in state.epochs_done..job.params.epochs {
        if trainer.epoch(epoch, &mut state, &mut feed)?.is_break() {
            break;
        }
    }
    drop(feed); // stops the augmentation threads
    trainer.finish(&state)?;
    Ok(trainer.final_validation()?)
}

/// What one training run holds from set-up to the final validation, so each step of `train` is
/// a method that names what it does instead of a stretch of one long function.
struct Trainer<'a> {
    job: &'a TrainJob,
    setup: Setup,
    device: Device,
    /// fp16 autocast and loss scaling: asked for and on CUDA.
    amp: bool,
    log: Logger,
    maker: Arc<BatchMaker>,
    vs: VarStore,
    net: Network,
    /// The network's variables in checkpoint order, the order the optimiser's buffers follow.
    variables: Vec<Tensor>,
    sgd: Sgd,
    loss: LossConfig,
}

/// The augmented batches, in the order the producer makes them (per epoch the training
/// iterations, then the validation ones).
struct BatchFeed {
    batches: Receiver<Result<Batch, TrainError>>,
    /// Seconds spent waiting for batches in this epoch: nonzero means the data pipeline, not the
    /// network, limits the speed.
    waited: f64,
}

impl BatchFeed {
    fn next(&mut self) -> Result<Batch, TrainerError> {
        let started = Instant::now();
        let batch = self
            .batches
            .recv()
            .map_err(|_| TrainerError::AugmentationStopped)?;
        self.waited += started.elapsed().as_secs_f64();
        Ok(batch?)
    }
}

impl<'a> Trainer<'a> {
    /// Validates the parameters and builds what every later step needs: the device, the log with
    /// its header line, the batch maker, the network (seeded, so a fresh run is reproducible),
    /// the optimiser and the loss. `build_network` seeds torch's generator, so a fresh run starts
    /// from the same weights every time.
    fn set_up(job: &'a TrainJob) -> Result<Self, TrainerError> {
        let params = &job.params;
        params.validate()?;
        tch::set_num_threads(job.threads.max(1) as i32);
        let setup = Setup::read(params)?;
        let device = select_device(params.device)?;
        let amp = params.amp && device.is_cuda();
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let mut log = Logger::create(&job.out_dir)?;
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
        let (vs, net) = build_network(&setup.architecture, device, params.seed);
        let (variables, sgd) = optimiser(&vs, params);
        log.line(&format!(
            "network: {} parameters",
            crate::unet::parameter_count(&vs)
        ));
        let loss = loss_config(
            params,
            &setup.architecture,
            setup.batch_dice,
            setup.ignore_label,
            setup.regions.is_some(),
        );
        Ok(Trainer {
            job,
            setup,
            device,
            amp,
            log,
            maker,
            vs,
            net,
            variables,
            sgd,
            loss,
        })
    }

    /// Continues from the resume checkpoint when one belongs to this job (loading its weights and
    /// optimiser state), otherwise starts a fresh history, from the pretrained weights if given.
    fn resume_or_start(&mut self) -> Result<TrainerState, TrainerError> {
        let job = self.job;
        match resume(
            &job.resume_dir,
            &job.identity,
            &mut self.vs,
            &mut self.sgd,
            &mut self.log,
        ) {
            Some((state, slot)) => {
                self.log.line(&format!(
                    "resuming after epoch {} from {}",
                    state.epochs_done,
                    job.resume_dir.join(slot).display()
                ));
                Ok(state)
            }
            None => {
                if let Some(weights) = &job.params.pretrained_weights {
                    checkpoint::load_pretrained(Path::new(weights), &mut self.vs)?;
                    self.log
                        .line(&format!("starting from the pretrained weights in {weights}"));
                }
                Ok(TrainerState {
                    identity: job.identity.clone(),
                    epochs_done: 0,
                    logs: Vec::new(),
                    best_ema: None,
                    best_epoch: None,
                    scaler: LossScaler::default(),
                })
            }
        }
    }

    /// Starts the augmentation threads for the epochs still to run; they work ahead of the
    /// network by two batches.
    fn start_batches(&self, first_epoch: usize) -> BatchFeed {
        let params = &self.job.params;
        let batches = spawn_producer(
            self.maker.clone(),
            first_epoch,
            params.epochs,
            params.iterations_per_epoch,
            params.val_iterations,
            self.job.threads,
            2,
        );
        BatchFeed { batches, waited: 0.0 }
    }

    /// One epoch as nnU-Net's: the poly learning rate, the training iterations, the validation
    /// iterations, then the bookkeeping. `Break` when early stopping ends the run.
    fn epoch(
        &mut self,
        epoch: usize,
        state: &mut TrainerState,
        feed: &mut BatchFeed,
    ) -> Result<ControlFlow<()>, TrainerError> {
        let started = Instant::now();
        feed.waited = 0.0;
        let params = &self.job.params;
        let lr = poly_lr(params.learning_rate, epoch, params.epochs);
        let train_loss = self.training_iterations(epoch, lr, feed, &mut state.scaler)?;
        let (val_loss, pseudo_dice) = self.validation_iterations(feed)?;
        let mean_dice = nanmean(&pseudo_dice);
        let record = EpochRecord {
            epoch,
            train_loss,
            val_loss,
            ema_pseudo_dice: moving_average(state.logs.last(), mean_dice),
            pseudo_dice,
            mean_pseudo_dice: mean_dice,
            learning_rate: lr,
            epoch_seconds: started.elapsed().as_secs_f64(),
            data_wait_seconds: feed.waited,
        };
        self.end_of_epoch(state, record)
    }

    /// `iterations_per_epoch` SGD steps; returns the mean training loss. A non-finite loss without
    /// `amp` is an error (with `amp` the loss scaler skips that step instead).
    fn training_iterations(
        &mut self,
        epoch: usize,
        lr: f64,
        feed: &mut BatchFeed,
        scaler: &mut LossScaler,
    ) -> Result<f64, TrainerError> {
        let params = &self.job.params;
        self.net.set_deep_supervision(params.deep_supervision);
        let step = Step {
            net: &self.net,
            variables: &self.variables,
            loss: &self.loss,
            grad_clip: params.grad_clip,
            amp: self.amp,
        };
        let mut losses = Vec::with_capacity(params.iterations_per_epoch);
        for _ in 0..params.iterations_per_epoch {
            let (x, targets) =
                batch_tensors(&feed.next()?, self.setup.architecture.spatial_dims, self.device);
            let loss = step.run(&x, &targets, &mut self.sgd, scaler, lr);
            let value = loss.double_value(&[]);
            if !value.is_finite() && !self.amp {
                return Err(TrainerError::Diverged { epoch, loss: value });
            }
            losses.push(value);
        }
        Ok(mean(&losses))
    }

    /// `val_iterations` patches without gradients: the mean loss and nnU-Net's pseudo Dice per
    /// class, from true/false positive and false negative counts summed over all patches.
    fn validation_iterations(&self, feed: &mut BatchFeed) -> Result<(f64, Vec<f64>), TrainerError> {
        tch::no_grad(|| {
            let mut losses = Vec::new();
            let mut totals: Option<[Vec<f64>; 3]> = None;
            for _ in 0..self.job.params.val_iterations {
                let (x, targets) =
                    batch_tensors(&feed.next()?, self.setup.architecture.spatial_dims, self.device);
                let outputs = tch::autocast(self.amp, || self.net.forward(&x));
                losses.push(deep_supervision_loss(&outputs, &targets, &self.loss).double_value(&[]));
                let counts = pseudo_dice_counts(&outputs[0], &targets[0], &self.loss);
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
        })
    }

    /// Logs the epoch and adds it to the history, then saves what a later reader or a resumed run
    /// needs: the best checkpoint on a new best moving average, the latest every
    /// `checkpoint_every` epochs and after the last, `progress.png` and the stage's progress.
    /// `Break` when early stopping ends the run (after saving the latest checkpoint).
    fn end_of_epoch(
        &mut self,
        state: &mut TrainerState,
        record: EpochRecord,
    ) -> Result<ControlFlow<()>, TrainerError> {
        let waited = record.data_wait_seconds;
        let job = self.job;
        let params = &job.params;
        let (epoch, lr, ema) = (record.epoch, record.learning_rate, record.ema_pseudo_dice);
        self.log.line(&format!(
            "epoch {epoch}: lr {lr:.5} train_loss {:.4} val_loss {:.4} pseudo_dice {:?} ema {:.4} time {:.2} s (waiting for data {:.2} s)",
            record.train_loss,
            record.val_loss,
            record.pseudo_dice.iter().map(|d| (d * 1e4).round() / 1e4).collect::<Vec<_>>(),
            ema,
            record.epoch_seconds,
            waited
        ));
        state.logs.push(record);
        state.epochs_done = epoch + 1;
        if state.best_ema.is_none_or(|best| ema > best) {
            state.best_ema = Some(ema);
            state.best_epoch = Some(epoch);
            self.log
                .line(&format!("new best moving-average pseudo Dice: {ema:.4}"));
            checkpoint::save(&job.resume_dir, "checkpoint_best", &self.vs, None, state)?;
        }
        let last = epoch + 1 == params.epochs;
        if (epoch + 1) % params.checkpoint_every == 0 || last {
            checkpoint::save_latest(&job.resume_dir, &self.vs, &self.sgd, state)?;
        }
        plot(state, &job.out_dir)?;
        report_progress(job, state, params.epochs);
        if let (Some(patience), Some(best_epoch)) = (params.early_stopping, state.best_epoch) {
            if epoch >= best_epoch + patience && !last {
                self.log
                    .line(&format!("early stopping: no improvement for {patience} epochs"));
                checkpoint::save_latest(&job.resume_dir, &self.vs, &self.sgd, state)?;
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Writes the stage's outputs: final and best weights, the trainer state, and the logs.
    fn finish(&mut self, state: &TrainerState) -> Result<(), TrainerError> {
        let job = self.job;
        checkpoint::save(&job.out_dir, "checkpoint_final", &self.vs, None, state)?;
        let best = checkpoint::paths(&job.resume_dir, "checkpoint_best");
        if best.weights.exists() {
            std::fs::copy(&best.weights, job.out_dir.join("checkpoint_best.safetensors"))
                .map_err(FileError::io(&best.weights))?;
        }
        nnflow::atomic_file::write_json(&job.out_dir.join("training_history.json"), &state.logs)?;
        self.log
            .line(&format!("training done after {} epochs", state.epochs_done));
        Ok(())
    }

    /// The final weights predict the held-out cases whole, as inference will: one output (no deep
    /// supervision), the validation step size and mirroring settings.
    fn final_validation(mut self) -> Result<(), HeldOutError> {
        let params = &self.job.params;
        self.net.set_deep_supervision(false);
        let predictor = Predictor {
            net: &self.net,
            device: self.device,
            window: SlidingWindow {
                step_size: params.validation_step_size,
                ..SlidingWindow::new(as_3d(&self.setup.patch_size))
            },
            // as nnU-Net's validation: the axes the augmentation mirrored
            mirror_axes: if params.validation_mirroring {
                self.setup.mirror_axes.clone()
            } else {
                Vec::new()
            },
            amp: self.amp,
        };
        validate_held_out(self.job, &self.setup, &predictor, &mut self.log)
    }
}

/// nnU-Net's moving average of the mean pseudo Dice (0.9 old, 0.1 new), which picks the best
/// checkpoint; it restarts from this epoch's value when there is no finite previous one.
fn moving_average(previous: Option<&EpochRecord>, mean_dice: f64) -> f64 {
    match previous {
        Some(previous) if previous.ema_pseudo_dice.is_finite() => {
            0.9 * previous.ema_pseudo_dice + 0.1 * mean_dice
        }
        _ => mean_dice,
    }
}

/// One SGD step: forward (fp16 autocast on CUDA when `amp`), deep-supervision loss, backward
/// (scaled when `amp`), gradient clipping, the update (skipped on overflow), as nnU-Net's
/// `train_step`. Returns the loss (and, from `run_with_grad_norm`, the gradient norm before
/// clipping, what `torch.nn.utils.clip_grad_norm_` returns).
pub struct Step<'a> {
    pub net: &'a Network,
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
        self.run_with_grad_norm(x, targets, sgd, scaler, lr).0
    }

    pub fn run_with_grad_norm(
        &self,
        x: &Tensor,
        targets: &[Tensor],
        sgd: &mut Sgd,
        scaler: &mut LossScaler,
        lr: f64,
    ) -> (Tensor, f64) {
        zero_grad(self.variables);
        let outputs = tch::autocast(self.amp, || self.net.forward(x));
        let loss = deep_supervision_loss(&outputs, targets, self.loss);
        let grad_norm = if self.amp {
            (&loss * scaler.scale).backward();
            let finite = scaler.unscale(self.variables);
            let norm = clip_grad_norm(self.variables, self.grad_clip);
            if finite {
                sgd.step(self.variables, lr);
            }
            scaler.update(!finite);
            norm
        } else {
            loss.backward();
            let norm = clip_grad_norm(self.variables, self.grad_clip);
            sgd.step(self.variables, lr);
            norm
        };
        (loss, grad_norm)
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
            Ok::<_, CheckpointError>(Some(state))
        },
        |line| log.line(line),
    )
}

/// Tells the `train` stage how far training is (shown next to the stage on the terminal).
fn report_progress(job: &TrainJob, state: &TrainerState, epochs: usize) {
    let Some(last) = state.logs.last() else { return };
    let progress = nnflow::train::progress::Progress {
        epoch: state.epochs_done,
        epochs,
        train_loss: last.train_loss,
        ema_pseudo_dice: last.ema_pseudo_dice,
        epoch_seconds: last.epoch_seconds,
    };
    let json = serde_json::to_vec(&progress).expect("progress serializes");
    let _ = nnflow::atomic_file::write_atomically(&job.resume_dir.join("progress.json"), &json);
}

fn plot(state: &TrainerState, out_dir: &Path) -> Result<(), TrainError> {
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
