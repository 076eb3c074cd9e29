//! The committed JSON Schema must be what `nnflow schema` generates from the Rust types.

mod common;

#[test]
fn committed_schema_is_up_to_date() {
    let project = common::Project::new();
    let output = project.nnflow(&["schema"]);
    assert_eq!(output.status.code(), Some(0));
    let generated = String::from_utf8(output.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/pipeline.schema.json"
    ))
    .unwrap();
    assert!(
        generated == committed,
        "schemas/pipeline.schema.json is stale: run `cargo run -- schema > schemas/pipeline.schema.json`"
    );
}

#[test]
fn schema_describes_the_command_stage_and_rejects_unknown_keys() {
    let schema: serde_json::Value =
        serde_json::from_str(nnflow::schema::pipeline_schema_text().as_str()).unwrap();
    let variants = schema["properties"]["stages"]["additionalProperties"]["oneOf"]
        .as_array()
        .unwrap();
    let command = variants
        .iter()
        .find(|v| v["properties"]["kind"]["const"] == "command")
        .unwrap();
    assert_eq!(command["additionalProperties"], false);
    for key in [
        "cmd", "inputs", "outputs", "env", "params", "after", "matrix", "threads", "gpus",
    ] {
        assert!(command["properties"].get(key).is_some(), "missing {key}");
    }
    assert_eq!(schema["additionalProperties"], false);
}

#[test]
fn example_pipelines_declare_the_schema_and_validate() {
    let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines");
    let project = common::Project::new();
    for entry in std::fs::read_dir(folder).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("#:schema ../schemas/pipeline.schema.json"),
                "{}",
                path.display()
            );
            let output = project.nnflow(&["validate", path.to_str().unwrap()]);
            assert_eq!(output.status.code(), Some(0), "{}", common::stderr(&output));
        }
    }
}
