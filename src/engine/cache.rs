//! The content-addressed output store.
//!
//! This module owns the on-disk cache layout under its root:
//! `blobs/<2 hex>/<64 hex>` holds file contents by digest, `entries/<key>.json`
//! holds one [`Manifest`] per stage key, and `tmp/` is staging space. Every
//! file appears in its final place only through a rename, so a killed process
//! never leaves an entry that looks complete, and two processes storing the
//! same key or blob at once both succeed.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::hashing::{Digest, FileHasher, HashError};

/// Blobs are shared by every entry (and hard-linked restores), so nobody may write them.
const BLOB_MODE: u32 = 0o444;
const FILE_MODE: u32 = 0o644;
const EXECUTABLE_MODE: u32 = 0o755;
/// Staging files older than this belong to a process that died mid-write.
const STALE_TMP_AGE: Duration = Duration::from_secs(60 * 60);
const COPY_BUFFER_BYTES: usize = 1024 * 1024;
/// Marks a folder as an nnflow cache (the Cache Directory Tagging convention, so backup tools
/// skip it too).
const CACHE_TAG: &str = "CACHEDIR.TAG";
const CACHE_TAG_TEXT: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This folder is an nnflow cache: its contents can be recreated.\n";
/// What an nnflow cache holds; a folder holding anything else is not one.
const CACHE_ENTRIES: &[&str] = &["blobs", "entries", "tmp", "lock", CACHE_TAG];

/// The first entry of an existing folder that is not part of a cache (None when the folder is
/// missing, empty or an untagged cache of an earlier nnflow).
fn foreign_entry(root: &Path) -> Option<String> {
    let entries = fs::read_dir(root).ok()?;
    entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        // another process may be writing the tag right now (`.CACHEDIR.TAG.tmp-...`)
        .find(|name| !CACHE_ENTRIES.contains(&name.as_str()) && !name.starts_with(".CACHEDIR.TAG.tmp"))
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub key: String,
    /// Relative path ('/' separated) -> file.
    pub files: BTreeMap<String, ManifestFile>,
    pub created_unix: u64,
}

impl Manifest {
    /// The digest of its files' digests by path: what a record of these outputs holds.
    pub fn outputs_digest(&self) -> Digest {
        let files = self
            .files
            .iter()
            .map(|(path, file)| (path.clone(), file.digest))
            .collect();
        super::hashing::digest_of_map(&files)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ManifestFile {
    pub digest: Digest,
    pub size: u64,
    pub executable: bool,
}

/// How `restore` materialises files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    Copy,
    /// Hard-links non-executable files to their blob (read-only, 0444),
    /// copying instead when linking fails, e.g. across filesystems.
    HardlinkOrCopy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub entries_removed: usize,
    pub blobs_removed: usize,
    /// Stale staging files left in `tmp/` by killed processes.
    pub tmp_files_removed: usize,
    /// Staging folders of stage runs that were killed (see `gc::collect`).
    pub staging_folders_removed: usize,
    /// Bytes of removed blobs and staging files.
    pub bytes_freed: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    Hit(Manifest),
    Miss,
    /// The entry existed but was unusable; it (and any bad blobs) has been removed.
    Corrupt {
        reason: String,
    },
}

#[derive(thiserror::Error, Debug)]
pub enum CacheError {
    #[error("cache I/O failed on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("{} is not an nnflow cache (it holds `{entry}`): choose an empty or new folder", path.display())]
    NotACache { path: PathBuf, entry: String },
    #[error("invalid cache key {key:?}: expected 64 lowercase hex characters")]
    InvalidKey { key: String },
    #[error("refusing unsafe relative path {path:?} (absolute, empty or containing '..')")]
    UnsafePath { path: String },
    #[error("{} changed while being stored: expected digest {expected}, found {actual}", path.display())]
    DigestMismatch {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error("{} has {actual} bytes, expected {expected}", path.display())]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("cannot encode manifest {}: {source}", path.display())]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) a cache rooted at `root`.
    /// A folder that already holds other things is refused: `gc` deletes inside the cache.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        let cache = Cache {
            root: root.to_path_buf(),
        };
        let tag = root.join(CACHE_TAG);
        if !tag.exists() {
            if let Some(foreign) = foreign_entry(root) {
                return Err(CacheError::NotACache {
                    path: root.to_path_buf(),
                    entry: foreign,
                });
            }
            fs::create_dir_all(root).map_err(io_error(root))?;
            crate::atomic_file::write_atomically(&tag, CACHE_TAG_TEXT.as_bytes()).map_err(io_error(&tag))?;
        }
        for dir in [cache.blobs_dir(), cache.entries_dir(), cache.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Finds the entry for `key` and verifies every blob it references
    /// (existence, size, digest via `hasher`). A damaged entry is removed
    /// together with its bad blobs and reported as `Lookup::Corrupt`.
    pub fn lookup(&self, key: &str, hasher: &FileHasher) -> Result<Lookup, CacheError> {
        let entry = self.entry_path(key)?;
        let text = match fs::read_to_string(&entry) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Miss),
            Err(e) => return Err(io_error(&entry)(e)),
        };
        let reason = match serde_json::from_str::<Manifest>(&text) {
            Err(e) => format!("unreadable manifest {}: {e}", entry.display()),
            Ok(manifest) if manifest.key != key => {
                format!("manifest {} records key {}", entry.display(), manifest.key)
            }
            Ok(manifest) => match self.damaged_blobs(&manifest, hasher) {
                damaged if damaged.is_empty() => return Ok(Lookup::Hit(manifest)),
                damaged => self.discard_blobs(damaged),
            },
        };
        remove_if_present(&entry)?;
        Ok(Lookup::Corrupt { reason })
    }

    /// Copies `files` (relative to `base`, digests precomputed) into blobs,
    /// then writes the manifest last. Each copy is re-hashed while copying, so
    /// a file that changed since it was digested is refused, not cached.
    pub fn store(
        &self,
        key: &str,
        base: &Path,
        files: &BTreeMap<String, Digest>,
    ) -> Result<Manifest, CacheError> {
        let sources = files
            .iter()
            .map(|(relative, digest)| {
                let source = base.join(checked_relative(relative)?);
                Ok((relative.clone(), (source, *digest)))
            })
            .collect::<Result<_, CacheError>>()?;
        self.store_sources(key, &sources)
    }

    /// Like `store`, for files that do not share one base folder: manifest
    /// path -> (where the file is now, its digest).
    pub fn store_sources(
        &self,
        key: &str,
        files: &BTreeMap<String, (PathBuf, Digest)>,
    ) -> Result<Manifest, CacheError> {
        self.store_sources_with(key, files, |_| LinkMode::Copy)
    }

    /// [`Cache::store_sources`], choosing per file whether the blob may be a hard link to the
    /// source (`HardlinkOrCopy`: for outputs nobody edits, which saves copying gigabytes of
    /// preprocessed data; the source then becomes read-only) or must be a copy.
    pub fn store_sources_with(
        &self,
        key: &str,
        files: &BTreeMap<String, (PathBuf, Digest)>,
        mode: impl Fn(&str) -> LinkMode + Sync,
    ) -> Result<Manifest, CacheError> {
        let entry = self.entry_path(key)?;
        // Shared with other stores, exclusive with gc: gc must not delete a
        // blob that this store wrote but has not yet referenced.
        let _guard = self.lock(LockKind::Shared)?;
        let stored: BTreeMap<String, ManifestFile> = files
            .par_iter()
            .map(|(relative, (source, digest))| {
                checked_relative(relative)?;
                Ok((
                    relative.clone(),
                    self.store_blob(source, *digest, mode(relative))?,
                ))
            })
            .collect::<Result<_, CacheError>>()?;
        let manifest = Manifest {
            key: key.to_string(),
            files: stored,
            created_unix: unix_now(),
        };
        self.write_entry(&entry, &manifest)?;
        Ok(manifest)
    }

    /// Adds an entry whose blobs come from elsewhere (a remote cache). `fetch` is handed the blobs
    /// missing or damaged here, each with a new staging path in this cache, and must write exactly
    /// that blob's bytes there, checking their digest as it writes. The blobs then move into place
    /// and the manifest is written last, as `store` does; when `fetch` fails, nothing of the entry
    /// is left.
    pub fn import<E: From<CacheError>>(
        &self,
        manifest: &Manifest,
        hasher: &FileHasher,
        fetch: impl FnOnce(&[(ManifestFile, PathBuf)]) -> Result<(), E>,
    ) -> Result<(), E> {
        let entry = self.entry_path(&manifest.key)?;
        for relative in manifest.files.keys() {
            checked_relative(relative)?;
        }
        // Shared with stores, exclusive with gc, which would delete blobs not yet referenced.
        let _guard = self.lock(LockKind::Shared)?;
        let mut wanted: BTreeMap<Digest, &ManifestFile> = BTreeMap::new();
        for file in manifest.files.values() {
            wanted.entry(file.digest).or_insert(file);
        }
        let wanted: Vec<&ManifestFile> = wanted.into_values().collect();
        let missing: Vec<(ManifestFile, PathBuf)> = wanted
            .par_iter()
            .filter(|file| {
                let blob = self.blob_path(&file.digest);
                let problem = blob_problem(&blob, file, hasher);
                if problem.is_some() {
                    let _ = fs::remove_file(&blob);
                }
                problem.is_some()
            })
            .map(|file| ((*file).clone(), self.tmp_path()))
            .collect();
        let adopted = fetch(&missing).and_then(|()| {
            for (file, staged) in &missing {
                self.adopt_blob(staged, file)?;
            }
            Ok(())
        });
        if adopted.is_err() {
            for (_, staged) in &missing {
                let _ = fs::remove_file(staged);
            }
        }
        adopted?;
        self.write_entry(&entry, manifest)?;
        Ok(())
    }

    /// The path of the blob with this digest (which may not exist): for reading it.
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.blob_path(digest)
    }

    /// Materialises the manifest's files under `dest_root`. Files already
    /// holding the right contents and mode are left alone; others are
    /// written to a temporary name beside the destination and renamed over it.
    pub fn restore(
        &self,
        manifest: &Manifest,
        dest_root: &Path,
        mode: LinkMode,
        hasher: &FileHasher,
    ) -> Result<(), CacheError> {
        manifest.files.par_iter().try_for_each(|(relative, file)| {
            let dest = dest_root.join(checked_relative(relative)?);
            self.restore_file(file, &dest, mode, hasher)
        })
    }

    /// Materialises one manifest file at `dest` (its parent folders are
    /// created), leaving it alone when it already has the right contents and mode.
    pub fn restore_file(
        &self,
        file: &ManifestFile,
        dest: &Path,
        mode: LinkMode,
        hasher: &FileHasher,
    ) -> Result<(), CacheError> {
        if already_restored(dest, file, hasher)? {
            return Ok(());
        }
        self.materialise(file, dest, mode)
    }

    /// The manifest for `key` as stored, its blobs unverified (`lookup` checks them); `None` when
    /// there is none or it is unreadable.
    pub fn manifest(&self, key: &str) -> Option<Manifest> {
        let manifest = read_manifest(&self.entry_path(key).ok()?)?;
        (manifest.key == key).then_some(manifest)
    }

    /// Whether an entry for `key` exists (unverified; `lookup` checks its blobs).
    pub fn contains(&self, key: &str) -> bool {
        self.entry_path(key).is_ok_and(|path| path.is_file())
    }

    /// Whether contents with this digest are stored (as some entry's output).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// All entry keys present, sorted.
    pub fn keys(&self) -> Result<Vec<String>, CacheError> {
        let dir = self.entries_dir();
        let mut keys = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let name = entry.map_err(io_error(&dir))?.file_name();
            let key = name.to_str().and_then(|n| n.strip_suffix(".json"));
            if let Some(key) = key.filter(|k| is_valid_key(k)) {
                keys.push(key.to_string());
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Removes entries whose key is not in `keep`, then blobs no remaining
    /// entry references, then staging files older than an hour.
    pub fn gc(&self, keep: &HashSet<String>) -> Result<GcReport, CacheError> {
        let _guard = self.lock(LockKind::Exclusive)?;
        let mut report = GcReport::default();
        let mut referenced = HashSet::new();
        for key in self.keys()? {
            let entry = self.entry_path(&key)?;
            match read_manifest(&entry) {
                Some(manifest) if keep.contains(&key) => {
                    referenced.extend(manifest.files.values().map(|f| f.digest));
                }
                // Unreadable entries can never hit, so they go even when kept.
                _ => {
                    remove_if_present(&entry)?;
                    report.entries_removed += 1;
                }
            }
        }
        for (digest, blob) in self.blob_files()? {
            if !referenced.contains(&digest) {
                report.bytes_freed += remove_counting_bytes(&blob)?;
                report.blobs_removed += 1;
            }
        }
        for staged in self.stale_tmp_files()? {
            report.bytes_freed += remove_counting_bytes(&staged)?;
            report.tmp_files_removed += 1;
        }
        Ok(report)
    }

    /// Bytes used by blobs.
    pub fn size_bytes(&self) -> Result<u64, CacheError> {
        let mut total = 0;
        for (_, blob) in self.blob_files()? {
            total += fs::metadata(&blob).map_err(io_error(&blob))?.len();
        }
        Ok(total)
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    fn entries_dir(&self) -> PathBuf {
        self.root.join("entries")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.blobs_dir().join(&hex[..2]).join(hex)
    }

    fn entry_path(&self, key: &str) -> Result<PathBuf, CacheError> {
        if !is_valid_key(key) {
            return Err(CacheError::InvalidKey { key: key.to_string() });
        }
        Ok(self.entries_dir().join(format!("{key}.json")))
    }

    fn tmp_path(&self) -> PathBuf {
        self.tmp_dir().join(unique_name())
    }

    fn lock(&self, kind: LockKind) -> Result<File, CacheError> {
        let path = self.root.join("lock");
        let file = File::create(&path).map_err(io_error(&path))?;
        let locked = match kind {
            LockKind::Shared => file.lock_shared(),
            LockKind::Exclusive => file.lock(),
        };
        locked.map_err(io_error(&path))?;
        Ok(file)
    }

    /// Copies `source` into the blob store unless that digest is already there.
    fn store_blob(&self, source: &Path, digest: Digest, mode: LinkMode) -> Result<ManifestFile, CacheError> {
        let meta = fs::metadata(source).map_err(io_error(source))?;
        let executable = meta.mode() & 0o111 != 0;
        let blob = self.blob_path(&digest);
        // The existing blob's size, not the source's: the source may have
        // changed since it was digested, and the manifest must match the blob.
        if let Ok(existing) = fs::metadata(&blob) {
            return Ok(ManifestFile {
                digest,
                size: existing.len(),
                executable,
            });
        }
        let staged = self.tmp_path();
        // Executables are always copied: a link would share the blob's read-only, non-executable mode.
        if mode == LinkMode::HardlinkOrCopy && !executable && fs::hard_link(source, &staged).is_ok() {
            set_mode(&staged, BLOB_MODE)?;
            let parent = blob.parent().unwrap_or(&self.root);
            fs::create_dir_all(parent).map_err(io_error(parent))?;
            rename_or_cleanup(&staged, &blob)?;
            return Ok(ManifestFile {
                digest,
                size: meta.len(),
                executable,
            });
        }
        let copied = copy_hashing(source, &staged);
        let (size, actual) = match copied {
            Ok(result) => result,
            Err(e) => {
                let _ = fs::remove_file(&staged);
                return Err(e);
            }
        };
        if actual != digest {
            let _ = fs::remove_file(&staged);
            return Err(CacheError::DigestMismatch {
                path: source.to_path_buf(),
                expected: digest,
                actual,
            });
        }
        set_mode(&staged, BLOB_MODE)?;
        let parent = blob.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_error(parent))?;
        rename_or_cleanup(&staged, &blob)?;
        Ok(ManifestFile {
            digest,
            size,
            executable,
        })
    }

    /// Writes a manifest to its entry: staged, then renamed into place.
    fn write_entry(&self, entry: &Path, manifest: &Manifest) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec_pretty(manifest).map_err(|source| CacheError::Manifest {
            path: entry.to_path_buf(),
            source,
        })?;
        let staged = self.tmp_path();
        write_new_file(&staged, &bytes)?;
        rename_or_cleanup(&staged, entry)
    }

    /// Moves a blob fetched into `staged` into the blob store (read-only, like every blob).
    fn adopt_blob(&self, staged: &Path, file: &ManifestFile) -> Result<(), CacheError> {
        let size = fs::metadata(staged).map_err(io_error(staged))?.len();
        if size != file.size {
            return Err(CacheError::SizeMismatch {
                path: staged.to_path_buf(),
                expected: file.size,
                actual: size,
            });
        }
        set_mode(staged, BLOB_MODE)?;
        let blob = self.blob_path(&file.digest);
        let parent = blob.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_error(parent))?;
        rename_or_cleanup(staged, &blob)
    }

    /// Blobs that are missing, of the wrong size or with the wrong digest.
    fn damaged_blobs(&self, manifest: &Manifest, hasher: &FileHasher) -> Vec<(PathBuf, String)> {
        manifest
            .files
            .par_iter()
            .filter_map(|(relative, file)| {
                let blob = self.blob_path(&file.digest);
                blob_problem(&blob, file, hasher).map(|problem| (blob, format!("{relative}: {problem}")))
            })
            .collect()
    }

    /// Removes damaged blobs so a later store rewrites them; returns the reason text.
    fn discard_blobs(&self, damaged: Vec<(PathBuf, String)>) -> String {
        let mut reasons = Vec::new();
        for (blob, reason) in damaged {
            // Best effort: the entry is dropped regardless, and a blob we
            // cannot remove is caught again by the next lookup.
            let _ = fs::remove_file(&blob);
            reasons.push(reason);
        }
        reasons.join("; ")
    }

    fn materialise(&self, file: &ManifestFile, dest: &Path, mode: LinkMode) -> Result<(), CacheError> {
        let blob = self.blob_path(&file.digest);
        let parent = dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(io_error(parent))?;
        let staged = parent.join(format!(".nnflow-restore{}", unique_name()));
        // A hard link shares the blob's read-only mode, so executables are always copied.
        let linked =
            mode == LinkMode::HardlinkOrCopy && !file.executable && fs::hard_link(&blob, &staged).is_ok();
        if !linked {
            let copied = copy_with_mode(&blob, &staged, file.executable);
            if copied.is_err() {
                let _ = fs::remove_file(&staged);
            }
            copied?;
        }
        rename_or_cleanup(&staged, dest)
    }

    /// Every file in `blobs/` whose name is a digest, with its path.
    fn blob_files(&self) -> Result<Vec<(Digest, PathBuf)>, CacheError> {
        let mut blobs = Vec::new();
        for shard in read_dir_paths(&self.blobs_dir())? {
            if !shard.is_dir() {
                continue;
            }
            for blob in read_dir_paths(&shard)? {
                let digest = blob
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(Digest::from_hex);
                if let Some(digest) = digest {
                    blobs.push((digest, blob));
                }
            }
        }
        Ok(blobs)
    }

    fn stale_tmp_files(&self) -> Result<Vec<PathBuf>, CacheError> {
        let now = SystemTime::now();
        let mut stale = Vec::new();
        for path in read_dir_paths(&self.tmp_dir())? {
            let Ok(modified) = fs::metadata(&path).and_then(|m| m.modified()) else {
                continue;
            };
            if now.duration_since(modified).unwrap_or_default() > STALE_TMP_AGE {
                stale.push(path);
            }
        }
        Ok(stale)
    }
}

enum LockKind {
    Shared,
    Exclusive,
}

fn is_valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Manifest paths come from disk, so they must not escape the destination.
fn checked_relative(relative: &str) -> Result<&Path, CacheError> {
    let path = Path::new(relative);
    let safe = !relative.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if safe {
        Ok(path)
    } else {
        Err(CacheError::UnsafePath {
            path: relative.to_string(),
        })
    }
}

fn blob_problem(blob: &Path, file: &ManifestFile, hasher: &FileHasher) -> Option<String> {
    let meta = match fs::metadata(blob) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Some(format!("blob {} is missing", blob.display()))
        }
        Err(e) => return Some(format!("cannot read blob {}: {e}", blob.display())),
    };
    if meta.len() != file.size {
        return Some(format!(
            "blob {} has {} bytes, expected {}",
            blob.display(),
            meta.len(),
            file.size
        ));
    }
    match hasher.digest_file(blob) {
        Ok(actual) if actual == file.digest => None,
        Ok(actual) => Some(format!("blob {} has digest {actual}", blob.display())),
        Err(e) => Some(e.to_string()),
    }
}

fn already_restored(dest: &Path, file: &ManifestFile, hasher: &FileHasher) -> Result<bool, CacheError> {
    let meta = match fs::symlink_metadata(dest) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error(dest)(e)),
    };
    if !meta.is_file() || meta.len() != file.size {
        return Ok(false);
    }
    let executable = meta.mode() & 0o111 != 0;
    Ok(executable == file.executable && hasher.digest_file(dest)? == file.digest)
}

fn read_manifest(entry: &Path) -> Option<Manifest> {
    let text = fs::read_to_string(entry).ok()?;
    serde_json::from_str(&text).ok()
}

/// Copies `source` to a new file `dest`, hashing the bytes actually copied.
fn copy_hashing(source: &Path, dest: &Path) -> Result<(u64, Digest), CacheError> {
    let mut reader = File::open(source).map_err(io_error(source))?;
    let mut writer = create_new(dest)?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let count = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(source)(e)),
        };
        hasher.update(&buffer[..count]);
        writer.write_all(&buffer[..count]).map_err(io_error(dest))?;
        total += count as u64;
    }
    Ok((total, Digest(*hasher.finalize().as_bytes())))
}

fn copy_with_mode(blob: &Path, dest: &Path, executable: bool) -> Result<(), CacheError> {
    fs::copy(blob, dest).map_err(io_error(blob))?;
    set_mode(dest, if executable { EXECUTABLE_MODE } else { FILE_MODE })
}

fn create_new(path: &Path) -> Result<File, CacheError> {
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_error(path))
}

fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let written = create_new(path).and_then(|mut f| f.write_all(bytes).map_err(io_error(path)));
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

fn set_mode(path: &Path, mode: u32) -> Result<(), CacheError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io_error(path))
}

/// Atomically moves a staged file into place; on failure the staged file is removed.
/// Replacing an existing file is fine: a concurrent writer staged identical content.
fn rename_or_cleanup(staged: &Path, dest: &Path) -> Result<(), CacheError> {
    fs::rename(staged, dest).map_err(|e| {
        let _ = fs::remove_file(staged);
        io_error(dest)(e)
    })
}

fn remove_if_present(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// Removes a file and returns its size (0 if it was already gone).
fn remove_counting_bytes(path: &Path) -> Result<u64, CacheError> {
    let size = fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0);
    match fs::remove_file(path) {
        Ok(()) => Ok(size),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn read_dir_paths(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        paths.push(entry.map_err(io_error(dir))?.path());
    }
    Ok(paths)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// pid + counter + nanos: unique across threads and processes.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(".tmp.{}.{count}.{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> String {
        Digest::of_bytes(name.as_bytes()).to_hex()
    }

    fn write(path: &Path, contents: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
        set_mode(path, mode).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    /// A workspace with the given files, stored under `key`.
    fn store_files(cache: &Cache, key: &str, files: &[(&str, &[u8])]) -> Manifest {
        let work = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (relative, contents) in files {
            write(&work.path().join(relative), contents, FILE_MODE);
            paths.push(PathBuf::from(relative));
        }
        let digests = FileHasher::in_memory().digest_tree(work.path(), &paths).unwrap();
        cache.store(key, work.path(), &digests).unwrap()
    }

    fn new_cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        (dir, cache)
    }

    #[test]
    fn store_lookup_restore_round_trip() {
        let (_dir, cache) = new_cache();
        let work = tempfile::tempdir().unwrap();
        write(&work.path().join("out/model.bin"), b"weights", FILE_MODE);
        write(
            &work.path().join("out/bin/run.sh"),
            b"#!/bin/sh\n",
            EXECUTABLE_MODE,
        );
        let hasher = FileHasher::in_memory();
        let digests = hasher.digest_tree(work.path(), &[PathBuf::from("out")]).unwrap();
        let stored = cache.store(&key("stage"), work.path(), &digests).unwrap();
        assert!(stored.files["out/bin/run.sh"].executable);
        assert!(!stored.files["out/model.bin"].executable);
        assert_eq!(stored.files["out/model.bin"].size, 7);
        assert_eq!(mode_of(&cache.blob_path(&digests["out/model.bin"])), BLOB_MODE);
        assert_eq!(cache.keys().unwrap(), vec![key("stage")]);

        let manifest = match cache.lookup(&key("stage"), &hasher).unwrap() {
            Lookup::Hit(manifest) => manifest,
            other => panic!("expected a hit, got {other:?}"),
        };
        assert_eq!(manifest, stored);

        for mode in [LinkMode::Copy, LinkMode::HardlinkOrCopy] {
            let dest = tempfile::tempdir().unwrap();
            cache.restore(&manifest, dest.path(), mode, &hasher).unwrap();
            let model = dest.path().join("out/model.bin");
            let script = dest.path().join("out/bin/run.sh");
            assert_eq!(fs::read(&model).unwrap(), b"weights");
            assert_eq!(fs::read(&script).unwrap(), b"#!/bin/sh\n");
            assert_eq!(mode_of(&script), EXECUTABLE_MODE);
            let expected_model_mode = match mode {
                LinkMode::Copy => FILE_MODE,
                LinkMode::HardlinkOrCopy => BLOB_MODE,
            };
            assert_eq!(mode_of(&model), expected_model_mode, "{mode:?}");
        }
        // The caller's files were copied, not moved or linked.
        assert_eq!(
            fs::metadata(work.path().join("out/model.bin")).unwrap().nlink(),
            1
        );
    }

    #[test]
    fn hardlink_restore_shares_the_blob() {
        let (_dir, cache) = new_cache();
        let manifest = store_files(&cache, &key("s"), &[("a.txt", b"alpha")]);
        let dest = tempfile::tempdir().unwrap();
        let hasher = FileHasher::in_memory();
        cache
            .restore(&manifest, dest.path(), LinkMode::HardlinkOrCopy, &hasher)
            .unwrap();
        let blob = cache.blob_path(&manifest.files["a.txt"].digest);
        let restored = fs::metadata(dest.path().join("a.txt")).unwrap();
        assert_eq!(restored.ino(), fs::metadata(blob).unwrap().ino());
    }

    #[test]
    fn linked_store_adopts_the_source_and_still_hits() {
        let (_dir, cache) = new_cache();
        let source_dir = tempfile::tempdir().unwrap();
        let (linked, copied) = (
            source_dir.path().join("linked.npy"),
            source_dir.path().join("copied.txt"),
        );
        fs::write(&linked, b"preprocessed").unwrap();
        fs::write(&copied, b"user file").unwrap();
        let files: BTreeMap<String, (PathBuf, Digest)> = [
            (
                "out/linked.npy".to_string(),
                (linked.clone(), Digest::of_bytes(b"preprocessed")),
            ),
            (
                "project/copied.txt".to_string(),
                (copied.clone(), Digest::of_bytes(b"user file")),
            ),
        ]
        .into();
        let manifest = cache
            .store_sources_with(&key("l"), &files, |path| {
                if path.starts_with("out/") {
                    LinkMode::HardlinkOrCopy
                } else {
                    LinkMode::Copy
                }
            })
            .unwrap();
        let blob = |name: &str| cache.blob_path(&manifest.files[name].digest);
        assert_eq!(
            fs::metadata(&linked).unwrap().ino(),
            fs::metadata(blob("out/linked.npy")).unwrap().ino()
        );
        assert_ne!(
            fs::metadata(&copied).unwrap().ino(),
            fs::metadata(blob("project/copied.txt")).unwrap().ino()
        );
        let hasher = FileHasher::in_memory();
        assert!(matches!(
            cache.lookup(&key("l"), &hasher).unwrap(),
            Lookup::Hit(_)
        ));
    }

    #[test]
    fn import_fetches_only_the_blobs_missing_here() {
        let (_source_dir, source) = new_cache();
        let files: &[(&str, &[u8])] = &[("a.txt", b"alpha"), ("b.txt", b"beta"), ("c.txt", b"alpha")];
        let manifest = store_files(&source, &key("s"), files);
        let (_target_dir, target) = new_cache();
        store_files(&target, &key("other"), &[("x", b"beta")]);
        let hasher = FileHasher::in_memory();
        let mut asked = Vec::new();
        target
            .import(&manifest, &hasher, |missing| {
                for (file, staged) in missing {
                    asked.push(file.digest);
                    fs::copy(source.blob_path(&file.digest), staged).map_err(io_error(staged))?;
                }
                Ok::<(), CacheError>(())
            })
            .unwrap();
        assert_eq!(asked, vec![Digest::of_bytes(b"alpha")]);
        assert_eq!(target.lookup(&key("s"), &hasher).unwrap(), Lookup::Hit(manifest));
        assert_eq!(mode_of(&target.blob_path(&Digest::of_bytes(b"alpha"))), BLOB_MODE);
        assert!(read_dir_paths(&target.tmp_dir()).unwrap().is_empty());
    }

    #[test]
    fn a_failed_import_leaves_nothing() {
        let (_source_dir, source) = new_cache();
        let manifest = store_files(&source, &key("s"), &[("a.txt", b"alpha")]);
        let (_target_dir, target) = new_cache();
        let result = target.import(&manifest, &FileHasher::in_memory(), |missing| {
            fs::write(&missing[0].1, b"half").unwrap();
            Err(CacheError::InvalidKey { key: "stop".into() })
        });
        assert!(result.is_err());
        assert!(target.keys().unwrap().is_empty());
        assert!(!target.has_blob(&Digest::of_bytes(b"alpha")));
        assert!(read_dir_paths(&target.tmp_dir()).unwrap().is_empty());
        // a fetch that wrote the wrong number of bytes is refused too
        let result = target.import(&manifest, &FileHasher::in_memory(), |missing| {
            fs::write(&missing[0].1, b"alphabet").unwrap();
            Ok::<(), CacheError>(())
        });
        assert!(
            matches!(result, Err(CacheError::SizeMismatch { .. })),
            "{result:?}"
        );
        assert!(target.keys().unwrap().is_empty());
    }

    #[test]
    fn caches_opened_at_once_by_many_processes_all_open() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("cache");
            std::thread::scope(|scope| {
                let openers: Vec<_> = (0..8).map(|_| scope.spawn(|| Cache::open(&root))).collect();
                for opener in openers {
                    opener.join().unwrap().unwrap();
                }
            });
        }
    }

    #[test]
    fn a_folder_holding_other_things_is_not_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("letter.txt"), "mine").unwrap();
        let error = Cache::open(dir.path()).err().unwrap();
        assert!(matches!(error, CacheError::NotACache { .. }), "{error}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn lookup_of_unknown_key_is_a_miss() {
        let (_dir, cache) = new_cache();
        let hasher = FileHasher::in_memory();
        assert_eq!(cache.lookup(&key("none"), &hasher).unwrap(), Lookup::Miss);
    }

    #[test]
    fn invalid_keys_are_rejected() {
        let (_dir, cache) = new_cache();
        let hasher = FileHasher::in_memory();
        for bad in ["../../etc/passwd", "abc", &key("x").to_uppercase()] {
            let err = cache.lookup(bad, &hasher).unwrap_err();
            assert!(matches!(err, CacheError::InvalidKey { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn altered_blob_makes_entry_corrupt_and_removes_it() {
        let (_dir, cache) = new_cache();
        let manifest = store_files(&cache, &key("s"), &[("a.txt", b"alpha"), ("b.txt", b"beta")]);
        let blob = cache.blob_path(&manifest.files["a.txt"].digest);
        set_mode(&blob, FILE_MODE).unwrap();
        fs::write(&blob, b"ALPHA").unwrap();

        let hasher = FileHasher::in_memory();
        match cache.lookup(&key("s"), &hasher).unwrap() {
            Lookup::Corrupt { reason } => assert!(reason.contains("a.txt"), "{reason}"),
            other => panic!("expected corrupt, got {other:?}"),
        }
        assert!(cache.keys().unwrap().is_empty());
        assert!(!blob.exists(), "the altered blob must be removed");
        assert!(cache.blob_path(&manifest.files["b.txt"].digest).exists());
        assert_eq!(cache.lookup(&key("s"), &hasher).unwrap(), Lookup::Miss);
    }

    #[test]
    fn deleted_blob_makes_entry_corrupt() {
        let (_dir, cache) = new_cache();
        let manifest = store_files(&cache, &key("s"), &[("a.txt", b"alpha")]);
        fs::remove_file(cache.blob_path(&manifest.files["a.txt"].digest)).unwrap();
        let hasher = FileHasher::in_memory();
        let lookup = cache.lookup(&key("s"), &hasher).unwrap();
        assert!(matches!(lookup, Lookup::Corrupt { ref reason } if reason.contains("missing")));
        assert!(cache.keys().unwrap().is_empty());
    }

    #[test]
    fn leftovers_of_a_killed_store_never_read_as_a_hit() {
        let (_dir, cache) = new_cache();
        let hasher = FileHasher::in_memory();
        // Killed before the manifest rename: staged manifest and blob in tmp/ only.
        let manifest = store_files(&cache, &key("done"), &[("a.txt", b"alpha")]);
        let mut staged = manifest.clone();
        staged.key = key("killed");
        fs::write(cache.tmp_path(), serde_json::to_vec(&staged).unwrap()).unwrap();
        fs::write(cache.tmp_path(), b"half a blob").unwrap();
        assert_eq!(cache.lookup(&key("killed"), &hasher).unwrap(), Lookup::Miss);

        // A truncated entry (written by something other than `store`).
        let entry = cache.entry_path(&key("torn")).unwrap();
        fs::write(&entry, br#"{"key": "#).unwrap();
        let lookup = cache.lookup(&key("torn"), &hasher).unwrap();
        assert!(matches!(lookup, Lookup::Corrupt { .. }), "{lookup:?}");
        assert!(!entry.exists());
    }

    #[test]
    fn restore_leaves_correct_destination_alone_and_fixes_wrong_one() {
        let (_dir, cache) = new_cache();
        let manifest = store_files(&cache, &key("s"), &[("a.txt", b"alpha"), ("b.txt", b"beta")]);
        let dest = tempfile::tempdir().unwrap();
        let hasher = FileHasher::in_memory();
        cache
            .restore(&manifest, dest.path(), LinkMode::Copy, &hasher)
            .unwrap();
        let a = dest.path().join("a.txt");
        let b = dest.path().join("b.txt");
        let inode_before = fs::metadata(&a).unwrap().ino();
        fs::write(&b, b"BETA").unwrap();

        cache
            .restore(&manifest, dest.path(), LinkMode::Copy, &hasher)
            .unwrap();
        assert_eq!(
            fs::metadata(&a).unwrap().ino(),
            inode_before,
            "a.txt was rewritten"
        );
        assert_eq!(fs::read(&b).unwrap(), b"beta");
        let leftovers: Vec<_> = read_dir_paths(dest.path()).unwrap();
        assert_eq!(leftovers.len(), 2, "temp files left behind: {leftovers:?}");
    }

    #[test]
    fn store_sources_and_restore_file_handle_scattered_files() {
        let (_dir, cache) = new_cache();
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let a = first.path().join("a.txt");
        let b = second.path().join("deep/b.sh");
        write(&a, b"alpha", FILE_MODE);
        write(&b, b"beta", EXECUTABLE_MODE);
        let mut files = BTreeMap::new();
        files.insert("project/a.txt".to_string(), (a, Digest::of_bytes(b"alpha")));
        files.insert("out/b.sh".to_string(), (b, Digest::of_bytes(b"beta")));
        let manifest = cache.store_sources(&key("s"), &files).unwrap();
        assert!(manifest.files["out/b.sh"].executable);

        let hasher = FileHasher::in_memory();
        assert_eq!(
            cache.lookup(&key("s"), &hasher).unwrap(),
            Lookup::Hit(manifest.clone())
        );
        let dest_root = tempfile::tempdir().unwrap();
        let dest = dest_root.path().join("x/y/b.sh");
        let file = &manifest.files["out/b.sh"];
        cache
            .restore_file(file, &dest, LinkMode::HardlinkOrCopy, &hasher)
            .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"beta");
        assert_eq!(mode_of(&dest), EXECUTABLE_MODE);
    }

    #[test]
    fn restore_refuses_paths_escaping_the_destination() {
        let (_dir, cache) = new_cache();
        let mut manifest = store_files(&cache, &key("s"), &[("a.txt", b"alpha")]);
        let file = manifest.files.remove("a.txt").unwrap();
        manifest.files.insert("../escape.txt".to_string(), file);
        let dest = tempfile::tempdir().unwrap();
        let err = cache
            .restore(&manifest, dest.path(), LinkMode::Copy, &FileHasher::in_memory())
            .unwrap_err();
        assert!(matches!(err, CacheError::UnsafePath { .. }), "{err}");
    }

    #[test]
    fn store_refuses_a_file_that_changed_since_it_was_digested() {
        let (_dir, cache) = new_cache();
        let work = tempfile::tempdir().unwrap();
        write(&work.path().join("a.txt"), b"new contents", FILE_MODE);
        let mut files = BTreeMap::new();
        files.insert("a.txt".to_string(), Digest::of_bytes(b"old contents"));
        let err = cache.store(&key("s"), work.path(), &files).unwrap_err();
        assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
        assert!(cache.keys().unwrap().is_empty());
        assert_eq!(cache.size_bytes().unwrap(), 0);
        assert!(read_dir_paths(&cache.tmp_dir()).unwrap().is_empty());
    }

    #[test]
    fn gc_keeps_referenced_entries_and_removes_the_rest() {
        let (_dir, cache) = new_cache();
        let kept = store_files(&cache, &key("kept"), &[("shared", b"same"), ("own", b"kept!")]);
        store_files(
            &cache,
            &key("dropped"),
            &[("shared", b"same"), ("own", b"dropped-only")],
        );
        let stale = cache.tmp_path();
        fs::write(&stale, b"12345").unwrap();
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * STALE_TMP_AGE)
            .unwrap();
        let fresh = cache.tmp_path();
        fs::write(&fresh, b"in progress").unwrap();
        assert_eq!(cache.size_bytes().unwrap(), 4 + 5 + 12);

        let keep: HashSet<String> = [key("kept")].into_iter().collect();
        let report = cache.gc(&keep).unwrap();
        assert_eq!(
            report,
            GcReport {
                entries_removed: 1,
                blobs_removed: 1,
                tmp_files_removed: 1,
                staging_folders_removed: 0,
                bytes_freed: 12 + 5,
            }
        );
        assert_eq!(cache.keys().unwrap(), vec![key("kept")]);
        assert_eq!(cache.size_bytes().unwrap(), 4 + 5);
        assert!(!stale.exists());
        assert!(fresh.exists());
        let hasher = FileHasher::in_memory();
        assert_eq!(cache.lookup(&key("kept"), &hasher).unwrap(), Lookup::Hit(kept));
    }

    #[test]
    fn concurrent_stores_of_the_same_key_both_succeed() {
        let (_dir, cache) = new_cache();
        let work = tempfile::tempdir().unwrap();
        for i in 0..20 {
            write(
                &work.path().join(format!("f{i}")),
                format!("file {i}").as_bytes(),
                FILE_MODE,
            );
        }
        let digests = FileHasher::in_memory()
            .digest_tree(work.path(), &[PathBuf::from(".")])
            .unwrap();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        (0..10).try_for_each(|_| cache.store(&key("s"), work.path(), &digests).map(drop))
                    })
                })
                .collect();
            for worker in workers {
                worker.join().unwrap().unwrap();
            }
        });
        let hasher = FileHasher::in_memory();
        let manifest = match cache.lookup(&key("s"), &hasher).unwrap() {
            Lookup::Hit(manifest) => manifest,
            other => panic!("expected a hit, got {other:?}"),
        };
        assert_eq!(manifest.files.len(), 20);
        assert!(read_dir_paths(&cache.tmp_dir()).unwrap().is_empty());
    }
}
