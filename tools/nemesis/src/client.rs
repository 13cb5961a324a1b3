//! Runs `optimystic client` processes (in the hub namespace when there is one) with a deadline,
//! and classifies their outcomes.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;

use crate::net::Resources;

/// How a client process ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// It exited.
    Exited {
        /// Exit code (-1 when killed by a signal).
        code: i32,
        /// Its stdout.
        stdout: String,
        /// Its stderr, ANSI colours removed.
        stderr: String,
    },
    /// The harness killed it at the per-operation deadline.
    TimedOut,
    /// It could not be started.
    SpawnFailed(String),
}

/// The outcome of a write as the history records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// Exit 0: committed at this revision.
    Ok(Option<u64>),
    /// Certainly not applied.
    Fail(String),
    /// Maybe applied.
    Info(String),
}

/// A write's outcome with the reasons of its failed attempts (`write` retries inside the
/// process, with a new transaction each time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The outcome.
    pub result: WriteResult,
    /// One reason per failed attempt, in order.
    pub attempts: Vec<String>,
}

/// Starts client processes.
#[derive(Clone, Debug)]
pub struct Invoker {
    /// The `optimystic` binary.
    pub bin: PathBuf,
    /// The namespace clients run in (`ip netns exec`), if any.
    pub hub: Option<String>,
    /// Where child pids are registered for cleanup.
    pub res: Arc<Resources>,
    /// The harness's deadline for one client process; it is killed after it.
    pub op_timeout: Duration,
    /// The client's own `--timeout-ms` (deadline of each repo operation).
    pub client_timeout_ms: u64,
}

/// Removes ANSI escape sequences (tracing colours its output even into a pipe).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Invoker {
    /// Runs `optimystic <args>`.
    pub async fn run(&self, args: &[String], rust_log: &str) -> Outcome {
        let mut cmd = match &self.hub {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Outcome::SpawnFailed(e.to_string()),
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid {
            self.res.add_pid(pid);
        }
        let result = tokio::time::timeout(self.op_timeout, child.wait_with_output()).await;
        if let Some(pid) = pid {
            self.res.remove_pid(pid);
        }
        match result {
            Err(_) => Outcome::TimedOut,
            Ok(Err(e)) => Outcome::SpawnFailed(e.to_string()),
            Ok(Ok(out)) => Outcome::Exited {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: strip_ansi(&String::from_utf8_lossy(&out.stderr)),
            },
        }
    }

    fn base_args(&self, peer: &str) -> Vec<String> {
        vec!["client".into(), "--peer".into(), peer.into(), "--timeout-ms".into(), self.client_timeout_ms.to_string()]
    }

    /// `write --block B --update '[["entries",0,0,[value]]]'`.
    pub async fn append(&self, peer: &str, block: &str, value: &str) -> Written {
        let update = json!([["entries", 0, 0, [value]]]).to_string();
        self.write(peer, block, "--update", &update).await
    }

    /// `write --block B --insert '{"header":{"id":B,"type":"log","collectionId":"n"},"entries":[]}'`.
    pub async fn create(&self, peer: &str, block: &str) -> Written {
        let insert = json!({"header": {"id": block, "type": "log", "collectionId": "n"}, "entries": []}).to_string();
        self.write(peer, block, "--insert", &insert).await
    }

    async fn write(&self, peer: &str, block: &str, flag: &str, arg: &str) -> Written {
        let mut args = self.base_args(peer);
        args.extend(["write".into(), "--block".into(), block.into(), flag.into(), arg.into()]);
        // Debug lines of the transaction loop name each failed attempt's reason.
        match self.run(&args, "warn,optimystic_node::txn=debug").await {
            Outcome::TimedOut => Written {
                result: WriteResult::Info(format!("timed out after {:?} (client killed)", self.op_timeout)),
                attempts: Vec::new(),
            },
            Outcome::SpawnFailed(e) => {
                Written { result: WriteResult::Fail(format!("client not started: {e}")), attempts: Vec::new() }
            }
            Outcome::Exited { code: 0, stdout, stderr } => {
                let rev =
                    serde_json::from_str::<Value>(&stdout).ok().and_then(|v| v.get("rev").and_then(Value::as_u64));
                Written { result: WriteResult::Ok(rev), attempts: attempt_reasons(&stderr) }
            }
            Outcome::Exited { code, stderr, .. } => {
                Written { result: classify_write_failure(code, &stderr), attempts: attempt_reasons(&stderr) }
            }
        }
    }

    /// `get --json '{"blockIds": blocks, "readMode": mode}'`: the GetBlockResults object.
    pub async fn get(&self, peer: &str, blocks: &[String], mode: &str) -> Result<Value, String> {
        let mut args = self.base_args(peer);
        let gets = json!({"blockIds": blocks, "readMode": mode}).to_string();
        args.extend(["get".into(), "--json".into(), gets]);
        match self.run(&args, "error").await {
            Outcome::TimedOut => Err(format!("timed out after {:?} (client killed)", self.op_timeout)),
            Outcome::SpawnFailed(e) => Err(format!("client not started: {e}")),
            // Exit 3: some block does not exist there; the answer is on stdout all the same.
            Outcome::Exited { code: 0 | 3, stdout, .. } => {
                serde_json::from_str(&stdout).map_err(|e| format!("unreadable answer: {e}: {stdout}"))
            }
            Outcome::Exited { code, stderr, .. } => Err(format!("exit {code}: {}", last_error_line(&stderr))),
        }
    }
}

/// The block's entries (newest first) and latest revision in a GetBlockResults object; `None`
/// entries for an absent block.
pub fn block_of(results: &Value, block: &str) -> (Option<Value>, Option<u64>) {
    let Some(r) = results.get(block) else {
        return (None, None);
    };
    let entries = r.get("block").and_then(|b| b.get("entries")).cloned();
    let rev = r.get("state").and_then(|s| s.get("latest")).and_then(|l| l.get("rev")).and_then(Value::as_u64);
    (entries, rev)
}

fn last_error_line(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// The reason of each failed attempt, from the `transaction attempt did not commit` debug lines.
pub fn attempt_reasons(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains("transaction attempt did not commit"))
        .map(|l| l.split_once("reason=").map_or("", |(_, r)| r).trim().to_owned())
        .collect()
}

/// Classifies a non-zero exit of `optimystic client write`: exit 2 (every attempt was refused
/// before its commit, or its commit was refuted) and exit 3 (the block does not exist) mean
/// nothing was committed; anything else (exit 4, "outcome unknown", a signal) may have committed.
pub fn classify_write_failure(code: i32, stderr: &str) -> WriteResult {
    let error = last_error_line(stderr);
    let message = if error.is_empty() { format!("exit {code}") } else { error };
    if matches!(code, 2 | 3) { WriteResult::Fail(message) } else { WriteResult::Info(message) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m x"), "time DEBUG x");
    }

    #[test]
    fn exits_2_and_3_are_failures_and_anything_else_unknown() {
        assert!(matches!(
            classify_write_failure(2, "error: gave up after 10 attempts: stale revision\n"),
            WriteResult::Fail(_)
        ));
        assert!(matches!(
            classify_write_failure(3, "not found: b1 (no such block; create it with --insert)\n"),
            WriteResult::Fail(_)
        ));
        assert!(matches!(
            classify_write_failure(
                4,
                "error: outcome unknown: the commit of x at revision 3 was sent and not confirmed: unavailable\n"
            ),
            WriteResult::Info(_)
        ));
        assert!(matches!(classify_write_failure(-1, ""), WriteResult::Info(_)));
    }
}
