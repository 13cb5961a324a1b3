//! An Elle-style checker for the list-append history (see [`crate::history`]).
//!
//! Per block, every read returns the block's list; the appends insert at index 0, so a read's
//! `entries` reversed is the list in append order. The checks, in the order they are reported:
//!
//! 1. `duplicate` / `unexpected-value` / `failed-append-visible`: a read shows a value twice, a
//!    value nobody appended to that block, or a value whose append certainly failed (`write`
//!    applies at most once: a commit whose answer is lost is re-sent, never replaced).
//! 2. `incompatible-order`: all successful reads of a block, from any node, in any mode, at any
//!    time, are prefixes of one order (the longest read's): no two reads disagree on an order.
//! 3. `lost-append`: an acknowledged append is missing from a final read of some node.
//! 4. `stale-read`: a quorum read misses an append that was acknowledged before the read was
//!    invoked (quorum reads never miss an acknowledged commit).
//! 5. `future-read`: a read shows an append invoked only after the read had completed.
//! 6. `value-vanished`: a quorum read is shorter than a read that completed before it was
//!    invoked: something appeared and then vanished.
//! 7. `append-order`: an append acknowledged before another append was invoked sits after it
//!    (real-time order of appends).
//! 8. `final-divergence`: the final quorum reads through the live nodes differ; and
//!    `replica-divergence`: the final local read of a cluster member differs from them (SPEC 5.7).
//!    `no-final-read`: the final phase ran but no node answered a final read of the block.
//!
//! Appends whose outcome is unknown (`info`) may or may not appear; when they do they are held to
//! the same order rules as the others.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use serde_json::Value;

use crate::history::{Event, Kind};

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Acknowledged.
    Ok,
    /// Certainly not applied.
    Fail,
    /// Unknown (including no completion line).
    Info,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fail => "fail",
            Self::Info => "info",
        }
    }
}

/// An invocation and its completion.
#[derive(Clone, Debug)]
pub struct Op {
    /// The invocation line.
    pub invoke: Event,
    /// The completion line, if any.
    pub complete: Option<Event>,
}

impl Op {
    /// How it ended.
    pub fn status(&self) -> Status {
        match self.complete.as_ref().map(|c| c.kind) {
            Some(Kind::Ok) => Status::Ok,
            Some(Kind::Fail) => Status::Fail,
            _ => Status::Info,
        }
    }

    fn invoke_ns(&self) -> u64 {
        self.invoke.mono_ns
    }

    /// Completion time; `u64::MAX` when unknown.
    fn complete_ns(&self) -> u64 {
        self.complete.as_ref().map_or(u64::MAX, |c| c.mono_ns)
    }

    fn is_quorum(&self) -> bool {
        self.invoke.mode.as_deref().is_none_or(|m| m == "quorum")
    }

    fn is_local(&self) -> bool {
        self.invoke.mode.as_deref() == Some("local")
    }

    fn describe(&self) -> String {
        let mut s = serde_json::to_string(&self.invoke).unwrap_or_default();
        if let Some(c) = &self.complete {
            s.push_str("\n      ");
            s.push_str(&serde_json::to_string(c).unwrap_or_default());
        } else {
            s.push_str("\n      (no completion)");
        }
        s
    }
}

/// One violation.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Which rule.
    pub kind: &'static str,
    /// The block.
    pub block: String,
    /// What happened.
    pub message: String,
    /// The operations involved (invocation and completion lines).
    pub ops: Vec<String>,
}

/// Counts over the history.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Operations (invocations).
    pub ops: usize,
    /// Operations by `f/status`.
    pub by_kind: BTreeMap<String, usize>,
    /// Acknowledged appends.
    pub appends_ok: usize,
    /// Appends that certainly failed.
    pub appends_fail: usize,
    /// Appends with unknown outcome.
    pub appends_info: usize,
    /// Unknown appends that are in the final state.
    pub appends_info_present: usize,
    /// Successful reads (all modes, final included).
    pub reads_ok: usize,
    /// Final reads answered.
    pub final_reads_ok: usize,
    /// Final reads that failed.
    pub final_reads_failed: usize,
    /// Nemesis lines by action.
    pub nemesis: BTreeMap<String, usize>,
    /// Final list length per block.
    pub final_len: BTreeMap<String, usize>,
}

/// What the checker found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Totals.
    pub totals: Totals,
    /// Violations, in reporting order.
    pub violations: Vec<Violation>,
    /// Things worth knowing that are not violations.
    pub warnings: Vec<String>,
    /// Violations of kinds the caller chose to tolerate (`--allow`); they do not fail the check.
    pub tolerated: Vec<Violation>,
}

impl Report {
    /// True when no rule was broken.
    pub fn valid(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations by kind.
    pub fn violation_counts(&self) -> BTreeMap<&'static str, usize> {
        counts(&self.violations)
    }

    /// Moves the violations of the `allowed` kinds to [`Report::tolerated`].
    pub fn tolerate(&mut self, allowed: &[String]) {
        let (tolerated, kept): (Vec<Violation>, Vec<Violation>) =
            std::mem::take(&mut self.violations).into_iter().partition(|v| allowed.iter().any(|a| a == v.kind));
        self.violations = kept;
        self.tolerated.extend(tolerated);
    }

    /// The human summary: totals, then the first violation in full.
    pub fn render(&self) -> String {
        let t = &self.totals;
        let mut s = String::new();
        let _ = writeln!(s, "operations: {}", t.ops);
        for (k, n) in &t.by_kind {
            let _ = writeln!(s, "  {k}: {n}");
        }
        let _ = writeln!(
            s,
            "appends: {} acknowledged, {} failed, {} unknown ({} of them present at the end)",
            t.appends_ok, t.appends_fail, t.appends_info, t.appends_info_present
        );
        let _ = writeln!(
            s,
            "reads: {} ok; final reads: {} ok, {} failed",
            t.reads_ok, t.final_reads_ok, t.final_reads_failed
        );
        let nemesis: Vec<String> = t.nemesis.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = writeln!(s, "nemesis: {}", if nemesis.is_empty() { "none".into() } else { nemesis.join(" ") });
        let lens: Vec<String> = t.final_len.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = writeln!(s, "final list lengths: {}", if lens.is_empty() { "none".into() } else { lens.join(" ") });
        for w in self.warnings.iter().take(20) {
            let _ = writeln!(s, "warning: {w}");
        }
        if self.warnings.len() > 20 {
            let _ = writeln!(s, "warning: ... {} more", self.warnings.len() - 20);
        }
        if let Some(v) = self.tolerated.first() {
            let counts: Vec<String> = counts(&self.tolerated).iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(s, "tolerated violations (--allow): {} ({})", self.tolerated.len(), counts.join(" "));
            let _ = writeln!(s, "first tolerated: {} on block {}: {}", v.kind, v.block, v.message);
        }
        if let Some(v) = self.violations.first() {
            let counts: Vec<String> = self.violation_counts().iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(s, "VIOLATIONS: {} ({})", self.violations.len(), counts.join(" "));
            let _ = writeln!(s, "first violation: {} on block {}: {}", v.kind, v.block, v.message);
            for op in &v.ops {
                let _ = writeln!(s, "  op: {op}");
            }
            let mut shown = vec![v.kind];
            for other in &self.violations {
                if !shown.contains(&other.kind) {
                    shown.push(other.kind);
                    let _ = writeln!(s, "first {} on block {}: {}", other.kind, other.block, other.message);
                }
            }
        } else {
            let _ = writeln!(s, "valid: no violations");
        }
        s
    }
}

fn counts(violations: &[Violation]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for v in violations {
        *counts.entry(v.kind).or_insert(0) += 1;
    }
    counts
}

/// The list a read returned, in append order (`None` for a read that did not succeed).
fn read_list(op: &Op) -> Option<Vec<String>> {
    if op.status() != Status::Ok {
        return None;
    }
    let value = op.complete.as_ref()?.value.as_ref();
    let mut list: Vec<String> = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            items.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).collect()
        }
        Some(other) => vec![other.to_string()],
    };
    list.reverse();
    Some(list)
}

struct Read<'a> {
    op: &'a Op,
    list: Vec<String>,
}

struct Append<'a> {
    op: &'a Op,
    value: String,
}

/// Checks a history.
pub fn check(events: &[Event]) -> Report {
    let mut report = Report::default();
    let mut ops: BTreeMap<u64, Op> = BTreeMap::new();
    for event in events {
        match event.kind {
            Kind::Nemesis => {
                *report.totals.nemesis.entry(event.f.clone()).or_insert(0) += 1;
            }
            Kind::Invoke => {
                if ops.insert(event.id, Op { invoke: event.clone(), complete: None }).is_some() {
                    report.warnings.push(format!("operation id {} invoked twice; the later one is kept", event.id));
                }
            }
            Kind::Ok | Kind::Fail | Kind::Info => match ops.get_mut(&event.id) {
                Some(op) if op.complete.is_none() => op.complete = Some(event.clone()),
                Some(_) => report
                    .warnings
                    .push(format!("operation {} completed twice; the first completion is kept", event.id)),
                None => report.warnings.push(format!("completion of operation {} that was never invoked", event.id)),
            },
        }
    }
    report.totals.ops = ops.len();
    let mut blocks: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
    for op in ops.values() {
        *report.totals.by_kind.entry(format!("{}/{}", op.invoke.f, op.status().name())).or_insert(0) += 1;
        if let Some(block) = &op.invoke.block {
            blocks.entry(block.clone()).or_default().push(op);
        }
    }
    for (block, block_ops) in &blocks {
        check_block(block, block_ops, &mut report);
    }
    report
}

fn violation(report: &mut Report, kind: &'static str, block: &str, message: String, ops: &[&Op]) {
    report.violations.push(Violation {
        kind,
        block: block.to_owned(),
        message,
        ops: ops.iter().map(|o| o.describe()).collect(),
    });
}

fn check_block(block: &str, block_ops: &[&Op], report: &mut Report) {
    let mut appends: Vec<Append<'_>> = Vec::new();
    let mut by_value: HashMap<String, &Op> = HashMap::new();
    let mut reads: Vec<Read<'_>> = Vec::new();
    let mut final_reads_seen = false;
    for &op in block_ops {
        match op.invoke.f.as_str() {
            "append" => {
                let value = op
                    .invoke
                    .value
                    .as_ref()
                    .map_or_else(String::new, |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
                match op.status() {
                    Status::Ok => report.totals.appends_ok += 1,
                    Status::Fail => report.totals.appends_fail += 1,
                    Status::Info => report.totals.appends_info += 1,
                }
                if let Some(prev) = by_value.insert(value.clone(), op) {
                    violation(
                        report,
                        "duplicate-invocation",
                        block,
                        format!("value {value:?} was appended by two operations (a harness bug)"),
                        &[prev, op],
                    );
                }
                appends.push(Append { op, value });
            }
            "read" => {
                if op.invoke.is_final {
                    final_reads_seen = true;
                    if op.status() == Status::Ok {
                        report.totals.final_reads_ok += 1;
                    } else {
                        report.totals.final_reads_failed += 1;
                        let err = op
                            .complete
                            .as_ref()
                            .and_then(|c| c.error.clone())
                            .unwrap_or_else(|| "no completion".into());
                        report.warnings.push(format!(
                            "final {} read of {block} through node {} failed: {}",
                            op.invoke.mode.as_deref().unwrap_or("quorum"),
                            op.invoke.node.map_or_else(|| "?".into(), |n| n.to_string()),
                            err.lines().next().unwrap_or("")
                        ));
                    }
                }
                if let Some(list) = read_list(op) {
                    report.totals.reads_ok += 1;
                    reads.push(Read { op, list });
                }
            }
            _ => {}
        }
    }

    // 1. Per-read sanity (each bad value reported once, with the first read that shows it).
    let mut reported: HashSet<&str> = HashSet::new();
    for read in &reads {
        let mut seen = HashSet::new();
        for v in &read.list {
            if !seen.insert(v.as_str()) {
                if reported.insert(v.as_str()) {
                    let mut involved = vec![read.op];
                    let append = by_value.get(v).copied();
                    involved.extend(append);
                    let attempts: Vec<String> = append
                        .and_then(|a| a.complete.as_ref())
                        .and_then(|c| c.detail.as_ref())
                        .and_then(|d| d.get("failed_attempts"))
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(|r| r.as_str().unwrap_or_default().to_owned()).collect())
                        .unwrap_or_default();
                    let kind = "duplicate";
                    let attempts = if attempts.is_empty() {
                        String::new()
                    } else {
                        format!("; its write made failed attempts before: {attempts:?}")
                    };
                    let at: Vec<usize> =
                        read.list.iter().enumerate().filter(|(_, x)| *x == v).map(|(i, _)| i).collect();
                    violation(
                        report,
                        kind,
                        block,
                        format!(
                            "value {v:?} appears {} times in a read, at append positions {at:?} (oldest first){attempts}",
                            at.len()
                        ),
                        &involved,
                    );
                }
                continue;
            }
            match by_value.get(v) {
                None if reported.insert(v.as_str()) => {
                    violation(
                        report,
                        "unexpected-value",
                        block,
                        format!("a read shows {v:?}, which no operation appended to this block"),
                        &[read.op],
                    );
                }
                Some(w) if w.status() == Status::Fail && reported.insert(v.as_str()) => violation(
                    report,
                    "failed-append-visible",
                    block,
                    format!(
                        "a read shows {v:?}, whose append was reported failed: {}",
                        w.complete.as_ref().and_then(|c| c.error.clone()).unwrap_or_default()
                    ),
                    &[w, read.op],
                ),
                _ => {}
            }
        }
    }

    // 2. One order: every read is a prefix of the longest.
    let Some(longest) = reads.iter().max_by_key(|r| r.list.len()) else {
        if final_reads_seen {
            violation(
                report,
                "no-final-read",
                block,
                "no read of the block succeeded, final reads included".into(),
                &[],
            );
        }
        return;
    };
    let order: &[String] = &longest.list;
    let mut order_ok = true;
    for read in &reads {
        if let Some(i) = read.list.iter().zip(order).position(|(a, b)| a != b) {
            order_ok = false;
            violation(
                report,
                "incompatible-order",
                block,
                format!(
                    "two reads disagree at append position {i}: {:?} vs {:?} (lists in append order: {:?} vs {:?})",
                    read.list.get(i),
                    order.get(i),
                    read.list,
                    order
                ),
                &[read.op, longest.op],
            );
            break;
        }
    }
    let pos: HashMap<&str, usize> = order.iter().enumerate().map(|(i, v)| (v.as_str(), i)).collect();

    // 3. Final reads hold every acknowledged append.
    let final_quorum: Vec<&Read<'_>> = reads.iter().filter(|r| r.op.invoke.is_final && r.op.is_quorum()).collect();
    if final_reads_seen && final_quorum.is_empty() {
        let failed: Vec<&Op> =
            block_ops.iter().copied().filter(|o| o.invoke.is_final && o.invoke.f == "read").take(3).collect();
        violation(
            report,
            "no-final-read",
            block,
            "the final phase got no successful quorum read of this block through any node".into(),
            &failed,
        );
    }
    for fr in &final_quorum {
        let present: HashSet<&str> = fr.list.iter().map(String::as_str).collect();
        if let Some(w) = appends.iter().find(|a| a.op.status() == Status::Ok && !present.contains(a.value.as_str())) {
            violation(
                report,
                "lost-append",
                block,
                format!(
                    "acknowledged append {:?} is missing from the final read through node {:?} ({})",
                    w.value,
                    fr.op.invoke.node,
                    if fr.op.complete.as_ref().is_some_and(|c| c.value.as_ref().is_none_or(Value::is_null)) {
                        "the block is absent there".to_owned()
                    } else {
                        format!("{} entries", fr.list.len())
                    }
                ),
                &[w.op, fr.op],
            );
            break;
        }
    }
    if let Some(fr) = final_quorum.first() {
        let present: HashSet<&str> = fr.list.iter().map(String::as_str).collect();
        report.totals.appends_info_present +=
            appends.iter().filter(|a| a.op.status() == Status::Info && present.contains(a.value.as_str())).count();
        report.totals.final_len.insert(block.to_owned(), fr.list.len());
    }

    if order_ok {
        realtime_checks(block, &appends, &reads, &pos, report);
    }

    // 8. Final convergence.
    if let Some(first) = final_quorum.first() {
        if let Some(other) = final_quorum.iter().find(|r| r.list != first.list) {
            violation(
                report,
                "final-divergence",
                block,
                format!(
                    "final quorum reads differ: node {:?} has {} entries, node {:?} has {}",
                    first.op.invoke.node,
                    first.list.len(),
                    other.op.invoke.node,
                    other.list.len()
                ),
                &[first.op, other.op],
            );
        }
        for r in reads.iter().filter(|r| r.op.invoke.is_final && r.op.is_local() && r.op.invoke.member == Some(true)) {
            if r.list != first.list {
                violation(
                    report,
                    "replica-divergence",
                    block,
                    format!(
                        "after catch-up, cluster member node {:?} holds {} entries locally, the final quorum read {} (rev {:?} vs {:?})",
                        r.op.invoke.node,
                        r.list.len(),
                        first.list.len(),
                        r.op.complete.as_ref().and_then(|c| c.rev),
                        first.op.complete.as_ref().and_then(|c| c.rev)
                    ),
                    &[r.op, first.op],
                );
                break;
            }
        }
    }
}

/// Checks 4 to 7, given that every read is a prefix of `pos`'s order.
fn realtime_checks(
    block: &str,
    appends: &[Append<'_>],
    reads: &[Read<'_>],
    pos: &HashMap<&str, usize>,
    report: &mut Report,
) {
    // Acknowledged appends by completion time, with the running maximum of their positions
    // (usize::MAX when absent from every read).
    let mut acked: Vec<(u64, usize, &Append<'_>)> = appends
        .iter()
        .filter(|a| a.op.status() == Status::Ok)
        .map(|a| (a.op.complete_ns(), pos.get(a.value.as_str()).copied().unwrap_or(usize::MAX), a))
        .collect();
    acked.sort_by_key(|(t, _, _)| *t);
    let mut acked_max: Vec<(usize, usize)> = Vec::with_capacity(acked.len()); // (max pos, index of argmax)
    for (i, (_, p, _)) in acked.iter().enumerate() {
        let prev = acked_max.last().copied();
        acked_max.push(match prev {
            Some((m, j)) if m >= *p => (m, j),
            _ => (*p, i),
        });
    }
    // The acknowledged append with the greatest position among those completed before `t`.
    let latest_acked_before = |t: u64| -> Option<(usize, &Append<'_>)> {
        let n = acked.partition_point(|(c, _, _)| *c < t);
        let (m, j) = *acked_max.get(n.checked_sub(1)?)?;
        Some((m, acked.get(j)?.2))
    };

    // 4. Quorum reads see every append acknowledged before they were invoked.
    for read in reads.iter().filter(|r| r.op.is_quorum()) {
        if let Some((m, w)) = latest_acked_before(read.op.invoke_ns())
            && m >= read.list.len()
        {
            let what = if m == usize::MAX {
                "is in no read at all".to_owned()
            } else {
                format!("sits at append position {m}")
            };
            violation(
                report,
                "stale-read",
                block,
                format!(
                    "a quorum read through node {:?} returned {} entries but misses {:?}, acknowledged before the read was invoked (it {what})",
                    read.op.invoke.node,
                    read.list.len(),
                    w.value
                ),
                &[w.op, read.op],
            );
            break;
        }
    }

    // 5. No read shows an append invoked after it completed.
    let mut present: Vec<(u64, usize, &Append<'_>)> =
        appends.iter().filter_map(|a| pos.get(a.value.as_str()).map(|p| (a.op.invoke_ns(), *p, a))).collect();
    present.sort_by_key(|(t, _, _)| *t);
    let mut suffix_min: Vec<(usize, usize)> = vec![(usize::MAX, 0); present.len()];
    let mut best = (usize::MAX, 0);
    for i in (0..present.len()).rev() {
        if let Some((_, p, _)) = present.get(i)
            && *p < best.0
        {
            best = (*p, i);
        }
        if let Some(slot) = suffix_min.get_mut(i) {
            *slot = best;
        }
    }
    for read in reads {
        let t = read.op.complete_ns();
        let n = present.partition_point(|(i, _, _)| *i <= t);
        if let Some((m, j)) = suffix_min.get(n).copied()
            && m < read.list.len()
            && let Some((_, _, w)) = present.get(j)
        {
            violation(
                report,
                "future-read",
                block,
                format!(
                    "a read through node {:?} shows {:?}, whose append was invoked after the read completed",
                    read.op.invoke.node, w.value
                ),
                &[read.op, w.op],
            );
            break;
        }
    }

    // 6. Nothing vanishes: a quorum read is at least as long as every read that completed before it began.
    let mut by_complete: Vec<&Read<'_>> = reads.iter().collect();
    by_complete.sort_by_key(|r| r.op.complete_ns());
    let mut longest_before: Vec<usize> = Vec::with_capacity(by_complete.len()); // index of the longest so far
    for (i, r) in by_complete.iter().enumerate() {
        let prev = longest_before.last().copied();
        longest_before.push(match prev {
            Some(j) if by_complete.get(j).is_some_and(|b| b.list.len() >= r.list.len()) => j,
            _ => i,
        });
    }
    for read in reads.iter().filter(|r| r.op.is_quorum()) {
        let n = by_complete.partition_point(|r| r.op.complete_ns() < read.op.invoke_ns());
        if let Some(earlier) = n.checked_sub(1).and_then(|k| longest_before.get(k)).and_then(|j| by_complete.get(*j))
            && earlier.list.len() > read.list.len()
        {
            violation(
                report,
                "value-vanished",
                block,
                format!(
                    "a quorum read through node {:?} returned {} entries, but a read completed before it was invoked had already returned {} (missing now: {:?})",
                    read.op.invoke.node,
                    read.list.len(),
                    earlier.list.len(),
                    earlier.list.get(read.list.len())
                ),
                &[earlier.op, read.op],
            );
            break;
        }
    }

    // 7. Real-time order of appends.
    for a in appends {
        let Some(p) = pos.get(a.value.as_str()).copied() else {
            continue;
        };
        if let Some((m, w)) = latest_acked_before(a.op.invoke_ns())
            && m != usize::MAX
            && m > p
        {
            violation(
                report,
                "append-order",
                block,
                format!(
                    "{:?} (position {m}) was acknowledged before {:?} (position {p}) was invoked, yet comes after it",
                    w.value, a.value
                ),
                &[w.op, a.op],
            );
            break;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::too_many_arguments)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Builds small histories; times are in ms.
    #[derive(Default)]
    struct H {
        events: Vec<Event>,
        next: u64,
    }

    fn ev(kind: Kind, id: u64, f: &str, block: &str, t: u64) -> Event {
        let mut e = Event::new(kind, id, "c1", f);
        e.block = Some(block.into());
        e.mono_ns = t * 1_000_000;
        e
    }

    impl H {
        fn id(&mut self) -> u64 {
            self.next += 1;
            self.next
        }

        fn append(&mut self, block: &str, v: &str, t0: u64, t1: u64, outcome: Kind) -> &mut Self {
            let id = self.id();
            let mut i = ev(Kind::Invoke, id, "append", block, t0);
            i.value = Some(json!(v));
            let mut c = ev(outcome, id, "append", block, t1);
            c.value = Some(json!(v));
            self.events.push(i);
            self.events.push(c);
            self
        }

        /// `list` in append order (it is stored newest first, as nodes return it).
        fn read_full(
            &mut self,
            block: &str,
            list: &[&str],
            t0: u64,
            t1: u64,
            node: usize,
            is_final: bool,
            mode: &str,
            member: Option<bool>,
        ) -> &mut Self {
            let id = self.id();
            let mut i = ev(Kind::Invoke, id, "read", block, t0);
            i.node = Some(node);
            i.is_final = is_final;
            i.mode = Some(mode.into());
            i.member = member;
            let mut c = i.clone();
            c.kind = Kind::Ok;
            c.mono_ns = t1 * 1_000_000;
            let newest_first: Vec<&str> = list.iter().rev().copied().collect();
            c.value = Some(json!(newest_first));
            self.events.push(i);
            self.events.push(c);
            self
        }

        fn read(&mut self, block: &str, list: &[&str], t0: u64, t1: u64) -> &mut Self {
            self.read_full(block, list, t0, t1, 0, false, "quorum", None)
        }

        fn finals(&mut self, block: &str, list: &[&str], t: u64, nodes: usize) -> &mut Self {
            for n in 0..nodes {
                self.read_full(block, list, t, t + 1, n, true, "quorum", None);
            }
            self
        }

        fn check(&self) -> Report {
            check(&self.events)
        }
    }

    fn kinds(r: &Report) -> Vec<&'static str> {
        r.violations.iter().map(|v| v.kind).collect()
    }

    fn valid_history() -> H {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok)
            .read("b", &["1"], 11, 12)
            .append("b", "2", 12, 20, Kind::Ok)
            .append("b", "3", 13, 25, Kind::Info) // concurrent, unknown, present
            .read("b", &["1", "2"], 21, 22)
            .append("b", "4", 30, 31, Kind::Info) // unknown, absent
            .append("b", "5", 30, 31, Kind::Fail) // failed, absent
            .read("b", &["1", "2", "3"], 26, 40)
            .append("c", "x", 0, 5, Kind::Ok)
            .read("c", &[], 0, 1) // concurrent with the append: may miss it
            .finals("b", &["1", "2", "3"], 100, 3)
            .finals("c", &["x"], 100, 3)
            .read_full("b", &["1", "2", "3"], 110, 111, 1, true, "local", Some(true))
            .read_full("b", &["1"], 110, 111, 4, true, "local", Some(false)); // not a member: not compared
        h
    }

    #[test]
    fn a_valid_history_passes() {
        let r = valid_history().check();
        assert!(r.valid(), "{}", r.render());
        assert_eq!(r.totals.appends_ok, 3);
        assert_eq!(r.totals.appends_fail, 1);
        assert_eq!(r.totals.appends_info, 2);
        assert_eq!(r.totals.appends_info_present, 1);
        assert_eq!(r.totals.final_len.get("b"), Some(&3));
    }

    #[test]
    fn history_round_trips_through_json_lines() {
        let h = valid_history();
        let text: String = h.events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, text).unwrap();
        let events = crate::history::load(&path).unwrap();
        assert_eq!(events, h.events);
        assert!(check(&events).valid());
    }

    #[test]
    fn a_lost_acknowledged_append_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).append("b", "2", 0, 10, Kind::Ok).finals("b", &["1"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r)[0], "lost-append", "{}", r.render());
    }

    #[test]
    fn an_append_lost_on_one_node_only_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).read_full("b", &["1"], 100, 101, 0, true, "quorum", None).read_full(
            "b",
            &[],
            100,
            101,
            1,
            true,
            "quorum",
            None,
        );
        let r = h.check();
        assert!(kinds(&r).contains(&"lost-append"), "{}", r.render());
    }

    #[test]
    fn a_duplicate_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).append("b", "2", 0, 10, Kind::Ok).finals("b", &["1", "2", "1"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r)[0], "duplicate", "{}", r.render());
    }

    #[test]
    fn a_visible_failed_append_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Fail).finals("b", &["1"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r)[0], "failed-append-visible", "{}", r.render());
    }

    #[test]
    fn a_value_nobody_appended_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).finals("b", &["1", "zz"], 100, 1);
        let r = h.check();
        assert_eq!(kinds(&r)[0], "unexpected-value", "{}", r.render());
    }

    #[test]
    fn two_orders_are_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).append("b", "2", 0, 10, Kind::Ok).read("b", &["2", "1"], 11, 12).finals(
            "b",
            &["1", "2"],
            100,
            2,
        );
        let r = h.check();
        assert_eq!(kinds(&r)[0], "incompatible-order", "{}", r.render());
    }

    #[test]
    fn a_stale_quorum_read_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).read("b", &[], 11, 12).finals("b", &["1"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r), vec!["stale-read"], "{}", r.render());
    }

    #[test]
    fn a_stale_local_read_is_allowed() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).read_full("b", &[], 11, 12, 0, false, "local", None).finals(
            "b",
            &["1"],
            100,
            2,
        );
        assert!(h.check().valid());
    }

    #[test]
    fn a_vanishing_value_is_found() {
        // "2" is unknown (never acknowledged), seen by one read and missing from a later one.
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok)
            .append("b", "2", 11, 60, Kind::Info)
            .read("b", &["1", "2"], 20, 21)
            .read("b", &["1"], 30, 31)
            .finals("b", &["1", "2"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r), vec!["value-vanished"], "{}", r.render());
    }

    #[test]
    fn a_read_from_the_future_is_found() {
        let mut h = H::default();
        h.read("b", &["1"], 0, 5).append("b", "1", 10, 20, Kind::Ok).finals("b", &["1"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r), vec!["future-read"], "{}", r.render());
    }

    #[test]
    fn appends_out_of_real_time_order_are_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).append("b", "2", 20, 30, Kind::Ok).finals("b", &["2", "1"], 100, 2);
        let r = h.check();
        assert_eq!(kinds(&r), vec!["append-order"], "{}", r.render());
    }

    #[test]
    fn appends_acknowledged_after_a_read_come_after_its_last_element() {
        // The read completed at 12 with ["1"]; "2" was invoked at 13, so it cannot be before "1".
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok).read("b", &["1"], 11, 12).append("b", "2", 13, 20, Kind::Ok).finals(
            "b",
            &["2", "1"],
            100,
            2,
        );
        let r = h.check();
        assert!(!r.valid(), "{}", r.render());
        assert!(matches!(kinds(&r)[0], "incompatible-order" | "append-order"), "{}", r.render());
    }

    #[test]
    fn diverging_final_reads_are_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok)
            .append("b", "2", 0, 10, Kind::Info)
            .read_full("b", &["1", "2"], 100, 101, 0, true, "quorum", None)
            .read_full("b", &["1"], 100, 101, 1, true, "quorum", None);
        let r = h.check();
        assert_eq!(kinds(&r), vec!["final-divergence"], "{}", r.render());
    }

    #[test]
    fn a_diverging_member_replica_is_found() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok)
            .append("b", "2", 0, 10, Kind::Info)
            .finals("b", &["1", "2"], 100, 3)
            .read_full("b", &["1"], 110, 111, 2, true, "local", Some(true));
        let r = h.check();
        assert_eq!(kinds(&r), vec!["replica-divergence"], "{}", r.render());
    }

    #[test]
    fn a_block_with_no_final_read_is_reported() {
        let mut h = H::default();
        h.append("b", "1", 0, 10, Kind::Ok);
        let id = h.id();
        let mut i = ev(Kind::Invoke, id, "read", "b", 100);
        i.is_final = true;
        let mut c = i.clone();
        c.kind = Kind::Fail;
        c.error = Some("unavailable".into());
        h.events.push(i);
        h.events.push(c);
        let r = h.check();
        assert_eq!(kinds(&r), vec!["no-final-read"], "{}", r.render());
    }

    #[test]
    fn nemesis_events_are_counted() {
        let mut h = valid_history();
        h.events.push(Event::new(Kind::Nemesis, 0, "nemesis", "kill"));
        h.events.push(Event::new(Kind::Nemesis, 0, "nemesis", "kill"));
        let r = h.check();
        assert_eq!(r.totals.nemesis.get("kill"), Some(&2));
    }
}
