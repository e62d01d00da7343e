//! The running service: what the HTTP API needs to reach (state, the input
//! topics, readiness) and how the pieces start and stop in embedded mode.

use crate::config::Config;
use crate::ingest::Limits;
use crate::log::embedded::{EmbeddedLog, LogOptions, DROP_BEHIND_EVERY, DROP_BEHIND_STEP};
use crate::log::kafka::KafkaProducer;
use crate::log::OutRecord;
use crate::pipeline::embedded::{run_materializer, run_router, DriverOptions, Readiness, Stages};
use crate::pipeline::kafka::Ownership;
use crate::pipeline::materializer::{Materializer, MaterializerOptions};
use crate::pipeline::router::Router;
use crate::pipeline::{PipelineError, Topics};
use crate::state::apply::ApplyLimits;
use crate::state::{Store, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where HTTP writes go.
#[derive(Clone)]
pub enum Appender {
    Embedded(Arc<EmbeddedLog>),
    Kafka(KafkaProducer),
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("append failed: {0}")]
    Log(#[from] crate::log::LogError),
    #[error("append task failed: {0}")]
    Join(String),
}

impl Appender {
    /// Appends records; returns once they are durable (embedded) or acknowledged (Kafka).
    pub async fn append(&self, records: Vec<OutRecord>) -> Result<(), AppendError> {
        let n = records.len() as u64;
        let topic = records.first().map(|r| r.topic.clone()).unwrap_or_default();
        match self {
            Appender::Embedded(log) => {
                let log = log.clone();
                tokio::task::spawn_blocking(move || log.append(&records))
                    .await
                    .map_err(|e| AppendError::Join(e.to_string()))??;
            }
            Appender::Kafka(p) => p.send_all(records).await?,
        }
        metrics::counter!("contextd_http_appends_total", "topic" => topic).increment(n);
        Ok(())
    }
}

/// Shared by the HTTP handlers.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub appender: Appender,
    pub ready: Arc<Readiness>,
    pub limits: Limits,
    /// Kafka mode: which instance serves which partition (queries are proxied).
    pub ownership: Option<Arc<Ownership>>,
}

impl App {
    pub fn topics(&self) -> &Topics {
        &self.config.topics
    }

    pub fn partition_of(&self, user_id: &str) -> u32 {
        crate::state::keys::partition_for(user_id.as_bytes(), self.config.partitions)
    }
}

/// The embedded topics and their partition counts: inputs and the DLQ keep
/// one partition (total arrival order); the records log and snapshots are
/// partitioned like state.
pub fn embedded_topics(c: &Config) -> Vec<(String, u32)> {
    let t = &c.topics;
    vec![
        (t.zendesk_events.clone(), 1),
        (t.sunshine_events.clone(), 1),
        (t.sunshine_profiles.clone(), 1),
        (t.settings.clone(), 1),
        (t.dlq.clone(), 1),
        (t.records.clone(), c.partitions),
        (t.snapshots.clone(), c.partitions),
    ]
}

pub fn materializer_options(c: &Config, publish: bool) -> MaterializerOptions {
    MaterializerOptions {
        limits: ApplyLimits {
            max_events_per_user: c.timeline.max_events_per_user,
        },
        max_events: c.snapshot.max_events,
        max_bytes: c.snapshot.max_bytes,
        format: c.snapshot_format,
        publish,
        user_cache_bytes: c.storage.user_cache_mb << 20,
        min_interval: std::time::Duration::from_millis(c.snapshot.min_interval_ms),
    }
}

/// Options of one of `shares` materializers that run side by side
/// (threads, workers, replay workers): they share the user-cache budget.
pub fn materializer_share(c: &Config, publish: bool, shares: usize) -> MaterializerOptions {
    let mut o = materializer_options(c, publish);
    o.user_cache_bytes /= shares.max(1);
    o
}

/// Threads of the materializing stage (`pipeline.materializer_threads`;
/// 0: one per core), at most one per partition (and 64).
pub fn materializer_threads(c: &Config) -> u32 {
    let want = match c.pipeline.materializer_threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    (want as u32).clamp(1, c.partitions.clamp(1, 64))
}

pub fn limits(c: &Config) -> Limits {
    // Kafka mode: what a topic takes (the producer's message.max.bytes,
    // less room for the key and headers), for input records too: the HTTP
    // API answers `413 too_large` for one the producer would refuse. The
    // embedded logs take entries of any size.
    let message = if c.brokers.is_some() {
        c.kafka
            .max_message_bytes()
            .saturating_sub(crate::config::KAFKA_MESSAGE_ROOM)
    } else {
        usize::MAX
    };
    Limits {
        max_record_bytes: c.max_record_bytes.min(message),
        max_routed_bytes: message,
    }
}

/// Opens the data dir's store and embedded log (not one whose rebuild was
/// interrupted: `Store::begin_rebuild`).
pub fn open_embedded(c: &Config) -> Result<Arc<EmbeddedLog>, PipelineError> {
    open_embedded_with(c, &c.store_options(), |store| {
        Ok(store.refuse_interrupted_rebuild()?)
    })
}

/// `open_embedded` with other store options than the configuration's, and
/// `prepare` run on the store once it is checked, before the log opens (a
/// rebuild reads what it needs and drops column families there).
pub fn open_embedded_with(
    c: &Config,
    store_options: &crate::state::StoreOptions,
    prepare: impl FnOnce(&mut Store) -> Result<(), PipelineError>,
) -> Result<Arc<EmbeddedLog>, PipelineError> {
    let mut store = Store::open(&c.data_dir, store_options)?;
    store.check_partitions(c.partitions)?;
    store.check_mode(false)?;
    prepare(&mut store)?;
    Ok(Arc::new(EmbeddedLog::open_with(
        store,
        &embedded_topics(c),
        log_options(c),
    )?))
}

/// The embedded log's options: segment size, and the topic written past
/// the page cache while the materializing stage is behind or commits
/// 1 MiB or more (`storage.snapshot_log_direct_io`: the local snapshots).
pub fn log_options(c: &Config) -> LogOptions {
    LogOptions {
        segment_bytes: c.storage.log_segment_mb.max(1) << 20,
        direct_topics: if c.storage.snapshot_log_direct_io {
            vec![c.topics.snapshots.clone()]
        } else {
            Vec::new()
        },
    }
}

/// The embedded pipeline: the routing stage on its thread, the materializing
/// stage on `materializer_threads` threads over disjoint partition shares.
pub struct EmbeddedRuntime {
    pub app: Arc<App>,
    pub log: Arc<EmbeddedLog>,
    stop: Arc<AtomicBool>,
    stages: Option<Stages>,
}

impl EmbeddedRuntime {
    pub fn start(config: Config) -> Result<EmbeddedRuntime, PipelineError> {
        let log = open_embedded(&config)?;
        let threads = materializer_threads(&config);
        let ready = Arc::new(Readiness::new(threads));
        let stop = Arc::new(AtomicBool::new(false));
        let opts = DriverOptions {
            batch_records: config.pipeline.batch_records,
            snapshot_retention: config.storage.snapshot_log_retention.max(1),
            linger: Duration::from_millis(config.pipeline.linger_ms),
            idle_wait: Duration::from_millis(config.pipeline.idle_wait_ms.max(1)),
        };
        let router = Router::new(config.topics.clone(), config.partitions, limits(&config));
        let spawn = |name: &str, f: Box<dyn FnOnce() -> Result<(), PipelineError> + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| {
                    PipelineError::Store(StoreError::Incompatible(format!(
                        "cannot start the {name} thread: {e}"
                    )))
                })
        };
        let h1 = {
            let (log, ready, stop) = (log.clone(), ready.clone(), stop.clone());
            spawn(
                "router",
                Box::new(move || {
                    let r = run_router(log, router, opts, ready.clone(), stop.clone());
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "routing stage failed");
                        ready.failed.store(true, Ordering::Release);
                    }
                    r
                }),
            )?
        };
        let mut handles = vec![h1];
        for i in 0..threads {
            let parts: Vec<u32> = (0..config.partitions)
                .filter(|p| p % threads == i)
                .collect();
            let mopts = materializer_share(&config, true, threads as usize);
            let mat = Materializer::new(config.topics.clone(), mopts);
            let (log, ready, stop) = (log.clone(), ready.clone(), stop.clone());
            let name = if threads == 1 {
                "materializer".to_string()
            } else {
                format!("materializer-{i}")
            };
            handles.push(spawn(
                &name,
                Box::new(move || {
                    let r = run_materializer(log, mat, i, parts, opts, ready.clone(), stop);
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "materializing stage failed");
                        ready.failed.store(true, Ordering::Release);
                    }
                    r
                }),
            )?);
        }
        if config.storage.log_page_cache_mb > 0 {
            let keep = config.storage.log_page_cache_mb << 20;
            let (log, stop) = (log.clone(), stop.clone());
            handles.push(spawn(
                "log-drop-behind",
                Box::new(move || {
                    while !stop.load(Ordering::Acquire) {
                        log.drop_behind(keep, DROP_BEHIND_STEP);
                        std::thread::sleep(DROP_BEHIND_EVERY);
                    }
                    Ok(())
                }),
            )?);
        }
        let app = Arc::new(App {
            limits: limits(&config),
            store: log.store().clone(),
            appender: Appender::Embedded(log.clone()),
            ready,
            config,
            ownership: None,
        });
        Ok(EmbeddedRuntime {
            app,
            log,
            stop,
            stages: Some(Stages { handles }),
        })
    }

    /// True while both stages run.
    pub fn healthy(&self) -> bool {
        self.stages
            .as_ref()
            .is_some_and(|s| s.handles.iter().all(|h| !h.is_finished()))
    }

    /// Stops both stages after their current batch and flushes the store.
    pub fn shutdown(mut self) -> Result<(), PipelineError> {
        self.stop.store(true, Ordering::Release);
        self.log.wake_all();
        let r = self.stages.take().map(Stages::join).unwrap_or(Ok(()));
        self.log.store().flush()?;
        r
    }
}

/// Kafka mode: the routing, following and materializing stages on their own
/// threads, against the brokers; the HTTP API appends to Kafka.
pub struct KafkaRuntime {
    pub app: Arc<App>,
    stop: Arc<AtomicBool>,
    producer: KafkaProducer,
    handles: Vec<std::thread::JoinHandle<Result<(), PipelineError>>>,
}

impl KafkaRuntime {
    pub fn start(config: Config) -> Result<KafkaRuntime, PipelineError> {
        let store = Store::open(&config.data_dir, &config.store_options())?;
        // The data dir records its mode and partitions once the broker has
        // the topics: a start that fails before (a broker out of reach,
        // topics of another partition count) leaves a new one to any mode.
        store.refuse_other(config.partitions, true)?;
        crate::log::kafka::ensure_topics(&config)?;
        let producer = KafkaProducer::new(&config)?;
        store.check_partitions(config.partitions)?;
        store.check_mode(true)?;
        let ready = Arc::new(Readiness::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let followed = Arc::new(AtomicBool::new(false));
        let me = config
            .kafka
            .advertised_http_addr
            .clone()
            .unwrap_or_else(|| config.http_addr.clone());
        let own = Arc::new(Ownership {
            me,
            ..Default::default()
        });
        let mut handles = Vec::new();
        type Stage = Box<dyn FnOnce() -> Result<(), PipelineError> + Send>;
        let stages: Vec<(&str, Stage)> = vec![
            ("follower", {
                let (c, s, p, o, f, st) = (
                    config.clone(),
                    store.clone(),
                    producer.clone(),
                    own.clone(),
                    followed.clone(),
                    stop.clone(),
                );
                Box::new(move || crate::pipeline::kafka::run_follower(c, s, p, o, f, st))
            }),
            ("router", {
                let (c, s, p, o, r, f, st) = (
                    config.clone(),
                    store.clone(),
                    producer.clone(),
                    own.clone(),
                    ready.clone(),
                    followed.clone(),
                    stop.clone(),
                );
                Box::new(move || crate::pipeline::kafka::run_router(c, s, p, o, r, f, st))
            }),
            ("materializer", {
                let (c, s, p, o, r, st) = (
                    config.clone(),
                    store.clone(),
                    producer.clone(),
                    own.clone(),
                    ready.clone(),
                    stop.clone(),
                );
                Box::new(move || crate::pipeline::kafka::run_materializer(c, s, p, o, r, st))
            }),
        ];
        for (name, f) in stages {
            let ready = ready.clone();
            let h = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let r = f();
                    if let Err(e) = &r {
                        tracing::error!(stage = name, error = %e, "stage failed");
                        ready.failed.store(true, Ordering::Release);
                    }
                    r
                })
                .map_err(|e| {
                    PipelineError::Store(StoreError::Incompatible(format!(
                        "cannot start the {name} thread: {e}"
                    )))
                })?;
            handles.push(h);
        }
        let app = Arc::new(App {
            limits: limits(&config),
            store,
            appender: Appender::Kafka(producer.clone()),
            ready,
            config,
            ownership: Some(own),
        });
        Ok(KafkaRuntime {
            app,
            stop,
            producer,
            handles,
        })
    }

    /// Finishes the current batches, commits, leaves the groups.
    pub fn shutdown(self) -> Result<(), PipelineError> {
        self.stop.store(true, Ordering::Release);
        let r = Stages {
            handles: self.handles,
        }
        .join();
        self.producer.flush();
        self.app.store.flush()?;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_log_is_written_direct_unless_turned_off() {
        let mut c = Config::default();
        c.topics.snapshots = "out.snaps".into();
        c.storage.log_segment_mb = 2;
        let o = log_options(&c);
        assert_eq!(o.direct_topics, vec!["out.snaps".to_string()]);
        assert_eq!(o.segment_bytes, 2 << 20);
        c.storage.snapshot_log_direct_io = false;
        assert!(log_options(&c).direct_topics.is_empty());
    }
}
