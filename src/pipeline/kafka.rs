//! Kafka mode's driver: the same `Router` and `Materializer` as embedded
//! mode, on dedicated threads, over rdkafka consumers in a consumer group.
//!
//! - routing: group `{group_id}` over the input topics; records to the
//!   records topic, dead letters to the DLQ, new identity links to the
//!   compacted identities topic; input offsets stored only after the broker
//!   acknowledged everything the batch produced (at least once; the
//!   materializer skips re-sent records by input offset).
//! - following: every instance reads the identities, settings and members
//!   topics in full (no group), so a link made anywhere resolves everywhere.
//! - materializing: group `{group_id}-materializer` over the records topic.
//!   On assignment each partition seeks to the offset stored in RocksDB and is
//!   restored (replayed without publishing) up to the end seen at
//!   assignment; then snapshot versions are synchronised with the snapshots
//!   topic and only changed contexts are published. Revocation happens
//!   inside `poll`, between batches, so the in-flight batch is finished.
//!   Snapshots go through an outbox in the same `WriteBatch` as the state,
//!   so a re-send after a crash carries the same version and content (a
//!   snapshot's entry is read back from that state: `OUTBOX_SNAPSHOT`). A
//!   batch is split by partition over `pipeline.materializer_threads`
//!   workers, each on its own thread with a queue (`Pool`): the consumer
//!   polls on while they work, and waits for them only where partitions
//!   move or go live. Each sends its snapshots without waiting for the acks
//!   of its earlier batches (up to `MAX_IN_FLIGHT`), and after a failed
//!   delivery sends everything in flight again, in order.

use super::embedded::{LinkCache, Readiness, StoreLookup};
use super::materializer::{observe_latency, Materializer};
use super::router::Router;
use super::PipelineError;
use crate::config::Config;
use crate::ingest;
use crate::ingest::SETTINGS_KEY;
use crate::log::kafka::{
    consumer_config, partition_count, read_until_idle, to_log_record, Acks, KafkaProducer,
    MEMBERS_TOPIC,
};
use crate::log::{LogError, LogRecord, OutRecord};
use crate::model::{record, InputRef, Record, FORMAT_VERSION};
use crate::replay::settle_partition;
use crate::snapshot::Published;
use crate::state::keys::{self, CF_IDENT, CF_META, CF_OUTBOX, CF_PART};
use crate::state::Store;
use prost::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use rocksdb::{IteratorMode, WriteBatch};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

fn kerr(e: KafkaError) -> PipelineError {
    PipelineError::Log(LogError::Kafka(e.to_string()))
}

/// Who serves which records-log partition (from the members topic).
#[derive(Default)]
pub struct Ownership {
    /// This instance's advertised HTTP address.
    pub me: String,
    /// Partitions this instance has restored and serves.
    pub live: RwLock<HashSet<u32>>,
    /// instance -> (partitions, announced at ms).
    pub members: RwLock<HashMap<String, (Vec<u32>, i64)>>,
    /// Set when a member fell silent while still holding partitions: the
    /// stages leave and rejoin their groups, so the coordinator reassigns them.
    pub rejoin_router: AtomicBool,
    pub rejoin_materializer: AtomicBool,
}

/// How often every instance announces itself on the members topic.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// A member silent for this long while holding partitions nobody else
/// serves is presumed dead.
const SILENT_AFTER_MS: i64 = 20_000;

impl Ownership {
    /// Members silent for `SILENT_AFTER_MS` that still claim partitions no
    /// live member serves; they are forgotten once reported.
    pub fn take_silent(&self, now_ms: i64) -> Vec<String> {
        let mine = self.live.read().expect("lock").clone();
        let mut members = self.members.write().expect("lock");
        let fresh: HashSet<u32> = members
            .iter()
            .filter(|(addr, (_, at))| **addr != self.me && now_ms - at < SILENT_AFTER_MS)
            .flat_map(|(_, (parts, _))| parts.iter().copied())
            .chain(mine.iter().copied())
            .collect();
        let silent: Vec<String> = members
            .iter()
            .filter(|(addr, (parts, at))| {
                **addr != self.me
                    && now_ms - at >= SILENT_AFTER_MS
                    && parts.iter().any(|p| !fresh.contains(p))
            })
            .map(|(addr, _)| addr.clone())
            .collect();
        for a in &silent {
            members.remove(a);
        }
        silent
    }

    /// The HTTP address of another instance serving partition `p`, if any.
    pub fn remote_owner(&self, p: u32) -> Option<String> {
        if self.live.read().expect("lock").contains(&p) {
            return None;
        }
        self.members
            .read()
            .expect("lock")
            .iter()
            .filter(|(addr, (parts, _))| **addr != self.me && parts.contains(&p))
            .max_by_key(|(_, (_, at))| *at)
            .map(|(addr, _)| addr.clone())
    }
}

/// Polls up to `max` records: waits up to `wait` for the first, then drains.
fn poll_batch<C: ConsumerContext>(
    c: &BaseConsumer<C>,
    max: usize,
    wait: Duration,
) -> Result<Vec<LogRecord>, PipelineError> {
    let mut out = Vec::new();
    let mut timeout = wait;
    while out.len() < max {
        match c.poll(timeout) {
            Some(Ok(m)) => out.push(to_log_record(&m)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "kafka consumer error; retrying");
                metrics::counter!("contextd_kafka_errors_total", "stage" => "poll").increment(1);
                break;
            }
            None => break,
        }
        timeout = Duration::ZERO;
    }
    Ok(out)
}

/// A polled batch in log-time order across its partitions, each
/// partition's records kept in offset order: repeatedly the head with the
/// smallest (timestamp, first seen), as the embedded routing stage merges
/// its inputs and Kafka Streams picks the next record of a task. Kafka
/// orders nothing across topics, and the consumer hands a fetch over
/// partition by partition: without this an `identity_created` and the
/// custom event after it (another topic) could be routed the other way
/// round, and the event resolve to a new user.
fn merge_by_log_time(batch: Vec<LogRecord>) -> Vec<LogRecord> {
    let mut streams: Vec<std::collections::VecDeque<LogRecord>> = Vec::new();
    for r in batch {
        let same = |s: &std::collections::VecDeque<LogRecord>| {
            s.front()
                .is_some_and(|f| f.partition == r.partition && f.topic == r.topic)
        };
        match streams.iter_mut().find(|s| same(s)) {
            Some(s) => s.push_back(r),
            None => streams.push(std::collections::VecDeque::from([r])),
        }
    }
    if streams.len() == 1 {
        return streams.pop().map(Vec::from).unwrap_or_default();
    }
    let mut out = Vec::with_capacity(streams.iter().map(|s| s.len()).sum());
    while let Some(i) = super::earliest(&streams) {
        out.push(streams[i].pop_front().expect("non-empty"));
    }
    out
}

/// Stores, for the next commit, the next offset to consume of each
/// (topic, partition): one past the last record processed. (Not
/// `Consumer::store_offset`: it wraps librdkafka's `rd_kafka_offset_store`,
/// which commits the offset it is given plus one, so given the next offset
/// a restarted or succeeding member would skip a record.)
fn store_next_offsets<'a, C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    next: impl IntoIterator<Item = (&'a str, i32, i64)>,
) {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in next {
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            tracing::warn!(error = %e, topic, partition, "cannot store offset");
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::warn!(error = %e, "cannot store offsets (partitions revoked?)");
    }
}

/// Runs `f` until it succeeds or `stop`, backing off on Kafka errors
/// (broker down: processing pauses, nothing is committed, then resumes).
fn retry<T>(
    stop: &AtomicBool,
    what: &str,
    mut f: impl FnMut() -> Result<T, PipelineError>,
) -> Result<T, PipelineError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(PipelineError::Log(LogError::Kafka(e))) if !stop.load(Ordering::Acquire) => {
                tracing::warn!(error = %e, what, "kafka unavailable; retrying");
                metrics::counter!("contextd_kafka_errors_total", "stage" => what.to_string())
                    .increment(1);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The routing stage's consumer context: settings first. When an
/// assignment includes partitions of the settings topic, the input
/// partitions assigned with them are paused until the settings already on
/// those partitions are routed (`SettingsFirst`), as Kafka Streams
/// restores a global table before it processes records. Otherwise, at a
/// first start on a backlog, the poll that happens to come first routes
/// thousands of records under the default settings (nothing shown), and
/// the settings record after them re-publishes and reloads every user
/// routed so far.
struct RouterContext {
    settings_topic: String,
    pending: Mutex<Option<SettingsFirst>>,
}

/// An assignment whose inputs wait for its settings partitions.
struct SettingsFirst {
    settings: Vec<i32>,
    paused: TopicPartitionList,
    since: Instant,
    /// Per settings partition, the end to reach (its high watermark when
    /// the routing loop first saw this assignment); `None` until then.
    ends: Option<HashMap<i32, i64>>,
}

/// How long inputs wait for their settings at most (a broker that does not
/// answer: routing goes on, with the settings whenever they come).
const SETTINGS_FIRST_MAX: Duration = Duration::from_secs(10);

impl ClientContext for RouterContext {}

impl ConsumerContext for RouterContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut pending = self.pending.lock().expect("lock");
        *pending = None;
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        let mut settings = Vec::new();
        let mut inputs = TopicPartitionList::new();
        for e in tpl.elements() {
            if e.topic() == self.settings_topic {
                settings.push(e.partition());
            } else {
                inputs.add_partition(e.topic(), e.partition());
            }
        }
        if settings.is_empty() || inputs.count() == 0 {
            return;
        }
        if let Err(e) = consumer.pause(&inputs) {
            tracing::warn!(error = %e, "cannot pause the inputs for the settings; routing them as they come");
            return;
        }
        *pending = Some(SettingsFirst {
            settings,
            paused: inputs,
            since: Instant::now(),
            ends: None,
        });
    }
}

impl RouterContext {
    /// After each routed batch (`next`: next offsets routed per (topic,
    /// partition)): resumes the paused inputs once every settings partition
    /// reached its end.
    fn settings_first(
        &self,
        consumer: &BaseConsumer<RouterContext>,
        next: &HashMap<(String, i32), i64>,
    ) {
        let mut guard = self.pending.lock().expect("lock");
        let Some(sf) = guard.as_mut() else { return };
        let ends = sf.ends.get_or_insert_with(|| {
            // Committed offsets say where each settings partition starts.
            let mut tpl = TopicPartitionList::new();
            for p in &sf.settings {
                tpl.add_partition(&self.settings_topic, *p);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .ok();
            let mut ends = HashMap::new();
            for p in &sf.settings {
                let from = committed
                    .as_ref()
                    .and_then(|t| t.find_partition(&self.settings_topic, *p))
                    .and_then(|e| e.offset().to_raw())
                    .unwrap_or(0)
                    .max(0);
                match consumer.fetch_watermarks(&self.settings_topic, *p, Duration::from_secs(10)) {
                    Ok((_, high)) if high > from => {
                        ends.insert(*p, high);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, partition = p, "no high watermark for a settings partition"),
                }
            }
            ends
        });
        ends.retain(|p, end| {
            next.get(&(self.settings_topic.clone(), *p))
                .is_none_or(|n| n < end)
        });
        let late = sf.since.elapsed() > SETTINGS_FIRST_MAX;
        if ends.is_empty() || late {
            if late {
                tracing::warn!(waiting = ?ends, "settings not routed in time; routing the inputs anyway");
            }
            if let Err(e) = consumer.resume(&sf.paused) {
                tracing::warn!(error = %e, "cannot resume the inputs");
            }
            tracing::debug!(after = ?sf.since.elapsed(), "settings routed first; inputs resumed");
            *guard = None;
        }
    }
}

/// The routing stage (group `group_id`).
pub fn run_router(
    c: Config,
    store: Store,
    producer: KafkaProducer,
    own: Arc<Ownership>,
    ready: Arc<Readiness>,
    followed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let consumer: BaseConsumer<RouterContext> = consumer_config(&c, &c.group_id)
        .create_with_context(RouterContext {
            settings_topic: c.topics.settings.clone(),
            pending: Mutex::new(None),
        })
        .map_err(kerr)?;
    consumer.subscribe(&c.topics.inputs()).map_err(kerr)?;
    let router = Router::new(c.topics.clone(), c.partitions, crate::app::limits(&c));
    // Resolve nothing before every link made elsewhere is known.
    while !followed.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut last_lag = Instant::now();
    let started = Instant::now();
    let links = LinkCache::default();
    while !stop.load(Ordering::Acquire) {
        if own.rejoin_router.swap(false, Ordering::AcqRel) {
            consumer.unsubscribe();
            consumer.subscribe(&c.topics.inputs()).map_err(kerr)?;
        }
        if last_lag.elapsed() >= LAG_EVERY {
            last_lag = Instant::now();
            report_lag(&consumer, "route");
        }
        let batch = poll_batch(
            &consumer,
            super::ROUTE_BUDGET * c.pipeline.batch_records,
            Duration::from_millis(50),
        )?;
        if batch.is_empty() {
            consumer
                .context()
                .settings_first(&consumer, &HashMap::new());
            let assigned = consumer
                .assignment()
                .map(|a| a.count() > 0)
                .unwrap_or(false);
            if assigned || started.elapsed() > Duration::from_secs(20) {
                ready.router.store(true, Ordering::Release);
            }
            continue;
        }
        let t0 = Instant::now();
        let batch = merge_by_log_time(batch);
        let lookup = StoreLookup::cached(&store, &links);
        let routed = router.route(&lookup, &batch);
        lookup.check()?;
        let mut out = routed.out;
        for l in &routed.links {
            if let Some(id) = &l.identifier {
                out.push(OutRecord {
                    topic: c.topics.identities.clone(),
                    partition: None,
                    key: Some(id.key().into_bytes()),
                    value: l.user_id.clone().into_bytes().into(),
                    timestamp_ms: crate::model::time::now_ms(),
                });
            }
        }
        // Offsets are stored only after everything the batch produced is acknowledged.
        retry(&stop, "route", || {
            producer
                .send_all_blocking(&out)
                .map_err(PipelineError::from)
        })?;
        let mut wb = WriteBatch::default();
        for l in &routed.links {
            if let Some(id) = &l.identifier {
                if store.linked_user(id)?.is_none() {
                    wb.put_cf(
                        store.cf(CF_IDENT),
                        keys::ident(&id.key()),
                        l.user_id.as_bytes(),
                    );
                }
            }
        }
        store.write(wb)?;
        store_next_offsets(
            &consumer,
            routed
                .positions
                .iter()
                .map(|((t, p), next)| (t.as_str(), *p, *next)),
        );
        consumer
            .context()
            .settings_first(&consumer, &routed.positions);
        metrics::histogram!("contextd_batch_records", "stage" => "route")
            .record(batch.len() as f64);
        metrics::histogram!("contextd_batch_seconds", "stage" => "route")
            .record(t0.elapsed().as_secs_f64());
    }
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

/// Reads identities, settings and members in full, for ever.
pub fn run_follower(
    c: Config,
    store: Store,
    producer: KafkaProducer,
    own: Arc<Ownership>,
    followed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let consumer: BaseConsumer = consumer_config(&c, "contextd-follower")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kerr)?;
    let mut tpl = TopicPartitionList::new();
    let mut highs = HashMap::new();
    for topic in [
        c.topics.identities.as_str(),
        c.topics.settings.as_str(),
        MEMBERS_TOPIC,
    ] {
        // Every partition the topic has (created with `partitions`, or
        // created before by an operator with another count).
        let n = retry(&stop, "follow", || {
            match partition_count(&consumer, topic)? {
                0 => Err(LogError::Kafka(format!("topic {topic} has no partitions yet")).into()),
                n => Ok(n as i32),
            }
        })?;
        for p in 0..n {
            let from = store
                .get_i64(CF_META, &keys::position("follower", topic, p))?
                .unwrap_or(0);
            // Members are read from the start: announcements are in memory only.
            let from = if topic == MEMBERS_TOPIC { 0 } else { from };
            tpl.add_partition_offset(
                topic,
                p,
                if from > 0 {
                    Offset::Offset(from)
                } else {
                    Offset::Beginning
                },
            )
            .map_err(kerr)?;
            let high = retry(&stop, "follow", || {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .map_err(kerr)
            })?
            .1;
            highs.insert((topic.to_string(), p), (from, high));
        }
    }
    consumer.assign(&tpl).map_err(kerr)?;
    let limits = crate::app::limits(&c);
    let mut idle_since = Instant::now();
    let mut last_announce = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if last_announce.elapsed() >= ANNOUNCE_EVERY {
            last_announce = Instant::now();
            // Heartbeat on the members topic (best effort: a missed one only
            // delays proxying and dead-member detection).
            if let Err(e) = announce(&c, &producer, &own, &stop) {
                tracing::warn!(error = %e, "cannot announce on the members topic");
            }
            for addr in own.take_silent(crate::model::time::now_ms()) {
                tracing::warn!(instance = %addr, "instance silent while holding partitions; rejoining the groups so they are reassigned");
                metrics::counter!("contextd_silent_members_total").increment(1);
                own.rejoin_router.store(true, Ordering::Release);
                own.rejoin_materializer.store(true, Ordering::Release);
            }
        }
        let batch = poll_batch(&consumer, 10_000, Duration::from_millis(50))?;
        if batch.is_empty() {
            let reached = highs.values().all(|(pos, high)| pos >= high);
            if !followed.load(Ordering::Acquire)
                && (reached && idle_since.elapsed() > Duration::from_millis(300)
                    || idle_since.elapsed() > Duration::from_secs(15))
            {
                followed.store(true, Ordering::Release);
            }
            continue;
        }
        idle_since = Instant::now();
        let mut wb = WriteBatch::default();
        let mut pending: HashSet<Vec<u8>> = HashSet::new();
        for r in &batch {
            if let Some(e) = highs.get_mut(&(r.topic.clone(), r.partition)) {
                e.0 = e.0.max(r.offset + 1);
            }
            if r.topic == c.topics.identities {
                let Some(k) = &r.key else { continue };
                match store.get_raw(CF_IDENT, k)? {
                    None if !pending.contains(k) => {
                        wb.put_cf(store.cf(CF_IDENT), k, &r.value);
                        pending.insert(k.clone());
                    }
                    Some(u) if u != r.value => {
                        metrics::counter!("contextd_identity_conflicts_total").increment(1);
                        tracing::warn!(identifier = %String::from_utf8_lossy(k), kept = %String::from_utf8_lossy(&u), "identifier linked to two users by different instances; keeping the first seen here");
                    }
                    _ => {}
                }
            } else if r.topic == c.topics.settings {
                // As the routing stage takes them: key `visibility` (or none).
                let keyed = r.key.as_deref().is_none_or(|k| k == SETTINGS_KEY);
                if let Some(s) = keyed
                    .then(|| ingest::settings_record(&r.value, limits).ok())
                    .flatten()
                {
                    let rec = Record {
                        format_version: FORMAT_VERSION,
                        input: Some(InputRef {
                            topic: r.topic.clone(),
                            partition: r.partition,
                            offset: r.offset,
                        }),
                        body: Some(record::Body::Settings(s)),
                        ..Default::default()
                    };
                    wb.put_cf(store.cf(CF_META), keys::META_SETTINGS, rec.encode_to_vec());
                }
            } else if r.topic == MEMBERS_TOPIC {
                if let Some((http, parts, at)) = member(&c.group_id, &r.value) {
                    own.members.write().expect("lock").insert(http, (parts, at));
                }
                continue;
            }
            store.put_i64(
                &mut wb,
                CF_META,
                &keys::position("follower", &r.topic, r.partition),
                r.offset + 1,
            );
        }
        store.write(wb)?;
    }
    Ok(())
}

/// An announcement on the members topic (`announce`): the instance's HTTP
/// address, the partitions it serves and when it said so. One members
/// topic serves every deployment on the cluster: only announcements of
/// this consumer group are members.
fn member(group_id: &str, value: &[u8]) -> Option<(String, Vec<u32>, i64)> {
    let v = serde_json::from_slice::<serde_json::Value>(value).ok()?;
    if v["group"].as_str() != Some(group_id) {
        return None;
    }
    let parts = v["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    Some((v["http"].as_str()?.to_string(), parts, v["at_ms"].as_i64()?))
}

/// Rebalance events, handed from the callback (inside `poll`) to the loop.
enum Rebalanced {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct MatContext {
    store: Store,
    topic: String,
    events: Mutex<Vec<Rebalanced>>,
    /// Snapshots sent and not yet acknowledged are delivered before a
    /// revoke returns, so the next owner of a partition reads them when it
    /// synchronises versions.
    producer: KafkaProducer,
    /// The workers, which finish what they were handed before a revoke
    /// returns (set once they are started).
    pool: OnceLock<Arc<Pool>>,
}

impl ClientContext for MatContext {}

impl ConsumerContext for MatContext {
    /// Assignment seeks each partition to the offset stored with its state in
    /// RocksDB (not the group's committed offset, which is only for lag).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        metrics::counter!("contextd_rebalances_total").increment(1);
        let parts: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for p in &parts {
                    let off = self
                        .store
                        .get_i64(CF_PART, &keys::part_offset(*p as u32))
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                    let _ = tpl.set_partition_offset(
                        &self.topic,
                        *p,
                        if off > 0 {
                            Offset::Offset(off)
                        } else {
                            Offset::Beginning
                        },
                    );
                }
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
                tracing::info!(partitions = ?parts, "records partitions assigned");
                self.events
                    .lock()
                    .expect("lock")
                    .push(Rebalanced::Assigned(parts));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?parts, "records partitions revoked");
                if let Some(pool) = self.pool.get() {
                    if let Err(e) = pool.drain() {
                        tracing::error!(error = %e, "materializing workers failed before a revoke");
                    }
                }
                self.producer.flush();
                self.events
                    .lock()
                    .expect("lock")
                    .push(Rebalanced::Revoked(parts));
                let _ = consumer.unassign();
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

static OUTBOX_SEQ: AtomicU64 = AtomicU64::new(0);

/// First byte of an outbox entry in the binary form (older entries are
/// JSON objects, so they start with `{`).
const OUTBOX_BINARY: u8 = 0;

/// First byte of a snapshot's outbox entry, written without the snapshot:
/// what a re-send needs is the user's last published snapshot, and the
/// state committed in the same `WriteBatch` as the entry builds exactly
/// that (`Store::context`, as `GET /api/v2/users/{id}/context` serves
/// it). The snapshots' bytes (50–60 MB/s in the benchmark) then do not
/// go through RocksDB's write-ahead log, memtables and flushes.
const OUTBOX_SNAPSHOT: u8 = 1;

/// An outbox entry: `0`, topic length (u16) and topic, partition (i32, -1:
/// none), key length (i32, -1: none) and key, timestamp (i64 ms), value.
/// Big-endian; the value is copied once, as is. A snapshot (of `snapshots`,
/// with a partition and a key) starts with `1` and has no value.
fn encode_out(r: &OutRecord, snapshots: &str) -> Vec<u8> {
    let key_len = r.key.as_ref().map_or(0, Vec::len);
    let snapshot = r.topic == snapshots && r.partition.is_some() && r.key.is_some();
    let value_len = if snapshot { 0 } else { r.value.len() };
    let mut v = Vec::with_capacity(1 + 2 + r.topic.len() + 4 + 4 + key_len + 8 + value_len);
    v.push(if snapshot {
        OUTBOX_SNAPSHOT
    } else {
        OUTBOX_BINARY
    });
    v.extend_from_slice(&(r.topic.len() as u16).to_be_bytes());
    v.extend_from_slice(r.topic.as_bytes());
    v.extend_from_slice(&r.partition.unwrap_or(-1).to_be_bytes());
    match &r.key {
        Some(k) => {
            v.extend_from_slice(&(k.len() as i32).to_be_bytes());
            v.extend_from_slice(k);
        }
        None => v.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    v.extend_from_slice(&r.timestamp_ms.to_be_bytes());
    if !snapshot {
        for s in r.value.slices() {
            v.extend_from_slice(s);
        }
    }
    v
}

/// An outbox entry read back.
#[derive(Debug)]
enum Outboxed {
    /// A record to send as it was written.
    Whole(OutRecord),
    /// A snapshot of the user `key` on `partition` (the value empty): the
    /// state gives its bytes.
    Snapshot(OutRecord),
}

fn decode_out(v: &[u8]) -> Option<Outboxed> {
    let snapshot = match v.first() {
        Some(&OUTBOX_BINARY) => false,
        Some(&OUTBOX_SNAPSHOT) => true,
        _ => return decode_out_json(v).map(Outboxed::Whole),
    };
    let mut at: usize = 1;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = v.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let tlen = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(take(tlen)?).ok()?.to_string();
    let partition = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let klen = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let key = if klen < 0 {
        None
    } else {
        Some(take(klen as usize)?.to_vec())
    };
    let timestamp_ms = i64::from_be_bytes(take(8)?.try_into().ok()?);
    let r = OutRecord {
        topic,
        partition: (partition >= 0).then_some(partition),
        key,
        value: v.get(at..)?.into(),
        timestamp_ms,
    };
    if !snapshot {
        return Some(Outboxed::Whole(r));
    }
    (r.partition.is_some() && r.key.is_some() && r.value.is_empty())
        .then_some(Outboxed::Snapshot(r))
}

/// Outbox entries written by versions before the binary form.
fn decode_out_json(v: &[u8]) -> Option<OutRecord> {
    let j: serde_json::Value = serde_json::from_slice(v).ok()?;
    Some(OutRecord {
        topic: j["t"].as_str()?.to_string(),
        partition: j["p"].as_i64().map(|p| p as i32),
        key: serde_json::from_value(j["k"].clone()).ok()?,
        value: serde_json::from_value::<Vec<u8>>(j["v"].clone())
            .ok()?
            .into(),
        timestamp_ms: j["ts"].as_i64().unwrap_or(0),
    })
}

/// Puts `out` into the outbox (in `batch`, with the state that publishes
/// it: a snapshot of `snapshots` is read back from that state); returns
/// the keys, in send order.
fn put_outbox(
    store: &Store,
    batch: &mut WriteBatch,
    out: &[OutRecord],
    snapshots: &str,
) -> Vec<[u8; 8]> {
    let base = (crate::model::time::now_ms() as u64) << 20;
    out.iter()
        .map(|r| {
            let k = (base + OUTBOX_SEQ.fetch_add(1, Ordering::Relaxed) % (1 << 20)).to_be_bytes();
            batch.put_cf(store.cf(CF_OUTBOX), k, encode_out(r, snapshots));
            k
        })
        .collect()
}

/// The last snapshot published of `user_id` (records partition `p`), as
/// it was published: what the state committed with its outbox entry
/// builds. `None` if the state has no snapshot of the user.
fn last_published(
    c: &Config,
    store: &Store,
    p: u32,
    user_id: &str,
) -> Result<Option<crate::log::Payload>, PipelineError> {
    let limit = crate::snapshot::SizeLimit::of(c);
    let Some(snap) = store.context(p, user_id, c.snapshot.max_events, limit)? else {
        return Ok(None);
    };
    Ok(Some(match c.snapshot_format {
        super::SnapshotFormat::Protobuf => snap.encode_to_vec().into(),
        super::SnapshotFormat::Json => {
            crate::snapshot::json_bytes(&crate::snapshot::decode(&snap), limit.bytes).into()
        }
    }))
}

/// Writes the state batch with the outgoing records as outbox entries, sends
/// them, then clears the outbox: records are sent at least once, each
/// re-send identical to the first.
fn commit_with_outbox(
    store: &Store,
    producer: &KafkaProducer,
    mut batch: WriteBatch,
    out: &[OutRecord],
    snapshots: &str,
    stop: &AtomicBool,
) -> Result<(), PipelineError> {
    let keys_written = put_outbox(store, &mut batch, out, snapshots);
    store.write(batch)?;
    retry(stop, "publish", || {
        producer.send_all_blocking(out).map_err(PipelineError::from)
    })?;
    let mut del = WriteBatch::default();
    for k in keys_written {
        del.delete_cf(store.cf(CF_OUTBOX), k);
    }
    store.write(del)?;
    Ok(())
}

/// Re-sends what a previous run wrote to the outbox but may not have
/// delivered; returns (records re-sent, snapshots dropped as superseded).
/// A snapshot whose user has a snapshot of the same or a higher version
/// on the topic by now is not sent again: after a crash another instance
/// may have taken the partition over and published newer versions, and a
/// late re-send would leave the older one last on the compacted topic.
fn drain_outbox(
    c: &Config,
    store: &Store,
    producer: &KafkaProducer,
    stop: &AtomicBool,
) -> Result<(usize, usize), PipelineError> {
    let mut entries: Vec<Option<OutRecord>> = Vec::new();
    // Per user (partition, key), the place of its newest snapshot entry:
    // the state gives the last snapshot published, so one re-send each.
    let mut snapshot_at: HashMap<(i32, Vec<u8>), usize> = HashMap::new();
    let mut ks = Vec::new();
    for item in store
        .db()
        .iterator_cf(store.cf(CF_OUTBOX), IteratorMode::Start)
    {
        let (k, v) = item?;
        match decode_out(&v) {
            Some(Outboxed::Whole(r)) => entries.push(Some(r)),
            Some(Outboxed::Snapshot(r)) => {
                let user = (r.partition.unwrap_or(-1), r.key.clone().unwrap_or_default());
                if let Some(older) = snapshot_at.insert(user, entries.len()) {
                    entries[older] = None;
                }
                entries.push(Some(r));
            }
            None => tracing::warn!(key = ?k, "an outbox entry that does not decode is dropped"),
        }
        ks.push(k.to_vec());
    }
    for ((p, user), at) in snapshot_at {
        let user = String::from_utf8_lossy(&user);
        match last_published(c, store, p as u32, &user)? {
            Some(value) => {
                if let Some(r) = entries[at].as_mut() {
                    r.value = value;
                }
            }
            None => {
                tracing::warn!(partition = p, user = %user, "an outboxed snapshot's user has none in the state; not sent again");
                entries[at] = None;
            }
        }
    }
    let mut out: Vec<OutRecord> = entries.into_iter().flatten().collect();
    let snapshots = &c.topics.snapshots;
    let ps: BTreeSet<u32> = out
        .iter()
        .filter(|r| &r.topic == snapshots)
        .filter_map(|r| r.partition.map(|p| p as u32))
        .collect();
    let mut superseded = 0;
    if !ps.is_empty() {
        let seen = seen_versions(c, store, &ps.into_iter().collect::<Vec<_>>(), stop)?;
        let json = c.snapshot_format == super::SnapshotFormat::Json;
        out.retain(|r| {
            let (true, Some(p), Some(k)) = (&r.topic == snapshots, r.partition, &r.key) else {
                return true;
            };
            let Some(mine) = crate::snapshot::published(&r.value.contiguous(), json) else {
                return true;
            };
            let newer = seen
                .get(&(p as u32))
                .and_then(|s| s.versions.get(String::from_utf8_lossy(k).as_ref()))
                .is_some_and(|s| s.version >= mine.version);
            superseded += usize::from(newer);
            !newer
        });
    }
    if !out.is_empty() {
        retry(stop, "publish", || {
            producer
                .send_all_blocking(&out)
                .map_err(PipelineError::from)
        })?;
    }
    let mut del = WriteBatch::default();
    for k in &ks {
        del.delete_cf(store.cf(CF_OUTBOX), k);
    }
    store.write(del)?;
    Ok((out.len(), superseded))
}

struct PartState {
    live: bool,
    target: i64,
}

/// Records of one batch for one worker of the materializing stage.
#[derive(Default)]
struct Share {
    /// Of partitions being restored (no snapshots published).
    restoring: Vec<LogRecord>,
    /// Of live partitions.
    live: Vec<LogRecord>,
}

impl Share {
    fn is_empty(&self) -> bool {
        self.restoring.is_empty() && self.live.is_empty()
    }

    fn len(&self) -> usize {
        self.restoring.len() + self.live.len()
    }
}

/// One worker of the materializing stage: its partitions' materializers,
/// and what it sent that the broker has not acknowledged yet.
struct Worker {
    live: Materializer,
    restore: Materializer,
    /// Committed batches whose records are sent but not all acknowledged,
    /// oldest first. Processing goes on meanwhile (at most `MAX_IN_FLIGHT`).
    in_flight: VecDeque<InFlight>,
    /// Outbox entries of acknowledged batches, deleted with the next commit.
    acked: Vec<[u8; 8]>,
}

struct InFlight {
    keys: Vec<[u8; 8]>,
    out: Vec<OutRecord>,
    acks: Acks,
}

/// Batches of one worker sent and not yet acknowledged before it waits.
const MAX_IN_FLIGHT: usize = 4;

impl Worker {
    fn new(live: Materializer, restore: Materializer) -> Worker {
        Worker {
            live,
            restore,
            in_flight: VecDeque::new(),
            acked: Vec::new(),
        }
    }

    fn forget(&mut self, p: u32) {
        self.live.forget(p);
        self.restore.forget(p);
    }

    /// Writes the state batch with the outgoing records as outbox entries
    /// (and the deletion of entries acknowledged since the last commit),
    /// then sends the records without waiting for their acks.
    fn commit(
        &mut self,
        store: &Store,
        producer: &KafkaProducer,
        mut batch: WriteBatch,
        out: Vec<OutRecord>,
        stop: &AtomicBool,
    ) -> Result<(), PipelineError> {
        for k in self.acked.drain(..) {
            batch.delete_cf(store.cf(CF_OUTBOX), k);
        }
        let keys = put_outbox(store, &mut batch, &out, &self.live.topics.snapshots);
        store.write(batch)?;
        if out.is_empty() {
            return Ok(());
        }
        let acks = retry(stop, "publish", || {
            producer.send_all_nowait(&out).map_err(PipelineError::from)
        })?;
        self.in_flight.push_back(InFlight { keys, out, acks });
        self.settle(producer, stop, MAX_IN_FLIGHT)
    }

    /// Retires acknowledged batches, waiting for the oldest while more than
    /// `keep` are in flight. If a delivery failed, waits for every batch in
    /// flight and sends them all again in order (retrying until the broker
    /// acknowledges), so the last record per key is always the newest.
    fn settle(
        &mut self,
        producer: &KafkaProducer,
        stop: &AtomicBool,
        keep: usize,
    ) -> Result<(), PipelineError> {
        loop {
            let in_flight = self.in_flight.len();
            let Some(front) = self.in_flight.front_mut() else {
                break;
            };
            let done = front.acks.poll_done();
            if !done && in_flight <= keep {
                return Ok(());
            }
            match front.acks.wait() {
                Ok(()) => {
                    let f = self.in_flight.pop_front().expect("front");
                    self.acked.extend(f.keys);
                }
                Err(e @ LogError::KafkaFatal(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "a snapshot delivery failed; sending the batches in flight again, in order");
                    metrics::counter!("contextd_kafka_errors_total", "stage" => "publish")
                        .increment(1);
                    for f in self.in_flight.iter_mut() {
                        let _ = f.acks.wait();
                    }
                    while let Some(f) = self.in_flight.pop_front() {
                        retry(stop, "publish", || {
                            producer
                                .send_all_blocking(&f.out)
                                .map_err(PipelineError::from)
                        })?;
                        self.acked.extend(f.keys);
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits until everything sent is acknowledged and deletes its outbox entries.
    fn flush(
        &mut self,
        store: &Store,
        producer: &KafkaProducer,
        stop: &AtomicBool,
    ) -> Result<(), PipelineError> {
        self.settle(producer, stop, 0)?;
        if !self.acked.is_empty() {
            self.commit(store, producer, WriteBatch::default(), Vec::new(), stop)?;
        }
        Ok(())
    }

    /// Applies and commits a share of a batch (restoring partitions first).
    fn materialize(
        &mut self,
        store: &Store,
        producer: &KafkaProducer,
        share: &Share,
        stop: &AtomicBool,
    ) -> Result<(), PipelineError> {
        let t0 = Instant::now();
        if !share.restoring.is_empty() {
            let m = self.restore.process(store, &share.restoring)?;
            self.commit(store, producer, m.batch, m.out, stop)
                .inspect_err(|_| self.restore.forget_all())?;
        }
        if !share.live.is_empty() {
            let m = self.live.process(store, &share.live)?;
            self.commit(store, producer, m.batch, m.out, stop)
                .inspect_err(|_| self.live.forget_all())?;
            observe_latency(&m.log_times_ns);
            metrics::histogram!("contextd_batch_seconds", "stage" => "materialize")
                .record(t0.elapsed().as_secs_f64());
            metrics::histogram!("contextd_batch_records", "stage" => "materialize")
                .record(share.live.len() as f64);
        } else if self.release_due() {
            self.release(store, producer, false, stop)?;
        }
        Ok(())
    }

    /// Whether a held snapshot is due (processing records releases them too).
    fn release_due(&self) -> bool {
        self.live
            .next_due()
            .is_some_and(|due| due <= Instant::now())
    }

    /// Publishes the held snapshots that are due (every held one if `all`).
    fn release(
        &mut self,
        store: &Store,
        producer: &KafkaProducer,
        all: bool,
        stop: &AtomicBool,
    ) -> Result<(), PipelineError> {
        let m = self.live.release(store, all)?;
        self.commit(store, producer, m.batch, m.out, stop)
            .inspect_err(|_| self.live.forget_all())
    }
}

/// Appends to `share` the shares queued behind it, in order, while the
/// whole stays within `limit` records, and returns the first command taken
/// and not merged (a barrier, or a share that would pass the limit).
///
/// A worker behind the loop finds shares waiting: applied as one batch,
/// they make one snapshot per user for all of them and one commit, as the
/// embedded stage's batch takes the whole backlog up to its budget. A
/// worker that keeps up finds none and applies each share as it comes.
fn merge_queued(share: &mut Share, rx: &mpsc::Receiver<Cmd>, limit: usize) -> Option<Cmd> {
    while share.len() < limit {
        match rx.try_recv() {
            Ok(Cmd::Work(more)) if share.len() + more.len() <= limit => {
                share.restoring.extend(more.restoring);
                share.live.extend(more.live);
            }
            Ok(cmd) => return Some(cmd),
            Err(_) => return None,
        }
    }
    None
}

/// What the stage's loop hands a worker thread, in order.
enum Cmd {
    /// A share of a polled batch.
    Work(Share),
    /// Answered once everything handed before it is done.
    Barrier(mpsc::SyncSender<()>),
}

/// Shares a worker may have queued before the loop waits for it.
const QUEUED_SHARES: usize = 4;

/// A worker's longest wait for work before it checks for held snapshots due.
const WORKER_IDLE: Duration = Duration::from_millis(50);

/// The materializing workers, each on a thread of its own with a queue.
/// The loop hands each worker its share of a polled batch and polls on
/// without waiting for it: a broker that answers with long runs of one
/// partition (tansu sends thousands of records of one partition before the
/// next) still keeps every worker busy. The loop waits for the workers
/// (`drain`) only where partitions move or go live, and before it stops.
struct Pool {
    workers: Vec<Mutex<Worker>>,
    queues: Mutex<Vec<mpsc::SyncSender<Cmd>>>,
    /// The first error of a worker; the stage stops with it.
    failed: Mutex<Option<PipelineError>>,
    /// Set with `failed` and never cleared: after a failure no worker
    /// commits anything more (its records would be skipped on restart).
    broken: AtomicBool,
    /// Per partition, the offset after the last record the workers committed.
    done: Mutex<BTreeMap<i32, i64>>,
    /// The most records a worker applies as one batch when shares queue up.
    merge_records: usize,
}

impl Pool {
    /// Starts a thread per worker.
    fn start(
        workers: Vec<Worker>,
        merge_records: usize,
        store: &Store,
        producer: &KafkaProducer,
        stop: &Arc<AtomicBool>,
    ) -> Result<(Arc<Pool>, Vec<std::thread::JoinHandle<()>>), PipelineError> {
        let mut queues = Vec::with_capacity(workers.len());
        let mut receivers = Vec::with_capacity(workers.len());
        for _ in &workers {
            let (tx, rx) = mpsc::sync_channel(QUEUED_SHARES);
            queues.push(tx);
            receivers.push(rx);
        }
        let pool = Arc::new(Pool {
            workers: workers.into_iter().map(Mutex::new).collect(),
            queues: Mutex::new(queues),
            failed: Mutex::new(None),
            broken: AtomicBool::new(false),
            done: Mutex::new(BTreeMap::new()),
            merge_records,
        });
        let mut handles = Vec::with_capacity(receivers.len());
        for (i, rx) in receivers.into_iter().enumerate() {
            let (p, store, producer, stop) =
                (pool.clone(), store.clone(), producer.clone(), stop.clone());
            match std::thread::Builder::new()
                .name(format!("materialize-{i}"))
                .spawn(move || p.work(i, rx, &store, &producer, &stop))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    pool.close(handles);
                    return Err(PipelineError::Store(
                        crate::state::StoreError::Incompatible(format!(
                            "cannot start materializing worker {i}: {e}"
                        )),
                    ));
                }
            }
        }
        Ok((pool, handles))
    }

    /// A worker, once the loop has `drain`ed (else it waits for its share).
    fn worker(&self, i: usize) -> MutexGuard<'_, Worker> {
        self.workers[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker thread: applies its shares in order; when idle, publishes
    /// the held snapshots that are due.
    fn work(
        &self,
        i: usize,
        rx: mpsc::Receiver<Cmd>,
        store: &Store,
        producer: &KafkaProducer,
        stop: &AtomicBool,
    ) {
        // A command taken from the queue while merging, not merged.
        let mut next: Option<Cmd> = None;
        loop {
            let got = match next.take() {
                Some(cmd) => Ok(cmd),
                None => {
                    let wait = self.worker(i).live.next_due().map_or(WORKER_IDLE, |due| {
                        due.saturating_duration_since(Instant::now())
                            .min(WORKER_IDLE)
                    });
                    rx.recv_timeout(wait)
                }
            };
            match got {
                Ok(Cmd::Work(mut share)) => {
                    if self.has_failed() {
                        continue;
                    }
                    next = merge_queued(&mut share, &rx, self.merge_records);
                    let result = self.worker(i).materialize(store, producer, &share, stop);
                    match result {
                        Ok(()) => {
                            let mut done = self.done.lock().expect("lock");
                            for r in share.restoring.iter().chain(&share.live) {
                                let e = done.entry(r.partition).or_insert(0);
                                *e = (*e).max(r.offset + 1);
                            }
                        }
                        Err(e) => self.fail(e),
                    }
                }
                Ok(Cmd::Barrier(ack)) => {
                    let _ = ack.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.has_failed() {
                        continue;
                    }
                    let mut w = self.worker(i);
                    if w.release_due() {
                        if let Err(e) = w.release(store, producer, false, stop) {
                            drop(w);
                            self.fail(e);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn fail(&self, e: PipelineError) {
        tracing::error!(error = %e, "a materializing worker failed");
        self.failed.lock().expect("lock").get_or_insert(e);
        self.broken.store(true, Ordering::Release);
    }

    fn has_failed(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The first error of a worker, if one failed (once).
    fn check(&self) -> Result<(), PipelineError> {
        match self.failed.lock().expect("lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Hands worker `i` a share (waits while its queue is full).
    fn hand(&self, i: usize, share: Share) -> Result<(), PipelineError> {
        let q = self.queues.lock().expect("lock").get(i).cloned();
        match q.map(|q| q.send(Cmd::Work(share))) {
            Some(Ok(())) => Ok(()),
            _ => Err(worker_gone()),
        }
    }

    /// Waits until every worker has done everything handed to it (then
    /// `worker` does not wait), and returns a worker's error if one failed
    /// (the stage's loop; it stops with it).
    fn sync(&self) -> Result<(), PipelineError> {
        self.drain()?;
        self.check()
    }

    /// Waits until every worker has done everything handed to it (a failed
    /// worker skips its shares; its error stays for `check`).
    fn drain(&self) -> Result<(), PipelineError> {
        let queues = self.queues.lock().expect("lock").clone();
        let mut acks = Vec::with_capacity(queues.len());
        for q in queues {
            let (tx, rx) = mpsc::sync_channel(1);
            q.send(Cmd::Barrier(tx)).map_err(|_| worker_gone())?;
            acks.push(rx);
        }
        for rx in acks {
            rx.recv().map_err(|_| worker_gone())?;
        }
        Ok(())
    }

    /// The offsets after the records committed since the last call.
    fn take_done(&self) -> BTreeMap<i32, i64> {
        std::mem::take(&mut *self.done.lock().expect("lock"))
    }

    /// Ends the worker threads (after what they were handed).
    fn close(&self, handles: Vec<std::thread::JoinHandle<()>>) {
        self.queues.lock().expect("lock").clear();
        for h in handles {
            let _ = h.join();
        }
    }
}

fn worker_gone() -> PipelineError {
    PipelineError::Store(crate::state::StoreError::Incompatible(
        "a materializing worker stopped (panicked)".into(),
    ))
}

/// The materializing stage (group `{group_id}-materializer`): one consumer,
/// its batches applied by `pipeline.materializer_threads` workers over
/// disjoint partitions, each on its own thread (`Pool`).
#[allow(clippy::too_many_arguments)]
pub fn run_materializer(
    c: Config,
    store: Store,
    producer: KafkaProducer,
    own: Arc<Ownership>,
    ready: Arc<Readiness>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let (resent, superseded) = drain_outbox(&c, &store, &producer, &stop)?;
    if resent + superseded > 0 {
        tracing::info!(
            records = resent,
            superseded,
            "re-sent outbox from the previous run"
        );
    }
    let topic = c.topics.records.clone();
    let ctx = MatContext {
        store: store.clone(),
        topic: topic.clone(),
        events: Mutex::new(Vec::new()),
        producer: producer.clone(),
        pool: OnceLock::new(),
    };
    let consumer: BaseConsumer<MatContext> =
        consumer_config(&c, &format!("{}-materializer", c.group_id))
            .create_with_context(ctx)
            .map_err(kerr)?;
    // Work is split by partition over `threads` workers, each with its own
    // materializers (state is partitioned: workers never touch the same
    // user); one consumer keeps the group membership simple.
    let threads = crate::app::materializer_threads(&c) as usize;
    let workers: Vec<Worker> = (0..threads)
        .map(|_| {
            let share = |publish| {
                let o = crate::app::materializer_share(&c, publish, threads);
                Materializer::new(c.topics.clone(), o)
            };
            Worker::new(share(true), share(false))
        })
        .collect();
    let (pool, handles) = Pool::start(
        workers,
        super::MATERIALIZE_BUDGET * c.pipeline.batch_records,
        &store,
        &producer,
        &stop,
    )?;
    let _ = consumer.context().pool.set(pool.clone());
    let result = materialize_loop(&c, &store, &producer, &consumer, &pool, &own, &ready, &stop);
    pool.close(handles);
    result?;
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

/// The materializing stage's loop: polls, hands each worker its share,
/// follows rebalances and brings restored partitions live.
#[allow(clippy::too_many_arguments)]
fn materialize_loop(
    c: &Config,
    store: &Store,
    producer: &KafkaProducer,
    consumer: &BaseConsumer<MatContext>,
    pool: &Pool,
    own: &Ownership,
    ready: &Readiness,
    stop: &AtomicBool,
) -> Result<(), PipelineError> {
    let topic = c.topics.records.as_str();
    consumer.subscribe(&[topic]).map_err(kerr)?;
    let threads = pool.workers.len();
    let worker = |p: i32| p as usize % threads;
    let mut parts: BTreeMap<i32, PartState> = BTreeMap::new();
    let started = Instant::now();
    let mut had_assignment = false;
    let mut last_lag = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if own.rejoin_materializer.swap(false, Ordering::AcqRel) {
            consumer.unsubscribe();
            consumer.subscribe(&[topic]).map_err(kerr)?;
        }
        let batch = poll_batch(
            consumer,
            c.pipeline.batch_records,
            Duration::from_millis(50),
        )?;
        pool.check()?;
        let events: Vec<Rebalanced> =
            std::mem::take(&mut *consumer.context().events.lock().expect("lock"));
        if !events.is_empty() {
            // What was sent for partitions that may move is acknowledged
            // before another instance reads their snapshots.
            pool.sync()?;
            for i in 0..threads {
                pool.worker(i).flush(store, producer, stop)?;
            }
        }
        let mut changed = false;
        for ev in events {
            changed = true;
            match ev {
                Rebalanced::Assigned(ps) => {
                    had_assignment = true;
                    for p in ps {
                        let high = retry(stop, "watermarks", || {
                            consumer
                                .fetch_watermarks(topic, p, Duration::from_secs(5))
                                .map_err(kerr)
                        })?
                        .1;
                        pool.worker(worker(p)).forget(p as u32);
                        parts.insert(
                            p,
                            PartState {
                                live: false,
                                target: high,
                            },
                        );
                    }
                }
                Rebalanced::Revoked(ps) => {
                    for p in ps {
                        parts.remove(&p);
                        pool.worker(worker(p)).forget(p as u32);
                        own.live.write().expect("lock").remove(&(p as u32));
                    }
                }
            }
        }
        let mut shares: Vec<Share> = (0..threads).map(|_| Share::default()).collect();
        for r in batch {
            let Some(state) = parts.get(&r.partition) else {
                continue;
            };
            let share = &mut shares[worker(r.partition)];
            if state.live {
                share.live.push(r);
            } else {
                share.restoring.push(r);
            }
        }
        for (i, share) in shares.into_iter().enumerate() {
            if !share.is_empty() {
                pool.hand(i, share)?;
            }
        }
        // One stored offset per partition: after the last record committed.
        store_next_offsets(
            consumer,
            pool.take_done()
                .into_iter()
                .filter(|(p, _)| parts.contains_key(p))
                .map(|(p, o)| (topic, p, o)),
        );
        // Partitions whose restore reached the end seen at assignment go live.
        let restored = |parts: &BTreeMap<i32, PartState>| -> Vec<i32> {
            parts
                .iter()
                .filter(|(p, s)| {
                    !s.live
                        && store
                            .get_i64(CF_PART, &keys::part_offset(**p as u32))
                            .ok()
                            .flatten()
                            .unwrap_or(0)
                            >= s.target
                })
                .map(|(p, _)| *p)
                .collect()
        };
        let mut due = restored(&parts);
        if !due.is_empty() {
            // Every restoring record handed out is applied first (and more
            // partitions may have finished meanwhile).
            pool.sync()?;
            due = restored(&parts);
        }
        let mut seen = if due.is_empty() {
            HashMap::new()
        } else {
            let ps: Vec<u32> = due.iter().map(|p| *p as u32).collect();
            seen_versions(c, store, &ps, stop)?
        };
        for p in due {
            let s = seen.remove(&(p as u32)).unwrap_or_default();
            let n = go_live(
                store,
                producer,
                &mut pool.worker(worker(p)).live,
                p as u32,
                s,
                stop,
                false,
            )?;
            tracing::info!(
                partition = p,
                republished = n,
                "partition restored; serving"
            );
            metrics::counter!("contextd_partitions_restored_total").increment(1);
            parts.get_mut(&p).expect("present").live = true;
            own.live.write().expect("lock").insert(p as u32);
            changed = true;
        }
        if changed {
            announce(c, producer, own, stop)?;
        }
        let all_live = parts.values().all(|s| s.live);
        ready.set_materializer(
            0,
            all_live && (had_assignment || started.elapsed() > Duration::from_secs(30)),
        );
        for (p, s) in &parts {
            metrics::gauge!("contextd_partition_live", "partition" => p.to_string())
                .set(if s.live { 1.0 } else { 0.0 });
        }
        if last_lag.elapsed() >= LAG_EVERY {
            last_lag = Instant::now();
            report_lag(consumer, "materialize");
        }
    }
    pool.sync()?;
    for i in 0..threads {
        let mut w = pool.worker(i);
        // What is held is published before the stage stops.
        w.release(store, producer, true, stop)?;
        w.flush(store, producer, stop)?;
    }
    Ok(())
}

const LAG_EVERY: Duration = Duration::from_secs(5);

/// `contextd_consumer_lag{stage,topic,partition}`: the broker's end offset
/// minus this consumer's position, for every assigned partition.
fn report_lag<C: ConsumerContext>(consumer: &BaseConsumer<C>, stage: &'static str) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for e in positions.elements() {
        let rdkafka::Offset::Offset(pos) = e.offset() else {
            continue;
        };
        if let Ok((_, high)) =
            consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_millis(500))
        {
            metrics::gauge!("contextd_consumer_lag", "stage" => stage, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                .set((high - pos).max(0) as f64);
        }
    }
}

/// Tells every instance which partitions this one serves.
fn announce(
    c: &Config,
    producer: &KafkaProducer,
    own: &Ownership,
    stop: &AtomicBool,
) -> Result<(), PipelineError> {
    let mut parts: Vec<u32> = own.live.read().expect("lock").iter().copied().collect();
    parts.sort_unstable();
    let now = crate::model::time::now_ms();
    let rec = OutRecord {
        topic: MEMBERS_TOPIC.to_string(),
        partition: None,
        key: Some(own.me.clone().into_bytes()),
        value: serde_json::to_vec(
            &json!({"http": own.me, "partitions": parts, "at_ms": now, "group": c.group_id}),
        )
        .expect("json")
        .into(),
        timestamp_ms: now,
    };
    retry(stop, "announce", || {
        producer
            .send_all_blocking(std::slice::from_ref(&rec))
            .map_err(PipelineError::from)
    })
}

/// Where the last go-live of partition `p` stopped reading its snapshots.
fn snapshot_sync_key(p: u32) -> Vec<u8> {
    let mut k = p.to_be_bytes().to_vec();
    k.push(b'S');
    k
}

/// What the snapshots topic holds for a partition going live: the highest
/// version published per user (by any instance) since the last go-live, and
/// the position after the last record read.
#[derive(Default)]
struct SeenVersions {
    /// Per user, the snapshot with the highest version.
    versions: HashMap<String, Published>,
    next: i64,
}

/// Reads the snapshots of every partition in `ps` in one pass (one reader,
/// one wait for the end), from where each partition's last go-live stopped.
/// Partitions that go live together (every partition at a start or a
/// rebalance) pay the reader's start and idle wait once, not once each;
/// the versions of all of them are held until they are settled (a user id
/// and a version per user published since the last go-live).
fn seen_versions(
    c: &Config,
    store: &Store,
    ps: &[u32],
    stop: &AtomicBool,
) -> Result<HashMap<u32, SeenVersions>, PipelineError> {
    let mut seen: HashMap<u32, SeenVersions> = HashMap::new();
    let mut from = Vec::with_capacity(ps.len());
    for &p in ps {
        let at = store.get_i64(CF_PART, &snapshot_sync_key(p))?.unwrap_or(0);
        seen.insert(
            p,
            SeenVersions {
                versions: HashMap::new(),
                next: at,
            },
        );
        from.push((c.topics.snapshots.clone(), p as i32, at));
    }
    let json_format = c.snapshot_format == super::SnapshotFormat::Json;
    retry(stop, "snapshot sync", || {
        read_until_idle(c, &from, Duration::from_millis(300), |r| {
            let Some(s) = seen.get_mut(&(r.partition as u32)) else {
                return;
            };
            s.next = s.next.max(r.offset + 1);
            let (Some(k), v) = (r.key, r.value) else {
                return;
            };
            let Some(seen) = crate::snapshot::published(&v, json_format) else {
                return;
            };
            let uid = String::from_utf8_lossy(&k).into_owned();
            if s.versions
                .get(&uid)
                .is_none_or(|e| seen.version >= e.version)
            {
                s.versions.insert(uid, seen);
            }
        })
        .map_err(PipelineError::from)
    })?;
    Ok(seen)
}

/// After a restore: with the highest snapshot version published for each
/// user of partition `p` (by any instance: `seen_versions`), publish only
/// where the visible context differs from the last published one.
/// `from_cache`: `mat` itself restored `p`, so the users it holds are the
/// store's and are settled from its cache (else from the store's pages).
fn go_live(
    store: &Store,
    producer: &KafkaProducer,
    mat: &mut Materializer,
    p: u32,
    seen: SeenVersions,
    stop: &AtomicBool,
    from_cache: bool,
) -> Result<usize, PipelineError> {
    let SeenVersions {
        versions: published_versions,
        next,
    } = seen;
    // The highest version on the topic wins, with the hash of what it shows
    // (read from it): a snapshot is published again only where the context
    // differs from it, whoever published it (a partition that moved, a
    // rebuild into a new data dir), and its `updated_at` never goes back.
    let published = |uid: &str| published_versions.get(uid).cloned();
    let snapshots = mat.topics.snapshots.clone();
    let mut commit = |batch, out: Vec<OutRecord>| {
        commit_with_outbox(store, producer, batch, &out, &snapshots, stop)
    };
    if !from_cache {
        mat.forget(p);
    }
    let count = settle_partition(store, mat, p, &published, &mut commit)?;
    let mut wb = WriteBatch::default();
    store.put_i64(&mut wb, CF_PART, &snapshot_sync_key(p), next);
    store.write(wb)?;
    Ok(count)
}

/// `contextd rebuild --brokers`: drops this instance's materialized state and
/// replays every partition of the records topic from the beginning (the same
/// restore path as a partition assignment), then settles snapshot versions
/// against the snapshots topic. Returns (records replayed, snapshots published).
pub fn rebuild(c: &Config, progress: &(dyn Fn(u64) + Sync)) -> Result<(u64, usize), PipelineError> {
    let started = Instant::now();
    // No write-ahead log, every flush atomic across the column families,
    // as the embedded rebuild (BENCHMARKS.md item 83): an interrupted one
    // leaves them at one point, which the next start restores from and
    // settles against `context.snapshots` (so no mark is needed here).
    let bulk = crate::state::StoreOptions {
        bulk: true,
        ..c.store_options()
    };
    let mut store = Store::open(&c.data_dir, &bulk)?;
    store.refuse_other(c.partitions, true)?;
    crate::log::kafka::ensure_topics(c)?;
    store.check_partitions(c.partitions)?;
    store.check_mode(true)?;
    let producer = KafkaProducer::new(c)?;
    let stop = AtomicBool::new(false);
    // What the last run committed and had not yet sent goes out first (the
    // outbox is dropped with the state); then everything below this data
    // dir's position has been sent, dead letters included, and the replay
    // sends none of those again. (Past it, and in a new data dir, they are
    // sent again: at least once.)
    drain_outbox(c, &store, &producer, &stop)?;
    let processed = store.materialized_ends(c.partitions)?;
    store.drop_column_families(&keys::REBUILT_CFS)?;
    store
        .db()
        .delete_cf(store.cf(CF_META), keys::META_SETTINGS)?;
    // The follower re-reads identities and settings in full at the next start.
    let mut wb = WriteBatch::default();
    store.delete_prefix(&mut wb, CF_META, b"pos/follower/");
    store.write(wb)?;
    tracing::debug!(elapsed = ?started.elapsed(), "rebuild: outbox sent, state dropped");
    // `pipeline.materializer_threads` threads (one per core by default, at
    // most one per partition), each over a fixed share of the partitions
    // (partition p to thread p % threads; state is partitioned, so threads
    // never touch the same users) with a share of the user cache, as the
    // embedded rebuild's threads. A thread reads its partitions' records in
    // one consumer (each partition's records in order, mixed in a batch as
    // the live workers mix them; the end of the topic known by one pause
    // after its high watermarks, tansu's lagging its last batch), then the
    // versions published for their users, then settles each partition from
    // the users its replay left in its cache. Each thread's consumer
    // buffers what librdkafka prefetches (`queued.max.messages.kbytes`,
    // settable under `[kafka.consumer]`), so fewer threads also bound that
    // memory.
    let threads = crate::app::materializer_threads(c) as usize;
    let read = AtomicU64::new(0);
    // Set by a thread that failed: the others stop applying and settling
    // (their readers still drain what they asked for), so the error comes
    // out without the rest of a rebuild's work first.
    let failed = AtomicBool::new(false);
    let rebuild_share = |share: usize| -> Result<usize, PipelineError> {
        let mut mat = Materializer::new(
            c.topics.clone(),
            crate::app::materializer_share(c, false, threads),
        );
        for (p, done) in processed.iter().enumerate() {
            mat.quiet_dead_letters_below(p as u32, *done);
        }
        let commit = |m: crate::pipeline::materializer::Materialized| {
            commit_with_outbox(
                &store,
                &producer,
                m.batch,
                &m.out,
                &c.topics.snapshots,
                &stop,
            )
        };
        let ps: Vec<u32> = (0..c.partitions)
            .filter(|p| *p as usize % threads == share)
            .collect();
        let parts: Vec<(String, i32, i64)> = ps
            .iter()
            .map(|p| (c.topics.records.clone(), *p as i32, 0))
            .collect();
        let mut chunk = Vec::new();
        let mut result = Ok(());
        read_until_idle(c, &parts, Duration::from_millis(500), |r| {
            if result.is_err() || failed.load(Ordering::Relaxed) {
                // Failed (here or in another thread): the rest is read to
                // the end, not kept.
                return;
            }
            chunk.push(r);
            if chunk.len() >= c.pipeline.batch_records {
                let n = chunk.len() as u64;
                result = mat
                    .process(&store, &std::mem::take(&mut chunk))
                    .and_then(commit);
                progress(read.fetch_add(n, Ordering::Relaxed) + n);
            }
        })?;
        result?;
        if failed.load(Ordering::Relaxed) {
            // The failing thread reports the error.
            return Ok(0);
        }
        if !chunk.is_empty() {
            commit(mat.process(&store, &chunk)?)?;
        }
        tracing::debug!(elapsed = ?started.elapsed(), ?ps, "rebuild: records replayed");
        let mut seen = seen_versions(c, &store, &ps, &stop)?;
        tracing::debug!(elapsed = ?started.elapsed(), ?ps, "rebuild: published versions read");
        let mut published = 0;
        for p in ps {
            if failed.load(Ordering::Relaxed) {
                return Ok(published);
            }
            let s = seen.remove(&p).unwrap_or_default();
            published += go_live(&store, &producer, &mut mat, p, s, &stop, true)?;
            // Not touched again: its users' memory goes to the next one's.
            mat.forget(p);
        }
        tracing::debug!(elapsed = ?started.elapsed(), share, "rebuild: partitions settled");
        Ok(published)
    };
    let published = crate::replay::on_threads(threads, |share| {
        let r = rebuild_share(share);
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r.map(|n| n as u64)
    })? as usize;
    let mut replayed = 0u64;
    for p in 0..c.partitions {
        replayed += store.get_i64(CF_PART, &keys::part_offset(p))?.unwrap_or(0) as u64;
    }
    progress(replayed);
    producer.flush();
    store.flush()?;
    tracing::debug!(elapsed = ?started.elapsed(), "rebuild: store flushed");
    Ok((replayed, published))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: Option<i32>, key: Option<&[u8]>, value: &[u8]) -> OutRecord {
        OutRecord {
            topic: "context.snapshots".into(),
            partition,
            key: key.map(<[u8]>::to_vec),
            value: value.into(),
            timestamp_ms: 1_764_000_000_123,
        }
    }

    fn same(a: &OutRecord, b: &OutRecord) -> bool {
        (&a.topic, a.partition, &a.key, &a.value, a.timestamp_ms)
            == (&b.topic, b.partition, &b.key, &b.value, b.timestamp_ms)
    }

    #[test]
    fn a_worker_behind_applies_the_queued_shares_as_one_batch_within_the_limit() {
        let r = |partition: i32, offset: i64| LogRecord {
            topic: "context.records".into(),
            partition,
            offset,
            timestamp_ms: 0,
            key: None,
            value: Default::default(),
        };
        let share = |restoring: Vec<LogRecord>, live: Vec<LogRecord>| Share { restoring, live };
        let offsets = |v: &[LogRecord]| -> Vec<(i32, i64)> {
            v.iter().map(|r| (r.partition, r.offset)).collect()
        };
        let (tx, rx) = mpsc::sync_channel(8);
        let send = |c: Cmd| tx.send(c).expect("queued");
        send(Cmd::Work(share(vec![r(2, 5)], vec![r(1, 8), r(1, 9)])));
        send(Cmd::Work(share(vec![], vec![r(1, 10), r(3, 0)])));
        // Would make 7 with the 5 above: over the limit of 6, so it ends
        // the merge and comes back whole.
        send(Cmd::Work(share(vec![], vec![r(1, 11), r(1, 12)])));
        let (ack, _acked) = mpsc::sync_channel(1);
        send(Cmd::Barrier(ack));
        send(Cmd::Work(share(vec![], vec![r(1, 13)])));

        let Ok(Cmd::Work(mut first)) = rx.try_recv() else {
            panic!("a share first")
        };
        let Some(Cmd::Work(next)) = merge_queued(&mut first, &rx, 6) else {
            panic!("the share over the limit is handed back")
        };
        assert_eq!(offsets(&first.restoring), [(2, 5)]);
        assert_eq!(offsets(&first.live), [(1, 8), (1, 9), (1, 10), (3, 0)]);
        assert_eq!(offsets(&next.live), [(1, 11), (1, 12)]);

        // A barrier is never merged past: what follows it waits for it.
        let mut second = next;
        assert!(matches!(
            merge_queued(&mut second, &rx, 6),
            Some(Cmd::Barrier(_))
        ));
        assert_eq!(offsets(&second.live), [(1, 11), (1, 12)]);
        let mut third = share(vec![], vec![]);
        assert!(merge_queued(&mut third, &rx, 6).is_none());
        assert_eq!(offsets(&third.live), [(1, 13)]);
        // Nothing queued: the share is applied as it came.
        let mut alone = share(vec![], vec![r(4, 1)]);
        assert!(merge_queued(&mut alone, &rx, 6).is_none());
        assert_eq!(alone.len(), 1);
    }

    #[test]
    fn a_polled_batch_is_merged_by_log_time_keeping_each_partitions_order() {
        let r = |topic: &str, partition: i32, offset: i64, ts: i64| LogRecord {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: ts,
            key: None,
            value: Default::default(),
        };
        // As a fetch hands them over: partition by partition; the second
        // record of `b` has an earlier timestamp than the first (producers
        // may set any): it still comes after it.
        let batch = vec![
            r("sunshine.events", 0, 7, 105),
            r("sunshine.events", 0, 8, 120),
            r("zendesk.events", 0, 3, 101),
            r("zendesk.events", 0, 4, 110),
            r("b", 1, 0, 130),
            r("b", 1, 1, 90),
        ];
        let got: Vec<(String, i64)> = merge_by_log_time(batch)
            .into_iter()
            .map(|r| (r.topic, r.offset))
            .collect();
        let want = [
            ("zendesk.events", 3),
            ("sunshine.events", 7),
            ("zendesk.events", 4),
            ("sunshine.events", 8),
            ("b", 0),
            ("b", 1),
        ];
        assert_eq!(got, want.map(|(t, o)| (t.to_string(), o)).to_vec());
    }

    #[test]
    fn members_are_the_instances_of_this_group_only() {
        let at = |group: &str| {
            serde_json::to_vec(
                &json!({"http": "h:1", "partitions": [0, 2], "at_ms": 5, "group": group}),
            )
            .unwrap()
        };
        assert_eq!(
            member("g", &at("g")),
            Some(("h:1".to_string(), vec![0, 2], 5))
        );
        assert_eq!(member("g", &at("other")), None);
        assert_eq!(
            member("g", br#"{"http": "h:1", "partitions": [0], "at_ms": 5}"#),
            None
        );
        assert_eq!(member("g", b"not json"), None);
    }

    fn whole(e: Option<Outboxed>) -> Option<OutRecord> {
        match e {
            Some(Outboxed::Whole(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn outbox_entries_round_trip() {
        // Records of other topics (or without a partition or key) are
        // written whole.
        for r in [
            rec(Some(3), Some(b"user-1"), b"\x0a\x06user-1\x10\x07"),
            rec(None, None, b""),
            rec(Some(0), Some(b""), &[0u8; 4096]),
            OutRecord {
                value: crate::log::Payload::from_parts(
                    b"head".to_vec(),
                    bytes::Bytes::from_static(b"events"),
                ),
                ..rec(Some(4), Some(b"u"), b"")
            },
        ] {
            let got = whole(decode_out(&encode_out(&r, "other"))).expect("decodes");
            assert!(same(&got, &r));
        }
        let split =
            crate::log::Payload::from_parts(b"ab".to_vec(), bytes::Bytes::from_static(b"cd"));
        let got = whole(decode_out(&encode_out(
            &OutRecord {
                value: split,
                ..rec(None, None, b"")
            },
            "other",
        )))
        .expect("decodes");
        assert_eq!(got.value, b"abcd".to_vec(), "written as one value");
        let enc = encode_out(&rec(Some(1), Some(b"k"), b"value"), "other");
        for cut in 1..enc.len() - 5 {
            assert!(
                decode_out(&enc[..cut]).is_none(),
                "truncated at {cut}: no record"
            );
        }
        // A snapshot is written without its value.
        let snap = rec(Some(4), Some(b"u"), &[7u8; 4096]);
        let enc = encode_out(&snap, "context.snapshots");
        assert!(enc.len() < 64, "{} bytes", enc.len());
        match decode_out(&enc) {
            Some(Outboxed::Snapshot(r)) => assert!(same(&r, &rec(Some(4), Some(b"u"), b""))),
            other => panic!("{other:?}"),
        }
        for cut in 1..enc.len() {
            assert!(decode_out(&enc[..cut]).is_none(), "truncated at {cut}");
        }
        // Without a partition or key it is not a user's snapshot: whole.
        let keyless = rec(None, None, b"v");
        let got = whole(decode_out(&encode_out(&keyless, "context.snapshots")));
        assert!(same(&got.expect("whole"), &keyless));
    }

    /// What a snapshot's outbox entry is sent as after a crash, read back
    /// from the state committed with it, is byte for byte what was
    /// published, in both formats; while a snapshot is held back it is the
    /// last one published, not the state's newer content.
    #[test]
    fn an_outboxed_snapshot_is_read_back_as_it_was_published() {
        use crate::pipeline::materializer::fixtures::{entry, shop_event, shop_orders_shown};
        use crate::pipeline::materializer::Materializer;
        use crate::state::StoreOptions;
        let settings = shop_orders_shown();
        let event = |i: i64| shop_event(i, "order", i * 10, &json!({ "n": i }));
        for (format, hold) in [
            (super::super::SnapshotFormat::Protobuf, false),
            (super::super::SnapshotFormat::Json, false),
            (super::super::SnapshotFormat::Protobuf, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut c = Config {
                snapshot_format: format,
                ..Default::default()
            };
            c.snapshot.max_events = 2;
            if hold {
                c.snapshot.min_interval_ms = 3_600_000;
            }
            let mut mat =
                Materializer::new(c.topics.clone(), crate::app::materializer_options(&c, true));
            let m = mat.process(&store, &[entry(2, 0, &settings)]).unwrap();
            store.write(m.batch).unwrap();
            let mut last = None;
            let mut published = 0;
            for i in 1..5 {
                let m = mat.process(&store, &[entry(2, i, &event(i))]).unwrap();
                store.write(m.batch).unwrap();
                for o in m.out.iter().filter(|o| o.topic == c.topics.snapshots) {
                    last = Some(o.value.to_vec());
                    published += 1;
                }
                let got = last_published(&c, &store, 2, "u")
                    .unwrap()
                    .map(|v| v.to_vec());
                assert_eq!(got, last, "{format:?}, held: {hold}, after event {i}");
            }
            assert_eq!(published, if hold { 1 } else { 4 });
        }
    }

    #[test]
    fn outbox_entries_of_earlier_versions_still_decode() {
        let r = rec(Some(2), Some(b"u"), b"\x01\x02");
        let old = serde_json::to_vec(
            &json!({"t": r.topic, "p": r.partition, "k": r.key, "v": r.value.to_vec(), "ts": r.timestamp_ms}),
        )
        .unwrap();
        assert!(same(&whole(decode_out(&old)).expect("decodes"), &r));
    }
}
