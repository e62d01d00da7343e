//! Input formats -> normalized records (pure). Every validation rule of
//! CONTRACT §3.5 lives here with its stable error code; the same functions
//! check HTTP bodies before they are appended and log records as they are
//! consumed, so the two can never disagree.

mod events;
mod fields;
mod profiles;
mod settings;

pub use events::{custom_event, zendesk_event};
pub use profiles::profile_op;
pub use settings::{settings_from_json, settings_to_json};

use crate::model::{Identifier, ProfileOp, ProfileRef, StoredEvent};

/// Stable error codes: the DLQ's `error.code` and the HTTP `errors[].code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidJson,
    MissingField,
    InvalidField,
    ReservedSource,
    TooLarge,
    UnresolvableUser,
    NotFound,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::ReservedSource => "reserved_source",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnresolvableUser => "unresolvable_user",
            ErrorCode::NotFound => "not_found",
        }
    }
}

/// Why a record was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

/// Which input format a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    ZendeskEvents,
    CustomEvents,
    Profiles,
    Settings,
}

/// A validated input record, before user resolution.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalized {
    /// A Zendesk product event; `links` are identifiers that
    /// `identity_created` / `identity_changed` link to the Zendesk user.
    Zendesk {
        user_id: String,
        event: StoredEvent,
        links: Vec<Identifier>,
    },
    /// A custom event and the profile it names.
    Custom {
        user_id: Option<String>,
        profile: ProfileRef,
        event: StoredEvent,
    },
    /// A profile put / patch / delete.
    Profile {
        user_id: Option<String>,
        op: ProfileOp,
    },
}

impl Normalized {
    /// Explicit user id and the identifiers (priority order) the record carries.
    pub fn identity(&self) -> (Option<&str>, &[Identifier]) {
        match self {
            Normalized::Zendesk { user_id, links, .. } => (Some(user_id), links),
            Normalized::Custom {
                user_id, profile, ..
            } => (user_id.as_deref(), &profile.identifiers),
            Normalized::Profile { user_id, op } => (user_id.as_deref(), &op.identifiers),
        }
    }
}

/// The key of every `context.settings` record (the topic is compacted on it).
pub const SETTINGS_KEY: &[u8] = b"visibility";

impl Normalized {
    /// The key an input record is appended with: its user id, else its
    /// highest-priority identifier, so that one customer's records share a
    /// partition and stay in order.
    pub fn routing_key(&self) -> Option<Vec<u8>> {
        let (explicit, ids) = self.identity();
        explicit
            .map(|u| u.as_bytes().to_vec())
            .or_else(|| ids.first().map(|i| i.key().into_bytes()))
    }
}

/// The key for a raw record of `kind` appended without one (`contextd
/// produce`, NDJSON over HTTP in Kafka mode): `visibility` for settings;
/// the routing key of a record that validates; none for one that does not
/// (it is dead-lettered with whatever key it has).
pub fn input_key(kind: InputKind, bytes: &[u8], limits: Limits) -> Option<Vec<u8>> {
    match kind {
        InputKind::Settings => Some(SETTINGS_KEY.to_vec()),
        _ => normalize(kind, bytes, 0, limits).ok()?.routing_key(),
    }
}

/// Limits that validation enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_record_bytes: usize,
    /// Largest routed record (its records-log entry): Kafka mode's records
    /// topic takes at most the producer's `message.max.bytes` (less room
    /// for the key and headers). A record can route larger than it came
    /// (its properties as a protobuf Struct: a number takes 9 bytes).
    pub max_routed_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: 1024 * 1024,
            max_routed_bytes: usize::MAX,
        }
    }
}

/// Validates and normalizes one input record of `kind`. `log_time_ns` is the
/// record's log time: the default for `created_at` and the `received_at`.
pub fn normalize(
    kind: InputKind,
    bytes: &[u8],
    log_time_ns: i64,
    limits: Limits,
) -> Result<Normalized, Rejection> {
    let obj = fields::parse_record(bytes, limits)?;
    match kind {
        InputKind::ZendeskEvents => zendesk_event(&obj, log_time_ns),
        InputKind::CustomEvents => custom_event(&obj, log_time_ns),
        InputKind::Profiles => profile_op(&obj),
        InputKind::Settings => Err(Rejection::new(
            ErrorCode::InvalidField,
            "settings records are not events; use normalize_settings",
        )),
    }
}

/// Validates a settings record (CONTRACT §5).
pub fn normalize_settings(
    bytes: &[u8],
    limits: Limits,
) -> Result<crate::model::Settings, Rejection> {
    let obj = fields::parse_record(bytes, limits)?;
    settings_from_json(&obj)
}

/// A record of the settings topic: its settings, or for a tombstone (no
/// value: Kafka's delete on a compacted topic) the settings deleted, so
/// nothing is shown, as before any settings existed (CONTRACT §5).
pub fn settings_record(bytes: &[u8], limits: Limits) -> Result<crate::model::Settings, Rejection> {
    if bytes.is_empty() {
        return Ok(crate::model::Settings::default());
    }
    normalize_settings(bytes, limits)
}

pub use fields::{normalize_identifier, parse_object, sort_by_priority};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unkeyed_record_is_keyed_by_its_user_or_first_identifier() {
        let key = |kind, v: &str| {
            input_key(kind, v.as_bytes(), Limits::default()).map(|k| String::from_utf8(k).unwrap())
        };
        let ids =
            r#"[{"type": "twitter", "value": "jd"}, {"type": "EMAIL", "value": " Jane@X.com "}]"#;
        let profile = format!(r#"{{"source": "shop", "type": "customer", "identifiers": {ids}}}"#);
        let event = r#"{"source": "shop", "type": "order"}"#;
        assert_eq!(
            key(InputKind::Settings, "not even json").as_deref(),
            Some("visibility")
        );
        assert_eq!(
            key(
                InputKind::ZendeskEvents,
                r#"{"user_id": 12, "type": "article_viewed"}"#
            )
            .as_deref(),
            Some("12")
        );
        let custom = format!(r#"{{"profile": {profile}, "event": {event}}}"#);
        assert_eq!(
            key(InputKind::CustomEvents, &custom).as_deref(),
            Some("email:jane@x.com"),
            "the highest-priority identifier, normalized"
        );
        let put = format!(r#"{{"op": "put", "user_id": "u1", "profile": {profile}}}"#);
        assert_eq!(key(InputKind::Profiles, &put).as_deref(), Some("u1"));
        assert_eq!(key(InputKind::Profiles, r#"{"op": "merge"}"#), None);
        assert_eq!(key(InputKind::CustomEvents, "\u{1}"), None);
    }
}
