//! Subcommands: run, demo, rebuild, digest, produce, checkpoint.

mod demo;
mod produce;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use contextd::app::EmbeddedRuntime;
use contextd::config::{Config, LogFormat, Overrides};
use contextd::log::embedded::{restore_checkpoint, CHECKPOINT_FOLDER};
use contextd::pipeline::SnapshotFormat;
use contextd::{api, replay, state, telemetry};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "contextd",
    version,
    about = "Kafka-native engine for customer context: profiles, events, snapshots"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the pipeline and the HTTP API (embedded mode unless --brokers is given).
    Run(Common),
    /// Run a generated workload in embedded mode, print what happened and a context card.
    Demo(DemoArgs),
    /// Drop the materialized state and replay the retained log, then exit.
    Rebuild(RebuildArgs),
    /// Print one hex digest of the materialized state.
    Digest(Common),
    /// Append NDJSON records (a file or stdin) to a topic.
    Produce(ProduceArgs),
    /// Write a generated workload as NDJSON files, one per input topic (benchmarks, peers).
    Workload(WorkloadArgs),
    /// Create or restore a checkpoint of the state store.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
}

/// Flags shared by every subcommand; each is also a CONTEXTD_* variable and a config-file key.
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// TOML config file.
    #[arg(long, env = "CONTEXTD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (state store; embedded topics).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long)]
    http_addr: Option<String>,
    /// Kafka bootstrap servers (Kafka mode).
    #[arg(long)]
    brokers: Option<String>,
    /// Kafka consumer group.
    #[arg(long)]
    group_id: Option<String>,
    /// Partitions of created topics and of the state (1 to 10000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    partitions: Option<u32>,
    /// Encoding of context.snapshots values.
    #[arg(long, value_enum)]
    snapshot_format: Option<SnapshotFormat>,
    /// Log output format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl Common {
    fn load(&self) -> Result<Config> {
        let o = Overrides {
            data_dir: self.data_dir.clone(),
            http_addr: self.http_addr.clone(),
            brokers: self.brokers.clone(),
            group_id: self.group_id.clone(),
            partitions: self.partitions,
            snapshot_format: self.snapshot_format,
            log_format: self.log_format,
        };
        let c = Config::load(self.config.as_deref(), &o)?;
        telemetry::init_logs(c.log_format);
        Ok(c)
    }
}

#[derive(Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    common: Common,
    /// Keep the HTTP API (and the console) up after the workload.
    #[arg(long)]
    serve: bool,
    /// Users in the workload.
    #[arg(long, default_value_t = 3000)]
    users: usize,
    /// Records in the workload.
    #[arg(long, default_value_t = 60_000)]
    records: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args, Debug)]
struct WorkloadArgs {
    /// Output directory (TOPIC.ndjson files, plus settings.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Zipf exponent of user activity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
}

#[derive(Args, Debug)]
struct RebuildArgs {
    #[command(flatten)]
    common: Common,
    /// Re-run normalization and resolution over the input topics.
    #[arg(long)]
    from_inputs: bool,
}

/// `--brokers` and `--http-addr` are the two ways to send: one at a time.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").args(["brokers", "http_addr"])))]
struct ProduceArgs {
    #[command(flatten)]
    common: Common,
    /// Topic to append to.
    #[arg(long)]
    topic: String,
    /// NDJSON file (default: stdin).
    file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    /// Write a consistent checkpoint of the state store (with the offsets it covers) to DIR.
    Create {
        #[command(flatten)]
        common: Common,
        dir: PathBuf,
    },
    /// Replace the data dir's state with the checkpoint in DIR; the tail is replayed at start.
    Restore {
        #[command(flatten)]
        common: Common,
        dir: PathBuf,
    },
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(c) => run(c.load()?),
        Cmd::Demo(d) => demo::demo(
            d.common.load()?,
            d.common.data_dir.is_some(),
            d.serve,
            d.users,
            d.records,
            d.seed,
        ),
        Cmd::Rebuild(r) => rebuild(
            with_recorded_partitions(r.common.load()?, r.common.partitions.is_some())?,
            r.from_inputs,
        ),
        Cmd::Digest(c) => digest(c.load()?),
        Cmd::Produce(p) => produce::produce(
            p.common.load()?,
            &p.topic,
            p.file.as_deref(),
            p.common.http_addr.is_some(),
        ),
        Cmd::Workload(w) => write_workload(&w),
        Cmd::Checkpoint(CheckpointCmd::Create { common, dir }) => {
            let given = common.partitions.is_some();
            checkpoint_create(with_recorded_partitions(common.load()?, given)?, &dir)
        }
        Cmd::Checkpoint(CheckpointCmd::Restore { common, dir }) => {
            checkpoint_restore(common.load()?, &dir)
        }
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("contextd-async")
        .build()
        .context("cannot start the async runtime")
}

async fn shutdown_signal(failed: Arc<contextd::pipeline::embedded::Readiness>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => if failed.failed.load(Ordering::Acquire) { break },
        }
    }
    tracing::info!("shutting down");
}

/// Binds the HTTP address, before anything else starts: an address in
/// use then fails a start before it touches the data dir.
pub fn listen(addr: &str) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr}; choose another address (--http-addr)")
    })?;
    listener
        .set_nonblocking(true)
        .context("cannot set up the listening socket")?;
    Ok(listener)
}

/// Serves the API for `app` on `listener` (from `listen`) until
/// SIGTERM/SIGINT or a stage failure.
pub async fn serve(app: Arc<contextd::app::App>, listener: std::net::TcpListener) -> Result<()> {
    let addr = app.config.http_addr.clone();
    let listener = tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(addr = %addr, mode = if app.config.brokers.is_some() { "kafka" } else { "embedded" }, "contextd listening");
    let ready = app.ready.clone();
    axum::serve(listener, api::router(app))
        .with_graceful_shutdown(shutdown_signal(ready))
        .await
        .context("http server failed")
}

fn run(config: Config) -> Result<()> {
    telemetry::metrics();
    let rt = runtime()?;
    let listener = listen(&config.http_addr)?;
    if config.brokers.is_some() {
        let kafka =
            contextd::app::KafkaRuntime::start(config).context("cannot start Kafka mode")?;
        let app = kafka.app.clone();
        let served = rt.block_on(serve(app.clone(), listener));
        let failed = app.ready.failed.load(Ordering::Acquire);
        kafka.shutdown()?;
        served?;
        if failed {
            bail!("the pipeline stopped with an error (see the log above)");
        }
        return Ok(());
    }
    let embedded = EmbeddedRuntime::start(config)?;
    let app = embedded.app.clone();
    let served = rt.block_on(serve(app.clone(), listener));
    let failed = app.ready.failed.load(Ordering::Acquire);
    embedded.shutdown()?;
    served?;
    if failed {
        bail!("the pipeline stopped with an error (see the log above)");
    }
    Ok(())
}

fn rebuild(config: Config, from_inputs: bool) -> Result<()> {
    if config.brokers.is_some() {
        if from_inputs {
            bail!("--from-inputs re-routes the input topics and needs embedded mode; in Kafka mode rebuild replays context.records (reset the group's input offsets to re-route)");
        }
        let started = std::time::Instant::now();
        // A progress line for a terminal only, as the embedded rebuild's bar.
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let progress = |n: u64| {
            if terminal {
                eprint!("\rreplayed {n} records")
            }
        };
        let (replayed, published) = contextd::pipeline::kafka::rebuild(&config, &progress)
            .map_err(|e| {
                failed(
                    e.into(),
                    format!(
                        "rebuild of {} from {} failed",
                        config.data_dir.display(),
                        config.brokers.as_deref().unwrap_or_default()
                    ),
                )
            })?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        if terminal {
            eprintln!();
        }
        println!("rebuilt {} from Kafka: {replayed} records replayed in {secs:.2}s ({:.0} records/s), {published} snapshots re-published", config.data_dir.display(), replayed as f64 / secs);
        return Ok(());
    }
    if !config.data_dir.join("state").exists() {
        bail!(
            "no contextd state in {} to rebuild; pass --data-dir",
            config.data_dir.display()
        );
    }
    let r = replay::rebuild_embedded(&config, from_inputs, true).map_err(|e| {
        failed(
            e.into(),
            format!("rebuild of {} failed", config.data_dir.display()),
        )
    })?;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    println!(
        "rebuilt {}: {} records replayed{} in {:.2}s ({:.0} records-log entries/s), {} snapshots re-published",
        config.data_dir.display(),
        r.replayed,
        if from_inputs {
            format!(" ({} input records re-routed)", r.routed)
        } else {
            String::new()
        },
        secs,
        r.replayed as f64 / secs,
        r.republished
    );
    Ok(())
}

/// A data dir's own partition count (recorded when it was created) for a
/// command that works on it, unless `--partitions` was given: its state
/// and logs are partitioned so whatever the config file or the environment
/// say for new data dirs (a flag that differs is refused by the store).
fn with_recorded_partitions(mut config: Config, flag_given: bool) -> Result<Config> {
    if flag_given {
        return Ok(config);
    }
    let recorded = state::Store::recorded_partitions_in(&config.data_dir).map_err(|e| {
        failed(
            e.into(),
            format!("cannot read {}", config.data_dir.display()),
        )
    })?;
    if let Some(n) = recorded.filter(|n| *n != config.partitions) {
        tracing::info!(
            partitions = n,
            "the data dir was created with {n} partitions; using them"
        );
        config.partitions = n;
    }
    Ok(config)
}

fn open_store(config: &Config) -> Result<state::Store> {
    if !config.data_dir.join("state").exists() {
        bail!(
            "no contextd state in {}; pass --data-dir",
            config.data_dir.display()
        );
    }
    state::Store::open(&config.data_dir, &config.store_options()).map_err(|e| {
        failed(
            e.into(),
            format!("cannot open {}", config.data_dir.display()),
        )
    })
}

/// `e` in the context `what`, with a hint when RocksDB found the store
/// locked: another process (a running contextd) has it open.
fn failed(e: anyhow::Error, what: String) -> anyhow::Error {
    if format!("{e:#}").contains("lock") {
        e.context(format!(
            "{what}: is contextd still running on this data dir? stop it first"
        ))
    } else {
        e.context(what)
    }
}

fn digest(config: Config) -> Result<()> {
    let store = open_store(&config)?;
    store.refuse_interrupted_rebuild()?;
    println!("{}", state::digest::digest(&store)?);
    Ok(())
}

fn checkpoint_create(config: Config, dir: &std::path::Path) -> Result<()> {
    if dir.exists() {
        bail!(
            "{} already exists; choose a new directory for the checkpoint",
            dir.display()
        );
    }
    let of_state = |store: &state::Store| {
        rocksdb::checkpoint::Checkpoint::new(store.db())
            .and_then(|c| c.create_checkpoint(dir))
            .with_context(|| format!("cannot create a checkpoint in {}", dir.display()))
    };
    let store = open_store(&config)?;
    store.check_partitions(config.partitions)?;
    if store.is_kafka_mode()? {
        // Kafka mode: the state and the offsets it covers; the topics are
        // the broker's.
        of_state(&store)?;
    } else {
        drop(store);
        // The embedded topics are part of the data: their committed ends
        // are in the store, so the store's checkpoint and the topics' copy
        // agree.
        let log = contextd::app::open_embedded(&config)?;
        of_state(log.store())?;
        log.checkpoint(&dir.join(CHECKPOINT_FOLDER))
            .with_context(|| format!("cannot copy the embedded topics into {}", dir.display()))?;
    }
    println!(
        "checkpoint of {} written to {}",
        config.data_dir.display(),
        dir.display()
    );
    Ok(())
}

fn checkpoint_restore(config: Config, dir: &std::path::Path) -> Result<()> {
    if !dir.join("CURRENT").exists() {
        bail!(
            "{} is not a contextd checkpoint (no RocksDB CURRENT file)",
            dir.display()
        );
    }
    let state_dir = config.data_dir.join("state");
    if state_dir.exists() {
        // Refuse while an instance holds the store.
        drop(open_store(&config)?);
        std::fs::remove_dir_all(&state_dir)
            .with_context(|| format!("cannot remove {}", state_dir.display()))?;
    }
    std::fs::create_dir_all(&state_dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == CHECKPOINT_FOLDER {
            continue;
        }
        std::fs::copy(entry.path(), state_dir.join(entry.file_name()))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
    }
    restore_checkpoint(&dir.join(CHECKPOINT_FOLDER), &config.data_dir)
        .context("cannot restore the embedded topics")?;
    let store = open_store(&config)?;
    store.check_partitions(config.partitions)?;
    println!(
        "restored {} from {}; positions in the checkpoint decide what is replayed at start",
        config.data_dir.display(),
        dir.display()
    );
    Ok(())
}

fn write_workload(w: &WorkloadArgs) -> Result<()> {
    use std::io::Write;
    let topics = contextd::pipeline::Topics::default();
    std::fs::create_dir_all(&w.out)
        .with_context(|| format!("cannot create {}", w.out.display()))?;
    let mut files = std::collections::HashMap::new();
    for t in [
        &topics.zendesk_events,
        &topics.sunshine_events,
        &topics.sunshine_profiles,
    ] {
        let f = std::fs::File::create(w.out.join(format!("{t}.ndjson")))?;
        files.insert(t.clone(), std::io::BufWriter::new(f));
    }
    let mut all = std::io::BufWriter::new(std::fs::File::create(w.out.join("all.tsv"))?);
    let mut gen = contextd::workload::Workload::new(w.seed, w.users, w.zipf);
    for _ in 0..w.records {
        let g = gen.next(&topics);
        let f = files.get_mut(&g.topic).expect("known topic");
        f.write_all(&g.value)?;
        f.write_all(b"\n")?;
        all.write_all(g.topic.as_bytes())?;
        all.write_all(b"\t")?;
        all.write_all(&g.key.unwrap_or_default())?;
        all.write_all(b"\t")?;
        all.write_all(&g.value)?;
        all.write_all(b"\n")?;
    }
    for f in files.values_mut() {
        f.flush()?;
    }
    all.flush()?;
    std::fs::write(
        w.out.join("settings.json"),
        contextd::workload::Workload::visibility().to_string(),
    )?;
    println!("wrote {} records for {} users to {} (per-topic NDJSON, all.tsv = topic<TAB>key<TAB>value in order, settings.json)", w.records, w.users, w.out.display());
    Ok(())
}
