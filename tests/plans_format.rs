//! plans.json as types (`nnflow::plans`): every plans.json fixture (nnU-Net 2.8.1 wrote them, see
//! tests/fixtures/plan/generate.py) reads into the types and writes back as the same JSON value,
//! floats bit for bit; `inherits_from` resolves as nnU-Net's `PlansManager.get_configuration`
//! (`plans_handler.py`: the parent's dict, `update`d with the child's); a malformed file is
//! refused with the file and the key named.

use std::path::{Path, PathBuf};

use nnflow::plans::{NetworkKwargs, Plans};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every `*plans*.json` below tests/fixtures.
fn plan_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            plan_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "json")
            && path.file_name().unwrap().to_string_lossy().contains("plans")
        {
            found.push(path);
        }
    }
}

fn raw(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Bit-exact equality, numbers of the same JSON kind (`serde_json`'s `==` compares floats with
/// `==`, which would let -0.0 pass for 0.0).
fn identical(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            _ if x.is_f64() != y.is_f64() => false,
            (Some(p), Some(q)) if x.is_f64() => p.to_bits() == q.to_bits(),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| identical(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| identical(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn every_plans_fixture_reads_and_writes_back_unchanged() {
    let mut files = Vec::new();
    plan_files(&fixtures(), &mut files);
    files.sort();
    assert!(
        files.len() >= 16,
        "expected the plan, preprocess, predict and export fixtures: {files:?}"
    );
    for file in &files {
        let plans = Plans::read(file).unwrap_or_else(|e| panic!("{e}"));
        let written = serde_json::to_value(&plans).unwrap();
        let original = raw(file);
        assert!(
            identical(&written, &original),
            "{}: written back differs:\n{}\nvs\n{}",
            file.display(),
            serde_json::to_string(&written).unwrap(),
            serde_json::to_string(&original).unwrap()
        );
        // Every fixture is a plan of nnU-Net's planners: the default one's PlainConvUNet or the
        // ResEnc presets' ResidualEncoderUNet, typed, nothing left over.
        for (name, configuration) in &plans.configurations {
            if let Some(architecture) = &configuration.architecture {
                let kwargs_left_over = match &architecture.arch_kwargs {
                    NetworkKwargs::PlainConvUNet(kwargs) => &kwargs.extra,
                    NetworkKwargs::ResidualEncoderUNet(kwargs) => &kwargs.extra,
                    other => panic!("{}: {name}: {other:?}", file.display()),
                };
                assert!(kwargs_left_over.is_empty() && architecture.extra.is_empty());
            }
            assert!(configuration.extra.is_empty(), "{}: {name}", file.display());
        }
        assert!(plans.extra.is_empty(), "{}", file.display());
    }
}

/// nnU-Net's `_internal_resolve_configuration_inheritance` on the raw JSON.
fn nnunet_resolved(plans: &Value, name: &str) -> Map<String, Value> {
    let own = plans["configurations"][name].as_object().unwrap().clone();
    match own.get("inherits_from").and_then(Value::as_str) {
        None => own,
        Some(parent) => {
            let mut base = nnunet_resolved(plans, parent);
            base.extend(own);
            base
        }
    }
}

#[test]
fn cascade_fullres_inherits_3d_fullres_as_nnunet_resolves_it() {
    let mut files = Vec::new();
    plan_files(&fixtures(), &mut files);
    let mut cascades = 0;
    for file in &files {
        let original = raw(file);
        let plans = Plans::read(file).unwrap();
        for name in plans.configurations.keys() {
            let resolved = plans.configuration(name).unwrap();
            let ours = serde_json::to_value(&resolved.values).unwrap();
            let theirs = Value::Object(nnunet_resolved(&original, name));
            assert!(identical(&ours, &theirs), "{}: {name}", file.display());
        }
        cascades += usize::from(plans.configurations.contains_key("3d_cascade_fullres"));
    }
    assert!(cascades >= 2, "the fixtures should hold cascades");

    // The values, spelled out for one fixture.
    let plans = Plans::read(&fixtures().join("plan/synthetic_cascade/plans.json")).unwrap();
    let stored = &plans.configurations["3d_cascade_fullres"];
    assert_eq!(stored.architecture, None);
    let cascade = plans.configuration("3d_cascade_fullres").unwrap();
    let fullres = plans.configuration("3d_fullres").unwrap();
    assert_eq!(cascade.values.inherits_from.as_deref(), Some("3d_fullres"));
    assert_eq!(cascade.previous_stage_name(), Some("3d_lowres"));
    assert_eq!(
        cascade.values.data_identifier.as_deref(),
        Some("nnUNetPlans_3d_fullres")
    );
    assert_eq!(cascade.patch_size().unwrap(), [28, 24, 24]);
    assert_eq!(cascade.spacing().unwrap(), [1.0, 1.0, 1.0]);
    assert!(cascade.batch_dice());
    assert_eq!(cascade.architecture().unwrap(), fullres.architecture().unwrap());
    assert!(cascade.next_stage_names().is_empty());
    let lowres = plans.configuration("3d_lowres").unwrap();
    assert_eq!(lowres.next_stage_names(), ["3d_cascade_fullres"]);
}

#[test]
fn a_malformed_plan_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plans.json");
    let original = raw(&fixtures().join("plan/synthetic_cascade/plans.json"));
    let error_for = |edit: &dyn Fn(&mut Value)| {
        let mut plans = original.clone();
        edit(&mut plans);
        std::fs::write(&file, serde_json::to_string_pretty(&plans).unwrap()).unwrap();
        Plans::read(&file).unwrap_err().to_string()
    };
    let shown = file.display().to_string();

    let error = error_for(&|p| p["configurations"]["3d_fullres"]["patch_size"][1] = "x".into());
    assert!(
        error.starts_with(&format!(
            "{shown}: `configurations.3d_fullres.patch_size[1]`: invalid type: string \"x\""
        )),
        "{error}"
    );
    let error = error_for(&|p| {
        p["configurations"]["2d"]["architecture"]["arch_kwargs"]["strides"] = 2.into();
    });
    assert!(
        error.starts_with(&format!(
            "{shown}: `configurations.2d.architecture`: arch_kwargs.strides: invalid type: integer `2`"
        )),
        "{error}"
    );
    let error = error_for(&|p| {
        p.as_object_mut().unwrap().remove("transpose_forward");
    });
    assert!(
        error.starts_with(&format!("{shown}: missing field `transpose_forward`")),
        "{error}"
    );
    let error = error_for(&|p| p["configurations"]["3d_lowres"]["next_stage"] = 3.into());
    assert!(
        error.starts_with(&format!("{shown}: `configurations.3d_lowres.next_stage`: ")),
        "{error}"
    );
    std::fs::write(&file, "{\"dataset_name\": ").unwrap();
    let error = Plans::read(&file).unwrap_err().to_string();
    assert!(error.starts_with(&format!("{shown}: ")), "{error}");
    let missing = dir.path().join("absent.json");
    let error = Plans::read(&missing).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("cannot read {}: ", missing.display())),
        "{error}"
    );
}
