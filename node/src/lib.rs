//! # optimystic-node
//!
//! The node crate: the libp2p [`host`] with the SPEC 3.1 frame [`codec`], the inbound
//! [`service`]s that connect the wire to a repository, a consensus and a sync handler, and the
//! persisted [`identity`] key.
//!
//! A node starts its host with [`host::Host::start`], builds its plugins over the returned
//! [`host::HostHandle`] (a `PeerNetwork` and `PeerRouting`), then installs its handlers with
//! [`host::HostHandle::set_handlers`].

pub mod bench;
pub mod cluster_up;
pub mod codec;
pub mod config;
pub mod demo;
pub mod error_text;
pub mod history;
pub mod host;
pub mod identity;
pub mod local_cluster;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod progress;
pub mod readiness;
pub mod service;
pub mod txn;

// Every bundled plugin crate must be named, or the linker drops it and `inventory` never sees it.
use optimystic_consensus_majority_2pc as _;
use optimystic_consensus_solo as _;
use optimystic_keynet_kademlia as _;
use optimystic_keynet_static as _;
use optimystic_storage_file as _;
use optimystic_storage_lmdb as _;
use optimystic_storage_memory as _;

/// The registry of every plugin bundled with the node (storage memory / file / lmdb, key networks
/// kademlia / static, consensus solo / majority-2pc). Add dynamic libraries with
/// `optimystic_dynamic_loader::load_all`.
pub fn link_bundled_plugins() -> optimystic_core::registry::Registry {
    optimystic_core::registry::Registry::linked()
}

pub use host::{Connectivity, Host, HostConfig, HostError, HostHandle};
pub use service::{Handlers, SyncHandler};
