//! `optimystic history`: a block's committed revisions as one peer holds them, each with the
//! evidence the peer keeps for it (the decided pend and commit records, SPEC 4.10), read page by
//! page over the sync protocol (`revisions` requests, the ones catch-up uses).
//!
//! Three ways to print a revision: [`text`] for people, [`json_line`] (one JSON object per
//! revision) for tools, and [`records`] (each evidence record on its own line) for
//! `optimystic verify-record`.

use std::time::Duration;

use libp2p::PeerId;
use optimystic_core::evidence::Evidence;
use optimystic_core::model::BlockId;
use optimystic_core::network::{PeerNetwork, ProtocolKind};
use optimystic_core::record::{ClusterRecord, count_approvals};
use optimystic_core::sync::{MAX_SYNC_ENTRIES, MAX_SYNC_PAGES, RevisionsResponse, SyncEntry, SyncRequest};
use optimystic_core::{RepoError, TrxRev};
use serde_json::{Value, json};

/// Why the history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The request failed (network, or an error answer from the peer).
    #[error(transparent)]
    Request(#[from] RepoError),
    /// The peer's answer is not a page of revisions in order.
    #[error("malformed history from {peer}: {detail}")]
    Malformed {
        /// The peer.
        peer: PeerId,
        /// What is wrong.
        detail: String,
    },
}

/// Reads a block's revisions from one peer, a page at a time (at most [`MAX_SYNC_ENTRIES`]
/// revisions and [`MAX_SYNC_PAGES`] pages).
#[derive(Debug)]
pub struct Pages<'a> {
    network: &'a dyn PeerNetwork,
    peer: PeerId,
    block_id: BlockId,
    timeout: Duration,
    /// The next page starts after this revision (`None`: from the first).
    after_rev: Option<u64>,
    /// The peer's latest revision, once a page told it.
    latest: Option<TrxRev>,
    pages: usize,
    done: bool,
}

impl<'a> Pages<'a> {
    /// The revisions of `block_id` held by `peer`, from revision `from_rev` on (0 or 1: all), each
    /// request within `timeout`.
    pub fn new(
        network: &'a dyn PeerNetwork,
        peer: PeerId,
        block_id: BlockId,
        from_rev: u64,
        timeout: Duration,
    ) -> Self {
        let after_rev = from_rev.checked_sub(1).filter(|r| *r > 0);
        Self { network, peer, block_id, timeout, after_rev, latest: None, pages: 0, done: false }
    }

    /// The peer's latest revision of the block, as the last page read reported it (`None` before
    /// the first page, or when the peer holds no revision of the block).
    pub fn latest(&self) -> Option<&TrxRev> {
        self.latest.as_ref()
    }

    /// The next page of revisions, ascending; `None` when there are no more.
    pub async fn next(&mut self) -> Result<Option<Vec<SyncEntry>>, HistoryError> {
        if self.done || self.pages >= MAX_SYNC_PAGES {
            return Ok(None);
        }
        let request = SyncRequest::Revisions {
            block_id: self.block_id.clone(),
            after_rev: self.after_rev,
            limit: MAX_SYNC_ENTRIES,
            latest: None,
            proven: None,
        };
        let request =
            serde_json::to_value(request).map_err(|e| self.malformed(format!("encoding the request: {e}")))?;
        let answer = self
            .network
            .request(self.peer, ProtocolKind::Sync, request, self.timeout)
            .await
            .map_err(RepoError::from)?;
        let page: RevisionsResponse = serde_json::from_value(answer).map_err(|e| self.malformed(e.to_string()))?;
        self.pages += 1;
        self.latest = page.latest;
        // Ascending and contiguous, starting right after the revision asked for.
        let first = page.entries.first().map_or(0, |e| e.rev);
        let mut expected = self.after_rev.map_or(first, |r| r.saturating_add(1));
        for entry in &page.entries {
            if entry.rev != expected {
                return Err(self.malformed(format!("revision {} where {expected} was due", entry.rev)));
            }
            expected = expected.saturating_add(1);
        }
        if let Some(last) = page.entries.last() {
            self.after_rev = Some(last.rev);
        }
        self.done = !page.more || page.entries.is_empty();
        Ok((!page.entries.is_empty()).then_some(page.entries))
    }

    fn malformed(&self, detail: String) -> HistoryError {
        HistoryError::Malformed { peer: self.peer, detail }
    }
}

/// The evidence records of a revision, pend first: each a `ClusterRecord` JSON value as the peer
/// keeps it, which `optimystic verify-record` reads one per line.
pub fn records(entry: &SyncEntry) -> Vec<&Value> {
    match &entry.evidence {
        Some(Evidence { pend, commit }) => pend.iter().chain(std::iter::once(commit)).collect(),
        None => Vec::new(),
    }
}

/// One revision as one JSON object: `{"blockId", "rev", "trxId", "transform", "evidence":
/// {"pend", "commit"} | null}`.
pub fn json_line(block_id: &BlockId, entry: &SyncEntry) -> Value {
    json!({
        "blockId": block_id,
        "rev": entry.rev,
        "trxId": entry.trx_id,
        "transform": entry.transform,
        "evidence": entry.evidence,
    })
}

/// One revision for people: `rev <n> trx <id>`, the transform, and a line per evidence record
/// (its message hash and approving votes).
pub fn text(entry: &SyncEntry) -> String {
    let transform = serde_json::to_string(&entry.transform).unwrap_or_else(|e| format!("(unprintable: {e})"));
    let mut out = format!("rev {} trx {}\n  transform {transform}\n", entry.rev, entry.trx_id);
    match &entry.evidence {
        None => out.push_str("  evidence none kept (a solo node's revision, or one caught up by quorum agreement)\n"),
        Some(evidence) => {
            if evidence.pend.is_none() {
                out.push_str("  evidence pend record not kept\n");
            }
            for (what, record) in
                evidence.pend.iter().map(|r| ("pend", r)).chain(std::iter::once(("commit", &evidence.commit)))
            {
                out.push_str(&format!("  evidence {what} {}\n", record_summary(what, record)));
            }
        }
    }
    out
}

/// A pend record: `<messageHash> (<approving promises> of <peers> peers promised)`; a commit
/// record: `<messageHash> (<commit votes> of <peers> peers committed, <promises> promised)`.
fn record_summary(what: &str, record: &Value) -> String {
    match ClusterRecord::from_value(record.clone()) {
        Ok(r) => {
            let (hash, peers, promises) = (&r.message_hash, r.peers.len(), count_approvals(&r.promises));
            if what == "commit" {
                let commits = count_approvals(&r.commits);
                format!("{hash} ({commits} of {peers} peers committed, {promises} promised)")
            } else {
                format!("{hash} ({promises} of {peers} peers promised)")
            }
        }
        Err(e) => format!("unreadable record: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use optimystic_core::model::{Transform, TrxId};

    use super::*;

    fn vector() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../core/tests/vectors/cluster-record-example.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn entry(evidence: Option<Evidence>) -> SyncEntry {
        SyncEntry { trx_id: TrxId::new("t1").unwrap(), rev: 2, transform: Transform::default(), evidence }
    }

    #[test]
    fn records_come_pend_first_one_per_line_and_text_names_their_hashes() {
        let record = vector();
        let both = entry(Some(Evidence { pend: Some(record.clone()), commit: record.clone() }));
        assert_eq!(records(&both), vec![&record, &record]);
        let hash = record["messageHash"].as_str().unwrap();
        let shown = text(&both);
        assert!(shown.starts_with("rev 2 trx t1\n  transform {}\n"), "{shown}");
        assert_eq!(shown.matches(hash).count(), 2, "{shown}");

        let pend_line = shown.lines().find(|l| l.starts_with("  evidence pend ")).unwrap();
        assert!(pend_line.ends_with("peers promised)"), "{shown}");
        let commit_line = shown.lines().find(|l| l.starts_with("  evidence commit ")).unwrap();
        assert!(commit_line.contains("peers committed, ") && commit_line.ends_with(" promised)"), "{shown}");

        let commit_only = entry(Some(Evidence { pend: None, commit: record.clone() }));
        assert_eq!(records(&commit_only), vec![&record]);
        assert!(text(&commit_only).contains("pend record not kept"));

        let none = entry(None);
        assert!(records(&none).is_empty());
        assert!(text(&none).contains("evidence none kept"));
        let line = json_line(&BlockId::new("diary").unwrap(), &none);
        assert_eq!(line, json!({"blockId": "diary", "rev": 2, "trxId": "t1", "transform": {}, "evidence": null}));
    }
}
