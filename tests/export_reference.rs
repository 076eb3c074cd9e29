//! Export of a prediction to the raw image against nnU-Net 2.8.1's
//! `convert_predicted_logits_to_segmentation_with_correct_shape` and `export_prediction_from_logits`
//! (tests/fixtures/export/generate.py): an isotropic rotated case and an anisotropic cropped case,
//! both under transpose_forward [2, 0, 1], in 3D, 2D and region-based configurations. The case
//! properties come from nnflow's own loading of the raw image (checked equal to nnU-Net's); the
//! segmentation must match nnU-Net's voxel for voxel, the probabilities within 1e-4, and the
//! written NIfTI must carry the raw image's geometry as nibabel reads it.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, Ix3, Ix4};
use nnflow::data::dataset::Case;
use nnflow::data::geometry::Header;
use nnflow::data::{nifti, npy};
use nnflow::inference::export::{export_case, write_segmentation, RegionInfo};
use nnflow::plans::Plans;
use nnflow::preprocess::case_io::load_raw;
use nnflow::preprocess::case_steps::{resampled_shape, PlanView};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/export");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

fn usizes(value: &Value) -> Vec<usize> {
    serde_json::from_value(value.clone()).unwrap()
}

fn matrix(value: &Value) -> [[f64; 4]; 4] {
    serde_json::from_value(value.clone()).unwrap()
}

fn assert_matrix_close(ours: [[f64; 4]; 4], theirs: [[f64; 4]; 4], tolerance: f64, what: &str) {
    for r in 0..4 {
        for c in 0..4 {
            let (a, b) = (ours[r][c], theirs[r][c]);
            assert!((a - b).abs() <= tolerance, "{what}[{r}][{c}]: {a} != {b}");
        }
    }
}

/// nnflow's header against nibabel's report of a file: dims, pixdim, codes and the three matrices.
fn assert_geometry(header: &Header, nibabel: &Value, what: &str) {
    let dim: Vec<i16> = serde_json::from_value(nibabel["dim"].clone()).unwrap();
    assert_eq!(header.dim.to_vec(), dim, "{what}: dim");
    let pixdim: Vec<f64> = serde_json::from_value(nibabel["pixdim"].clone()).unwrap();
    let ours: Vec<f64> = header.pixdim.iter().map(|&v| f64::from(v)).collect();
    assert_eq!(ours, pixdim, "{what}: pixdim");
    assert_eq!(
        i64::from(header.sform_code),
        nibabel["sform_code"],
        "{what}: sform_code"
    );
    assert_eq!(
        i64::from(header.qform_code),
        nibabel["qform_code"],
        "{what}: qform_code"
    );
    assert_matrix_close(
        header.affine(),
        matrix(&nibabel["affine"]),
        1e-12,
        &format!("{what}: affine"),
    );
    assert_matrix_close(
        header.sform_affine(),
        matrix(&nibabel["sform"]),
        1e-12,
        &format!("{what}: sform"),
    );
    assert_matrix_close(
        header.qform_affine(),
        matrix(&nibabel["qform"]),
        1e-7,
        &format!("{what}: qform"),
    );
}

struct Reference {
    name: &'static str,
    /// Voxels where nnflow's segmentation equals nnU-Net's, and all voxels.
    agreement: (usize, usize),
    max_probability_difference: f32,
}

fn check_export(name: &'static str) -> Reference {
    let expected = json("expected.json");
    let plans = Plans::read(&fixture("plans.json")).unwrap();
    let export = &expected["exports"][name];
    let case_name = export["case"].as_str().unwrap();
    let plan = PlanView::new(&plans, export["configuration"].as_str().unwrap()).unwrap();

    // nnflow's own loading (read, transpose, crop) gives nnU-Net's properties.
    let image = fixture(&format!("{case_name}.nii.gz"));
    let case = Case {
        id: case_name.to_string(),
        images: vec![image.clone()],
        label: PathBuf::new(),
    };
    let loaded = load_raw(&case, false, plan.transpose_forward).unwrap();
    let mut properties = loaded.properties;
    let theirs = &export["properties"];
    assert_eq!(
        properties.shape_before_cropping.to_vec(),
        usizes(&theirs["shape_before_cropping"])
    );
    let bbox: Vec<[usize; 2]> = serde_json::from_value(theirs["bbox_used_for_cropping"].clone()).unwrap();
    assert_eq!(properties.bbox_used_for_cropping.to_vec(), bbox);
    assert_eq!(
        properties.shape_after_cropping_and_before_resampling.to_vec(),
        usizes(&theirs["shape_after_cropping_and_before_resampling"])
    );
    let spacing: Vec<f64> = serde_json::from_value(theirs["spacing"].clone()).unwrap();
    assert_eq!(
        properties.original_spacing.to_vec(),
        spacing,
        "{name}: raw spacing"
    );
    let shape = properties.shape_after_cropping_and_before_resampling;
    let preprocessed = resampled_shape(&properties, shape, &plan).unwrap();
    assert_eq!(
        preprocessed.to_vec(),
        usizes(&export["preprocessed_shape"]),
        "{name}"
    );
    properties.spacing = plan.target_spacing(properties.spacing).unwrap();
    properties.normalized = true;
    properties.resampled = true;
    assert_geometry(
        properties.geometry.nifti.as_ref().expect("a NIfTI image"),
        &expected["cases"][case_name]["image"],
        "raw image",
    );

    let logits = npy::read::<f32>(&fixture(&format!("{name}_logits.npy")))
        .unwrap()
        .into_dimensionality::<Ix4>()
        .unwrap();
    let regions = export["regions_class_order"].as_array().map(|order| RegionInfo {
        regions_class_order: order.iter().map(|v| v.as_i64().unwrap()).collect(),
    });
    let configuration = &plan.configuration;
    let exported = export_case(logits.view(), &properties, configuration, regions.as_ref(), true).unwrap();
    let fast = export_case(logits.view(), &properties, configuration, regions.as_ref(), false).unwrap();
    assert_eq!(fast.probabilities, None);

    let nnunet_seg: Array3<i16> = npy::read_labels(&fixture(&format!("{name}_seg.npy")))
        .unwrap()
        .into_dimensionality::<Ix3>()
        .unwrap();
    assert_eq!(exported.segmentation.shape(), nnunet_seg.shape(), "{name}");
    let agree = exported
        .segmentation
        .iter()
        .zip(&nnunet_seg)
        .filter(|(a, b)| a == b)
        .count();
    let fast_agree = fast
        .segmentation
        .iter()
        .zip(&nnunet_seg)
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(
        fast_agree, agree,
        "{name}: argmax of logits and of probabilities differ"
    );

    let nnunet_probabilities: Array4<f32> = npy::read::<f32>(&fixture(&format!("{name}_probabilities.npy")))
        .unwrap()
        .into_dimensionality::<Ix4>()
        .unwrap();
    let probabilities = exported.probabilities.as_ref().unwrap();
    assert_eq!(probabilities.shape(), nnunet_probabilities.shape(), "{name}");
    let max_difference = probabilities
        .iter()
        .zip(&nnunet_probabilities)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);

    // Written with the raw image's geometry; the voxels read back are the exported ones.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.nii.gz"));
    write_segmentation(&path, &exported.segmentation, &properties).unwrap();
    let (read, header) = nifti::read_integer_labels(&path).unwrap();
    assert_eq!(
        read,
        exported.segmentation.mapv(i32::from),
        "{name}: voxels read back"
    );
    assert_eq!(header.datatype, 2, "{name}: uint8 as nnU-Net writes it");
    assert_geometry(&header, &expected["cases"][case_name]["image"], name);
    // nnU-Net's SimpleITK writer re-derives the affine from spacing/origin/direction: the same
    // world geometry to float32 rounding.
    let nnunet_written = &expected["cases"][case_name]["nnunet_prediction"];
    assert_matrix_close(header.affine(), matrix(&nnunet_written["affine"]), 1e-6, name);

    Reference {
        name,
        agreement: (agree, nnunet_seg.len()),
        max_probability_difference: max_difference,
    }
}

#[test]
fn export_matches_nnunet() {
    let names = ["iso_3d_lowres", "aniso_3d", "aniso_2d", "aniso_3d_regions"];
    for name in names {
        let reference = check_export(name);
        let (agree, total) = reference.agreement;
        eprintln!(
            "{}: segmentation agrees in {agree}/{total} voxels, probabilities differ by at most {:e}",
            reference.name, reference.max_probability_difference
        );
        assert!(
            agree as f64 >= 0.999 * total as f64,
            "{name}: {agree}/{total} voxels agree"
        );
        assert!(reference.max_probability_difference <= 1e-4, "{name}");
    }
}
