//! Augmentation kernels against batchgeneratorsv2 0.3.6 / nnU-Net 2.8.1 reference outputs produced by
//! `tests/fixtures/augment/generate.py` (random draws replaced by fixed values there).

use ndarray::{Array3, Array4, Axis};
use nnflow::augment::{
    blur::blur_channel,
    low_resolution::simulate_low_resolution,
    seg::downsample_seg,
    spatial::{affine_2d, affine_3d, resample_affine},
    DaConfig, Sample,
};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/augment/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("fixture is JSON")
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn i16s(v: &Value) -> Vec<i16> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i16)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn da_config_matches_nnunet() {
    for case in load("kernels.json")["da_config"].as_array().unwrap() {
        let patch = usizes(&case["patch_size"]);
        let cfg = DaConfig::from_patch_size(&patch).unwrap();
        assert_eq!(
            cfg.initial_patch_size,
            usizes(&case["initial_patch_size"]),
            "{patch:?}"
        );
        assert_eq!(cfg.dummy_2d, case["dummy_2d"].as_bool().unwrap(), "{patch:?}");
        assert_eq!(
            cfg.rotation_deg[1],
            case["rotation_deg"].as_f64().unwrap(),
            "{patch:?}"
        );
    }
}

#[test]
fn spatial_matches_batchgeneratorsv2() {
    let files = [load("spatial_a.json"), load("spatial_b.json")];
    for case in files.iter().flat_map(|f| f["spatial"].as_array().unwrap()) {
        let in_shape = usizes(&case["in_shape"]);
        let patch = usizes(&case["patch"]);
        let angles: Vec<f64> = case["angles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_f64().unwrap())
            .collect();
        let scale = case["scale"].as_f64().unwrap();
        let vox: usize = in_shape.iter().product();
        let data = f32s(&case["data"]);
        let c = data.len() / vox;
        let sample = Sample {
            data: Array4::from_shape_vec((c, in_shape[0], in_shape[1], in_shape[2]), data).unwrap(),
            seg: Array4::from_shape_vec((1, in_shape[0], in_shape[1], in_shape[2]), i16s(&case["seg"]))
                .unwrap(),
        };
        let (affine, out) = if patch.len() == 3 {
            (
                affine_3d([angles[0], angles[1], angles[2]], [scale; 3]),
                [patch[0], patch[1], patch[2]],
            )
        } else {
            (
                affine_2d(angles[2], [scale; 2]),
                [in_shape[0], patch[0], patch[1]],
            )
        };
        let got = resample_affine(&sample, &affine, out, -1);
        let want_data = f32s(&case["out_data"]);
        let diff = max_abs_diff(got.data.as_slice().unwrap(), &want_data);
        assert!(diff < 2e-4, "{patch:?}: data differs by {diff}");
        let want_seg = i16s(&case["out_seg"]);
        let mismatches: Vec<usize> = (0..want_seg.len())
            .filter(|&i| got.seg.as_slice().unwrap()[i] != want_seg[i])
            .collect();
        assert!(
            mismatches.is_empty(),
            "{patch:?}: seg differs at {} of {} voxels",
            mismatches.len(),
            want_seg.len()
        );
    }
}

#[test]
fn blur_matches_batchgeneratorsv2() {
    for case in load("kernels.json")["blur"].as_array().unwrap() {
        let shape = usizes(&case["shape"]);
        let sig: Vec<f64> = case["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_f64().unwrap())
            .collect();
        let mut a = Array3::from_shape_vec((shape[0], shape[1], shape[2]), f32s(&case["data"])).unwrap();
        blur_channel(a.view_mut(), [sig[0], sig[1], sig[2]]);
        let diff = max_abs_diff(a.as_slice().unwrap(), &f32s(&case["out"]));
        assert!(diff < 2e-4, "{shape:?}: {diff}");
    }
}

#[test]
fn low_resolution_matches_batchgeneratorsv2() {
    for case in load("kernels.json")["lowres"].as_array().unwrap() {
        let shape = usizes(&case["shape"]);
        let s = case["scale"].as_f64().unwrap();
        let mut scales = [s; 3];
        for a in usizes(&case["ignore_axes"]) {
            scales[a] = 1.0;
        }
        let mut a = Array3::from_shape_vec((shape[0], shape[1], shape[2]), f32s(&case["data"])).unwrap();
        simulate_low_resolution(a.view_mut(), scales);
        let diff = max_abs_diff(a.as_slice().unwrap(), &f32s(&case["out"]));
        assert!(diff < 2e-4, "{shape:?}: {diff}");
    }
}

#[test]
fn downsample_seg_matches_batchgeneratorsv2() {
    for case in load("kernels.json")["downsample_seg"].as_array().unwrap() {
        let shape = usizes(&case["shape"]);
        let seg = Array4::from_shape_vec((1, shape[0], shape[1], shape[2]), i16s(&case["seg"])).unwrap();
        let scales: Vec<[f64; 3]> = case["scales"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let v: Vec<f64> = s
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                [v[0], v[1], v[2]]
            })
            .collect();
        let outs = downsample_seg(seg.view(), &scales);
        for (got, want) in outs.iter().zip(case["outs"].as_array().unwrap()) {
            assert_eq!(
                got.index_axis(Axis(0), 0).shape(),
                usizes(&want["shape"]).as_slice()
            );
            assert_eq!(got.iter().copied().collect::<Vec<_>>(), i16s(&want["seg"]));
        }
    }
}
