//! Admin endpoints: visibility settings, type catalog, dead letters.

use super::{blocking, ApiError, AppState};
use crate::app::Appender;
use crate::ingest::SETTINGS_KEY;
use crate::ingest::{self, settings_to_json};
use crate::log::OutRecord;
use crate::model::{record, time, Record, Settings};
use crate::snapshot;
use crate::state::apply::TypeKind;
use crate::state::keys::{CF_META, META_SETTINGS};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;

/// The latest settings applied (defaults: nothing shown).
pub fn current_settings(app: &AppState) -> Result<Settings, ApiError> {
    let raw = app
        .store
        .get_raw(CF_META, META_SETTINGS)
        .map_err(ApiError::internal)?;
    Ok(
        match raw
            .and_then(|v| Record::decode(&v[..]).ok())
            .and_then(|r| r.body)
        {
            Some(record::Body::Settings(s)) => snapshot::prepared(s),
            _ => Settings::default(),
        },
    )
}

pub async fn get_visibility(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    blocking(move || Ok(Json(settings_to_json(&current_settings(&app)?)))).await
}

pub async fn put_visibility(
    State(app): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let settings = ingest::normalize_settings(&body, app.limits)?;
    let rec = OutRecord {
        topic: app.topics().settings.clone(),
        partition: None,
        key: Some(SETTINGS_KEY.to_vec()),
        value: serde_json::to_vec(&settings_to_json(&settings))
            .expect("json")
            .into(),
        timestamp_ms: time::now_ms(),
    };
    app.appender
        .append(vec![rec])
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"status": "received"}))))
}

async fn types(app: AppState, kind: TypeKind, name: &'static str) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let settings = current_settings(&app)?;
        let catalog = app.store.catalog(kind).map_err(ApiError::internal)?;
        let items: Vec<Value> = catalog
            .into_iter()
            .map(|(t, e)| {
                let shown = match kind {
                    TypeKind::Event => snapshot::event_shown(&settings, &t.source, &t.r#type),
                    TypeKind::Profile => snapshot::profile_shown(&settings, &t.source, &t.r#type),
                };
                json!({
                    "source": t.source, "type": t.r#type, "count": e.count,
                    "first_seen": time::format_rfc3339(e.first_seen_ns),
                    "last_seen": time::format_rfc3339(e.last_seen_ns),
                    "shown": shown,
                })
            })
            .collect();
        Ok(Json(json!({ name: items })))
    })
    .await
}

pub async fn event_types(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    types(app, TypeKind::Event, "event_types").await
}

pub async fn profile_types(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    types(app, TypeKind::Profile, "profile_types").await
}

/// The dead letters (CONTRACT §6), oldest first: the newest `?limit=`
/// (default 1000, at most 10000), or in embedded mode those from the
/// dead-letter log's offset `?from=` on. `meta.total` is how many the
/// topic holds; `meta.has_more` says, for the newest, that older ones are
/// left out and, reading on with `from`, that newer ones follow;
/// (embedded) `meta.next_from` is the offset to read on from.
pub async fn dead_letters(
    State(app): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let number = |name: &str, min: i64| -> Result<Option<i64>, ApiError> {
        q.get(name)
            .map(|v| match v.parse::<i64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(ApiError::from(ingest::Rejection::new(
                    ingest::ErrorCode::InvalidField,
                    format!("{name} must be a whole number of at least {min}, got {v:?}"),
                ))),
            })
            .transpose()
    };
    let limit = number("limit", 1)?.unwrap_or(1000).min(10_000) as usize;
    let from = number("from", 0)?;
    let topic = app.topics().dlq.clone();
    let entry = |r: &crate::log::LogRecord| {
        serde_json::from_slice::<Value>(&r.value).unwrap_or(Value::Null)
    };
    let log = match app.appender.clone() {
        Appender::Embedded(log) => log,
        Appender::Kafka(_) => {
            if from.is_some() {
                return Err(ingest::Rejection::new(
                    ingest::ErrorCode::InvalidField,
                    "from is an offset of the embedded dead-letter log; in Kafka mode read context.dlq with a Kafka consumer",
                )
                .into());
            }
            let c = app.config.clone();
            return blocking(move || {
                let (items, total) =
                    crate::log::kafka::tail(&c, &topic, limit).map_err(ApiError::internal)?;
                let total = total.max(items.len() as i64);
                Ok(Json(json!({
                    "dead_letters": items.iter().map(entry).collect::<Vec<_>>(),
                    "meta": {"total": total, "has_more": total > items.len() as i64},
                })))
            })
            .await;
        }
    };
    blocking(move || {
        // The embedded dead-letter log has one partition (total order).
        let (start, end) = log.offset_range(&topic, 0).map_err(ApiError::internal)?;
        let first = from.unwrap_or(end - limit as i64).max(start);
        let items = log
            .read(&topic, 0, first, limit)
            .map_err(ApiError::internal)?;
        let next = items.last().map_or(first.min(end), |r| r.offset + 1);
        // Reading on (`from`): more after this page; the newest: older ones.
        let has_more = match from {
            Some(_) => next < end,
            None => items.first().is_some_and(|r| r.offset > start),
        };
        Ok(Json(json!({
            "dead_letters": items.iter().map(entry).collect::<Vec<_>>(),
            "meta": {"total": end - start, "has_more": has_more, "next_from": next},
        })))
    })
    .await
}
