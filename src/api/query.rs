//! Read endpoints: context, timeline, profiles, identifier lookup.

use super::forward;
use super::{blocking, ApiError, AppState, LiteralQuery};
use crate::ingest::{normalize_identifier, ErrorCode, Rejection};
use crate::model::{time, StoredEvent, UserState};
use crate::snapshot;
use crate::state::store::StoreBodies;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;

/// The user a path names. Ingest trims a `user_id`, so the id is trimmed,
/// unless a user has it as given: one named after an identifier keeps the
/// spaces of the identifier's value (only emails and twitter handles are
/// trimmed), and `C-77` and `C-77 ` are two customers.
async fn path_user(app: &AppState, raw: String) -> Result<String, ApiError> {
    if raw.trim().len() == raw.len() {
        return Ok(raw);
    }
    let app2 = app.clone();
    blocking(move || {
        let exists = app2
            .store
            .get_user(app2.partition_of(&raw), &raw)
            .map_err(ApiError::internal)?
            .is_some();
        Ok(if exists { raw } else { raw.trim().to_string() })
    })
    .await
}

async fn load_user(app: &AppState, user_id: String) -> Result<UserState, ApiError> {
    let app2 = app.clone();
    blocking(move || {
        let p = app2.partition_of(&user_id);
        app2.store
            .get_user(p, &user_id)
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::not_found(format!("user {user_id:?} not found")))
    })
    .await
}

pub async fn context(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user_id = path_user(&app, user_id).await?;
    if let Some(r) = forward(&app, &user_id, &uri, &headers).await {
        return Ok(r);
    }
    let app2 = app.clone();
    blocking(move || {
        let p = app2.partition_of(&user_id);
        let limit = snapshot::SizeLimit::of(&app2.config);
        match app2
            .store
            .context(p, &user_id, app2.config.snapshot.max_events, limit)
            .map_err(ApiError::internal)?
        {
            // The bytes published (its content cut to `snapshot.max_bytes`
            // of JSON when that is the format).
            Some(s) if limit.json => {
                let json = snapshot::json_bytes(&snapshot::decode(&s), limit.bytes);
                Ok((
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    json,
                )
                    .into_response())
            }
            Some(s) => Ok(Json(snapshot::to_json(&snapshot::decode(&s))).into_response()),
            None => Err(ApiError::not_found(format!("user {user_id:?} not found"))),
        }
    })
    .await
}

pub async fn profiles(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user_id = path_user(&app, user_id).await?;
    if let Some(r) = forward(&app, &user_id, &uri, &headers).await {
        return Ok(r);
    }
    let u = load_user(&app, user_id).await?;
    Ok(
        Json(
            json!({"profiles": u.profiles.iter().map(snapshot::profile_json).collect::<Vec<_>>()}),
        )
        .into_response(),
    )
}

fn bad(msg: impl Into<String>) -> ApiError {
    Rejection::new(ErrorCode::InvalidField, msg).into()
}

/// Digits only, not all zeros (`+` and `-` are left to `i64::from_str`).
fn is_positive_integer(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.bytes().any(|b| b != b'0')
}

fn time_param(q: &HashMap<String, String>, key: &str) -> Result<Option<i64>, ApiError> {
    q.get(key)
        .map(|v| {
            time::parse_rfc3339(v)
                .ok_or_else(|| bad(format!("{key} must be an RFC 3339 timestamp, got {v:?}")))
        })
        .transpose()
}

fn encode_cursor(e: &StoredEvent) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", e.created_at_ns, e.id))
}

fn decode_cursor(c: &str) -> Option<(i64, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (ts, id) = text.split_once(':')?;
    Some((ts.parse().ok()?, id.to_string()))
}

/// The whole timeline, newest first, not filtered by visibility.
/// `filter[start_time]` is inclusive, `filter[end_time]` exclusive.
pub async fn events(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user_id = path_user(&app, user_id).await?;
    if let Some(r) = forward(&app, &user_id, &uri, &headers).await {
        return Ok(r);
    }
    let source = q.get("filter[source]").cloned();
    let ty = q.get("filter[type]").cloned();
    let start = time_param(&q, "filter[start_time]")?;
    let end = time_param(&q, "filter[end_time]")?;
    let size = match q.get("page[size]") {
        None => 100,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 1 => n.min(1000) as usize,
            // A positive integer too large for an i64 is above 1000 too.
            Err(_) if is_positive_integer(s) => 1000,
            _ => {
                return Err(bad(format!(
                    "page[size] must be a positive integer, got {s:?}"
                )))
            }
        },
    };
    let after = match q.get("page[after]") {
        None => None,
        Some(c) if c.is_empty() => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| bad(format!("page[after] is not a cursor from this API: {c:?}")))?,
        ),
    };
    let u = load_user(&app, user_id).await?;
    let mut matching = u.timeline.iter().rev().filter(|e| {
        source.as_ref().is_none_or(|s| &e.source == s)
            && ty.as_ref().is_none_or(|t| &e.r#type == t)
            && start.is_none_or(|s| e.created_at_ns >= s)
            && end.is_none_or(|t| e.created_at_ns < t)
            && after
                .as_ref()
                .is_none_or(|(ts, id)| (e.created_at_ns, e.id.as_str()) < (*ts, id.as_str()))
    });
    let page: Vec<&StoredEvent> = matching.by_ref().take(size).collect();
    let bodies = StoreBodies {
        store: &app.store,
        partition: app.partition_of(&u.user_id),
        user_id: &u.user_id,
        pending: None,
    };
    let has_more = matching.next().is_some();
    // As Zendesk's cursor pagination: the cursor after the page's last
    // event, on the last page too (following it gives an empty page);
    // null only for an empty page.
    let after_cursor = page.last().map(|e| encode_cursor(e));
    Ok(Json(json!({
        "events": page.iter().map(|e| snapshot::event_json(e, &bodies)).collect::<Vec<_>>(),
        "meta": {"has_more": has_more, "after_cursor": after_cursor},
    }))
    .into_response())
}

/// `?identifier=TYPE:VALUE` -> the user it is linked to.
pub async fn lookup(
    State(app): State<AppState>,
    LiteralQuery(q): LiteralQuery,
) -> Result<Json<Value>, ApiError> {
    let raw = q.get("identifier").cloned().unwrap_or_default();
    let Some((t, v)) = raw.split_once(':') else {
        return Err(bad(format!("identifier must be TYPE:VALUE, got {raw:?}")));
    };
    let id = normalize_identifier(t, v);
    let app2 = app.clone();
    blocking(
        move || match app2.store.linked_user(&id).map_err(ApiError::internal)? {
            Some(u) => Ok(Json(
                json!({"user_id": u, "identifier": {"type": id.r#type, "value": id.value}}),
            )),
            None => Err(ApiError::not_found(format!(
                "no user has the identifier {}",
                id.key()
            ))),
        },
    )
    .await
}
