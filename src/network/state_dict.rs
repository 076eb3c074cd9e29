//! nnU-Net's state-dict names: PyTorch lists some tensors of PlainConvUNet under several names.
//! Plain strings, no libtorch; the network (`nnflow-torch`'s `unet`) names its variables with the
//! canonical ones, and the reference tests check the aliases against nnU-Net's.

/// The extra names PyTorch's state dict gives the same tensors: each block's `all_modules.0`
/// (conv) / `all_modules.1` (norm) and the decoder's reference to the encoder. Returns
/// `(alias, canonical)` pairs for the canonical names given.
pub fn nnunet_aliases(names: &[String]) -> Vec<(String, String)> {
    let mut aliases = Vec::new();
    for name in names {
        let mut forms = vec![name.clone()];
        for (part, replacement) in [(".conv.", ".all_modules.0."), (".norm.", ".all_modules.1.")] {
            if name.contains(".convs.") && name.contains(part) {
                forms.push(name.replacen(part, replacement, 1));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
