//! nnU-Net's state-dict names: PyTorch lists some tensors of PlainConvUNet and ResidualEncoderUNet
//! under several names. Plain strings, no libtorch; the networks (`nnflow-torch`'s `unet` and
//! `resenc`) name their variables with the canonical ones, and the reference tests check the
//! aliases and their order against nnU-Net's.

use std::cmp::Ordering;

/// The extra names PyTorch's state dict gives the same tensors: the `all_modules.0` (conv) /
/// `all_modules.1` (norm) names of every conv -> norm -> nonlin block (`ConvDropoutNormReLU`:
/// PlainConvUNet's `convs.N`, ResEnc's stem, `conv1`, `conv2` and projecting `skip.N`) and the
/// decoder's reference to the encoder (`decoder.encoder.*`). Returns `(alias, canonical)` pairs
/// for the canonical names given. nnU-Net's networks have no dropout, which would shift the
/// norm's index in `all_modules`.
pub fn nnunet_aliases(names: &[String]) -> Vec<(String, String)> {
    let mut aliases = Vec::new();
    for name in names {
        let mut forms = vec![name.clone()];
        if let Some(alias) = block_alias(name) {
            forms.push(alias);
        }
        for form in forms {
            if form.starts_with("encoder.") {
                aliases.push((format!("decoder.{form}"), name.clone()));
            }
            if form != *name {
                aliases.push((form, name.clone()));
            }
        }
    }
    aliases
}

/// `<block>.conv.<param>` -> `<block>.all_modules.0.<param>`, `<block>.norm.<param>` ->
/// `<block>.all_modules.1.<param>`: the module is the second-to-last part of the name.
fn block_alias(name: &str) -> Option<String> {
    let (module_path, parameter) = name.rsplit_once('.')?;
    let (block, module) = module_path.rsplit_once('.')?;
    let index = match module {
        "conv" => 0,
        "norm" => 1,
        _ => return None,
    };
    Some(format!("{block}.all_modules.{index}.{parameter}"))
}

/// Every name nnU-Net's `network.state_dict()` lists for a network with these canonical tensor
/// names (in any order), in the order PyTorch lists them, each with the canonical name of the
/// tensor it holds: what `load_state_dict` (strict) expects of a checkpoint's `network_weights`.
pub fn nnunet_state_dict(canonical: &[String]) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = canonical.iter().map(|n| (n.clone(), n.clone())).collect();
    entries.extend(nnunet_aliases(canonical));
    entries.sort_by(|a, b| module_order(&a.0, &b.0));
    entries
}

/// PyTorch lists a module's parameters, then its children's in the order `__init__` assigned
/// them; the networks' children by name, in that order: the encoder before the decoder, a ResEnc
/// encoder's stem before its stages, a decoder's reference to the encoder, stages, transposed
/// convolutions and segmentation heads, a residual block's `conv1`, `conv2`, `skip`, a conv block's
/// `conv`, `norm` and `all_modules`, and `weight` before `bias`. Numbered children (sequences)
/// go by number.
const CHILD_ORDER: &[&[&str]] = &[
    &["encoder", "decoder"],
    &["stem", "stages"],
    &["encoder", "stages", "transpconvs", "seg_layers"],
    &["conv1", "conv2", "skip"],
    &["conv", "norm", "all_modules"],
    &["weight", "bias"],
];

/// Compares two state-dict names part by part, the first differing parts as siblings.
fn module_order(a: &str, b: &str) -> Ordering {
    match a.split('.').zip(b.split('.')).find(|(x, y)| x != y) {
        Some((x, y)) => sibling_order(x, y),
        // one name is a prefix of the other (never so in a state dict)
        None => a.len().cmp(&b.len()),
    }
}

/// Numbered children by number, named ones by [`CHILD_ORDER`], anything else by name.
fn sibling_order(x: &str, y: &str) -> Ordering {
    if let (Ok(i), Ok(j)) = (x.parse::<u64>(), y.parse::<u64>()) {
        return i.cmp(&j);
    }
    let row = CHILD_ORDER
        .iter()
        .find(|row| row.contains(&x) && row.contains(&y));
    match row {
        Some(row) => {
            let at = |name: &str| row.iter().position(|r| *r == name);
            at(x).cmp(&at(y))
        }
        None => x.cmp(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn block_and_encoder_aliases() {
        let names = vec![
            "encoder.stages.0.0.convs.0.conv.weight".to_string(),
            "decoder.seg_layers.0.bias".to_string(),
        ];
        let aliases = nnunet_aliases(&names);
        let canonical = &names[0];
        assert_eq!(
            aliases,
            vec![
                (format!("decoder.{canonical}"), canonical.clone()),
                (
                    "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight".to_string(),
                    canonical.clone()
                ),
                (
                    "encoder.stages.0.0.convs.0.all_modules.0.weight".to_string(),
                    canonical.clone()
                ),
            ]
        );
    }

    #[test]
    fn residual_encoder_aliases() {
        let names: Vec<String> = [
            "encoder.stem.convs.0.norm.bias",
            "encoder.stages.1.blocks.0.conv2.conv.weight",
            "encoder.stages.1.blocks.0.skip.1.norm.weight",
            "decoder.transpconvs.0.weight",
        ]
        .map(String::from)
        .to_vec();
        let aliases = nnunet_aliases(&names);
        let aliases: Vec<(&str, &str)> = aliases
            .iter()
            .map(|(alias, of)| (alias.as_str(), of.as_str()))
            .collect();
        assert_eq!(
            aliases,
            [
                ("decoder.encoder.stem.convs.0.norm.bias", names[0].as_str()),
                ("decoder.encoder.stem.convs.0.all_modules.1.bias", &names[0]),
                ("encoder.stem.convs.0.all_modules.1.bias", &names[0]),
                ("decoder.encoder.stages.1.blocks.0.conv2.conv.weight", &names[1]),
                (
                    "decoder.encoder.stages.1.blocks.0.conv2.all_modules.0.weight",
                    &names[1]
                ),
                ("encoder.stages.1.blocks.0.conv2.all_modules.0.weight", &names[1]),
                ("decoder.encoder.stages.1.blocks.0.skip.1.norm.weight", &names[2]),
                (
                    "decoder.encoder.stages.1.blocks.0.skip.1.all_modules.1.weight",
                    &names[2]
                ),
                ("encoder.stages.1.blocks.0.skip.1.all_modules.1.weight", &names[2]),
            ]
        );
    }

    /// nnU-Net's state dicts of PlainConvUNet and ResidualEncoderUNet networks
    /// (tests/fixtures/network/generate*.py): from the canonical names, sorted as a safetensors
    /// file lists them, every name in PyTorch's order with the tensor it aliases.
    #[test]
    fn state_dicts_equal_nnunets_names_and_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/network");
        for case in [
            "a_3d_iso",
            "b_3d_aniso",
            "c_2d",
            "d_3d_fullres",
            "a_small_3d_iso",
            "c_small_2d",
            "resenc_small_3d",
            "resenc_small_2d",
            "resenc_stem_2d",
        ] {
            let text = std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap();
            let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
            let expected: Vec<(String, String)> = fixture["state_dict"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let name = e["name"].as_str().unwrap().to_string();
                    let of = e["alias_of"].as_str().map_or(name.clone(), String::from);
                    (name, of)
                })
                .collect();
            assert_eq!(expected.len() as u64, fixture["state_dict_len"].as_u64().unwrap());
            let mut canonical: Vec<String> = expected
                .iter()
                .filter(|(name, of)| name == of)
                .map(|(name, _)| name.clone())
                .collect();
            canonical.sort();
            assert_eq!(nnunet_state_dict(&canonical), expected, "{case}");
        }
    }
}
