//! One remote store's client: object_store's builder for the URL's scheme (its credentials from
//! that store's standard environment variables: `AWS_*`, `GOOGLE_*`, `AZURE_*`), the timeouts and
//! retries nnflow runs it with, and the small tokio runtime it runs on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use super::address::{Address, Scheme};
use super::transfer::Layout;

/// A server that does not accept a connection by then is taken as down.
const CONNECT_TIMEOUT: &str = "5s";
/// A transfer that receives nothing for this long is stalled (retried, then given up).
const READ_TIMEOUT: &str = "30s";
/// Bounds a whole request, the body of a large blob included.
const REQUEST_TIMEOUT: &str = "1h";
/// Worker threads of the runtime: transfers wait on the network, not on the CPU.
const WORKERS: usize = 2;

/// Retries of a failed request (connection refused, 5xx, timeout): three, after 0.1, 0.2, 0.4 s,
/// all within 30 s, so a remote that is down costs a run about a second.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

/// The client settings nnflow sets on every store (on top of what its environment sets).
fn client_settings() -> [(ClientConfigKey, &'static str); 3] {
    [
        (ClientConfigKey::ConnectTimeout, CONNECT_TIMEOUT),
        (ClientConfigKey::ReadTimeout, READ_TIMEOUT),
        (ClientConfigKey::Timeout, REQUEST_TIMEOUT),
    ]
}

/// Why a store's client could not be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("cannot start its runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot create {}: {source}", path.display())]
    Folder {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] object_store::Error),
}

pub(super) struct Connection {
    runtime: tokio::runtime::Runtime,
    pub store: Arc<dyn ObjectStore>,
    pub layout: Layout,
    /// Whether the store takes multipart uploads (plain HTTP does not).
    pub multipart: bool,
}

impl Connection {
    /// The client for `address`. Opens no network connection yet.
    pub fn open(address: &Address) -> Result<Connection, ConnectError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("nnflow-remote")
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        let mut prefix = String::new();
        let store: Arc<dyn ObjectStore> = match address.scheme {
            Scheme::Http => {
                let mut builder = HttpBuilder::new()
                    .with_url(address.http_base())
                    .with_retry(retry());
                for (key, value) in client_settings() {
                    builder = builder.with_config(key, value);
                }
                // the URL says http:// (a server on the local network, a test's): no TLS wanted
                let plain = address.http_base().starts_with("http://");
                builder = builder.with_config(ClientConfigKey::AllowHttp, plain.to_string());
                Arc::new(builder.build()?)
            }
            Scheme::S3 => {
                prefix = address.prefix().to_string();
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(address.bucket())
                    .with_retry(retry());
                for (key, value) in client_settings() {
                    builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
                }
                Arc::new(builder.build()?)
            }
            Scheme::Gcs => {
                prefix = address.prefix().to_string();
                let mut builder = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(address.bucket())
                    .with_retry(retry());
                for (key, value) in client_settings() {
                    builder = builder.with_config(GoogleConfigKey::Client(key), value);
                }
                Arc::new(builder.build()?)
            }
            Scheme::Azure => {
                prefix = address.prefix().to_string();
                let mut builder = MicrosoftAzureBuilder::from_env()
                    .with_container_name(address.bucket())
                    .with_retry(retry());
                for (key, value) in client_settings() {
                    builder = builder.with_config(AzureConfigKey::Client(key), value);
                }
                Arc::new(builder.build()?)
            }
            Scheme::File => {
                let folder = address.folder();
                std::fs::create_dir_all(&folder).map_err(|source| ConnectError::Folder {
                    path: folder.clone(),
                    source,
                })?;
                // writes go to a temporary file renamed into place, so readers never see half
                Arc::new(LocalFileSystem::new_with_prefix(&folder)?)
            }
        };
        Ok(Connection {
            runtime,
            store,
            layout: Layout { prefix },
            multipart: address.scheme != Scheme::Http,
        })
    }

    /// Runs `future` to completion on the remote's runtime, blocking this (non-async) thread.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Runs `future` in the background on the remote's runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(future)
    }
}
