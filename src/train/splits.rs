//! Cross-validation splits as nnU-Net makes them (`generate_crossval_split`): scikit-learn's
//! `KFold(n_splits=5, shuffle=True, random_state=12345)` over the sorted case ids. The shuffle is
//! numpy's legacy `RandomState.shuffle`, reproduced exactly, so nnflow's folds hold the same cases
//! as nnU-Net's `splits_final.json`. A user's splits file (same format) wins.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::file_error::FileError;
use crate::preprocess::numpy_random::RandomState;
use crate::train::TrainError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// Which cases train and which validate.
#[derive(Debug, Clone, PartialEq)]
pub enum Fold {
    Index(usize),
    /// Train on every case; validate on the same cases (nnU-Net's fold "all").
    All,
}

impl Fold {
    pub fn parse(text: &str) -> Result<Fold, TrainError> {
        if text == "all" {
            return Ok(Fold::All);
        }
        text.parse()
            .map(Fold::Index)
            .map_err(|_| TrainError::InvalidFold { text: text.into() })
    }
}

/// KFold with shuffling: the shuffled indices are cut into `n_splits` consecutive chunks (the first
/// `n % n_splits` one longer); each chunk validates once. Both lists come back in id order, as
/// scikit-learn's boolean masks return them.
pub fn crossval_splits(ids: &[String], seed: u32, n_splits: usize) -> Result<Vec<Split>, TrainError> {
    if ids.len() < n_splits {
        return Err(TrainError::TooFewCases {
            cases: ids.len(),
            folds: n_splits,
        });
    }
    let mut sorted = ids.to_vec();
    sorted.sort();
    let n = sorted.len();
    let shuffled = RandomState::new(seed).choice_without_replacement(n, n);
    let mut start = 0;
    let mut splits = Vec::with_capacity(n_splits);
    for fold in 0..n_splits {
        let size = n / n_splits + usize::from(fold < n % n_splits);
        let mut in_val = vec![false; n];
        for &i in &shuffled[start..start + size] {
            in_val[i] = true;
        }
        start += size;
        let pick = |want: bool| -> Vec<String> {
            (0..n)
                .filter(|&i| in_val[i] == want)
                .map(|i| sorted[i].clone())
                .collect()
        };
        splits.push(Split {
            train: pick(false),
            val: pick(true),
        });
    }
    Ok(splits)
}

/// The training and validation cases of `fold`: from `splits_file` when given (nnU-Net's
/// `splits_final.json` format), else nnU-Net's default 5-fold split.
pub fn fold_cases(ids: &[String], fold: &Fold, splits_file: Option<&Path>) -> Result<Split, TrainError> {
    let index = match fold {
        Fold::All => {
            let mut all = ids.to_vec();
            all.sort();
            return Ok(Split {
                train: all.clone(),
                val: all,
            });
        }
        Fold::Index(i) => *i,
    };
    let splits = match splits_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(FileError::io(path))?;
            let splits: Vec<Split> = serde_json::from_str(&text).map_err(FileError::json(path))?;
            let unknown: Vec<&String> = splits
                .iter()
                .flat_map(|s| s.train.iter().chain(&s.val))
                .filter(|c| !ids.contains(c))
                .collect();
            if let Some(case) = unknown.first() {
                return Err(TrainError::UnknownSplitCase {
                    splits_file: path.to_path_buf(),
                    case: case.to_string(),
                });
            }
            splits
        }
        None => crossval_splits(ids, 12345, 5)?,
    };
    let count = splits.len();
    splits
        .into_iter()
        .nth(index)
        .ok_or(TrainError::NoSuchFold { index, count })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;

    /// nnU-Net's `generate_crossval_split` (fixture from tests/fixtures/loss/generate.py).
    #[test]
    fn crossval_splits_equal_nnunet() {
        let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/splits/splits.json");
        let expected: BTreeMap<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
        for (n, splits) in expected {
            let ids: Vec<String> = (0..n.parse::<usize>().unwrap())
                .map(|i| format!("case_{i:03}"))
                .collect();
            let ours = serde_json::to_value(crossval_splits(&ids, 12345, 5).unwrap()).unwrap();
            assert_eq!(ours, splits, "{n} cases");
        }
    }
}
