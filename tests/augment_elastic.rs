//! Elastic deformation: the displacement field and the deformed resampling against batchgeneratorsv2
//! 0.3.6 (`tests/fixtures/augment/generate_elastic.py`, noise and draws fixed there), the statistics of
//! our own random fields against batchgeneratorsv2's, and behavioural guarantees (alignment of image
//! and segmentation, zero magnitude = no deformation, configuration).

use ndarray::{s, Array4};
use nnflow::augment::{
    elastic::Displacement,
    pipeline::TransformSpec,
    resample::resample,
    spatial::{affine_2d, affine_3d, center_crop, SpatialParams},
    Pipeline, Sample, SampleRng,
};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/augment/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("fixture is JSON")
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    nums(v).into_iter().map(|x| x as usize).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    nums(v).into_iter().map(|x| x as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn elastic_field_and_resampling_match_batchgeneratorsv2() {
    let fixture = load("spatial_elastic.json");
    for case in fixture["cases"].as_array().unwrap() {
        let patch = usizes(&case["patch"]);
        let in_shape = usizes(&case["in_shape"]);
        let dim = patch.len();
        let vox: usize = patch.iter().product();
        let noise: Vec<Vec<f32>> = f32s(&case["noise"]).chunks(vox).map(|c| c.to_vec()).collect();
        let sigmas: Vec<f64> = nums(&case["def_scales"])
            .iter()
            .zip(&patch)
            .map(|(s, &p)| s * p as f64)
            .collect();
        let magnitudes = nums(&case["magnitudes"]);

        // batchgeneratorsv2 returns its offsets before re-centring the grid
        let raw = Displacement::from_noise(&patch, noise.clone(), &sigmas, &magnitudes, false);
        let want = f32s(&case["offsets"]);
        let diff = max_abs_diff(&raw.fields.concat(), &want);
        assert!(diff < 2e-5, "{patch:?}: offsets differ by {diff}");

        let disp = Displacement::from_noise(&patch, noise, &sigmas, &magnitudes, true);
        let angles = nums(&case["angles"]);
        let scale = case["scale"].as_f64().unwrap();
        let (shape3, affine, out) = if dim == 3 {
            (
                [in_shape[0], in_shape[1], in_shape[2]],
                affine_3d([angles[0], angles[1], angles[2]], [scale; 3]),
                [patch[0], patch[1], patch[2]],
            )
        } else {
            (
                [1, in_shape[0], in_shape[1]],
                affine_2d(angles[1], [scale; 2]),
                [1, patch[0], patch[1]],
            )
        };
        let data = f32s(&case["data"]);
        let c = data.len() / shape3.iter().product::<usize>();
        let seg: Vec<i16> = nums(&case["seg"]).into_iter().map(|l| l as i16).collect();
        let sample = Sample {
            data: Array4::from_shape_vec((c, shape3[0], shape3[1], shape3[2]), data).unwrap(),
            seg: Array4::from_shape_vec((1, shape3[0], shape3[1], shape3[2]), seg).unwrap(),
        };
        let got = resample(&sample, &affine, Some(&disp), out, -1);
        let diff = max_abs_diff(got.data.as_slice().unwrap(), &f32s(&case["out_data"]));
        assert!(diff < 2e-4, "{patch:?}: data differs by {diff}");
        let want_seg: Vec<i16> = nums(&case["out_seg"]).into_iter().map(|l| l as i16).collect();
        let mismatches = got.seg.iter().zip(&want_seg).filter(|(a, b)| a != b).count();
        assert_eq!(
            mismatches,
            0,
            "{patch:?}: seg differs at {mismatches} of {} voxels",
            want_seg.len()
        );
    }
}

/// Mean standard deviation and mean circular lag-1 autocorrelation over fields and axes.
fn field_stats(fields: &[Vec<f32>], shape: [usize; 3]) -> (f64, f64) {
    let strides = [shape[1] * shape[2], shape[2], 1];
    let (mut stds, mut corrs) = (Vec::new(), Vec::new());
    for f in fields {
        let n = f.len() as f64;
        let mean = f.iter().map(|&v| v as f64).sum::<f64>() / n;
        let g: Vec<f64> = f.iter().map(|&v| v as f64 - mean).collect();
        let var = g.iter().map(|v| v * v).sum::<f64>() / n;
        stds.push(var.sqrt());
        for axis in 0..3 {
            let mut acc = 0.0;
            for (i, v) in g.iter().enumerate() {
                let pos = (i / strides[axis]) % shape[axis];
                // circular predecessor along `axis`, like np.roll(f, 1, axis)
                let j = if pos == 0 {
                    i + (shape[axis] - 1) * strides[axis]
                } else {
                    i - strides[axis]
                };
                acc += v * g[j];
            }
            corrs.push(acc / n / var);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&stds), mean(&corrs))
}

#[test]
fn random_fields_have_batchgeneratorsv2s_statistics() {
    let fixture = load("spatial_elastic.json");
    for case in fixture["stats"].as_array().unwrap() {
        let patch = usizes(&case["patch"]);
        let shape = [patch[0], patch[1], patch[2]];
        let def_scale = case["def_scale"].as_f64().unwrap();
        let magnitude = case["magnitude"].as_f64().unwrap();
        let sigmas: Vec<f64> = patch.iter().map(|&p| def_scale * p as f64).collect();
        let draws = 8;
        let mut fields = Vec::new();
        for k in 0..draws {
            let mut rng = SampleRng::new(11, 0, k);
            let d = Displacement::draw(&patch, &sigmas, &[magnitude; 3], &mut rng, false);
            fields.extend(d.fields);
        }
        let (std, corr) = field_stats(&fields, shape);
        let (want_std, want_corr) = (case["std"].as_f64().unwrap(), case["lag1_corr"].as_f64().unwrap());
        // both are means over 24 fields; the fixture's spread bounds their sampling error well below this
        assert!(
            (std / want_std - 1.0).abs() < 0.08,
            "scale {def_scale}: std {std} vs {want_std}"
        );
        assert!(
            (corr - want_corr).abs() < 0.01,
            "scale {def_scale}: lag-1 {corr} vs {want_corr}"
        );
    }
}

/// Blocky labels 0..3 (plus a -1 slab) and an image equal to 10 * label.
fn labelled(shape: (usize, usize, usize), block: [usize; 3]) -> Sample {
    let seg = Array4::from_shape_fn((1, shape.0, shape.1, shape.2), |(_, z, y, x)| {
        if z < 2 {
            -1
        } else {
            ((z / block[0] + y / block[1] + x / block[2]) % 4) as i16
        }
    });
    let data = seg.mapv(|l| 10.0 * l as f32);
    Sample { data, seg }
}

fn spatial_only(params: SpatialParams) -> Pipeline {
    Pipeline {
        transforms: vec![TransformSpec::Spatial(params)],
    }
}

#[test]
fn elastic_deformation_keeps_segmentation_aligned_with_image() {
    let input = labelled((40, 40, 40), [9, 10, 11]);
    for rotate in [false, true] {
        let params = SpatialParams {
            patch_size: vec![24, 24, 24],
            p_elastic_deform: 1.0,
            elastic_deform_scale: [0.1, 0.2],
            elastic_deform_magnitude: [2.0, 4.0],
            p_rotation: if rotate { 1.0 } else { 0.0 },
            ..Default::default()
        };
        let undeformed = SpatialParams {
            p_elastic_deform: 0.0,
            ..params.clone()
        };
        for index in 0..3 {
            let rng = SampleRng::new(2, 0, index);
            let out = spatial_only(params.clone()).apply(input.clone(), &rng).unwrap();
            assert_eq!(out.data.dim(), (1, 24, 24, 24));
            // the same rotation draws without the deformation give a different patch
            let plain = spatial_only(undeformed.clone())
                .apply(input.clone(), &rng)
                .unwrap();
            let moved = out
                .seg
                .iter()
                .zip(plain.seg.iter())
                .filter(|(a, b)| a != b)
                .count();
            assert!(
                moved > 100,
                "rotate {rotate}: deformation moved only {moved} labels"
            );
            let (mut interior, mut agree_interior, mut agree) = (0, 0, 0);
            for z in 1..23 {
                for y in 1..23 {
                    for x in 1..23 {
                        let l = out.seg[[0, z, y, x]];
                        let v = out.data[[0, z, y, x]];
                        let close = (v - 10.0 * l as f32).abs() < 0.5;
                        agree += close as usize;
                        let hood = out.seg.slice(s![0, z - 1..z + 2, y - 1..y + 2, x - 1..x + 2]);
                        if l >= 0 && hood.iter().all(|&n| n == l) {
                            interior += 1;
                            agree_interior += close as usize;
                        }
                    }
                }
            }
            assert!(interior > 2000, "{interior}");
            assert!(
                agree_interior as f64 > 0.95 * interior as f64,
                "rotate {rotate}: {agree_interior} of {interior} interior voxels agree"
            );
            assert!(agree as f64 > 0.5 * 22f64.powi(3), "{agree}");
        }
    }
}

#[test]
fn zero_magnitude_is_no_deformation() {
    let input = labelled((30, 30, 30), [5, 6, 7]);
    let zero = SpatialParams {
        patch_size: vec![20, 20, 20],
        p_elastic_deform: 1.0,
        elastic_deform_magnitude: [0.0, 0.0],
        ..Default::default()
    };
    // deformation alone: the grid is resampled, which for an even size difference is the centre crop
    let rng = SampleRng::new(4, 0, 0);
    let out = spatial_only(zero.clone()).apply(input.clone(), &rng).unwrap();
    let crop = center_crop(&input, [20, 20, 20], -1);
    let diff = max_abs_diff(out.data.as_slice().unwrap(), crop.data.as_slice().unwrap());
    assert!(diff < 1e-5, "{diff}");
    assert_eq!(out.seg, crop.seg);
    // with rotation and scaling: the same patch as without the deformation
    let rotated = SpatialParams {
        p_rotation: 1.0,
        p_scaling: 1.0,
        ..zero
    };
    let plain = SpatialParams {
        p_elastic_deform: 0.0,
        ..rotated.clone()
    };
    for index in 0..3 {
        let rng = SampleRng::new(4, 1, index);
        let a = spatial_only(rotated.clone()).apply(input.clone(), &rng).unwrap();
        let b = spatial_only(plain.clone()).apply(input.clone(), &rng).unwrap();
        let diff = max_abs_diff(a.data.as_slice().unwrap(), b.data.as_slice().unwrap());
        assert!(diff < 1e-4, "{diff}");
        assert_eq!(a.seg, b.seg);
    }
}

#[test]
fn elastic_parameters_configure_and_validate() {
    let p = Pipeline::from_json(
        r#"[{"name": "spatial", "patch_size": [16, 16, 16], "p_elastic_deform": 0.3,
             "elastic_deform_scale": [0.05, 0.1], "elastic_deform_magnitude": [1.0, 3.0],
             "p_synchronize_def_scale_across_axes": 0.5}]"#,
    )
    .unwrap();
    let TransformSpec::Spatial(s) = &p.transforms[0] else {
        panic!("{:?}", p.transforms[0])
    };
    assert_eq!(
        (
            s.p_elastic_deform,
            s.elastic_deform_scale,
            s.elastic_deform_magnitude
        ),
        (0.3, [0.05, 0.1], [1.0, 3.0])
    );
    // batchgeneratorsv2's defaults, with nnU-Net v2's p = 0
    let d = SpatialParams::default();
    assert_eq!(
        (
            d.p_elastic_deform,
            d.elastic_deform_scale,
            d.elastic_deform_magnitude
        ),
        (0.0, [0.0, 0.2], [0.0, 0.2])
    );
    assert_eq!(
        (d.p_synchronize_def_scale_across_axes, d.center_deformation),
        (0.0, true)
    );
    for p_ok in ["0", "0.5", "1"] {
        let json = format!(r#"[{{"name": "spatial", "patch_size": [8, 8], "p_elastic_deform": {p_ok}}}]"#);
        assert!(Pipeline::from_json(&json).is_ok(), "{p_ok}");
    }
    let bad = r#"[{"name": "spatial", "patch_size": [8, 8], "p_elastic_deform": 1.5}]"#;
    assert!(Pipeline::from_json(bad).is_err());
}

#[test]
fn elastic_2d_field_is_shared_by_every_slice() {
    // dummy 2D: a (y, x) patch on a 3D sample deforms every z slice alike; slices 2.. hold equal labels
    let input = labelled((6, 30, 30), [100, 4, 5]);
    let params = SpatialParams {
        patch_size: vec![20, 20],
        p_elastic_deform: 1.0,
        elastic_deform_scale: [0.1, 0.2],
        elastic_deform_magnitude: [2.0, 3.0],
        ..Default::default()
    };
    let rng = SampleRng::new(9, 0, 0);
    let out = spatial_only(params.clone()).apply(input.clone(), &rng).unwrap();
    assert_eq!(out.data.dim(), (1, 6, 20, 20));
    for z in 3..6 {
        assert_eq!(out.seg.slice(s![0, z, .., ..]), out.seg.slice(s![0, 2, .., ..]));
        assert_eq!(out.data.slice(s![0, z, .., ..]), out.data.slice(s![0, 2, .., ..]));
    }
    let plain = SpatialParams {
        p_elastic_deform: 0.0,
        ..params
    };
    let undeformed = spatial_only(plain).apply(input, &rng).unwrap();
    assert_ne!(out.seg, undeformed.seg);
}
