//! A real HTTP remote cache for the tests: Debian's nginx with its WebDAV module
//! (`dav_methods PUT DELETE MKCOL; create_full_put_path on;`, as a user would set it up), started
//! unprivileged-style in a temporary folder on 127.0.0.1 at a free port, and stopped when dropped.
//! `scripts/test` installs nginx (as root, `scripts/install-nginx.sh`). Without nginx the tests that
//! need it say so and pass, unless `NNFLOW_REQUIRE_NGINX=1` (as `.ci/run` sets it): then they fail.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

/// The nginx binary: on PATH, or where Debian puts it (`/usr/sbin`, off a normal user's PATH).
fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|candidate| candidate.is_file())
}

impl Nginx {
    /// A running server with an empty cache folder; `None` (after saying so) where nginx is
    /// missing and not required.
    pub fn start() -> Option<Nginx> {
        let Some(nginx) = binary() else {
            assert!(
                std::env::var("NNFLOW_REQUIRE_NGINX").as_deref() != Ok("1"),
                "NNFLOW_REQUIRE_NGINX=1 but nginx is not installed (scripts/install-nginx.sh, as root)"
            );
            eprintln!("skipped: nginx is not installed (scripts/install-nginx.sh installs it, as root)");
            return None;
        };
        let mut dir = tempfile::tempdir().expect("temporary folder");
        // a port taken between choosing and binding makes nginx exit: choose again
        for _ in 0..5 {
            std::fs::create_dir_all(dir.path().join("www/cache")).unwrap();
            let port = free_port();
            let config = dir.path().join("nginx.conf");
            std::fs::write(&config, config_text(dir.path(), port)).unwrap();
            let child = Command::new(&nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&config)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx starts");
            let mut server = Nginx {
                dir,
                port,
                child: Some(child),
            };
            if server.wait_until_listening() {
                return Some(server);
            }
            server.stop();
            dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
        }
        panic!("nginx did not start; see its error.log");
    }

    /// `http://127.0.0.1:PORT/cache`: the remote cache's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cache", self.port)
    }

    /// The same URL with a user and password (which the server ignores).
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}/cache", self.port)
    }

    /// The folder the server keeps the cache's objects in (`ac/<key>`, `cas/<digest>`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("www/cache")
    }

    /// Every object the server holds, as paths relative to [`Nginx::root`], sorted.
    pub fn objects(&self) -> Vec<String> {
        let mut found = Vec::new();
        collect_files(&self.root(), &self.root(), &mut found);
        found.sort();
        found
    }

    /// The server's access log (method, path, status per request).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Stops the server (a fast shutdown of the master and its workers) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM, not SIGKILL: a killed master leaves its workers serving
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    fn wait_until_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child {
                if child.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return false;
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("a free port");
    listener.local_addr().unwrap().port()
}

/// The server's configuration: everything inside `dir`, nothing of the system's nginx set-up.
fn config_text(dir: &Path, port: u16) -> String {
    let d = dir.display();
    // as root, the workers must stay root to write into the (0700) temporary folder
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    format!(
        "{user}
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    location /cache/ {{
      dav_methods PUT DELETE MKCOL;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
  }}
}}
"
    )
}

fn collect_files(root: &Path, dir: &Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, found);
        } else {
            found.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}
