//! The cascade's augmentation of the previous stage's segmentation against nnU-Net 2.8.1 /
//! batchgeneratorsv2 0.3.6 / scikit-image 0.26 reference outputs produced by
//! `tests/fixtures/augment/generate_cascade.py`, plus properties of the random draws.

use std::time::Instant;

use ndarray::{Array3, Array4, Axis};
use nnflow::augment::cascade::morphology::{ball, disk, BinaryOperator};
use nnflow::augment::cascade::{
    apply_binary_operator, footprint, move_previous_stage_to_data, previous_stage_one_hot,
    removable_components, replace_component, RandomBinaryOperatorParams, RemoveRandomComponentParams,
};
use nnflow::augment::{Pipeline, Sample, SampleRng};
use nnflow::kernels::connected_components::{label_components, Connectivity};
use serde_json::Value;

fn fixture() -> Value {
    let path = format!(
        "{}/tests/fixtures/augment/cascade.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("fixture is JSON")
}

/// A (z, y, x) shape; 2D fixtures (two entries) get a z axis of one, as nnflow stores 2D samples.
fn shape3(v: &Value) -> (usize, usize, usize) {
    let s: Vec<usize> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    match s[..] {
        [y, x] => (1, y, x),
        [z, y, x] => (z, y, x),
        _ => panic!("shape {s:?}"),
    }
}

/// `np.packbits(...).hex()`: the first voxel is the most significant bit of the first byte.
fn unpack_bits(hex: &Value, dim: (usize, usize, usize)) -> Array3<bool> {
    let hex = hex.as_str().unwrap();
    let n = dim.0 * dim.1 * dim.2;
    let bits: Vec<bool> = (0..n)
        .map(|i| {
            let byte = u8::from_str_radix(&hex[i / 8 * 2..i / 8 * 2 + 2], 16).unwrap();
            byte >> (7 - i % 8) & 1 == 1
        })
        .collect();
    Array3::from_shape_vec(dim, bits).unwrap()
}

fn unpack_digits(digits: &Value, dim: (usize, usize, usize)) -> Array3<i16> {
    let values = digits
        .as_str()
        .unwrap()
        .bytes()
        .map(|b| (b - b'0') as i16)
        .collect();
    Array3::from_shape_vec(dim, values).unwrap()
}

/// Radii are stored as Python's `repr`: Rust's `parse` rounds correctly, serde_json's default float
/// parsing may not, and one bit of the radius can move a ball's boundary voxels.
fn radius(v: &Value) -> f64 {
    v.as_str().unwrap().parse().unwrap()
}

fn operator(name: &str) -> BinaryOperator {
    match name {
        "dilation" => BinaryOperator::Dilation,
        "erosion" => BinaryOperator::Erosion,
        "closing" => BinaryOperator::Closing,
        "opening" => BinaryOperator::Opening,
        _ => panic!("operator {name}"),
    }
}

/// (first axis length, member count, sum of member flat indices, sum of their squares).
fn summary(mask: &Array3<bool>, first_axis: usize) -> [u64; 4] {
    let members: Vec<u64> = mask
        .iter()
        .enumerate()
        .filter(|(_, &m)| m)
        .map(|(i, _)| i as u64)
        .collect();
    [
        first_axis as u64,
        members.len() as u64,
        members.iter().sum(),
        members.iter().map(|i| i * i).sum(),
    ]
}

#[test]
fn footprints_equal_skimage() {
    let f = fixture();
    for case in f["footprints"].as_array().unwrap() {
        let r = radius(&case["radius"]);
        let b = ball(r);
        let [n, _, _] = b.shape();
        assert_eq!(b.mask(), unpack_bits(&case["ball"], (n, n, n)), "ball({r})");
        let d = disk(r);
        let [_, n, _] = d.shape();
        assert_eq!(d.mask(), unpack_bits(&case["disk"], (1, n, n)), "disk({r})");
    }
    let rows = f["footprint_summaries"].as_array().unwrap();
    assert!(rows.len() > 900);
    for row in rows {
        let row = row.as_array().unwrap();
        let r = radius(&row[0]);
        let expected: Vec<u64> = row[1..].iter().map(|v| v.as_u64().unwrap()).collect();
        let mut actual = summary(&ball(r).mask(), ball(r).shape()[0]).to_vec();
        actual.extend(summary(&disk(r).mask(), disk(r).shape()[1]));
        assert_eq!(actual, expected, "radius {r}");
    }
}

#[test]
fn operators_equal_batchgeneratorsv2_fft_operators() {
    let mut checked = 0;
    for case in fixture()["operators"].as_array().unwrap() {
        let dim = shape3(&case["shape"]);
        let mask = unpack_bits(&case["mask"], dim);
        for (radius, results) in case["results"].as_object().unwrap() {
            let r: f64 = radius.parse().unwrap();
            let fp = footprint(r, dim.0);
            for (name, expected) in results.as_object().unwrap() {
                let actual = operator(name).apply(mask.view(), &fp);
                let expected = unpack_bits(expected, dim);
                let wrong = actual.iter().zip(&expected).filter(|(a, b)| a != b).count();
                assert_eq!(wrong, 0, "{name} radius {r} on {dim:?}: {wrong} voxels differ");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 5 * 4);
}

#[test]
fn components_equal_skimage_label() {
    for case in fixture()["components"].as_array().unwrap() {
        let dim = shape3(&case["shape"]);
        let mask = unpack_bits(&case["mask"], dim);
        let (labels, sizes) = label_components(mask.view(), Connectivity::Full);
        let expected: Vec<u32> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(labels.iter().copied().collect::<Vec<_>>(), expected, "{dim:?}");
        let expected_sizes: Vec<usize> = case["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(sizes, expected_sizes);
        assert!(sizes.len() > 10, "the fixture should have many components");
    }
}

#[test]
fn binary_operator_on_the_label_map_equals_nnunets_one_hot_transform() {
    for map in fixture()["label_maps"].as_array().unwrap() {
        let dim = shape3(&map["shape"]);
        let seg = unpack_digits(&map["seg"], dim);
        for case in map["binary_operator"].as_array().unwrap() {
            let mut out = seg.clone();
            for step in case["steps"].as_array().unwrap() {
                let label = step[0].as_i64().unwrap() as i16;
                let r = radius(&step[2]);
                apply_binary_operator(out.view_mut(), label, operator(step[1].as_str().unwrap()), r);
            }
            assert_eq!(out, unpack_digits(&case["out"], dim), "{dim:?} {}", case["steps"]);
        }
    }
}

#[test]
fn remove_component_on_the_label_map_equals_nnunets_one_hot_transform() {
    for map in fixture()["label_maps"].as_array().unwrap() {
        let dim = shape3(&map["shape"]);
        let seg = unpack_digits(&map["seg"], dim);
        for case in map["remove_component"].as_array().unwrap() {
            let max_fraction = case["max_fraction"].as_f64().unwrap();
            let mut draws = case["draws"].as_array().unwrap().iter();
            let mut out = seg.clone();
            for label in case["labels"].as_array().unwrap() {
                let label = label.as_i64().unwrap() as i16;
                let (components, eligible) = removable_components(out.view(), label, max_fraction);
                if eligible.is_empty() {
                    continue; // nnU-Net draws nothing for this label either
                }
                let draw = draws.next().expect("nnU-Net drew a component here");
                let expected: Vec<u32> = draw["eligible"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(eligible, expected, "label {label}");
                let fill = draw.get("fill").map_or(0, |f| f.as_i64().unwrap() as i16);
                replace_component(
                    out.view_mut(),
                    &components,
                    draw["removed"].as_u64().unwrap() as u32,
                    fill,
                );
            }
            assert!(draws.next().is_none());
            assert_eq!(
                out,
                unpack_digits(&case["out"], dim),
                "{dim:?} {}",
                case["labels"]
            );
        }
    }
}

#[test]
fn one_hot_equals_move_seg_as_one_hot_to_data() {
    let f = fixture();
    let labels: Vec<i16> = f["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap() as i16)
        .collect();
    let case = &f["one_hot"];
    let dim = shape3(&case["shape"]);
    let seg = unpack_digits(&case["seg"], dim);
    let expected = unpack_bits(&case["one_hot"], (labels.len(), dim.1, dim.2));
    let one_hot = previous_stage_one_hot(seg.view(), &labels);
    assert_eq!(one_hot.index_axis(Axis(1), 0).map(|&v| v == 1.0), expected);

    let mut seg2 = Array4::zeros((2, dim.0, dim.1, dim.2));
    seg2.index_axis_mut(Axis(0), 1).assign(&seg);
    seg2.index_axis_mut(Axis(0), 0).fill(7);
    let data = Array4::from_elem((2, dim.0, dim.1, dim.2), 0.5f32);
    let moved = move_previous_stage_to_data(Sample { data, seg: seg2 }, &labels).unwrap();
    assert_eq!(moved.data.dim().0, 2 + labels.len());
    assert!(moved
        .data
        .slice(ndarray::s![..2, .., .., ..])
        .iter()
        .all(|&v| v == 0.5));
    assert_eq!(moved.data.slice(ndarray::s![2.., .., .., ..]), one_hot);
    assert_eq!(moved.seg.dim().0, 1);
    assert!(moved.seg.iter().all(|&v| v == 7));
}

/// A sample whose previous-stage map holds one isolated 3x3x3 cube per label.
fn cubes_sample() -> Sample {
    let mut previous = Array3::<i16>::zeros((9, 9, 21));
    for (i, label) in [1i16, 2, 3].into_iter().enumerate() {
        let x0 = 2 + 7 * i;
        previous
            .slice_mut(ndarray::s![3..6, 3..6, x0..x0 + 3])
            .fill(label);
    }
    let mut seg = Array4::zeros((2, 9, 9, 21));
    seg.index_axis_mut(Axis(0), 1).assign(&previous);
    Sample {
        data: Array4::zeros((1, 9, 9, 21)),
        seg,
    }
}

fn count(sample: &Sample, label: i16) -> usize {
    sample
        .seg
        .index_axis(Axis(0), 1)
        .iter()
        .filter(|&&v| v == label)
        .count()
}

/// With radius 1 a 3x3x3 cube tells the operator apart: dilation grows it, erosion leaves its centre
/// (1 voxel), opening the radius-1 ball (7), closing leaves the cube (27).
#[test]
fn binary_operator_draws_every_label_and_operator_uniformly() {
    let draws = 1200;
    let run = |p_per_label: f64| -> [[usize; 4]; 3] {
        let params = RandomBinaryOperatorParams {
            p_per_label,
            strel_size: [1.0, 1.0],
            labels: vec![1, 2, 3],
            ..Default::default()
        };
        let mut tally = [[0usize; 4]; 3];
        for i in 0..draws {
            let mut s = cubes_sample();
            params.apply(&mut s, &mut SampleRng::new(5, 0, i));
            for label in 1..=3i16 {
                let kind = match count(&s, label) {
                    1 => 1,
                    7 => 3,
                    27 => 2,
                    n => {
                        assert!(n > 27, "label {label} has {n} voxels");
                        0
                    }
                };
                tally[label as usize - 1][kind] += 1;
            }
            assert_eq!(
                s.seg.index_axis(Axis(0), 0).sum(),
                0,
                "seg channel 0 is untouched"
            );
        }
        tally
    };
    // p_per_label = 1: every label gets an operator, each operator a quarter of the time
    for per_label in run(1.0) {
        for n in [per_label[0], per_label[1], per_label[3]] {
            assert!((n as f64 / draws as f64 - 0.25).abs() < 0.05, "{per_label:?}");
        }
    }
    // p_per_label = 0.5: a label is changed 3/8 of the time (closing leaves a cube as it is)
    for per_label in run(0.5) {
        let changed = draws as usize - per_label[2];
        assert!(
            (changed as f64 / draws as f64 - 0.375).abs() < 0.05,
            "{per_label:?}"
        );
    }
    // p_per_label = 0: nothing changes
    for per_label in run(0.0) {
        assert_eq!(per_label[2], draws as usize);
    }
}

/// Labels 1..3 with two small components each (rows of 4 and 6 voxels), label 1 also with a block
/// too large to be removed.
fn components_sample() -> Sample {
    let mut previous = Array3::<i16>::zeros((10, 12, 12));
    previous.slice_mut(ndarray::s![0..8, 0..6, 0..12]).fill(1); // 576 voxels: > 15 % of 1440
    for (i, label) in [1i16, 2, 3].into_iter().enumerate() {
        let y = 7 + i;
        previous.slice_mut(ndarray::s![9, y, 0..4]).fill(label);
        previous.slice_mut(ndarray::s![9, y, 6..12]).fill(label);
    }
    let mut seg = Array4::zeros((2, 10, 12, 12));
    seg.index_axis_mut(Axis(0), 1).assign(&previous);
    Sample {
        data: Array4::zeros((1, 10, 12, 12)),
        seg,
    }
}

#[test]
fn remove_component_removes_one_eligible_component_per_chosen_label() {
    let original = components_sample();
    let previous = original.seg.index_axis(Axis(0), 1).to_owned();
    // sanity of the construction: label 1 has the large block plus two small components
    for (label, expected) in [(1i16, 3usize), (2, 2), (3, 2)] {
        let mask = previous.map(|&v| v == label);
        assert_eq!(
            label_components(mask.view(), Connectivity::Full).1.len(),
            expected
        );
    }
    let draws = 600;
    let mut removed_small = [[0usize; 2]; 3];
    for i in 0..draws {
        let params = RemoveRandomComponentParams {
            p_per_label: 1.0,
            labels: vec![1, 2, 3],
            ..Default::default()
        };
        let mut s = original.clone();
        params.apply(&mut s, &mut SampleRng::new(9, 1, i));
        let after = s.seg.index_axis(Axis(0), 1);
        for label in 1..=3i16 {
            let mut gone = 0;
            for (&before, &now) in previous.iter().zip(after.iter()) {
                if before == label && now != label {
                    assert_eq!(now, 0, "removed voxels become background");
                    gone += 1;
                }
            }
            // exactly one whole small component went
            match gone {
                4 => removed_small[label as usize - 1][0] += 1,
                6 => removed_small[label as usize - 1][1] += 1,
                n => panic!("label {label}: {n} voxels removed"),
            }
        }
        // the large component is never eligible
        assert!(after.slice(ndarray::s![0..8, 0..6, ..]).iter().all(|&v| v == 1));
    }
    for per_label in removed_small {
        let share = per_label[0] as f64 / draws as f64;
        assert!((share - 0.5).abs() < 0.07, "{per_label:?}");
    }

    // p_per_label = 0 changes nothing; a fill probability of 1 moves the component to another label
    let mut s = original.clone();
    RemoveRandomComponentParams {
        p_per_label: 0.0,
        labels: vec![1, 2, 3],
        ..Default::default()
    }
    .apply(&mut s, &mut SampleRng::new(0, 0, 0));
    assert_eq!(s, original);
    let fg = |s: &Sample| s.seg.index_axis(Axis(0), 1).iter().filter(|&&v| v != 0).count();
    let mut s = original.clone();
    RemoveRandomComponentParams {
        p_per_label: 1.0,
        fill_with_other_class_p: 1.0,
        labels: vec![1, 2, 3],
        ..Default::default()
    }
    .apply(&mut s, &mut SampleRng::new(0, 0, 1));
    assert_ne!(s, original);
    assert_eq!(fg(&s), fg(&original), "filled, not cleared");
    // with no other label to fill with, the component is cleared (as in batchgeneratorsv2)
    let mut s = original.clone();
    RemoveRandomComponentParams {
        p_per_label: 1.0,
        fill_with_other_class_p: 1.0,
        labels: vec![2],
        ..Default::default()
    }
    .apply(&mut s, &mut SampleRng::new(0, 0, 1));
    assert!(fg(&s) < fg(&original));
}

#[test]
fn previous_stage_pipeline_touches_only_seg_channel_one() {
    let pipeline = Pipeline::default().with_previous_stage(&[1, 2, 3]);
    let original = cubes_sample();
    let mut changed = 0;
    for i in 0..200 {
        let out = pipeline
            .apply(original.clone(), &SampleRng::new(1, 2, i))
            .unwrap();
        assert_eq!(out.data, original.data);
        assert_eq!(
            out.seg.index_axis(Axis(0), 0),
            original.seg.index_axis(Axis(0), 0)
        );
        assert!(out.seg.iter().all(|&v| (0..=3).contains(&v)));
        changed += usize::from(out.seg != original.seg);
    }
    // p = 0.4 and 0.2, each label with p_per_label = 0.5: some but far from all samples change
    assert!((30..150).contains(&changed), "{changed} of 200 changed");
}

/// Not an assertion (tests never assert on wall-clock time): how long nnU-Net's largest radius takes
/// on a typical 3D patch, for comparison with batchgeneratorsv2's FFT convolution.
#[test]
fn speed_of_a_large_dilation_on_a_128_cube() {
    let dim = (128, 128, 128);
    let mask = Array3::from_shape_fn(dim, |(z, y, x)| {
        let d = |a: usize, c: f64| (a as f64 - c).powi(2);
        d(z, 60.0) + d(y, 70.0) + d(x, 64.0) < 900.0 || (z * 7 + y * 3 + x) % 97 == 0
    });
    let fp = ball(7.9);
    for op in BinaryOperator::ALL {
        let start = Instant::now();
        let out = op.apply(mask.view(), &fp);
        println!(
            "{op:?} ball(7.9) on 128^3: {:.3} s ({} voxels set)",
            start.elapsed().as_secs_f64(),
            out.iter().filter(|&&v| v).count()
        );
    }
    let start = Instant::now();
    let (_, sizes) = label_components(mask.view(), Connectivity::Full);
    println!(
        "label_components on 128^3: {:.3} s ({} components)",
        start.elapsed().as_secs_f64(),
        sizes.len()
    );
}
