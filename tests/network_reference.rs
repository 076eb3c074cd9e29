//! PlainConvUNet against nnU-Net's own (fixtures from tests/fixtures/network/generate.py, which
//! builds the networks with nnunetv2 2.8.1's get_network_from_plans): parameter names and shapes,
//! parameter counts, deep-supervision output shapes, and outputs for nnU-Net's weights.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[path = "../src/bin/nnflow-torch/unet.rs"]
mod unet;

use nnflow::network::Architecture;
use serde_json::Value;
use tch::{nn::VarStore, Device, Kind, Tensor};
use unet::{nnunet_aliases, parameter_count, PlainConvUNet};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/network")
        .join(name)
}

fn load(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{case}.json"))).unwrap()).unwrap()
}

fn build(case: &Value) -> (VarStore, PlainConvUNet) {
    let arch = Architecture::from_plan(
        &case["architecture"],
        case["input_channels"].as_u64().unwrap() as usize,
        case["num_classes"].as_u64().unwrap() as usize,
        true,
    )
    .unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = PlainConvUNet::new(&vs.root(), &arch);
    (vs, net)
}

fn shape_of(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap())
        .collect()
}

#[test]
fn names_shapes_and_counts_equal_nnunet() {
    for case_name in [
        "a_3d_iso",
        "b_3d_aniso",
        "c_2d",
        "d_3d_fullres",
        "a_small_3d_iso",
        "c_small_2d",
    ] {
        let case = load(case_name);
        let (vs, _net) = build(&case);
        let ours: BTreeMap<String, Vec<i64>> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        let entries = case["state_dict"].as_array().unwrap();
        let canonical: BTreeMap<String, Vec<i64>> = entries
            .iter()
            .filter(|e| e["alias_of"].is_null())
            .map(|e| (e["name"].as_str().unwrap().to_string(), shape_of(&e["shape"])))
            .collect();
        assert_eq!(ours, canonical, "{case_name}: parameter names and shapes");
        assert_eq!(
            parameter_count(&vs),
            case["total_params"].as_i64().unwrap(),
            "{case_name}"
        );
        // every alias PyTorch lists points at the tensor nnU-Net says it does
        let names: Vec<String> = ours.keys().cloned().collect();
        let aliases: BTreeMap<String, String> = nnunet_aliases(&names).into_iter().collect();
        for e in entries.iter().filter(|e| !e["alias_of"].is_null()) {
            let name = e["name"].as_str().unwrap();
            assert_eq!(
                aliases.get(name).map(String::as_str),
                e["alias_of"].as_str(),
                "{case_name}: {name}"
            );
        }
        assert_eq!(
            aliases.len() + names.len(),
            case["state_dict_len"].as_u64().unwrap() as usize
        );
    }
}

#[test]
fn deep_supervision_output_shapes() {
    for case_name in ["a_3d_iso", "c_2d", "a_small_3d_iso"] {
        let case = load(case_name);
        let (_vs, mut net) = build(&case);
        let input = Tensor::zeros(shape_of(&case["input_shape"]), (Kind::Float, Device::Cpu));
        let outputs = tch::no_grad(|| net.forward(&input));
        let shapes: Vec<Vec<i64>> = outputs.iter().map(Tensor::size).collect();
        let expected: Vec<Vec<i64>> = case["ds_output_shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(shape_of)
            .collect();
        assert_eq!(shapes, expected, "{case_name}");
        net.set_deep_supervision(false);
        let single = tch::no_grad(|| net.forward(&input));
        assert_eq!(single.len(), 1);
        assert_eq!(
            single[0].size(),
            shape_of(&case["no_ds_output_shape"]),
            "{case_name}"
        );
    }
}

#[test]
fn nnunet_weights_give_nnunet_outputs() {
    for case_name in ["a_small_3d_iso", "c_small_2d"] {
        let case = load(case_name);
        let (mut vs, net) = build(&case);
        vs.load(fixture(&format!("{case_name}.safetensors"))).unwrap();
        let io: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixture(&format!("{case_name}_io.safetensors")))
                .unwrap()
                .into_iter()
                .collect();
        let outputs = tch::no_grad(|| net.forward(&io["input"]));
        for (i, output) in outputs.iter().enumerate() {
            let expected = &io[&format!("output.{i}")];
            let diff = (output - expected).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{case_name} output {i}: max difference {diff}");
        }
    }
}

#[test]
fn initialisation_follows_he_with_leaky_slope() {
    // Same distribution as nnU-Net's InitWeights_He(1e-2): compare each conv weight's sample std
    // with the expected std recorded by the generator (large tensors only, where the sample std
    // is tight), biases zero and norm weights one.
    let case = load("a_3d_iso");
    let (vs, _net) = build(&case);
    let vars = vs.variables();
    for e in case["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["alias_of"].is_null())
    {
        let name = e["name"].as_str().unwrap();
        let t = &vars[name];
        match e["init"]["init"].as_str().unwrap() {
            "kaiming_normal" if t.numel() > 20_000 => {
                let std = t.std(true).double_value(&[]);
                let expected = e["init"]["std"].as_f64().unwrap();
                assert!(
                    (std / expected - 1.0).abs() < 0.05,
                    "{name}: std {std} vs {expected}"
                );
            }
            "constant" | "torch_default_zeros" => assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}"),
            "torch_default_ones" => assert_eq!(t.min().double_value(&[]), 1.0, "{name}"),
            _ => {}
        }
    }
}
