//! Node configuration: one layered source of truth, built with figment.
//!
//! Layers, later ones winning: built-in defaults < TOML file (`--config` or `OPTIMYSTIC_CONFIG`) <
//! `OPTIMYSTIC_*` environment variables (nested keys joined with `__`, e.g.
//! `OPTIMYSTIC_NODE__LISTEN`) < command-line flags. [`LoadedConfig::validate`] checks everything
//! that can be checked before start and names the key and the source it came from.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codec::HARD_MAX_FRAME_BYTES;
use optimystic_core::keynet::ClusterSize;
pub use optimystic_core::reads::ReadMode;
use optimystic_core::registry::{PluginError, PluginKind, Registry};

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "OPTIMYSTIC_CONFIG";
/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "OPTIMYSTIC_";
/// The top-level sections; environment variables outside them are not configuration.
pub const SECTIONS: [&str; 8] = ["node", "limits", "storage", "key_network", "consensus", "metrics", "plugins", "log"];

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Identity, addresses and protocol names.
    pub node: NodeSection,
    /// Frame sizes, concurrency and deadlines.
    pub limits: LimitsSection,
    /// The storage plugin: `kind` plus the plugin's own options.
    pub storage: PluginSection,
    /// The key-network plugin: `kind`, `cluster_size` plus the plugin's own options.
    pub key_network: PluginSection,
    /// The consensus plugin: `kind`, thresholds plus the plugin's own options.
    pub consensus: PluginSection,
    /// The metrics and health endpoint.
    pub metrics: MetricsSection,
    /// Dynamic plugin libraries.
    pub plugins: PluginsSection,
    /// Logging.
    pub log: LogSection,
}

/// Room left in a repo frame around a block at `limits.max_block_bytes`: 64 KiB.
pub const BLOCK_ENVELOPE_BYTES: usize = 64 * 1024;

/// Most blocks one replica-repair round may visit (`node.repair_blocks_per_round`).
pub const MAX_REPAIR_BLOCKS_PER_ROUND: usize = 4_096;

/// `[node]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Where the identity key and durable storage live.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Multiaddrs of peers to join through; `/p2p/<peer id>` is optional (the id is learned on
    /// connect).
    pub bootstrap: Vec<String>,
    /// Protocol id prefix; nodes with different prefixes do not talk.
    pub protocol_prefix: String,
    /// How `get` reads: `quorum` (never misses an acknowledged commit) or `local` (fastest, may be
    /// stale).
    pub read_mode: ReadMode,
    /// Between replica-repair rounds (each block this node holds is re-offered to its current
    /// cluster, so members that joined receive it); 0 repairs only once, after start.
    pub repair_interval_ms: u64,
    /// Blocks repaired per round (each costs a cluster lookup and a request per member).
    pub repair_blocks_per_round: usize,
    /// A peer without a connection for this long whose dial then fails leaves the cluster views
    /// until it connects again (at least 1,000; longer than restarts and short partitions).
    pub peer_departed_after_ms: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./optimystic-data"),
            listen: vec!["/ip4/127.0.0.1/tcp/4001".to_owned()],
            bootstrap: Vec::new(),
            protocol_prefix: optimystic_core::wire::DEFAULT_PROTOCOL_PREFIX.to_owned(),
            read_mode: ReadMode::Quorum,
            repair_interval_ms: 5_000,
            repair_blocks_per_round: 64,
            peer_departed_after_ms: crate::host::DEFAULT_PEER_DEPARTED_AFTER_MS,
        }
    }
}

/// `[limits]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest repo protocol frame.
    pub max_repo_frame_bytes: usize,
    /// Largest cluster protocol frame.
    pub max_cluster_frame_bytes: usize,
    /// Largest repo and sync protocol response frame (read and written): at least
    /// `max_repo_frame_bytes`, so that reads return any block that exists, including one over
    /// `max_block_bytes` written by an older version.
    pub max_response_frame_bytes: usize,
    /// Largest block, as bytes of JSON: a pend that would make a block larger (and larger than it
    /// is) is refused with `bad-request`. A block over it still reads, shrinks and deletes. At
    /// most `max_repo_frame_bytes` less 64 KiB, so a whole block fits in one request.
    pub max_block_bytes: u64,
    /// Inbound requests served at once per protocol; more wait in a queue.
    pub max_inbound_per_protocol: usize,
    /// Inbound requests waiting for a slot per protocol; more are answered `busy`.
    pub max_queued_inbound_per_protocol: usize,
    /// Outbound requests in flight per protocol.
    pub max_outbound_per_protocol: usize,
    /// Deadline for one request to a peer.
    pub request_timeout_ms: u64,
    /// Deadline for dialling a peer.
    pub dial_timeout_ms: u64,
    /// Deadline of a client operation when the client gives none.
    pub operation_timeout_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_repo_frame_bytes: 8 * 1024 * 1024,
            max_cluster_frame_bytes: 1024 * 1024,
            max_response_frame_bytes: crate::codec::DEFAULT_MAX_RESPONSE_FRAME_BYTES,
            max_block_bytes: optimystic_core::repo::DEFAULT_MAX_BLOCK_BYTES,
            max_inbound_per_protocol: 32,
            max_queued_inbound_per_protocol: 256,
            max_outbound_per_protocol: 64,
            request_timeout_ms: 5_000,
            dial_timeout_ms: 5_000,
            operation_timeout_ms: 10_000,
        }
    }
}

/// A plugin section: `kind` names the plugin; every other key goes to the plugin as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginSection {
    /// The plugin's registered name.
    pub kind: String,
    /// The plugin's own options.
    #[serde(flatten)]
    pub options: serde_json::Map<String, Value>,
}

impl Default for PluginSection {
    fn default() -> Self {
        Self { kind: String::new(), options: serde_json::Map::new() }
    }
}

impl PluginSection {
    fn named(kind: &str) -> Self {
        Self { kind: kind.to_owned(), options: serde_json::Map::new() }
    }

    /// The section as the JSON value a plugin builder receives (`kind` included).
    pub fn to_value(&self) -> Value {
        let mut map = self.options.clone();
        map.insert("kind".to_owned(), Value::String(self.kind.clone()));
        Value::Object(map)
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Serve `/metrics` and `/health`.
    pub enabled: bool,
    /// The HTTP listen address.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:9464".to_owned() }
    }
}

/// `[plugins]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsSection {
    /// Plugin libraries to load at start.
    pub load: Vec<PathBuf>,
}

/// `[log]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The built-in defaults: a durable, clustered node.
pub fn defaults() -> NodeConfig {
    NodeConfig {
        storage: PluginSection::named("lmdb"),
        key_network: {
            let mut s = PluginSection::named("kademlia");
            s.options.insert("cluster_size".to_owned(), Value::from(3));
            s
        },
        // Plugin-specific options (thresholds, timeouts) default inside the plugin, so changing
        // `kind` never leaves another plugin's options behind.
        consensus: PluginSection::named("majority-2pc"),
        ..NodeConfig::default()
    }
}

/// A configuration problem, naming the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers could not be read or merged (syntax error, wrong type, unknown key). The text
    /// names each key as its layer spells it (`node.listen in node1.toml`,
    /// `OPTIMYSTIC_NODE__LISTEN in the environment`).
    #[error("configuration: {}", load_error_text(.0))]
    Load(Box<figment::Error>),
    /// A value is invalid.
    #[error("configuration: {place}: {message}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// The key as its layer spells it, and the layer (`node.x in node1.toml`,
        /// `OPTIMYSTIC_NODE__X in the environment`), as in load errors.
        place: String,
        /// What is wrong.
        message: String,
    },
}

/// The merged layers, kept so validation can say where each value came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The effective configuration.
    pub config: NodeConfig,
    figment: Figment,
}

/// Builds the figment: defaults < file < env < `overrides` (CLI flags as a nested JSON object).
pub fn figment(file: Option<&Path>, overrides: &Value) -> Figment {
    let mut fig = Figment::from(Serialized::defaults(defaults()));
    let file = file.map(Path::to_path_buf).or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    if let Some(path) = file {
        fig = fig.merge(Toml::file_exact(path));
    }
    // Only `<SECTION>__<KEY>` variables are configuration (`OPTIMYSTIC_CONFIG` and test knobs are
    // not); the filter sees the key before `__` becomes a dot.
    let env = Env::prefixed(ENV_PREFIX)
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            SECTIONS.iter().any(|s| key.starts_with(&format!("{s}__")) || key.starts_with(&format!("{s}.")))
        })
        .split("__");
    fig.merge(env).merge(Serialized::globals(overrides))
}

/// Reads the layers into a configuration, without validating values.
pub fn extract(file: Option<&Path>, overrides: &Value) -> Result<NodeConfig, ConfigError> {
    figment(file, overrides).extract().map_err(|e| ConfigError::Load(Box::new(e)))
}

/// Where a value came from, as [`figment::Metadata`] tells it.
enum Layer {
    Defaults,
    File(String),
    Environment,
    Flags,
    Other(String),
}

impl Layer {
    fn of(meta: &figment::Metadata) -> Self {
        // Serialized providers are named after their Rust type: say what they are instead.
        if meta.name.contains("serde_json") {
            return Self::Flags;
        }
        if meta.name.contains("NodeConfig") {
            return Self::Defaults;
        }
        match &meta.source {
            Some(figment::Source::File(path)) => Self::File(path.display().to_string()),
            _ if meta.name.contains("environment") => Self::Environment,
            Some(source) => Self::Other(format!("{} {source}", meta.name)),
            None => Self::Other(meta.name.to_string()),
        }
    }
}

/// One line per error of `error`: `<key> in <layer>: <what is wrong>`, the key spelled as its
/// layer spells it.
fn load_error_text(error: &figment::Error) -> String {
    let lines: Vec<String> = error.clone().into_iter().map(|e| one_load_error(&e)).collect();
    lines.join("\n")
}

fn one_load_error(error: &figment::Error) -> String {
    use figment::error::Kind;
    let what = match &error.kind {
        Kind::UnknownField(_, expected) => format!("unknown key; expected one of: {}", expected.join(", ")),
        Kind::UnknownVariant(value, expected) => {
            format!("unknown value {value:?}; expected one of: {}", expected.join(", "))
        }
        other => other.to_string(),
    };
    let dotted = error.path.join(".");
    let layer = error.metadata.as_ref().map(Layer::of);
    if layer.is_none() && dotted.is_empty() {
        return what;
    }
    format!("{}: {what}", place(&dotted, layer.as_ref()))
}

/// A key as its layer spells it, with the layer: `node.x in node1.toml`,
/// `OPTIMYSTIC_NODE__X in the environment`, `node.x from the command-line flags`.
fn place(dotted: &str, layer: Option<&Layer>) -> String {
    match (layer, dotted.is_empty()) {
        (Some(Layer::File(path)), true) => path.clone(),
        (Some(Layer::File(path)), false) => format!("{dotted} in {path}"),
        (Some(Layer::Environment), false) => {
            let parts: Vec<String> = dotted.split('.').map(str::to_uppercase).collect();
            format!("{ENV_PREFIX}{} in the environment", parts.join("__"))
        }
        (Some(Layer::Environment), true) => "the environment".to_owned(),
        (Some(Layer::Flags), _) => format!("{dotted} from the command-line flags"),
        (Some(Layer::Defaults), _) => format!("{dotted} in the built-in defaults"),
        (Some(Layer::Other(name)), _) => format!("{dotted} in {name}"),
        (None, _) => dotted.to_owned(),
    }
}

/// Loads and validates the configuration.
pub fn load(file: Option<&Path>, overrides: &Value, registry: &Registry) -> Result<LoadedConfig, ConfigError> {
    let fig = figment(file, overrides);
    let config: NodeConfig = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
    let loaded = LoadedConfig { config, figment: fig };
    loaded.validate(registry)?;
    Ok(loaded)
}

impl LoadedConfig {
    /// Where the value of `key` came from: a file path, an environment variable or a default.
    pub fn source_of(&self, key: &str) -> String {
        let Some(meta) = self.figment.find_metadata(key) else {
            return "built-in defaults".to_owned();
        };
        match Layer::of(meta) {
            Layer::Defaults => "built-in defaults".to_owned(),
            Layer::Flags => "command-line flags".to_owned(),
            Layer::File(path) => format!("file {path}"),
            Layer::Environment => {
                let parts: Vec<String> = key.split('.').map(str::to_uppercase).collect();
                format!("environment variable {ENV_PREFIX}{}", parts.join("__"))
            }
            Layer::Other(name) => name,
        }
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let layer = Some(self.figment.find_metadata(key).map_or(Layer::Defaults, Layer::of));
        ConfigError::Invalid { key: key.to_owned(), place: place(key, layer.as_ref()), message: message.into() }
    }

    /// The effective configuration with each plugin's declared option defaults filled in where the
    /// configuration says nothing (what `optimystic config show` prints).
    pub fn with_plugin_defaults(&self, registry: &Registry) -> NodeConfig {
        let mut config = self.config.clone();
        for (kind, section) in [
            (PluginKind::Storage, &mut config.storage),
            (PluginKind::KeyNetwork, &mut config.key_network),
            (PluginKind::Consensus, &mut config.consensus),
        ] {
            if let Some(defaults) = registry.defaults(kind, &section.kind) {
                for (key, value) in defaults {
                    section.options.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
        }
        config
    }

    /// Checks every value that can be checked before start.
    pub fn validate(&self, registry: &Registry) -> Result<(), ConfigError> {
        let c = &self.config;
        for (i, addr) in c.node.listen.iter().enumerate() {
            addr.parse::<Multiaddr>().map_err(|e| self.invalid("node.listen", format!("entry {i} {addr:?}: {e}")))?;
        }
        for (i, addr) in c.node.bootstrap.iter().enumerate() {
            addr.parse::<Multiaddr>()
                .map_err(|e| self.invalid("node.bootstrap", format!("entry {i} {addr:?}: {e}")))?;
        }
        if !c.node.protocol_prefix.starts_with('/') || c.node.protocol_prefix.ends_with('/') {
            return Err(self.invalid("node.protocol_prefix", "must start with '/' and not end with '/'"));
        }
        if c.node.peer_departed_after_ms < 1_000 {
            return Err(self.invalid(
                "node.peer_departed_after_ms",
                format!("must be at least 1000, got {}", c.node.peer_departed_after_ms),
            ));
        }
        if !(1..=MAX_REPAIR_BLOCKS_PER_ROUND).contains(&c.node.repair_blocks_per_round) {
            return Err(self.invalid(
                "node.repair_blocks_per_round",
                format!("must be 1..={MAX_REPAIR_BLOCKS_PER_ROUND}, got {}", c.node.repair_blocks_per_round),
            ));
        }
        let l = &c.limits;
        for (key, value, min, max) in [
            ("limits.max_repo_frame_bytes", l.max_repo_frame_bytes, 1024, 1 << 30),
            ("limits.max_cluster_frame_bytes", l.max_cluster_frame_bytes, 1024, 1 << 30),
            (
                "limits.max_response_frame_bytes",
                l.max_response_frame_bytes,
                l.max_repo_frame_bytes,
                HARD_MAX_FRAME_BYTES,
            ),
            ("limits.max_inbound_per_protocol", l.max_inbound_per_protocol, 1, 100_000),
            ("limits.max_queued_inbound_per_protocol", l.max_queued_inbound_per_protocol, 0, 100_000),
            ("limits.max_outbound_per_protocol", l.max_outbound_per_protocol, 1, 100_000),
        ] {
            if !(min..=max).contains(&value) {
                return Err(self.invalid(key, format!("{value} is outside {min}..={max}")));
            }
        }
        let most_block_bytes = l.max_repo_frame_bytes.saturating_sub(BLOCK_ENVELOPE_BYTES) as u64;
        if !(1024..=most_block_bytes).contains(&l.max_block_bytes) {
            return Err(self.invalid(
                "limits.max_block_bytes",
                format!(
                    "{} is outside 1024..={most_block_bytes} (limits.max_repo_frame_bytes less 64 KiB for the envelope)",
                    l.max_block_bytes
                ),
            ));
        }
        for (key, value) in [
            ("limits.request_timeout_ms", l.request_timeout_ms),
            ("limits.dial_timeout_ms", l.dial_timeout_ms),
            ("limits.operation_timeout_ms", l.operation_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&value) {
                return Err(self.invalid(key, format!("{value} is outside 1..=3600000")));
            }
        }
        for (section, kind, value) in [
            ("storage", PluginKind::Storage, &c.storage),
            ("key_network", PluginKind::KeyNetwork, &c.key_network),
            ("consensus", PluginKind::Consensus, &c.consensus),
        ] {
            let names = registry.names(kind);
            if !names.contains(&value.kind) {
                return Err(self.invalid(
                    &format!("{section}.kind"),
                    format!("no {kind} plugin named {:?}; registered: {}", value.kind, names.join(", ")),
                ));
            }
            if let Err(e) = registry.check_options(kind, &value.kind, &value.to_value()) {
                let message = match e {
                    PluginError::Config { message, .. } => message,
                    other => other.to_string(),
                };
                let key = value
                    .options
                    .keys()
                    .find(|key| message.starts_with(&format!("{key}: ")) || message.contains(&format!("`{key}`")));
                let key = key.map_or_else(|| section.to_owned(), |key| format!("{section}.{key}"));
                return Err(self.invalid(&key, format!("{kind} {}: {message}", value.kind)));
            }
        }
        if let Some(size) = c.key_network.options.get("cluster_size") {
            serde_json::from_value::<ClusterSize>(size.clone())
                .map_err(|e| self.invalid("key_network.cluster_size", format!("{size}: {e}")))?;
        }
        for key in ["promise_threshold", "commit_threshold"] {
            if let Some(value) = c.consensus.options.get(key) {
                check_threshold(value).map_err(|m| self.invalid(&format!("consensus.{key}"), m))?;
            }
        }
        if c.metrics.enabled {
            c.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| self.invalid("metrics.listen", format!("{:?}: {e}", c.metrics.listen)))?;
        }
        Ok(())
    }

    /// Checks that the data directory exists or can be created, and is writable.
    pub fn check_data_dir(&self) -> Result<(), ConfigError> {
        let dir = &self.config.node.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| self.invalid("node.data_dir", format!("cannot create {}: {e}", dir.display())))?;
        let probe = dir.join(".write-probe");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| self.invalid("node.data_dir", format!("{} is not writable: {e}", dir.display())))
    }
}

/// A threshold is `"majority"`, a whole number of votes >= 1, or a fraction in (0, 1].
pub fn check_threshold(value: &Value) -> Result<(), String> {
    match value {
        Value::String(s) if s == "majority" => Ok(()),
        Value::Number(n) if n.as_u64().is_some_and(|v| v >= 1) => Ok(()),
        Value::Number(n) if n.as_f64().is_some_and(|v| v > 0.0 && v <= 1.0) => Ok(()),
        other => Err(format!("{other} is not \"majority\", a vote count >= 1, or a fraction in (0, 1]")),
    }
}

#[cfg(test)]
mod tests {
    // figment's `Jail` closures return `figment::Error`, which is large: its API, not ours.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

    use std::sync::Arc;

    use super::*;
    use figment::Jail;
    use optimystic_core::BlockId;
    use optimystic_core::consensus::BehindSink;
    use optimystic_core::registry::{ConsensusContext, KeyNetworkContext, StorageContext};
    use optimystic_testkit::routing::FixedRouting;
    use optimystic_testkit::sim::{SimConfig, SimNet};
    use serde_json::json;

    /// A node's behind reports, dropped (these tests run no catch-up).
    #[derive(Debug)]
    struct NoBehind;

    impl BehindSink for NoBehind {
        fn behind(&self, _block_id: &BlockId) {}
    }

    fn registry() -> Registry {
        crate::link_bundled_plugins()
    }

    fn error_text(result: Result<LoadedConfig, ConfigError>) -> String {
        result.expect_err("the configuration is invalid").to_string()
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "[node]\ndata_dir = \"from-file\"\nprotocol_prefix = \"/file\"\n[storage]\nkind = \"file\"\n",
            )?;
            jail.set_env("OPTIMYSTIC_NODE__PROTOCOL_PREFIX", "/env");
            jail.set_env("OPTIMYSTIC_STORAGE__KIND", "memory");
            jail.set_env("OPTIMYSTIC_CRASH_CYCLES", "7");
            let flags = json!({"storage": {"kind": "lmdb"}});
            let loaded = load(Some(Path::new("node.toml")), &flags, &registry()).expect("valid");
            let c = &loaded.config;
            assert_eq!(c.node.data_dir, PathBuf::from("from-file"), "file over defaults");
            assert_eq!(c.node.protocol_prefix, "/env", "environment over file");
            assert_eq!(c.storage.kind, "lmdb", "flags over environment");
            assert_eq!(c.limits.max_inbound_per_protocol, 32, "defaults where nothing is said");
            assert!(loaded.source_of("node.protocol_prefix").contains("environment"));
            assert_eq!(loaded.source_of("storage.kind"), "command-line flags");
            Ok(())
        });
    }

    #[test]
    fn the_config_file_can_come_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.create_file("other.toml", "[key_network]\nkind = \"static\"\ncluster_size = 5\n")?;
            jail.set_env(CONFIG_ENV, "other.toml");
            let loaded = load(None, &json!({}), &registry()).expect("valid");
            assert_eq!(loaded.config.key_network.kind, "static");
            assert_eq!(loaded.config.key_network.options.get("cluster_size"), Some(&json!(5)));
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_their_key_and_source() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[node]\nlisten = [\"not a multiaddr\"]\n")?;
            let text = error_text(load(Some(Path::new("bad.toml")), &json!({}), &registry()));
            assert!(text.contains("node.listen") && text.contains("bad.toml"), "{text}");

            let text = error_text(load(None, &json!({"storage": {"kind": "tape"}}), &registry()));
            assert!(text.contains("storage.kind") && text.contains("lmdb") && text.contains("command-line"), "{text}");

            jail.set_env("OPTIMYSTIC_KEY_NETWORK__CLUSTER_SIZE", "0");
            let text = error_text(load(None, &json!({}), &registry()));
            assert!(text.contains("OPTIMYSTIC_KEY_NETWORK__CLUSTER_SIZE in the environment: "), "{text}");
            jail.clear_env();

            // Plugin options are checked here, before anything is built, in the same format.
            for (options, says) in [
                ("map_size_bytes = \"big\"", "storage.map_size_bytes in plugin.toml: storage lmdb: map_size_bytes: "),
                ("mapsize = 5", "storage.mapsize in plugin.toml: storage lmdb: unknown field `mapsize`"),
            ] {
                jail.create_file("plugin.toml", &format!("[storage]\nkind = \"lmdb\"\n{options}\n"))?;
                let text = error_text(load(Some(Path::new("plugin.toml")), &json!({}), &registry()));
                assert!(text.starts_with(&format!("configuration: {says}")), "{text}");
            }

            let text = error_text(load(
                None,
                &json!({"consensus": {"kind": "majority-2pc", "commit_threshold": 1.5}}),
                &registry(),
            ));
            assert!(text.contains("consensus.commit_threshold"), "{text}");

            let text = error_text(load(None, &json!({"limits": {"request_timeout_ms": 0}}), &registry()));
            assert!(text.contains("limits.request_timeout_ms"), "{text}");

            jail.create_file("typo.toml", "[node]\nlisen = []\n")?;
            let text = error_text(load(Some(Path::new("typo.toml")), &json!({}), &registry()));
            assert!(
                text.starts_with("configuration: node.lisen in typo.toml: unknown key; expected one of: data_dir, "),
                "{text}"
            );

            jail.set_env("OPTIMYSTIC_NODE__FROBNICATE", "1");
            let text = error_text(load(None, &json!({}), &registry()));
            assert!(
                text.starts_with("configuration: OPTIMYSTIC_NODE__FROBNICATE in the environment: unknown key"),
                "{text}"
            );
            assert!(!text.contains("default."), "{text}");
            Ok(())
        });
    }

    #[test]
    fn an_unwritable_data_dir_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let flags = json!({"node": {"data_dir": file.join("below")}});
        let loaded = load(None, &flags, &registry()).expect("valid until the directory is checked");
        let text = loaded.check_data_dir().expect_err("cannot create a directory below a file").to_string();
        assert!(text.contains("node.data_dir"), "{text}");
    }

    #[test]
    fn switching_plugin_kinds_leaves_no_foreign_options_behind() {
        let flags =
            json!({"consensus": {"kind": "solo"}, "key_network": {"kind": "static"}, "storage": {"kind": "memory"}});
        let loaded = load(None, &flags, &registry()).expect("valid");
        assert!(loaded.config.consensus.options.is_empty(), "{:?}", loaded.config.consensus.options);
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let local_peer_id = keypair.public().to_peer_id();
        let cx = StorageContext { local_peer_id, data_dir: None };
        let storage =
            registry().build_storage("memory", &cx, &loaded.config.storage.to_value()).expect("memory builds");
        let routing = FixedRouting::new(local_peer_id, []);
        let cx = KeyNetworkContext { local_peer_id, routing: routing.clone() };
        let key_network =
            registry().build_key_network("static", &cx, &loaded.config.key_network.to_value()).expect("static builds");
        let cx = ConsensusContext {
            keypair,
            network: SimNet::new(1, SimConfig::default()).network(local_peer_id),
            local_repo: optimystic_core::StorageRepo::new(storage),
            key_network,
            behind: Arc::new(NoBehind),
        };
        registry()
            .build_consensus("solo", &cx, &loaded.config.consensus.to_value())
            .expect("solo accepts the defaults");
    }

    #[test]
    fn plugin_defaults_are_shown_and_accepted_by_their_plugins() {
        // In a jail: other tests set OPTIMYSTIC_* variables, and the defaults must be the built-in ones.
        Jail::expect_with(|_jail| {
            let loaded = load(None, &json!({"consensus": {"kind": "majority-2pc", "grace_ms": 3000}}), &registry())
                .expect("valid");
            let shown = loaded.with_plugin_defaults(&registry());
            assert_eq!(shown.storage.options.get("map_size_bytes"), Some(&json!(1u64 << 30)), "{:?}", shown.storage);
            assert_eq!(shown.storage.options.get("path"), Some(&json!("storage-lmdb")));
            assert_eq!(shown.consensus.options.get("grace_ms"), Some(&json!(3000)), "the configuration wins");
            assert_eq!(shown.consensus.options.get("record_timeout_ms"), Some(&json!(10_000)));
            assert_eq!(shown.key_network.options.get("cache_ttl_ms"), Some(&json!(2_000)));
            let printed = toml::to_string_pretty(&shown).expect("prints");
            let reread: NodeConfig = toml::from_str(&printed).expect("the printed configuration reads back");
            assert_eq!(reread, shown);

            // The shown storage options open the same directory as none at all.
            let dir = tempfile::tempdir().unwrap();
            let local_peer_id = libp2p::PeerId::random();
            let cx = StorageContext { local_peer_id, data_dir: Some(dir.path().to_path_buf()) };
            for kind in ["lmdb", "file"] {
                let flags = json!({"storage": {"kind": kind}});
                let shown = load(None, &flags, &registry()).expect("valid").with_plugin_defaults(&registry());
                let storage =
                    registry().build_storage(kind, &cx, &shown.storage.to_value()).expect("defaults accepted");
                drop(storage);
                assert!(dir.path().join(format!("storage-{kind}")).is_dir(), "{kind} opened its default directory");
            }
            let flags = json!({"key_network": {"kind": "static"}});
            let shown = load(None, &flags, &registry()).expect("valid").with_plugin_defaults(&registry());
            let cx = KeyNetworkContext { local_peer_id, routing: FixedRouting::new(local_peer_id, []) };
            registry().build_key_network("static", &cx, &shown.key_network.to_value()).expect("defaults accepted");
            Ok(())
        });
    }

    #[test]
    fn thresholds_accept_majority_counts_and_fractions() {
        for ok in [json!("majority"), json!(2), json!(0.5), json!(1.0)] {
            assert!(check_threshold(&ok).is_ok(), "{ok}");
        }
        for bad in [json!("most"), json!(0), json!(-1), json!(1.5), json!(0.0), json!(null)] {
            assert!(check_threshold(&bad).is_err(), "{bad}");
        }
    }
}
