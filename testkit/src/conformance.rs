//! Storage conformance suite: every [`RawStorage`] engine runs it with one macro call.
//!
//! ```text
//! // tests/conformance.rs of a storage plugin
//! use std::sync::Arc;
//! use optimystic_testkit::conformance::Fixture;
//!
//! optimystic_testkit::storage_conformance!(|| async {
//!     let dir = tempfile::tempdir().expect("temp dir");
//!     let storage = MyStorage::open(dir.path()).await.expect("open");
//!     Fixture { storage: Arc::new(storage), guard: Box::new(dir) }
//! });
//! ```
//!
//! The macro expands to one `#[test]` per rule, named after the rule (so `cargo test` lists
//! `get_duplicate_ids_answered_once`, `commit_is_all_or_nothing`, ...). Each test builds a
//! multi-thread tokio runtime with two workers, asks the factory for a fresh [`Fixture`] and runs
//! the rule: a `pub async fn` of this module taking the fixture. A rule panics with a message
//! naming what failed.
//!
//! The rules check SPEC section 2 through a [`StorageRepo`] over the engine, the raw
//! [`RawStorage`] contract directly (atomic `commit_block`, idempotent deletes, metadata, paging,
//! opaque ids, values that round-trip untouched), reads at every old revision across checkpoint
//! windows, and random concurrent pend / commit / cancel on overlapping blocks.
//!
//! Environment variables:
//! - `OPTIMYSTIC_CONFORMANCE_SEED` — the seed of the concurrency rule's RNG (printed by every run,
//!   and in every failure message of that rule), to replay a failure.
//! - `OPTIMYSTIC_CONFORMANCE_OPS` — operations per task in the concurrency rule (default 50;
//!   lower it for slow durable engines, raise it for a soak run).
//!
//! [`StorageRepo`]: optimystic_core::repo::StorageRepo

// The suite is test code shipped in the library: a failed check must panic (that is how a test
// fails), and its inputs are fixed values written in this module, not untrusted data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use optimystic_core::storage::RawStorage;

mod commit;
mod concurrency;
mod get;
mod pend;
mod raw;
mod reads;
mod support;

pub use commit::*;
pub use concurrency::*;
pub use get::*;
pub use pend::*;
pub use raw::*;
pub use reads::*;

/// Environment variable holding the concurrency rule's RNG seed (a u64), to replay a failure.
pub const SEED_ENV: &str = "OPTIMYSTIC_CONFORMANCE_SEED";
/// Environment variable holding the number of operations per task of the concurrency rule.
pub const OPS_ENV: &str = "OPTIMYSTIC_CONFORMANCE_OPS";
/// Operations per task of the concurrency rule when [`OPS_ENV`] is not set.
pub const DEFAULT_OPS_PER_TASK: usize = 50;
/// Tasks of the concurrency rule.
pub const CONCURRENT_TASKS: usize = 8;

/// A fresh, empty store for one rule.
pub struct Fixture {
    /// The engine under test; empty when handed to a rule.
    pub storage: Arc<dyn RawStorage>,
    /// Whatever must live as long as the store (a temporary directory, a server handle); dropped
    /// after the rule, after the storage.
    pub guard: Box<dyn Any + Send + Sync>,
}

impl Fixture {
    /// A fixture with nothing to keep alive.
    pub fn new(storage: Arc<dyn RawStorage>) -> Self {
        Self { storage, guard: Box::new(()) }
    }

    /// A fixture that keeps `guard` alive as long as the store.
    pub fn with_guard(storage: Arc<dyn RawStorage>, guard: impl Any + Send + Sync) -> Self {
        Self { storage, guard: Box::new(guard) }
    }
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture").field("storage", &self.storage).finish_non_exhaustive()
    }
}

/// Runs one rule: builds a multi-thread tokio runtime with two workers, creates a fixture with
/// `factory` inside it and awaits `rule(fixture)`. Used by [`storage_conformance!`]; call it
/// directly to run a single rule with a custom fixture.
///
/// Panics when the runtime cannot be built or the rule fails.
///
/// [`storage_conformance!`]: crate::storage_conformance
pub fn run<F, Fut, R, RFut>(rule: &str, factory: F, body: R)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
    R: FnOnce(Fixture) -> RFut,
    RFut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("conformance rule {rule}: cannot build a tokio runtime: {e}"));
    runtime.block_on(async move {
        let fixture = factory().await;
        body(fixture).await;
    });
}

/// Expands to one `#[test]` per conformance rule for a storage engine.
///
/// The argument is a factory: any expression callable as `Fn() -> impl Future<Output = Fixture>`,
/// typically `|| async { Fixture { storage: Arc::new(MyStorage::new()), guard: Box::new(()) } }`.
/// It is called once per test and must return an empty store each time.
///
/// See [`testkit::conformance`](crate::conformance) for the rules and the environment
/// variables they read.
#[macro_export]
macro_rules! storage_conformance {
    ($factory:expr $(,)?) => {
        $crate::__storage_conformance_tests! {
            $factory;
            // get
            get_duplicate_ids_answered_once,
            get_omits_unknown_and_deleted_blocks,
            get_reads_at_context_rev,
            get_promotes_reported_commits_in_rev_order,
            get_reads_own_pending_writes,
            get_own_writes_require_pending_trx,
            get_reports_latest_and_pendings,
            // pend
            pend_rejects_insert_id_mismatch,
            pend_rejects_header_change,
            pend_rejects_missing_field,
            set_creates_a_missing_field,
            pend_rejects_splice_of_non_array,
            pend_rejects_splice_index_past_end,
            pend_rejects_unknown_block,
            pend_rejects_update_of_deleted_block,
            pend_stale_reports_missing_grouped_per_trx,
            pend_stale_only_when_rev_given_or_inserting,
            pend_policy_continue_pends_alongside,
            pend_policy_fail_lists_pending,
            pend_policy_return_includes_transforms,
            pend_same_transforms_again_is_noop,
            pend_different_transforms_is_conflict,
            pend_of_committed_trx_is_refused,
            // cancel
            cancel_removes_pending_and_is_idempotent,
            cancel_unknown_trx_is_ok,
            // commit
            commit_applies_pending_transform,
            commit_concurrent_multi_block_commits_do_not_deadlock,
            commit_again_is_idempotent,
            commit_stale_reports_missing_from_rev,
            commit_without_pending_is_error,
            commit_is_all_or_nothing,
            commit_with_a_revision_gap_is_refused_and_changes_nothing,
            commit_keeps_invariants,
            // reads at old revisions
            reads_at_every_revision_across_checkpoints,
            // the raw RawStorage contract
            raw_commit_block_refuses_non_advancing_rev,
            raw_commit_block_moves_pending_to_committed,
            raw_delete_pending_is_idempotent,
            raw_pending_round_trip,
            raw_revision_ranges,
            raw_meta_put_get_delete_list,
            raw_meta_long_keys,
            raw_meta_batch_applies_in_order,
            raw_apply_writes_a_step_in_order,
            raw_apply_refused_step,
            raw_block_ids_pagination,
            raw_ids_are_opaque,
            raw_values_round_trip,
            raw_stats_count_blocks,
            raw_close_is_idempotent,
            // concurrency
            concurrent_random_operations_keep_invariants,
        }
    };
}

/// Implementation detail of [`storage_conformance!`]: one test per listed rule.
#[doc(hidden)]
#[macro_export]
macro_rules! __storage_conformance_tests {
    ($factory:expr; $($rule:ident),* $(,)?) => {
        $(
            #[test]
            fn $rule() {
                $crate::conformance::run(
                    ::core::stringify!($rule),
                    $factory,
                    $crate::conformance::$rule,
                );
            }
        )*
    };
}
