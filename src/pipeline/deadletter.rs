//! Dead letters (CONTRACT §6): the record as consumed, the error code and
//! message, and where it came from. Logged and counted together.

use crate::ingest::Rejection;
use crate::log::{LogRecord, OutRecord};
use crate::model::time;
use base64::Engine;
use serde_json::json;

/// Builds the dead letter of a record and counts it.
pub fn dead_letter(dlq_topic: &str, err: &Rejection, src: &LogRecord) -> OutRecord {
    let LogRecord {
        topic,
        partition,
        offset,
        timestamp_ms,
        ..
    } = src;
    let (topic, partition, offset, timestamp_ms) =
        (topic.as_str(), *partition, *offset, *timestamp_ms);
    let key = src.key.as_deref();
    let payload = &src.value;
    let b64 = base64::engine::general_purpose::STANDARD;
    metrics::counter!("contextd_records_dead_lettered_total", "topic" => topic.to_string(), "code" => err.code.as_str()).increment(1);
    tracing::debug!(code = err.code.as_str(), topic, partition, offset, message = %err.message, "record dead-lettered");
    let value = json!({
        "error": {"code": err.code.as_str(), "message": err.message},
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": time::format_rfc3339(time::ms_to_ns(timestamp_ms)),
        "key_base64": key.map(|k| b64.encode(k)),
        "payload_base64": b64.encode(payload),
    });
    OutRecord {
        topic: dlq_topic.to_string(),
        partition: None,
        key: key.map(<[u8]>::to_vec),
        value: serde_json::to_vec(&value).expect("json").into(),
        timestamp_ms,
    }
}
