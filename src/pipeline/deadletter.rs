//! Dead letters (CONTRACT §6): the record as consumed, the error code and
//! message, and where it came from. Logged and counted together.

use crate::ingest::Rejection;
use crate::log::{LogRecord, OutRecord};
use crate::model::time;
use base64::Engine;
use serde_json::json;

/// A dead letter cut to at most `max` bytes: `payload_base64` keeps the
/// payload's first bytes, and `payload_truncated: true` with
/// `payload_bytes` (the whole payload's length) say so. For a Kafka
/// dead-letter topic, whose messages are limited (librdkafka's
/// `message.max.bytes`, 1,000,000 by default): a record refused as
/// `too_large` makes a dead letter a third larger than itself (base64).
/// `None` if `value` already fits or is not a dead letter.
pub fn fit(value: &[u8], max: usize) -> Option<Vec<u8>> {
    if value.len() <= max {
        return None;
    }
    let mut v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let payload = v.get("payload_base64")?.as_str()?.to_string();
    let over = value.len() - max;
    // Whole base64 quanta (4 characters, 3 bytes); room for the new fields.
    let keep = payload.len().saturating_sub(over + 256) / 4 * 4;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&payload)
        .map_or(payload.len() / 4 * 3, |b| b.len());
    v["payload_base64"] = payload[..keep].into();
    v["payload_truncated"] = true.into();
    v["payload_bytes"] = bytes.into();
    Some(serde_json::to_vec(&v).expect("json"))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::ErrorCode;

    /// A dead letter larger than a Kafka message is cut to fit, and says so;
    /// one that fits is left alone.
    #[test]
    fn a_dead_letter_too_big_for_a_message_is_cut_to_fit() {
        let src = LogRecord {
            topic: "sunshine.events".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: 0,
            key: Some(b"k".to_vec()),
            value: vec![b'x'; 900_000].into(),
        };
        let err = Rejection::new(ErrorCode::TooLarge, "too large");
        let d = dead_letter("context.dlq", &err, &src);
        let whole = d.value.to_vec();
        assert!(whole.len() > 1_000_000);
        assert_eq!(fit(&whole, 2_000_000), None);
        let cut = fit(&whole, 936_000).expect("cut");
        assert!(cut.len() <= 936_000, "{}", cut.len());
        let v: serde_json::Value = serde_json::from_slice(&cut).unwrap();
        assert_eq!(v["payload_truncated"], true);
        assert_eq!(v["payload_bytes"], 900_000);
        assert_eq!(v["error"]["code"], "too_large");
        assert_eq!(v["offset"], 7);
        let kept = base64::engine::general_purpose::STANDARD
            .decode(v["payload_base64"].as_str().unwrap())
            .unwrap();
        assert!(kept.len() > 600_000 && kept.iter().all(|b| *b == b'x'));
    }
}
