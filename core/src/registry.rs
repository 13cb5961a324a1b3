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
//!
//! Each kind of plugin is built with a context of its own holding what the node has built before
//! it ([`StorageContext`], then [`KeyNetworkContext`], then [`ConsensusContext`]), and its
//! configuration section, which a plugin reads into a typed struct with [`parse_config`].

use std::path::PathBuf;
use std::sync::Arc;

use libp2p_identity::{Keypair, PeerId};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::consensus::{BehindSink, Consensus};
use crate::error::StorageError;
use crate::keynet::{KeyNetwork, PeerRouting};
use crate::network::PeerNetwork;
use crate::repo::StorageRepo;
use crate::storage::RawStorage;

/// What a storage plugin gets from the node that builds it (storage is built first).
#[derive(Clone, Debug)]
pub struct StorageContext {
    /// This node's peer id.
    pub local_peer_id: PeerId,
    /// The node's data directory; `None` for ephemeral nodes (an engine that needs a directory
    /// then needs a configured `path`).
    pub data_dir: Option<PathBuf>,
}

/// What a key-network plugin gets from the node that builds it (after storage).
#[derive(Clone, Debug)]
pub struct KeyNetworkContext {
    /// This node's peer id.
    pub local_peer_id: PeerId,
    /// The node host's view of the DHT.
    pub routing: Arc<dyn PeerRouting>,
}

/// What a consensus plugin gets from the node that builds it (last, over everything else).
#[derive(Clone, Debug)]
pub struct ConsensusContext {
    /// This node's identity key (signs consensus votes); its peer id is the node's.
    pub keypair: Keypair,
    /// The transport to other peers.
    pub network: Arc<dyn PeerNetwork>,
    /// The local repository over the node's storage.
    pub local_repo: StorageRepo,
    /// The built key network.
    pub key_network: Arc<dyn KeyNetwork>,
    /// Where the consensus reports that this node is behind on a block (the node catches it up).
    pub behind: Arc<dyn BehindSink>,
}

/// A plugin's options, read from its configuration section by [`parse_config`].
///
/// Implementations derive `Deserialize` with `#[serde(deny_unknown_fields)]` (an unknown key is
/// an error, never ignored) and give every optional field its default.
pub trait PluginConfig: DeserializeOwned {
    /// Checks what deserialization cannot: ranges and relations between options. An error is a
    /// [`PluginError::Config`] naming the plugin and the option.
    fn validate(&self) -> Result<(), PluginError>;
}

/// The options of a plugin that takes none: any key but `kind` is refused.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

impl PluginConfig for NoOptions {
    fn validate(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Reads the configuration section of the plugin `plugin` (its name in messages, such as
/// `storage lmdb`): `null` is an empty section, `kind` (the plugin's name, which the node puts in
/// the section) is skipped, every other key must be an option of `T`; then [`PluginConfig::validate`]
/// runs. Every error is a [`PluginError::Config`] naming the plugin and, for a bad value, the key.
pub fn parse_config<T: PluginConfig>(plugin: &str, section: &Value) -> Result<T, PluginError> {
    let config_error = |message: String| PluginError::Config { plugin: plugin.to_owned(), message };
    let mut options = match section {
        Value::Null => serde_json::Map::new(),
        Value::Object(map) => map.clone(),
        other => return Err(config_error(format!("expected a table, got {other}"))),
    };
    options.remove("kind");
    let config: T = serde_path_to_error::deserialize(Value::Object(options)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // An unknown key's message names it already.
        if path == "." || message.contains(&format!("`{path}`")) {
            config_error(message)
        } else {
            config_error(format!("{path}: {message}"))
        }
    })?;
    config.validate()?;
    Ok(config)
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
pub type StorageBuilder =
    Arc<dyn Fn(&StorageContext, &Value) -> Result<Arc<dyn RawStorage>, PluginError> + Send + Sync>;
/// Builds a key network from its configuration section.
pub type KeyNetworkBuilder =
    Arc<dyn Fn(&KeyNetworkContext, &Value) -> Result<Arc<dyn KeyNetwork>, PluginError> + Send + Sync>;
/// Builds a consensus from its configuration section.
pub type ConsensusBuilder =
    Arc<dyn Fn(&ConsensusContext, &Value) -> Result<Arc<dyn Consensus>, PluginError> + Send + Sync>;

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
pub type StorageBuildFn = fn(&StorageContext, &Value) -> Result<Arc<dyn RawStorage>, PluginError>;
/// A static key-network build function.
pub type KeyNetworkBuildFn = fn(&KeyNetworkContext, &Value) -> Result<Arc<dyn KeyNetwork>, PluginError>;
/// A static consensus build function.
pub type ConsensusBuildFn = fn(&ConsensusContext, &Value) -> Result<Arc<dyn Consensus>, PluginError>;

/// A plugin's option defaults: every option that has a fixed default, as the plugin's builder
/// reads it (`kind` excluded). Only shown (`optimystic config show`); the builder applies its
/// defaults itself.
pub type DefaultsFn = fn() -> serde_json::Map<String, Value>;

/// A plugin's option check: parses and validates its configuration section exactly as its
/// builder does (a [`PluginError::Config`] naming the key) and builds nothing, so that
/// `optimystic config show` and `start` refuse the same sections before anything is created.
pub type CheckFn = fn(&Value) -> Result<(), PluginError>;

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
    /// Its option check, if it declares one ([`PluginDescriptor::with_check`]).
    pub check: Option<CheckFn>,
}

impl std::fmt::Debug for PluginDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDescriptor").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PluginDescriptor {
    /// A storage plugin.
    pub const fn storage(name: &'static str, description: &'static str, build: StorageBuildFn) -> Self {
        Self { name, description, builder: StaticBuilder::Storage(build), defaults: None, check: None }
    }

    /// A key-network plugin.
    pub const fn key_network(name: &'static str, description: &'static str, build: KeyNetworkBuildFn) -> Self {
        Self { name, description, builder: StaticBuilder::KeyNetwork(build), defaults: None, check: None }
    }

    /// A consensus plugin.
    pub const fn consensus(name: &'static str, description: &'static str, build: ConsensusBuildFn) -> Self {
        Self { name, description, builder: StaticBuilder::Consensus(build), defaults: None, check: None }
    }

    /// The same descriptor, declaring its option defaults (shown by `optimystic config show`).
    #[must_use]
    pub const fn with_defaults(self, defaults: DefaultsFn) -> Self {
        Self { defaults: Some(defaults), ..self }
    }

    /// The same descriptor, declaring its option check (run when the configuration is validated).
    #[must_use]
    pub const fn with_check(self, check: CheckFn) -> Self {
        Self { check: Some(check), ..self }
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
    /// Its option check (`None`: its options are checked only when it is built).
    pub check: Option<CheckFn>,
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
                check: d.check,
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

    /// Checks the configuration section of the plugin `name` of `kind` without building it: an
    /// unknown plugin is [`PluginError::Unknown`]; a plugin without a declared check passes.
    pub fn check_options(&self, kind: PluginKind, name: &str, section: &Value) -> Result<(), PluginError> {
        match self.lookup(kind, name)?.check {
            Some(check) => check(section),
            None => Ok(()),
        }
    }

    /// Builds the storage plugin `name`.
    pub fn build_storage(
        &self,
        name: &str,
        cx: &StorageContext,
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
        cx: &KeyNetworkContext,
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
        cx: &ConsensusContext,
        config: &Value,
    ) -> Result<Arc<dyn Consensus>, PluginError> {
        match &self.lookup(PluginKind::Consensus, name)?.builder {
            Builder::Consensus(build) => build(cx, config),
            _ => Err(PluginError::Missing("a consensus builder")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde::Deserialize;
    use serde_json::json;

    use super::*;
    use crate::keynet::ClusterSize;

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Options {
        cluster_size: ClusterSize,
        limit: u64,
    }

    impl Default for Options {
        fn default() -> Self {
            Self { cluster_size: ClusterSize::default(), limit: 10 }
        }
    }

    impl PluginConfig for Options {
        fn validate(&self) -> Result<(), PluginError> {
            match self.limit {
                0 => Err(PluginError::Config { plugin: "test".into(), message: "limit must be positive".into() }),
                _ => Ok(()),
            }
        }
    }

    fn error(section: serde_json::Value) -> String {
        parse_config::<Options>("test plugin", &section).unwrap_err().to_string()
    }

    #[test]
    fn configurations_are_read_strictly_and_errors_name_the_key() {
        for empty in [json!(null), json!({}), json!({"kind": "x"})] {
            let options: Options = parse_config("test plugin", &empty).unwrap();
            assert_eq!((options.cluster_size.get(), options.limit), (3, 10), "{empty}");
        }
        let options: Options = parse_config("test plugin", &json!({"cluster_size": 5, "limit": 2})).unwrap();
        assert_eq!((options.cluster_size.get(), options.limit), (5, 2));

        let unknown = error(json!({"limt": 2}));
        assert!(unknown.starts_with("invalid configuration for test plugin: unknown field `limt`"), "{unknown}");
        let wrong_type = error(json!({"limit": "many"}));
        assert!(wrong_type.contains("limit: invalid type"), "{wrong_type}");
        let out_of_range = error(json!({"cluster_size": 65}));
        assert!(out_of_range.contains("cluster_size: cluster_size 65 must be between 1 and 64"), "{out_of_range}");
        assert!(error(json!({"cluster_size": 0})).contains("cluster_size"));
        assert!(error(json!({"limit": 0})).contains("limit must be positive"));
        assert!(error(json!([1])).contains("expected a table"));
    }
}
