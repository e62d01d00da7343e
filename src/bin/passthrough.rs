//! `passthrough`: the pass-through baseline for the benchmarks in `bench/`.
//!
//! It has contextd's Kafka topology with no state and no logic, so that the
//! cost of Kafka I/O alone can be measured on the same broker, side by side:
//!
//! * stage 1 consumes the three input topics in a consumer group and produces
//!   each value, unchanged, to a records topic keyed by the input key;
//! * stage 2 consumes the records topic and produces one record of about
//!   `--snapshot-bytes` (uniform in 0.5x..1.5x) per input, keyed alike, to an
//!   output topic, standing in for a context snapshot.
//!
//! Both stages run in one process on dedicated threads with `BaseConsumer` +
//! `BaseProducer`, batching as a real application would (linger, lz4,
//! acks=all, murmur2_random). `--consume-only` runs stage 1 without producing.
//!
//! `passthrough produce --file DIR/all.tsv` loads a benchmark's input
//! (`topic<TAB>key<TAB>value` lines) as fast as the broker takes it.
//!
//! Every mode prints one JSON line: records, seconds, records/s, plus the
//! wall-clock start and end of the measured window (`t_start`, `t_end`, Unix
//! seconds) so that the harness can attribute CPU samples to that window.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use serde_json::json;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(
    name = "passthrough",
    about = "Kafka pass-through baseline and fast loader for the contextd benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Consume the inputs and pass them through two stages (or only consume, with --consume-only).
    Run(RunArgs),
    /// Produce `topic<TAB>key<TAB>value` lines (all.tsv) to their topics as fast as possible.
    Produce(ProduceArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long)]
    brokers: String,
    /// Consumer group prefix; the stages use `GROUP-route` and `GROUP-snap`.
    #[arg(long)]
    group: String,
    /// Input topics, comma-separated.
    #[arg(
        long,
        default_value = "zendesk.events,sunshine.events,sunshine.profiles"
    )]
    input_topics: String,
    #[arg(long, default_value = "passthrough.records")]
    records_topic: String,
    #[arg(long, default_value = "passthrough.snapshots")]
    output_topic: String,
    /// Average size of a produced stand-in snapshot, in bytes.
    #[arg(long, default_value_t = 4000)]
    snapshot_bytes: usize,
    /// Stop once the last stage has handled this many records (0 = only on idle).
    #[arg(long, default_value_t = 0)]
    expect: u64,
    /// Stop after this many seconds without a record (once records were seen).
    #[arg(long, default_value_t = 5.0)]
    idle_exit: f64,
    /// Give up if no record at all arrives within this many seconds.
    #[arg(long, default_value_t = 120.0)]
    start_timeout: f64,
    /// Only consume and count the inputs.
    #[arg(long)]
    consume_only: bool,
}

#[derive(Args, Debug)]
struct ProduceArgs {
    #[arg(long)]
    brokers: String,
    /// all.tsv: one `topic<TAB>key<TAB>value` record a line.
    #[arg(long)]
    file: PathBuf,
    /// Optional JSON file produced first to `--settings-topic` with key `visibility`.
    #[arg(long)]
    settings: Option<PathBuf>,
    #[arg(long, default_value = "context.settings")]
    settings_topic: String,
}

/// Counts delivery reports, so that results only claim what the broker acknowledged.
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap();
                if first.is_none() {
                    *first = Some(e.to_string());
                }
            }
        }
    }
}

type Out = BaseProducer<Deliveries>;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn producer(brokers: &str, linger_ms: u32) -> Result<Out> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger_ms.to_string())
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create_with_context(Deliveries::default())
        .context("cannot create a Kafka producer")
}

fn consumer(brokers: &str, group: &str, topics: &[&str]) -> Result<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("fetch.wait.max.ms", "10")
        .set("enable.partition.eof", "false")
        .create()
        .context("cannot create a Kafka consumer")?;
    c.subscribe(topics).context("cannot subscribe")?;
    Ok(c)
}

/// Enqueues a record, serving delivery reports while the local queue is full.
fn send(p: &Out, topic: &str, key: Option<&[u8]>, value: &[u8]) -> Result<()> {
    let mut rec = BaseRecord::to(topic).payload(value);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                p.poll(Duration::from_millis(5));
            }
            Err((e, _)) => bail!("cannot enqueue a record for {topic}: {e}"),
        }
    }
}

/// Waits up to 120 s of wall time for every delivery report. (rdkafka's
/// `flush(timeout)` charges 100 ms of its budget per delivery event it
/// serves, so with many produce requests in flight it gave up after
/// seconds.)
fn flush(p: &Out) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while p.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            bail!(
                "producer flush timed out: {} records in flight after 120 s",
                p.in_flight_count()
            );
        }
        let _ = p.flush(Duration::from_millis(100));
    }
    let d = p.context();
    if d.failed.load(Ordering::Relaxed) > 0 {
        let first = d.first_error.lock().unwrap().clone().unwrap_or_default();
        bail!(
            "{} records were not delivered (first error: {first})",
            d.failed.load(Ordering::Relaxed)
        );
    }
    Ok(())
}

/// What one stage did.
#[derive(Default, Debug, Clone)]
struct StageResult {
    records: u64,
    produced: u64,
    produced_bytes: u64,
    /// Unix seconds of the first record consumed and of the end of the stage's work.
    first: Option<f64>,
    last: f64,
}

/// Shared progress between the stages: stage 2 stops when stage 1 is done and drained.
struct Progress {
    stage1_done: AtomicBool,
    stage1_records: AtomicU64,
    stop: AtomicBool,
}

/// Stand-in snapshot text: JSON-ish words, so that lz4 compresses it about as
/// well as a real snapshot.
fn snapshot_text(len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "{\"id\":",
        "\"article_viewed\"",
        "\"source\":\"zendesk\"",
        "\"created_at\":\"2026-11-20T10:00:00Z\"",
        "\"properties\":{",
        "\"url\":\"https://help.example/hc/articles/360001\"",
        "},",
        "\"title\":\"Reset your password\"",
        "\"order\":{\"id\":\"1001\",\"total\":\"59.90\"}",
        "\"type\":",
        "\"shopify\"",
        "\"description\":\"Order #1001\"",
        "\"locale\":\"en-us\"",
        "\"channel\":\"help_center\"",
        ",",
        "\"user_agent\":\"xxxxxxxxxxxxxxxx\"",
    ];
    let mut out = Vec::with_capacity(len + 64);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn stage1(a: &RunArgs, progress: Arc<Progress>) -> Result<StageResult> {
    let topics: Vec<&str> = a
        .input_topics
        .split(',')
        .filter(|t| !t.is_empty())
        .collect();
    let c = consumer(&a.brokers, &format!("{}-route", a.group), &topics)?;
    let p = if a.consume_only {
        None
    } else {
        Some(producer(&a.brokers, 5)?)
    };
    let mut r = StageResult::default();
    let started = Instant::now();
    let mut last_seen = Instant::now();
    let mut bytes = 0u64;
    loop {
        if progress.stop.load(Ordering::Acquire) {
            break;
        }
        match c.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                if r.first.is_none() {
                    r.first = Some(unix_now());
                }
                last_seen = Instant::now();
                r.records += 1;
                let value = m.payload().unwrap_or(&[]);
                bytes += value.len() as u64;
                if let Some(p) = &p {
                    send(p, &a.records_topic, m.key(), value)?;
                    r.produced += 1;
                    if r.produced % 1024 == 0 {
                        p.poll(Duration::ZERO);
                    }
                }
                progress.stage1_records.store(r.records, Ordering::Release);
                if a.expect > 0 && r.records >= a.expect {
                    break;
                }
            }
            Some(Err(e)) => eprintln!("passthrough: consumer error in stage 1: {e}"),
            None => {
                if let Some(p) = &p {
                    p.poll(Duration::ZERO);
                }
                let idle = last_seen.elapsed().as_secs_f64();
                if r.first.is_some() && idle >= a.idle_exit {
                    break;
                }
                if r.first.is_none() && started.elapsed().as_secs_f64() >= a.start_timeout {
                    bail!(
                        "no input record arrived within {}s; are the input topics loaded?",
                        a.start_timeout
                    );
                }
            }
        }
    }
    if let Some(p) = &p {
        flush(p)?;
    }
    r.produced_bytes = bytes;
    // The window ends with the last record (not with the idle wait that follows it).
    r.last = if p.is_some() || r.first.is_none() {
        unix_now()
    } else {
        unix_now() - last_seen.elapsed().as_secs_f64()
    };
    progress.stage1_records.store(r.records, Ordering::Release);
    progress.stage1_done.store(true, Ordering::Release);
    Ok(r)
}

fn stage2(a: &RunArgs, progress: Arc<Progress>) -> Result<StageResult> {
    let c = consumer(
        &a.brokers,
        &format!("{}-snap", a.group),
        &[&a.records_topic],
    )?;
    let p = producer(&a.brokers, 5)?;
    let avg = a.snapshot_bytes.max(2);
    let text = snapshot_text(avg * 3 / 2 + 1);
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut r = StageResult::default();
    let mut last_seen = Instant::now();
    let started = Instant::now();
    loop {
        if progress.stop.load(Ordering::Acquire) {
            break;
        }
        let done1 = progress.stage1_done.load(Ordering::Acquire);
        if done1 && r.records >= progress.stage1_records.load(Ordering::Acquire) {
            break;
        }
        match c.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                if r.first.is_none() {
                    r.first = Some(unix_now());
                }
                last_seen = Instant::now();
                r.records += 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = avg / 2 + (x % (avg as u64 + 1)) as usize;
                send(&p, &a.output_topic, m.key(), &text[..len])?;
                r.produced += 1;
                r.produced_bytes += len as u64;
                if r.produced % 1024 == 0 {
                    p.poll(Duration::ZERO);
                }
            }
            Some(Err(e)) => eprintln!("passthrough: consumer error in stage 2: {e}"),
            None => {
                p.poll(Duration::ZERO);
                // Stage 1 finished but records are missing: give up after the idle time.
                if done1 && last_seen.elapsed().as_secs_f64() >= a.idle_exit {
                    eprintln!(
                        "passthrough: stage 2 saw {} of {} records before going idle",
                        r.records,
                        progress.stage1_records.load(Ordering::Acquire)
                    );
                    break;
                }
                if r.first.is_none() && started.elapsed().as_secs_f64() >= a.start_timeout + 60.0 {
                    bail!("stage 2 received nothing");
                }
            }
        }
    }
    flush(&p)?;
    // With --expect the window ends once everything is delivered; on idle exit
    // it ends with the last record handled (not with the idle wait after it).
    r.last = if a.expect > 0 {
        unix_now()
    } else {
        unix_now() - last_seen.elapsed().as_secs_f64()
    };
    Ok(r)
}

fn run(a: RunArgs) -> Result<()> {
    let a = Arc::new(a);
    let progress = Arc::new(Progress {
        stage1_done: AtomicBool::new(false),
        stage1_records: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let (a1, p1) = (a.clone(), progress.clone());
    let h1 = thread::Builder::new()
        .name("stage1".into())
        .spawn(move || {
            let r = stage1(&a1, p1.clone());
            if r.is_err() {
                p1.stop.store(true, Ordering::Release);
                p1.stage1_done.store(true, Ordering::Release);
            }
            r
        })?;
    let h2 = if a.consume_only {
        None
    } else {
        let (a2, p2) = (a.clone(), progress.clone());
        Some(
            thread::Builder::new()
                .name("stage2".into())
                .spawn(move || {
                    let r = stage2(&a2, p2.clone());
                    if r.is_err() {
                        p2.stop.store(true, Ordering::Release);
                    }
                    r
                })?,
        )
    };
    let r1 = h1
        .join()
        .map_err(|_| anyhow::anyhow!("stage 1 panicked"))??;
    let r2 = match h2 {
        Some(h) => Some(
            h.join()
                .map_err(|_| anyhow::anyhow!("stage 2 panicked"))??,
        ),
        None => None,
    };
    let start = r1.first.unwrap_or_else(unix_now);
    let (end, out) = match &r2 {
        Some(r2) => (
            r2.last,
            json!({"records": r2.records, "snapshots": r2.produced, "snapshot_bytes": r2.produced_bytes}),
        ),
        None => (r1.last, json!({})),
    };
    let secs = (end - start).max(1e-9);
    let mut line = json!({
        "mode": if a.consume_only { "consume-only" } else { "passthrough" },
        "records": r1.records,
        "input_bytes": r1.produced_bytes,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "records_per_s": (r1.records as f64 / secs).round(),
        "t_start": start,
        "t_end": end,
    });
    if let (Some(obj), Some(extra)) = (line.as_object_mut(), out.as_object()) {
        for (k, v) in extra {
            obj.insert(format!("stage2_{k}"), v.clone());
        }
    }
    println!("{line}");
    Ok(())
}

fn produce(a: ProduceArgs) -> Result<()> {
    let p = producer(&a.brokers, 20)?;
    if let Some(s) = &a.settings {
        let value = std::fs::read(s).with_context(|| format!("cannot read {}", s.display()))?;
        send(
            &p,
            &a.settings_topic,
            Some(b"visibility"),
            value.trim_ascii_end(),
        )?;
        flush(&p)?;
    }
    let file = std::fs::File::open(&a.file)
        .with_context(|| format!("cannot open {}", a.file.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let started = Instant::now();
    let t_start = unix_now();
    let mut line = Vec::with_capacity(4096);
    let (mut records, mut bytes) = (0u64, 0u64);
    loop {
        line.clear();
        if reader.by_ref().read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let l = line.strip_suffix(b"\n").unwrap_or(&line);
        if l.is_empty() {
            continue;
        }
        let mut parts = l.splitn(3, |b| *b == b'\t');
        let (Some(topic), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!(
                "line {} of {} is not topic<TAB>key<TAB>value",
                records + 1,
                a.file.display()
            );
        };
        let topic = std::str::from_utf8(topic).context("topic is not UTF-8")?;
        send(
            &p,
            topic,
            if key.is_empty() { None } else { Some(key) },
            value,
        )?;
        records += 1;
        bytes += value.len() as u64;
        if records % 1024 == 0 {
            p.poll(Duration::ZERO);
        }
    }
    flush(&p)?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "{}",
        json!({"mode": "produce", "records": records, "bytes": bytes, "seconds": (secs * 1000.0).round() / 1000.0,
               "records_per_s": (records as f64 / secs).round(), "t_start": t_start, "t_end": unix_now()})
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Produce(a) => produce(a),
    };
    if let Err(e) = r {
        eprintln!("passthrough: {e:#}");
        std::process::exit(1);
    }
}
