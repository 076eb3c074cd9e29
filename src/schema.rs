//! The JSON Schema of the pipeline format (`nnflow schema`, `schemas/pipeline.schema.json`),
//! generated from the raw config structs and the parameter struct of every kind in nnU-Net's
//! registry ([`crate::stages::registry`]).

use schemars::{json_schema, Schema, SchemaGenerator};
use serde_json::{Map, Value};

use crate::engine::config::raw::{PipelineSection, StageCommon};
use crate::stages;

pub fn pipeline_schema() -> Schema {
    let mut generator = SchemaGenerator::default();
    let pipeline = generator.subschema_for::<PipelineSection>();
    let common = generator.subschema_for::<StageCommon>();
    let common = resolve(&common, &generator);
    let stage_variants: Vec<Value> = stages::registry()
        .kinds()
        .iter()
        .map(|kind| {
            let params = (kind.schema)(&mut generator);
            stage_schema(kind.name, &common, &params, &generator)
        })
        .collect();
    let definitions: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    let mut schema = json_schema!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "nnflow pipeline",
        "description": "A DAG of stages run by `nnflow run`. Strings may use ${var}, ${matrix-key} and ${stage.outputs}.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "pipeline": pipeline,
            "vars": {
                "description": "Named values usable in stage parameters as ${name}; `--set name=value` overrides one.",
                "type": "object"
            },
            "stages": {
                "description": "The stages, by name.",
                "type": "object",
                "additionalProperties": { "oneOf": stage_variants }
            }
        }
    });
    schema.insert("$defs".into(), Value::Object(definitions));
    schema
}

/// One stage kind's table: the common keys plus the kind's parameters, `kind` fixed to its name.
fn stage_schema(name: &str, common: &Schema, params: &Schema, generator: &SchemaGenerator) -> Value {
    let params = resolve(params, generator);
    let mut properties = Map::new();
    let mut required = vec![Value::String("kind".into())];
    for schema in [common, &params] {
        if let Some(Value::Object(props)) = schema.get("properties") {
            properties.extend(props.clone());
        }
        if let Some(Value::Array(names)) = schema.get("required") {
            required.extend(names.iter().filter(|n| n.as_str() != Some("kind")).cloned());
        }
    }
    properties.insert(
        "kind".into(),
        serde_json::json!({ "const": name, "description": "The stage kind." }),
    );
    serde_json::json!({
        "title": format!("{name} stage"),
        "description": params.get("description").cloned().unwrap_or(Value::Null),
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

/// A `$ref` to a definition, replaced by the definition itself.
fn resolve(schema: &Schema, generator: &SchemaGenerator) -> Schema {
    let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
        return schema.clone();
    };
    let name = reference.rsplit('/').next().unwrap_or_default();
    generator
        .definitions()
        .get(name)
        .and_then(|value| Schema::try_from(value.clone()).ok())
        .unwrap_or_else(|| schema.clone())
}

/// The schema as committed in `schemas/pipeline.schema.json`.
pub fn pipeline_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&pipeline_schema()).expect("schema serializes");
    text.push('\n');
    text
}
