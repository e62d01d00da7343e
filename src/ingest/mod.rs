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

/// Limits that validation enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: 1024 * 1024,
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

pub use fields::{normalize_identifier, parse_object, sort_by_priority};
