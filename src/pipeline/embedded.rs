//! Embedded mode's driver: the two stages on dedicated threads (RocksDB
//! work never runs on async threads), reading embedded topics from the
//! positions stored in the state, committing each batch's state change,
//! appended records and new positions in one `WriteBatch`.

use super::materializer::{observe_latency, Materializer};
use super::router::Router;
use super::PipelineError;
use super::{MATERIALIZE_BUDGET, ROUTE_BUDGET};
use crate::identity::IdentityLookup;
use crate::log::embedded::EmbeddedLog;
use crate::log::LogRecord;
use crate::model::Identifier;
use crate::state::keys::{self, CF_IDENT, CF_META, CF_PART};
use crate::state::Store;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Committed identity links in the store. The resolution rules are pure and
/// see a missing link as "not linked"; a read that fails is remembered and
/// `check` fails the batch with it, so an I/O error never creates a user.
pub struct StoreLookup<'a> {
    store: &'a Store,
    failed: RefCell<Option<crate::state::StoreError>>,
    cache: Option<&'a LinkCache>,
}

/// Links a routing stage has read from the store, kept across its batches
/// (an identifier key -> its user). Only links found in the store go in: a
/// stored link is never moved or removed while the process runs (links are
/// only added; a rebuild runs in a process of its own), so an entry stays
/// true. Cleared whenever it reaches `LinkCache::MAX` entries.
#[derive(Default)]
pub struct LinkCache(RefCell<HashMap<String, String>>);

impl LinkCache {
    /// Entries held at most (about 6 MiB with typical identifiers).
    pub const MAX: usize = 65_536;

    fn get(&self, key: &str) -> Option<String> {
        self.0.borrow().get(key).cloned()
    }

    fn insert(&self, key: String, user_id: String) {
        let mut links = self.0.borrow_mut();
        if links.len() >= Self::MAX {
            links.clear();
        }
        links.insert(key, user_id);
    }

    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> StoreLookup<'a> {
    pub fn new(store: &'a Store) -> StoreLookup<'a> {
        StoreLookup {
            store,
            failed: RefCell::new(None),
            cache: None,
        }
    }

    /// Reading through `cache` (and filling it with the links it finds).
    pub fn cached(store: &'a Store, cache: &'a LinkCache) -> StoreLookup<'a> {
        StoreLookup {
            cache: Some(cache),
            ..StoreLookup::new(store)
        }
    }

    /// The first lookup error, if any (the batch must not be committed).
    pub fn check(self) -> Result<(), crate::state::StoreError> {
        match self.failed.into_inner() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl IdentityLookup for StoreLookup<'_> {
    fn linked_user(&self, id: &Identifier) -> Option<String> {
        let key = self.cache.map(|_| id.key());
        if let (Some(cache), Some(key)) = (self.cache, &key) {
            if let Some(u) = cache.get(key) {
                return Some(u);
            }
        }
        match self.store.linked_user(id) {
            Ok(u) => {
                if let (Some(cache), Some(key), Some(u)) = (self.cache, key, &u) {
                    cache.insert(key, u.clone());
                }
                u
            }
            Err(e) => {
                let mut failed = self.failed.borrow_mut();
                if failed.is_none() {
                    tracing::error!(error = %e, "identity lookup failed; the batch is not committed");
                    *failed = Some(e);
                }
                None
            }
        }
    }
}

/// `/readyz`: each stage caught up with the log ends seen at start.
#[derive(Default)]
pub struct Readiness {
    pub router: AtomicBool,
    /// One bit per materializing thread that is not ready: embedded mode,
    /// not caught up yet; Kafka mode, not every assigned partition restored.
    pub materializers_unready: AtomicU64,
    /// A stage stopped with an error: `/healthz` fails.
    pub failed: AtomicBool,
}

impl Readiness {
    /// For `materializers` materializing threads (at most 64), none ready.
    pub fn new(materializers: u32) -> Readiness {
        Readiness {
            materializers_unready: AtomicU64::new(bits(materializers.clamp(1, 64))),
            ..Default::default()
        }
    }

    pub fn ready(&self) -> bool {
        self.router.load(Ordering::Acquire)
            && self.materializers_unready.load(Ordering::Acquire) == 0
    }

    /// Materializing thread `i` is ready or not.
    pub fn set_materializer(&self, i: u32, ready: bool) {
        let bit = 1u64 << (i % 64);
        if ready {
            self.materializers_unready.fetch_and(!bit, Ordering::AcqRel);
        } else {
            self.materializers_unready.fetch_or(bit, Ordering::AcqRel);
        }
    }
}

fn bits(n: u32) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

#[derive(Debug, Clone, Copy)]
pub struct DriverOptions {
    /// Most records read per partition per batch.
    pub batch_records: usize,
    /// Shortest time between two materializer batches (coalescing window).
    pub linger: Duration,
    /// Snapshots kept per partition of the embedded snapshots log.
    pub snapshot_retention: i64,
    /// How long an idle stage sleeps before polling again (appends wake it sooner).
    pub idle_wait: Duration,
}

pub struct Stages {
    pub handles: Vec<JoinHandle<Result<(), PipelineError>>>,
}

impl Stages {
    /// Waits for both stages; the first error wins.
    pub fn join(self) -> Result<(), PipelineError> {
        let mut result = Ok(());
        for h in self.handles {
            match h.join() {
                Ok(Err(e)) if result.is_ok() => result = Err(e),
                Err(_) if result.is_ok() => {
                    result = Err(PipelineError::Store(
                        crate::state::StoreError::Incompatible("a pipeline thread panicked".into()),
                    ))
                }
                _ => {}
            }
        }
        result
    }
}

/// A materializing commit whose snapshots and dead letters take at least
/// this many bytes is written past the page cache (`MaterializerStep::step`).
pub const DIRECT_COMMIT_BYTES: usize = 1 << 20;

/// The smallest share of a budget a partition with a backlog reads.
const MIN_READ: usize = 256;

/// How many records to read from each partition (`backlogs`: committed
/// records not read yet) for a batch of about `budget` records: shares in
/// proportion to the backlogs, at least `MIN_READ` and at most `max` each.
/// A partition whose backlog fits its share gets one more than it holds
/// (within `max`), so a short read tells that it reached the end.
fn quotas(backlogs: &[i64], budget: usize, max: usize) -> Vec<usize> {
    let total: i64 = backlogs.iter().map(|b| (*b).max(0)).sum();
    backlogs
        .iter()
        .map(|b| {
            let b = (*b).max(0) as usize;
            let share = if total as usize <= budget {
                b
            } else {
                (budget as u128 * b as u128 / total as u128) as usize
            };
            let max = max.max(1);
            let q = share.max(MIN_READ).min(max);
            if b <= q && b < max {
                b + 1
            } else {
                q
            }
        })
        .collect()
}

/// Committed records of each of `parts` not read yet from `positions`.
fn backlogs(
    log: &EmbeddedLog,
    parts: &[(String, i32)],
    positions: &HashMap<(String, i32), i64>,
) -> Vec<i64> {
    let mut ends: HashMap<&str, Vec<i64>> = HashMap::new();
    parts
        .iter()
        .map(|key| {
            let end = ends
                .entry(key.0.as_str())
                .or_insert_with(|| log.end_offsets(&key.0))
                .get(key.1 as usize)
                .copied()
                .unwrap_or(0);
            end - positions.get(key).copied().unwrap_or(0)
        })
        .collect()
}

/// Reads a batch from the partitions `parts` at `positions`: at most `max`
/// records from each, about `MATERIALIZE_BUDGET * max` in all.
fn read_all(
    log: &EmbeddedLog,
    parts: &[(String, i32)],
    positions: &HashMap<(String, i32), i64>,
    max: usize,
) -> Result<Vec<LogRecord>, PipelineError> {
    let quota = quotas(
        &backlogs(log, parts, positions),
        MATERIALIZE_BUDGET * max,
        max,
    );
    let mut out = Vec::new();
    for (key, q) in parts.iter().zip(quota) {
        let from = positions.get(key).copied().unwrap_or(0);
        out.extend(log.read(&key.0, key.1, from, q)?);
    }
    Ok(out)
}

fn caught_up(
    log: &EmbeddedLog,
    parts: &[(String, i32)],
    positions: &HashMap<(String, i32), i64>,
    target: Option<&HashMap<(String, i32), i64>>,
) -> bool {
    parts.iter().all(|key| {
        let end = log
            .end_offsets(&key.0)
            .get(key.1 as usize)
            .copied()
            .unwrap_or(0);
        let want = target.and_then(|m| m.get(key).copied()).unwrap_or(end);
        positions.get(key).copied().unwrap_or(0) >= want
    })
}

/// Every partition of `topics`.
fn all_parts(topics: &[(String, u32)]) -> Vec<(String, i32)> {
    topics
        .iter()
        .flat_map(|(t, n)| (0..*n as i32).map(move |p| (t.clone(), p)))
        .collect()
}

fn ends(log: &EmbeddedLog, topics: &[(String, u32)]) -> HashMap<(String, i32), i64> {
    let mut m = HashMap::new();
    for (t, _) in topics {
        for (p, e) in log.end_offsets(t).into_iter().enumerate() {
            m.insert((t.clone(), p as i32), e);
        }
    }
    m
}

/// The routing stage over embedded topics: positions live in the store.
pub struct RouterStep {
    router: Router,
    topics: Vec<(String, u32)>,
    positions: HashMap<(String, i32), i64>,
    links: LinkCache,
}

impl RouterStep {
    pub fn new(log: &EmbeddedLog, router: Router) -> Result<RouterStep, PipelineError> {
        let store = log.store();
        let topics: Vec<(String, u32)> = router
            .topics
            .inputs()
            .iter()
            .map(|t| (t.to_string(), log.partitions(t).unwrap_or(1)))
            .collect();
        let mut positions = HashMap::new();
        for (t, n) in &topics {
            for p in 0..*n as i32 {
                positions.insert(
                    (t.clone(), p),
                    store
                        .get_i64(CF_META, &keys::position("router", t, p))?
                        .unwrap_or(0),
                );
            }
        }
        Ok(RouterStep {
            router,
            topics,
            positions,
            links: LinkCache::default(),
        })
    }

    /// Routes and commits one batch of at most `max` records per partition
    /// (about `ROUTE_BUDGET * max` in all); returns how many.
    pub fn step(&mut self, log: &EmbeddedLog, max: usize) -> Result<usize, PipelineError> {
        let store = log.store();
        let input = self.read_merged(log, max)?;
        if input.is_empty() {
            return Ok(0);
        }
        let lookup = StoreLookup::cached(store, &self.links);
        let routed = self.router.route(&lookup, &input);
        lookup.check()?;
        let mut batch = rocksdb::WriteBatch::default();
        for l in &routed.links {
            if let Some(id) = &l.identifier {
                batch.put_cf(
                    store.cf(CF_IDENT),
                    keys::ident(&id.key()),
                    l.user_id.as_bytes(),
                );
            }
        }
        for ((t, p), next) in &routed.positions {
            store.put_i64(&mut batch, CF_META, &keys::position("router", t, *p), *next);
        }
        log.commit(batch, &routed.out)?;
        self.positions.extend(routed.positions);
        Ok(input.len())
    }

    /// Reads the input partitions and merges them by log time: repeatedly the
    /// head with the smallest (timestamp, stream), stopping where a stream's
    /// buffer runs out before its end. The order then depends only on the logs'
    /// contents, not on `max` (so any batching routes the same way).
    fn read_merged(&self, log: &EmbeddedLog, max: usize) -> Result<Vec<LogRecord>, PipelineError> {
        let parts = all_parts(&self.topics);
        let quota = quotas(
            &backlogs(log, &parts, &self.positions),
            ROUTE_BUDGET * max,
            max,
        );
        let mut streams: Vec<std::collections::VecDeque<LogRecord>> = Vec::new();
        let mut at_end = Vec::new();
        for ((t, p), q) in parts.iter().zip(quota) {
            let from = self.positions.get(&(t.clone(), *p)).copied().unwrap_or(0);
            let recs = log.read(t, *p, from, q)?;
            at_end.push(recs.len() < q);
            streams.push(recs.into());
        }
        let mut out = Vec::new();
        while !streams
            .iter()
            .zip(&at_end)
            .any(|(b, end)| b.is_empty() && !end)
        {
            let Some(i) = super::earliest(&streams) else {
                break;
            };
            out.push(streams[i].pop_front().expect("non-empty"));
        }
        Ok(out)
    }

    pub fn caught_up_with(&self, log: &EmbeddedLog, target: &HashMap<(String, i32), i64>) -> bool {
        caught_up(log, &all_parts(&self.topics), &self.positions, Some(target))
    }

    pub fn ends(&self, log: &EmbeddedLog) -> HashMap<(String, i32), i64> {
        ends(log, &self.topics)
    }
}

/// The materializing stage over the embedded records log (all its
/// partitions, or a share of them: state is partitioned, so stages over
/// disjoint shares never touch the same user).
pub struct MaterializerStep {
    mat: Materializer,
    parts: Vec<(String, i32)>,
    positions: HashMap<(String, i32), i64>,
}

impl MaterializerStep {
    /// Over every partition of the records log.
    pub fn new(log: &EmbeddedLog, mat: Materializer) -> Result<MaterializerStep, PipelineError> {
        let n = log.partitions(&mat.topics.records).unwrap_or(1);
        MaterializerStep::for_partitions(log, mat, &(0..n).collect::<Vec<_>>())
    }

    /// Over the records-log partitions `partitions`.
    pub fn for_partitions(
        log: &EmbeddedLog,
        mat: Materializer,
        partitions: &[u32],
    ) -> Result<MaterializerStep, PipelineError> {
        let store = log.store();
        let topic = mat.topics.records.clone();
        let mut positions = HashMap::new();
        let mut parts = Vec::new();
        let mut mat = mat;
        for p in partitions {
            // Snapshots held when the last run stopped are published first.
            mat.resume_held(store, *p)?;
            let key = (topic.clone(), *p as i32);
            positions.insert(
                key.clone(),
                store.get_i64(CF_PART, &keys::part_offset(*p))?.unwrap_or(0),
            );
            parts.push(key);
        }
        Ok(MaterializerStep {
            mat,
            parts,
            positions,
        })
    }

    /// Applies and commits one batch; returns the records processed and the snapshots published.
    pub fn step(&mut self, log: &EmbeddedLog, max: usize) -> Result<(usize, usize), PipelineError> {
        let input = read_all(log, &self.parts, &self.positions, max)?;
        if input.is_empty() {
            return Ok((0, 0));
        }
        let m = self.mat.process(log.store(), &input)?;
        // At least `max` records (a thread reads up to twice that: the
        // stage is behind), or at least `DIRECT_COMMIT_BYTES` of output (a
        // steady load whose users' snapshots have grown): the snapshots go
        // past the page cache, cheaper for the CPU than the kernel's copy
        // into it; the write waits for the device (about a millisecond a
        // MiB here). Smaller commits stay cached for consumers that tail.
        let bytes: usize = m.out.iter().map(|r| r.value.len()).sum();
        let committed = if input.len() >= max || bytes >= DIRECT_COMMIT_BYTES {
            log.commit_direct(m.batch, &m.out)
        } else {
            log.commit(m.batch, &m.out)
        };
        if let Err(e) = committed {
            self.mat.forget_all();
            return Err(e.into());
        }
        observe_latency(&m.log_times_ns);
        for r in &input {
            self.positions
                .insert((r.topic.clone(), r.partition), r.offset + 1);
        }
        Ok((input.len(), m.published))
    }

    /// Publishes the held snapshots that are due (every held one if `all`)
    /// in a commit of their own; returns how many were published.
    pub fn release(&mut self, log: &EmbeddedLog, all: bool) -> Result<usize, PipelineError> {
        let due = match self.mat.next_due() {
            Some(due) => all || due <= Instant::now(),
            None => false,
        };
        if !due {
            return Ok(0);
        }
        let m = self.mat.release(log.store(), all)?;
        if let Err(e) = log.commit(m.batch, &m.out) {
            self.mat.forget_all();
            return Err(e.into());
        }
        Ok(m.published)
    }

    /// When the next held snapshot is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.mat.next_due()
    }

    pub fn caught_up(&self, log: &EmbeddedLog) -> bool {
        caught_up(log, &self.parts, &self.positions, None)
    }
}

/// Runs the routing stage until `stop`.
pub fn run_router(
    log: Arc<EmbeddedLog>,
    router: Router,
    opts: DriverOptions,
    ready: Arc<Readiness>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let mut stage = RouterStep::new(&log, router)?;
    let start_ends = stage.ends(&log);
    while !stop.load(Ordering::Acquire) {
        let gen = log.generation();
        let started = Instant::now();
        let n = stage.step(&log, opts.batch_records)?;
        if n == 0 {
            if !ready.router.load(Ordering::Acquire) && stage.caught_up_with(&log, &start_ends) {
                ready.router.store(true, Ordering::Release);
            }
            log.wait(gen, opts.idle_wait);
            continue;
        }
        metrics::histogram!("contextd_batch_seconds", "stage" => "route")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("contextd_batch_records", "stage" => "route").record(n as f64);
    }
    Ok(())
}

/// Runs the materializing stage over records-log `partitions` until `stop`
/// (thread `index` of `Readiness::new`'s count).
#[allow(clippy::too_many_arguments)]
pub fn run_materializer(
    log: Arc<EmbeddedLog>,
    mat: Materializer,
    index: u32,
    partitions: Vec<u32>,
    opts: DriverOptions,
    ready: Arc<Readiness>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let mut stage = MaterializerStep::for_partitions(&log, mat, &partitions)?;
    let mut caught_up = false;
    let mut last_size_check = Instant::now();
    let mut last_batch = Instant::now();
    while !stop.load(Ordering::Acquire) {
        // Linger: let a burst accumulate so each user gets one snapshot for it.
        let since = last_batch.elapsed();
        if since < opts.linger {
            std::thread::sleep(opts.linger - since);
        }
        let gen = log.generation();
        let started = Instant::now();
        let (n, _published) = stage.step(&log, opts.batch_records)?;
        if n > 0 {
            last_batch = started;
        }
        if n == 0 {
            stage.release(&log, false)?;
            if !caught_up && ready.router.load(Ordering::Acquire) && stage.caught_up(&log) {
                caught_up = true;
                ready.set_materializer(index, true);
            }
            // Sleep until an append, the next held snapshot, or the poll interval.
            let wait = stage.next_due().map_or(opts.idle_wait, |due| {
                due.saturating_duration_since(Instant::now())
                    .min(opts.idle_wait)
            });
            log.wait(gen, wait);
            continue;
        }
        metrics::histogram!("contextd_batch_seconds", "stage" => "materialize")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("contextd_batch_records", "stage" => "materialize").record(n as f64);
        if last_size_check.elapsed() > Duration::from_secs(10) {
            let topic = stage.mat.topics.snapshots.clone();
            let ends = log.end_offsets(&topic);
            for p in &partitions {
                let end = ends.get(*p as usize).copied().unwrap_or(0);
                if end > opts.snapshot_retention {
                    log.truncate(&topic, *p as i32, end - opts.snapshot_retention)?;
                }
            }
            last_size_check = Instant::now();
        }
    }
    // What is held is published before the stage stops.
    stage.release(&log, true)?;
    Ok(())
}

/// Records not yet processed by each stage: (routing, materializing).
pub fn lag(log: &EmbeddedLog, topics: &super::Topics) -> Result<(i64, i64), PipelineError> {
    let store = log.store();
    let mut route = 0;
    for t in topics.inputs() {
        for (p, end) in log.end_offsets(t).into_iter().enumerate() {
            route += end
                - store
                    .get_i64(CF_META, &keys::position("router", t, p as i32))?
                    .unwrap_or(0);
        }
    }
    let mut mat = 0;
    for (p, end) in log.end_offsets(&topics.records).into_iter().enumerate() {
        mat += end
            - store
                .get_i64(CF_PART, &keys::part_offset(p as u32))?
                .unwrap_or(0);
    }
    Ok((route, mat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_cache_keeps_links_found_in_the_store_and_never_misses() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &crate::state::StoreOptions::default()).unwrap();
        let email = Identifier::new("email", "a@x");
        let phone = Identifier::new("phone", "1");
        let link = |id: &Identifier, user: &str| {
            let mut b = rocksdb::WriteBatch::default();
            b.put_cf(store.cf(CF_IDENT), keys::ident(&id.key()), user.as_bytes());
            store.write(b).unwrap();
        };
        link(&email, "u1");
        let cache = LinkCache::default();
        let lookup = StoreLookup::cached(&store, &cache);
        assert_eq!(lookup.linked_user(&email).as_deref(), Some("u1"));
        // Not linked yet: not remembered, so a link made later is seen.
        assert_eq!(lookup.linked_user(&phone), None);
        assert_eq!(cache.len(), 1);
        link(&phone, "u2");
        assert_eq!(lookup.linked_user(&phone).as_deref(), Some("u2"));
        lookup.check().unwrap();
        // Found links are served from the cache, without the store.
        drop(store);
        let other = tempfile::tempdir().unwrap();
        let empty = Store::open(other.path(), &crate::state::StoreOptions::default()).unwrap();
        let lookup = StoreLookup::cached(&empty, &cache);
        assert_eq!(lookup.linked_user(&email).as_deref(), Some("u1"));
        assert_eq!(lookup.linked_user(&phone).as_deref(), Some("u2"));
        assert_eq!(StoreLookup::new(&empty).linked_user(&email), None);
        // Bounded: full, it starts over.
        for i in 0..LinkCache::MAX {
            cache.insert(format!("k:{i}"), "u".into());
        }
        assert!(cache.len() <= LinkCache::MAX);
        assert!(!cache.is_empty());
    }

    #[test]
    fn quotas_share_a_budget_by_backlog() {
        // Everything fits: each reads its backlog (plus one, to see its end).
        assert_eq!(quotas(&[10, 0, 300], 4096, 4096), [11, 1, 301]);
        // A big backlog on many partitions: about the budget in all.
        let q = quotas(&[100_000; 24], 16_384, 4096);
        assert!(q.iter().all(|x| *x == 682), "{q:?}");
        // Shares follow the backlogs, with a floor and a ceiling.
        assert_eq!(quotas(&[1_000_000, 1_000, 10], 8192, 4096), [4096, 256, 11]);
        // An end offset behind the position reads nothing (one, to see it).
        assert_eq!(quotas(&[-5], 100, 100), [1]);
        // Never more than `max` from one partition.
        assert_eq!(quotas(&[4096, 4095], 100_000, 4096), [4096, 4096]);
    }
}
