//! The remote cache's transfers, async on the remote's own runtime: the object layout
//! (`ac/<key>` for manifests, `cas/<digest>` for blobs, as Bazel's HTTP cache lays them out), and
//! moving one object in or out. Every blob is checked against its digest on the way: a download as
//! it streams into its staging file, an upload before it is sent, so the remote never serves or
//! receives bytes other than its address says. Large blobs stream in parts; none is held whole in
//! memory.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::engine::hashing::Digest;

/// Blobs up to this size are read into memory and sent in one request.
pub(super) const WHOLE_BYTES: u64 = 8 * 1024 * 1024;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
const PART_BYTES: usize = 16 * 1024 * 1024;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// Why a transfer did not happen.
#[derive(Debug)]
pub(super) enum TransferError {
    /// The store failed (unreachable, refused, timed out after its retries).
    Store(object_store::Error),
    /// The object's bytes are not what its address says (or it is missing though a manifest
    /// names it): it is ignored, and replaced by the next upload.
    Damaged { digest: Digest, problem: String },
    /// This machine's side: reading a blob, writing a download.
    Local { path: PathBuf, source: io::Error },
}

fn local(path: &FsPath) -> impl FnOnce(io::Error) -> TransferError + '_ {
    move |source| TransferError::Local {
        path: path.to_path_buf(),
        source,
    }
}

/// Where nnflow's objects lie in a store: under a prefix (a bucket's folder), or at its root.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub prefix: String,
}

impl Layout {
    pub fn manifest(&self, key: &str) -> Path {
        self.object(&format!("ac/{key}"))
    }

    pub fn blob(&self, digest: &Digest) -> Path {
        self.object(&format!("cas/{}", digest.to_hex()))
    }

    fn object(&self, name: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{name}", self.prefix))
        }
    }
}

/// The object's bytes, `None` when there is none.
pub(super) async fn get_small(
    store: &dyn ObjectStore,
    location: &Path,
) -> Result<Option<Bytes>, object_store::Error> {
    match store.get(location).await {
        Ok(result) => Ok(Some(result.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The object's size, `None` when there is none.
pub(super) async fn size_of(
    store: &dyn ObjectStore,
    location: &Path,
) -> Result<Option<u64>, object_store::Error> {
    match store.head(location).await {
        Ok(meta) => Ok(Some(meta.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Streams a blob into the new file `staged`, checking its size and digest as it arrives; returns
/// its size. On any failure `staged` may remain for the caller to remove.
pub(super) async fn download(
    store: &dyn ObjectStore,
    location: &Path,
    staged: &FsPath,
    digest: Digest,
    size: u64,
) -> Result<u64, TransferError> {
    let result = match store.get(location).await {
        Ok(result) => result,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(TransferError::Damaged {
                digest,
                problem: "missing".to_string(),
            })
        }
        Err(e) => return Err(TransferError::Store(e)),
    };
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(staged)
        .map_err(local(staged))?;
    let mut copy = CheckedCopy {
        writer: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
        staged,
        hasher: blake3::Hasher::new(),
        received: 0,
        digest,
        size,
    };
    match result.payload {
        // a `file://` remote hands over the file itself: read it in large pieces (its stream
        // would go in small ones, each on a blocking thread)
        GetResultPayload::File(mut source, path) => {
            let mut buffer = vec![0u8; WRITE_BUFFER_BYTES];
            loop {
                let count = read_full(&mut source, &mut buffer).map_err(local(&path))?;
                if count == 0 {
                    break;
                }
                copy.add(&buffer[..count])?;
            }
        }
        GetResultPayload::Stream(mut stream) => {
            while let Some(chunk) = stream.next().await {
                copy.add(&chunk.map_err(TransferError::Store)?)?;
            }
        }
    }
    copy.finish()
}

/// A download being written to its staging file, hashed and counted as it goes.
struct CheckedCopy<'a> {
    writer: BufWriter<File>,
    staged: &'a FsPath,
    hasher: blake3::Hasher,
    received: u64,
    digest: Digest,
    size: u64,
}

impl CheckedCopy<'_> {
    fn damaged(&self, problem: String) -> TransferError {
        TransferError::Damaged {
            digest: self.digest,
            problem,
        }
    }

    fn add(&mut self, bytes: &[u8]) -> Result<(), TransferError> {
        self.received += bytes.len() as u64;
        if self.received > self.size {
            let size = self.size;
            return Err(self.damaged(format!("longer than the {size} bytes its manifest says")));
        }
        self.hasher.update(bytes);
        self.writer.write_all(bytes).map_err(local(self.staged))
    }

    fn finish(mut self) -> Result<u64, TransferError> {
        self.writer.flush().map_err(local(self.staged))?;
        let actual = Digest(*self.hasher.finalize().as_bytes());
        if self.received != self.size {
            let (received, size) = (self.received, self.size);
            return Err(self.damaged(format!("{received} bytes, expected {size}")));
        }
        if actual != self.digest {
            return Err(self.damaged(format!("its contents have digest {actual}")));
        }
        Ok(self.received)
    }
}

/// Uploads the local blob `source` (of `size` bytes) under its digest, unless the store already
/// has an object of that size there and `replace` is false; returns the bytes sent (`None`: the
/// store had it). The blob is
/// checked against its digest first: a damaged local blob is never uploaded.
pub(super) async fn upload(
    store: &Arc<dyn ObjectStore>,
    location: &Path,
    source: &FsPath,
    digest: Digest,
    size: u64,
    replace: bool,
    multipart: bool,
) -> Result<Option<u64>, TransferError> {
    if !replace
        && size_of(store.as_ref(), location)
            .await
            .map_err(TransferError::Store)?
            == Some(size)
    {
        return Ok(None);
    }
    let damaged = |actual: Digest| TransferError::Damaged {
        digest,
        problem: format!("the local blob {} has digest {actual}", source.display()),
    };
    if size <= WHOLE_BYTES {
        let bytes = std::fs::read(source).map_err(local(source))?;
        let actual = Digest::of_bytes(&bytes);
        if actual != digest {
            return Err(damaged(actual));
        }
        store
            .put(location, PutPayload::from(bytes))
            .await
            .map_err(TransferError::Store)?;
    } else if multipart {
        upload_in_parts(store, location, source, digest).await?;
    } else {
        // A store without multipart uploads (plain HTTP) gets one request whose body is the
        // mapped file: the kernel pages it in and out, nothing is copied into memory.
        let file = File::open(source).map_err(local(source))?;
        // SAFETY: blobs are read-only (0444) and only ever replaced by a rename, never written in
        // place, so the mapping does not change under us; the bytes are checked against the
        // digest below, and a reader checks them again.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(local(source))?;
        let actual = Digest(*blake3::Hasher::new().update_rayon(&map).finalize().as_bytes());
        if actual != digest {
            return Err(damaged(actual));
        }
        store
            .put(location, PutPayload::from(Bytes::from_owner(map)))
            .await
            .map_err(TransferError::Store)?;
    }
    Ok(Some(size))
}

/// A multipart upload read from the file part by part, a few parts in flight; completed only when
/// what was read has the blob's digest (aborted otherwise, so nothing appears).
async fn upload_in_parts(
    store: &Arc<dyn ObjectStore>,
    location: &Path,
    source: &FsPath,
    digest: Digest,
) -> Result<(), TransferError> {
    let mut file = File::open(source).map_err(local(source))?;
    let upload = store
        .put_multipart(location)
        .await
        .map_err(TransferError::Store)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; PART_BYTES];
    let read = loop {
        let count = match read_full(&mut file, &mut buffer) {
            Ok(0) => break Ok(()),
            Ok(count) => count,
            Err(e) => break Err(local(source)(e)),
        };
        hasher.update(&buffer[..count]);
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            break Err(TransferError::Store(e));
        }
        writer.write(&buffer[..count]);
    };
    let actual = Digest(*hasher.finalize().as_bytes());
    let problem = match read {
        Err(e) => Some(e),
        Ok(()) if actual != digest => Some(TransferError::Damaged {
            digest,
            problem: format!("the local blob {} has digest {actual}", source.display()),
        }),
        Ok(()) => None,
    };
    if let Some(problem) = problem {
        // best effort: an upload never completed is never visible, and stores expire the parts
        let _ = writer.abort().await;
        return Err(problem);
    }
    writer.finish().await.map_err(TransferError::Store)?;
    Ok(())
}

/// Fills `buffer` as far as the file allows; the count read (0 at the end).
fn read_full(file: &mut File, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_lie_under_the_prefix() {
        let digest = Digest::of_bytes(b"x");
        let root = Layout {
            prefix: String::new(),
        };
        assert_eq!(root.manifest("k").as_ref(), "ac/k");
        assert_eq!(root.blob(&digest).as_ref(), format!("cas/{}", digest.to_hex()));
        let nested = Layout {
            prefix: "team/nnflow".to_string(),
        };
        assert_eq!(nested.manifest("k").as_ref(), "team/nnflow/ac/k");
    }
}
