//! # optimystic-core
//!
//! The data model, wire messages and extension traits of the Optimystic DB-P2P block repository.
//! This crate has no libp2p swarm, no tokio runtime and no storage engine: plugins implement its
//! traits and the node crate composes them. See `ARCHITECTURE.md` at the workspace root.

#![forbid(unsafe_code)]

pub mod apply;
pub mod canon;
pub mod check;
pub mod client;
pub mod consensus;
pub mod coordinator;
pub mod crypto;
pub mod error;
pub mod evidence;
pub mod keynet;
pub mod kv;
pub mod model;
pub mod network;
pub mod reads;
pub mod record;
pub mod registry;
pub mod repo;
pub mod storage;
pub mod sync;
pub mod time;
pub mod wire;

/// The version of this crate (the dynamic plugin ABI requires a plugin built against the same).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use check::{BatchFailure, Check, RejectCategory, RejectReason};
pub use error::{ErrorCode, RepoError, StorageError, TransformError};
pub use kv::{KvBlockStorage, KvStore, KvWrite};
pub use model::*;
pub use repo::{MessageOptions, ReadPromotion, Repo, Step, StorageRepo};
pub use storage::{BlockCommit, BlockValue, CommittedTransform, MetaWrite, RawStorage, StorageWrite};

/// Re-exported so plugins use the same version of the inventory crate.
pub use inventory;
/// Re-exported identity types (peer ids, keypairs).
pub use libp2p_identity as identity;
