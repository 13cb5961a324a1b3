//! The plugin registry: plugins describe themselves with [`inventory::submit!`] and the node builds
//! them by name from configuration.
//!
//! A plugin crate registers a static [`PluginDescriptor`]:
//!
//! ```text
//! inventory::submit! {
//!     optimystic_core::registry::PluginDescriptor::storage("memory", "in-memory storage", build)
//! }
//! ```
//!
//! `inventory` only sees crates that are linked: a binary must name every bundled plugin crate
//! (`use optimystic_storage_memory as _;`). Dynamic plugins are added at run time with
//! [`Registry::add`].

use std::path::PathBuf;
use std::sync::Arc;

use libp2p_identity::{Keypair, PeerId};
use serde_json::Value;

use crate::consensus::Consensus;
use crate::error::StorageError;
use crate::keynet::{KeyNetwork, PeerRouting};
use crate::network::PeerNetwork;
use crate::repo::StorageRepo;
use crate::storage::RawStorage;

/// What a plugin may need from the node that builds it. Fields are `None` when the node has not
/// built that part yet (storage is built first, then the key network, then consensus).
#[derive(Clone, Debug)]
pub struct PluginContext {
    /// This node's peer id.
    pub local_peer_id: PeerId,
    /// This node's identity key (signs consensus votes).
    pub keypair: Option<Keypair>,
    /// The node's data directory; `None` for ephemeral nodes.
    pub data_dir: Option<PathBuf>,
    /// The transport to other peers.
    pub network: Option<Arc<dyn PeerNetwork>>,
    /// The DHT view.
    pub routing: Option<Arc<dyn PeerRouting>>,
    /// The built storage engine.
    pub storage: Option<Arc<dyn RawStorage>>,
    /// The local repository over that storage.
    pub local_repo: Option<StorageRepo>,
    /// The built key network.
    pub key_network: Option<Arc<dyn KeyNetwork>>,
    /// Where a consensus reports that this node is behind on a block (the node catches it up).
    pub behind: Option<Arc<dyn crate::consensus::BehindSink>>,
}

impl PluginContext {
    /// A context knowing only the local peer id.
    pub fn new(local_peer_id: PeerId) -> Self {
        Self {
            local_peer_id,
            keypair: None,
            data_dir: None,
            network: None,
            routing: None,
            storage: None,
            local_repo: None,
            key_network: None,
            behind: None,
        }
    }

    /// A required part, or [`PluginError::Missing`].
    pub fn require<'a, T>(&'a self, part: &'a Option<T>, what: &'static str) -> Result<&'a T, PluginError> {
        part.as_ref().ok_or(PluginError::Missing(what))
    }
}

/// The kinds of plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    /// A [`RawStorage`] engine.
    Storage,
    /// A [`KeyNetwork`].
    KeyNetwork,
    /// A [`Consensus`].
    Consensus,
}

impl PluginKind {
    /// The kind as printed and configured: `storage`, `key-network`, `consensus`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Storage => "storage",
            Self::KeyNetwork => "key-network",
            Self::Consensus => "consensus",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds a storage engine from its configuration section.
pub type StorageBuilder = Arc<dyn Fn(&PluginContext, &Value) -> Result<Arc<dyn RawStorage>, PluginError> + Send + Sync>;
/// Builds a key network from its configuration section.
pub type KeyNetworkBuilder =
    Arc<dyn Fn(&PluginContext, &Value) -> Result<Arc<dyn KeyNetwork>, PluginError> + Send + Sync>;
/// Builds a consensus from its configuration section.
pub type ConsensusBuilder =
    Arc<dyn Fn(&PluginContext, &Value) -> Result<Arc<dyn Consensus>, PluginError> + Send + Sync>;

/// How to build a plugin.
#[derive(Clone)]
pub enum Builder {
    /// A storage engine.
    Storage(StorageBuilder),
    /// A key network.
    KeyNetwork(KeyNetworkBuilder),
    /// A consensus.
    Consensus(ConsensusBuilder),
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Builder({})", self.kind())
    }
}

impl Builder {
    /// The kind of plugin this builds.
    pub fn kind(&self) -> PluginKind {
        match self {
            Self::Storage(_) => PluginKind::Storage,
            Self::KeyNetwork(_) => PluginKind::KeyNetwork,
            Self::Consensus(_) => PluginKind::Consensus,
        }
    }
}

/// A static storage build function.
pub type StorageBuildFn = fn(&PluginContext, &Value) -> Result<Arc<dyn RawStorage>, PluginError>;
/// A static key-network build function.
pub type KeyNetworkBuildFn = fn(&PluginContext, &Value) -> Result<Arc<dyn KeyNetwork>, PluginError>;
/// A static consensus build function.
pub type ConsensusBuildFn = fn(&PluginContext, &Value) -> Result<Arc<dyn Consensus>, PluginError>;

/// A plugin's option defaults: every option that has a fixed default, as the plugin's builder
/// reads it (`kind` excluded). Only shown (`optimystic config show`); the builder applies its
/// defaults itself.
pub type DefaultsFn = fn() -> serde_json::Map<String, Value>;

/// Static build functions, as a plugin crate submits them.
#[derive(Clone, Copy, Debug)]
pub enum StaticBuilder {
    /// A storage engine.
    Storage(StorageBuildFn),
    /// A key network.
    KeyNetwork(KeyNetworkBuildFn),
    /// A consensus.
    Consensus(ConsensusBuildFn),
}

/// A plugin's static descriptor, submitted with `inventory::submit!`.
#[derive(Clone, Copy)]
pub struct PluginDescriptor {
    /// The name configuration uses (`memory`, `lmdb`, `kademlia`, ...).
    pub name: &'static str,
    /// One line for `optimystic plugins`.
    pub description: &'static str,
    /// How to build it.
    pub builder: StaticBuilder,
    /// Its option defaults, if it declares them ([`PluginDescriptor::with_defaults`]).
    pub defaults: Option<DefaultsFn>,
}

impl std::fmt::Debug for PluginDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDescriptor").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PluginDescriptor {
    /// A storage plugin.
    pub const fn storage(name: &'static str, description: &'static str, build: StorageBuildFn) -> Self {
        Self { name, description, builder: StaticBuilder::Storage(build), defaults: None }
    }

    /// A key-network plugin.
    pub const fn key_network(name: &'static str, description: &'static str, build: KeyNetworkBuildFn) -> Self {
        Self { name, description, builder: StaticBuilder::KeyNetwork(build), defaults: None }
    }

    /// A consensus plugin.
    pub const fn consensus(name: &'static str, description: &'static str, build: ConsensusBuildFn) -> Self {
        Self { name, description, builder: StaticBuilder::Consensus(build), defaults: None }
    }

    /// The same descriptor, declaring its option defaults (shown by `optimystic config show`).
    #[must_use]
    pub const fn with_defaults(self, defaults: DefaultsFn) -> Self {
        Self { defaults: Some(defaults), ..self }
    }
}

inventory::collect!(PluginDescriptor);

/// Errors building a plugin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// No plugin of that kind has that name.
    #[error("no {kind} plugin named {name:?}; registered {kind} plugins: {}", available.join(", "))]
    Unknown {
        /// The kind asked for.
        kind: PluginKind,
        /// The name asked for.
        name: String,
        /// The names registered for that kind.
        available: Vec<String>,
    },
    /// Two plugins of one kind share a name.
    #[error("a {kind} plugin named {name:?} is already registered")]
    Duplicate {
        /// The kind.
        kind: PluginKind,
        /// The name.
        name: String,
    },
    /// The plugin's configuration section is invalid.
    #[error("invalid configuration for {plugin}: {message}")]
    Config {
        /// The plugin.
        plugin: String,
        /// What is wrong.
        message: String,
    },
    /// The plugin needs a part of the node that was not provided.
    #[error("the plugin needs {0}, which the node did not provide")]
    Missing(&'static str),
    /// The storage engine failed to open.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Loading a dynamic plugin failed.
    #[error("dynamic plugin {path}: {message}")]
    Dynamic {
        /// The library.
        path: String,
        /// What failed.
        message: String,
    },
}

/// One registered plugin.
#[derive(Clone, Debug)]
pub struct PluginEntry {
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Where it came from: `builtin` or a library path.
    pub origin: String,
    /// How to build it.
    pub builder: Builder,
    /// Its option defaults (empty when it declares none).
    pub defaults: serde_json::Map<String, Value>,
}

impl PluginEntry {
    /// Its kind.
    pub fn kind(&self) -> PluginKind {
        self.builder.kind()
    }
}

/// Every plugin known to the process: the linked ones, plus dynamic ones added at run time.
#[derive(Clone, Debug)]
pub struct Registry {
    entries: Vec<PluginEntry>,
}

impl Registry {
    /// The plugins linked into this binary (collected by `inventory`), sorted by kind and name.
    pub fn linked() -> Self {
        let mut entries: Vec<PluginEntry> = inventory::iter::<PluginDescriptor>
            .into_iter()
            .map(|d| PluginEntry {
                name: d.name.to_owned(),
                description: d.description.to_owned(),
                origin: "builtin".to_owned(),
                builder: match d.builder {
                    StaticBuilder::Storage(f) => Builder::Storage(Arc::new(f)),
                    StaticBuilder::KeyNetwork(f) => Builder::KeyNetwork(Arc::new(f)),
                    StaticBuilder::Consensus(f) => Builder::Consensus(Arc::new(f)),
                },
                defaults: d.defaults.map(|f| f()).unwrap_or_default(),
            })
            .collect();
        entries.sort_by(|a, b| (a.kind(), &a.name).cmp(&(b.kind(), &b.name)));
        entries.dedup_by(|a, b| a.kind() == b.kind() && a.name == b.name);
        Self { entries }
    }

    /// Adds a plugin; a second plugin of the same kind and name is refused.
    pub fn add(&mut self, entry: PluginEntry) -> Result<(), PluginError> {
        if self.find(entry.kind(), &entry.name).is_some() {
            return Err(PluginError::Duplicate { kind: entry.kind(), name: entry.name });
        }
        self.entries.push(entry);
        self.entries.sort_by(|a, b| (a.kind(), &a.name).cmp(&(b.kind(), &b.name)));
        Ok(())
    }

    /// Every registered plugin, sorted by kind and name.
    pub fn entries(&self) -> &[PluginEntry] {
        &self.entries
    }

    /// The names registered for a kind.
    pub fn names(&self, kind: PluginKind) -> Vec<String> {
        self.entries.iter().filter(|e| e.kind() == kind).map(|e| e.name.clone()).collect()
    }

    /// The option defaults of the plugin `name` of `kind` (`None`: no such plugin).
    pub fn defaults(&self, kind: PluginKind, name: &str) -> Option<&serde_json::Map<String, Value>> {
        self.find(kind, name).map(|e| &e.defaults)
    }

    fn find(&self, kind: PluginKind, name: &str) -> Option<&PluginEntry> {
        self.entries.iter().find(|e| e.kind() == kind && e.name == name)
    }

    fn lookup(&self, kind: PluginKind, name: &str) -> Result<&PluginEntry, PluginError> {
        self.find(kind, name).ok_or_else(|| PluginError::Unknown {
            kind,
            name: name.to_owned(),
            available: self.names(kind),
        })
    }

    /// Builds the storage plugin `name`.
    pub fn build_storage(
        &self,
        name: &str,
        cx: &PluginContext,
        config: &Value,
    ) -> Result<Arc<dyn RawStorage>, PluginError> {
        match &self.lookup(PluginKind::Storage, name)?.builder {
            Builder::Storage(build) => build(cx, config),
            _ => Err(PluginError::Missing("a storage builder")),
        }
    }

    /// Builds the key-network plugin `name`.
    pub fn build_key_network(
        &self,
        name: &str,
        cx: &PluginContext,
        config: &Value,
    ) -> Result<Arc<dyn KeyNetwork>, PluginError> {
        match &self.lookup(PluginKind::KeyNetwork, name)?.builder {
            Builder::KeyNetwork(build) => build(cx, config),
            _ => Err(PluginError::Missing("a key-network builder")),
        }
    }

    /// Builds the consensus plugin `name`.
    pub fn build_consensus(
        &self,
        name: &str,
        cx: &PluginContext,
        config: &Value,
    ) -> Result<Arc<dyn Consensus>, PluginError> {
        match &self.lookup(PluginKind::Consensus, name)?.builder {
            Builder::Consensus(build) => build(cx, config),
            _ => Err(PluginError::Missing("a consensus builder")),
        }
    }
}
