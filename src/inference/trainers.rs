//! Which of nnU-Net's trainer classes (`trainer_name` in a checkpoint, the first part of a results
//! folder's name) nnflow can predict with. A trainer that only changes how the network is trained
//! (epochs, learning rate or its schedule, optimizer, loss, augmentation, sampling, deep
//! supervision) leaves the network the plan describes, so its weights load into nnflow's network.
//! A trainer that overrides `build_network_architecture` builds another network; the ones nnU-Net
//! 2.8.1 ships are refused here by name with the reason. A trainer nnflow does not know (a user's
//! own subclass) is predicted with when its weights are exactly those of the plan's network: the
//! worker's loading names the first weight that is missing, shaped differently or left over.

/// nnU-Net 2.8.1's trainers (`nnunetv2/training/nnUNetTrainer/`) that override
/// `build_network_architecture`, a name part that identifies them, and what their network is.
const NETWORK_CHANGING: &[(&str, &str)] = &[
    (
        "nnUNetTrainerBN",
        "replaces instance normalization with batch normalization (BatchNorm), which nnflow's \
         networks do not build",
    ),
    (
        "Primus",
        "builds Primus, a transformer network, instead of the plan's U-Net",
    ),
];

/// nnU-Net 2.8.1's trainers that change only how the network is trained (checked by name in the
/// tests, documented here): their models predict as `nnUNetTrainer`'s do.
pub const TRAINING_ONLY: &[&str] = &[
    "nnUNetTrainer",
    "nnUNetTrainer_1epoch",
    "nnUNetTrainer_5epochs",
    "nnUNetTrainer_10epochs",
    "nnUNetTrainer_20epochs",
    "nnUNetTrainer_50epochs",
    "nnUNetTrainer_100epochs",
    "nnUNetTrainer_250epochs",
    "nnUNetTrainer_500epochs",
    "nnUNetTrainer_750epochs",
    "nnUNetTrainer_2000epochs",
    "nnUNetTrainer_4000epochs",
    "nnUNetTrainer_8000epochs",
    "nnUNetTrainer_250epochs_NoMirroring",
    "nnUNetTrainer_2000epochs_NoMirroring",
    "nnUNetTrainer_4000epochs_NoMirroring",
    "nnUNetTrainer_8000epochs_NoMirroring",
    "nnUNetTrainerNoMirroring",
    "nnUNetTrainer_onlyMirror01",
    "nnUNetTrainer_onlyMirror01_1500ep",
    "nnUNetTrainer_onlyMirror01_DASegOrd0",
    "nnUNetTrainer_onlyMirror01_DA5",
    "nnUNetTrainerNoDA",
    "nnUNetTrainerDA5",
    "nnUNetTrainerDA5ord0",
    "nnUNetTrainerDA5Segord0",
    "nnUNetTrainerDA5_10epochs",
    "nnUNetTrainer_DASegOrd0",
    "nnUNetTrainer_DASegOrd0_NoMirroring",
    "nnUNetTrainer_noDummy2DDA",
    "nnUNetTrainerCELoss",
    "nnUNetTrainerCELoss_5epochs",
    "nnUNetTrainerDiceLoss",
    "nnUNetTrainerDiceCELoss_noSmooth",
    "nnUNetTrainerTopk10Loss",
    "nnUNetTrainerTopk10LossLS01",
    "nnUNetTrainerDiceTopK10Loss",
    "nnUNetTrainerCosAnneal",
    "nnUNetTrainer_warmup",
    "nnUNetTrainerAdam",
    "nnUNetTrainerAdam1en3",
    "nnUNetTrainerAdam3en4",
    "nnUNetTrainerVanillaAdam",
    "nnUNetTrainerVanillaAdam1en3",
    "nnUNetTrainerVanillaAdam3en4",
    "nnUNetTrainerAdan",
    "nnUNetTrainerAdan1en1",
    "nnUNetTrainerAdan1en3",
    "nnUNetTrainerAdan3en4",
    "nnUNetTrainerAdanCosAnneal",
    "nnUNetTrainer_probabilisticOversampling",
    "nnUNetTrainer_probabilisticOversampling_010",
    "nnUNetTrainer_probabilisticOversampling_033",
    // deep supervision off: the same modules (every decoder stage keeps its segmentation layer)
    "nnUNetTrainerNoDeepSupervision",
    "nnUNetTrainerBenchmark_5epochs",
    "nnUNetTrainerBenchmark_5epochs_noDataLoading",
    "nnUNet_Trainer_BS8",
];

/// A trainer whose network nnflow does not build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "trainer {trainer} {why}; nnflow predicts only with the network the plan describes \
     (PlainConvUNet or ResidualEncoderUNet)"
)]
pub struct RefusedTrainer {
    pub trainer: String,
    pub why: &'static str,
}

/// Whether nnflow can predict with models of trainer `name`: refused for nnU-Net's trainers known
/// to build another network (`nnUNetTrainerBN` and its subclasses named after it, the Primus
/// trainers). Any other trainer runs, its weights checked against the plan's network on loading.
pub fn check_trainer(name: &str) -> Result<(), RefusedTrainer> {
    match NETWORK_CHANGING
        .iter()
        .find(|(pattern, _)| refused_by(name, pattern))
    {
        Some((_, why)) => Err(RefusedTrainer {
            trainer: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Whether `name` is one of nnU-Net's trainers that change only the training.
pub fn is_training_only(name: &str) -> bool {
    TRAINING_ONLY.contains(&name)
}

/// `nnUNetTrainerBN` and names built on it (`nnUNetTrainerBN_250epochs`, not
/// `nnUNetTrainerBNorSomethingElse`); `Primus` anywhere in the name.
fn refused_by(name: &str, pattern: &str) -> bool {
    if pattern == "Primus" {
        return name.contains(pattern);
    }
    name.strip_prefix(pattern)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainers_that_only_change_training_run() {
        for name in [
            "nnUNetTrainer",
            "nnUNetTrainer_250epochs",
            "nnUNetTrainer_5epochs",
            "nnUNetTrainerNoMirroring",
            "nnUNetTrainerDiceCELoss_noSmooth",
            "nnUNetTrainerNoDeepSupervision",
            "nnUNetTrainerBenchmark_5epochs",
        ] {
            assert_eq!(check_trainer(name), Ok(()), "{name}");
            assert!(is_training_only(name), "{name}");
        }
        for name in TRAINING_ONLY {
            assert_eq!(check_trainer(name), Ok(()), "{name}");
        }
        // a user's own trainer runs; its weights decide
        assert_eq!(check_trainer("nnUNetTrainerTinyCPU"), Ok(()));
        assert!(!is_training_only("nnUNetTrainerTinyCPU"));
        assert_eq!(check_trainer("nnUNetTrainerBNorm"), Ok(()));
    }

    #[test]
    fn trainers_that_build_another_network_are_refused_with_the_reason() {
        let error = check_trainer("nnUNetTrainerBN").unwrap_err();
        assert_eq!(error.trainer, "nnUNetTrainerBN");
        let message = error.to_string();
        assert!(
            message.starts_with("trainer nnUNetTrainerBN replaces instance normalization"),
            "{message}"
        );
        assert!(message.contains("BatchNorm"), "{message}");
        assert!(check_trainer("nnUNetTrainerBN_250epochs").is_err());
        for name in [
            "nnUNet_Primus_M_Trainer",
            "nnUNet_PrimusV2S_Trainer",
            "_Primus_B_96_BS1",
            "AbstractPrimus",
        ] {
            let message = check_trainer(name).unwrap_err().to_string();
            assert!(
                message.contains(name) && message.contains("transformer"),
                "{message}"
            );
        }
    }
}
