//! Logs (tracing, human or JSON) and metrics (Prometheus text at /metrics).

use crate::config::LogFormat;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CONTEXTD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    // Colours only for a terminal: not in files and log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and describes the metrics.
pub fn metrics() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("contextd_record_latency_seconds".into()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("contextd_batch_records".into()),
                    &[1.0, 10.0, 100.0, 1000.0, 4096.0, 16384.0, 65536.0],
                )
            })
            .expect("valid buckets")
            .install_recorder()
            .expect("metrics recorder installed once");
        describe();
        // Histogram samples wait in the recorder until upkeep folds them
        // into their buckets; a render does it too, but without anyone
        // scraping `/metrics` they would pile up (about 16 bytes of memory
        // per record applied: BENCHMARKS.md, item 52).
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name(UPKEEP_THREAD.into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            })
            .expect("spawn the metrics upkeep thread");
        handle
    })
}

/// The thread that folds histogram samples into their buckets, and how often.
const UPKEEP_THREAD: &str = "metrics-upkeep";
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "contextd_records_consumed_total",
        "Input records consumed, by topic"
    );
    describe_histogram!(
        "contextd_record_latency_seconds",
        Unit::Seconds,
        "Per record applied: from its input timestamp to the commit of its batch (state and snapshot)"
    );
    describe_counter!(
        "contextd_records_applied_total",
        "Records applied to state, by records-log topic"
    );
    describe_counter!(
        "contextd_records_dead_lettered_total",
        "Records sent to the dead-letter topic, by input topic and error code"
    );
    describe_counter!(
        "contextd_records_duplicate_skipped_total",
        "Records-log entries skipped because their input offset was already applied"
    );
    describe_counter!(
        "contextd_events_deduplicated_total",
        "Events not stored again: the user's timeline already holds their id"
    );
    describe_counter!(
        "contextd_snapshots_published_total",
        "Context snapshots published"
    );
    describe_counter!(
        "contextd_direct_commits_total",
        "Embedded commits whose snapshots were written past the page cache (O_DIRECT): the materializing stage was behind"
    );
    describe_counter!(
        "contextd_snapshot_bytes_total",
        Unit::Bytes,
        "Bytes of context snapshots published"
    );
    describe_counter!(
        "contextd_identity_conflicts_total",
        "Identifiers already linked to another user (link kept)"
    );
    describe_counter!(
        "contextd_http_appends_total",
        "Records appended through the HTTP API, by topic"
    );
    describe_histogram!(
        "contextd_batch_seconds",
        Unit::Seconds,
        "Time to process and commit one batch, by stage"
    );
    describe_histogram!("contextd_batch_records", "Records per batch, by stage");
    describe_gauge!(
        "contextd_state_bytes",
        Unit::Bytes,
        "Approximate live bytes in the state store"
    );
    describe_gauge!("contextd_users", "Users in the local state");
    describe_gauge!(
        "contextd_ready",
        "1 once the pipeline caught up after start"
    );
    metrics::gauge!("contextd_ready").set(0.0);
    // Counters a dashboard sums are there from the start, at 0.
    for c in [
        "contextd_snapshots_published_total",
        "contextd_identity_conflicts_total",
        "contextd_records_duplicate_skipped_total",
        "contextd_events_deduplicated_total",
    ] {
        metrics::counter!(c).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder is installed once, with a thread that keeps histogram
    /// samples from piling up when nobody scrapes.
    #[test]
    fn the_recorder_runs_its_upkeep() {
        let a: *const PrometheusHandle = metrics();
        let b: *const PrometheusHandle = metrics();
        assert_eq!(a, b);
        let names = || -> Vec<String> {
            crate::threads::all()
                .into_iter()
                .map(|(name, _)| name)
                .collect()
        };
        // A new thread names itself once it runs: wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !names().iter().any(|n| n == UPKEEP_THREAD) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let names = names();
        assert_eq!(
            names.iter().filter(|n| *n == UPKEEP_THREAD).count(),
            1,
            "{names:?}"
        );
    }
}
