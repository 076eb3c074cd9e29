//! What the training worker reports after each epoch (`progress.json` in the resume folder): the
//! worker writes it, the `train` stage reads it to show the training's status line.

use serde::{Deserialize, Serialize};

/// What the worker reports after each epoch (`progress.json` in the resume folder). The loss and
/// the pseudo Dice may be NaN (a class absent from every validation patch, as in nnU-Net) or
/// infinite (a skipped fp16 step): written as `null`, read back as NaN.
#[derive(Serialize, Deserialize, Debug)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    #[serde(with = "crate::json_numbers::nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "crate::json_numbers::nan_as_null")]
    pub ema_pseudo_dice: f64,
    pub epoch_seconds: f64,
}

impl Progress {
    /// The short status line a running training shows next to its stage.
    pub fn describe(&self) -> String {
        let left = self.epochs.saturating_sub(self.epoch) as f64 * self.epoch_seconds;
        format!(
            "epoch {}/{}, loss {:.4}, pseudo Dice (avg) {:.4}, ~{:.0} min left",
            self.epoch,
            self.epochs,
            self.train_loss,
            self.ema_pseudo_dice,
            left / 60.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_with_a_nan_pseudo_dice_is_read_back() {
        let progress = Progress {
            epoch: 3,
            epochs: 10,
            train_loss: f64::INFINITY,
            ema_pseudo_dice: f64::NAN,
            epoch_seconds: 2.0,
        };
        let text = serde_json::to_string(&progress).unwrap();
        assert!(text.contains(r#""ema_pseudo_dice":null"#), "{text}");
        let back: Progress = serde_json::from_str(&text).unwrap();
        assert!(back.train_loss.is_nan() && back.ema_pseudo_dice.is_nan());
        assert!(back
            .describe()
            .starts_with("epoch 3/10, loss NaN, pseudo Dice (avg) NaN"));
    }
}
