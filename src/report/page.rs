//! The report page: `index.html` and its pictures in one folder, readable without a network.
//! Sections: the DAG with each stage's state, the dataset and its plan, the trainings (nnU-Net's
//! progress figure and their figures), the cross-validation and the model choice, one row per
//! validation and test case (Dice per label, worst first) and each case's overlays.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::overlay::{label_colour, percentile_window, render_overlays, OverlayInput};
use super::sources::Sources;
use crate::data::dataset::Dataset;
use crate::data::image;
use crate::file_error::FileError;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    File(#[from] FileError),
}

/// What the page holds, for the command's message.
pub struct Written {
    pub index: PathBuf,
    pub cases: usize,
    pub pictures: usize,
}

/// One row of the per-case table.
struct CaseRow {
    set: String,
    case: String,
    dice: Vec<(String, f64)>,
    /// The files its overlays are drawn from.
    image: Option<PathBuf>,
    reference: Option<PathBuf>,
    prediction: Option<PathBuf>,
}

impl CaseRow {
    fn mean_dice(&self) -> f64 {
        let finite: Vec<f64> = self
            .dice
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| d.is_finite())
            .collect();
        if finite.is_empty() {
            f64::NAN
        } else {
            finite.iter().sum::<f64>() / finite.len() as f64
        }
    }

    fn anchor(&self) -> String {
        format!("case-{}-{}", slug(&self.set), slug(&self.case))
    }
}

/// Writes `out/index.html` and the pictures it shows (the folder is made anew).
pub fn write_page(sources: &Sources, out: &Path) -> Result<Written, ReportError> {
    std::fs::create_dir_all(out.join("img")).map_err(FileError::io(out))?;
    let dataset = sources.dataset.as_deref().and_then(|d| Dataset::open(d).ok());
    let plans = read_json(sources.plan.as_ref().map(|p| p.join("plans.json")));
    let fingerprint = read_json(sources.plan.as_ref().map(|p| p.join("dataset_fingerprint.json")));
    let mut html = String::new();
    let mut pictures = 0;
    page_start(&mut html, &sources.pipeline);
    dag_section(&mut html, sources);
    dataset_section(&mut html, dataset.as_ref(), fingerprint.as_ref(), plans.as_ref());
    pictures += training_section(&mut html, sources, out)?;
    cross_validation_section(&mut html, sources);
    let mut rows = case_rows(sources, dataset.as_ref());
    rows.sort_by(|a, b| a.mean_dice().total_cmp(&b.mean_dice()));
    case_table(&mut html, &rows, dataset.as_ref());
    pictures += overlay_section(&mut html, &rows, dataset.as_ref(), fingerprint.as_ref(), out)?;
    html.push_str(SORT_SCRIPT);
    html.push_str("</body>\n</html>\n");
    let index = out.join("index.html");
    crate::atomic_file::write_atomically(&index, html.as_bytes()).map_err(FileError::io(&index))?;
    Ok(Written {
        index,
        cases: rows.len(),
        pictures,
    })
}

fn read_json(path: Option<PathBuf>) -> Option<Value> {
    let text = std::fs::read_to_string(path?).ok()?;
    serde_json::from_str(&text).ok()
}

fn page_start(html: &mut String, pipeline: &str) {
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>nnflow report: {0}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>nnflow report: {0}</h1>\n<nav><a href=\"#dag\">Stages</a> <a href=\"#dataset\">Dataset</a> \
         <a href=\"#training\">Training</a> <a href=\"#crossval\">Cross-validation</a> \
         <a href=\"#cases\">Cases</a> <a href=\"#overlays\">Overlays</a></nav>\n",
        escape(pipeline)
    );
}

fn dag_section(html: &mut String, sources: &Sources) {
    html.push_str("<section id=\"dag\"><h2>Stages</h2>\n");
    if sources.stages.is_empty() {
        html.push_str(
            "<p>Made by the pipeline's <code>report</code> stage from the results it was given; \
             <code>nnflow report PIPELINE</code> also shows every stage's state.</p></section>\n",
        );
        return;
    }
    if sources.stages.iter().all(|s| s.state != "fresh") {
        html.push_str(
            "<p class=\"missing\">Nothing has run yet for the pipeline as it is now: \
             <code>nnflow run</code> it, then make the report again.</p>\n",
        );
    }
    html.push_str(
        "<table class=\"sortable\"><thead><tr><th>stage</th><th>kind</th><th>state</th>\
         <th>why</th><th>last run</th><th>seconds</th><th>after</th></tr></thead><tbody>\n",
    );
    for stage in &sources.stages {
        // a failure's message; a skip's reason is in "why" already
        let last = match (&stage.last_outcome, &stage.last_error) {
            (Some(outcome), Some(error)) if outcome == "failed" => format!("{outcome}: {error}"),
            (Some(outcome), None) => outcome.clone(),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            html,
            "<tr class=\"state-{state}\"><td>{id}</td><td>{kind}</td><td>{state}</td><td class=\"why\">{why}</td>\
             <td>{last}</td><td>{seconds}</td><td class=\"after\">{after}</td></tr>",
            id = escape(&stage.id),
            kind = escape(&stage.kind),
            state = escape(&stage.state),
            why = escape(&stage.reasons.join("; ")),
            last = escape(&last),
            seconds = stage.seconds.map_or("-".to_string(), |s| format!("{s:.1}")),
            after = escape(&stage.after.join(", ")),
        );
    }
    html.push_str("</tbody></table></section>\n");
}

fn dataset_section(
    html: &mut String,
    dataset: Option<&Dataset>,
    fingerprint: Option<&Value>,
    plans: Option<&Value>,
) {
    html.push_str("<section id=\"dataset\"><h2>Dataset</h2>\n");
    let Some(dataset) = dataset else {
        html.push_str("<p class=\"missing\">No fingerprinted dataset yet (the fingerprint stage has not run).</p></section>\n");
        return;
    };
    let _ = writeln!(
        html,
        "<p>{} training cases, channels {}, images <code>{}</code></p>",
        dataset.cases.len(),
        escape(&dataset.channels.join(", ")),
        escape(&dataset.file_ending)
    );
    html.push_str("<h3>Labels</h3>");
    html.push_str(&label_legend(dataset));
    if let Some(fp) = fingerprint {
        html.push_str("<h3>Fingerprint</h3><table><thead><tr><th></th><th>min</th><th>median</th><th>max</th></tr></thead><tbody>\n");
        for (name, key) in [
            ("spacing (z, y, x)", "spacings"),
            ("shape after crop (z, y, x)", "shapes_after_crop"),
        ] {
            if let Some(rows) = fp[key].as_array() {
                let _ = writeln!(html, "<tr><td>{name}</td>{}</tr>", spread(rows));
            }
        }
        html.push_str(
            "</tbody></table>\n<h3>Foreground intensities per channel</h3><table><thead><tr><th>channel</th>\
            <th>0.5%</th><th>mean</th><th>median</th><th>99.5%</th></tr></thead><tbody>\n",
        );
        if let Some(channels) = fp["foreground_intensity_properties_per_channel"].as_object() {
            for (channel, props) in channels {
                let name = channel
                    .parse::<usize>()
                    .ok()
                    .and_then(|c| dataset.channels.get(c))
                    .cloned()
                    .unwrap_or_default();
                let _ = writeln!(
                    html,
                    "<tr><td>{channel} {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&name),
                    number(&props["percentile_00_5"]),
                    number(&props["mean"]),
                    number(&props["median"]),
                    number(&props["percentile_99_5"])
                );
            }
        }
        html.push_str("</tbody></table>\n");
    }
    if let Some(configurations) = plans.and_then(|p| p["configurations"].as_object()) {
        html.push_str(
            "<h3>Plan</h3><table><thead><tr><th>configuration</th><th>patch</th><th>batch</th>\
            <th>spacing</th><th>network stages</th><th>features per stage</th></tr></thead><tbody>\n",
        );
        for (name, conf) in configurations {
            let arch = &conf["architecture"]["arch_kwargs"];
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(name),
                compact(&conf["patch_size"]),
                compact(&conf["batch_size"]),
                compact(&conf["spacing"]),
                compact(&arch["n_stages"]),
                compact(&arch["features_per_stage"]),
            );
        }
        html.push_str("</tbody></table>\n");
    }
    html.push_str("</section>\n");
}

/// The dataset's labels, each with its overlay colour (regions and background have none).
fn label_legend(dataset: &Dataset) -> String {
    let mut legend = String::from("<p class=\"labels\">");
    for label in &dataset.labels {
        let value = match &label.value {
            crate::data::dataset::LabelValue::Single(v) => v.to_string(),
            crate::data::dataset::LabelValue::Region(vs) => format!("{vs:?}"),
        };
        let colour = match &label.value {
            crate::data::dataset::LabelValue::Single(v) if *v > 0 => Some(label_colour(*v as i32)),
            _ => None,
        };
        let swatch = colour.map_or(String::new(), |c| {
            format!(
                "<span class=\"swatch\" style=\"background:rgb({},{},{})\"></span>",
                c[0], c[1], c[2]
            )
        });
        let _ = write!(legend, "{swatch}{} = {value}&nbsp;&nbsp; ", escape(&label.name));
    }
    legend.push_str("</p>\n");
    legend
}

/// Min / median / max of each column of a list of 3-vectors, as table cells.
fn spread(rows: &[Value]) -> String {
    let mut cells = String::new();
    for pick in [0usize, 1, 2] {
        let mut per_axis: Vec<Vec<f64>> = vec![Vec::new(); 3];
        for row in rows {
            for (axis, v) in row.as_array().into_iter().flatten().enumerate().take(3) {
                per_axis[axis].push(v.as_f64().unwrap_or(f64::NAN));
            }
        }
        let values: Vec<String> = per_axis
            .iter_mut()
            .map(|axis| {
                axis.sort_by(f64::total_cmp);
                let v = match pick {
                    0 => axis.first().copied(),
                    1 => axis.get(axis.len() / 2).copied(),
                    _ => axis.last().copied(),
                };
                v.map_or("-".into(), |v| {
                    format!("{v:.3}")
                        .trim_end_matches('0')
                        .trim_end_matches('.')
                        .to_string()
                })
            })
            .collect();
        let _ = write!(cells, "<td>{}</td>", values.join(" x "));
    }
    cells
}

fn training_section(html: &mut String, sources: &Sources, out: &Path) -> Result<usize, ReportError> {
    html.push_str("<section id=\"training\"><h2>Training</h2>\n");
    if sources.trainings.is_empty() {
        html.push_str("<p class=\"missing\">No finished training yet.</p></section>\n");
        return Ok(0);
    }
    html.push_str("<table class=\"sortable\"><thead><tr><th>configuration</th><th>fold</th><th>epochs</th>\
        <th>final pseudo Dice (mov. avg.)</th><th>best (epoch)</th><th>s per epoch</th><th>waiting for data, s per epoch</th>\
        </tr></thead><tbody>\n");
    let mut figures = Vec::new();
    for training in &sources.trainings {
        let fold = read_json(Some(training.join("fold.json"))).unwrap_or(Value::Null);
        let (configuration, fold_name) = (text(&fold["configuration"]), text(&fold["fold"]));
        let history = read_json(Some(training.join("training_history.json"))).unwrap_or(Value::Null);
        let epochs = history.as_array().cloned().unwrap_or_default();
        let ema: Vec<f64> = epochs
            .iter()
            .map(|e| e["ema_pseudo_dice"].as_f64().unwrap_or(f64::NAN))
            .collect();
        let best = ema
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .max_by(|a, b| a.1.total_cmp(b.1));
        let mean_of = |key: &str| {
            let values: Vec<f64> = epochs.iter().filter_map(|e| e[key].as_f64()).collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&configuration),
            escape(&fold_name),
            epochs.len(),
            ema.last().map_or("-".into(), |v| format!("{v:.4}")),
            best.map_or("-".into(), |(epoch, v)| format!("{v:.4} ({epoch})")),
            mean_of("epoch_seconds").map_or("-".into(), |v| format!("{v:.2}")),
            mean_of("data_wait_seconds").map_or("-".into(), |v| format!("{v:.2}")),
        );
        let figure = training.join("progress.png");
        if figure.is_file() {
            let name = format!("img/progress_{}_{}.png", slug(&configuration), slug(&fold_name));
            std::fs::copy(&figure, out.join(&name)).map_err(FileError::io(&figure))?;
            figures.push((format!("{configuration}, fold {fold_name}"), name));
        }
    }
    html.push_str("</tbody></table>\n<div class=\"figures\">\n");
    for (caption, name) in &figures {
        let _ = writeln!(
            html,
            "<figure><a href=\"{name}\"><img src=\"{name}\" alt=\"training curves {c}\" width=\"300\"></a>\
             <figcaption>{c}</figcaption></figure>",
            c = escape(caption)
        );
    }
    html.push_str("</div></section>\n");
    Ok(figures.len())
}

fn cross_validation_section(html: &mut String, sources: &Sources) {
    html.push_str("<section id=\"crossval\"><h2>Cross-validation</h2>\n");
    let mut any = false;
    html.push_str("<table class=\"sortable\"><thead><tr><th>configuration</th><th>fold</th><th>label</th><th>Dice</th></tr></thead><tbody>\n");
    for training in &sources.trainings {
        let fold = read_json(Some(training.join("fold.json"))).unwrap_or(Value::Null);
        let Some(summary) = read_json(Some(training.join("validation/summary.json"))) else {
            continue;
        };
        for (label, metrics) in summary["mean"].as_object().into_iter().flatten() {
            any = true;
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&text(&fold["configuration"])),
                escape(&text(&fold["fold"])),
                escape(label),
                number(&metrics["Dice"])
            );
        }
    }
    html.push_str("</tbody></table>\n");
    if !any {
        html.push_str("<p class=\"missing\">No validation results yet.</p>\n");
    }
    if let Some(decision) = read_json(sources.select.as_ref().map(|s| s.join("decision.json"))) {
        html.push_str("<h3>Model choice</h3><table><thead><tr><th>candidate</th><th>foreground mean Dice</th></tr></thead><tbody>\n");
        let best = text(&decision["best"]["name"]);
        for candidate in decision["candidates"].as_array().into_iter().flatten() {
            let name = text(&candidate["name"]);
            let mark = if name == best { " class=\"chosen\"" } else { "" };
            let _ = writeln!(
                html,
                "<tr{mark}><td>{}{}</td><td>{}</td></tr>",
                escape(&name),
                if name == best { " (chosen)" } else { "" },
                number(&candidate["foreground_dice"])
            );
        }
        html.push_str("</tbody></table>\n");
    }
    if let Some(post) = read_json(
        sources
            .postprocess
            .as_ref()
            .map(|p| p.join("postprocessing.json")),
    ) {
        html.push_str("<h3>Postprocessing</h3><ul>\n");
        for step in post["steps"].as_array().into_iter().flatten() {
            let _ = writeln!(
                html,
                "<li>keep the largest component of {}: foreground mean Dice {} -> {}: {}</li>",
                escape(&compact(&step["rule"])),
                number(&step["before"]["foreground_mean_dice"]),
                number(&step["after"]["foreground_mean_dice"]),
                if step["accepted"].as_bool() == Some(true) {
                    "applied"
                } else {
                    "not applied"
                }
            );
        }
        html.push_str("</ul>\n");
    }
    html.push_str("</section>\n");
}

/// Validation cases of every training and the test cases, with Dice per label.
fn case_rows(sources: &Sources, dataset: Option<&Dataset>) -> Vec<CaseRow> {
    let ending = dataset.map_or(".nii.gz".to_string(), |d| d.file_ending.clone());
    let mut rows = Vec::new();
    for training in &sources.trainings {
        let fold = read_json(Some(training.join("fold.json"))).unwrap_or(Value::Null);
        let set = format!(
            "validation {} fold {}",
            text(&fold["configuration"]),
            text(&fold["fold"])
        );
        let Some(summary) = read_json(Some(training.join("validation/summary.json"))) else {
            continue;
        };
        for entry in summary["metric_per_case"].as_array().into_iter().flatten() {
            let file = text(&entry["prediction_file"]);
            let case = file.strip_suffix(&ending).unwrap_or(&file).to_string();
            let image = dataset
                .and_then(|d| d.case(&case))
                .and_then(|c| c.images.first().cloned());
            let reference = dataset.and_then(|d| d.case(&case)).map(|c| c.label.clone());
            rows.push(CaseRow {
                set: set.clone(),
                dice: dice_per_label(&entry["metrics"]),
                image,
                reference,
                prediction: Some(training.join("validation").join(&file)),
                case,
            });
        }
    }
    let Some(predictions) = &sources.predictions else {
        return rows;
    };
    // Dice per label of each scored prediction file, read once
    let scored: std::collections::BTreeMap<String, Vec<(String, f64)>> =
        read_json(sources.evaluation.as_ref().map(|e| e.join("summary.json")))
            .and_then(|s| s["metric_per_case"].as_array().cloned())
            .into_iter()
            .flatten()
            .map(|entry| (text(&entry["prediction_file"]), dice_per_label(&entry["metrics"])))
            .collect();
    let test_images = sources.test_images.clone();
    let listed = std::fs::read_dir(predictions).into_iter().flatten().flatten();
    let mut files: Vec<String> = listed
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| image::ending_of(Path::new(n)).is_some() && !n.starts_with('.'))
        .collect();
    files.sort();
    for file in files {
        let found = image::ending_of(Path::new(&file)).unwrap_or("");
        let case = file[..file.len() - found.len()].to_string();
        let dice = scored.get(&file).cloned().unwrap_or_default();
        let image = test_images
            .as_ref()
            .and_then(|folder| test_image(folder, &case, &ending));
        let reference = sources
            .test_labels
            .as_ref()
            .map(|l| l.join(&file))
            .filter(|p| p.is_file());
        rows.push(CaseRow {
            set: "test".into(),
            case,
            dice,
            image,
            reference,
            prediction: Some(predictions.join(&file)),
        });
    }
    rows
}

/// A test case's first channel: `<case>_0000<ending>`, `<case><ending>`, or a DICOM series folder.
fn test_image(folder: &Path, case: &str, ending: &str) -> Option<PathBuf> {
    let candidates = [
        folder.join(format!("{case}_0000{ending}")),
        folder.join(format!("{case}{ending}")),
        folder.join(format!("{case}_0000")),
        folder.join(case),
    ];
    candidates.into_iter().find(|p| p.exists())
}

fn dice_per_label(metrics: &Value) -> Vec<(String, f64)> {
    metrics
        .as_object()
        .into_iter()
        .flatten()
        .map(|(label, m)| (label.clone(), m["Dice"].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

fn case_table(html: &mut String, rows: &[CaseRow], dataset: Option<&Dataset>) {
    html.push_str("<section id=\"cases\"><h2>Cases</h2>\n");
    if rows.is_empty() {
        html.push_str("<p class=\"missing\">No validation or test predictions yet.</p></section>\n");
        return;
    }
    let mut labels: Vec<String> = rows
        .iter()
        .flat_map(|r| r.dice.iter().map(|(l, _)| l.clone()))
        .collect();
    labels.sort();
    labels.dedup();
    let name_of = |label: &str| {
        dataset
            .and_then(|d| {
                d.labels.iter().find(|l| match &l.value {
                    crate::data::dataset::LabelValue::Single(v) => v.to_string() == label,
                    crate::data::dataset::LabelValue::Region(vs) => format!("{vs:?}") == label,
                })
            })
            .map_or(label.to_string(), |l| format!("{} ({label})", l.name))
    };
    html.push_str("<p>Worst first by mean Dice; click a column to sort.</p>\n<table class=\"sortable\"><thead><tr><th>set</th><th>case</th><th>mean Dice</th>");
    for label in &labels {
        let _ = write!(html, "<th>Dice {}</th>", escape(&name_of(label)));
    }
    html.push_str("</tr></thead><tbody>\n");
    for row in rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td><a href=\"#{}\">{}</a></td><td>{}</td>",
            escape(&row.set),
            row.anchor(),
            escape(&row.case),
            dice_cell(row.mean_dice())
        );
        for label in &labels {
            let value = row
                .dice
                .iter()
                .find(|(l, _)| l == label)
                .map_or(f64::NAN, |(_, d)| *d);
            html.push_str(&format!("<td>{}</td>", dice_cell(value)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody></table></section>\n");
}

fn dice_cell(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.4}")
    } else {
        "-".into()
    }
}

fn overlay_section(
    html: &mut String,
    rows: &[CaseRow],
    dataset: Option<&Dataset>,
    fingerprint: Option<&Value>,
    out: &Path,
) -> Result<usize, ReportError> {
    html.push_str("<section id=\"overlays\"><h2>Overlays</h2>\n");
    html.push_str(LEGEND);
    if let Some(dataset) = dataset {
        html.push_str(&label_legend(dataset));
    }
    // CT is windowed with the dataset's foreground percentiles (as nnU-Net normalizes it), other
    // modalities per case
    let ct_window = dataset
        .filter(|d| d.channels.first().is_some_and(|c| c.eq_ignore_ascii_case("CT")))
        .and(fingerprint)
        .and_then(|fp| {
            let props = &fp["foreground_intensity_properties_per_channel"]["0"];
            Some((
                props["percentile_00_5"].as_f64()? as f32,
                props["percentile_99_5"].as_f64()? as f32,
            ))
        });
    let mut pictures = 0;
    for row in rows {
        let _ = writeln!(
            html,
            "<div class=\"case\" id=\"{}\"><h3>{} &middot; {}</h3>",
            row.anchor(),
            escape(&row.case),
            escape(&row.set)
        );
        match draw_case(row, ct_window) {
            Ok(views) if !views.is_empty() => {
                for view in views {
                    let name = format!("img/{}_{}.png", row.anchor(), view.view);
                    let path = out.join(&name);
                    crate::atomic_file::write_atomically(&path, &view.png).map_err(FileError::io(&path))?;
                    pictures += 1;
                    let _ = writeln!(
                        html,
                        "<figure><img src=\"{name}\" width=\"{}\" height=\"{}\" alt=\"{} {} slice {}\">\
                         <figcaption>{} (slice {})</figcaption></figure>",
                        view.width,
                        view.height,
                        escape(&row.case),
                        view.view,
                        view.slice,
                        view.view,
                        view.slice
                    );
                }
            }
            Ok(_) => html.push_str("<p class=\"missing\">no image to draw</p>"),
            Err(why) => {
                let _ = write!(html, "<p class=\"missing\">cannot draw: {}</p>", escape(&why));
            }
        }
        html.push_str("</div>\n");
    }
    html.push_str("</section>\n");
    Ok(pictures)
}

fn draw_case(
    row: &CaseRow,
    ct_window: Option<(f32, f32)>,
) -> Result<Vec<super::overlay::OverlayView>, String> {
    let Some(image_path) = &row.image else {
        return Err("the image is not found".into());
    };
    let decoded = image::read(image_path).map_err(|e| e.to_string())?;
    let first = decoded.channels.first().ok_or("the image has no channel")?;
    let labels = |path: &Option<PathBuf>| -> Result<Option<ndarray::Array3<i32>>, String> {
        match path {
            Some(p) if p.exists() => image::read_labels(p)
                .map(|(l, _)| Some(l))
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    };
    let reference = labels(&row.reference)?;
    let prediction = labels(&row.prediction)?;
    let input = OverlayInput {
        image: first.view(),
        reference: reference.as_ref().map(|r| r.view()),
        prediction: prediction.as_ref().map(|p| p.view()),
        spacing_zyx: decoded.geometry.spacing_zyx(),
        is_2d: decoded.geometry.ndim == 2 || first.shape()[0] == 1,
        window: ct_window.unwrap_or_else(|| percentile_window(first.view())),
    };
    render_overlays(&input).map_err(|e| e.to_string())
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn number(value: &Value) -> String {
    value.as_f64().map_or("-".into(), |v| format!("{v:.4}"))
}

fn compact(value: &Value) -> String {
    if value.is_null() {
        "-".into()
    } else {
        value.to_string().replace(',', ", ")
    }
}

fn slug(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
nav a{margin-right:1em}table{border-collapse:collapse;margin:.5em 0}\
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:90%}\
th{background:#eee}table.sortable th{cursor:pointer}\
tr.state-stale td,tr.state-new td{background:#fff4d6}tr.state-skipped td{color:#777}\
tr.chosen td{font-weight:bold}td.why{min-width:28em}td.after{font-size:75%}.missing{color:#a33}\
figure{display:inline-block;margin:.3em;vertical-align:top}figcaption{font-size:80%;text-align:center}\
.swatch{display:inline-block;width:1em;height:1em;margin-right:.3em;vertical-align:middle;border:1px solid #555}\
.case{border-top:1px solid #ddd;padding-top:.3em}";

const LEGEND: &str = "<p class=\"legend\">Each case: the slice through the largest foreground structure \
(of the reference, else of the prediction) in each view (axial, coronal, sagittal; one view for 2D). \
Reference: solid contour in the label's colour; prediction: dashed contour, the label's colour alternating \
with white; false negatives tinted cyan, false positives tinted magenta (violet: the wrong label). \
CT is windowed with the dataset's 0.5 / 99.5 % foreground percentiles, other images with their own.</p>\n";

/// Click a header to sort its table (numbers numerically, "-" last); no framework, no server.
const SORT_SCRIPT: &str = "<script>\n\
document.querySelectorAll('table.sortable').forEach(function (table) {\n\
  table.querySelectorAll('th').forEach(function (th, column) {\n\
    th.addEventListener('click', function () {\n\
      var body = table.tBodies[0];\n\
      var up = th.dataset.order !== 'up';\n\
      th.dataset.order = up ? 'up' : 'down';\n\
      var key = function (row) {\n\
        var text = row.cells[column].textContent.trim();\n\
        var value = parseFloat(text);\n\
        return isNaN(value) ? text : value;\n\
      };\n\
      Array.from(body.rows).sort(function (a, b) {\n\
        var x = key(a), y = key(b);\n\
        if (typeof x !== typeof y) { return typeof x === 'number' ? -1 : 1; }\n\
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);\n\
      }).forEach(function (row) { body.appendChild(row); });\n\
    });\n\
  });\n\
});\n\
</script>\n";
