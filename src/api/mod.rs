//! The HTTP API (CONTRACT §7), axum. Writes are validated with the same
//! ingest functions the pipeline uses and appended to the input topics;
//! reads come from the state store on blocking threads.

mod admin;
mod ingest;
mod ops;
mod query;

use crate::app::App;
use crate::ingest::{ErrorCode, Rejection};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub type AppState = Arc<App>;

/// Query parameters percent-decoded as RFC 3986 has it, a `+` kept as is
/// (not a space, as HTML forms encode one): the `identifier` parameters
/// carry phone numbers (`phone_number:+4712345678`) and sub-addressed
/// emails (`jane+tag@example.com`) far more often than a space, which
/// clients send as `%20`.
pub struct LiteralQuery(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for LiteralQuery {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Ok(LiteralQuery(
            parts
                .uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        ))
    }
}

/// An API error: `{"errors": [{"code", "title"}]}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, title: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            title: title.into(),
        }
    }
    pub fn not_found(title: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", title)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {e}"),
        )
    }
    pub fn unavailable(title: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", title)
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let status = match r.code {
            ErrorCode::InvalidJson => StatusCode::BAD_REQUEST,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, r.code.as_str(), r.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"errors": [{"code": self.code, "title": self.title}]})),
        )
            .into_response()
    }
}

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

/// Kafka mode: a user's partition may be served by another instance; its
/// answer is proxied (one hop, marked so it is never forwarded again).
pub async fn forward(
    app: &AppState,
    user_id: &str,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
) -> Option<Response> {
    let own = app.ownership.as_ref()?;
    if headers.contains_key("x-contextd-forwarded") {
        return None;
    }
    let p = app.partition_of(user_id);
    let Some(addr) = own.remote_owner(p) else {
        if own.live.read().expect("lock").contains(&p) {
            return None;
        }
        return Some(ApiError::unavailable(format!("partition {p} of user {user_id:?} is not served by any instance yet (rebalancing); retry")).into_response());
    };
    let url = format!(
        "http://{addr}{}",
        uri.path_and_query().map(|x| x.as_str()).unwrap_or("/")
    );
    let res = tokio::task::spawn_blocking(move || {
        match ureq::get(&url)
            .set("x-contextd-forwarded", "1")
            .timeout(std::time::Duration::from_secs(10))
            .call()
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                Ok((r.status(), r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    Some(match res {
        Ok(Ok((st, body))) => (
            StatusCode::from_u16(st).unwrap_or(StatusCode::BAD_GATEWAY),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Ok(Err(e)) => ApiError::unavailable(format!(
            "the instance serving partition {p} ({addr}) did not answer: {e}"
        ))
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    })
}

pub fn router(state: AppState) -> Router {
    // Room for NDJSON bodies of many records; single records are checked
    // against max_record_bytes by validation (too_large).
    let body_limit = (state.config.max_record_bytes * 64).max(64 << 20);
    Router::new()
        .route(
            "/api/v2/user_profiles/events",
            post(ingest::post_profile_event),
        )
        .route(
            "/api/v2/users/{user_id}/events",
            post(ingest::post_user_event).get(query::events),
        )
        .route(
            "/api/v2/user_profiles",
            axum::routing::put(ingest::put_profile)
                .patch(ingest::patch_profile)
                .delete(ingest::delete_profile),
        )
        .route("/api/v2/zendesk/events", post(ingest::post_zendesk_event))
        .route("/api/v1/topics/{topic}/records", post(ingest::post_records))
        .route("/api/v2/users/lookup", get(query::lookup))
        .route("/api/v2/users/{user_id}/context", get(query::context))
        .route("/api/v2/users/{user_id}/profiles", get(query::profiles))
        .route(
            "/api/admin/visibility",
            get(admin::get_visibility).put(admin::put_visibility),
        )
        .route("/api/admin/event_types", get(admin::event_types))
        .route("/api/admin/profile_types", get(admin::profile_types))
        .route("/api/admin/dead_letters", get(admin::dead_letters))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(crate::console::routes())
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Every error answer has the `{"errors": [...]}` shape, also those axum
/// gives before a handler runs (a body over the limit, an unknown route,
/// a method not allowed, a query string that does not parse).
async fn json_errors(res: Response) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let status = res.status();
    let json = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let title = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, title).into_response();
    for (name, value) in parts.headers.iter() {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
