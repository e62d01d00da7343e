//! Write endpoints: validate, then append to the input topic; 202 once durable.

use super::{ApiError, AppState, LiteralQuery};
use crate::app::Appender;
use crate::ingest::{self, ErrorCode, InputKind, Rejection};
use crate::log::OutRecord;
use crate::model::time;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;

type Accepted = (StatusCode, Json<Value>);

fn accepted() -> Accepted {
    (StatusCode::ACCEPTED, Json(json!({"status": "received"})))
}

async fn validate_and_append(
    app: &AppState,
    kind: InputKind,
    topic: String,
    body: Vec<u8>,
) -> Result<Accepted, ApiError> {
    let now = time::now_ms();
    let n = ingest::normalize(kind, &body, time::ms_to_ns(now), app.limits)?;
    let key = n.routing_key();
    app.appender
        .append(vec![OutRecord {
            topic,
            partition: None,
            key,
            value: body.into(),
            timestamp_ms: now,
        }])
        .await
        .map_err(ApiError::internal)?;
    Ok(accepted())
}

pub async fn post_profile_event(
    State(app): State<AppState>,
    body: Bytes,
) -> Result<Accepted, ApiError> {
    let topic = app.topics().sunshine_events.clone();
    validate_and_append(&app, InputKind::CustomEvents, topic, body.to_vec()).await
}

pub async fn post_user_event(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    body: Bytes,
) -> Result<Accepted, ApiError> {
    let mut obj = ingest::parse_object(&body, app.limits)?;
    obj.insert("user_id".into(), Value::String(user_id));
    let topic = app.topics().sunshine_events.clone();
    validate_and_append(
        &app,
        InputKind::CustomEvents,
        topic,
        serde_json::to_vec(&obj).expect("json"),
    )
    .await
}

pub async fn post_zendesk_event(
    State(app): State<AppState>,
    body: Bytes,
) -> Result<Accepted, ApiError> {
    let topic = app.topics().zendesk_events.clone();
    validate_and_append(&app, InputKind::ZendeskEvents, topic, body.to_vec()).await
}

/// `SOURCE:TYPE:ID_TYPE:ID_VALUE`; ID_VALUE is everything after the third `:`.
fn parse_identifier(q: &HashMap<String, String>) -> Result<[String; 4], ApiError> {
    let raw = q.get("identifier").ok_or_else(|| {
        ApiError::from(Rejection::new(
            ErrorCode::MissingField,
            "query parameter identifier=SOURCE:TYPE:ID_TYPE:ID_VALUE is required",
        ))
    })?;
    let parts: Vec<&str> = raw.splitn(4, ':').collect();
    if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
        return Err(Rejection::new(
            ErrorCode::InvalidField,
            format!("identifier must be SOURCE:TYPE:ID_TYPE:ID_VALUE, got {raw:?}"),
        )
        .into());
    }
    Ok([
        parts[0].into(),
        parts[1].into(),
        parts[2].into(),
        parts[3].into(),
    ])
}

async fn profile_op(
    app: AppState,
    op: &str,
    q: HashMap<String, String>,
    body: Option<Bytes>,
) -> Result<Accepted, ApiError> {
    let [source, ty, id_type, id_value] = parse_identifier(&q)?;
    // PUT and PATCH carry `{"profile": {...}}` (source and type may be
    // left to the identifier); DELETE has no body.
    let mut profile = match &body {
        Some(b) if b.iter().all(u8::is_ascii_whitespace) => {
            return Err(Rejection::new(
                ErrorCode::InvalidJson,
                format!("{op} needs a JSON body {{\"profile\": {{...}}}}"),
            )
            .into())
        }
        Some(b) => {
            let obj = ingest::parse_object(b, app.limits)?;
            match obj.get("profile") {
                None | Some(Value::Null) => {
                    return Err(
                        Rejection::new(ErrorCode::MissingField, "profile is required").into(),
                    )
                }
                Some(Value::Object(p)) => p.clone(),
                Some(_) => {
                    return Err(Rejection::new(
                        ErrorCode::InvalidField,
                        "profile must be an object",
                    )
                    .into())
                }
            }
        }
        None => serde_json::Map::new(),
    };
    for (field, want) in [("source", &source), ("type", &ty)] {
        match profile.get(field) {
            None | Some(Value::Null) => {
                profile.insert(field.into(), Value::String(want.clone()));
            }
            Some(Value::String(s)) if s == want => {}
            Some(other) => {
                return Err(Rejection::new(
                    ErrorCode::InvalidField,
                    format!("profile.{field} {other} does not match the identifier's {want:?}"),
                )
                .into())
            }
        }
    }
    let id = json!({"type": id_type, "value": id_value});
    match profile.get_mut("identifiers") {
        Some(Value::Array(a)) => a.push(id),
        None | Some(Value::Null) => {
            profile.insert("identifiers".into(), Value::Array(vec![id]));
        }
        Some(_) => {
            return Err(Rejection::new(
                ErrorCode::InvalidField,
                "profile.identifiers must be an array",
            )
            .into())
        }
    }
    if op == "delete" {
        profile.remove("attributes");
        profile.remove("name");
    }
    let record = serde_json::to_vec(&json!({"op": op, "profile": profile})).expect("json");
    let topic = app.topics().sunshine_profiles.clone();
    validate_and_append(&app, InputKind::Profiles, topic, record).await
}

pub async fn put_profile(
    State(app): State<AppState>,
    LiteralQuery(q): LiteralQuery,
    body: Bytes,
) -> Result<Accepted, ApiError> {
    profile_op(app, "put", q, Some(body)).await
}

pub async fn patch_profile(
    State(app): State<AppState>,
    LiteralQuery(q): LiteralQuery,
    body: Bytes,
) -> Result<Accepted, ApiError> {
    profile_op(app, "patch", q, Some(body)).await
}

pub async fn delete_profile(
    State(app): State<AppState>,
    LiteralQuery(q): LiteralQuery,
) -> Result<Accepted, ApiError> {
    profile_op(app, "delete", q, None).await
}

/// NDJSON: each non-blank line appended as is, in one atomic append;
/// validation happens in the pipeline (bad lines are dead-lettered).
/// Settings lines get the key `visibility`; in Kafka mode every line is
/// keyed as a single write would be (`ingest::input_key`), so that one
/// customer's records share a partition and keep their order.
pub async fn post_records(
    State(app): State<AppState>,
    Path(topic): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let kind = app
        .topics()
        .input_kind(&topic)
        .map_err(ApiError::not_found)?;
    let now = time::now_ms();
    let keyed = kind == InputKind::Settings || matches!(app.appender, Appender::Kafka(_));
    let limits = app.limits;
    let split = move || {
        body.split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
            .map(|l| OutRecord {
                topic: topic.clone(),
                partition: None,
                key: if keyed {
                    ingest::input_key(kind, l, limits)
                } else {
                    None
                },
                value: l.into(),
                timestamp_ms: now,
            })
            .collect::<Vec<OutRecord>>()
    };
    // Keying validates every line: off the async threads.
    let records = if keyed {
        super::blocking(move || Ok(split())).await?
    } else {
        split()
    };
    let n = records.len();
    if n > 0 {
        app.appender
            .append(records)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "received", "records": n})),
    ))
}
