//! `nnflow import --msd`: Medical Segmentation Decathlon tasks converted like nnU-Net's
//! `nnUNetv2_convert_MSD_dataset`, through the real binary. The reference is nnU-Net's own
//! conversion of tests/fixtures/nifti/msd/Task09_Tiny (its dataset.json and SimpleITK's view of
//! every file it wrote, from generate.py).

mod common;

use std::path::{Path, PathBuf};

use common::Project;
use ndarray::Array3;
use nnflow::data::nifti;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti")
}

fn tiny_task() -> PathBuf {
    fixtures().join("msd/Task09_Tiny")
}

fn import(project: &Project, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["import"];
    full.extend_from_slice(args);
    let output = project.nnflow(&full);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                out.push(
                    entry
                        .path()
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

fn str_path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn msd_task_converts_like_nnunet() {
    let project = Project::new();
    let raw = project.path().join("nnUNet_raw");
    std::fs::create_dir_all(&raw).unwrap();
    let (code, stdout, stderr) = import(&project, &["--msd", str_path(&tiny_task()), "-o", str_path(&raw)]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let dataset = raw.join("Dataset009_Tiny");
    assert!(stdout.contains("Dataset009_Tiny"), "{stdout}");

    // dataset.json: the same keys and values as nnU-Net's conversion.
    assert_eq!(
        json(&dataset.join("dataset.json")),
        json(&fixtures().join("msd/nnunet_dataset.json"))
    );

    // The same files as nnU-Net wrote (no `._` files), read with the geometry SimpleITK reports
    // for nnU-Net's files.
    let reference = json(&fixtures().join("msd/nnunet_geometry.json"));
    let reference = reference.as_object().unwrap();
    let mut written = files(&dataset);
    written.retain(|f| f != "dataset.json");
    assert_eq!(written, reference.keys().cloned().collect::<Vec<_>>());
    for (file, expected) in reference {
        let (channels, header) = nifti::read_channels(dataset.join(file)).unwrap();
        assert_eq!(channels.len(), 1, "{file}");
        assert_eq!(header.dim[0], 3, "{file}: 3D");
        let numbers = |key: &str| -> Vec<f64> {
            expected[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len(), "{file}: {what}");
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "{file}: {what} {a:?} vs {b:?}"
                );
            }
        };
        close(&header.itk_spacing(), &numbers("spacing"), "spacing");
        close(&header.itk_origin(), &numbers("origin"), "origin");
        close(
            header.itk_direction().as_flattened(),
            &numbers("direction"),
            "direction",
        );
        let shape: Vec<usize> = numbers("shape_zyx").iter().map(|&v| v as usize).collect();
        assert_eq!(channels[0].shape(), shape.as_slice(), "{file}");
        let sum: f64 = channels[0].iter().map(|&v| f64::from(v)).sum();
        close(&[sum], &[expected["sum"].as_f64().unwrap()], "sum of values");
    }

    // Each channel is the 4D image's volume, stored type and all.
    let (source, _) = nifti::read_channels(tiny_task().join("imagesTr/tiny_002.nii.gz")).unwrap();
    for (c, volume) in source.iter().enumerate() {
        let file = dataset.join(format!("imagesTr/tiny_002_{c:04}.nii.gz"));
        assert_eq!(&nifti::read(&file).unwrap().data, volume);
        assert_eq!(nifti::read_header(&file).unwrap().datatype, 16);
    }
    // Labels are copied as they are.
    assert_eq!(
        std::fs::read(dataset.join("labelsTr/tiny_001.nii.gz")).unwrap(),
        std::fs::read(tiny_task().join("labelsTr/tiny_001.nii.gz")).unwrap()
    );
    let check = project.nnflow(&["check", str_path(&dataset)]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Converting again never touches the existing dataset.
    let before = files(&dataset);
    let (code, _, stderr) = import(&project, &["--msd", str_path(&tiny_task()), "-o", str_path(&raw)]);
    assert_ne!(code, 0);
    assert!(stderr.contains("Dataset009_Tiny already exists"), "{stderr}");
    let (code, _, stderr) = import(
        &project,
        &["--msd", str_path(&tiny_task()), "--output", str_path(&dataset)],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("already exists; nothing was written"), "{stderr}");
    assert_eq!(files(&dataset), before);
    assert_eq!(
        std::fs::read_dir(&raw).unwrap().count(),
        1,
        "no staging folder left behind"
    );

    // The id override names the dataset, as nnU-Net's -overwrite_id.
    let (code, stdout, stderr) = import(
        &project,
        &[
            "--msd",
            str_path(&tiny_task()),
            "--dataset-id",
            "123",
            "-o",
            str_path(&raw),
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(raw
        .join("Dataset123_Tiny/imagesTs/tiny_003_0001.nii.gz")
        .is_file());
}

#[test]
fn a_taken_dataset_id_is_refused() {
    let project = Project::new();
    let raw = project.path().join("raw");
    std::fs::create_dir_all(raw.join("Dataset009_Other")).unwrap();
    let (code, _, stderr) = import(&project, &["--msd", str_path(&tiny_task()), "-o", str_path(&raw)]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("dataset id 9 is already taken") && stderr.contains("Dataset009_Other"),
        "{stderr}"
    );
    assert_eq!(files(&raw), Vec::<String>::new());
}

#[test]
fn msd_and_folder_options_are_exclusive() {
    let project = Project::new();
    let (code, _, stderr) = import(
        &project,
        &["--msd", str_path(&tiny_task()), "--images", "x", "-o", "out"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let (code, _, stderr) = import(&project, &["--dataset-id", "3", "-o", "out"]);
    assert_ne!(code, 0, "{stderr}");
}

/// A task made of the 4D fixture (3 volumes = 3 modalities) and labels nnflow writes.
fn four_d_task(root: &Path, name: &str, cases: &[&str]) -> PathBuf {
    let task = root.join(name);
    for sub in ["imagesTr", "labelsTr", "imagesTs"] {
        std::fs::create_dir_all(task.join(sub)).unwrap();
    }
    let (_, header) = nifti::read_channels(fixtures().join("image4d_t3_int16.nii.gz")).unwrap();
    for (i, case) in cases.iter().enumerate() {
        std::fs::copy(
            fixtures().join("image4d_t3_int16.nii.gz"),
            task.join(format!("imagesTr/{case}.nii.gz")),
        )
        .unwrap();
        let labels = Array3::from_shape_fn(header.shape_zyx(), |(z, y, x)| ((z + y + x + i) % 2) as u8);
        nifti::write(task.join(format!("labelsTr/{case}.nii.gz")), &labels, &header).unwrap();
    }
    std::fs::write(
        task.join("dataset.json"),
        serde_json::json!({
            "name": name, "modality": {"0": "T1", "1": "T1c", "2": "T2"},
            "labels": {"0": "background", "1": "lesion"}, "numTraining": cases.len(), "numTest": 0,
            "training": [], "test": []
        })
        .to_string(),
    )
    .unwrap();
    task
}

#[test]
fn a_corrupt_image_is_named_and_nothing_is_written() {
    let project = Project::new();
    let task = four_d_task(project.path(), "Task07_Broken", &["a", "b"]);
    let broken = task.join("imagesTr/b.nii.gz");
    let bytes = std::fs::read(&broken).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() - 60]).unwrap();
    let out = project.path().join("out");
    let (code, _, stderr) = import(&project, &["--msd", str_path(&task), "-o", str_path(&out)]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(str_path(&broken)),
        "the error names the file: {stderr}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(project.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("importing"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A 4D image whose volumes do not match the modalities is named too.
    let task = four_d_task(project.path(), "Task08_Mismatch", &["a"]);
    let mut v1 = json(&task.join("dataset.json"));
    v1["modality"] = serde_json::json!({"0": "T1", "1": "T2"});
    std::fs::write(task.join("dataset.json"), v1.to_string()).unwrap();
    let (code, _, stderr) = import(&project, &["--msd", str_path(&task), "-o", str_path(&out)]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("imagesTr/a.nii.gz: 3 volume(s), but dataset.json declares 2 modalities"),
        "{stderr}"
    );
}

#[test]
fn four_d_task_with_three_modalities_and_macos_junk() {
    let project = Project::new();
    let task = four_d_task(project.path(), "Task11_Three", &["p1", "p2"]);
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::write(
            task.join(format!("{sub}/._p1.nii.gz")),
            b"\x00\x05\x16\x07Mac OS X",
        )
        .unwrap();
        std::fs::write(task.join(format!("{sub}/_hidden.nii.gz")), b"junk").unwrap();
    }
    let out = project.path().join("MyDataset");
    let (code, stdout, stderr) = import(&project, &["--msd", str_path(&task), "-o", str_path(&out)]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(
        files(&out),
        [
            "dataset.json",
            "imagesTr/p1_0000.nii.gz",
            "imagesTr/p1_0001.nii.gz",
            "imagesTr/p1_0002.nii.gz",
            "imagesTr/p2_0000.nii.gz",
            "imagesTr/p2_0001.nii.gz",
            "imagesTr/p2_0002.nii.gz",
            "labelsTr/p1.nii.gz",
            "labelsTr/p2.nii.gz",
        ]
    );
    let (volumes, header) = nifti::read_channels(fixtures().join("image4d_t3_int16.nii.gz")).unwrap();
    for (c, volume) in volumes.iter().enumerate() {
        let channel = nifti::read(out.join(format!("imagesTr/p2_{c:04}.nii.gz"))).unwrap();
        assert_eq!(&channel.data, volume, "channel {c}");
        assert_eq!(
            channel.header, header,
            "channel {c}: the 4D image's header, made 3D"
        );
        assert_eq!(channel.header.datatype, 4, "int16 kept");
    }
    let dataset = json(&out.join("dataset.json"));
    assert_eq!(
        dataset["channel_names"],
        serde_json::json!({"0": "T1", "1": "T1c", "2": "T2"})
    );
    assert_eq!(
        dataset["labels"],
        serde_json::json!({"background": 0, "lesion": 1})
    );
    assert_eq!(dataset["file_ending"], ".nii.gz");
    assert_eq!(dataset["name"], "Task11_Three");
    assert!(dataset.get("modality").is_none() && dataset.get("training").is_none());
}

#[test]
fn single_modality_3d_task_copies_images_as_channel_0() {
    let project = Project::new();
    let task = project.path().join("Task04_Hippocampus");
    for sub in ["imagesTr", "labelsTr", "imagesTs"] {
        std::fs::create_dir_all(task.join(sub)).unwrap();
    }
    let header = nifti::Header::axis_aligned([4, 6, 5], [2.0, 1.0, 0.75], [1.0, -2.0, 3.0]);
    for (i, case) in ["hippocampus_001", "hippocampus_004", "hippocampus_007"]
        .iter()
        .enumerate()
    {
        let image = Array3::from_shape_fn([4, 6, 5], |(z, y, x)| (z * 30 + y * 5 + x + i) as f32 * 0.5);
        let sub = if i < 2 { "Tr" } else { "Ts" };
        nifti::write(task.join(format!("images{sub}/{case}.nii.gz")), &image, &header).unwrap();
        if i < 2 {
            let labels = image.mapv(|v| (v as u8) % 3);
            nifti::write(task.join(format!("labelsTr/{case}.nii.gz")), &labels, &header).unwrap();
        }
    }
    std::fs::write(
        task.join("dataset.json"),
        r#"{"name": "Hippocampus", "tensorImageSize": "3D", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": 2, "numTest": 1,
            "training": [{"image": "./imagesTr/hippocampus_001.nii.gz", "label": "./labelsTr/hippocampus_001.nii.gz"}],
            "test": ["./imagesTs/hippocampus_007.nii.gz"]}"#,
    )
    .unwrap();
    let raw = project.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let (code, stdout, stderr) = import(&project, &["--msd", str_path(&task), "-o", str_path(&raw)]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let dataset = raw.join("Dataset004_Hippocampus");
    for (file, source) in [
        (
            "imagesTr/hippocampus_001_0000.nii.gz",
            "imagesTr/hippocampus_001.nii.gz",
        ),
        (
            "imagesTs/hippocampus_007_0000.nii.gz",
            "imagesTs/hippocampus_007.nii.gz",
        ),
    ] {
        // Copied as they are, as nnU-Net copies a 3D image.
        assert_eq!(
            std::fs::read(dataset.join(file)).unwrap(),
            std::fs::read(task.join(source)).unwrap(),
            "{file}"
        );
    }
    let json = json(&dataset.join("dataset.json"));
    assert_eq!(json["channel_names"], serde_json::json!({"0": "MRI"}));
    assert_eq!(
        json["labels"],
        serde_json::json!({"background": 0, "Anterior": 1, "Posterior": 2})
    );
    assert_eq!(json["numTraining"], 2);
}
