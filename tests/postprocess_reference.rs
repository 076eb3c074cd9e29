//! Postprocessing, ensembling and model selection against nnU-Net 2.8.1
//! (tests/fixtures/postprocess/generate.py): acvl_utils' largest component, nnU-Net's
//! remove_all_but_largest_component_from_segmentation, determine_postprocessing's rules and every
//! score it compared, the postprocessed arrays, averaged probabilities and ensembled segmentations,
//! and find_best_configuration's pick.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, Ix3, Ix4};
use nnflow::data::npy;
use nnflow::evaluate::ensemble::{
    average_probabilities, candidates, probabilities_to_segmentation, select_best, soft_vote, Candidate,
};
use nnflow::evaluate::metrics::Target;
use nnflow::evaluate::postprocess::{
    apply_postprocessing, determine_postprocessing, remove_all_but_largest_component, Scores,
};
use nnflow::kernels::connected_components::{largest_component_mask, Connectivity};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/postprocess")
}

fn labels(path: &Path) -> Array3<i32> {
    npy::read_labels(path)
        .unwrap()
        .mapv(i32::from)
        .into_dimensionality::<Ix3>()
        .unwrap()
}

fn probabilities(path: &Path) -> Array4<f32> {
    npy::read::<f32>(path)
        .unwrap()
        .into_dimensionality::<Ix4>()
        .unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// nnU-Net's `labels_or_regions` argument (an int, a tuple, or a list of either) as the union of labels.
fn flatten(value: &Value) -> Vec<i32> {
    match value {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        v => vec![v.as_i64().unwrap() as i32],
    }
}

fn target(value: &Value) -> Target {
    match value {
        Value::Array(items) => Target::Region(items.iter().map(|v| v.as_i64().unwrap() as i32).collect()),
        v => Target::Label(v.as_i64().unwrap() as i32),
    }
}

fn same_scores(ours: &Scores, theirs: &Value, what: &str) {
    let dice = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let equal = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
    let expected = dice(&theirs["foreground_mean_dice"]);
    assert!(
        equal(ours.foreground_mean_dice, expected),
        "{what} foreground mean: {} vs {expected}",
        ours.foreground_mean_dice
    );
    let keys: Vec<&String> = theirs["mean_dice"].as_object().unwrap().keys().collect();
    assert_eq!(ours.mean_dice.keys().collect::<Vec<_>>(), keys, "{what} keys");
    for (key, &value) in &ours.mean_dice {
        let expected = dice(&theirs["mean_dice"][key]);
        assert!(equal(value, expected), "{what} {key}: {value} vs {expected}");
    }
}

#[test]
fn largest_component_equals_acvl_utils() {
    let folder = fixtures().join("components");
    let meta = json(&folder.join("components.json"));
    for i in 0..meta["masks"].as_u64().unwrap() {
        let mask = labels(&folder.join(format!("mask_{i}.npy"))).mapv(|v| v != 0);
        let expected = labels(&folder.join(format!("largest_{i}.npy"))).mapv(|v| v != 0);
        assert_eq!(
            largest_component_mask(mask.view(), Connectivity::Full),
            expected,
            "mask {i}"
        );
    }
    let seg = labels(&folder.join("seg.npy"));
    for case in meta["segmentation"].as_array().unwrap() {
        let expected = labels(&folder.join(case["output"].as_str().unwrap()));
        let ours = remove_all_but_largest_component(
            seg.view(),
            &flatten(&case["labels_or_regions"]),
            case["background"].as_i64().unwrap() as i32,
        );
        assert_eq!(ours, expected, "{}", case["labels_or_regions"]);
    }
}

#[test]
fn postprocessing_decision_equals_nnunets() {
    for dataset in ["labels", "fg", "regions"] {
        let folder = fixtures().join(dataset);
        let decision = json(&folder.join("decision.json"));
        let targets: Vec<Target> = decision["labels_or_regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(target)
            .collect();
        let foreground = flatten(&decision["foreground_labels"]);
        let ignore = decision["ignore_label"].as_i64().map(|v| v as i32);
        let cases = decision["cases"].as_u64().unwrap() as usize;
        let load = |i: usize| {
            Ok::<_, Infallible>((
                labels(&folder.join(format!("ref_{i}.npy"))),
                labels(&folder.join(format!("pred_{i}.npy"))),
            ))
        };
        let ours = determine_postprocessing(cases, load, &targets, &foreground, ignore).unwrap();

        // The accepted rules, in order.
        let theirs: Vec<Vec<i32>> = decision["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| flatten(&r["labels_or_regions"]))
            .collect();
        let rules: Vec<Vec<i32>> = ours.rules.iter().map(|r| r.labels.clone()).collect();
        assert_eq!(rules, theirs, "{dataset} rules");

        // Every summary nnU-Net compared: the input, then after each tested rule.
        let summaries = decision["summaries"].as_array().unwrap();
        assert_eq!(summaries.len(), ours.steps.len() + 1, "{dataset} steps");
        same_scores(&ours.input, &summaries[0], &format!("{dataset} input"));
        for (n, step) in ours.steps.iter().enumerate() {
            same_scores(
                &step.after,
                &summaries[n + 1],
                &format!("{dataset} after {}", step.rule.target),
            );
        }
        let post = &decision["postprocessing_json"]["postprocessed"];
        assert_eq!(
            Some(ours.postprocessed.foreground_mean_dice),
            post["foreground_mean"]["Dice"].as_f64(),
            "{dataset} final"
        );

        // The postprocessed predictions, and the JSON round trip of the decision.
        let back: nnflow::evaluate::postprocess::Postprocessing =
            serde_json::from_str(&serde_json::to_string_pretty(&ours).unwrap()).unwrap();
        assert_eq!(back.rules, ours.rules);
        for i in 0..cases {
            let prediction = labels(&folder.join(format!("pred_{i}.npy")));
            let expected = labels(&folder.join(format!("postprocessed_{i}.npy")));
            assert_eq!(
                apply_postprocessing(prediction.view(), &back.rules),
                expected,
                "{dataset} case {i}"
            );
        }
    }
}

#[test]
fn ensembling_equals_nnunets() {
    let folder = fixtures().join("ensemble");
    let meta = json(&folder.join("ensemble.json"));
    for name in ["labels", "regions"] {
        let order: Option<Vec<i32>> = meta[name]["regions_class_order"]
            .as_array()
            .map(|o| o.iter().map(|v| v.as_i64().unwrap() as i32).collect());
        for (case, info) in meta[name]["cases"].as_array().unwrap().iter().enumerate() {
            let models: Vec<Array4<f32>> = (0..info["models"].as_u64().unwrap())
                .map(|m| probabilities(&folder.join(format!("{name}_case{case}_model{m}.npy"))))
                .collect();
            let views: Vec<_> = models.iter().map(|m| m.view()).collect();
            let average = average_probabilities(&views).unwrap();
            let expected = probabilities(&folder.join(format!("{name}_case{case}_average.npy")));
            assert!(
                average
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} case {case}: average"
            );
            let seg = labels(&folder.join(format!("{name}_case{case}_segmentation.npy")));
            assert_eq!(
                probabilities_to_segmentation(expected.view(), order.as_deref()).unwrap(),
                seg,
                "{name} case {case}"
            );
            assert_eq!(
                soft_vote(&views, order.as_deref()).unwrap(),
                seg,
                "{name} case {case}"
            );
        }
    }
}

#[test]
fn selection_equals_find_best_configuration() {
    let fixture = json(&fixtures().join("selection.json"));
    let names: Vec<&str> = fixture["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (scenario, s) in fixture["scenarios"].as_object().unwrap() {
        let scores: Vec<f64> = s["singles"]
            .as_array()
            .unwrap()
            .iter()
            .chain(s["pair_scores"].as_array().unwrap())
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .collect();
        let all = candidates(names.len(), true);
        assert_eq!(all.len(), scores.len());
        for (n, pair) in s["pairs"].as_array().unwrap().iter().enumerate() {
            let (i, j) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_u64().unwrap() as usize,
            );
            assert_eq!(all[names.len() + n], Candidate::Pair(i, j));
        }
        // Scored in reverse order: the tie rule must not depend on the order given.
        let scored: Vec<(Candidate, f64)> = all.iter().copied().zip(scores).rev().collect();
        let picked: Vec<&str> = match select_best(&scored).unwrap() {
            Candidate::Single(i) => vec![names[i]],
            Candidate::Pair(i, j) => vec![names[i], names[j]],
        };
        match s["picked"].as_array() {
            Some(theirs) => {
                let theirs: Vec<&str> = theirs.iter().map(|v| v.as_str().unwrap()).collect();
                assert_eq!(picked, theirs, "{scenario}");
            }
            // nnU-Net fails when the first score is NaN; we skip NaN scores.
            None => assert_eq!(picked, vec![names[0], names[1]], "{scenario}: {}", s["picked"]),
        }
    }
}
