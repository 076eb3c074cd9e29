//! The remote cache: results shared between machines (CI runners, colleagues) through an object
//! store. Looked up after the local cache: a manifest (`ac/<key>`) found there has its missing
//! blobs (`cas/<digest>`) streamed into the local cache, each checked against its digest, and then
//! restores like a local hit. What a run computes is uploaded in the background while the run
//! goes on (blobs first, the manifest last, so a manifest never names a blob the remote lacks),
//! and the run waits for the uploads at its end.
//!
//! A remote never fails a run: the first error (unreachable, refused, timed out after retries) is
//! reported once, and the run goes on with the local cache alone. A damaged object is ignored
//! (the stage is recomputed) and replaced by the next upload. Credentials come from each store's
//! own environment variables (or, for HTTP, the URL's user information); no text this module
//! prints or returns holds them.
//!
//! This module owns the store's async client and a small tokio runtime for it; the rest of the
//! engine stays synchronous and sees [`Remote`]'s blocking methods only.

mod address;
mod connection;
mod transfer;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

pub use self::address::{Address, AddressError, Scheme};
use self::connection::Connection;
use self::transfer::{download, get_small, upload, TransferError, WHOLE_BYTES};
use super::cache::{Cache, CacheError, Manifest, ManifestFile};
use super::hashing::{Digest, FileHasher};

/// Manifests fetched, blobs checked or moved, at once.
const PARALLEL_TRANSFERS: usize = 8;
/// What a large upload weighs against [`PARALLEL_TRANSFERS`]: its parts in flight.
const LARGE_UPLOAD_WEIGHT: u32 = 4;

/// How a run uses the remote cache.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteMode {
    /// Restore from the remote, upload nothing (pull requests from forks, say).
    Read,
    /// Upload what the run computes, restore nothing from the remote.
    Write,
    /// Both (the default).
    #[default]
    ReadWrite,
}

impl RemoteMode {
    pub fn reads(self) -> bool {
        self != RemoteMode::Write
    }

    pub fn writes(self) -> bool {
        self != RemoteMode::Read
    }

    fn parse(text: &str) -> Option<RemoteMode> {
        match text.trim() {
            "read" => Some(RemoteMode::Read),
            "write" => Some(RemoteMode::Write),
            "read-write" => Some(RemoteMode::ReadWrite),
            _ => None,
        }
    }
}

/// Which remote a command uses, from its command line; the environment and the pipeline file come
/// after it.
#[derive(Clone, Debug, Default)]
pub struct RemoteChoice {
    pub url: UrlChoice,
    pub mode: Option<RemoteMode>,
}

#[derive(Clone, Debug, Default)]
pub enum UrlChoice {
    /// `NNFLOW_REMOTE_CACHE` if set (empty: none), else the pipeline's `remote_cache`.
    #[default]
    Configured,
    Url(String),
    Off,
}

/// Why a remote cache setting is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Address(#[from] AddressError),
    #[error("NNFLOW_REMOTE_CACHE_MODE={0:?}: expected read, write or read-write")]
    Mode(String),
}

/// Resolves the remote a command uses: the command line, else `NNFLOW_REMOTE_CACHE` (empty for
/// none), else the pipeline's `remote_cache`; the mode from the command line, else
/// `NNFLOW_REMOTE_CACHE_MODE`, else read-write. Opens no connection.
pub fn choose(choice: &RemoteChoice, configured: Option<&str>) -> Result<Option<Remote>, RemoteError> {
    let url = match &choice.url {
        UrlChoice::Off => None,
        UrlChoice::Url(url) => Some(url.clone()),
        UrlChoice::Configured => match std::env::var("NNFLOW_REMOTE_CACHE") {
            Ok(url) => Some(url).filter(|u| !u.trim().is_empty()),
            Err(_) => configured.map(str::to_string),
        },
    };
    let Some(url) = url else { return Ok(None) };
    let mode = match (choice.mode, std::env::var("NNFLOW_REMOTE_CACHE_MODE")) {
        (Some(mode), _) => mode,
        (None, Ok(text)) if !text.trim().is_empty() => {
            RemoteMode::parse(&text).ok_or(RemoteError::Mode(text))?
        }
        (None, _) => RemoteMode::default(),
    };
    Ok(Some(Remote::new(Address::parse(&url)?, mode)))
}

/// Objects moved one way during a run.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Cache entries (stage results) whose manifest was moved.
    pub entries: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// What a run did with the remote cache (part of `nnflow run --json`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct RemoteSummary {
    /// The remote's URL without credentials.
    pub url: String,
    pub mode: RemoteMode,
    pub downloaded: Transfers,
    pub uploaded: Transfers,
    /// Remote objects found damaged (wrong digest or size, unreadable manifest) and ignored.
    pub damaged: u64,
    /// Why the remote was given up during the run (redacted); null when it answered throughout.
    pub error: Option<String>,
}

/// A remote cache: where it is, how it is used, and what it did so far. Connects on first use.
pub struct Remote {
    shared: Arc<Shared>,
    mode: RemoteMode,
    connection: OnceLock<Option<Connection>>,
    uploads: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What the background uploads share with the run.
struct Shared {
    address: Address,
    /// Set at the first failure: nothing more is asked of the remote in this process.
    down: AtomicBool,
    error: Mutex<Option<String>>,
    /// Blobs found damaged on the remote: uploaded again even where an object is present.
    damaged_blobs: Mutex<HashSet<Digest>>,
    damaged: AtomicU64,
    slots: tokio::sync::Semaphore,
    downloaded: Counters,
    uploaded: Counters,
}

#[derive(Default)]
struct Counters {
    entries: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
}

impl Counters {
    fn add(&self, entries: u64, blobs: u64, bytes: u64) {
        self.entries.fetch_add(entries, Ordering::Relaxed);
        self.blobs.fetch_add(blobs, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn read(&self) -> Transfers {
        Transfers {
            entries: self.entries.load(Ordering::Relaxed),
            blobs: self.blobs.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// Gives the remote up for the rest of the process; the first time, says so (once per run).
    fn give_up(&self, doing: &str, error: &dyn std::fmt::Display) {
        let text = self.address.redact(&error.to_string());
        self.down.store(true, Ordering::SeqCst);
        let mut first = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            crate::errln!(
                "warning: remote cache {} failed while {doing} ({text}); continuing with the local cache only",
                self.address.shown()
            );
            *first = Some(format!("{doing}: {text}"));
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// A damaged remote object: ignored, and replaced by the next upload.
    fn damaged_object(&self, what: &str, problem: &str) {
        self.damaged.fetch_add(1, Ordering::Relaxed);
        crate::errln!(
            "warning: remote cache {}: {what} is damaged ({}); ignoring it",
            self.address.shown(),
            self.address.redact(problem)
        );
    }

    /// How a failed transfer is taken: the store's failure gives the remote up, damage is
    /// remembered and ignored, a local failure is reported.
    fn failed(&self, doing: &str, error: TransferError) {
        match error {
            TransferError::Store(e) => self.give_up(doing, &e),
            TransferError::Damaged { digest, problem } => {
                self.damaged_blobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(digest);
                self.damaged_object(&format!("blob {digest}"), &problem);
            }
            TransferError::Local { path, source } => {
                crate::errln!("warning: remote cache: {doing}: {}: {source}", path.display());
            }
        }
    }
}

/// The remote could not be asked (it failed now or earlier in the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable;

/// Errors of a fetch, as `Cache::import` passes them through.
enum FetchError {
    Cache(CacheError),
    Transfer(TransferError),
}

impl From<CacheError> for FetchError {
    fn from(error: CacheError) -> Self {
        FetchError::Cache(error)
    }
}

impl Remote {
    pub fn new(address: Address, mode: RemoteMode) -> Remote {
        Remote {
            shared: Arc::new(Shared {
                address,
                down: AtomicBool::new(false),
                error: Mutex::new(None),
                damaged_blobs: Mutex::new(HashSet::new()),
                damaged: AtomicU64::new(0),
                slots: tokio::sync::Semaphore::new(PARALLEL_TRANSFERS),
                downloaded: Counters::default(),
                uploaded: Counters::default(),
            }),
            mode,
            connection: OnceLock::new(),
            uploads: Mutex::new(Vec::new()),
        }
    }

    /// The URL without credentials.
    pub fn shown(&self) -> &str {
        self.shared.address.shown()
    }

    pub fn mode(&self) -> RemoteMode {
        self.mode
    }

    /// The store's client and runtime, made on first use; `None` once the remote was given up.
    fn connection(&self) -> Option<&Connection> {
        if self.shared.is_down() {
            return None;
        }
        let connection = self
            .connection
            .get_or_init(|| match Connection::open(&self.shared.address) {
                Ok(connection) => Some(connection),
                Err(error) => {
                    self.shared.give_up("connecting", &error);
                    None
                }
            });
        connection.as_ref()
    }

    /// The remote's manifest for `key`, its blobs not fetched (what `status` needs): `Ok(None)`
    /// when the remote has none or a damaged one (reported), `Err` when it could not be asked
    /// (reported once).
    pub fn manifest(&self, key: &str) -> Result<Option<Manifest>, Unreachable> {
        let connection = self.connection().ok_or(Unreachable)?;
        let shared = &self.shared;
        let location = connection.layout.manifest(key);
        let bytes = match connection.block_on(get_small(connection.store.as_ref(), &location)) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(error) => {
                shared.give_up("looking up a result", &error);
                return Err(Unreachable);
            }
        };
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(manifest) if manifest.key == key => Ok(Some(manifest)),
            Ok(manifest) => {
                let problem = format!("it records key {}", manifest.key);
                shared.damaged_object(&format!("entry {key}"), &problem);
                Ok(None)
            }
            Err(error) => {
                shared.damaged_object(&format!("entry {key}"), &error.to_string());
                Ok(None)
            }
        }
    }

    /// The entry for `key` from the remote, added to the local cache (its blobs checked against
    /// their digests): a hit to restore. `None` on a miss, in write-only mode, or when the remote
    /// failed or holds a damaged entry (each reported).
    pub fn fetch(&self, cache: &Cache, hasher: &FileHasher, key: &str) -> Option<Manifest> {
        if !self.mode.reads() {
            return None;
        }
        let manifest = self.manifest(key).ok()??;
        let connection = self.connection()?;
        let shared = &self.shared;
        let fetched = cache.import(&manifest, hasher, |missing: &[(ManifestFile, PathBuf)]| {
            let downloads = futures_util::stream::iter(missing.iter().map(|(file, staged)| async move {
                let _slot = shared.slots.acquire().await;
                let location = connection.layout.blob(&file.digest);
                download(
                    connection.store.as_ref(),
                    &location,
                    staged,
                    file.digest,
                    file.size,
                )
                .await
            }))
            .buffer_unordered(PARALLEL_TRANSFERS)
            .try_fold(0u64, |total, bytes| async move { Ok(total + bytes) });
            let bytes = connection.block_on(downloads).map_err(FetchError::Transfer)?;
            shared.downloaded.add(1, missing.len() as u64, bytes);
            Ok::<(), FetchError>(())
        });
        match fetched {
            Ok(()) => Some(manifest),
            Err(FetchError::Transfer(error)) => {
                shared.failed("downloading a result", error);
                None
            }
            Err(FetchError::Cache(error)) => {
                crate::errln!(
                    "warning: cannot add the result from remote cache {} to the local cache: {error}",
                    self.shown()
                );
                None
            }
        }
    }

    /// Uploads a result stored in the local cache, in the background: blobs the remote lacks (or
    /// holds damaged) first, the manifest last. [`Remote::finish`] waits for it.
    pub fn upload(&self, cache: &Cache, manifest: &Manifest) {
        if !self.mode.writes() {
            return;
        }
        let Some(connection) = self.connection() else {
            return;
        };
        let mut blobs: Vec<(Digest, u64, PathBuf)> = manifest
            .files
            .values()
            .map(|file| (file.digest, file.size, cache.blob_file(&file.digest)))
            .collect();
        blobs.sort_by_key(|(digest, _, _)| *digest);
        blobs.dedup_by_key(|(digest, _, _)| *digest);
        let manifest_json = match serde_json::to_vec_pretty(manifest) {
            Ok(json) => json,
            Err(_) => return,
        };
        let key = manifest.key.clone();
        let shared = Arc::clone(&self.shared);
        let store = Arc::clone(&connection.store);
        let layout = connection.layout.clone();
        let multipart = connection.multipart;
        let task = async move {
            let sent = futures_util::stream::iter(blobs.into_iter().map(|(digest, size, source)| {
                let (shared, store, layout) = (&shared, &store, &layout);
                async move {
                    let weight = if size > WHOLE_BYTES {
                        LARGE_UPLOAD_WEIGHT
                    } else {
                        1
                    };
                    let _slots = shared.slots.acquire_many(weight).await;
                    if shared.is_down() {
                        return Err(None);
                    }
                    let replace = shared
                        .damaged_blobs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&digest);
                    let location = layout.blob(&digest);
                    upload(store, &location, &source, digest, size, replace, multipart)
                        .await
                        .map_err(Some)
                }
            }))
            .buffer_unordered(PARALLEL_TRANSFERS)
            .collect::<Vec<_>>()
            .await;
            let mut blobs_sent = 0;
            let mut bytes_sent = 0;
            let mut complete = true;
            for result in sent {
                match result {
                    Ok(None) => {}
                    Ok(Some(bytes)) => {
                        blobs_sent += 1;
                        bytes_sent += bytes;
                    }
                    Err(error) => {
                        complete = false;
                        if let Some(error) = error {
                            shared.failed("uploading a result", error);
                        }
                    }
                }
            }
            shared.uploaded.add(0, blobs_sent, bytes_sent);
            if !complete || shared.is_down() {
                return;
            }
            let location = layout.manifest(&key);
            match store.put(&location, manifest_json.into()).await {
                Ok(_) => shared.uploaded.add(1, 0, 0),
                Err(error) => shared.give_up("uploading a result", &error),
            }
        };
        let handle = connection.spawn(task);
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// Waits for the uploads started so far; what the remote did in this process.
    pub fn finish(&self) -> RemoteSummary {
        let handles: Vec<_> = std::mem::take(&mut *self.uploads.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(Some(connection)) = self.connection.get() {
            connection.block_on(async {
                for handle in handles {
                    // a task that panicked uploaded nothing more; the run goes on
                    let _ = handle.await;
                }
            });
        }
        let shared = &self.shared;
        RemoteSummary {
            url: self.shown().to_string(),
            mode: self.mode,
            downloaded: shared.downloaded.read(),
            uploaded: shared.uploaded.read(),
            damaged: shared.damaged.load(Ordering::Relaxed),
            error: shared.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::engine::cache::Lookup;

    /// A cache holding one entry `key` with these files.
    fn cache_with(root: &Path, key: &str, files: &[(&str, &[u8])]) -> (Cache, Manifest) {
        let cache = Cache::open(&root.join("cache")).unwrap();
        let work = root.join("work");
        let mut digests = BTreeMap::new();
        for (name, contents) in files {
            std::fs::create_dir_all(&work).unwrap();
            std::fs::write(work.join(name), contents).unwrap();
            digests.insert(name.to_string(), Digest::of_bytes(contents));
        }
        let manifest = cache.store(key, &work, &digests).unwrap();
        (cache, manifest)
    }

    fn key(name: &str) -> String {
        Digest::of_bytes(name.as_bytes()).to_hex()
    }

    #[test]
    fn a_result_goes_up_and_comes_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("remote").display());
        let hasher = FileHasher::in_memory();
        let (source, manifest) = cache_with(&dir.path().join("a"), &key("s"), &[("x", b"ex"), ("y", b"why")]);
        let writer = Remote::new(Address::parse(&url).unwrap(), RemoteMode::ReadWrite);
        writer.upload(&source, &manifest);
        let summary = writer.finish();
        assert_eq!(
            summary.uploaded,
            Transfers {
                entries: 1,
                blobs: 2,
                bytes: 5
            }
        );
        assert_eq!(summary.error, None);

        let reader = Remote::new(Address::parse(&url).unwrap(), RemoteMode::Read);
        let target = Cache::open(&dir.path().join("b")).unwrap();
        assert_eq!(reader.fetch(&target, &hasher, &key("s")), Some(manifest.clone()));
        assert_eq!(
            target.lookup(&key("s"), &hasher).unwrap(),
            Lookup::Hit(manifest.clone())
        );
        assert_eq!(reader.fetch(&target, &hasher, &key("missing")), None);
        // read mode uploads nothing
        reader.upload(&target, &manifest);
        assert_eq!(reader.finish().uploaded, Transfers::default());

        // a damaged blob is ignored, and the next upload replaces it
        let blob = dir
            .path()
            .join("remote/cas")
            .join(Digest::of_bytes(b"why").to_hex());
        std::fs::write(&blob, b"wHy").unwrap();
        let third = Cache::open(&dir.path().join("c")).unwrap();
        assert_eq!(reader.fetch(&third, &hasher, &key("s")), None);
        assert!(third.keys().unwrap().is_empty());
        assert_eq!(reader.finish().damaged, 1);
        // a writer that found the damage uploads the blob again though the remote has one
        let writer = Remote::new(Address::parse(&url).unwrap(), RemoteMode::ReadWrite);
        assert_eq!(writer.fetch(&third, &hasher, &key("s")), None);
        writer.upload(&source, &manifest);
        writer.finish();
        assert_eq!(std::fs::read(&blob).unwrap(), b"why");
    }

    #[test]
    fn an_unreachable_remote_is_given_up_once() {
        let remote = Remote::new(
            Address::parse("http://127.0.0.1:1/x").unwrap(),
            RemoteMode::ReadWrite,
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(remote.manifest(&key("a")), Err(Unreachable));
        assert_eq!(remote.fetch(&cache, &FileHasher::in_memory(), &key("a")), None);
        let summary = remote.finish();
        assert!(summary
            .error
            .is_some_and(|e| e.starts_with("looking up a result")));
    }

    #[test]
    fn the_mode_and_url_come_from_the_command_line_first() {
        let choice = RemoteChoice {
            url: UrlChoice::Url("file:///tmp/x".into()),
            mode: Some(RemoteMode::Write),
        };
        let remote = choose(&choice, Some("s3://b/p")).unwrap().unwrap();
        assert_eq!(
            (remote.shown(), remote.mode()),
            ("file:///tmp/x", RemoteMode::Write)
        );
        let off = RemoteChoice {
            url: UrlChoice::Off,
            mode: None,
        };
        assert!(choose(&off, Some("s3://b/p")).unwrap().is_none());
        let bad = RemoteChoice {
            url: UrlChoice::Url("ftp://h/x".into()),
            mode: None,
        };
        assert!(choose(&bad, None).is_err());
    }
}
