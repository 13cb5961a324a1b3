//! The history file: one JSON object per line, each an invocation, a completion or a nemesis
//! event.
//!
//! An operation is an `invoke` line followed (eventually) by exactly one completion line with the
//! same `id`: `ok`, `fail` (certainly not applied) or `info` (outcome unknown: timed out, or an
//! error that may hide an applied write). An operation with no completion line (the harness
//! stopped) counts as `info`.
//!
//! Fields: `f` is `create`, `append` or `read`; `block` the block id; `value` for an append is
//! the appended string, for a completed read the block's `entries` array exactly as the node
//! returned it (newest first, because every append inserts at index 0; `null` when the block was
//! absent); `node` the harness's node number the request went through; `mode` (`quorum` or
//! `local`) for reads; `final` marks the reads of the final phase; `member` marks a final local
//! read through a node that is one of the block's cluster members; `wall_ms` is wall-clock
//! milliseconds since the Unix epoch and `mono_ns` monotonic nanoseconds since the harness
//! started (the checker orders operations by `mono_ns`).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a history line records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An operation starts.
    Invoke,
    /// It completed successfully.
    Ok,
    /// It certainly did not take effect.
    Fail,
    /// Its outcome is unknown.
    Info,
    /// A fault was injected or healed.
    Nemesis,
}

/// One history line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// What the line records.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The operation id (shared by an invocation and its completion).
    pub id: u64,
    /// Who ran it: `c<N>` for a client task, `sweep`, `final`, `setup`, `nemesis`.
    pub process: String,
    /// `create`, `append`, `read`, or a nemesis action.
    pub f: String,
    /// The block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    /// The appended value, or the entries a read returned (newest first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The node the request went through (or the nemesis's target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
    /// Read mode of a read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A read of the final phase.
    #[serde(default, rename = "final", skip_serializing_if = "std::ops::Not::not")]
    pub is_final: bool,
    /// Whether the node is one of the block's cluster members (final local reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<bool>,
    /// The committed revision (ok writes) or the block's latest revision (ok reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<u64>,
    /// Why an operation failed or is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Anything else (nemesis targets and durations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    /// Wall clock, ms since the Unix epoch.
    #[serde(default)]
    pub wall_ms: u64,
    /// Monotonic ns since the harness started.
    #[serde(default)]
    pub mono_ns: u64,
}

impl Event {
    /// A line with only the mandatory fields (times are set when it is written).
    pub fn new(kind: Kind, id: u64, process: impl Into<String>, f: impl Into<String>) -> Self {
        Self {
            kind,
            id,
            process: process.into(),
            f: f.into(),
            block: None,
            value: None,
            node: None,
            mode: None,
            is_final: false,
            member: None,
            rev: None,
            error: None,
            detail: None,
            wall_ms: 0,
            mono_ns: 0,
        }
    }
}

/// Appends events to the history file, one flushed line each, stamping the times.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderInner>>,
    start: Instant,
}

#[derive(Debug)]
struct RecorderInner {
    file: File,
    next_id: u64,
}

impl Recorder {
    /// Creates (truncates) the history file.
    pub fn create(path: &Path, start: Instant) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { inner: Arc::new(Mutex::new(RecorderInner { file, next_id: 1 })), start })
    }

    /// A fresh operation id.
    pub fn next_id(&self) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = inner.next_id;
        inner.next_id += 1;
        id
    }

    /// Monotonic ns since the harness started.
    pub fn mono_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Stamps and writes one event; returns it as written.
    pub fn record(&self, mut event: Event) -> Event {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Stamped under the lock, so the file is in monotonic order.
        event.mono_ns = self.mono_ns();
        event.wall_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        if let Ok(line) = serde_json::to_string(&event) {
            let _ = writeln!(inner.file, "{line}");
            let _ = inner.file.flush();
        }
        event
    }
}

/// Reads a history file (blank lines are skipped; a malformed line is an error).
pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut events = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a history event", path.display(), n + 1))?;
        events.push(event);
    }
    Ok(events)
}
