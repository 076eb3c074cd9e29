//! Class-location sampling against nnU-Net 2.8.1 (tests/fixtures/class_locations/generate.py).

use ndarray::Array4;
use nnflow::preprocess::class_locations::{sample, Target};

#[test]
fn sampled_locations_equal_nnunets() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/class_locations/expected.json"
    );
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in cases.as_array().unwrap() {
        let shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).unwrap();
        let seg = match case["seg"].as_array() {
            Some(values) => {
                let values: Vec<i16> = values.iter().map(|v| v.as_i64().unwrap() as i16).collect();
                Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), values).unwrap()
            }
            None => {
                // big_class: two boxes, as the generator builds them.
                Array4::from_shape_fn((shape[0], shape[1], shape[2], shape[3]), |(_, z, y, x)| {
                    if (5..35).contains(&z) && (5..35).contains(&y) && (5..35).contains(&x) {
                        1
                    } else if z < 3 && y < 3 && x < 3 {
                        2
                    } else {
                        0
                    }
                })
            }
        };
        let targets: Vec<Target> = case["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| match c.as_array() {
                Some(labels) => Target::Region(labels.iter().map(|l| l.as_i64().unwrap() as i32).collect()),
                None => Target::Label(c.as_i64().unwrap() as i32),
            })
            .collect();
        let ours = sample(seg.view(), &targets);
        for expected in case["locations"].as_array().unwrap() {
            let key = expected["key"].as_str().unwrap();
            let picked = &ours[key];
            let name = case["name"].as_str().unwrap();
            assert_eq!(
                picked.len() as u64,
                expected["count"].as_u64().unwrap(),
                "{name} {key}"
            );
            let first: Vec<[usize; 4]> = serde_json::from_value(expected["first"].clone()).unwrap();
            assert_eq!(&picked[..first.len()], first.as_slice(), "{name} {key}");
            let sums: Vec<usize> = (0..4).map(|c| picked.iter().map(|p| p[c]).sum()).collect();
            let expected_sums: Vec<usize> = serde_json::from_value(expected["column_sums"].clone()).unwrap();
            assert_eq!(sums, expected_sums, "{name} {key}");
        }
    }
}
