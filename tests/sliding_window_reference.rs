//! nnflow's sliding-window predictor against fixtures written by nnU-Net 2.8.1 itself
//! (tests/fixtures/sliding_window/generate.py).

use std::convert::Infallible;

use ndarray::{Array4, ArrayView4};
use nnflow::inference::sliding_window::{
    compute_steps, gaussian_importance_map, gaussian_importance_map_in, pad_to_patch, predict_sliding_window,
    round_to_f16, sliding_window_slicers, Precision, SlidingWindow, SIGMA_SCALE, VALUE_SCALING_FACTOR,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixtures {
    gaussian: Vec<GaussianCase>,
    steps: Vec<StepsCase>,
    slicers: Vec<SlicersCase>,
    padding: Vec<PaddingCase>,
    end_to_end: Vec<EndToEndCase>,
    f16_rounding: RoundingCase,
}

#[derive(Deserialize)]
struct GaussianCase {
    patch: Vec<usize>,
    sigma_scale: f64,
    value_scaling_factor: f64,
    single: Vec<f32>,
    half: Vec<f32>,
}

#[derive(Deserialize)]
struct StepsCase {
    image: Vec<usize>,
    patch: Vec<usize>,
    step_size: f64,
    steps: Vec<Vec<usize>>,
}

#[derive(Deserialize)]
struct SlicersCase {
    image: [usize; 3],
    patch: Vec<usize>,
    step_size: f64,
    /// Per window, [start, stop] on z, y, x.
    slicers: Vec<[[usize; 2]; 3]>,
}

#[derive(Deserialize)]
struct PaddingCase {
    shape: [usize; 4],
    patch: Vec<usize>,
    padded_shape: Vec<usize>,
    /// [start, stop] on (c, z, y, x) recovering the original.
    slicer: Vec<[usize; 2]>,
    padded: Option<Vec<f32>>,
}

#[derive(Deserialize)]
struct EndToEndCase {
    shape: [usize; 4],
    patch: Vec<usize>,
    step_size: f64,
    use_gaussian: bool,
    num_classes: usize,
    net: FakeNet,
    half: Vec<f32>,
    single: Vec<f32>,
}

#[derive(Deserialize)]
struct FakeNet {
    weights: Vec<Vec<f32>>,
    bias: Vec<f32>,
    pos: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct RoundingCase {
    input: Vec<f32>,
    rounded: Vec<f32>,
}

fn fixtures() -> Fixtures {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sliding_window/fixtures.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture file; regenerate with generate.py");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// nnU-Net's 2-D patches are [y, x]; nnflow carries them as [1, y, x].
fn patch3(patch: &[usize]) -> [usize; 3] {
    match *patch {
        [y, x] => [1, y, x],
        [z, y, x] => [z, y, x],
        _ => panic!("patch {patch:?}"),
    }
}

/// generate.py's `test_image`: multiples of 1/8 from a fixed integer pattern.
fn test_image(shape: [usize; 4]) -> Array4<f32> {
    let values = (0..shape.iter().product::<usize>() as i64).map(|i| (i * 7919 % 41 - 20) as f32 / 8.0);
    Array4::from_shape_vec(shape, values.collect()).unwrap()
}

impl FakeNet {
    /// generate.py's `FakeNet`: per voxel, `W x + b + P . position-in-patch`. 2-D nets see (y, x) only.
    /// All terms are dyadic and small, so the result is exact whatever the summation order.
    fn predict(&self, patch: ArrayView4<f32>, two_d: bool) -> Array4<f32> {
        let (_, dz, dy, dx) = patch.dim();
        Array4::from_shape_fn((self.bias.len(), dz, dy, dx), |(k, z, y, x)| {
            let mut v = 0.0;
            for (c, w) in self.weights[k].iter().enumerate() {
                v += w * patch[[c, z, y, x]];
            }
            v += self.bias[k];
            let coords: &[usize] = if two_d { &[y, x] } else { &[z, y, x] };
            for (d, &coord) in coords.iter().enumerate() {
                v += self.pos[k][d] * coord as f32;
            }
            v
        })
    }
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, abs: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = abs + rel * w.abs();
        assert!((g - w).abs() <= tol, "{what}: element {i}: got {g}, want {w}");
    }
}

#[test]
fn gaussian_matches_compute_gaussian() {
    for case in fixtures().gaussian {
        let single = gaussian_importance_map(&case.patch, case.sigma_scale, case.value_scaling_factor);
        assert_eq!(single.shape(), &case.patch[..]);
        let what = format!("float32 map {:?}", case.patch);
        assert_close(single.as_slice().unwrap(), &case.single, 1e-6, 0.0, &what);
        let half = gaussian_importance_map_in(
            &case.patch,
            case.sigma_scale,
            case.value_scaling_factor,
            Precision::Half,
        );
        assert_eq!(
            half.as_slice().unwrap(),
            &case.half[..],
            "float16 map {:?}",
            case.patch
        );
    }
}

#[test]
fn steps_match_compute_steps_for_sliding_window() {
    for case in fixtures().steps {
        let steps = compute_steps(&case.image, &case.patch, case.step_size);
        assert_eq!(
            steps, case.steps,
            "image {:?} patch {:?} step {}",
            case.image, case.patch, case.step_size
        );
    }
}

#[test]
fn slicers_match_predictor_order() {
    for case in fixtures().slicers {
        let slicers = sliding_window_slicers(case.image, patch3(&case.patch), case.step_size);
        let got: Vec<[[usize; 2]; 3]> = slicers
            .iter()
            .map(|s| [0, 1, 2].map(|a| [s.start[a], s.end()[a]]))
            .collect();
        assert_eq!(got, case.slicers, "image {:?} patch {:?}", case.image, case.patch);
    }
}

#[test]
fn padding_matches_pad_nd_image() {
    for case in fixtures().padding {
        let image = test_image(case.shape);
        let (padded, padding) = pad_to_patch(image.view(), patch3(&case.patch));
        assert_eq!(
            padded.shape(),
            &case.padded_shape[..],
            "padded shape for {:?}",
            case.shape
        );
        let sh = padded.shape();
        let mut slicer = vec![[0, sh[0]]];
        slicer.extend((0..3).map(|a| [padding.before[a], sh[a + 1] - padding.after[a]]));
        assert_eq!(slicer, case.slicer, "revert slicer for {:?}", case.shape);
        assert_eq!(padding.unpad(padded.view()), image);
        if let Some(values) = case.padded {
            assert_eq!(padded.as_standard_layout().as_slice().unwrap(), &values[..]);
        }
    }
}

#[test]
fn end_to_end_matches_predict_sliding_window_return_logits() {
    for case in fixtures().end_to_end {
        let image = test_image(case.shape);
        let patch = patch3(&case.patch);
        let two_d = case.patch.len() == 2;
        let net = |p: ArrayView4<f32>| Ok::<_, Infallible>(case.net.predict(p, two_d));
        let what = format!("image {:?} patch {:?}", case.shape, case.patch);

        let single = predict_sliding_window(
            image.view(),
            patch,
            case.step_size,
            case.num_classes,
            case.use_gaussian,
            net,
        )
        .unwrap();
        assert_eq!(
            single.shape(),
            &[case.num_classes, case.shape[1], case.shape[2], case.shape[3]]
        );
        assert_close(
            single.as_slice().unwrap(),
            &case.single,
            1e-5,
            1e-5,
            &format!("float32, {what}"),
        );

        let settings = SlidingWindow {
            patch,
            step_size: case.step_size,
            use_gaussian: case.use_gaussian,
            precision: Precision::Half,
        };
        let half = settings.predict(image.view(), case.num_classes, net).unwrap();
        assert_eq!(half.as_slice().unwrap(), &case.half[..], "float16, {what}");
    }
}

#[test]
fn f16_rounding_matches_numpy() {
    let case = fixtures().f16_rounding;
    for (&x, &want) in case.input.iter().zip(&case.rounded) {
        let got = round_to_f16(x);
        assert!(
            got == want && got.is_sign_negative() == want.is_sign_negative(),
            "{x}: {got} != {want}"
        );
    }
}

#[test]
fn image_of_patch_size_returns_the_closure_output() {
    let patch = [6, 10, 8];
    let image = test_image([2, 6, 10, 8]);
    // Two logit channels built from the input so any misplacement or mixing would show.
    let net = |p: ArrayView4<f32>| {
        let mut out = Array4::zeros((2, p.dim().1, p.dim().2, p.dim().3));
        out.index_axis_mut(ndarray::Axis(0), 0)
            .assign(&p.index_axis(ndarray::Axis(0), 1));
        out.index_axis_mut(ndarray::Axis(0), 1)
            .assign(&(&p.index_axis(ndarray::Axis(0), 0) * 3.0 - 1.0));
        Ok::<_, Infallible>(out)
    };
    let expected = net(image.view()).unwrap();
    let plain = predict_sliding_window(image.view(), patch, 0.5, 2, false, net).unwrap();
    assert_eq!(
        plain, expected,
        "plain averaging of a single window is the identity"
    );
    // With the Gaussian the single window's weight cancels up to the rounding of p * g / g.
    let weighted = predict_sliding_window(image.view(), patch, 0.5, 2, true, net).unwrap();
    assert_close(
        weighted.as_slice().unwrap(),
        expected.as_slice().unwrap(),
        2.0 * f32::EPSILON,
        0.0,
        "gaussian",
    );
    let map = gaussian_importance_map(&patch, SIGMA_SCALE, VALUE_SCALING_FACTOR);
    assert_eq!(map[[3, 5, 4]], 10.0);
}

#[test]
fn predictor_errors_and_bad_shapes_are_reported() {
    let image = test_image([1, 4, 4, 4]);
    let failing = |_: ArrayView4<f32>| Err::<Array4<f32>, _>("no network");
    let err = predict_sliding_window(image.view(), [4, 4, 4], 0.5, 1, true, failing).unwrap_err();
    assert!(err.to_string().contains("no network"));
    let wrong = |_: ArrayView4<f32>| Ok::<_, Infallible>(Array4::zeros((1, 2, 2, 2)));
    let err = predict_sliding_window(image.view(), [4, 4, 4], 0.5, 1, true, wrong).unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
}
