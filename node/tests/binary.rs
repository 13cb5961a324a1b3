//! The real binary, as a user runs it: three `optimystic start` processes from the example config
//! files (with ports and directories overridden through the environment), `client write` through
//! one node, `client get` from another, `/metrics` and `/health` over HTTP, and SIGTERM stopping
//! each node with exit status 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_optimystic");
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

fn example_config(i: usize) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/cluster/node{i}.toml"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Started {
    child: Option<Child>,
    p2p_addr: String,
    metrics: String,
}

impl Drop for Started {
    /// A failing test must not leave nodes running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `optimystic start` and waits for its `listening` and `metrics` lines.
fn start_node(i: usize, data_dir: &Path, port: u16, metrics_port: u16, bootstrap: Option<u16>) -> Started {
    let mut command = Command::new(BIN);
    command
        .arg("start")
        .arg("--config")
        .arg(example_config(i))
        .env("OPTIMYSTIC_NODE__DATA_DIR", data_dir)
        .env("OPTIMYSTIC_NODE__LISTEN", format!("[\"/ip4/127.0.0.1/tcp/{port}\"]"))
        .env("OPTIMYSTIC_METRICS__LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(boot) = bootstrap {
        command.env("OPTIMYSTIC_NODE__BOOTSTRAP", format!("[\"/ip4/127.0.0.1/tcp/{boot}\"]"));
    }
    let mut child = command.spawn().expect("spawn optimystic start");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let (mut p2p_addr, mut metrics) = (None, None);
    while p2p_addr.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|e| panic!("node {i} did not report ready: {e}"));
        if let Some(addr) = line.strip_prefix("listening ") {
            assert!(addr.contains("/p2p/12D3KooW"), "listening line names the peer id: {line}");
            p2p_addr = Some(addr.to_owned());
        } else if let Some(url) = line.strip_prefix("metrics ") {
            metrics = Some(url.to_owned());
        }
    }
    Started { child: Some(child), p2p_addr: p2p_addr.unwrap(), metrics: metrics.unwrap() }
}

fn client(args: &[&str]) -> serde_json::Value {
    let output = Command::new(BIN).arg("client").args(args).output().expect("run optimystic client");
    assert!(
        output.status.success(),
        "client {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("client prints JSON")
}

/// A plain HTTP/1.1 GET; returns (status, body).
fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn sigterm_and_wait(mut child: Child) -> std::process::ExitStatus {
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("node stops within 30 s of SIGTERM").unwrap()
}

#[test]
fn three_processes_from_config_files_serve_writes_reads_metrics_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let bootstrap = (i > 0).then(|| ports[0]);
        nodes.push(start_node(i + 1, &dir.path().join(format!("node{}", i + 1)), ports[i], metrics_ports[i], bootstrap));
    }

    let block = r#"{"header":{"id":"greeting","type":"note","collectionId":"cli"},"text":"hello","tags":[]}"#;
    let written = client(&["--peer", &nodes[0].p2p_addr, "write", "--block", "greeting", "--insert", block]);
    assert_eq!(written["rev"], 1, "{written}");
    let updated = client(&["--peer", &nodes[0].p2p_addr, "write", "--block", "greeting", "--update", r#"[["tags",0,0,["cli"]]]"#]);
    assert_eq!(updated["rev"], 2, "{updated}");

    let read = client(&["--peer", &nodes[1].p2p_addr, "get", "greeting"]);
    assert_eq!(read["greeting"]["block"]["text"], "hello", "{read}");
    assert_eq!(read["greeting"]["block"]["tags"], serde_json::json!(["cli"]), "{read}");
    assert_eq!(read["greeting"]["state"]["latest"]["rev"], 2, "{read}");

    for node in &nodes {
        let (status, body) = http_get(&node.metrics.replace("/metrics", "/health"));
        assert_eq!(status, 200, "health: {body}");
        let (status, body) = http_get(&node.metrics);
        assert_eq!(status, 200);
        assert!(body.contains("optimystic_connected_peers"), "{body}");
        assert!(body.contains("optimystic_stored_blocks"), "{body}");
    }
    let (_, first) = http_get(&nodes[0].metrics);
    assert!(first.contains("optimystic_repo_operations_total{op=\"commit\",outcome=\"ok\"} 2"), "node 1 counted its commits: {first}");
    assert!(first.contains("optimystic_consensus_rounds_total{outcome=\"committed\"}"), "2PC outcomes: {first}");
    let (_, second) = http_get(&nodes[1].metrics);
    assert!(second.contains("optimystic_repo_operations_total{op=\"get\",outcome=\"ok\"} 1"), "node 2 counted its read: {second}");
    assert!(second.contains("optimystic_repo_operation_seconds_bucket"), "latency histogram: {second}");

    for mut node in nodes {
        let status = sigterm_and_wait(node.child.take().unwrap());
        assert_eq!(status.code(), Some(0), "SIGTERM stops a node with exit status 0");
    }
}

#[test]
fn verify_record_accepts_the_javascript_vector_and_refuses_a_tampered_copy() {
    let vector = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/vectors/cluster-record-example.json");
    let output = Command::new(BIN).arg("verify-record").arg(&vector).output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok zEmmGeb2ArEFBmKBtsjjsSoospF3vsvEGP94UUFaG8qnz");

    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&vector).unwrap()).unwrap();
    let promises = record["promises"].as_object_mut().unwrap();
    let first = promises.keys().next().unwrap().clone();
    let signature = promises[&first]["signature"].as_str().unwrap().to_owned();
    let flipped = if signature.starts_with('A') { format!("B{}", &signature[1..]) } else { format!("A{}", &signature[1..]) };
    promises[&first]["signature"] = serde_json::Value::String(flipped);
    let dir = tempfile::tempdir().unwrap();
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec(&record).unwrap()).unwrap();
    let output = Command::new(BIN).arg("verify-record").arg(&tampered).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("invalid zEmmGeb2ArEFBmKBtsjjsSoospF3vsvEGP94UUFaG8qnz: "), "{stdout}");
}

#[test]
fn plugins_lists_every_bundled_plugin() {
    let output = Command::new(BIN).arg("plugins").output().unwrap();
    assert!(output.status.success());
    let listed = String::from_utf8_lossy(&output.stdout);
    for line in [
        "storage memory",
        "storage file",
        "storage lmdb",
        "key-network kademlia",
        "key-network static",
        "consensus majority-2pc",
        "consensus solo",
    ] {
        assert!(listed.lines().any(|l| l == line), "missing {line:?} in:\n{listed}");
    }
}
