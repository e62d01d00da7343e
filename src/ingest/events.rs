//! Zendesk product events (CONTRACT §3.1) and custom events (§3.2).

use super::fields::{self, at, invalid, Obj};
use super::{ErrorCode, Normalized, Rejection};
use crate::model::value::Value;
use crate::model::{json, ProfileRef, StoredEvent};
use sha2::{Digest, Sha256};

pub const ZENDESK: &str = "zendesk";

/// An event id given as a string or an integer; empty = absent.
fn event_id(o: &Obj, path: &str) -> Result<Option<String>, Rejection> {
    match o.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.to_string())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(v) => Err(invalid(
            path,
            format_args!("must be a string, got {}", fields::kind_name(v)),
        )),
    }
}

/// The id of an event sent without one: a hash of its content, including
/// the effective `created_at`, so an exact re-send is stored once.
pub fn derived_id(
    source: &str,
    kind: &str,
    description: &str,
    created_at_ns: i64,
    properties: &Obj,
) -> String {
    let canonical = serde_json::to_vec(&(source, kind, description, created_at_ns, properties))
        .expect("serializing plain JSON cannot fail");
    let digest = Sha256::digest(&canonical);
    hex::encode(&digest[..16])
}

fn build_event(
    o: &Obj,
    path: &str,
    source: &str,
    kind: &str,
    log_time_ns: i64,
) -> Result<StoredEvent, Rejection> {
    let description = at(
        || format!("{path}.description"),
        |f| fields::opt_str(o, "description", f),
    )?
    .unwrap_or("")
    .to_string();
    let created_at_ns = at(
        || format!("{path}.created_at"),
        |f| fields::timestamp(o, "created_at", f, log_time_ns),
    )?;
    let empty = Obj::new();
    let properties = at(
        || format!("{path}.properties"),
        |f| fields::opt_free_obj(o, "properties", f),
    )?
    .unwrap_or(&empty);
    let id = match at(|| format!("{path}.id"), |f| event_id(o, f))? {
        Some(id) => id,
        None => derived_id(source, kind, &description, created_at_ns, properties),
    };
    Ok(StoredEvent {
        id,
        source: source.to_string(),
        r#type: kind.to_string(),
        description,
        properties: json::encode_struct(properties).into(),
        created_at_ns,
        received_at_ns: log_time_ns,
        body_in_timeline: false,
    })
}

/// A Zendesk product event. `identity_created` / `identity_changed` link the
/// identifier they name to the Zendesk user.
pub fn zendesk_event(o: &Obj, log_time_ns: i64) -> Result<Normalized, Rejection> {
    let user_id = fields::user_id(o, "user_id", "user_id", true)?.expect("required");
    let kind = fields::type_name(o, "type", "type")?;
    if let Some(source) = fields::opt_str(o, "source", "source")? {
        if !source.trim().eq_ignore_ascii_case(ZENDESK) {
            return Err(invalid(
                "source",
                format_args!("of a Zendesk event must be \"zendesk\", got {source:?}"),
            ));
        }
    }
    let event = build_event(o, "event", ZENDESK, kind, log_time_ns)?;
    let mut links = Vec::new();
    let value_key = match kind {
        "identity_created" => Some("value"),
        "identity_changed" => Some("current_value"),
        _ => None,
    };
    if let (Some(value_key), Some(Value::Object(props))) = (value_key, o.get("properties")) {
        let id_type = fields::opt_str(props, "identity_type", "properties.identity_type")?;
        let value = at(
            || format!("properties.{value_key}"),
            |f| fields::opt_str(props, value_key, f),
        )?;
        if let (Some(t), Some(v)) = (id_type, value) {
            let id = fields::normalize_identifier(t, v);
            if !id.r#type.is_empty() && !id.value.is_empty() {
                links.push(id);
            }
        }
    }
    Ok(Normalized::Zendesk {
        user_id,
        event,
        links,
    })
}

fn reserved(path: &str) -> Rejection {
    Rejection::new(
        ErrorCode::ReservedSource,
        format!("{path} \"zendesk\" (in any case) is reserved for Zendesk product events"),
    )
}

/// The `profile` object of a custom event or profile operation.
pub fn profile_ref(o: &Obj) -> Result<ProfileRef, Rejection> {
    let p = fields::req_obj(o, "profile", "profile")?;
    let source = fields::type_name(p, "source", "profile.source")?;
    let kind = fields::type_name(p, "type", "profile.type")?;
    if source.trim().eq_ignore_ascii_case(ZENDESK) {
        return Err(reserved("profile.source"));
    }
    let name = fields::opt_str(p, "name", "profile.name")?.map(str::to_string);
    let identifiers = fields::identifiers(p, "identifiers", "profile.identifiers")?;
    Ok(ProfileRef {
        source: source.to_string(),
        r#type: kind.to_string(),
        name,
        identifiers,
    })
}

pub fn unresolvable() -> Rejection {
    Rejection::new(
        ErrorCode::UnresolvableUser,
        "the record has no user_id and no identifier to resolve the user from; add user_id or profile.identifiers",
    )
}

/// A custom event (the body of Sunshine's `POST /api/v2/user_profiles/events`).
pub fn custom_event(o: &Obj, log_time_ns: i64) -> Result<Normalized, Rejection> {
    let user_id = fields::user_id(o, "user_id", "user_id", false)?;
    let e = fields::req_obj(o, "event", "event")?;
    let source = fields::type_name(e, "source", "event.source")?;
    let kind = fields::type_name(e, "type", "event.type")?;
    if source.trim().eq_ignore_ascii_case(ZENDESK) {
        return Err(reserved("event.source"));
    }
    let profile = profile_ref(o)?;
    let event = build_event(e, "event", source, kind, log_time_ns)?;
    if user_id.is_none() && profile.identifiers.is_empty() {
        return Err(unresolvable());
    }
    Ok(Normalized::Custom {
        user_id,
        profile,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{normalize, InputKind, Limits};
    use crate::model::Identifier;
    use serde_json::{json, Value};

    const T: i64 = 1_700_000_000_000_000_000;

    fn zd(v: Value) -> Result<Normalized, Rejection> {
        normalize(
            InputKind::ZendeskEvents,
            v.to_string().as_bytes(),
            T,
            Limits::default(),
        )
    }
    fn ce(v: Value) -> Result<Normalized, Rejection> {
        normalize(
            InputKind::CustomEvents,
            v.to_string().as_bytes(),
            T,
            Limits::default(),
        )
    }
    fn code(r: Result<Normalized, Rejection>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    #[test]
    fn zendesk_event_normalizes() {
        let n = zd(
            json!({"id": "01J", "user_id": 12345, "type": "article_viewed",
            "created_at": "2026-11-20T10:00:00Z", "properties": {"article_id": 360001}}),
        )
        .unwrap();
        let Normalized::Zendesk {
            user_id,
            event,
            links,
        } = n
        else {
            panic!()
        };
        assert_eq!(user_id, "12345");
        assert_eq!(event.source, "zendesk");
        assert_eq!(event.id, "01J");
        assert_eq!(event.received_at_ns, T);
        assert!(links.is_empty());
    }

    #[test]
    fn zendesk_event_rules() {
        assert_eq!(code(zd(json!({"type": "x"}))), "missing_field");
        assert_eq!(code(zd(json!({"user_id": "1"}))), "missing_field");
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": ""}))),
            "missing_field"
        );
        assert_eq!(
            code(zd(json!({"user_id": true, "type": "x"}))),
            "invalid_field"
        );
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": 3}))),
            "invalid_field"
        );
        assert_eq!(
            code(zd(
                json!({"user_id": "1", "type": "x", "source": "shopify"})
            )),
            "invalid_field"
        );
        assert!(zd(json!({"user_id": "1", "type": "x", "source": "zendesk"})).is_ok());
        assert!(zd(json!({"user_id": "1", "type": "x", "source": "Zendesk"})).is_ok());
        // As `reserved_source` reads it: in any case, surrounding whitespace aside.
        assert!(zd(json!({"user_id": "1", "type": "x", "source": " ZENDESK\t"})).is_ok());
        assert_eq!(
            code(zd(
                json!({"user_id": "1", "type": "x", "source": "zen desk"})
            )),
            "invalid_field"
        );
        assert_eq!(
            code(zd(
                json!({"user_id": "1", "type": "x", "created_at": "yesterday"})
            )),
            "invalid_field"
        );
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": "x", "properties": [1]}))),
            "invalid_field"
        );
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": "a:b"}))),
            "invalid_field"
        );
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": " \t "}))),
            "missing_field",
            "only whitespace is empty"
        );
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": "t".repeat(41)}))),
            "invalid_field"
        );
        assert_eq!(
            code(zd(json!({"user_id": "1", "type": "x", "description": 5}))),
            "invalid_field"
        );
    }

    #[test]
    fn rejections_name_the_field() {
        let msg = |r: Result<Normalized, Rejection>| r.unwrap_err().message;
        for (field, value, want) in [
            (
                "created_at",
                json!("yesterday"),
                "event.created_at is not an RFC 3339 timestamp",
            ),
            (
                "created_at",
                json!(5),
                "event.created_at must be an RFC 3339 timestamp string",
            ),
            (
                "description",
                json!(5),
                "event.description must be a string",
            ),
            (
                "properties",
                json!([1]),
                "event.properties must be an object",
            ),
            ("id", json!(true), "event.id must be a string"),
        ] {
            let mut v = json!({"user_id": "1", "type": "x"});
            v[field] = value;
            let m = msg(zd(v));
            assert!(m.starts_with(want), "{field}: {m}");
        }
        let m = msg(zd(json!({"user_id": "7", "type": "identity_created",
            "properties": {"identity_type": "email", "value": 5}})));
        assert!(m.starts_with("properties.value must be a string"), "{m}");
        let mut v = custom(json!({"source": "shop", "type": "order"}));
        v["profile"]["identifiers"] =
            json!([{"type": "email", "value": "a@b.example"}, {"type": "email"}]);
        assert_eq!(msg(ce(v)), "profile.identifiers[1].value is required");
    }

    #[test]
    fn zendesk_identity_events_link() {
        let n = zd(json!({"user_id": "7", "type": "identity_created",
            "properties": {"identity_type": "Email", "value": " A@B.example "}}))
        .unwrap();
        let Normalized::Zendesk { links, .. } = n else {
            panic!()
        };
        assert_eq!(links, vec![Identifier::new("email", "a@b.example")]);
        let n = zd(json!({"user_id": "7", "type": "identity_changed",
            "properties": {"identity_type": "email", "previous_value": "a@b", "current_value": "c@d"}})).unwrap();
        let Normalized::Zendesk { links, .. } = n else {
            panic!()
        };
        assert_eq!(links, vec![Identifier::new("email", "c@d")]);
    }

    fn custom(event: Value) -> Value {
        json!({"profile": {"source": "shopify", "type": "customer",
            "identifiers": [{"type": "email", "value": "Jane@Example.com"}]}, "event": event})
    }

    #[test]
    fn custom_event_rules_nesting() {
        use crate::ingest::fields::MAX_NESTING;
        let nested = |levels: usize| {
            let mut v = json!(1);
            for i in 1..levels {
                v = if i % 2 == 0 {
                    json!([v, 2])
                } else {
                    json!({ "k": v })
                };
            }
            json!({ "p": v })
        };
        let ok = zd(json!({"user_id": "1", "type": "x", "properties": nested(MAX_NESTING)}));
        assert!(ok.is_ok(), "{ok:?}");
        let deep = zd(json!({"user_id": "1", "type": "x", "properties": nested(MAX_NESTING + 1)}));
        assert_eq!(code(deep), "invalid_field");
        let deep = normalize(
            InputKind::CustomEvents,
            custom(json!({"source": "s", "type": "t", "properties": nested(MAX_NESTING + 1)}))
                .to_string()
                .as_bytes(),
            0,
            Limits::default(),
        );
        assert_eq!(code(deep), "invalid_field");
    }

    #[test]
    fn custom_event_rules() {
        let ok = json!({"source": "shopify", "type": "order_completed"});
        assert!(ce(custom(ok.clone())).is_ok());
        assert_eq!(
            code(ce(custom(json!({"source": " ZenDesk", "type": "x"})))),
            "reserved_source"
        );
        assert_eq!(
            code(ce(custom(json!({"source": "shopify"})))),
            "missing_field"
        );
        assert_eq!(code(ce(custom(json!({"type": "x"})))), "missing_field");
        assert_eq!(
            code(ce(custom(
                json!({"source": "s", "type": "x", "properties": [1]})
            ))),
            "invalid_field"
        );
        assert_eq!(
            code(ce(custom(
                json!({"source": "s", "type": "x", "created_at": "nope"})
            ))),
            "invalid_field"
        );
        assert_eq!(
            code(ce(custom(json!({"source": "s:x", "type": "x"})))),
            "invalid_field"
        );
        assert_eq!(code(ce(json!({"event": ok.clone()}))), "missing_field");
        assert_eq!(
            code(ce(
                json!({"event": ok.clone(), "profile": {"source": "zendesk", "type": "c", "identifiers": []}})
            )),
            "reserved_source"
        );
        assert_eq!(
            code(ce(
                json!({"event": ok.clone(), "profile": {"source": "s", "type": "c", "identifiers": []}})
            )),
            "unresolvable_user"
        );
        assert!(ce(
            json!({"user_id": "1", "event": ok.clone(), "profile": {"source": "s", "type": "c"}})
        )
        .is_ok());
        assert_eq!(
            code(ce(
                json!({"user_id": "1", "event": ok, "profile": {"source": "s"}})
            )),
            "missing_field"
        );
        assert_eq!(
            code(ce(
                json!({"user_id": "1", "event": 5, "profile": {"source": "s", "type": "c"}})
            )),
            "invalid_field"
        );
    }

    #[test]
    fn derived_ids_are_deterministic_and_cover_created_at() {
        let e = json!({"source": "s", "type": "t", "properties": {"a": 1}});
        let id = |v: &Value, t: i64| match normalize(
            InputKind::CustomEvents,
            custom(v.clone()).to_string().as_bytes(),
            t,
            Limits::default(),
        )
        .unwrap()
        {
            Normalized::Custom { event, .. } => event.id,
            _ => unreachable!(),
        };
        assert_eq!(id(&e, T), id(&e, T));
        assert_ne!(
            id(&e, T),
            id(&e, T + 1),
            "created_at defaults to the log time and is hashed"
        );
        let mut with_ts = e.clone();
        with_ts["created_at"] = json!("2026-11-20T10:00:00Z");
        assert_eq!(id(&with_ts, T), id(&with_ts, T + 1));
    }

    /// The hash is of the canonical JSON `["s","t","",T,{...}]` (keys
    /// sorted, the last of repeated keys kept): ids derived by earlier
    /// versions stay the same (expected value from Python's `json` and
    /// `hashlib`).
    #[test]
    fn derived_ids_are_stable() {
        let text = r#"{"user_id":"u","profile":{"source":"s","type":"t","identifiers":[]},
            "event":{"source":"s","type":"t","properties":{"z":[1,"\u00e9",null,true],"m":3,"a":{"k":"v\""},"m":-5}}}"#;
        let Normalized::Custom { event, .. } = normalize(
            InputKind::CustomEvents,
            text.as_bytes(),
            T,
            Limits::default(),
        )
        .unwrap() else {
            unreachable!()
        };
        assert_eq!(event.id, "49a78fe3c1d6b4aa2fae6ceb3cc9604b");
    }
}
