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

/// Ports handed to test nodes come from below Linux's ephemeral range (32768-60999): a port the
/// kernel picks for a port-0 bind anywhere on the machine (another test's node, a client socket)
/// can never be one of them between the probe here and the node's own bind. Each call probes
/// candidates spread by a per-process counter until one binds.
const PORT_RANGE: std::ops::Range<u32> = 20_000..32_000;

/// A probe listener on a free port of [`PORT_RANGE`]; the port stays taken while it is held.
fn probe_port() -> std::net::TcpListener {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    // Different processes (test binaries run one after another, or a loop of them) start at
    // different places.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(97);
        let port = PORT_RANGE.start + (offset + n) % span;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", u16::try_from(port).unwrap())) {
            return listener;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
}

fn free_port() -> u16 {
    probe_port().local_addr().unwrap().port()
}

/// Three nodes started one by one in `dir/node1..3`, nodes 2 and 3 bootstrapping from node 1.
fn start_three_nodes(dir: &Path) -> Vec<Started> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    (0..3)
        .map(|i| {
            let bootstrap = (i > 0).then(|| ports[0]);
            start_node(i + 1, &dir.join(format!("node{}", i + 1)), ports[i], metrics_ports[i], bootstrap)
        })
        .collect()
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
    let nodes = start_three_nodes(dir.path());

    let block = r#"{"header":{"id":"greeting","type":"note","collectionId":"cli"},"text":"hello","tags":[]}"#;
    let written = client(&["--peer", &nodes[0].p2p_addr, "write", "--block", "greeting", "--insert", block]);
    assert_eq!(written["rev"], 1, "{written}");
    let updated = client(&[
        "--peer",
        &nodes[0].p2p_addr,
        "write",
        "--block",
        "greeting",
        "--update",
        r#"[["tags",0,0,["cli"]]]"#,
    ]);
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
    assert!(
        first.contains("optimystic_repo_operations_total{op=\"commit\",outcome=\"ok\"} 2"),
        "node 1 counted its commits: {first}"
    );
    assert!(first.contains("optimystic_consensus_rounds_total{outcome=\"committed\"}"), "2PC outcomes: {first}");
    let (_, second) = http_get(&nodes[1].metrics);
    assert!(
        second.contains("optimystic_repo_operations_total{op=\"get\",outcome=\"ok\"} 1"),
        "node 2 counted its read: {second}"
    );
    assert!(second.contains("optimystic_repo_operation_seconds_bucket"), "latency histogram: {second}");

    for mut node in nodes {
        let status = sigterm_and_wait(node.child.take().unwrap());
        assert_eq!(status.code(), Some(0), "SIGTERM stops a node with exit status 0");
    }
}

/// Runs the binary with `args` (and `stdin` as its input); returns the finished output.
fn output_of(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("run optimystic");
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// A solo node on memory storage (cluster of one, no metrics), started with flags only.
fn start_solo_node(data_dir: &Path) -> Started {
    start_solo_node_with(data_dir, &[])
}

/// [`start_solo_node`] with more environment variables.
fn start_solo_node_with(data_dir: &Path, env: &[(&str, &str)]) -> Started {
    start_solo_node_on("memory", data_dir, env)
}

/// A solo node on `storage`, with more environment variables.
fn start_solo_node_on(storage: &str, data_dir: &Path, env: &[(&str, &str)]) -> Started {
    let mut child = Command::new(BIN)
        .args(["start", "--storage", storage, "--no-metrics", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(data_dir)
        .envs(env.iter().copied())
        .env("OPTIMYSTIC_KEY_NETWORK__KIND", "static")
        .env("OPTIMYSTIC_CONSENSUS__KIND", "solo")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn optimystic start");
    let lines = line_channel(child.stdout.take().unwrap());
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|e| panic!("the solo node did not report listening: {e}"));
        if let Some(addr) = line.strip_prefix("listening ") {
            break addr.to_owned();
        }
    };
    Started { child: Some(child), p2p_addr: addr, metrics: String::new() }
}

/// The lines of `out`, read on a thread.
fn line_channel(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn client_get_exits_3_for_a_missing_block_and_append_adds_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_solo_node(dir.path());
    let peer = node.p2p_addr.as_str();
    let block = r#"{"header":{"id":"diary","type":"log","collectionId":"cli"},"entries":[],"title":"t"}"#;
    client(&["--peer", peer, "write", "--block", "diary", "--insert", block]);

    let missing = output_of(&["client", "--peer", peer, "get", "diary", "nothere", "gone"], None);
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    let not_found: Vec<&str> = stderr.lines().filter(|l| l.starts_with("not found: ")).collect();
    assert_eq!(not_found, ["not found: nothere", "not found: gone"], "one line per missing block: {stderr}");
    let answer: serde_json::Value = serde_json::from_slice(&missing.stdout).expect("the JSON is still printed");
    assert_eq!(answer["diary"]["block"]["title"], "t", "{answer}");
    assert_eq!(answer["nothere"]["state"]["pendings"], serde_json::json!([]), "{answer}");
    let present = output_of(&["client", "--peer", peer, "get", "diary"], None);
    assert_eq!(present.status.code(), Some(0), "{present:?}");

    for item in [r#""a""#, r#"{"b":2}"#] {
        client(&["--peer", peer, "write", "--block", "diary", "--append", "entries", item]);
    }
    let read = client(&["--peer", peer, "get", "diary"]);
    assert_eq!(read["diary"]["block"]["entries"], serde_json::json!(["a", {"b": 2}]), "{read}");
    assert_eq!(read["diary"]["state"]["latest"]["rev"], 3, "{read}");

    for (args, says) in [
        (vec!["--block", "diary", "--append", "title", "1"], "field \"title\" of block diary is not an array"),
        (vec!["--block", "diary", "--append", "nope", "1"], "block diary has no field \"nope\""),
    ] {
        let mut full = vec!["client", "--peer", peer, "write"];
        full.extend(args);
        let failed = output_of(&full, None);
        assert_eq!(failed.status.code(), Some(2), "{failed:?}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }

    let invalid =
        output_of(&["client", "--peer", peer, "write", "--block", "diary", "--update", r#"[["x",0,0,["y"]]]"#], None);
    assert_eq!(invalid.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert_eq!(stderr.matches("field \"x\" does not exist").count(), 1, "the cause once: {stderr}");
    assert_eq!(stderr.matches("bad request").count(), 1, "the code once: {stderr}");
    let status = sigterm_and_wait({
        let mut node = node;
        node.child.take().unwrap()
    });
    assert_eq!(status.code(), Some(0));
}

/// The diary block of the README.
const DIARY: &str = r#"{"header":{"id":"diary","type":"log","collectionId":"cli"},"entries":[]}"#;

#[test]
fn insert_of_an_existing_block_exits_2_and_replacing_is_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_solo_node(dir.path());
    let peer = node.p2p_addr.as_str();
    client(&["--peer", peer, "write", "--block", "diary", "--insert", DIARY]);
    client(&["--peer", peer, "write", "--block", "diary", "--append", "entries", "\"kept\""]);

    let again = output_of(&["client", "--peer", peer, "write", "--block", "diary", "--insert", DIARY], None);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("block diary already exists") && stderr.contains("--replace"), "{stderr}");
    let read = client(&["--peer", peer, "get", "diary"]);
    assert_eq!(read["diary"]["block"]["entries"], serde_json::json!(["kept"]), "nothing replaced: {read}");
    assert_eq!(read["diary"]["state"]["latest"]["rev"], 2, "{read}");
    assert_eq!(read["diary"]["state"]["pendings"], serde_json::json!([]), "no pend left behind: {read}");

    let replaced = client(&["--peer", peer, "write", "--block", "diary", "--insert", DIARY, "--replace"]);
    assert_eq!(replaced["rev"], 3, "{replaced}");
    let read = client(&["--peer", peer, "get", "diary"]);
    assert_eq!(read["diary"]["block"]["entries"], serde_json::json!([]), "{read}");
    // A deleted block may be created again without --replace.
    client(&["--peer", peer, "write", "--block", "diary", "--delete"]);
    let created = client(&["--peer", peer, "write", "--block", "diary", "--insert", DIARY]);
    assert_eq!(created["rev"], 5, "{created}");
}

#[test]
fn update_delete_and_append_of_a_missing_block_exit_3_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_solo_node(dir.path());
    let peer = node.p2p_addr.as_str();
    for args in [vec!["--update", r#"[["entries",0,0,["x"]]]"#], vec!["--delete"], vec!["--append", "entries", "1"]] {
        let mut full = vec!["client", "--peer", peer, "write", "--block", "nothere"];
        full.extend(&args);
        let started = Instant::now();
        let failed = output_of(&full, None);
        assert_eq!(failed.status.code(), Some(3), "{args:?}: {failed:?}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.starts_with("not found: nothere"), "{args:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} failed at once, not after retries");
    }
}

/// A block of about `bytes` bytes of JSON under id `id`.
fn big_block(id: &str, bytes: usize) -> String {
    format!(r#"{{"header":{{"id":"{id}","type":"blob","collectionId":"cli"}},"data":"{}"}}"#, "x".repeat(bytes))
}

#[test]
fn json_arguments_come_from_a_file_or_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_solo_node_with(&dir.path().join("node"), &[("OPTIMYSTIC_LIMITS__MAX_BLOCK_BYTES", "6291456")]);
    let peer = node.p2p_addr.as_str();
    let file = dir.path().join("big.json");
    std::fs::write(&file, big_block("big", 5_000_000)).unwrap();
    let at_file = format!("@{}", file.display());
    let written = client(&["--peer", peer, "--timeout-ms", "30000", "write", "--block", "big", "--insert", &at_file]);
    assert_eq!(written["rev"], 1, "{written}");
    let read = output_of(&["client", "--peer", peer, "--timeout-ms", "30000", "get", "big"], None);
    assert_eq!(read.status.code(), Some(0), "{}", String::from_utf8_lossy(&read.stderr));
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read["big"]["block"]["data"].as_str().map(str::len), Some(5_000_000));

    let update = br#"[["data",0,0,"replaced"]]"#;
    let piped = output_of(&["client", "--peer", peer, "write", "--block", "big", "--update", "-"], Some(update));
    assert_eq!(piped.status.code(), Some(0), "{piped:?}");
    let appended = output_of(&["client", "--peer", peer, "write", "--block", "big", "--update", "[]"], None);
    assert_eq!(appended.status.code(), Some(0), "{appended:?}");
    let read = client(&["--peer", peer, "get", "big"]);
    assert_eq!(read["big"]["block"]["data"], "replaced", "{read}");

    let gets = dir.path().join("gets.json");
    std::fs::write(&gets, r#"{"blockIds":["big"]}"#).unwrap();
    let read = client(&["--peer", peer, "get", "--json", &format!("@{}", gets.display())]);
    assert_eq!(read["big"]["state"]["latest"]["rev"], 3, "{read}");

    let missing = output_of(&["client", "--peer", peer, "pend", "@/nonexistent/pend.json"], None);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/pend.json"), "{missing:?}");
    let bad = output_of(&["client", "--peer", peer, "cancel", "-"], Some(b"{not json"));
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the TrxBlocks (from stdin) is not valid JSON"), "{bad:?}");
}

#[test]
fn a_block_past_max_block_bytes_is_refused_at_pend_and_an_older_oversize_block_reads_shrinks_and_goes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let file = dir.path().join("part.json");
    let timeout = ["--timeout-ms", "60000"];
    {
        // An older version had no block limit: 5 MB + 4 MB make a block of 9 MB, past the 8 MiB
        // repo frame.
        let older = [
            ("OPTIMYSTIC_LIMITS__MAX_REPO_FRAME_BYTES", "16777216"),
            ("OPTIMYSTIC_LIMITS__MAX_BLOCK_BYTES", "12582912"),
        ];
        let node = start_solo_node_on("lmdb", &data, &older);
        let peer = node.p2p_addr.as_str();
        std::fs::write(&file, big_block("huge", 5_000_000)).unwrap();
        let insert = format!("@{}", file.display());
        client(&["--peer", peer, timeout[0], timeout[1], "write", "--block", "huge", "--insert", &insert]);
        std::fs::write(&file, format!(r#"[["more",0,0,"{}"]]"#, "y".repeat(4_000_000))).unwrap();
        let update = format!("@{}", file.display());
        client(&["--peer", peer, timeout[0], timeout[1], "write", "--block", "huge", "--update", &update]);
        assert_eq!(
            sigterm_and_wait({
                let mut node = node;
                node.child.take().unwrap()
            })
            .code(),
            Some(0)
        );
    }
    let node = start_solo_node_on("lmdb", &data, &[]);
    let peer = node.p2p_addr.as_str();
    let read = output_of(&["client", "--peer", peer, timeout[0], timeout[1], "get", "huge"], None);
    assert_eq!(read.status.code(), Some(0), "an oversize block reads: {}", String::from_utf8_lossy(&read.stderr));
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read["huge"]["block"]["more"].as_str().map(str::len), Some(4_000_000));
    let located = output_of(&["locate", "--peer", peer, "--json", "huge"], None);
    assert_eq!(located.status.code(), Some(0), "{located:?}");
    let located = String::from_utf8_lossy(&located.stdout);
    assert!(located.contains("\"rev\": 2"), "locate reads the member's latest: {located}");
    let history = output_of(&["history", "--peer", peer, "--json", "huge"], None);
    assert_eq!(history.status.code(), Some(0), "{history:?}");
    assert_eq!(String::from_utf8_lossy(&history.stdout).lines().count(), 2);

    let grow = output_of(
        &["client", "--peer", peer, timeout[0], timeout[1], "write", "--block", "huge", "--append", "tags", "1"],
        None,
    );
    assert_eq!(grow.status.code(), Some(2), "{grow:?}");
    let refused = output_of(
        &[
            "client",
            "--peer",
            peer,
            timeout[0],
            timeout[1],
            "write",
            "--block",
            "huge",
            "--update",
            r#"[["tag",0,0,"x"]]"#,
        ],
        None,
    );
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("bad request")
            && stderr.contains("block huge")
            && stderr.contains("over the limit of 4194304 bytes (limits.max_block_bytes)"),
        "names the block, its size and the limit: {stderr}"
    );
    client(&[
        "--peer",
        peer,
        timeout[0],
        timeout[1],
        "write",
        "--block",
        "huge",
        "--update",
        r#"[["more",0,0,"short"]]"#,
    ]);
    let read = client(&["--peer", peer, "get", "huge"]);
    assert_eq!(read["huge"]["block"]["more"], "short", "shrunk: {}", read["huge"]["state"]);
    client(&["--peer", peer, "write", "--block", "huge", "--delete"]);
    let gone = output_of(&["client", "--peer", peer, "get", "huge"], None);
    assert_eq!(gone.status.code(), Some(3), "{gone:?}");

    std::fs::write(&file, big_block("new", 4_300_000)).unwrap();
    let insert = format!("@{}", file.display());
    let too_big = output_of(
        &["client", "--peer", peer, timeout[0], timeout[1], "write", "--block", "new", "--insert", &insert],
        None,
    );
    assert_eq!(too_big.status.code(), Some(2), "{too_big:?}");
    let stderr = String::from_utf8_lossy(&too_big.stderr);
    assert!(stderr.contains("invalid transform for block new: the block would be 43000"), "{stderr}");
}

#[test]
fn config_show_refuses_what_start_refuses_naming_file_and_key_and_start_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("node.toml");
    for (option, says) in
        [("map_size_bytes = \"big\"", "storage.map_size_bytes in "), ("mapsize = 5", "storage.mapsize in ")]
    {
        let text =
            format!("[node]\ndata_dir = {:?}\n[storage]\nkind = \"lmdb\"\n{option}\n", data.display().to_string());
        std::fs::write(&config, text).unwrap();
        let expected = format!("error: configuration: {says}{}: storage lmdb: ", config.display());
        for command in ["config show", "start"] {
            let mut args: Vec<&str> = command.split(' ').collect();
            args.extend(["--config", config.to_str().unwrap(), "--no-metrics"]);
            let refused = output_of(&args, None);
            assert_eq!(refused.status.code(), Some(2), "{command} {option}: {refused:?}");
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert!(stderr.starts_with(&expected), "{command} {option}: {stderr}");
            assert!(!data.exists(), "{command} {option} created the data directory");
        }
    }
}

#[test]
fn help_and_errors_say_each_thing_once() {
    let (code, top, _) = run_bin(&["--help"]);
    assert_eq!(code, Some(0));
    assert_eq!(top.matches("--log-format").count(), 1, "the log format is explained once: {top}");
    for command in ["status", "start", "client", "locate", "history"] {
        let (code, help, _) = run_bin(&[command, "--help"]);
        assert_eq!(code, Some(0));
        assert!(!help.contains("log-format") && !help.contains("Possible values"), "{command}: {help}");
    }
    let (code, shown, stderr) = run_bin(&["config", "show", "--log-format", "json"]);
    assert_eq!(code, Some(0), "--log-format still works after a subcommand: {stderr}");
    assert!(shown.contains("[node]"));

    let (code, _, stderr) = run_bin(&["locate", "--peer", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWA", ""]);
    assert_eq!(code, Some(2));
    assert!(stderr.starts_with("error: block id must be ") && !stderr.contains("the block id"), "{stderr}");
}

#[test]
fn an_interrupted_write_cancels_its_pend_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_solo_node(dir.path());
    let peer = node.p2p_addr.as_str();
    client(&["--peer", peer, "write", "--block", "diary", "--insert", DIARY]);
    for signal in ["-INT", "-TERM"] {
        let mut write = Command::new(BIN)
            .args(["client", "--peer", peer, "write", "--block", "diary", "--append", "entries", "1"])
            .env("OPTIMYSTIC_CLIENT_HOLD_BEFORE_COMMIT", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = line_channel(write.stderr.take().unwrap());
        let pended = lines.recv_timeout(STARTUP_TIMEOUT).expect("the write reports its pend");
        assert!(pended.starts_with("pended "), "{pended}");
        let read = client(&["--peer", peer, "get", "diary"]);
        assert_eq!(read["diary"]["state"]["pendings"].as_array().map(Vec::len), Some(1), "held after pend: {read}");

        assert!(Command::new("kill").args([signal, &write.id().to_string()]).status().unwrap().success());
        let status = wait_exit(write);
        assert_eq!(status.code(), Some(130), "{signal}");
        let said: Vec<String> = remaining(&lines);
        assert!(said.iter().any(|l| l.starts_with("interrupted: cancelled the pend of ")), "{said:?}");
        let read = client(&["--peer", peer, "get", "diary"]);
        assert_eq!(read["diary"]["state"]["pendings"], serde_json::json!([]), "the pend was cancelled: {read}");
        assert_eq!(read["diary"]["state"]["latest"]["rev"], 1, "nothing committed: {read}");
    }
}

#[test]
fn history_records_of_a_three_node_cluster_pipe_into_verify_record() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_three_nodes(dir.path());
    let peer = nodes[0].p2p_addr.clone();
    let block = r#"{"header":{"id":"log","type":"log","collectionId":"cli"},"entries":[]}"#;
    client(&["--peer", &peer, "write", "--block", "log", "--insert", block]);
    for item in ["1", "2"] {
        client(&["--peer", &peer, "write", "--block", "log", "--append", "entries", item]);
    }

    let history = output_of(&["history", "--peer", &peer, "log", "--records"], None);
    assert_eq!(history.status.code(), Some(0), "{history:?}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&history.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    assert_eq!(records.len(), 6, "a pend and a commit record for each of 3 revisions: {records:?}");
    let verified = output_of(&["verify-record"], Some(&history.stdout));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    let verdicts = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verdicts.lines().count(), 6, "{verdicts}");
    for (line, record) in verdicts.lines().zip(&records) {
        assert_eq!(line, format!("ok {}", record["messageHash"].as_str().unwrap()));
    }

    let json = output_of(&["history", "--peer", &peer, "log", "--json", "--from", "2"], None);
    assert_eq!(json.status.code(), Some(0), "{json:?}");
    let revisions: Vec<serde_json::Value> =
        String::from_utf8_lossy(&json.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let revs: Vec<u64> = revisions.iter().map(|r| r["rev"].as_u64().unwrap()).collect();
    assert_eq!(revs, [2, 3]);
    assert_eq!(
        revisions[1]["transform"]["updates"],
        serde_json::json!([["entries", 1, 0, [2]]]),
        "appended at the end"
    );
    let text = output_of(&["history", "--peer", &peer, "log"], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("block log: latest rev 3"), "{text}");
    assert_eq!(text.matches("  evidence commit z").count(), 3, "{text}");
    assert_eq!(text.matches(" of 3 peers committed, ").count(), 3, "commit evidence counts commit votes: {text}");
    assert_eq!(text.matches(" of 3 peers promised)").count(), 3, "pend evidence counts promises: {text}");
    let missing = output_of(&["history", "--peer", &peer, "nothere"], None);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found: nothere"));

    for mut node in nodes {
        assert_eq!(sigterm_and_wait(node.child.take().unwrap()).code(), Some(0));
    }
}

/// A running `optimystic cluster up`; a failing test still stops it (and so its nodes).
struct ClusterUp {
    child: Option<Child>,
}

impl Drop for ClusterUp {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = sigterm_and_wait(child);
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn cluster_up_runs_three_processes_until_sigint_and_leaves_none_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, lines, nodes) = cluster_up(dir.path(), 3);
    for i in 1..=3 {
        assert!(dir.path().join(format!("node{i}.toml")).is_file());
        assert!(dir.path().join(format!("node{i}.log")).is_file());
    }
    let bootstrap = std::fs::read_to_string(dir.path().join("node2.toml")).unwrap();
    assert!(bootstrap.contains(&format!("bootstrap = [\"{}\"]", nodes[0].1)), "node 1 is the bootstrap: {bootstrap}");

    let block = r#"{"header":{"id":"up","type":"log","collectionId":"cli"},"entries":[]}"#;
    client(&["--peer", &nodes[0].1, "write", "--block", "up", "--insert", block]);
    client(&["--peer", &nodes[0].1, "write", "--block", "up", "--append", "entries", "\"x\""]);
    let read = client(&["--peer", &nodes[1].1, "get", "up"]);
    assert_eq!(read["up"]["block"]["entries"], serde_json::json!(["x"]), "{read}");

    let child = up.child.take().unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = wait_exit(child);
    assert_eq!(status.code(), Some(0), "SIGINT stops cluster up with exit status 0");
    // Its stdout has closed (it exited): the rest of its lines are in the channel or on the way.
    let stopped: Vec<String> = remaining(&lines).into_iter().filter(|l| l.contains("stopped (")).collect();
    assert_eq!(stopped.len(), 3, "{stopped:?}");
    assert!(
        stopped.iter().all(|l| l.ends_with("stopped (exit status 0)")),
        "each node stopped on SIGTERM: {stopped:?}"
    );
    for (pid, _) in &nodes {
        assert!(!pid_alive(*pid), "node process {pid} is gone");
    }
}

/// Starts `optimystic cluster up --nodes <n>` on free ports and memory storage; returns it, its
/// stdout lines, and each node's (pid, address) once it printed `up:`.
fn cluster_up(dir: &Path, n: usize) -> (ClusterUp, mpsc::Receiver<String>, Vec<(u32, String)>) {
    cluster_up_with(dir, n, "memory")
}

/// [`cluster_up`] on `storage`.
fn cluster_up_with(dir: &Path, n: usize, storage: &str) -> (ClusterUp, mpsc::Receiver<String>, Vec<(u32, String)>) {
    let mut child = Command::new(BIN)
        .args(["cluster", "up", "--nodes", &n.to_string(), "--storage", storage, "--base-port", "0", "--dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn optimystic cluster up");
    let lines = line_channel(child.stdout.take().unwrap());
    let up = ClusterUp { child: Some(child) };
    let deadline = Instant::now() + STARTUP_TIMEOUT * 2;
    let mut nodes = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|e| panic!("cluster up did not report up: {e}"));
        if line.starts_with("up: ") {
            break;
        }
        // node <i> pid <pid> listening <addr> metrics <url>
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["node", _, "pid", pid, "listening", addr, "metrics", ..] = words.as_slice() {
            nodes.push((pid.parse().unwrap(), (*addr).to_owned()));
        }
    }
    assert_eq!(nodes.len(), n, "{nodes:?}");
    (up, lines, nodes)
}

/// Waits (at most 60 s) for `child` to exit.
fn wait_exit(child: Child) -> std::process::ExitStatus {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = tx.send(child.wait());
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("exits within 60 s").unwrap()
}

/// The rest of a finished process's stdout lines.
fn remaining(lines: &mpsc::Receiver<String>) -> Vec<String> {
    let mut rest = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        rest.push(line);
    }
    rest
}

/// Runs `optimystic cluster <args> --dir <dir>`; returns its stdout's one line.
fn cluster_control(dir: &Path, args: &[&str]) -> String {
    let mut full = vec!["cluster"];
    full.extend(args);
    full.extend(["--dir", dir.to_str().unwrap()]);
    let (code, out, err) = run_bin(&full);
    assert_eq!(code, Some(0), "cluster {args:?}: {out}{err}");
    out.trim().to_owned()
}

#[test]
fn cluster_up_stops_restarts_and_adds_one_node_on_command() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, lines, nodes) = cluster_up_with(dir.path(), 3, "lmdb");
    let block = r#"{"header":{"id":"steady","type":"log","collectionId":"cli"},"entries":[]}"#;
    client(&["--peer", &nodes[0].1, "write", "--block", "steady", "--insert", block]);

    let stopped = cluster_control(dir.path(), &["stop", "2"]);
    assert_eq!(stopped, "node 2 stopped (exit status 0)");
    assert!(!pid_alive(nodes[1].0), "node 2's process is gone");
    assert!(up.child.as_mut().unwrap().try_wait().unwrap().is_none(), "cluster up still runs");
    client(&["--peer", &nodes[0].1, "write", "--block", "steady", "--append", "entries", "1"]);
    let (code, _, again) = run_bin(&["cluster", "stop", "2", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(again.contains("node 2 is stopped"), "{again}");

    let started = cluster_control(dir.path(), &["start", "2"]);
    assert!(started.starts_with("node 2 pid ") && started.ends_with(&nodes[1].1), "same address and id: {started}");
    let restarted = cluster_control(dir.path(), &["restart", "2"]);
    assert!(restarted.ends_with(&nodes[1].1), "{restarted}");
    client(&["--peer", &nodes[1].1, "write", "--block", "steady", "--append", "entries", "2"]);
    let read = client(&["--peer", &nodes[1].1, "get", "steady"]);
    assert_eq!(read["steady"]["block"]["entries"], serde_json::json!([1, 2]), "{read}");

    let added = cluster_control(dir.path(), &["add"]);
    assert!(added.starts_with("node 4 pid ") && added.contains(" listening /ip4/127.0.0.1/tcp/"), "{added}");
    assert!(dir.path().join("node4.toml").is_file());
    let fourth = added.rsplit(' ').next().unwrap().to_owned();
    let read = client(&["--peer", &fourth, "get", "steady"]);
    assert_eq!(read["steady"]["state"]["latest"]["rev"], 3, "the added node serves reads: {read}");

    let child = up.child.take().unwrap();
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_exit(child).code(), Some(0));
    let stopped: Vec<String> = remaining(&lines).into_iter().filter(|l| l.contains(" stopped (")).collect();
    assert_eq!(stopped.len(), 4 + 1, "the command's stop and the final four: {stopped:?}");
}

#[test]
fn cluster_up_puts_its_default_directory_outside_the_current_one() {
    let cwd = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["cluster", "up", "--nodes", "1", "--storage", "memory", "--base-port", "0"])
        .current_dir(cwd.path())
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_channel(child.stdout.take().unwrap());
    let up = ClusterUp { child: Some(child) };
    let first = lines.recv_timeout(STARTUP_TIMEOUT).unwrap();
    let expected = tmp.path().join("optimystic-cluster-1");
    assert_eq!(first, format!("starting 1 nodes with memory storage in {}", expected.display()));
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "nothing written in the current directory");
    drop(up);
}

#[test]
fn cluster_up_stops_the_others_when_a_node_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, lines, nodes) = cluster_up(dir.path(), 2);
    let victim = nodes[1].0.to_string();
    assert!(Command::new("kill").args(["-KILL", &victim]).status().unwrap().success());
    let status = wait_exit(up.child.take().unwrap());
    assert_eq!(status.code(), Some(2), "a node that dies is an error");
    let rest = remaining(&lines);
    assert!(rest.iter().any(|l| l == "node 2 exited (killed by signal 9); stopping the others"), "{rest:?}");
    assert!(rest.iter().any(|l| l == "node 1 stopped (exit status 0)"), "{rest:?}");
    for (pid, _) in &nodes {
        assert!(!pid_alive(*pid), "node process {pid} is gone");
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
    let flipped = match signature.strip_prefix('A') {
        Some(rest) => format!("B{rest}"),
        None => format!("A{}", &signature[1..]),
    };
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
fn bench_runs_on_a_local_cluster_and_refuses_more_coordinators_than_nodes() {
    let output = Command::new(BIN)
        .args(["bench", "--nodes", "2", "--coordinators", "2", "--concurrency", "4", "--transactions", "40", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!((report["committed"].as_u64(), report["errors"].as_u64()), (Some(40), Some(0)), "{report}");
    assert_eq!((report["nodes"].as_u64(), report["coordinators"].as_u64()), (Some(2), Some(2)), "{report}");

    let output = Command::new(BIN).args(["bench", "--nodes", "2", "--coordinators", "3"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--coordinators 3 is more than the 2 local nodes"), "{stderr}");
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

/// How long three nodes started at once may take to join and serve a write read back elsewhere.
const JOIN_DEADLINE: Duration = Duration::from_secs(20);

/// A node process whose stdout lines can be waited on and whose stderr goes to a log file.
struct Launched {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
    p2p_addr: String,
    metrics: String,
}

impl Drop for Launched {
    /// A failing test must not leave nodes running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Launched {
    /// Waits for the stdout line `line` until `deadline`.
    /// Waits for the `ready <peer id>` line naming this node.
    fn wait_ready(&self, deadline: Instant) {
        let peer = self.p2p_addr.rsplit('/').next().unwrap();
        self.wait_line(&format!("ready {peer}"), deadline);
    }

    fn wait_line(&self, line: &str, deadline: Instant) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) if got == line => return,
                Ok(_) => {}
                Err(e) => panic!("no {line:?} line from {} ({e}); its log:\n{}", self.p2p_addr, self.log_text()),
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Ports of one test cluster: libp2p and metrics, one each per node.
struct Ports {
    p2p: Vec<u16>,
    metrics: Vec<u16>,
}

impl Ports {
    /// Six distinct free ports for the three nodes of the example configs (each probe listener is
    /// held until all are picked; see [`PORT_RANGE`]).
    fn free() -> Self {
        let listeners: Vec<std::net::TcpListener> = (0..6).map(|_| probe_port()).collect();
        let mut p2p: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
        let metrics = p2p.split_off(3);
        Self { p2p, metrics }
    }
}

/// Example config `i` (1-based) rewritten into `dir`: its ports (4101-4103, 9101-9103) and data
/// directory replaced, everything else (plain bootstrap addresses included) as shipped.
fn rewrite_example_config(dir: &Path, i: usize, ports: &Ports) -> PathBuf {
    let mut text = std::fs::read_to_string(example_config(i)).unwrap();
    let data_dir = format!("data_dir = \"./optimystic-data/node{i}\"");
    assert!(text.contains(&data_dir), "example node{i}.toml changed: {data_dir} not found");
    text = text.replace(&data_dir, &format!("data_dir = {:?}", dir.join(format!("node{i}")).display().to_string()));
    // Through placeholders, so that a new port is never taken for an old one.
    for n in 1..=3 {
        text = text
            .replace(&format!("/tcp/410{n}\""), &format!("/tcp/@p2p{n}@\""))
            .replace(&format!("127.0.0.1:910{n}\""), &format!("127.0.0.1:@metrics{n}@\""));
    }
    let own_ports = text.contains(&format!("@p2p{i}@")) && text.contains(&format!("@metrics{i}@"));
    assert!(own_ports, "example node{i}.toml changed its ports:\n{text}");
    for n in 1..=3 {
        text = text
            .replace(&format!("@p2p{n}@"), &ports.p2p[n - 1].to_string())
            .replace(&format!("@metrics{n}@"), &ports.metrics[n - 1].to_string());
    }
    let path = dir.join(format!("node{i}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Spawns `optimystic start --config CONFIG` without waiting for anything.
fn spawn_start(config: &Path, log: PathBuf) -> (Child, mpsc::Receiver<String>) {
    let mut command = Command::new(BIN);
    command
        .arg("start")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn,optimystic=info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
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
    (child, rx)
}

/// Reads the `listening` and `metrics` lines of a spawned node.
fn launched(child: Child, lines: mpsc::Receiver<String>, log: PathBuf) -> Launched {
    let mut node = Launched { child: Some(child), lines, log, p2p_addr: String::new(), metrics: String::new() };
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while node.p2p_addr.is_empty() || node.metrics.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line =
            node.lines.recv_timeout(left).unwrap_or_else(|e| panic!("no listening line ({e}):\n{}", node.log_text()));
        if let Some(addr) = line.strip_prefix("listening ") {
            node.p2p_addr = addr.to_owned();
        } else if let Some(url) = line.strip_prefix("metrics ") {
            node.metrics = url.to_owned();
        }
    }
    node
}

/// Starts the three example configs at the same instant (nodes 3 and 2 spawned first, so their
/// first dials of node 1's plain address usually find nothing listening yet).
fn start_example_cluster(dir: &Path) -> Vec<Launched> {
    let ports = Ports::free();
    let configs: Vec<PathBuf> = (1..=3).map(|i| rewrite_example_config(dir, i, &ports)).collect();
    let mut spawned: Vec<_> =
        (1..=3).rev().map(|i| (i, spawn_start(&configs[i - 1], dir.join(format!("node{i}.log"))))).collect();
    spawned.reverse();
    spawned.into_iter().map(|(i, (child, lines))| launched(child, lines, dir.join(format!("node{i}.log")))).collect()
}

/// `optimystic ARGS`: (exit code, stdout, stderr).
fn run_bin(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(BIN).args(args).output().expect("run optimystic");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn three_nodes_started_at_once_from_the_example_configs_join_and_serve_within_20_s() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let deadline = started + JOIN_DEADLINE;
    let nodes = start_example_cluster(dir.path());
    for node in &nodes {
        node.wait_ready(deadline);
        let (status, body) = http_get(&node.metrics.replace("/metrics", "/ready"));
        assert_eq!(status, 200, "ready: {body}");
    }

    let block = r#"{"header":{"id":"joined","type":"note","collectionId":"cli"},"text":"all three"}"#;
    let written = client(&["--peer", &nodes[0].p2p_addr, "write", "--block", "joined", "--insert", block]);
    assert_eq!(written["rev"], 1, "{written}");
    for node in &nodes[1..] {
        loop {
            let (code, stdout, stderr) = run_bin(&["client", "--peer", &node.p2p_addr, "get", "joined"]);
            let read: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
            if code == Some(0) && read["joined"]["block"]["text"] == "all three" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the write is not readable through {} within {JOIN_DEADLINE:?}: {stdout}{stderr}\n{}",
                node.p2p_addr,
                node.log_text()
            );
        }
    }
    let retried = nodes.iter().map(|n| n.log_text().matches("cannot reach bootstrap peer").count()).sum::<usize>();
    eprintln!("joined and served in {:?} ({retried} bootstrap dials failed and were retried)", started.elapsed());
}

#[test]
fn a_node_whose_bootstrap_peer_is_down_is_live_not_ready_and_joins_when_it_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let config = rewrite_example_config(dir.path(), 2, &ports);
    let log = dir.path().join("node2.log");
    let (child, lines) = spawn_start(&config, log.clone());
    let joining = launched(child, lines, log);
    let (status, body) = http_get(&joining.metrics.replace("/metrics", "/health"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "ok", "ready": false})
    );
    let (status, body) = http_get(&joining.metrics.replace("/metrics", "/ready"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not-ready") && body.contains("dialling the bootstrap peers"), "{body}");

    // The bootstrap peer comes up on the address the joining node keeps dialling.
    let first = rewrite_example_config(dir.path(), 1, &ports);
    let log1 = dir.path().join("node1.log");
    let (child, lines) = spawn_start(&first, log1.clone());
    let _bootstrap_peer = launched(child, lines, log1);
    joining.wait_ready(Instant::now() + JOIN_DEADLINE);
    let (status, body) = http_get(&joining.metrics.replace("/metrics", "/ready"));
    assert_eq!(status, 200, "{body}");
    let log = joining.log_text();
    let dialled = format!("/ip4/127.0.0.1/tcp/{}", ports.p2p[0]);
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("cannot reach bootstrap peer")
            && l.contains(&dialled)
            && l.contains("connection refused")),
        "each failed dial is a warning naming the address and the reason:\n{log}"
    );
    assert!(log.contains("connected to bootstrap peer"), "{log}");
}

#[test]
fn a_second_node_on_a_busy_port_exits_2_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let config = rewrite_example_config(dir.path(), 1, &ports);
    let log = dir.path().join("node1.log");
    let (child, lines) = spawn_start(&config, log.clone());
    let first = launched(child, lines, log);

    let busy = format!("/ip4/127.0.0.1/tcp/{}", ports.p2p[0]);
    let second_dir = dir.path().join("second");
    let (code, stdout, stderr) = run_bin(&[
        "start",
        "--storage",
        "memory",
        "--data-dir",
        second_dir.to_str().unwrap(),
        "--listen",
        &busy,
        "--metrics-listen",
        &format!("127.0.0.1:{}", ports.metrics[1]),
    ]);
    assert_eq!(code, Some(2), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains(&format!("error: cannot listen on {busy}: address in use")), "{stderr}");
    let (status, _) = http_get(&first.metrics.replace("/metrics", "/ready"));
    assert_eq!(status, 200, "the first node is untouched");
}

#[test]
fn status_and_locate_describe_a_three_node_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_example_cluster(dir.path());
    let deadline = Instant::now() + JOIN_DEADLINE;
    for node in &nodes {
        node.wait_ready(deadline);
    }
    let block = r#"{"header":{"id":"located","type":"note","collectionId":"cli"},"text":"here"}"#;
    client(&["--peer", &nodes[0].p2p_addr, "write", "--block", "located", "--insert", block]);
    let peer_ids: Vec<String> = nodes.iter().map(|n| n.p2p_addr.rsplit('/').next().unwrap().to_owned()).collect();

    // Every node knows both others (discovery may need a moment after the first write).
    let status = loop {
        let (code, stdout, stderr) = run_bin(&["status", "--peer", &nodes[1].p2p_addr, "--json"]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        if status["routingTablePeers"] == 2 {
            break status;
        }
        assert!(Instant::now() < deadline, "node 2 did not learn both peers: {status}");
    };
    assert_eq!(status["peerId"], peer_ids[1].as_str());
    assert_eq!(status["listenAddrs"], serde_json::json!([nodes[1].p2p_addr]));
    let connected: Vec<&str> = status["connectedPeers"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(connected.contains(&peer_ids[0].as_str()), "node 2 is connected to node 1: {status}");
    assert_eq!(status["ready"], true);
    assert_eq!(status["storage"]["kind"], "lmdb");
    assert_eq!(status["storage"]["durable"], true);
    assert_eq!(status["storage"]["blocks"], 1, "{status}");
    assert_eq!(status["keyNetwork"], serde_json::json!({"kind": "kademlia", "clusterSize": 3}));
    assert_eq!(status["consensus"]["kind"], "majority-2pc");

    let (code, stdout, stderr) = run_bin(&["status", "--peer", &nodes[0].p2p_addr, "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let first: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(first["consensus"]["rounds"]["committed"].as_u64().unwrap() >= 2, "pend and commit rounds: {first}");
    assert!(first["operations"]["commit"]["ok"].as_u64().unwrap() >= 1, "{first}");

    let (code, text, stderr) = run_bin(&["status", "--peer", &nodes[0].p2p_addr]);
    assert_eq!(code, Some(0), "{stderr}");
    for expected in [
        format!("peer id        {}", peer_ids[0]),
        format!("listening      {}", nodes[0].p2p_addr),
        "ready          yes".to_owned(),
        "storage        lmdb (durable), 1 block".to_owned(),
        "key network    kademlia, clusters of 3".to_owned(),
        "consensus      majority-2pc, rounds coordinated: committed".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing in:\n{text}");
    }

    // A commit is acknowledged at a majority; the third member applies it a moment later.
    let location = loop {
        let (code, stdout, stderr) = run_bin(&["locate", "--peer", &nodes[2].p2p_addr, "located", "--json"]);
        assert_eq!(code, Some(0), "{stderr}");
        let location: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let members = location["members"].as_array().unwrap();
        if members.len() == 3 && members.iter().all(|m| m["latest"]["rev"] == 1) {
            break location;
        }
        assert!(Instant::now() < deadline, "not every member reports revision 1: {location}");
    };
    assert_eq!(location["blockId"], "located");
    assert_eq!(location["seenBy"], peer_ids[2].as_str());
    let members = location["members"].as_array().unwrap();
    let mut member_ids: Vec<&str> = members.iter().filter_map(|m| m["peerId"].as_str()).collect();
    member_ids.sort_unstable();
    let mut expected_ids: Vec<&str> = peer_ids.iter().map(String::as_str).collect();
    expected_ids.sort_unstable();
    assert_eq!(member_ids, expected_ids, "a 3-node cluster holds every block on all three: {location}");
    for member in members {
        assert_eq!(member["reachable"], true, "{member}");
        assert_eq!(member["latest"]["rev"], 1, "{member}");
        assert_eq!(member["latest"]["trxId"], members[0]["latest"]["trxId"], "{location}");
        assert!(!member["multiaddrs"].as_array().unwrap().is_empty(), "{member}");
        assert_eq!(member["self"], member["peerId"] == peer_ids[2].as_str(), "{member}");
    }

    let (code, text, stderr) = run_bin(&["locate", "--peer", &nodes[2].p2p_addr, "located"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.starts_with("block located: cluster of 3"), "{text}");
    assert!(text.contains(&format!("{} (this node): latest rev 1", peer_ids[2])), "{text}");
    assert_eq!(text.matches("latest rev 1").count(), 3, "{text}");

    // A member that is down shows as unreachable, with the reason.
    let mut nodes = nodes;
    let stopped = nodes.remove(0);
    drop(stopped);
    let (code, text, stderr) = run_bin(&["locate", "--peer", &nodes[1].p2p_addr, "located"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.contains(&format!("{}: unreachable: ", peer_ids[0])), "{text}");
    assert_eq!(text.matches("latest rev 1").count(), 2, "{text}");

    // Malformed operator requests are refused by name, and the node goes on serving.
    let (code, _, stderr) = run_bin(&["locate", "--peer", &nodes[1].p2p_addr, ""]);
    assert_eq!(code, Some(2), "{stderr}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use optimystic_core::network::{NetworkError, PeerNetwork, ProtocolKind};
        let addr: libp2p::Multiaddr = nodes[1].p2p_addr.parse().unwrap();
        let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else { panic!("{addr}") };
        let host = optimystic_node::Host::start(
            optimystic_node::HostConfig::new(optimystic_node::identity::generate()),
            optimystic_node::Handlers::default(),
        )
        .await
        .unwrap();
        host.add_address(peer, addr).await.unwrap();
        let later = optimystic_core::time::now_ms() + 10_000;
        for bad in [
            serde_json::json!({"node": 5, "expiration": later}),
            serde_json::json!({"node": {"op": "reboot"}, "expiration": later}),
            serde_json::json!({"node": {"op": "locate", "blockId": ""}, "expiration": later}),
            serde_json::json!({"node": {"op": "status"}}),
        ] {
            match host.request(peer, ProtocolKind::Repo, bad.clone(), Duration::from_secs(10)).await {
                Err(NetworkError::Remote { code, message, .. }) => {
                    assert_eq!(code, "bad-request", "{bad}: {message}");
                    assert!(message.starts_with("operator request: "), "{message}");
                }
                other => panic!("{bad} answered {other:?}"),
            }
        }
        host.shutdown().await;
    });
    let (code, _, stderr) = run_bin(&["status", "--peer", &nodes[1].p2p_addr]);
    assert_eq!(code, Some(0), "still serving after malformed requests: {stderr}");
}
