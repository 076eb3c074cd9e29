//! `nnflow-torch predict JOB.json`: the `predict` stage's work. Per case and configuration: read,
//! transpose, crop, normalize and resample the raw images as in preprocessing, predict with every
//! fold (sliding window, mirroring; logits averaged over folds, as nnU-Net does), export to the
//! input's geometry; an ensemble averages the exported probabilities; then postprocessing, and the
//! NIfTI with exactly the input's geometry. Reading and preprocessing the next case runs on its own
//! thread while the network works on the current one.

use std::path::Path;
use std::sync::mpsc::sync_channel;

use ndarray::Array4;
use nnflow::data::case_store::StoredCase;
use nnflow::data::dataset::{Case, Dataset};
use nnflow::data::npy;
use nnflow::evaluate::ensemble::{average_probabilities, probabilities_to_segmentation};
use nnflow::evaluate::postprocess::{apply_postprocessing, Postprocessing};
use nnflow::inference::export::{export_case, write_segmentation, RegionInfo};
use nnflow::inference::job::PredictJob;
use nnflow::inference::sliding_window::SlidingWindow;
use nnflow::network::Architecture;
use nnflow::preprocess::case_steps::{load_raw, normalize, resample, PlanView};
use tch::nn::VarStore;

use crate::predictor::Predictor;
use crate::trainer::{as_3d, build_network, select_device};
use crate::unet::PlainConvUNet;

/// One configuration: its plan and the networks of its folds.
struct Model {
    plan: PlanView,
    nets: Vec<(VarStore, PlainConvUNet)>,
}

pub fn predict(job: &PredictJob) -> Result<(), String> {
    tch::set_num_threads(job.threads.max(1) as i32);
    let device = select_device(job.device)?;
    let amp = job.amp && device.is_cuda();
    let dataset = Dataset::open(&job.dataset).map_err(|e| e.to_string())?;
    let regions = RegionInfo::from_dataset(&dataset)?;
    let plans: serde_json::Value = read_json(&job.plans)?;
    let rules = match &job.postprocessing {
        Some(path) => read_json::<Postprocessing>(path)?.rules,
        None => Vec::new(),
    };
    let num_classes = dataset.num_segmentation_heads();
    let mut models = Vec::new();
    for model in &job.models {
        let plan = PlanView::new(&plans, &model.configuration)?;
        let arch = Architecture::from_plan(
            &plan.configuration.json["architecture"],
            dataset.channels.len(),
            num_classes,
            false,
        )?;
        let mut nets = Vec::new();
        for checkpoint in &model.checkpoints {
            let (mut vs, net) = build_network(&arch, device, 0);
            vs.load(checkpoint)
                .map_err(|e| format!("{}: {e}", checkpoint.display()))?;
            nets.push((vs, net));
        }
        models.push(Model { plan, nets });
    }
    std::fs::create_dir_all(&job.output).map_err(|e| format!("{}: {e}", job.output.display()))?;

    // cases are read and preprocessed (for every configuration) one ahead of the network
    let (sender, receiver) = sync_channel::<Result<(String, Vec<StoredCase>), String>>(1);
    let cases = job.cases.clone();
    let plans_for_reader: Vec<PlanView> = job
        .models
        .iter()
        .map(|m| PlanView::new(&plans, &m.configuration))
        .collect::<Result<_, _>>()?;
    std::thread::spawn(move || {
        for (id, images) in cases {
            let case = Case {
                id: id.clone(),
                images,
                label: Default::default(),
            };
            let prepared = plans_for_reader
                .iter()
                .map(|plan| {
                    let mut stored = load_raw(&case, false, plan.transpose_forward)?;
                    normalize(&mut stored, plan)?;
                    resample(stored, plan)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|stored| (id.clone(), stored))
                .map_err(|e| format!("case {id}: {e}"));
            if sender.send(prepared).is_err() {
                return;
            }
        }
    });
    for _ in 0..job.cases.len() {
        let (id, prepared) = receiver
            .recv()
            .map_err(|_| "the reading thread stopped".to_string())??;
        let started = std::time::Instant::now();
        let ensemble = models.len() > 1;
        let mut segmentation = None;
        let mut probabilities: Vec<Array4<f32>> = Vec::new();
        let mut properties = None;
        for (model, case) in models.iter().zip(&prepared) {
            let logits = fold_average(model, case, job, device, amp)?;
            let want_probabilities = ensemble || job.save_probabilities;
            let exported = export_case(
                logits.view(),
                &case.properties,
                &model.plan.configuration.json,
                regions.as_ref(),
                want_probabilities,
            )
            .map_err(|e| format!("case {id}: {e}"))?;
            segmentation = Some(exported.segmentation);
            probabilities.extend(exported.probabilities);
            properties = Some(case.properties.clone());
        }
        let properties = properties.ok_or("no model")?;
        let mut labels = match (ensemble, segmentation) {
            (false, Some(seg)) => seg.mapv(i32::from),
            _ => {
                let views: Vec<_> = probabilities.iter().map(|p| p.view()).collect();
                let order: Option<Vec<i32>> = regions
                    .as_ref()
                    .map(|r| r.regions_class_order.iter().map(|&v| v as i32).collect());
                let averaged = average_probabilities(&views).map_err(|e| format!("case {id}: {e}"))?;
                let seg = probabilities_to_segmentation(averaged.view(), order.as_deref())
                    .map_err(|e| format!("case {id}: {e}"))?;
                probabilities = vec![averaged];
                seg
            }
        };
        if !rules.is_empty() {
            labels = apply_postprocessing(labels.view(), &rules);
        }
        let file = job.output.join(format!("{id}{}", dataset.file_ending));
        write_segmentation(&file, &labels.mapv(|v| v as i16), &properties)?;
        if job.save_probabilities {
            if let Some(p) = probabilities.first() {
                npy::write(&job.output.join(format!("{id}.npy")), p.view()).map_err(|e| e.to_string())?;
            }
        }
        println!(
            "{id}: {} ({:.1} s)",
            file.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Logits of one preprocessed case, averaged over the configuration's folds.
fn fold_average(
    model: &Model,
    case: &StoredCase,
    job: &PredictJob,
    device: tch::Device,
    amp: bool,
) -> Result<Array4<f32>, String> {
    let patch: Vec<usize> = serde_json::from_value(model.plan.configuration.json["patch_size"].clone())
        .map_err(|e| format!("configuration {}: patch_size: {e}", model.plan.configuration.name))?;
    let mut sum: Option<Array4<f32>> = None;
    for (_, net) in &model.nets {
        let predictor = Predictor {
            net,
            device,
            window: SlidingWindow {
                step_size: job.step_size,
                ..SlidingWindow::new(as_3d(&patch))
            },
            mirror_axes: if job.mirroring {
                (0..patch.len()).collect()
            } else {
                Vec::new()
            },
            amp,
        };
        let logits = predictor.predict_logits(case.data.view())?;
        sum = Some(match sum {
            Some(total) => total + logits,
            None => logits,
        });
    }
    let total = sum.ok_or("a configuration without folds")?;
    Ok(total / model.nets.len() as f32)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
