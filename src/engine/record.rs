//! What the engine remembers about each stage instance's last successful run (key components and
//! output digests), one file per instance so concurrent runs never contend; and the readable lock
//! file assembled from them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::hashing::Digest;
use super::key::StageKey;
pub use crate::atomic_file::write_atomically;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Record {
    pub id: String,
    pub key: String,
    pub components: StageKey,
    /// Output files (`project/<path>` or `out/<path>`) and their digests.
    pub outputs: BTreeMap<String, Digest>,
    pub outputs_digest: Digest,
    pub finished_unix: u64,
    pub seconds: f64,
}

pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(state_dir: &Path) -> Records {
        Records {
            dir: state_dir.join("records"),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_safe(id)))
    }

    /// The last record of an instance; None when it never ran (or the record is unreadable).
    pub fn get(&self, id: &str) -> Option<Record> {
        let text = fs::read(self.path(id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn put(&self, record: &Record) -> std::io::Result<()> {
        write_atomically(&self.path(&record.id), &serde_json::to_vec_pretty(record)?)
    }
}

/// An instance id (or matrix values) as one file name: `train[fold=0]` stays as it is; `/`, `\\`,
/// `%` and control characters are percent-encoded, so two ids never share a file and none names a
/// folder elsewhere.
pub fn file_safe(id: &str) -> String {
    let mut name = String::with_capacity(id.len());
    for c in id.chars() {
        if matches!(c, '/' | '\\' | '%') || c.is_control() {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                name.push_str(&format!("%{byte:02X}"));
            }
        } else {
            name.push(c);
        }
    }
    match name.as_str() {
        "" | "." | ".." => format!("%{name}"),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::file_safe;

    #[test]
    fn file_names_are_distinct_and_stay_in_their_folder() {
        assert_eq!(file_safe("train[fold=0]"), "train[fold=0]");
        assert_eq!(file_safe("a/b"), "a%2Fb");
        assert_ne!(file_safe("x[v=a/b]"), file_safe("x[v=a_b]"));
        assert_ne!(file_safe("x[v=a%2Fb]"), file_safe("x[v=a/b]"));
        assert_eq!(file_safe(".."), "%..");
        assert!(!file_safe("../../etc").contains('/'));
    }
}

/// The lock file: every instance's key components and output digests, in pipeline order.
#[derive(Serialize)]
pub struct LockFile<'a> {
    pub pipeline: &'a str,
    pub nnflow_version: &'a str,
    pub stages: Vec<&'a Record>,
}

pub fn write_lock_file(path: &Path, pipeline: &str, records: &[Record]) -> std::io::Result<()> {
    let lock = LockFile {
        pipeline,
        nnflow_version: env!("CARGO_PKG_VERSION"),
        stages: records.iter().collect(),
    };
    let mut text = serde_json::to_vec_pretty(&lock)?;
    text.push(b'\n');
    write_atomically(path, &text)
}
