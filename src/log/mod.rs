//! Logs: the topics contextd reads and writes. Two implementations behind
//! the same types: `embedded` (durable local topics: segment files whose
//! committed ends are kept in the state store) and
//! `kafka` (rdkafka). The pipeline is written once against `LogRecord` and
//! `OutRecord`.

pub mod embedded;
pub mod kafka;
pub mod segment;

/// One record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Log time in milliseconds (Kafka timestamp).
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    /// Explicit partition (broadcasts); `None` = by key (murmur2), or 0 without key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub timestamp_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A log file does not hold what the state store says was committed.
    #[error("{0}")]
    Corrupt(String),
    /// The client can no longer be used (e.g. an idempotent producer's fatal
    /// error): retrying cannot help; the process stops so it is restarted.
    #[error(
        "fatal kafka client error: {0}; restart contextd (state and the outbox make this safe)"
    )]
    KafkaFatal(String),
}

impl LogError {
    pub fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> LogError {
        LogError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<rocksdb::Error> for LogError {
    fn from(e: rocksdb::Error) -> Self {
        LogError::Store(e.into())
    }
}
