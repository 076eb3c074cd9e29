//! Behavioural guarantees of the augmentation pipeline: exact mirroring, image/segmentation alignment
//! under rotation and scaling, identity parameters, determinism, and 2D / dummy-2D shapes.

use ndarray::{s, Array4};
use nnflow::augment::{
    mirror::flip,
    pipeline::TransformSpec,
    spatial::{center_crop, SpatialParams},
    DaConfig, Pipeline, Sample, SampleRng,
};

/// Blocky labels 0..3 (plus a -1 slab) and an image equal to 10 * label.
fn labelled(shape: (usize, usize, usize)) -> Sample {
    labelled_blocks(shape, [5, 6, 7])
}

fn labelled_blocks(shape: (usize, usize, usize), block: [usize; 3]) -> Sample {
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
fn mirroring_twice_is_identity_and_moves_image_and_seg_together() {
    let orig = labelled((9, 10, 11));
    for axes in [vec![0], vec![1, 2], vec![0, 1, 2]] {
        let mut s = orig.clone();
        flip(&mut s, &axes);
        assert_ne!(s, orig, "{axes:?}: a flip must change this asymmetric sample");
        assert_eq!(
            s.data,
            s.seg.mapv(|l| 10.0 * l as f32),
            "{axes:?}: image and seg flipped together"
        );
        assert_eq!(
            s.data[[0, 8, 9, 10]],
            orig.data[[0, if axes.contains(&0) { 0 } else { 8 }, 0, 0]]
        );
        flip(&mut s, &axes);
        assert_eq!(s, orig, "{axes:?}");
    }
}

#[test]
fn spatial_keeps_segmentation_aligned_with_image() {
    let input = labelled_blocks((40, 40, 40), [9, 10, 11]);
    let params = SpatialParams {
        patch_size: vec![24, 24, 24],
        p_rotation: 1.0,
        p_scaling: 1.0,
        rotation_deg: [-30.0, 30.0],
        ..Default::default()
    };
    let pipeline = spatial_only(params);
    for index in 0..4 {
        let out = pipeline
            .apply(input.clone(), &SampleRng::new(1, 0, index))
            .unwrap();
        assert_eq!(out.data.dim(), (1, 24, 24, 24));
        assert_ne!(
            out,
            center_crop(&input, [24, 24, 24], -1),
            "rotation must have happened"
        );
        let (mut interior, mut agree) = (0, 0);
        for z in 1..23 {
            for y in 1..23 {
                for x in 1..23 {
                    let l = out.seg[[0, z, y, x]];
                    let neighbourhood = out.seg.slice(s![0, z - 1..z + 2, y - 1..y + 2, x - 1..x + 2]);
                    let v = out.data[[0, z, y, x]];
                    if (v - 10.0 * l as f32).abs() < 0.5 {
                        agree += 1;
                    }
                    if l >= 0 && neighbourhood.iter().all(|&n| n == l) {
                        interior += 1;
                        assert!(
                            (v - 10.0 * l as f32).abs() < 1e-3,
                            "label {l} but image {v} at {z},{y},{x}"
                        );
                    }
                }
            }
        }
        assert!(interior > 2000, "{interior}");
        // boundaries are interpolated in the image but hard in the seg; most voxels still agree
        assert!(agree as f64 > 0.5 * 22f64.powi(3), "{agree}");
    }
}

#[test]
fn identity_parameters_reproduce_the_centre_crop() {
    let input = labelled((30, 28, 26));
    let crop = center_crop(&input, [20, 20, 20], -1);
    let forced_identity = SpatialParams {
        patch_size: vec![20, 20, 20],
        p_rotation: 1.0,
        rotation_deg: [0.0, 0.0],
        p_scaling: 1.0,
        scaling: [1.0, 1.0],
        ..Default::default()
    };
    let no_draw = SpatialParams {
        p_rotation: 0.0,
        p_scaling: 0.0,
        ..forced_identity.clone()
    };
    let rng = SampleRng::new(5, 1, 2);
    assert_eq!(
        spatial_only(forced_identity).apply(input.clone(), &rng).unwrap(),
        crop
    );
    assert_eq!(spatial_only(no_draw).apply(input.clone(), &rng).unwrap(), crop);
    // and the crop is the centred window
    assert_eq!(
        crop.data.slice(s![.., .., .., ..]),
        input.data.slice(s![.., 5..25, 4..24, 3..23])
    );
}

#[test]
fn crop_pads_with_zero_and_minus_one() {
    let input = labelled((6, 8, 8));
    let out = center_crop(&input, [10, 8, 8], 7);
    assert!(out.seg.slice(s![0, 0..2, .., ..]).iter().all(|&l| l == 7));
    assert!(out.data.slice(s![0, 0..2, .., ..]).iter().all(|&v| v == 0.0));
    assert_eq!(out.seg.slice(s![.., 2..8, .., ..]), input.seg);
}

/// A pipeline where every transform fires, so every draw shows in the output.
fn all_on(da: &DaConfig) -> Pipeline {
    let mut p = Pipeline::nnunet_default(da);
    for t in &mut p.transforms {
        *t.gate_mut().1 = 1.0;
        if let TransformSpec::Spatial(s) = t {
            s.p_rotation = 1.0;
            s.p_scaling = 1.0;
        }
    }
    p
}

#[test]
fn same_keys_same_output_different_index_different_output() {
    let da = DaConfig::from_patch_size(&[16, 16, 16]).unwrap();
    let p = all_on(&da);
    let input = labelled((26, 26, 26));
    let a = p.apply(input.clone(), &SampleRng::new(9, 3, 4)).unwrap();
    let b = p.apply(input.clone(), &SampleRng::new(9, 3, 4)).unwrap();
    let c = p.apply(input.clone(), &SampleRng::new(9, 3, 5)).unwrap();
    let d = p.apply(input.clone(), &SampleRng::new(9, 4, 4)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.data, c.data);
    assert_ne!(a.data, d.data);
    assert_eq!(a.data.dim(), (1, 16, 16, 16));
    assert!(
        a.seg.iter().all(|&l| (0..4).contains(&l)),
        "remove_label turned -1 into 0"
    );
    // the batch path gives exactly the per-sample results, whatever the thread count
    let batch = p
        .apply_batch(vec![input.clone(), input.clone()], 9, 3, 4)
        .unwrap();
    assert_eq!(batch, vec![a, c]);
}

#[test]
fn disabling_one_transform_leaves_the_others_draws_alone() {
    let da = DaConfig::from_patch_size(&[16, 16, 16]).unwrap();
    let only_mirror =
        Pipeline::from_json(r#"[{"name": "spatial", "patch_size": [16, 16, 16]}, {"name": "mirror"}]"#)
            .unwrap();
    let mut with_noise_off = Pipeline::from_json(
        r#"[{"name": "spatial", "patch_size": [16, 16, 16]}, {"name": "gaussian_noise", "enabled": false},
            {"name": "mirror"}]"#,
    )
    .unwrap();
    let input = labelled((26, 26, 26));
    let rng = SampleRng::new(2, 0, 0);
    assert_eq!(
        only_mirror.apply(input.clone(), &rng).unwrap(),
        with_noise_off.apply(input.clone(), &rng).unwrap()
    );
    // and switching it on really changes the output
    if let TransformSpec::GaussianNoise(n) = &mut with_noise_off.transforms[1] {
        n.enabled = true;
        n.p = 1.0;
        n.variance = [0.5, 0.5];
    }
    assert_ne!(
        only_mirror.apply(input.clone(), &rng).unwrap(),
        with_noise_off.apply(input, &rng).unwrap()
    );
    let _ = da;
}

#[test]
fn two_d_and_dummy_two_d_shapes() {
    // 2D configuration: slices stored as z = 1
    let da2 = DaConfig::from_patch_size(&[32, 28]).unwrap();
    assert_eq!(da2.mirror_axes, vec![1, 2]);
    let input = Sample {
        data: Array4::from_shape_fn((2, 1, 50, 44), |(c, _, y, x)| (c + y + x) as f32),
        seg: Array4::from_shape_fn((1, 1, 50, 44), |(_, _, y, x)| ((y / 8 + x / 8) % 3) as i16),
    };
    let out = all_on(&da2).apply(input, &SampleRng::new(0, 0, 0)).unwrap();
    assert_eq!(out.data.dim(), (2, 1, 32, 28));
    assert!(out.data.iter().all(|v| v.is_finite()));
    // anisotropic 3D: in-plane augmentation, z kept
    let da3 = DaConfig::from_patch_size(&[8, 40, 36]).unwrap();
    assert!(da3.dummy_2d);
    let input = labelled((8, da3.initial_patch_size[1], da3.initial_patch_size[2]));
    let out = all_on(&da3).apply(input, &SampleRng::new(0, 0, 1)).unwrap();
    assert_eq!(out.data.dim(), (1, 8, 40, 36));
}

#[test]
fn mismatched_shapes_are_an_error_not_a_panic() {
    let da = DaConfig::from_patch_size(&[8, 8, 8]).unwrap();
    let bad = Sample {
        data: Array4::zeros((1, 8, 8, 8)),
        seg: Array4::zeros((1, 8, 8, 9)),
    };
    let err = Pipeline::nnunet_default(&da)
        .apply(bad, &SampleRng::new(0, 0, 0))
        .unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
}
