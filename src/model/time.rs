//! Timestamps: Unix nanoseconds inside, RFC 3339 outside.

use chrono::{DateTime, SecondsFormat, Utc};

/// Parses an RFC 3339 timestamp (fractions and offsets allowed) to Unix nanoseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let dt = DateTime::parse_from_rfc3339(text.trim()).ok()?;
    dt.timestamp_nanos_opt()
}

/// Formats Unix nanoseconds as RFC 3339 UTC, with as many fraction digits as needed.
pub fn format_rfc3339(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub fn to_timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn from_timestamp(ts: &Option<prost_types::Timestamp>) -> i64 {
    ts.as_ref()
        .map(|t| t.seconds * 1_000_000_000 + t.nanos as i64)
        .unwrap_or(0)
}

/// Milliseconds (Kafka timestamps) to nanoseconds.
pub fn ms_to_ns(ms: i64) -> i64 {
    ms.saturating_mul(1_000_000)
}

/// Wall clock in milliseconds: only the shell uses it (log append times).
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_fractions_and_offsets() {
        let a = parse_rfc3339("2026-11-20T10:00:00Z").unwrap();
        let b = parse_rfc3339("2026-11-20T11:00:00+01:00").unwrap();
        assert_eq!(a, b);
        let c = parse_rfc3339("2026-11-20T10:00:00.5Z").unwrap();
        assert_eq!(c - a, 500_000_000);
        assert_eq!(format_rfc3339(a), "2026-11-20T10:00:00Z");
        assert_eq!(format_rfc3339(c), "2026-11-20T10:00:00.500Z");
        assert!(parse_rfc3339("yesterday").is_none());
        assert!(parse_rfc3339("2026-11-20").is_none());
        assert_eq!(from_timestamp(&Some(to_timestamp(c))), c);
    }
}
