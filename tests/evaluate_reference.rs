//! Evaluation against nnU-Net 2.8.1's compute_metrics_on_folder (tests/fixtures/evaluate/generate.py):
//! per case, per label (or region) counts, Dice and IoU, ignore label, NaN rules, means.

use nnflow::data::nifti;
use nnflow::evaluate::metrics::{case_metrics, summarize, Metrics, Target};
use serde_json::Value;

fn close(ours: f64, theirs: &Value, what: &str) {
    match theirs.as_f64() {
        None => assert!(ours.is_nan(), "{what}: expected NaN (null), got {ours}"),
        Some(expected) => assert!(
            (ours - expected).abs() <= 1e-12 * expected.abs().max(1.0),
            "{what}: {ours} vs {expected}"
        ),
    }
}

fn compare(ours: &Metrics, theirs: &Value, what: &str) {
    let ours_json = serde_json::to_value(ours).unwrap();
    for name in ["Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"] {
        let value = ours_json[name].as_f64().unwrap_or(f64::NAN);
        close(value, &theirs[name], &format!("{what} {name}"));
    }
}

#[test]
fn metrics_and_summary_equal_nnunets() {
    for name in ["labels", "regions"] {
        let folder = format!("{}/tests/fixtures/evaluate/{name}", env!("CARGO_MANIFEST_DIR"));
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{folder}/summary.json")).unwrap())
                .unwrap();
        let targets: Vec<Target> = fixture["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| match l.as_array() {
                Some(labels) => Target::Region(labels.iter().map(|v| v.as_i64().unwrap() as i32).collect()),
                None => Target::Label(l.as_i64().unwrap() as i32),
            })
            .collect();
        let ignore = fixture["ignore_label"].as_i64().map(|v| v as i32);
        let summary = &fixture["summary"];
        let mut cases = Vec::new();
        for case in summary["metric_per_case"].as_array().unwrap() {
            let read = |key: &str| {
                nifti::read_integer_labels(format!(
                    "{folder}/{}/{}",
                    if key == "reference_file" { "ref" } else { "pred" },
                    case[key].as_str().unwrap()
                ))
                .unwrap()
                .0
            };
            let metrics = case_metrics(
                read("reference_file").view(),
                read("prediction_file").view(),
                &targets,
                ignore,
            );
            for target in &targets {
                compare(
                    &metrics[&target.evaluation_key()],
                    &case["metrics"][target.evaluation_key()],
                    &format!("{name} {} {}", case["reference_file"], target.evaluation_key()),
                );
            }
            cases.push(metrics);
        }
        let ours = summarize(&cases, &targets);
        for target in &targets {
            compare(
                &ours.mean[&target.evaluation_key()],
                &summary["mean"][target.evaluation_key()],
                &format!("{name} mean {}", target.evaluation_key()),
            );
        }
        compare(
            &ours.foreground_mean,
            &summary["foreground_mean"],
            &format!("{name} foreground mean"),
        );
    }
}
