//! Field-level checks shared by the input formats.

use super::{ErrorCode, Limits, Rejection};
use crate::model::value::{self, Value};
use crate::model::{time, Identifier};

pub type Obj<'a> = value::Obj<'a>;

/// Bytes -> text of at most `limits.max_record_bytes`, or `too_large` /
/// `invalid_json`.
fn record_text(bytes: &[u8], limits: Limits) -> Result<&str, Rejection> {
    if bytes.len() > limits.max_record_bytes {
        return Err(Rejection::new(
            ErrorCode::TooLarge,
            format!(
                "record is {} bytes, larger than the maximum of {} bytes",
                bytes.len(),
                limits.max_record_bytes
            ),
        ));
    }
    std::str::from_utf8(bytes)
        .map_err(|e| Rejection::new(ErrorCode::InvalidJson, format!("record is not UTF-8: {e}")))
}

fn not_an_object(v: &Value) -> Rejection {
    Rejection::new(
        ErrorCode::InvalidJson,
        format!("record must be a JSON object, got {}", kind_name(v)),
    )
}

fn not_json(e: serde_json::Error) -> Rejection {
    Rejection::new(
        ErrorCode::InvalidJson,
        format!("record is not valid JSON: {e}"),
    )
}

/// Bytes -> JSON object as the validators read it (strings borrowed from
/// `bytes`), or `too_large` / `invalid_json`.
pub fn parse_record(bytes: &[u8], limits: Limits) -> Result<Obj<'_>, Rejection> {
    match value::from_str(record_text(bytes, limits)?) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(not_an_object(&other)),
        Err(e) => Err(not_json(e)),
    }
}

/// `parse_record`, as a `serde_json` map to edit (the HTTP API builds
/// records from request bodies with it).
pub fn parse_object(
    bytes: &[u8],
    limits: Limits,
) -> Result<serde_json::Map<String, serde_json::Value>, Rejection> {
    match serde_json::from_str(record_text(bytes, limits)?) {
        Ok(serde_json::Value::Object(o)) => Ok(o),
        Ok(other) => Err(not_an_object(&Value::from(&other))),
        Err(e) => Err(not_json(e)),
    }
}

pub fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `check(path)` with `path` made only if the check fails: error messages
/// name the field, and the records that pass (nearly all) make no string.
/// `check` must not depend on its path but for the message.
pub fn at<T>(
    path: impl FnOnce() -> String,
    check: impl Fn(&str) -> Result<T, Rejection>,
) -> Result<T, Rejection> {
    check("").or_else(|_| check(&path()))
}

pub fn missing(path: &str) -> Rejection {
    Rejection::new(ErrorCode::MissingField, format!("{path} is required"))
}

pub fn invalid(path: &str, why: impl std::fmt::Display) -> Rejection {
    Rejection::new(ErrorCode::InvalidField, format!("{path} {why}"))
}

/// A required non-empty string.
pub fn req_str<'a>(o: &'a Obj, key: &str, path: &str) -> Result<&'a str, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => Err(missing(path)),
        Some(Value::String(s)) if s.trim().is_empty() => Err(missing(path)),
        Some(Value::String(s)) => Ok(s.as_ref()),
        Some(v) => Err(invalid(
            path,
            format_args!("must be a string, got {}", kind_name(v)),
        )),
    }
}

/// An optional string (null = absent).
pub fn opt_str<'a>(o: &'a Obj, key: &str, path: &str) -> Result<Option<&'a str>, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_ref())),
        Some(v) => Err(invalid(
            path,
            format_args!("must be a string, got {}", kind_name(v)),
        )),
    }
}

/// A required object.
pub fn req_obj<'a, 'b>(o: &'a Obj<'b>, key: &str, path: &str) -> Result<&'a Obj<'b>, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => Err(missing(path)),
        Some(Value::Object(m)) => Ok(m),
        Some(v) => Err(invalid(
            path,
            format_args!("must be an object, got {}", kind_name(v)),
        )),
    }
}

/// An optional object (null/absent = `None`, treated as empty).
pub fn opt_obj<'a, 'b>(
    o: &'a Obj<'b>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Obj<'b>>, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(v) => Err(invalid(
            path,
            format_args!("must be an object, got {}", kind_name(v)),
        )),
    }
}

/// How deep `properties` and `attributes` may nest (objects and arrays,
/// the field itself counting as one). They are stored and published as
/// `google.protobuf.Struct`, three protobuf levels per object level, and
/// protobuf decoders (prost's, Java's, Python's) stop at 100 levels: a
/// deeper value would be accepted here and then fail to decode in
/// contextd's own stages and in every snapshot consumer.
pub const MAX_NESTING: usize = 30;

/// The nesting depth of a JSON value: 0 for a scalar, 1 + the deepest
/// member for an object or array.
pub fn nesting(v: &Value) -> usize {
    match v {
        Value::Object(o) => 1 + o.iter().map(|(_, m)| nesting(m)).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// An optional object of free-form values (`properties`, `attributes`):
/// as `opt_obj`, nested at most `MAX_NESTING` levels.
pub fn opt_free_obj<'a, 'b>(
    o: &'a Obj<'b>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Obj<'b>>, Rejection> {
    let m = opt_obj(o, key, path)?;
    if let Some(v) = o.get(key) {
        if nesting(v) > MAX_NESTING {
            return Err(invalid(
                path,
                format_args!("is nested more than {MAX_NESTING} levels deep"),
            ));
        }
    }
    Ok(m)
}

/// A user id: a non-empty string or an integer.
pub fn user_id(
    o: &Obj,
    key: &str,
    path: &str,
    required: bool,
) -> Result<Option<String>, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => {
            if required {
                Err(missing(path))
            } else {
                Ok(None)
            }
        }
        Some(Value::String(s)) if s.trim().is_empty() => Err(missing(path)),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(v) => Err(invalid(
            path,
            format_args!("must be a string or an integer, got {}", kind_name(v)),
        )),
    }
}

/// `source` / `type` names: at most 40 characters, no `:`.
pub fn type_name<'a>(o: &'a Obj, key: &str, path: &str) -> Result<&'a str, Rejection> {
    let s = req_str(o, key, path)?;
    check_type_name(s, path)?;
    Ok(s)
}

pub fn check_type_name(s: &str, path: &str) -> Result<(), Rejection> {
    if s.chars().count() > 40 {
        return Err(invalid(path, "is longer than 40 characters"));
    }
    if s.contains(':') {
        return Err(invalid(path, "must not contain ':'"));
    }
    Ok(())
}

/// An optional RFC 3339 timestamp; absent = `default`.
pub fn timestamp(o: &Obj, key: &str, path: &str, default: i64) -> Result<i64, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) => time::parse_rfc3339(s)
            .ok_or_else(|| invalid(path, format_args!("is not an RFC 3339 timestamp: {s:?}"))),
        Some(v) => Err(invalid(
            path,
            format_args!("must be an RFC 3339 timestamp string, got {}", kind_name(v)),
        )),
    }
}

/// Normalizes one identifier: type lowercased; email and twitter values trimmed and lowercased.
pub fn normalize_identifier(kind: &str, value: &str) -> Identifier {
    let kind = kind.trim().to_lowercase();
    let value = if kind == "email" || kind == "twitter" {
        value.trim().to_lowercase()
    } else {
        value.to_string()
    };
    Identifier {
        r#type: kind,
        value,
    }
}

fn priority(kind: &str) -> u8 {
    match kind {
        "external_id" => 0,
        "email" => 1,
        "phone_number" => 2,
        _ => 3,
    }
}

/// Sorts identifiers by priority (external_id, email, phone_number, then the
/// others in the order given) and drops repeats.
pub fn sort_by_priority(ids: &mut Vec<Identifier>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|i| seen.insert((i.r#type.clone(), i.value.clone())));
    ids.sort_by_key(|i| priority(&i.r#type));
}

/// `identifiers`: an optional array of `{"type", "value"}`, normalized, in priority order.
pub fn identifiers(o: &Obj, key: &str, path: &str) -> Result<Vec<Identifier>, Rejection> {
    let items = match o.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(invalid(
                path,
                format_args!("must be an array, got {}", kind_name(v)),
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = || format!("{path}[{i}]");
        let Value::Object(m) = item else {
            return Err(invalid(
                &p(),
                format_args!("must be an object, got {}", kind_name(item)),
            ));
        };
        let kind = at(|| format!("{}.type", p()), |f| req_str(m, "type", f))?;
        let value = at(|| format!("{}.value", p()), |f| req_str(m, "value", f))?;
        let id = normalize_identifier(kind, value);
        if id.r#type.is_empty() {
            return Err(missing(&format!("{}.type", p())));
        }
        if id.value.is_empty() {
            return Err(missing(&format!("{}.value", p())));
        }
        out.push(id);
    }
    sort_by_priority(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> Obj<'static> {
        v.as_object().expect("an object").into()
    }

    #[test]
    fn parse_object_codes() {
        let l = Limits::default();
        assert_eq!(
            parse_object(b"{not json", l).unwrap_err().code,
            ErrorCode::InvalidJson
        );
        assert_eq!(
            parse_object(b"[1,2]", l).unwrap_err().code,
            ErrorCode::InvalidJson
        );
        assert_eq!(
            parse_object(&[0xff, 0xfe], l).unwrap_err().code,
            ErrorCode::InvalidJson
        );
        let small = Limits {
            max_record_bytes: 4,
            ..Limits::default()
        };
        assert_eq!(
            parse_object(b"{\"a\":1}", small).unwrap_err().code,
            ErrorCode::TooLarge
        );
        assert!(parse_object(b"{}", l).is_ok());
        for bad in [&b"{not json"[..], b"[1,2]", &[0xff, 0xfe], b"{}  x"] {
            assert_eq!(
                parse_record(bad, l).unwrap_err().message,
                parse_object(bad, l).unwrap_err().message
            );
        }
        assert_eq!(
            parse_record(b"{\"a\":1}", small).unwrap_err().code,
            ErrorCode::TooLarge
        );
        assert!(parse_record(b"{}", l).unwrap().is_empty());
    }

    #[test]
    fn identifiers_are_normalized_and_prioritized() {
        let o = obj(json!({"ids": [
            {"type": "Twitter", "value": " @Jane "},
            {"type": "phone_number", "value": "+47 1"},
            {"type": "EMAIL", "value": "  Jane@Example.COM "},
            {"type": "external_id", "value": "C-77"},
            {"type": "email", "value": "jane@example.com"}
        ]}));
        let ids = identifiers(&o, "ids", "ids").unwrap();
        let keys: Vec<_> = ids.iter().map(|i| i.key()).collect();
        assert_eq!(
            keys,
            [
                "external_id:C-77",
                "email:jane@example.com",
                "phone_number:+47 1",
                "twitter:@jane"
            ]
        );
    }

    #[test]
    fn identifier_errors() {
        let bad = obj(json!({"ids": [{"type": "email"}]}));
        assert_eq!(
            identifiers(&bad, "ids", "ids").unwrap_err().code,
            ErrorCode::MissingField
        );
        let bad = obj(json!({"ids": [{"type": "email", "value": 3}]}));
        assert_eq!(
            identifiers(&bad, "ids", "ids").unwrap_err().code,
            ErrorCode::InvalidField
        );
        let bad = obj(json!({"ids": {"type": "email"}}));
        assert_eq!(
            identifiers(&bad, "ids", "ids").unwrap_err().code,
            ErrorCode::InvalidField
        );
        let bad = obj(json!({"ids": [{"type": "email", "value": "   "}]}));
        assert_eq!(
            identifiers(&bad, "ids", "ids").unwrap_err().code,
            ErrorCode::MissingField
        );
    }

    #[test]
    fn type_names() {
        assert!(check_type_name(&"t".repeat(40), "x").is_ok());
        assert_eq!(
            check_type_name(&"t".repeat(41), "x").unwrap_err().code,
            ErrorCode::InvalidField
        );
        assert_eq!(
            check_type_name("a:b", "x").unwrap_err().code,
            ErrorCode::InvalidField
        );
        // 40 characters, more bytes
        assert!(check_type_name(&"é".repeat(40), "x").is_ok());
    }

    #[test]
    fn user_ids() {
        let o = obj(json!({"a": 12345, "b": " 77 ", "c": "", "d": 1.5, "e": null}));
        assert_eq!(user_id(&o, "a", "a", true).unwrap().unwrap(), "12345");
        assert_eq!(user_id(&o, "b", "b", true).unwrap().unwrap(), "77");
        assert_eq!(
            user_id(&o, "c", "c", false).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(
            user_id(&o, "d", "d", true).unwrap_err().code,
            ErrorCode::InvalidField
        );
        assert_eq!(
            user_id(&o, "e", "e", true).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(user_id(&o, "e", "e", false).unwrap(), None);
    }

    #[test]
    fn timestamps() {
        let o = obj(json!({"t": "2026-11-20T10:00:00Z", "bad": "yesterday", "n": 5}));
        assert!(timestamp(&o, "t", "t", 0).unwrap() > 0);
        assert_eq!(timestamp(&o, "missing", "t", 42).unwrap(), 42);
        assert_eq!(
            timestamp(&o, "bad", "t", 0).unwrap_err().code,
            ErrorCode::InvalidField
        );
        assert_eq!(
            timestamp(&o, "n", "t", 0).unwrap_err().code,
            ErrorCode::InvalidField
        );
    }
}
