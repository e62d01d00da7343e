//! Liveness, readiness, metrics.

use super::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;
use std::sync::atomic::Ordering;

pub async fn healthz(State(app): State<AppState>) -> impl IntoResponse {
    if app.ready.failed.load(Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    }
}

pub async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    if app.ready.ready() {
        metrics::gauge!("contextd_ready").set(1.0);
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "catching up"})),
        )
    }
}

pub async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics().render(),
    )
}
