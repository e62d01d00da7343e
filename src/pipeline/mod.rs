//! The processing loop, transport-agnostic. Two stages, as in a Kafka
//! Streams topology:
//!
//! - `router`: input topics -> normalize -> resolve the user -> the records
//!   log (`context.records`, keyed by user_id) or the dead-letter topic;
//! - `materializer`: records log -> apply to per-user state -> snapshots.
//!
//! Each stage turns a batch of `LogRecord`s into a RocksDB `WriteBatch` plus
//! the `OutRecord`s to publish; the transport (`embedded` here, `kafka` in
//! `crate::log::kafka`) makes them durable together with the positions.

pub mod deadletter;
pub mod embedded;
pub mod kafka;
pub mod materializer;
pub mod router;

use crate::ingest::InputKind;

/// A stage's batch reads at most this many times `pipeline.batch_records`
/// in all (routing: over every input partition, or Kafka mode's poll; a
/// materializing thread: over its partitions, or a Kafka-mode worker's
/// shares merged), so a backlog on many partitions does not make one batch
/// (and its memory) many times bigger than the setting. Both modes alike.
pub(crate) const ROUTE_BUDGET: usize = 4;
pub(crate) const MATERIALIZE_BUDGET: usize = 2;

/// Counts a record of `topic` (a batch's records come from a few topics:
/// both stages increment their per-topic metrics once per batch and topic).
pub fn count_topic<'a>(counts: &mut Vec<(&'a str, u64)>, topic: &'a str) {
    match counts.iter_mut().find(|(t, _)| *t == topic) {
        Some((_, n)) => *n += 1,
        None => counts.push((topic, 1)),
    }
}

/// Topic names (CONTRACT §2), each configurable.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Topics {
    pub zendesk_events: String,
    pub sunshine_events: String,
    pub sunshine_profiles: String,
    pub settings: String,
    pub snapshots: String,
    pub dlq: String,
    /// Internal: resolved records keyed by user_id.
    pub records: String,
    /// Internal (Kafka mode): identity links, compacted, read in full by every instance.
    pub identities: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            zendesk_events: "zendesk.events".into(),
            sunshine_events: "sunshine.events".into(),
            sunshine_profiles: "sunshine.profiles".into(),
            settings: "context.settings".into(),
            snapshots: "context.snapshots".into(),
            dlq: "context.dlq".into(),
            records: "context.records".into(),
            identities: "context.identities".into(),
        }
    }
}

impl Topics {
    pub fn kind(&self, topic: &str) -> Option<InputKind> {
        if topic == self.zendesk_events {
            Some(InputKind::ZendeskEvents)
        } else if topic == self.sunshine_events {
            Some(InputKind::CustomEvents)
        } else if topic == self.sunshine_profiles {
            Some(InputKind::Profiles)
        } else if topic == self.settings {
            Some(InputKind::Settings)
        } else {
            None
        }
    }

    /// The kind of an input topic, or why `topic` is not one (the answer to
    /// a write to any other topic).
    pub fn input_kind(&self, topic: &str) -> Result<InputKind, String> {
        self.kind(topic).ok_or_else(|| {
            format!(
                "{topic:?} is not an input topic; use one of {:?}",
                self.inputs()
            )
        })
    }

    /// Topics the routing stage consumes.
    pub fn inputs(&self) -> [&str; 4] {
        [
            &self.zendesk_events,
            &self.sunshine_events,
            &self.sunshine_profiles,
            &self.settings,
        ]
    }
}

/// Of streams of log records, each in offset order, the one whose head
/// comes first by log time (ties: the first stream): how both routing
/// stages merge their inputs.
pub(crate) fn earliest(
    streams: &[std::collections::VecDeque<crate::log::LogRecord>],
) -> Option<usize> {
    streams
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.front().map(|r| (r.timestamp_ms, i)))
        .min()
        .map(|(_, i)| i)
}

/// Snapshot encoding on the output topic.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotFormat {
    #[default]
    Protobuf,
    Json,
}

impl SnapshotFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            SnapshotFormat::Protobuf => {
                "application/x-protobuf; messageType=contextd.v1.ContextSnapshot"
            }
            SnapshotFormat::Json => "application/json",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
}

impl From<rocksdb::Error> for PipelineError {
    fn from(e: rocksdb::Error) -> Self {
        PipelineError::Store(e.into())
    }
}
