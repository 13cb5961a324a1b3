//! # optimystic-node
//!
//! The node crate: the libp2p [`host`] with the SPEC 3.1 frame [`codec`], the inbound
//! [`service`]s that connect the wire to a repository, a consensus and a sync handler, and the
//! persisted [`identity`] key.
//!
//! A node starts its host with [`host::Host::start`], builds its plugins over the returned
//! [`host::HostHandle`] (a `PeerNetwork` and `PeerRouting`), then installs its handlers with
//! [`host::HostHandle::set_handlers`].

pub mod codec;
pub mod config;
pub mod host;
pub mod identity;
pub mod local_cluster;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod readiness;
pub mod service;
pub mod txn;

// Every bundled plugin crate must be named, or the linker drops it and `inventory` never sees it.
#[cfg(feature = "consensus-majority-2pc")]
use optimystic_consensus_majority_2pc as _;
#[cfg(feature = "consensus-solo")]
use optimystic_consensus_solo as _;
#[cfg(feature = "keynet-kademlia")]
use optimystic_keynet_kademlia as _;
#[cfg(feature = "keynet-static")]
use optimystic_keynet_static as _;
#[cfg(feature = "storage-file")]
use optimystic_storage_file as _;
#[cfg(feature = "storage-lmdb")]
use optimystic_storage_lmdb as _;
#[cfg(feature = "storage-memory")]
use optimystic_storage_memory as _;

/// The registry of every plugin bundled with the node whose cargo feature is on (storage memory /
/// file / lmdb, key networks kademlia / static, consensus solo / majority-2pc: all by default).
/// Add dynamic libraries with `optimystic_dynamic_loader::load_all`.
pub fn link_bundled_plugins() -> optimystic_core::registry::Registry {
    optimystic_core::registry::Registry::linked()
}

pub use host::{Connectivity, Host, HostConfig, HostError, HostHandle};
pub use service::{Handlers, SyncHandler};
