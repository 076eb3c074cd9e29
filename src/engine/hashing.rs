//! Content digests for pipeline inputs and outputs.
//!
//! This module owns the [`Digest`] type (blake3, shown as 64 lowercase hex
//! characters), the canonical digest of a path -> digest map, and
//! [`FileHasher`]: a file digester backed by a persistent stat cache that
//! skips reading a file whose (path, size, mtime, inode, device) is unchanged
//! since it was last hashed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Files at least this large are hashed with memory mapping and several threads.
const MMAP_THRESHOLD: u64 = 16 * 1024 * 1024;

/// A file modified this recently may still change within the same mtime
/// granularity, so its stat record is not trusted (git's "racy clean" rule).
const RACY_WINDOW_NS: i128 = 2_000_000_000;

/// Bumped whenever the state-file layout changes; older files are discarded.
const STATE_FORMAT_VERSION: u32 = 1;

/// A blake3 digest, serialized (serde) and displayed as 64 lowercase hex chars.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(HEX[(byte >> 4) as usize] as char);
            out.push(HEX[(byte & 0xf) as usize] as char);
        }
        out
    }

    /// Parses 64 hex characters (either case); anything else is `None`.
    pub fn from_hex(text: &str) -> Option<Digest> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let high = (pair[0] as char).to_digit(16)?;
            let low = (pair[1] as char).to_digit(16)?;
            *slot = (high * 16 + low) as u8;
        }
        Some(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        deserializer.deserialize_str(DigestVisitor)
    }
}

/// Deserializes from a borrowed `&str` so loading the stat cache allocates no
/// temporary string per digest.
struct DigestVisitor;

impl serde::de::Visitor<'_> for DigestVisitor {
    type Value = Digest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a 64-character hex blake3 digest")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Digest, E> {
        Digest::from_hex(text).ok_or_else(|| E::custom(format!("invalid digest {text:?}")))
    }
}

/// Canonical digest of a sorted (path, digest) list: blake3 over
/// `"path\0hex\n"` lines, so the same set of files always gives the same value.
pub fn digest_of_map(map: &BTreeMap<String, Digest>) -> Digest {
    let mut hasher = blake3::Hasher::new();
    for (path, digest) in map {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
        hasher.update(digest.to_hex().as_bytes());
        hasher.update(b"\n");
    }
    Digest(*hasher.finalize().as_bytes())
}

#[derive(thiserror::Error, Debug)]
pub enum HashError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("input {} does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("path {} is not valid UTF-8", path.display())]
    NonUtf8Path { path: PathBuf },
    #[error("directory {} links back to one of its parents", path.display())]
    SymlinkCycle { path: PathBuf },
}

impl HashError {
    /// Maps "no such file" to `NotFound` so a missing input reads as such.
    fn from_io(path: &Path, source: io::Error) -> HashError {
        if source.kind() == io::ErrorKind::NotFound {
            HashError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            HashError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// The parts of `stat` that change whenever a file's contents plausibly do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStat {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    device: u64,
}

impl FileStat {
    fn of(meta: &fs::Metadata) -> FileStat {
        FileStat {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct StatRecord {
    stat: FileStat,
    digest: Digest,
}

/// One persisted record: (absolute path, size, mtime_ns, inode, device, digest).
/// A tuple keeps the JSON compact and fast to parse.
type StateRow = (String, u64, i64, u64, u64, Digest);

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    records: Vec<StateRow>,
}

/// Digests files, skipping the read when (path, size, mtime_ns, inode, dev)
/// matches a stored record.
pub struct FileHasher {
    state_file: Option<PathBuf>,
    records: Mutex<HashMap<PathBuf, StatRecord>>,
    dirty: AtomicBool,
    files_read: AtomicUsize,
}

impl FileHasher {
    /// Loads the stat cache from `state_file` (missing or corrupt file ->
    /// empty cache, never an error).
    pub fn open(state_file: &Path) -> FileHasher {
        FileHasher {
            state_file: Some(state_file.to_path_buf()),
            records: Mutex::new(load_state(state_file)),
            dirty: AtomicBool::new(false),
            files_read: AtomicUsize::new(0),
        }
    }

    /// An in-memory hasher with no persistence (tests, one-off use).
    pub fn in_memory() -> FileHasher {
        FileHasher {
            state_file: None,
            records: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            files_read: AtomicUsize::new(0),
        }
    }

    /// How many files this hasher actually read (stat-cache misses), for
    /// progress reporting and for proving that cache hits skip the read.
    pub fn files_read(&self) -> usize {
        self.files_read.load(Ordering::Relaxed)
    }

    /// Digest of one file (absolute or relative path as given; the
    /// stat-cache key is the absolute path).
    pub fn digest_file(&self, path: &Path) -> Result<Digest, HashError> {
        let meta = fs::metadata(path).map_err(|e| HashError::from_io(path, e))?;
        if !meta.is_file() {
            return Err(HashError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let key = cache_key(path)?;
        let stat = FileStat::of(&meta);
        if let Some(digest) = self.cached_digest(&key, stat) {
            return Ok(digest);
        }
        let digest = hash_contents(path, stat.size)?;
        self.files_read.fetch_add(1, Ordering::Relaxed);
        // "Now" is taken after the read so a write racing the read is caught too.
        if !is_racy(stat.mtime_ns, now_ns()) {
            self.remember(key, StatRecord { stat, digest });
        }
        Ok(digest)
    }

    /// Digests every file under each of `paths` (each relative to `root`; a
    /// path may be a file or a directory, walked recursively, symlinks
    /// followed). Returns '/'-separated path relative to `root` -> digest for
    /// every file found. Files are hashed in parallel.
    pub fn digest_tree(&self, root: &Path, paths: &[PathBuf]) -> Result<BTreeMap<String, Digest>, HashError> {
        let mut files = Vec::new();
        for path in paths {
            let key = relative_key(root, path)?;
            collect_files(&root.join(path), key, &mut Vec::new(), &mut files)?;
        }
        files
            .par_iter()
            .map(|(key, path)| Ok((key.clone(), self.digest_file(path)?)))
            .collect()
    }

    /// Writes the stat cache atomically (temp file in the same dir + rename)
    /// if anything changed, merging with what another process may have
    /// written since this one loaded it.
    pub fn save(&self) -> io::Result<()> {
        let Some(state_file) = &self.state_file else {
            return Ok(());
        };
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| with_path(dir, e))?;
        }
        // Serialise concurrent savers so neither loses the other's records
        // between the merge-read and the rename.
        let lock_path = sibling_path(state_file, ".lock");
        let lock = File::create(&lock_path).map_err(|e| with_path(&lock_path, e))?;
        lock.lock().map_err(|e| with_path(&lock_path, e))?;

        let mut merged = load_state(state_file);
        merged.extend(self.lock_records().iter().map(|(k, v)| (k.clone(), *v)));
        write_state(state_file, &merged)?;
        self.dirty.store(false, Ordering::Release);
        Ok(())
    }

    fn cached_digest(&self, key: &Path, stat: FileStat) -> Option<Digest> {
        let records = self.lock_records();
        let record = records.get(key)?;
        (record.stat == stat).then_some(record.digest)
    }

    fn remember(&self, key: PathBuf, record: StatRecord) {
        self.lock_records().insert(key, record);
        self.dirty.store(true, Ordering::Release);
    }

    /// A panic elsewhere while holding the lock leaves the map intact, so a
    /// poisoned lock is still safe to use.
    fn lock_records(&self) -> MutexGuard<'_, HashMap<PathBuf, StatRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Absolute, lexically normalised path. Lexical `..` handling could merge two
/// paths through a symlink, but records also match on inode and device, so
/// such a merge can only ever hit for the very same file.
fn cache_key(path: &Path) -> Result<PathBuf, HashError> {
    let absolute = std::path::absolute(path).map_err(|e| HashError::from_io(path, e))?;
    let mut key = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                key.pop();
            }
            Component::CurDir => {}
            other => key.push(other),
        }
    }
    Ok(key)
}

fn hash_contents(path: &Path, size: u64) -> Result<Digest, HashError> {
    let mut hasher = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD {
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| HashError::from_io(path, e))?;
    } else {
        let file = File::open(path).map_err(|e| HashError::from_io(path, e))?;
        hasher
            .update_reader(file)
            .map_err(|e| HashError::from_io(path, e))?;
    }
    Ok(Digest(*hasher.finalize().as_bytes()))
}

fn is_racy(mtime_ns: i64, now_ns: i128) -> bool {
    now_ns - i128::from(mtime_ns) < RACY_WINDOW_NS
}

fn now_ns() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    }
}

/// Turns a user-given path into the '/'-separated key used in digest maps.
fn relative_key(root: &Path, path: &Path) -> Result<String, HashError> {
    let (relative, absolute_prefix) = match path.strip_prefix(root) {
        Ok(inside) if path.is_absolute() => (inside, ""),
        _ if path.is_absolute() => (path, "/"),
        _ => (path, ""),
    };
    let mut parts = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => parts.push(utf8(name, path)?),
            Component::ParentDir => parts.push(".."),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(format!("{absolute_prefix}{}", parts.join("/")))
}

fn utf8<'a>(name: &'a std::ffi::OsStr, path: &Path) -> Result<&'a str, HashError> {
    name.to_str().ok_or_else(|| HashError::NonUtf8Path {
        path: path.to_path_buf(),
    })
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Appends (key, path) for every file at or below `path`. `ancestors` holds
/// the (device, inode) of the directories being walked, so a symlink that
/// points back up the tree is reported instead of looping forever.
fn collect_files(
    path: &Path,
    key: String,
    ancestors: &mut Vec<(u64, u64)>,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), HashError> {
    let meta = fs::metadata(path).map_err(|e| HashError::from_io(path, e))?;
    if !meta.is_dir() {
        out.push((key, path.to_path_buf()));
        return Ok(());
    }
    let identity = (meta.dev(), meta.ino());
    if ancestors.contains(&identity) {
        return Err(HashError::SymlinkCycle {
            path: path.to_path_buf(),
        });
    }
    ancestors.push(identity);
    let entries = fs::read_dir(path).map_err(|e| HashError::from_io(path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| HashError::from_io(path, e))?;
        let child = entry.path();
        let name = utf8(&entry.file_name(), &child)?.to_string();
        collect_files(&child, join_key(&key, &name), ancestors, out)?;
    }
    ancestors.pop();
    Ok(())
}

fn load_state(state_file: &Path) -> HashMap<PathBuf, StatRecord> {
    let Ok(text) = fs::read_to_string(state_file) else {
        return HashMap::new();
    };
    match serde_json::from_str::<StateFile>(&text) {
        Ok(state) if state.version == STATE_FORMAT_VERSION => state
            .records
            .into_iter()
            .map(|(path, size, mtime_ns, inode, device, digest)| {
                let stat = FileStat {
                    size,
                    mtime_ns,
                    inode,
                    device,
                };
                (PathBuf::from(path), StatRecord { stat, digest })
            })
            .collect(),
        _ => HashMap::new(),
    }
}

fn write_state(state_file: &Path, records: &HashMap<PathBuf, StatRecord>) -> io::Result<()> {
    let rows = records
        .iter()
        // Non-UTF-8 paths cannot be keys in JSON; they are just rehashed next run.
        .filter_map(|(path, r)| {
            let s = r.stat;
            let path = path.to_str()?.to_string();
            Some((path, s.size, s.mtime_ns, s.inode, s.device, r.digest))
        })
        .collect();
    let state = StateFile {
        version: STATE_FORMAT_VERSION,
        records: rows,
    };
    let bytes = serde_json::to_vec(&state).map_err(io::Error::other)?;
    let tmp = sibling_path(state_file, &unique_suffix());
    let written = write_and_rename(&tmp, state_file, &bytes);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_and_rename(tmp: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(tmp).map_err(|e| with_path(tmp, e))?;
    file.write_all(bytes).map_err(|e| with_path(tmp, e))?;
    file.sync_all().map_err(|e| with_path(tmp, e))?;
    fs::rename(tmp, dest).map_err(|e| with_path(dest, e))
}

fn sibling_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// pid + counter + nanos: unique across threads and processes.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".tmp.{}.{count}.{}", std::process::id(), now_ns())
}

/// `save` returns plain `io::Result`; this keeps the file name in the message.
fn with_path(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fixed mtime far enough in the past that the racy rule does not apply.
    fn old_time(seconds_ago: u64) -> SystemTime {
        SystemTime::now() - Duration::from_secs(seconds_ago)
    }

    fn write_with_mtime(path: &Path, contents: &[u8], mtime: SystemTime) {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).unwrap();
        }
        // Writing through an existing handle keeps the inode, as an in-place edit would.
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        (&file).write_all(contents).unwrap();
        file.set_modified(mtime).unwrap();
    }

    fn set_mtime(path: &Path, mtime: SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }

    #[test]
    fn digest_equals_blake3_of_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_with_mtime(&path, b"hello world", old_time(100));
        let hasher = FileHasher::in_memory();
        let digest = hasher.digest_file(&path).unwrap();
        assert_eq!(digest.0, *blake3::hash(b"hello world").as_bytes());
        assert_eq!(digest, Digest::of_bytes(b"hello world"));
    }

    #[test]
    fn large_file_uses_same_digest_as_small_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let contents: Vec<u8> = (0..MMAP_THRESHOLD as usize + 12345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        write_with_mtime(&path, &contents, old_time(100));
        let digest = FileHasher::in_memory().digest_file(&path).unwrap();
        assert_eq!(digest, Digest::of_bytes(&contents));
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let digest = Digest::of_bytes(b"x");
        let hex = digest.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(digest.to_string(), hex);
        assert_eq!(Digest::from_hex(&hex), Some(digest));
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&"zz".repeat(32)), None);
        let json = serde_json::to_string(&digest).unwrap();
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), digest);
    }

    #[test]
    fn digest_tree_gives_slash_separated_relative_keys() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_with_mtime(&root.join("data/raw/a.csv"), b"a", old_time(100));
        write_with_mtime(&root.join("data/raw/deep/b.csv"), b"b", old_time(100));
        write_with_mtime(&root.join("data/c.txt"), b"c", old_time(100));
        write_with_mtime(&root.join("params.yaml"), b"p", old_time(100));
        write_with_mtime(&root.join("ignored.txt"), b"i", old_time(100));
        let hasher = FileHasher::in_memory();
        let paths = [PathBuf::from("data"), PathBuf::from("./params.yaml")];
        let tree = hasher.digest_tree(root, &paths).unwrap();
        let keys: Vec<&str> = tree.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "data/c.txt",
                "data/raw/a.csv",
                "data/raw/deep/b.csv",
                "params.yaml"
            ]
        );
        assert_eq!(tree["data/raw/deep/b.csv"], Digest::of_bytes(b"b"));
    }

    #[test]
    fn digest_tree_reports_missing_path() {
        let dir = tempfile::tempdir().unwrap();
        let hasher = FileHasher::in_memory();
        let err = hasher
            .digest_tree(dir.path(), &[PathBuf::from("nope")])
            .unwrap_err();
        assert!(matches!(err, HashError::NotFound { ref path } if path.ends_with("nope")));
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn digest_tree_follows_file_symlinks_and_detects_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_with_mtime(&root.join("real.txt"), b"r", old_time(100));
        fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink(root.join("real.txt"), root.join("d/link.txt")).unwrap();
        let hasher = FileHasher::in_memory();
        let tree = hasher.digest_tree(root, &[PathBuf::from("d")]).unwrap();
        assert_eq!(tree["d/link.txt"], Digest::of_bytes(b"r"));

        std::os::unix::fs::symlink(root.join("d"), root.join("d/loop")).unwrap();
        let err = hasher.digest_tree(root, &[PathBuf::from("d")]).unwrap_err();
        assert!(matches!(err, HashError::SymlinkCycle { .. }), "{err}");
    }

    #[test]
    fn unchanged_file_is_not_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        let mtime = old_time(100);
        write_with_mtime(&path, b"aaaa", mtime);
        let hasher = FileHasher::in_memory();
        let first = hasher.digest_file(&path).unwrap();
        assert_eq!(hasher.files_read(), 1);

        // Same size, inode and mtime but different bytes: only a hasher that
        // trusts the stat record (and so never reads) returns the old digest.
        write_with_mtime(&path, b"bbbb", mtime);
        let second = hasher.digest_file(&path).unwrap();
        assert_eq!(second, first);
        assert_eq!(hasher.files_read(), 1);
    }

    #[test]
    fn relative_and_absolute_paths_share_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        write_with_mtime(&path, b"x", old_time(100));
        let hasher = FileHasher::in_memory();
        hasher.digest_file(&path).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let relative: PathBuf = std::iter::repeat_n("..", cwd.components().count())
            .collect::<PathBuf>()
            .join(path.strip_prefix("/").unwrap());
        hasher.digest_file(&relative).unwrap();
        assert_eq!(hasher.files_read(), 1);
    }

    #[test]
    fn touched_file_keeps_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        write_with_mtime(&path, b"same", old_time(100));
        let hasher = FileHasher::in_memory();
        let before = hasher.digest_file(&path).unwrap();
        set_mtime(&path, old_time(50));
        let after = hasher.digest_file(&path).unwrap();
        assert_eq!(before, after);
        assert_eq!(hasher.files_read(), 2, "a new mtime must force a re-read");
    }

    #[test]
    fn changed_content_gives_new_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        write_with_mtime(&path, b"one", old_time(100));
        let hasher = FileHasher::in_memory();
        let before = hasher.digest_file(&path).unwrap();
        write_with_mtime(&path, b"two", old_time(50));
        let after = hasher.digest_file(&path).unwrap();
        assert_ne!(before, after);
        assert_eq!(after, Digest::of_bytes(b"two"));
    }

    #[test]
    fn recently_modified_file_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.txt");
        fs::write(&path, b"fresh").unwrap();
        let hasher = FileHasher::in_memory();
        hasher.digest_file(&path).unwrap();
        hasher.digest_file(&path).unwrap();
        assert_eq!(hasher.files_read(), 2);
        assert!(hasher.lock_records().is_empty());
        assert!(!hasher.dirty.load(Ordering::Acquire));

        assert!(is_racy(1_000, 1_000 + RACY_WINDOW_NS - 1));
        assert!(is_racy(5_000_000_000, 0), "future mtimes are racy too");
        assert!(!is_racy(1_000, 1_000 + RACY_WINDOW_NS));
    }

    #[test]
    fn save_and_open_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state/hashes.json");
        let path = dir.path().join("f.txt");
        let mtime = old_time(100);
        write_with_mtime(&path, b"aaaa", mtime);
        let hasher = FileHasher::open(&state);
        let digest = hasher.digest_file(&path).unwrap();
        hasher.save().unwrap();

        // Swap the bytes under an identical stat: the reopened cache must answer without reading.
        write_with_mtime(&path, b"bbbb", mtime);
        let reopened = FileHasher::open(&state);
        assert_eq!(reopened.digest_file(&path).unwrap(), digest);
        assert_eq!(reopened.files_read(), 0);
    }

    #[test]
    fn save_merges_with_records_written_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("hashes.json");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        write_with_mtime(&a, b"a", old_time(100));
        write_with_mtime(&b, b"b", old_time(100));
        let first = FileHasher::open(&state);
        let second = FileHasher::open(&state);
        first.digest_file(&a).unwrap();
        second.digest_file(&b).unwrap();
        first.save().unwrap();
        second.save().unwrap();
        assert_eq!(load_state(&state).len(), 2);
    }

    #[test]
    fn corrupt_or_old_state_file_gives_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("hashes.json");
        fs::write(&state, b"{not json").unwrap();
        assert!(FileHasher::open(&state).lock_records().is_empty());

        let path = dir.path().join("f.txt");
        write_with_mtime(&path, b"x", old_time(100));
        let hasher = FileHasher::open(&state);
        hasher.digest_file(&path).unwrap();
        hasher.save().unwrap();
        assert_eq!(load_state(&state).len(), 1);

        let text = fs::read_to_string(&state).unwrap();
        let old = text.replacen("\"version\":1", "\"version\":0", 1);
        assert_ne!(old, text);
        fs::write(&state, old).unwrap();
        assert!(load_state(&state).is_empty());
    }

    #[test]
    fn missing_state_file_gives_empty_cache_and_in_memory_save_is_noop() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileHasher::open(&dir.path().join("none"))
            .lock_records()
            .is_empty());
        FileHasher::in_memory().save().unwrap();
    }

    #[test]
    fn loading_two_thousand_records_is_fast() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("hashes.json");
        let records: HashMap<PathBuf, StatRecord> = (0..2000u64)
            .map(|i| {
                let path = PathBuf::from(format!("/work/project/data/shard-{i:05}.parquet"));
                let stat = FileStat {
                    size: i * 1000,
                    mtime_ns: 1_700_000_000_000_000_000 + i as i64,
                    inode: i,
                    device: 42,
                };
                let digest = Digest::of_bytes(&i.to_le_bytes());
                (path, StatRecord { stat, digest })
            })
            .collect();
        write_state(&state, &records).unwrap();
        let started = std::time::Instant::now();
        let loaded = load_state(&state);
        let elapsed = started.elapsed();
        assert_eq!(loaded.len(), 2000);
        // Generous bound: unoptimised test builds on a busy CI machine.
        assert!(elapsed < Duration::from_millis(100), "took {elapsed:?}");
    }

    #[test]
    fn digest_of_map_is_canonical() {
        let mut map = BTreeMap::new();
        map.insert("b".to_string(), Digest::of_bytes(b"2"));
        map.insert("a".to_string(), Digest::of_bytes(b"1"));
        let expected = format!("a\0{}\nb\0{}\n", Digest::of_bytes(b"1"), Digest::of_bytes(b"2"));
        assert_eq!(digest_of_map(&map), Digest::of_bytes(expected.as_bytes()));
        map.insert("a".to_string(), Digest::of_bytes(b"changed"));
        assert_ne!(digest_of_map(&map), Digest::of_bytes(expected.as_bytes()));
    }
}
