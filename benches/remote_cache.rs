//! Restoring a large result from the remote cache against restoring it from the local cache: one
//! stage writes a 2 GB file (`NNFLOW_BENCH_REMOTE_BYTES` changes the size); a first checkout
//! computes and uploads it, then restores it from its local cache (its outputs removed), then a
//! second checkout with an empty local cache restores it from the remote. Remotes: nginx with
//! WebDAV on 127.0.0.1 when nginx is installed (`scripts/install-nginx.sh`), and a `file://`
//! folder. Prints MB/s (of the result's bytes, over the whole `nnflow run`); asserts nothing about
//! timing. Needs about three times the size in free disk space per remote. Run with
//! `cargo bench --bench remote_cache`.

#[allow(dead_code)]
#[path = "../tests/common/nginx.rs"]
mod nginx;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const DEFAULT_BYTES: u64 = 2_000_000_000;

/// `nnflow run --json p.toml` in `dir` with its own local cache and `remote`; the run's JSON and
/// its wall seconds.
fn run(dir: &Path, remote: &str) -> (serde_json::Value, f64) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_nnflow"))
        .current_dir(dir)
        .args(["run", "--json", "p.toml", "--remote-cache", remote])
        .env("NNFLOW_CACHE_DIR", dir.join("cache"))
        .env_remove("NNFLOW_REMOTE_CACHE")
        .env_remove("NNFLOW_REMOTE_CACHE_MODE")
        .output()
        .expect("nnflow runs");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "nnflow run failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = serde_json::from_slice(&output.stdout).expect("run --json");
    (json, seconds)
}

fn checkout(bytes: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::write(
        dir.path().join("p.toml"),
        format!(
            "[pipeline]\nname = \"b\"\n[stages.big]\nkind = \"command\"\n\
             cmd = \"head -c {bytes} /dev/urandom > $NNFLOW_OUT/result.bin\"\n"
        ),
    )
    .expect("pipeline writes");
    dir
}

fn outcome(json: &serde_json::Value) -> String {
    let stage = &json["stages"][0];
    format!("{} {}", stage["outcome"], stage["restored_from"])
}

fn measure(name: &str, remote: &str, bytes: u64) {
    let mb = bytes as f64 / 1e6;
    let first = checkout(bytes);
    let (json, computed) = run(first.path(), remote);
    assert_eq!(json["stages"][0]["outcome"], "ran");
    println!("{name}: computed and uploaded {mb:.0} MB in {computed:.1} s");

    // local hit: the outputs are gone, the local cache has them
    std::fs::remove_dir_all(first.path().join(".nnflow/b/out/big")).expect("outputs removed");
    let (json, local) = run(first.path(), remote);
    assert_eq!(outcome(&json), "\"cached\" \"local\"", "{json}");
    drop(first);

    let second = checkout(bytes);
    let (json, from_remote) = run(second.path(), remote);
    assert_eq!(outcome(&json), "\"cached\" \"remote\"", "{json}");
    let restored = std::fs::metadata(second.path().join(".nnflow/b/out/big/result.bin"))
        .expect("restored")
        .len();
    assert_eq!(restored, bytes);
    println!(
        "{name}: restore {mb:.0} MB from the local cache {local:.2} s ({:.0} MB/s), \
         from the remote {from_remote:.2} s ({:.0} MB/s)",
        mb / local,
        mb / from_remote
    );
}

fn main() {
    let bytes = std::env::var("NNFLOW_BENCH_REMOTE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_BYTES);
    println!(
        "restore of a {:.0} MB result (NNFLOW_BENCH_REMOTE_BYTES), whole `nnflow run`, on {} CPU cores",
        bytes as f64 / 1e6,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    match nginx::Nginx::start() {
        Some(server) => {
            measure("nginx WebDAV (http://127.0.0.1)", &server.url(), bytes);
            drop(server);
        }
        None => println!("nginx is not installed (scripts/install-nginx.sh): HTTP not measured"),
    }
    let folder = tempfile::tempdir().expect("temporary folder");
    let url = format!("file://{}", folder.path().display());
    measure("file:// folder", &url, bytes);
}
