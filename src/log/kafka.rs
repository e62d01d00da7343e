//! Kafka mode's transport (rdkafka): client settings, topic set-up, a
//! producer that appends `OutRecord`s and waits for the broker's acks, and
//! reading whole partitions (identities, settings, members, snapshots).

use super::{LogError, LogRecord, OutRecord};
use crate::config::Config;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

fn kerr(e: KafkaError) -> LogError {
    LogError::Kafka(e.to_string())
}

/// Settings every client gets, then the user's `kafka.consumer.*` / `kafka.producer.*`.
pub fn consumer_config(c: &Config, group: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set(
        "bootstrap.servers",
        c.brokers.as_deref().unwrap_or_default(),
    )
    .set("group.id", group)
    .set("enable.auto.commit", "true")
    .set("enable.auto.offset.store", "false")
    .set("auto.offset.reset", "earliest")
    .set("enable.partition.eof", "false")
    .set("fetch.wait.max.ms", "50")
    .set("client.id", format!("contextd-{}", std::process::id()));
    for (k, v) in &c.kafka.consumer {
        cc.set(k, v);
    }
    cc
}

pub fn producer_config(c: &Config) -> ClientConfig {
    let mut pc = ClientConfig::new();
    pc.set(
        "bootstrap.servers",
        c.brokers.as_deref().unwrap_or_default(),
    )
    .set("enable.idempotence", "true")
    .set("acks", "all")
    .set("compression.type", "lz4")
    .set("partitioner", "murmur2_random")
    .set("linger.ms", "5")
    .set("message.timeout.ms", "30000")
    .set("client.id", format!("contextd-{}", std::process::id()));
    for (k, v) in &c.kafka.producer {
        pc.set(k, v);
    }
    pc
}

/// A client for the cluster's metadata, and every topic's (with its
/// partitions).
fn cluster_metadata(c: &Config) -> Result<(BaseConsumer, rdkafka::metadata::Metadata), LogError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set(
            "bootstrap.servers",
            c.brokers.as_deref().unwrap_or_default(),
        )
        .create()
        .map_err(kerr)?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(kerr)?;
    Ok((consumer, md))
}

/// Whether the broker has `topic` (with partitions).
pub fn topic_exists(c: &Config, topic: &str) -> Result<bool, LogError> {
    Ok(cluster_metadata(c)?
        .1
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
}

/// Creates missing topics; refuses to start when an internal or output topic
/// has a partition count that breaks co-partitioning with the state.
pub fn ensure_topics(c: &Config) -> Result<(), LogError> {
    let t = &c.topics;
    let n = c.partitions as i32;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set(
            "bootstrap.servers",
            c.brokers.as_deref().unwrap_or_default(),
        )
        .create()
        .map_err(kerr)?;
    let compact = [("cleanup.policy", "compact")];
    type TopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);
    let specs: Vec<TopicSpec> = vec![
        (&t.zendesk_events, n, &[]),
        (&t.sunshine_events, n, &[]),
        (&t.sunshine_profiles, n, &[]),
        (&t.settings, n, &compact),
        (&t.snapshots, n, &compact),
        (&t.dlq, n, &[]),
        (&t.records, n, &[]),
        (&t.identities, n, &compact),
        (MEMBERS_TOPIC, n, &compact),
    ];
    let (consumer, md) = cluster_metadata(c)?;
    let existing: std::collections::HashSet<String> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name().to_string())
        .collect();
    let mismatch = |topic: &str, got: i32| {
        LogError::Kafka(format!(
            "topic {topic} has {got} partitions but contextd runs with --partitions {n}; state is co-partitioned with it: start with --partitions {got} or use other topic names"
        ))
    };
    // Checked before anything is created, so a refusal leaves no topic behind.
    for topic in [&t.records, &t.snapshots, &t.identities] {
        let got = md
            .topics()
            .iter()
            .find(|m| m.name() == topic.as_str() && m.error().is_none())
            .map_or(0, |m| m.partitions().len() as i32);
        if got > 0 && got != n {
            return Err(mismatch(topic, got));
        }
    }
    let new: Vec<NewTopic> = specs
        .iter()
        .filter(|(name, _, _)| !existing.contains(*name))
        .map(|(name, parts, cfg)| {
            let mut nt = NewTopic::new(name, *parts, TopicReplication::Fixed(c.replication_factor));
            for (k, v) in cfg.iter() {
                nt = nt.set(k, v);
            }
            nt
        })
        .collect();
    if !new.is_empty() {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let results =
            futures::executor::block_on(admin.create_topics(&new, &opts)).map_err(kerr)?;
        for r in results {
            if let Err((name, code)) = r {
                if code != RDKafkaErrorCode::TopicAlreadyExists {
                    return Err(LogError::Kafka(format!(
                        "cannot create topic {name}: {code}"
                    )));
                }
            }
        }
    }
    for topic in [&t.records, &t.snapshots, &t.identities] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = partition_count(&consumer, topic)? as i32;
            if got == n {
                break;
            }
            if got > 0 || Instant::now() > deadline {
                return Err(mismatch(topic, got));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Compacted topic where every instance announces its HTTP address and partitions.
pub const MEMBERS_TOPIC: &str = "context.members";

/// A producer that appends and waits for acknowledgement.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer,
    snapshot_topic: String,
    snapshot_content_type: &'static str,
    dlq_topic: String,
    /// The producer's `message.max.bytes`, less room for the record's
    /// framing: dead letters are cut to it (`deadletter::fit`).
    max_dead_letter: usize,
}

impl KafkaProducer {
    pub fn new(c: &Config) -> Result<KafkaProducer, LogError> {
        let max_message = c.kafka.max_message_bytes();
        Ok(KafkaProducer {
            inner: producer_config(c).create().map_err(kerr)?,
            snapshot_topic: c.topics.snapshots.clone(),
            snapshot_content_type: c.snapshot_format.content_type(),
            dlq_topic: c.topics.dlq.clone(),
            max_dead_letter: max_message
                .saturating_sub(crate::config::KAFKA_MESSAGE_ROOM)
                .max(4096),
        })
    }

    fn futures(
        &self,
        recs: &[OutRecord],
    ) -> Result<Vec<rdkafka::producer::DeliveryFuture>, LogError> {
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            // A snapshot's events are shared parts: rdkafka copies the
            // payload from one slice.
            let mut value = r.value.contiguous();
            if r.topic == self.dlq_topic {
                if let Some(cut) = crate::pipeline::deadletter::fit(&value, self.max_dead_letter) {
                    value = std::borrow::Cow::Owned(cut);
                }
            }
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic)
                .payload(&value[..])
                .timestamp(r.timestamp_ms);
            if let Some(k) = &r.key {
                rec = rec.key(&k[..]);
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p);
            }
            if r.topic == self.snapshot_topic {
                rec = rec.headers(OwnedHeaders::new().insert(Header {
                    key: "content-type",
                    value: Some(self.snapshot_content_type),
                }));
            }
            loop {
                match self.inner.send_result(rec) {
                    Ok(f) => {
                        out.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        self.inner.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(kerr(e)),
                }
            }
        }
        Ok(out)
    }

    /// Waits for every delivery, in send order, and returns the first
    /// failure (after all of them: nothing of the batch is still in flight
    /// when it is sent again). One at a time: acks come in about that
    /// order, so a delivery that completes while an earlier one is awaited
    /// wakes nothing, as it would under `join_all`.
    async fn await_all(futs: Vec<rdkafka::producer::DeliveryFuture>) -> Result<(), LogError> {
        let mut first = Ok(());
        for f in futs {
            let r = match f.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(kerr(e)),
                Err(_) => Err(LogError::Kafka(
                    "delivery cancelled (producer closed)".into(),
                )),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Appends without waiting for the acks (`Acks` tells when they came).
    pub fn send_all_nowait(&self, recs: &[OutRecord]) -> Result<Acks, LogError> {
        Ok(Acks {
            pending: self.futures(recs)?,
            failed: None,
            producer: self.inner.clone(),
        })
    }

    /// Appends and waits for every ack (blocking; for pipeline threads).
    pub fn send_all_blocking(&self, recs: &[OutRecord]) -> Result<(), LogError> {
        if recs.is_empty() {
            return Ok(());
        }
        let futs = self.futures(recs)?;
        let r = futures::executor::block_on(Self::await_all(futs));
        if r.is_err() {
            if let Some((code, reason)) = self.inner.client().fatal_error() {
                return Err(LogError::KafkaFatal(format!("{code:?}: {reason}")));
            }
        }
        r
    }

    /// Appends and waits for every ack (async; for HTTP handlers).
    pub async fn send_all(&self, recs: Vec<OutRecord>) -> Result<(), LogError> {
        let futs = self.futures(&recs)?;
        Self::await_all(futs).await
    }

    /// Waits until every record sent is acknowledged or failed, for up to
    /// `FLUSH_WAIT` of wall time. (rdkafka's `flush(timeout)` charges its
    /// poll interval, 100 ms, per delivery event it serves, so with many
    /// produce requests in flight it returns long before its timeout,
    /// records still in flight.)
    pub fn flush(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        while self.inner.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = self.inner.in_flight_count(),
                    "records still unacknowledged after waiting {FLUSH_WAIT:?}"
                );
                return;
            }
            let _ = self.inner.flush(Duration::from_millis(100));
        }
    }

    /// Records sent and not yet acknowledged (or failed).
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }
}

/// How long `KafkaProducer::flush` waits for acks.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// The acks of records sent by `send_all_nowait`.
pub struct Acks {
    pending: Vec<rdkafka::producer::DeliveryFuture>,
    /// The first delivery that failed.
    failed: Option<LogError>,
    producer: FutureProducer,
}

impl Acks {
    /// True once every record is acknowledged or failed; never blocks.
    pub fn poll_done(&mut self) -> bool {
        use futures::FutureExt;
        let mut failed = None;
        self.pending.retain_mut(|f| match f.now_or_never() {
            None => true,
            Some(Ok(Ok(_))) => false,
            Some(Ok(Err((e, _)))) => {
                failed.get_or_insert_with(|| kerr(e));
                false
            }
            Some(Err(_)) => {
                failed.get_or_insert_with(|| {
                    LogError::Kafka("delivery cancelled (producer closed)".into())
                });
                false
            }
        });
        if self.failed.is_none() {
            self.failed = failed;
        }
        self.pending.is_empty()
    }

    /// Waits for every ack; the first failure, if any (fatal client errors
    /// as `KafkaFatal`).
    pub fn wait(&mut self) -> Result<(), LogError> {
        let pending = std::mem::take(&mut self.pending);
        let r = futures::executor::block_on(KafkaProducer::await_all(pending));
        let r = match self.failed.take() {
            Some(e) => Err(e),
            None => r,
        };
        if r.is_err() {
            if let Some((code, reason)) = self.producer.client().fatal_error() {
                return Err(LogError::KafkaFatal(format!("{code:?}: {reason}")));
            }
        }
        r
    }
}

pub fn to_log_record<M: Message>(m: &M) -> LogRecord {
    LogRecord {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        key: m.key().map(<[u8]>::to_vec),
        value: m
            .payload()
            .map(bytes::Bytes::copy_from_slice)
            .unwrap_or_default(),
    }
}

/// Header value of a message, if present.
pub fn header<M: Message>(m: &M, name: &str) -> Option<Vec<u8>> {
    let h = m.headers()?;
    (0..h.count())
        .map(|i| h.get(i))
        .find(|h| h.key == name)
        .and_then(|h| h.value.map(<[u8]>::to_vec))
}

/// Reads partitions from given offsets until nothing more arrives for
/// `idle` after reaching the high watermark (robust to brokers whose
/// watermark lags the last batch).
pub fn read_until_idle(
    c: &Config,
    parts: &[(String, i32, i64)],
    idle: Duration,
    mut f: impl FnMut(LogRecord),
) -> Result<(), LogError> {
    if parts.is_empty() {
        return Ok(());
    }
    let consumer: BaseConsumer = consumer_config(c, "contextd-reader")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kerr)?;
    let mut tpl = TopicPartitionList::new();
    let mut highs = std::collections::HashMap::new();
    for (t, p, from) in parts {
        tpl.add_partition_offset(
            t,
            *p,
            if *from <= 0 {
                Offset::Beginning
            } else {
                Offset::Offset(*from)
            },
        )
        .map_err(kerr)?;
        let (_, high) = consumer
            .fetch_watermarks(t, *p, Duration::from_secs(10))
            .map_err(kerr)?;
        highs.insert((t.clone(), *p), high);
    }
    consumer.assign(&tpl).map_err(kerr)?;
    let mut positions: std::collections::HashMap<(String, i32), i64> = parts
        .iter()
        .map(|(t, p, f)| ((t.clone(), *p), *f))
        .collect();
    let mut last = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => {
                let r = to_log_record(&m);
                positions.insert((r.topic.clone(), r.partition), r.offset + 1);
                f(r);
                last = Instant::now();
            }
            Some(Err(e)) => return Err(kerr(e)),
            None => {
                let reached = highs
                    .iter()
                    .all(|(k, h)| positions.get(k).copied().unwrap_or(0) >= *h);
                if reached && last.elapsed() >= idle {
                    return Ok(());
                }
                if last.elapsed() > Duration::from_secs(60) {
                    return Err(LogError::Kafka(
                        "timed out reading to the end of a partition".into(),
                    ));
                }
            }
        }
    }
}

/// How many partitions the broker says `topic` has (0 while it has none).
pub fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<usize, LogError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kerr)?;
    Ok(md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0))
}

/// The newest `limit` records of a topic over all its partitions, oldest
/// first (by timestamp, then partition and offset), and how many records
/// the topic holds (high minus low watermarks).
pub fn tail(c: &Config, topic: &str, limit: usize) -> Result<(Vec<LogRecord>, i64), LogError> {
    let consumer: BaseConsumer = consumer_config(c, "contextd-reader")
        .create()
        .map_err(kerr)?;
    let n = partition_count(&consumer, topic)?;
    let mut parts = Vec::new();
    let mut total = 0;
    for p in 0..n as i32 {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(kerr)?;
        if high > low {
            total += high - low;
            parts.push((topic.to_string(), p, (high - limit as i64).max(low)));
        }
    }
    let mut out = Vec::new();
    read_until_idle(c, &parts, Duration::from_millis(200), |r| out.push(r))?;
    out.sort_by_key(|r| (r.timestamp_ms, r.partition, r.offset));
    let newest = out.len().saturating_sub(limit);
    out.drain(..newest);
    // tansu's high watermark can trail what a read finds.
    Ok((out, total.max(0)))
}
