//! The remote cache (issue 20) against a real server: nginx with WebDAV on 127.0.0.1
//! (`common::nginx`; skipped with a message where nginx is missing, unless `NNFLOW_REQUIRE_NGINX=1`,
//! as `.ci/run` sets it), and a `file://` folder. Two checkouts with separate local caches share
//! results only through the remote; a remote that stops, serves damaged bytes or is written by two
//! runs at once never fails a run; credentials never reach what nnflow writes or prints; `status`
//! says where each result is, and the JSON that CI reads keeps its fields.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::{stderr, stdout, Project, RunResult};

const ALL: [&str; 4] = ["fit[fold=0]", "fit[fold=1]", "prep", "report"];

/// prep (a small and a 10 MB output: the large one is uploaded in parts or streamed) ->
/// fit[fold=0|1] -> report (a declared project output). `remote` is the `[pipeline] remote_cache`
/// line, if any.
fn pipeline(remote: Option<&str>) -> String {
    let remote = remote
        .map(|url| format!("remote_cache = \"{url}\""))
        .unwrap_or_default();
    format!(
        r#"
[pipeline]
name = "r"
{remote}
[stages.prep]
kind = "command"
cmd = "tr a-z A-Z < data/in.txt > $NNFLOW_OUT/prep.txt && seq 1 1500000 > $NNFLOW_OUT/large.txt"
inputs = ["data/in.txt"]
[stages.fit]
kind = "command"
matrix = {{ fold = [0, 1] }}
cmd = "cat ${{prep.outputs}}/prep.txt > $NNFLOW_OUT/model.txt && echo fold ${{fold}} >> $NNFLOW_OUT/model.txt"
[stages.report]
kind = "command"
cmd = "mkdir -p out && cat ${{fit[*].outputs}}/model.txt > out/report.txt"
outputs = ["out/report.txt"]
"#
    )
}

/// A fresh checkout of the pipeline: its own folder and its own local cache.
fn checkout(remote: Option<&str>) -> Project {
    let project = Project::with_pipeline(&pipeline(remote));
    project.write("data/in.txt", "hello remote\n");
    project
}

/// `nnflow ARGS` in the project, with no remote from this process's environment.
fn nnflow(project: &Project, args: &[&str]) -> Command {
    let mut command = project.command(args);
    command
        .env_remove("NNFLOW_REMOTE_CACHE")
        .env_remove("NNFLOW_REMOTE_CACHE_MODE");
    command
}

/// `nnflow run --json p.toml ARGS`.
fn run(project: &Project, args: &[&str]) -> RunResult {
    let mut full = vec!["run", "--json", "p.toml"];
    full.extend_from_slice(args);
    parse(nnflow(project, &full).output().expect("nnflow runs"))
}

fn parse(output: Output) -> RunResult {
    RunResult {
        code: output.status.code().unwrap_or(-1),
        json: serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null),
        stderr: stderr(&output),
    }
}

fn status_json(project: &Project, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["status", "--json", "p.toml"];
    full.extend_from_slice(args);
    let output = nnflow(project, &full).output().unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}", stderr(&output)))
}

/// Stage id -> a field of its entry in a run's or status's JSON.
fn field_by_stage(json: &serde_json::Value, field: &str) -> Vec<(String, serde_json::Value)> {
    let mut rows: Vec<(String, serde_json::Value)> = json["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no stages in {json}"))
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s[field].clone()))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn all_equal(json: &serde_json::Value, field: &str, value: &str) -> bool {
    field_by_stage(json, field).iter().all(|(_, v)| v == value)
}

/// Every output of a checkout, relative path -> contents.
fn outputs(project: &Project) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for folder in [".nnflow/r/out", "out"] {
        collect(&project.path().join(folder), project.path(), &mut files);
    }
    files.sort();
    files
}

fn collect(dir: &Path, root: &Path, files: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, root, files);
        } else {
            let relative = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            files.push((relative, std::fs::read(&path).unwrap()));
        }
    }
}

/// Every object under a remote's folder is what its name says: a blob's contents have its
/// digest, a manifest records its key. Returns (manifests, blobs).
fn assert_objects_valid(root: &Path) -> (usize, usize) {
    let (mut manifests, mut blobs) = (0, 0);
    for (name, bytes) in files_under(root) {
        if let Some(digest) = name.strip_prefix("cas/") {
            assert_eq!(blake3::hash(&bytes).to_hex().as_str(), digest, "blob {name}");
            blobs += 1;
        } else if let Some(key) = name.strip_prefix("ac/") {
            let manifest: serde_json::Value = serde_json::from_slice(&bytes).expect("a manifest");
            assert_eq!(manifest["key"], key, "manifest {name}");
            manifests += 1;
        } else {
            panic!("unexpected object {name}");
        }
    }
    (manifests, blobs)
}

fn files_under(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    collect(root, root, &mut files);
    files
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| line.starts_with("warning:"))
        .collect()
}

#[test]
fn two_checkouts_share_results_only_through_the_remote() {
    let Some(server) = Nginx::start() else { return };
    let first = checkout(Some(&server.url()));
    let computed = run(&first, &[]);
    assert_eq!(computed.code, 0, "{}", computed.stderr);
    assert_eq!(computed.with_outcome("ran"), ALL);
    assert_eq!(
        computed.json["remote"]["uploaded"]["entries"], 4,
        "{}",
        computed.json
    );
    assert_eq!(assert_objects_valid(&server.root()).0, 4);

    // another checkout, another local cache: everything comes from the remote, nothing runs
    let second = checkout(Some(&server.url()));
    let restored = run(&second, &[]);
    assert_eq!(restored.code, 0, "{}", restored.stderr);
    assert_eq!(restored.with_outcome("cached"), ALL, "{}", restored.json);
    assert!(
        all_equal(&restored.json, "restored_from", "remote"),
        "{}",
        restored.json
    );
    assert_eq!(restored.json["remote"]["downloaded"]["entries"], 4);
    assert_eq!(restored.json["remote"]["uploaded"]["entries"], 0);
    assert!(warnings(&restored.stderr).is_empty(), "{}", restored.stderr);
    assert!(!second.path().join(".nnflow/r/logs").exists(), "a stage ran");
    assert_eq!(outputs(&second), outputs(&first));
    assert!(outputs(&first).len() >= 5);
    assert!(second.path().join(".nnflow/r/nnflow.lock").is_file());

    // the results are now in the second checkout's local cache and in place
    let again = run(&second, &[]);
    assert_eq!(again.with_outcome("cached"), ALL);
    let restored_from = field_by_stage(&again.json, "restored_from");
    assert!(restored_from.iter().all(|(_, v)| v.is_null()), "{}", again.json);
    let json = status_json(&second, &[]);
    assert!(all_equal(&json, "cache", "local"), "{json}");
}

#[test]
fn a_server_stopped_mid_run_leaves_a_local_run_and_one_warning() {
    let Some(mut server) = Nginx::start() else { return };
    let project = Project::with_pipeline(&format!(
        r#"
[pipeline]
name = "r"
remote_cache = "{}"
[stages.a]
kind = "command"
cmd = "echo a > $NNFLOW_OUT/a.txt"
[stages.b]
kind = "command"
cmd = "touch b-started; i=0; while [ ! -f go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; cat ${{a.outputs}}/a.txt > $NNFLOW_OUT/b.txt"
[stages.c]
kind = "command"
cmd = "cat ${{b.outputs}}/b.txt > $NNFLOW_OUT/c.txt"
[stages.d]
kind = "command"
cmd = "cat ${{c.outputs}}/c.txt > $NNFLOW_OUT/d.txt"
"#,
        server.url()
    ));
    let child = nnflow(&project, &["run", "--json", "p.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(|| project.path().join("b-started").exists(), "stage b to start");
    wait_for(
        || server.objects().iter().any(|o| o.starts_with("ac/")),
        "stage a's result on the server",
    );
    server.stop();
    project.write("go", "");
    let result = parse(child.wait_with_output().unwrap());
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.with_outcome("ran"), ["a", "b", "c", "d"]);
    assert_eq!(project.read(".nnflow/r/out/d/d.txt"), "a\n");
    let warned = warnings(&result.stderr);
    assert_eq!(warned.len(), 1, "{}", result.stderr);
    assert!(
        warned[0].contains("remote cache") && warned[0].contains("continuing with the local cache only"),
        "{}",
        warned[0]
    );
    assert!(result.json["remote"]["error"].is_string(), "{}", result.json);
    assert_eq!(result.json["ok"], true);
}

#[test]
fn an_unreachable_remote_fails_no_run_and_warns_once() {
    // port 1 on the loopback: connection refused, no server needed
    let project = checkout(None);
    let result = run(&project, &["--remote-cache", "http://127.0.0.1:1/cache"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.with_outcome("ran"), ALL);
    assert_eq!(warnings(&result.stderr).len(), 1, "{}", result.stderr);
    let status = nnflow(
        &project,
        &["status", "p.toml", "--remote-cache", "http://127.0.0.1:1/c"],
    )
    .output()
    .unwrap();
    assert_eq!(status.status.code(), Some(0));
}

#[test]
fn a_blob_damaged_on_the_server_is_ignored_recomputed_and_replaced() {
    let Some(server) = Nginx::start() else { return };
    let first = checkout(Some(&server.url()));
    assert_eq!(run(&first, &[]).code, 0);
    let model = std::fs::read(first.path().join(".nnflow/r/out/fit/fold=0/model.txt")).unwrap();
    let digest = blake3::hash(&model).to_hex().to_string();
    let blob = server.root().join("cas").join(&digest);
    let mut damaged = std::fs::read(&blob).unwrap();
    damaged[0] ^= 0x20; // same size, other contents
    std::fs::write(&blob, &damaged).unwrap();

    let second = checkout(Some(&server.url()));
    let result = run(&second, &[]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.with_outcome("ran"), ["fit[fold=0]"], "{}", result.json);
    assert_eq!(result.with_outcome("cached"), ["fit[fold=1]", "prep", "report"]);
    assert!(result.stderr.contains("damaged"), "{}", result.stderr);
    assert_eq!(result.json["remote"]["damaged"], 1);
    assert_eq!(outputs(&second), outputs(&first));
    // the server's copy was replaced by the recomputed one
    assert_eq!(
        blake3::hash(&std::fs::read(&blob).unwrap()).to_hex().as_str(),
        digest
    );
    assert_objects_valid(&server.root());

    // a third checkout restores everything
    let third = checkout(Some(&server.url()));
    assert_eq!(run(&third, &[]).with_outcome("cached"), ALL);
}

#[test]
fn concurrent_uploads_of_the_same_results_all_succeed() {
    let Some(server) = Nginx::start() else { return };
    let checkouts: Vec<Project> = (0..3).map(|_| checkout(Some(&server.url()))).collect();
    let children: Vec<_> = checkouts
        .iter()
        .map(|project| {
            nnflow(project, &["run", "--json", "p.toml"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let result = parse(child.wait_with_output().unwrap());
        assert_eq!(result.code, 0, "{}", result.stderr);
        assert!(warnings(&result.stderr).is_empty(), "{}", result.stderr);
    }
    let (manifests, blobs) = assert_objects_valid(&server.root());
    assert_eq!(manifests, 4);
    assert!(blobs >= 5, "{:?}", server.objects());
    let late = checkout(Some(&server.url()));
    let restored = run(&late, &[]);
    assert_eq!(restored.with_outcome("cached"), ALL);
    assert_eq!(outputs(&late), outputs(&checkouts[0]));
}

#[test]
fn a_file_remote_shares_results_like_a_server() {
    let remote = tempfile::tempdir().unwrap();
    let url = format!("file://{}/nnflow", remote.path().display());
    let first = checkout(None);
    let computed = run(&first, &["--remote-cache", &url]);
    assert_eq!(computed.code, 0, "{}", computed.stderr);
    let (manifests, _) = assert_objects_valid(&remote.path().join("nnflow"));
    assert_eq!(manifests, 4);
    let second = checkout(None);
    let restored = run(&second, &["--remote-cache", &url]);
    assert_eq!(restored.with_outcome("cached"), ALL, "{}", restored.stderr);
    assert!(all_equal(&restored.json, "restored_from", "remote"));
    assert_eq!(outputs(&second), outputs(&first));
    // the environment variable names the remote as well; --no-remote-cache turns it off
    let third = checkout(None);
    let off = parse(
        nnflow(&third, &["run", "--json", "p.toml", "--no-remote-cache"])
            .env("NNFLOW_REMOTE_CACHE", &url)
            .output()
            .unwrap(),
    );
    assert_eq!(off.with_outcome("ran"), ALL);
    assert!(off.json["remote"].is_null());
    let fourth = checkout(None);
    let from_env = parse(
        nnflow(&fourth, &["run", "--json", "p.toml"])
            .env("NNFLOW_REMOTE_CACHE", &url)
            .output()
            .unwrap(),
    );
    assert_eq!(from_env.with_outcome("cached"), ALL);
}

#[test]
fn read_mode_restores_but_uploads_nothing() {
    let Some(server) = Nginx::start() else { return };
    let reader = checkout(None);
    let url = server.url();
    let result = run(&reader, &["--remote-cache", &url, "--remote-cache-mode", "read"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(result.with_outcome("ran"), ALL);
    assert!(server.objects().is_empty(), "{:?}", server.objects());
    assert!(!server.access_log().contains("\"PUT "), "{}", server.access_log());

    let writer = checkout(None);
    assert_eq!(run(&writer, &["--remote-cache", &url]).code, 0);
    assert_eq!(assert_objects_valid(&server.root()).0, 4);
    let second_reader = checkout(None);
    let restored = parse(
        nnflow(
            &second_reader,
            &["run", "--json", "p.toml", "--remote-cache", &url],
        )
        .env("NNFLOW_REMOTE_CACHE_MODE", "read")
        .output()
        .unwrap(),
    );
    assert_eq!(restored.with_outcome("cached"), ALL, "{}", restored.stderr);
    assert_eq!(restored.json["remote"]["mode"], "read");
}

#[test]
fn credentials_in_the_url_are_never_written_or_printed() {
    let Some(mut server) = Nginx::start() else { return };
    let (password, token) = ("hunter2-s3cret", "t0ps3cret-token");
    let url = format!(
        "{}?token={token}",
        server.url_with_credentials("ci-bot", password)
    );
    let project = checkout(None);
    let mut printed = String::new();
    let mut nnflow_with_url = |args: &[&str]| {
        let output = nnflow(&project, args)
            .env("NNFLOW_REMOTE_CACHE", &url)
            .output()
            .unwrap();
        printed.push_str(&stdout(&output));
        printed.push_str(&stderr(&output));
        output
    };
    let first = nnflow_with_url(&["run", "--json", "p.toml"]);
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(assert_objects_valid(&server.root()).0, 4, "the URL works");
    nnflow_with_url(&["status", "--json", "p.toml"]);
    nnflow_with_url(&["status", "p.toml"]);
    server.stop();
    // the server is gone: the warning names the remote, without its credentials
    let failed = nnflow_with_url(&["run", "--json", "p.toml", "--force", "prep"]);
    assert_eq!(failed.status.code(), Some(0));
    assert!(
        stderr(&failed).contains("http://127.0.0.1:"),
        "{}",
        stderr(&failed)
    );
    nnflow_with_url(&["status", "p.toml"]);
    for secret in [password, token, "ci-bot"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        for (file, bytes) in files_under(project.path()) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(secret), "{secret} written to {file}");
        }
    }

    // a pipeline file may not hold credentials at all, and saying so does not repeat them
    let committed = Project::with_pipeline(&pipeline(Some(&url)));
    let output = nnflow(&committed, &["validate", "p.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("credentials"), "{message}");
    assert!(
        !message.contains(password) && !message.contains(token),
        "{message}"
    );
}

#[test]
fn status_says_which_cache_holds_each_result() {
    let Some(server) = Nginx::start() else { return };
    let url = server.url();
    let first = checkout(Some(&url));
    let nowhere = status_json(&first, &[]);
    assert_eq!(
        field_by_stage(&nowhere, "cache")
            .into_iter()
            .map(|(_, v)| v.as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        // fit and report wait for prep, whose outputs no cache holds yet
        ["unknown", "unknown", "none", "unknown"]
    );
    assert_eq!(run(&first, &[]).code, 0);

    let second = checkout(Some(&url));
    let remote = status_json(&second, &[]);
    assert!(all_equal(&remote, "cache", "remote"), "{remote}");
    assert!(all_equal(&remote, "state", "new"), "{remote}");
    let in_cache = field_by_stage(&remote, "in_cache");
    assert!(in_cache.iter().all(|(_, v)| v == true), "{remote}");
    let text = stdout(&nnflow(&second, &["status", "p.toml"]).output().unwrap());
    assert!(text.contains("new  prep  (in the remote cache)"), "{text}");
    let dry = stdout(&nnflow(&second, &["run", "--dry-run", "p.toml"]).output().unwrap());
    assert!(dry.contains("restore  report"), "{dry}");
    let without = status_json(&second, &["--no-remote-cache"]);
    assert_eq!(field_by_stage(&without, "cache")[2].1, "none", "{without}");

    assert_eq!(run(&second, &[]).code, 0);
    let local = status_json(&second, &[]);
    assert!(all_equal(&local, "cache", "local"), "{local}");
    assert!(all_equal(&local, "state", "fresh"), "{local}");
}

#[test]
fn status_exit_code_fails_on_anything_stale() {
    let project = checkout(None);
    let status = |args: &[&str]| {
        let mut full = vec!["status", "p.toml", "--exit-code"];
        full.extend_from_slice(args);
        nnflow(&project, &full).output().unwrap()
    };
    assert_eq!(status(&[]).status.code(), Some(1), "never run: new");
    assert_eq!(run(&project, &[]).code, 0);
    assert_eq!(status(&[]).status.code(), Some(0), "{}", stdout(&status(&[])));
    assert_eq!(status(&["--json"]).status.code(), Some(0));
    project.write("data/in.txt", "changed\n");
    let stale = status(&["--json"]);
    assert_eq!(stale.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&stale.stdout).unwrap();
    assert_eq!(json["stale"], 4, "{json}");
    // without --exit-code, status reports and succeeds
    let plain = nnflow(&project, &["status", "p.toml"]).output().unwrap();
    assert_eq!(plain.status.code(), Some(0));
}

fn keys(value: &serde_json::Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// The JSON CI reads (README "`--json`"): these names are the contract; adding a field is fine,
/// renaming or removing one must raise `schema_version`.
#[test]
fn run_and_status_json_fields_are_stable() {
    let remote = tempfile::tempdir().unwrap();
    let url = format!("file://{}", remote.path().display());
    let project = checkout(None);
    let result = run(&project, &["--remote-cache", &url]);
    let json = &result.json;
    assert_eq!(json["schema_version"], 1);
    assert_eq!(
        keys(json),
        set(&[
            "schema_version",
            "pipeline",
            "ok",
            "interrupted",
            "counts",
            "remote",
            "stages"
        ])
    );
    assert_eq!(
        keys(&json["counts"]),
        set(&["ran", "cached", "failed", "skipped"])
    );
    assert_eq!(json["counts"]["ran"], 4);
    assert_eq!(
        keys(&json["remote"]),
        set(&["url", "mode", "downloaded", "uploaded", "damaged", "error"])
    );
    assert_eq!(json["remote"]["mode"], "read-write");
    for transfers in ["downloaded", "uploaded"] {
        assert_eq!(
            keys(&json["remote"][transfers]),
            set(&["entries", "blobs", "bytes"])
        );
    }
    for stage in json["stages"].as_array().unwrap() {
        assert_eq!(
            keys(stage),
            set(&["id", "kind", "outcome", "seconds", "outputs", "restored_from"])
        );
    }

    // a failed stage adds `error`, and the run fails
    project.write(
        "p.toml",
        &(pipeline(None) + "[stages.broken]\nkind = \"command\"\ncmd = \"exit 3\"\n"),
    );
    let failed = run(&project, &[]);
    assert_eq!(failed.code, 1);
    assert_eq!(failed.json["ok"], false);
    assert_eq!(failed.json["counts"]["failed"], 1);
    let broken = failed.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "broken")
        .unwrap();
    assert!(keys(broken).contains("error"));
    assert!(failed.json["remote"].is_null());

    let status = status_json(&project, &["--remote-cache", &url]);
    assert_eq!(status["schema_version"], 1);
    assert_eq!(
        keys(&status),
        set(&[
            "schema_version",
            "pipeline",
            "dry_run",
            "stale",
            "remote",
            "stages"
        ])
    );
    assert_eq!(keys(&status["remote"]), set(&["url", "mode"]));
    for stage in status["stages"].as_array().unwrap() {
        assert_eq!(
            keys(stage),
            set(&["id", "kind", "state", "reasons", "in_cache", "cache", "seconds", "outputs"])
        );
    }
}

fn wait_for(done: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
