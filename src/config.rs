//! Configuration: one serde tree, layered defaults < TOML file (`--config`)
//! < `CONTEXTD_*` environment variables (nested keys with `__`, e.g.
//! `CONTEXTD_SNAPSHOT__MAX_EVENTS=20`) < command-line flags.

use crate::pipeline::{SnapshotFormat, Topics};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// Where the state store (and in embedded mode the topics) live.
    pub data_dir: PathBuf,
    /// HTTP API listen address.
    pub http_addr: String,
    /// Kafka bootstrap servers; absent = embedded mode.
    pub brokers: Option<String>,
    /// Kafka consumer group shared by all instances.
    pub group_id: String,
    /// Partitions of the topics contextd creates (and of the records log,
    /// which partitions state). Fixed for the life of a data dir.
    pub partitions: u32,
    /// Replication factor of topics contextd creates in Kafka mode.
    pub replication_factor: i32,
    /// Encoding of `context.snapshots` values.
    pub snapshot_format: SnapshotFormat,
    pub log_format: LogFormat,
    /// Records larger than this are dead-lettered (`too_large`).
    pub max_record_bytes: usize,
    pub topics: Topics,
    pub snapshot: SnapshotConfig,
    pub timeline: TimelineConfig,
    pub pipeline: PipelineConfig,
    pub storage: StorageConfig,
    pub kafka: KafkaConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SnapshotConfig {
    /// Most events a snapshot shows.
    pub max_events: usize,
    /// Shortest time between two snapshots of one user, in milliseconds:
    /// changes within it are held and published as one snapshot when it
    /// ends (a user quiet for longer is published at once); 0 (default) =
    /// a snapshot every batch that changes the context.
    pub min_interval_ms: u64,
    /// Largest snapshot, in bytes of its published form: a larger one
    /// leaves out its oldest events (then its last profiles) until it
    /// fits. Kafka mode: at most the producer's `message.max.bytes` less
    /// 64 KiB (the key, headers and framing).
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TimelineConfig {
    /// Events kept per user; the oldest are dropped beyond this.
    pub max_events_per_user: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PipelineConfig {
    /// Most records a stage reads per partition per batch (a routing batch
    /// reads about 4x this in all, a materializing thread's 2x). Bigger
    /// batches coalesce more snapshots (one per user per batch) at some latency.
    pub batch_records: usize,
    /// Idle poll interval in milliseconds (appends wake the stages at once).
    pub idle_wait_ms: u64,
    /// Shortest time between two batches of the materializing stage, in
    /// milliseconds: a burst for one user within it becomes one snapshot.
    pub linger_ms: u64,
    /// Threads of the materializing stage, each over its share of the
    /// records partitions (Kafka mode: workers over each polled batch); 0 =
    /// one per core (at most one per partition).
    pub materializer_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StorageConfig {
    /// RocksDB block cache, MiB.
    pub block_cache_mb: usize,
    /// RocksDB memtable size per column family, MiB.
    pub write_buffer_mb: usize,
    /// Decoded states of recently touched users kept in memory by the
    /// materializing stage (busy users are not re-read for every batch), MiB.
    pub user_cache_mb: usize,
    /// fsync every commit (power-loss safe; slower).
    pub sync_writes: bool,
    /// Embedded mode: snapshots kept per partition of the local
    /// `context.snapshots` log (older ones are deleted; the latest snapshot
    /// of every user can always be rebuilt from the state: `GET /context`).
    pub snapshot_log_retention: i64,
    /// Embedded mode: size of one segment file of a local topic partition,
    /// MiB (retention deletes whole segments).
    pub log_segment_mb: u64,
    /// Embedded mode: the newest MiB of each local topic partition kept in
    /// the OS page cache after they are written; older bytes are written
    /// back and dropped from it (the stages read right behind the end).
    /// 0: off, the OS keeps everything cached until it needs the memory.
    pub log_page_cache_mb: u64,
    /// Embedded mode: while the materializing stage is behind (a batch of
    /// at least `pipeline.batch_records` records), and for a commit of at
    /// least 1 MiB of snapshots, the local
    /// `context.snapshots` log is written with direct I/O (`O_DIRECT`),
    /// past the OS page cache: no stage reads it back. Falls back to
    /// buffered writes where the file system refuses.
    pub snapshot_log_direct_io: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct KafkaConfig {
    /// Extra librdkafka consumer settings (TLS, SASL, timeouts...).
    #[serde(deserialize_with = "settings_map")]
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka producer settings.
    #[serde(deserialize_with = "settings_map")]
    pub producer: BTreeMap<String, String>,
    /// The HTTP address other instances use to reach this one (defaults to http_addr).
    pub advertised_http_addr: Option<String>,
}

/// The smallest `snapshot.max_bytes`: room for a user id and a few events.
pub const MIN_SNAPSHOT_BYTES: usize = 4096;

/// What a Kafka message needs beside its value (key, headers, framing):
/// snapshots, routed records and dead letters stay this far under the
/// producer's `message.max.bytes`.
pub const KAFKA_MESSAGE_ROOM: usize = 64 * 1024;

impl KafkaConfig {
    /// The producer's `message.max.bytes` (librdkafka's default: 1000000).
    pub fn max_message_bytes(&self) -> usize {
        self.producer
            .get("message.max.bytes")
            .and_then(|m| m.trim().parse::<usize>().ok())
            .unwrap_or(1_000_000)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            http_addr: "127.0.0.1:8080".into(),
            brokers: None,
            group_id: "contextd".into(),
            partitions: 8,
            replication_factor: 1,
            snapshot_format: SnapshotFormat::Protobuf,
            log_format: LogFormat::Human,
            max_record_bytes: 1024 * 1024,
            topics: Topics::default(),
            snapshot: SnapshotConfig::default(),
            timeline: TimelineConfig::default(),
            pipeline: PipelineConfig::default(),
            storage: StorageConfig::default(),
            kafka: KafkaConfig::default(),
        }
    }
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            max_events: 50,
            min_interval_ms: 0,
            max_bytes: 900_000,
        }
    }
}

impl Default for TimelineConfig {
    fn default() -> Self {
        TimelineConfig {
            max_events_per_user: 1000,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_records: 4096,
            idle_wait_ms: 200,
            linger_ms: 20,
            materializer_threads: 0,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            block_cache_mb: 128,
            write_buffer_mb: 32,
            user_cache_mb: 256,
            sync_writes: false,
            snapshot_log_retention: 100_000,
            log_segment_mb: 64,
            log_page_cache_mb: 16,
            snapshot_log_direct_io: true,
        }
    }
}

/// Flag values given on the command line (only those set override).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_format: Option<SnapshotFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// librdkafka settings as text, whatever type the source gave them
/// (`CONTEXTD_KAFKA__PRODUCER__LINGER_MS=5` is a number to the environment
/// provider, `"linger.ms" = 5` to TOML): librdkafka takes strings.
fn settings_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(BTreeMap::<String, Scalar>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::Text(s) => s,
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Bool(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

/// librdkafka settings whose names have an underscore of their own (the
/// others separate words with dots).
const LIBRDKAFKA_UNDERSCORED: [&str; 2] = ["log_level", "enabled_events"];

/// librdkafka setting names are dotted (`security.protocol`), and a dot
/// cannot be written in an environment variable's name: in
/// `CONTEXTD_KAFKA__CONSUMER__SECURITY_PROTOCOL` (and `..._PRODUCER__...`)
/// each underscore stands for a dot. Keys from the config file are taken
/// as written.
fn librdkafka_names_from_env(k: &mut KafkaConfig) {
    for (section, map) in [
        ("CONTEXTD_KAFKA__CONSUMER__", &mut k.consumer),
        ("CONTEXTD_KAFKA__PRODUCER__", &mut k.producer),
    ] {
        for (var, _) in std::env::vars_os() {
            let Some(name) = var.to_str().and_then(|v| v.strip_prefix(section)) else {
                continue;
            };
            let name = name.to_lowercase();
            if LIBRDKAFKA_UNDERSCORED.contains(&name.as_str()) {
                continue;
            }
            if let Some(v) = map.remove(&name) {
                map.insert(name.replace('_', "."), v);
            }
        }
    }
}

/// A configuration error in one line: the setting, where its value came
/// from (the config file's path, or the environment variable),
/// and what is wrong, without figment's profile prefix or doubled quotes.
fn describe(e: figment::Error) -> ConfigError {
    let one = |e: &figment::Error| {
        let key = e.path.join(".");
        let from = match e.metadata.as_ref() {
            Some(md) => match &md.source {
                Some(figment::Source::File(p)) => format!(" in {}", p.display()),
                _ if md.name.contains("environment") => {
                    format!(
                        " (environment variable CONTEXTD_{})",
                        key.to_uppercase().replace('.', "__")
                    )
                }
                _ => String::new(),
            },
            None => String::new(),
        };
        let what = e.kind.to_string().replace("``", "`");
        if key.is_empty() {
            format!("{what}{from}")
        } else {
            format!("{key}{from}: {what}")
        }
    };
    ConfigError(
        e.into_iter()
            .map(|e| one(&e))
            .collect::<Vec<_>>()
            .join("; "),
    )
}

impl Config {
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            match std::fs::metadata(f) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ConfigError(format!(
                        "config file {} does not exist",
                        f.display()
                    )))
                }
                Err(e) => {
                    return Err(ConfigError(format!(
                        "cannot read config file {}: {e}",
                        f.display()
                    )))
                }
                // Figment reads a directory as an empty file: say so instead.
                Ok(m) if !m.is_file() => {
                    return Err(ConfigError(format!(
                        "config file {} is not a file",
                        f.display()
                    )))
                }
                Ok(_) => {}
            }
            check_file_keys(f)?;
            fig = fig.merge(Toml::file(f));
        }
        fig = fig
            .merge(Env::prefixed("CONTEXTD_").split("__").ignore(&["config"]))
            .merge(Serialized::defaults(flags));
        let mut c: Config = fig.extract().map_err(describe)?;
        librdkafka_names_from_env(&mut c.kafka);
        if c.brokers.as_deref().is_some_and(|b| b.trim().is_empty()) {
            c.brokers = None;
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.partitions == 0 || self.partitions > 10_000 {
            return Err(ConfigError(format!(
                "partitions must be between 1 and 10000, got {}",
                self.partitions
            )));
        }
        if self.snapshot.max_events == 0 || self.timeline.max_events_per_user == 0 {
            return Err(ConfigError(
                "snapshot.max_events and timeline.max_events_per_user must be at least 1".into(),
            ));
        }
        if self.snapshot.min_interval_ms > 3_600_000 {
            return Err(ConfigError(format!(
                "snapshot.min_interval_ms must be at most 3600000 (one hour), got {}",
                self.snapshot.min_interval_ms
            )));
        }
        if self.pipeline.batch_records == 0 {
            return Err(ConfigError(
                "pipeline.batch_records must be at least 1".into(),
            ));
        }
        if self.snapshot.max_bytes < MIN_SNAPSHOT_BYTES {
            return Err(ConfigError(format!(
                "snapshot.max_bytes must be at least {MIN_SNAPSHOT_BYTES}, got {}",
                self.snapshot.max_bytes
            )));
        }
        if self.brokers.is_some() {
            let max_message = self.kafka.max_message_bytes();
            if self.snapshot.max_bytes.saturating_add(KAFKA_MESSAGE_ROOM) > max_message {
                return Err(ConfigError(format!(
                    "snapshot.max_bytes ({}) must leave {KAFKA_MESSAGE_ROOM} bytes for a \
                     snapshot's key and headers under the producer's message.max.bytes \
                     ({max_message}): lower snapshot.max_bytes or raise \
                     kafka.producer message.max.bytes (and the topic's max.message.bytes)",
                    self.snapshot.max_bytes
                )));
            }
        }
        Ok(())
    }

    pub fn store_options(&self) -> crate::state::StoreOptions {
        crate::state::StoreOptions {
            block_cache_bytes: self.storage.block_cache_mb << 20,
            write_buffer_bytes: self.storage.write_buffer_mb << 20,
            max_write_buffers: 3,
            sync_writes: self.storage.sync_writes,
            ..Default::default()
        }
    }
}

/// A key in the config file that no setting has (a typo) is an error, not
/// a default silently kept. The known keys are those `Config` serializes;
/// an empty table among them (`kafka.consumer`, `kafka.producer`) takes
/// any key. (Environment variables are not checked: `CONTEXTD_LOG` and
/// others share the prefix.)
fn check_file_keys(file: &Path) -> Result<(), ConfigError> {
    let Ok(given) = Figment::from(Toml::file(file)).extract::<serde_json::Value>() else {
        // Syntax and type errors are reported by the full extraction.
        return Ok(());
    };
    let known = serde_json::to_value(Config::default()).expect("config serializes");
    fn walk(
        given: &serde_json::Value,
        known: &serde_json::Value,
        path: &str,
        unknown: &mut Vec<String>,
    ) {
        let (Some(g), Some(k)) = (given.as_object(), known.as_object()) else {
            return;
        };
        if k.is_empty() && !path.is_empty() {
            return;
        }
        for (key, v) in g {
            let p = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match k.get(key) {
                Some(kv) => walk(v, kv, &p, unknown),
                None => unknown.push(p),
            }
        }
    }
    let mut unknown = Vec::new();
    walk(&given, &known, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(());
    }
    Err(ConfigError(format!(
        "unknown key{} in {}: {} (see the configuration table in the README)",
        if unknown.len() > 1 { "s" } else { "" },
        file.display(),
        unknown.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)]
    fn layers_defaults_file_env_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "http_addr = \"0.0.0.0:1\"\npartitions = 3\n[snapshot]\nmax_events = 7\n",
            )?;
            jail.set_env("CONTEXTD_PARTITIONS", "5");
            jail.set_env("CONTEXTD_TIMELINE__MAX_EVENTS_PER_USER", "9");
            let flags = Overrides {
                http_addr: Some("127.0.0.1:2".into()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("c.toml")), &flags).unwrap();
            assert_eq!(c.http_addr, "127.0.0.1:2", "flag beats file");
            assert_eq!(c.partitions, 5, "env beats file");
            assert_eq!(c.snapshot.max_events, 7, "file beats default");
            assert_eq!(c.timeline.max_events_per_user, 9);
            assert_eq!(c.group_id, "contextd");
            jail.set_env("CONTEXTD_PARTITIONS", "0");
            assert!(Config::load(None, &Overrides::default()).is_err());
            jail.set_env("CONTEXTD_PARTITIONS", "5");
            jail.set_env("CONTEXTD_SNAPSHOT__MIN_INTERVAL_MS", "250");
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.snapshot.min_interval_ms, 250);
            jail.set_env("CONTEXTD_SNAPSHOT__MIN_INTERVAL_MS", "3600001");
            let err = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(
                err.to_string().contains("snapshot.min_interval_ms"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn a_bad_value_names_its_key_and_where_it_came_from() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "snapshot_format = \"xml\"\n")?;
            let e = Config::load(Some(Path::new("c.toml")), &Overrides::default())
                .unwrap_err()
                .0;
            assert!(e.starts_with("snapshot_format in "), "{e}");
            assert!(e.contains("c.toml: unknown variant"), "{e}");
            assert!(e.ends_with("expected `protobuf` or `json`"), "{e}");
            jail.set_env("CONTEXTD_SNAPSHOT__MAX_EVENTS", "abc");
            let e = Config::load(None, &Overrides::default()).unwrap_err().0;
            assert!(
                e.starts_with(
                    "snapshot.max_events (environment variable CONTEXTD_SNAPSHOT__MAX_EVENTS): "
                ),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn an_unknown_key_in_the_file_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "typo.toml",
                "partitons = 3\n[snapshot]\nmax_event = 7\n[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n",
            )?;
            let err = Config::load(Some(Path::new("typo.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("partitons") && err.contains("snapshot.max_event"),
                "{err}"
            );
            assert!(!err.contains("session.timeout.ms"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            // Every key the README documents is known, free-form tables take any key.
            jail.create_file(
                "ok.toml",
                "partitions = 3\nbrokers = \"b:9092\"\n[snapshot]\nmax_events = 7\nmin_interval_ms = 5\n\
                 [topics]\nsnapshots = \"s\"\n[kafka]\nadvertised_http_addr = \"h:1\"\n\
                 [kafka.producer]\n\"linger.ms\" = \"5\"\n[storage]\nsync_writes = true\n",
            )?;
            let c = Config::load(Some(Path::new("ok.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.snapshot.min_interval_ms, 5);
            assert_eq!(c.kafka.producer["linger.ms"], "5");
            // librdkafka's dotted names from the environment: an underscore
            // stands for a dot (but for the names that have their own),
            // and the environment beats the file.
            jail.set_env("CONTEXTD_KAFKA__CONSUMER__SECURITY_PROTOCOL", "ssl");
            jail.set_env("CONTEXTD_KAFKA__PRODUCER__LINGER_MS", "9");
            jail.set_env("CONTEXTD_KAFKA__PRODUCER__LOG_LEVEL", "7");
            let c = Config::load(Some(Path::new("ok.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.kafka.consumer["security.protocol"], "ssl");
            assert_eq!(c.kafka.producer["linger.ms"], "9");
            assert_eq!(c.kafka.producer["log_level"], "7");
            assert_eq!(c.kafka.producer.len(), 2, "{:?}", c.kafka.producer);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn snapshot_max_bytes_must_fit_a_kafka_message() {
        figment::Jail::expect_with(|jail| {
            let load = || Config::load(None, &Overrides::default());
            assert_eq!(load().unwrap().snapshot.max_bytes, 900_000);
            jail.set_env("CONTEXTD_SNAPSHOT__MAX_BYTES", "100");
            let err = load().unwrap_err().to_string();
            assert!(
                err.contains("snapshot.max_bytes must be at least 4096"),
                "{err}"
            );
            // Embedded mode takes any size; Kafka mode a message's, less room
            // for the key and headers.
            jail.set_env("CONTEXTD_SNAPSHOT__MAX_BYTES", "2000000");
            assert_eq!(load().unwrap().snapshot.max_bytes, 2_000_000);
            jail.set_env("CONTEXTD_BROKERS", "b:9092");
            let err = load().unwrap_err().to_string();
            assert!(
                err.contains("snapshot.max_bytes (2000000)") && err.contains("(1000000)"),
                "{err}"
            );
            jail.set_env("CONTEXTD_KAFKA__PRODUCER__MESSAGE_MAX_BYTES", "2065536");
            let c = load().unwrap();
            assert_eq!(c.kafka.max_message_bytes(), 2_065_536);
            let limits = crate::app::limits(&c);
            assert_eq!(limits.max_routed_bytes, 2_000_000);
            assert_eq!(
                limits.max_record_bytes,
                1 << 20,
                "max_record_bytes is smaller"
            );
            jail.set_env("CONTEXTD_SNAPSHOT__MAX_BYTES", "934465");
            jail.set_env("CONTEXTD_KAFKA__PRODUCER__MESSAGE_MAX_BYTES", "1000000");
            assert!(load().is_err());
            jail.set_env("CONTEXTD_SNAPSHOT__MAX_BYTES", "934464");
            let c = load().unwrap();
            // Inputs, too, are at most what the producer can append.
            assert_eq!(crate::app::limits(&c).max_record_bytes, 934_464);
            jail.set_env("CONTEXTD_BROKERS", "");
            let c = load().unwrap();
            assert_eq!(crate::app::limits(&c).max_record_bytes, 1 << 20);
            assert_eq!(crate::app::limits(&c).max_routed_bytes, usize::MAX);
            Ok(())
        });
    }
}
