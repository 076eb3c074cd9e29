//! Where a remote cache lives: its URL read into the kind of store, the bucket (base URL, folder)
//! and the prefix of nnflow's objects inside it, and the URL as it may be shown. A URL may carry
//! credentials (`https://user:token@host/cache`, `?sig=...`): they go to the store's client and
//! nowhere else. [`Address::shown`] leaves them out, and [`Address::redact`] takes them out of any
//! text (an error of the store's client, say) before it is printed or written.

use std::path::PathBuf;

use url::Url;

/// The kinds of store a remote cache can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`, `https://`: plain GET/PUT/HEAD (Bazel's HTTP cache protocol; nginx's WebDAV
    /// module, for instance).
    Http,
    /// `s3://bucket/prefix`
    S3,
    /// `gs://bucket/prefix`
    Gcs,
    /// `az://container/prefix`
    Azure,
    /// `file:///absolute/folder`
    File,
}

const EXPECTED: &str = "http(s)://HOST/PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, \
                        az://CONTAINER/PREFIX or file:///ABSOLUTE/FOLDER";

/// Secrets shorter than this are left in texts: replacing every `ab` would garble the message,
/// and a URL's user information as a whole is always taken out.
const SHORTEST_SECRET: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    // The text itself is not shown: it may hold credentials that cannot be told apart.
    #[error("the remote cache is not a URL ({problem}); expected {}", EXPECTED)]
    NotAUrl { problem: String },
    #[error(
        "remote cache `{shown}`: unsupported scheme `{scheme}://`; expected {}",
        EXPECTED
    )]
    Scheme { shown: String, scheme: String },
    #[error("remote cache `{shown}`: {problem}")]
    Invalid { shown: String, problem: String },
}

/// A remote cache's URL, read.
#[derive(Clone, Debug)]
pub struct Address {
    pub scheme: Scheme,
    url: Url,
    shown: String,
    /// The URL's user information as written (`user:password`), taken out of texts whole.
    userinfo: Option<String>,
    /// User name, password, query and its values, as written and decoded.
    secrets: Vec<String>,
}

impl Address {
    pub fn parse(text: &str) -> Result<Address, AddressError> {
        let url = Url::parse(text.trim()).map_err(|e| AddressError::NotAUrl {
            problem: e.to_string(),
        })?;
        let shown = shown(&url);
        let scheme = match url.scheme() {
            "http" | "https" => Scheme::Http,
            "s3" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" => Scheme::Azure,
            "file" => Scheme::File,
            other => {
                return Err(AddressError::Scheme {
                    shown,
                    scheme: other.to_string(),
                })
            }
        };
        let invalid = |problem: &str| AddressError::Invalid {
            shown: shown.clone(),
            problem: problem.to_string(),
        };
        let host = url.host_str().unwrap_or_default();
        match scheme {
            Scheme::File if !(host.is_empty() || host == "localhost") || url.to_file_path().is_err() => {
                return Err(invalid(
                    "a file:// remote names an absolute folder: file:///path/to/folder",
                ))
            }
            Scheme::S3 | Scheme::Gcs | Scheme::Azure if host.is_empty() => {
                return Err(invalid("names no bucket or container"))
            }
            Scheme::Http if host.is_empty() => return Err(invalid("names no host")),
            _ => {}
        }
        let userinfo = match (url.username(), url.password()) {
            ("", None) => None,
            (user, None) => Some(user.to_string()),
            (user, Some(password)) => Some(format!("{user}:{password}")),
        };
        Ok(Address {
            scheme,
            secrets: secrets(&url),
            userinfo,
            shown,
            url,
        })
    }

    /// The URL without user name, password, query or fragment: what messages and reports show.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether the URL carries credentials (user information or a query), which a pipeline file
    /// must not: it is committed, and its text is shown in error messages.
    pub fn has_credentials(&self) -> bool {
        self.userinfo.is_some() || self.url.query().is_some()
    }

    /// `text` with every credential of the URL taken out.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        if let Some(userinfo) = &self.userinfo {
            text = text.replace(&format!("{userinfo}@"), "");
        }
        for secret in &self.secrets {
            if secret.len() >= SHORTEST_SECRET {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }

    /// For HTTP: the base URL, credentials included (the client sends them), without a trailing
    /// `/` so that object paths join it with one.
    pub(super) fn http_base(&self) -> String {
        let mut base = self.url.clone();
        let path = base.path().trim_end_matches('/').to_string();
        base.set_path(&path);
        base.set_fragment(None);
        base.to_string()
    }

    /// For S3, GCS and Azure: the bucket (container).
    pub(super) fn bucket(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }

    /// For S3, GCS and Azure: the path inside the bucket under which nnflow's objects lie.
    pub(super) fn prefix(&self) -> &str {
        self.url.path().trim_matches('/')
    }

    /// For `file://`: the folder.
    pub(super) fn folder(&self) -> PathBuf {
        self.url.to_file_path().unwrap_or_default()
    }
}

fn shown(url: &Url) -> String {
    let mut plain = url.clone();
    // a URL that cannot have user information has none to remove
    let _ = plain.set_username("");
    let _ = plain.set_password(None);
    plain.set_query(None);
    plain.set_fragment(None);
    plain.to_string()
}

/// The URL's credentials, each as written and percent-decoded.
fn secrets(url: &Url) -> Vec<String> {
    let mut raw: Vec<String> = Vec::new();
    raw.push(url.username().to_string());
    raw.extend(url.password().map(str::to_string));
    if let Some(query) = url.query() {
        raw.push(query.to_string());
        raw.extend(
            query
                .split('&')
                .filter_map(|pair| Some(pair.split_once('=')?.1.to_string())),
        );
    }
    let mut secrets = Vec::new();
    for secret in raw.into_iter().filter(|s| !s.is_empty()) {
        let decoded = url::form_urlencoded::parse(format!("x={secret}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned());
        secrets.extend(decoded.filter(|d| *d != secret));
        secrets.push(secret);
    }
    // longest first, so a secret that contains another is taken out whole
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_their_parts() {
        let s3 = Address::parse("s3://bucket/nnflow/ci").unwrap();
        assert_eq!(
            (s3.scheme, s3.bucket(), s3.prefix()),
            (Scheme::S3, "bucket", "nnflow/ci")
        );
        let gs = Address::parse("gs://b").unwrap();
        assert_eq!((gs.scheme, gs.prefix()), (Scheme::Gcs, ""));
        assert_eq!(Address::parse("az://c/p").unwrap().scheme, Scheme::Azure);
        let http = Address::parse("http://127.0.0.1:8080/cache/").unwrap();
        assert_eq!(http.http_base(), "http://127.0.0.1:8080/cache");
        assert_eq!(Address::parse("https://h/").unwrap().http_base(), "https://h/");
        let file = Address::parse("file:///tmp/remote").unwrap();
        assert_eq!(file.folder(), PathBuf::from("/tmp/remote"));
    }

    #[test]
    fn bad_urls_are_refused_without_showing_them() {
        for bad in ["ftp://h/x", "file://relative/x", "s3:///x", "no url at all"] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
        let error = Address::parse("ftp://user:hunter2@h/x").unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let error = Address::parse("not a url hunter2").unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn credentials_are_never_shown() {
        let address =
            Address::parse("https://ci-bot:s%40cret42@cache.example/nnflow?token=abc123&x=1").unwrap();
        assert!(address.has_credentials());
        assert_eq!(address.shown(), "https://cache.example/nnflow");
        let message = "error sending request for url (https://ci-bot:s%40cret42@cache.example/nnflow/ac/k?token=abc123&x=1): \
                       auth s@cret42 failed";
        let redacted = address.redact(message);
        for secret in ["ci-bot", "s%40cret42", "s@cret42", "abc123"] {
            assert!(!redacted.contains(secret), "{secret} in {redacted}");
        }
        assert!(
            redacted.contains("https://cache.example/nnflow/ac/k?***"),
            "{redacted}"
        );
        assert!(!Address::parse("s3://bucket/p").unwrap().has_credentials());
    }
}
