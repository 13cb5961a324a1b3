//! Configuration of the majority two-phase commit, parsed from the `[consensus]` section.

use serde::Deserialize;
use serde_json::{Map, Value};

use optimystic_core::registry::{PluginConfig, PluginError, parse_config};
use optimystic_core::wire::MAX_RECORD_OPERATIONS;

/// The plugin name used in configuration and error messages.
pub(crate) const PLUGIN: &str = "consensus majority-2pc";

/// How many of a record's `n` peers must vote approve.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Threshold {
    /// `floor(n / 2) + 1`.
    Majority,
    /// A fixed number of peers (at most `n` are required: a smaller cluster needs all its peers).
    Count(usize),
    /// A fraction of the peers, rounded up: `ceil(fraction * n)`; in `(0, 1]`.
    Fraction(f64),
}

impl Threshold {
    /// The votes required among `n` peers, between a majority of `n` and `max(n, 1)`: never
    /// below a majority (SPEC 4.13; configuration refuses such thresholds, and a record with
    /// fewer peers than the configured cluster size must not lower the bar either).
    #[must_use]
    pub fn of(&self, n: usize) -> usize {
        let n = n.max(1);
        let required = match *self {
            Self::Majority => n / 2 + 1,
            Self::Count(count) => count,
            Self::Fraction(fraction) => {
                // n is a cluster size (small): the float conversions are exact.
                #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let votes = (fraction * n as f64).ceil() as usize;
                votes
            }
        };
        required.max(n / 2 + 1).clamp(1, n)
    }

    /// The promise votes required among `n` peers: [`Threshold::of`] (a majority at least, because
    /// any two promise quorums must share a peer: that peer's reservation is what keeps two
    /// conflicting records from both being decided).
    #[must_use]
    pub fn promise_quorum(&self, n: usize) -> usize {
        self.of(n)
    }

    /// Refuses a count threshold below a majority of `cluster_size` (SPEC 4.13).
    pub fn check_cluster_size(&self, key: &str, cluster_size: usize) -> Result<(), PluginError> {
        let majority = cluster_size / 2 + 1;
        match *self {
            Self::Count(count) if count < majority => Err(config_error(format!(
                "{key}: {count} is below a majority of the cluster size {cluster_size} ({majority})"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a threshold that cannot be a quorum: a count below 2, or a fraction outside
    /// `(0.5, 1]`. `promise` says which of the two `key` is (their messages differ).
    fn check(&self, key: &str, promise: bool) -> Result<(), PluginError> {
        let bad = |message: String| Err(config_error(format!("{key}: {message}")));
        match *self {
            Self::Majority => Ok(()),
            Self::Count(0) => bad("a count threshold must be at least 1".into()),
            Self::Count(1) => bad("a count of 1 is below a majority of any cluster of 2 or more (SPEC 4.13)".into()),
            Self::Count(_) => Ok(()),
            Self::Fraction(f) if f > 0.5 && f <= 1.0 => Ok(()),
            Self::Fraction(f) if promise => {
                bad(format!("a promise fraction must be in (0.5, 1] so that two quorums always share a peer, got {f}"))
            }
            Self::Fraction(f) => bad(format!(
                "a commit fraction must be in (0.5, 1]: an acknowledged write must be on a majority (SPEC 4.13), got {f}"
            )),
        }
    }
}

impl TryFrom<Value> for Threshold {
    type Error = String;

    /// `"majority"`, a whole number (a count) or any other number (a fraction); the range is
    /// checked by [`MajorityConfig::validate`].
    fn try_from(value: Value) -> Result<Self, String> {
        match &value {
            Value::String(s) if s == "majority" => Ok(Self::Majority),
            Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                (Some(count), _) => {
                    usize::try_from(count).map(Self::Count).map_err(|_| format!("{count} is too large"))
                }
                (None, Some(fraction)) => Ok(Self::Fraction(fraction)),
                (None, None) => Err("not a number".into()),
            },
            other => Err(format!("expected \"majority\", a count >= 1 or a fraction, got {other}")),
        }
    }
}

/// Tunables of the majority two-phase commit. Every duration is in milliseconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MajorityConfig {
    /// Approving promises needed to decide a record (default majority; never below a majority).
    pub promise_threshold: Threshold,
    /// Approving commit votes needed before the coordinator reports success (default majority).
    pub commit_threshold: Threshold,
    /// Longest lifetime of a record: the coordinator caps a message's expiration at now plus this,
    /// and members refuse records expiring later than now plus this plus `grace_ms`.
    pub record_timeout_ms: u64,
    /// Timeout of one cluster request.
    pub request_timeout_ms: u64,
    /// How long past a record's expiration a member waits before asking the other peers about it;
    /// must exceed the clock skew the deployment allows.
    pub grace_ms: u64,
    /// How many times the final record is re-sent to a peer that did not answer, after the first
    /// send.
    pub retry_attempts: u32,
    /// First delay before a re-send; doubles each time.
    pub retry_base_ms: u64,
    /// Cap of the delay between re-sends, and first delay between recovery rounds.
    pub retry_max_ms: u64,
    /// Cap of the delay between recovery rounds (which go on until every peer answered).
    pub recovery_backoff_max_ms: u64,
    /// How long past a record's expiration (on this member's clock) recovery may keep a
    /// promised record's reservation while some peers never answer or keep answering "pending"
    /// (SPEC 4.5): past it, signed renounces from a majority of the record's peer set (this
    /// member's own included) drop the reservation. At least `grace_ms`, at most
    /// `marker_retention_ms`.
    pub recovery_bound_ms: u64,
    /// Most blocks a member holds live reservations on (a record naming several blocks counts
    /// each, SPEC 4.10); beyond it, it answers `busy`.
    pub max_reservations: usize,
    /// Most blocks a member holds live reservations on for records from one sender that is in
    /// this member's view of the cluster of every block the record names (SPEC 4.11, 4.20
    /// "Sybil senders"); beyond it, it votes reject (`busy`) on that sender's records.
    pub max_reservations_per_sender: usize,
    /// Most blocks a member holds live reservations on for records from all other senders
    /// together (any node may coordinate, but a sender outside the cluster could mint peer ids
    /// without end: they share this one budget, SPEC 4.20 "Sybil senders").
    pub max_reservations_outsiders: usize,
    /// Most blocks one record may name (its operations' blocks together); a member refuses a
    /// larger record before any cluster lookup or storage read, and the coordinator never
    /// batches operations past it.
    pub max_record_blocks: usize,
    /// Most blocks a member keeps stored rejections (a rejected record's final vote) for, per
    /// sender in its view (as [`MajorityConfig::max_reservations_per_sender`]) and for all other
    /// senders together; past it, it answers `busy` without voting or storing anything.
    pub max_rejections_per_sender: usize,
    /// Most blocks a member keeps stored rejections for in total.
    pub max_rejections: usize,
    /// Most recovery status queries in flight at once on a member.
    pub max_recovery_queries_in_flight: usize,
    /// How long past its expiration a resolved record's marker (executed, aborted, rejected) is
    /// kept. Recovery queries about a record are answered from it, so it must exceed the longest
    /// time a peer may stay down and still come back.
    pub marker_retention_ms: u64,
    /// Most operations the coordinator puts in one record (SPEC 4.14): operations queued for a
    /// peer set while its records are in flight go out together in the next one. 1 disables
    /// batching (every operation runs its own record at once). Members accept records of up to
    /// [`MAX_RECORD_OPERATIONS`] operations whatever this says.
    pub max_batch_ops: usize,
    /// Most bytes of operations (as JSON) the coordinator puts in one batched record; a single
    /// larger operation still goes alone. Keep it well under the node's
    /// `limits.max_cluster_frame_bytes` (1 MiB by default): a record travels with its votes, and
    /// a member's answer to a batch carries each operation's result. Also bounds the
    /// `StaleFailure`s a member's answer to a rejected batch carries in full.
    pub max_batch_bytes: usize,
    /// Most records of one peer set the coordinator has in flight at once when batching; an
    /// operation that finds fewer goes out at once, alone.
    pub max_records_in_flight: usize,
}

impl Default for MajorityConfig {
    fn default() -> Self {
        Self {
            promise_threshold: Threshold::Majority,
            commit_threshold: Threshold::Majority,
            record_timeout_ms: 10_000,
            request_timeout_ms: 2_000,
            grace_ms: 2_000,
            retry_attempts: 5,
            retry_base_ms: 250,
            retry_max_ms: 4_000,
            recovery_backoff_max_ms: 30_000,
            recovery_bound_ms: DEFAULT_RECOVERY_BOUND_MS,
            max_reservations: 10_000,
            max_reservations_per_sender: 2_500,
            max_reservations_outsiders: 2_500,
            max_record_blocks: DEFAULT_MAX_RECORD_BLOCKS,
            max_rejections_per_sender: 2_500,
            max_rejections: 10_000,
            max_recovery_queries_in_flight: 64,
            marker_retention_ms: 7 * 24 * 60 * 60 * 1_000,
            max_batch_ops: DEFAULT_MAX_BATCH_OPS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_records_in_flight: DEFAULT_MAX_RECORDS_IN_FLIGHT,
        }
    }
}

impl Threshold {
    /// The threshold as configuration writes it.
    #[must_use]
    pub fn to_value(&self) -> Value {
        match *self {
            Self::Majority => Value::from("majority"),
            Self::Count(count) => Value::from(count),
            Self::Fraction(fraction) => Value::from(fraction),
        }
    }
}

impl MajorityConfig {
    /// The configuration as the `[consensus]` section writes it (`kind` excluded).
    #[must_use]
    pub fn to_options(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("promise_threshold".into(), self.promise_threshold.to_value());
        map.insert("commit_threshold".into(), self.commit_threshold.to_value());
        map.insert("record_timeout_ms".into(), Value::from(self.record_timeout_ms));
        map.insert("request_timeout_ms".into(), Value::from(self.request_timeout_ms));
        map.insert("grace_ms".into(), Value::from(self.grace_ms));
        map.insert("retry_attempts".into(), Value::from(self.retry_attempts));
        map.insert("retry_base_ms".into(), Value::from(self.retry_base_ms));
        map.insert("retry_max_ms".into(), Value::from(self.retry_max_ms));
        map.insert("recovery_backoff_max_ms".into(), Value::from(self.recovery_backoff_max_ms));
        map.insert("recovery_bound_ms".into(), Value::from(self.recovery_bound_ms));
        map.insert("max_reservations".into(), Value::from(self.max_reservations));
        map.insert("max_reservations_per_sender".into(), Value::from(self.max_reservations_per_sender));
        map.insert("max_reservations_outsiders".into(), Value::from(self.max_reservations_outsiders));
        map.insert("max_record_blocks".into(), Value::from(self.max_record_blocks));
        map.insert("max_rejections_per_sender".into(), Value::from(self.max_rejections_per_sender));
        map.insert("max_rejections".into(), Value::from(self.max_rejections));
        map.insert("max_recovery_queries_in_flight".into(), Value::from(self.max_recovery_queries_in_flight));
        map.insert("marker_retention_ms".into(), Value::from(self.marker_retention_ms));
        map
    }
}

/// The options' defaults (`optimystic config show`).
pub(crate) fn defaults() -> Map<String, Value> {
    MajorityConfig::default().to_options()
}

fn config_error(message: String) -> PluginError {
    PluginError::Config { plugin: PLUGIN.into(), message }
}

/// Default of [`MajorityConfig::recovery_bound_ms`]: 10 minutes (SPEC 4.5).
pub const DEFAULT_RECOVERY_BOUND_MS: u64 = 10 * 60 * 1_000;
/// Default of [`MajorityConfig::max_record_blocks`].
pub const DEFAULT_MAX_RECORD_BLOCKS: usize = 1_024;
/// Default of [`MajorityConfig::max_batch_ops`] (SPEC 4.14).
pub const DEFAULT_MAX_BATCH_OPS: usize = 64;
/// Default of [`MajorityConfig::max_batch_bytes`]: 256 KiB, a quarter of the default cluster frame
/// limit.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 256 * 1024;
/// Smallest [`MajorityConfig::max_batch_bytes`]: 1 KiB.
pub const MIN_BATCH_BYTES: usize = 1024;
/// Largest [`MajorityConfig::max_batch_bytes`]: 256 MiB, the largest frame limit a node accepts.
pub const MAX_BATCH_BYTES: usize = 256 * 1024 * 1024;
/// Default of [`MajorityConfig::max_records_in_flight`].
pub const DEFAULT_MAX_RECORDS_IN_FLIGHT: usize = 1;
/// Largest [`MajorityConfig::max_records_in_flight`].
pub const MAX_RECORDS_IN_FLIGHT: usize = 1_024;

/// Upper bounds that keep a typo from configuring a week-long timeout.
const MAX_TIMEOUT_MS: u64 = 60 * 60 * 1_000;
const MAX_RETRY_ATTEMPTS: u32 = 100;
const MAX_RETENTION_MS: u64 = 365 * 24 * 60 * 60 * 1_000;
const MAX_COUNT: u64 = 1 << 32;

impl PluginConfig for MajorityConfig {
    fn validate(&self) -> Result<(), PluginError> {
        MajorityConfig::validate(self)
    }
}

impl MajorityConfig {
    /// Parses the configuration section (`{"kind": "majority-2pc", ...}`); absent keys keep their
    /// defaults, unknown keys and out-of-range values are [`PluginError::Config`] errors naming
    /// the key.
    pub fn from_value(config: &Value) -> Result<Self, PluginError> {
        parse_config(PLUGIN, config)
    }

    /// Checks each value's range and the relations between values.
    pub fn validate(&self) -> Result<(), PluginError> {
        self.promise_threshold.check("promise_threshold", true)?;
        self.commit_threshold.check("commit_threshold", false)?;
        let size = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        for (key, value, min, max) in [
            ("record_timeout_ms", self.record_timeout_ms, 1, MAX_TIMEOUT_MS),
            ("request_timeout_ms", self.request_timeout_ms, 1, MAX_TIMEOUT_MS),
            ("grace_ms", self.grace_ms, 1, MAX_TIMEOUT_MS),
            ("retry_attempts", u64::from(self.retry_attempts), 0, u64::from(MAX_RETRY_ATTEMPTS)),
            ("retry_base_ms", self.retry_base_ms, 1, MAX_TIMEOUT_MS),
            ("retry_max_ms", self.retry_max_ms, 1, MAX_TIMEOUT_MS),
            ("recovery_backoff_max_ms", self.recovery_backoff_max_ms, 1, MAX_TIMEOUT_MS),
            ("max_reservations", size(self.max_reservations), 1, MAX_COUNT),
            ("max_reservations_per_sender", size(self.max_reservations_per_sender), 1, MAX_COUNT),
            ("max_reservations_outsiders", size(self.max_reservations_outsiders), 1, MAX_COUNT),
            ("max_record_blocks", size(self.max_record_blocks), 1, MAX_COUNT),
            ("max_rejections_per_sender", size(self.max_rejections_per_sender), 1, MAX_COUNT),
            ("max_rejections", size(self.max_rejections), 1, MAX_COUNT),
            ("max_recovery_queries_in_flight", size(self.max_recovery_queries_in_flight), 1, MAX_COUNT),
            ("marker_retention_ms", self.marker_retention_ms, 1, MAX_RETENTION_MS),
            ("recovery_bound_ms", self.recovery_bound_ms, 1, MAX_RETENTION_MS),
        ] {
            if !(min..=max).contains(&value) {
                return Err(config_error(format!("{key}: {value} is outside {min}..={max}")));
            }
        }
        if self.retry_base_ms > self.retry_max_ms {
            return Err(config_error(format!(
                "retry_base_ms ({}) exceeds retry_max_ms ({})",
                self.retry_base_ms, self.retry_max_ms
            )));
        }
        if self.retry_max_ms > self.recovery_backoff_max_ms {
            return Err(config_error(format!(
                "retry_max_ms ({}) exceeds recovery_backoff_max_ms ({})",
                self.retry_max_ms, self.recovery_backoff_max_ms
            )));
        }
        if self.marker_retention_ms < self.grace_ms.saturating_mul(2) {
            return Err(config_error(format!(
                "marker_retention_ms ({}) must be at least twice grace_ms ({})",
                self.marker_retention_ms, self.grace_ms
            )));
        }
        if self.recovery_bound_ms < self.grace_ms || self.recovery_bound_ms > self.marker_retention_ms {
            return Err(config_error(format!(
                "recovery_bound_ms ({}) must be between grace_ms ({}) and marker_retention_ms ({})",
                self.recovery_bound_ms, self.grace_ms, self.marker_retention_ms
            )));
        }
        if self.max_reservations == 0
            || self.max_recovery_queries_in_flight == 0
            || self.max_reservations_per_sender == 0
        {
            return Err(config_error(
                "max_reservations, max_reservations_per_sender and max_recovery_queries_in_flight must be at least 1"
                    .into(),
            ));
        }
        if !(1..=MAX_RECORD_OPERATIONS).contains(&self.max_batch_ops) {
            return Err(config_error(format!(
                "max_batch_ops: {} is outside 1..={MAX_RECORD_OPERATIONS}",
                self.max_batch_ops
            )));
        }
        if !(MIN_BATCH_BYTES..=MAX_BATCH_BYTES).contains(&self.max_batch_bytes) {
            return Err(config_error(format!(
                "max_batch_bytes: {} is outside {MIN_BATCH_BYTES}..={MAX_BATCH_BYTES}",
                self.max_batch_bytes
            )));
        }
        if !(1..=MAX_RECORDS_IN_FLIGHT).contains(&self.max_records_in_flight) {
            return Err(config_error(format!(
                "max_records_in_flight: {} is outside 1..={MAX_RECORDS_IN_FLIGHT}",
                self.max_records_in_flight
            )));
        }
        for (key, budget) in [("max_reservations", self.max_reservations), ("max_rejections", self.max_rejections)] {
            if self.max_record_blocks > budget {
                return Err(config_error(format!(
                    "max_record_blocks ({}) exceeds {key} ({budget}): members would refuse the largest records as busy",
                    self.max_record_blocks
                )));
            }
        }
        if self.max_batch_ops > self.max_record_blocks {
            return Err(config_error(format!(
                "max_batch_ops ({}) exceeds max_record_blocks ({}): every operation names at least one block",
                self.max_batch_ops, self.max_record_blocks
            )));
        }
        if self.max_batch_ops > self.max_reservations_per_sender {
            return Err(config_error(format!(
                "max_batch_ops ({}) exceeds max_reservations_per_sender ({}): members would refuse full batches as busy",
                self.max_batch_ops, self.max_reservations_per_sender
            )));
        }

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(Threshold::Majority.of(1), 1);
        assert_eq!(Threshold::Majority.of(3), 2);
        assert_eq!(Threshold::Majority.of(4), 3);
        assert_eq!(Threshold::Majority.of(5), 3);
        assert_eq!(Threshold::Count(4).of(3), 3);
        assert_eq!(Threshold::Count(1).of(5), 3, "never below a majority");
        assert_eq!(Threshold::Count(1).promise_quorum(5), 3);
        assert_eq!(Threshold::Count(2).of(3), 2);
        assert!(Threshold::Count(2).check_cluster_size("t", 5).is_err());
        assert!(Threshold::Count(3).check_cluster_size("t", 5).is_ok());
        assert!(Threshold::Majority.check_cluster_size("t", 5).is_ok());
        assert_eq!(Threshold::Count(5).promise_quorum(5), 5);
        assert_eq!(Threshold::Fraction(0.75).of(4), 3);
        assert_eq!(Threshold::Fraction(0.7).of(3), 3);
        assert_eq!(Threshold::Fraction(1.0).of(5), 5);
        assert_eq!(Threshold::Fraction(0.1).of(3), 2, "never below a majority");
        assert_eq!(Threshold::Majority.of(0), 1);
    }

    #[test]
    fn parses_and_defaults() {
        assert_eq!(MajorityConfig::from_value(&json!({"kind": "majority-2pc"})).unwrap(), MajorityConfig::default());
        assert_eq!(MajorityConfig::from_value(&Value::Null).unwrap(), MajorityConfig::default());
        let config = MajorityConfig::from_value(&json!({
            "kind": "majority-2pc",
            "promise_threshold": 0.75,
            "commit_threshold": 2,
            "record_timeout_ms": 5000,
            "request_timeout_ms": 100,
            "grace_ms": 300,
            "retry_attempts": 0,
            "retry_base_ms": 10,
            "retry_max_ms": 20,
            "recovery_backoff_max_ms": 40,
            "recovery_bound_ms": 500,
            "max_reservations": 3,
            "max_reservations_per_sender": 2,
            "max_record_blocks": 2,
            "max_recovery_queries_in_flight": 2,
            "marker_retention_ms": 600,
            "max_batch_ops": 2,
            "max_batch_bytes": 4096,
            "max_records_in_flight": 3
        }))
        .unwrap();
        assert_eq!((config.max_batch_ops, config.max_batch_bytes, config.max_records_in_flight), (2, 4096, 3));
        assert_eq!(config.promise_threshold, Threshold::Fraction(0.75));
        assert_eq!(config.commit_threshold, Threshold::Count(2));
        assert_eq!(config.retry_attempts, 0);
        assert_eq!(config.max_reservations, 3);
        assert_eq!(config.recovery_bound_ms, 500);
        assert_eq!(MajorityConfig::default().recovery_bound_ms, 600_000);
    }

    #[test]
    fn the_declared_defaults_are_the_defaults_and_every_option() {
        let declared = Value::Object(defaults());
        assert_eq!(MajorityConfig::from_value(&declared).unwrap(), MajorityConfig::default());
        let custom = MajorityConfig {
            promise_threshold: Threshold::Fraction(0.75),
            commit_threshold: Threshold::Count(2),
            ..MajorityConfig::default()
        };
        assert_eq!(MajorityConfig::from_value(&Value::Object(custom.to_options())).unwrap(), custom);
        assert_eq!(defaults().len(), 18, "every option of from_value is declared");
    }

    #[test]
    fn refuses_bad_values_with_the_key_named() {
        for (bad, needle) in [
            (json!({"promise_threshold": 0.5}), "promise_threshold"),
            (json!({"promise_threshold": 0}), "at least 1"),
            (json!({"commit_threshold": 1.5}), "commit_threshold"),
            (json!({"commit_threshold": 0.5}), "commit fraction"),
            (json!({"commit_threshold": 1}), "below a majority"),
            (json!({"promise_threshold": 1}), "below a majority"),
            (json!({"commit_threshold": "most"}), "commit_threshold"),
            (json!({"request_timeout_ms": 0}), "request_timeout_ms"),
            (json!({"grace_ms": -1}), "grace_ms"),
            (json!({"retry_attempts": 1000}), "retry_attempts"),
            (json!({"retry_base_ms": 500, "retry_max_ms": 100}), "retry_base_ms"),
            (json!({"marker_retention_ms": 10}), "marker_retention_ms"),
            (json!({"max_reservations": 0}), "max_reservations"),
            (json!({"recovery_bound_ms": 0}), "recovery_bound_ms"),
            (json!({"grace_ms": 300, "recovery_bound_ms": 200}), "recovery_bound_ms"),
            (json!({"marker_retention_ms": 60_000, "recovery_bound_ms": 60_001}), "recovery_bound_ms"),
            (json!({"max_batch_ops": 0}), "max_batch_ops"),
            (json!({"max_batch_ops": 1025}), "max_batch_ops"),
            (json!({"max_batch_ops": "many"}), "max_batch_ops"),
            (json!({"max_batch_ops": 64, "max_reservations_per_sender": 10}), "max_batch_ops"),
            (json!({"max_batch_bytes": 100}), "max_batch_bytes"),
            (json!({"max_reservations_outsiders": 0}), "max_reservations_outsiders"),
            (json!({"max_record_blocks": 0}), "max_record_blocks"),
            (json!({"max_record_blocks": 20_000}), "max_record_blocks"),
            (json!({"max_rejections": 100}), "max_rejections"),
            (json!({"max_rejections_per_sender": 0}), "max_rejections_per_sender"),
            (json!({"max_batch_ops": 64, "max_record_blocks": 10}), "max_batch_ops"),
            (json!({"max_records_in_flight": 0}), "max_records_in_flight"),
            (json!({"colour": "blue"}), "unknown field `colour`"),
            (json!([1]), "expected a table"),
        ] {
            let e = MajorityConfig::from_value(&bad).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(PLUGIN), "{bad}: {e}");
        }
    }
}
