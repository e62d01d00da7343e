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
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "catching up"})),
        )
    }
}

/// The gauges of the state, read when scraped: readiness, the users
/// counted in the local state, RocksDB's estimate of its live data, and
/// (embedded) the bytes of the local topics' files.
fn state_gauges(app: &AppState) {
    metrics::gauge!("contextd_ready").set(if app.ready.ready() { 1.0 } else { 0.0 });
    let users: i64 = (0..app.config.partitions)
        .filter_map(|p| app.store.user_count(p).ok().flatten())
        .sum();
    metrics::gauge!("contextd_users").set(users as f64);
    metrics::gauge!("contextd_state_bytes").set(app.store.approximate_size() as f64);
    if let crate::app::Appender::Embedded(log) = &app.appender {
        metrics::gauge!("contextd_log_bytes").set(log.disk_bytes() as f64);
    }
}

pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let _ = super::blocking(move || {
        state_gauges(&app);
        Ok(())
    })
    .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics().render(),
    )
}
