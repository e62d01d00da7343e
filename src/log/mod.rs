//! Logs: the topics contextd reads and writes. Two implementations behind
//! the same types: `embedded` (durable local topics: segment files whose
//! committed ends are kept in the state store) and
//! `kafka` (rdkafka). The pipeline is written once against `LogRecord` and
//! `OutRecord`.

pub mod embedded;
pub mod kafka;
pub mod segment;

use bytes::Bytes;
use std::borrow::Cow;

/// One record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Log time in milliseconds (Kafka timestamp).
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    /// Shared: a records-log entry decodes its events' properties as
    /// slices of it, not copies.
    pub value: Bytes,
}

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    /// Explicit partition (broadcasts); `None` = by key (murmur2), or 0 without key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Payload,
    pub timestamp_ms: i64,
}

/// The value of a record to append: bytes of its own (`head`), then bytes
/// shared with whoever keeps them (`tail`; a snapshot: its header and
/// profiles, then the buffer of its events the user cache keeps for the
/// next snapshot). An embedded commit copies both straight into the file,
/// with no snapshot buffer in between (BENCHMARKS.md item 56); a Kafka
/// producer takes it `contiguous`.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    head: Vec<u8>,
    tail: Bytes,
}

impl Payload {
    pub fn from_parts(head: Vec<u8>, tail: Bytes) -> Payload {
        Payload { head, tail }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in order, as the non-empty slices they are kept in.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + Clone {
        [&self.head[..], &self.tail[..]]
            .into_iter()
            .filter(|s| !s.is_empty())
    }

    /// The bytes in one slice: borrowed when they are in one already.
    pub fn contiguous(&self) -> Cow<'_, [u8]> {
        if self.tail.is_empty() {
            Cow::Borrowed(&self.head)
        } else if self.head.is_empty() {
            Cow::Borrowed(&self.tail)
        } else {
            Cow::Owned(self.to_vec())
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.tail);
        v
    }
}

impl From<Vec<u8>> for Payload {
    fn from(head: Vec<u8>) -> Payload {
        Payload {
            head,
            tail: Bytes::new(),
        }
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Payload {
        bytes.to_vec().into()
    }
}

/// Equal when the bytes are, however they are split.
impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.len() == other.len() && self.contiguous() == other.contiguous()
    }
}

impl Eq for Payload {}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        self.len() == other.len() && *self.contiguous() == *other
    }
}

impl PartialEq<Vec<u8>> for Payload {
    fn eq(&self, other: &Vec<u8>) -> bool {
        *self == other[..]
    }
}

impl PartialEq<Payload> for Vec<u8> {
    fn eq(&self, other: &Payload) -> bool {
        *other == self[..]
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_its_bytes_however_they_are_split() {
        let one = Payload::from(b"snapshot".to_vec());
        let split = Payload::from_parts(b"snap".to_vec(), Bytes::from_static(b"shot"));
        let no_head = Payload::from_parts(Vec::new(), Bytes::from_static(b"snapshot"));
        let no_tail = Payload::from_parts(b"snapshot".to_vec(), Bytes::new());
        for p in [&one, &split, &no_head, &no_tail] {
            assert_eq!(p.len(), 8);
            assert_eq!(p.to_vec(), b"snapshot");
            assert_eq!(&*p.contiguous(), b"snapshot");
            assert!(p.slices().all(|s| !s.is_empty()), "no empty slices");
            assert_eq!(*p, one);
            assert_eq!(*p, b"snapshot".to_vec());
        }
        assert_eq!(split.slices().count(), 2);
        assert_eq!(no_head.slices().count(), 1);
        for p in [&one, &no_head, &no_tail] {
            assert!(matches!(p.contiguous(), Cow::Borrowed(_)));
        }
        assert_ne!(split, Payload::from(b"snapshoT".to_vec()));
        assert_ne!(split, Payload::from(b"snapsho".to_vec()));
        assert!(Payload::default().is_empty());
        assert_eq!(Payload::default().slices().count(), 0);
    }
}
