//! Materializing stage: records log -> per-user state -> snapshots.
//!
//! A batch loads every user it touches once, folds the records into their
//! states (`state::apply`), and publishes at most one snapshot per user per
//! batch (coalescing), only if the visible content changed. A user published
//! less than `min_interval` ago is held instead: its state is written, and
//! one snapshot of everything since is published when the interval ends
//! (`release`); meanwhile the last published snapshot is stored with the
//! hold (`keys::part_held`), so `GET /context` keeps serving what consumers
//! have and a restart still publishes the held change. A settings record
//! re-publishes every user of its partition whose context changes. Records
//! the routing stage re-sent after a crash are skipped by input offset, so
//! each input record is applied once.

use super::deadletter::dead_letter;
use super::{count_topic, PipelineError, SnapshotFormat, Topics};
use crate::ingest::{ErrorCode, Rejection};
use crate::log::{LogRecord, OutRecord, Payload};
use crate::model::{record, ContextSnapshot, Record, Settings, SnapshotMark};
use crate::snapshot;
use crate::state::apply::{self, ApplyLimits, CatalogDelta, Outcome};
use crate::state::cache::UserCache;
use crate::state::keys::{self, CF_IDENT, CF_META, CF_PART};
use crate::state::store::StoreBodies;
use crate::state::FastMap;
use crate::state::Store;
use prost::Message;
use rocksdb::WriteBatch;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct MaterializerOptions {
    pub limits: ApplyLimits,
    pub max_events: usize,
    /// Largest snapshot (`snapshot.max_bytes`).
    pub max_bytes: usize,
    pub format: SnapshotFormat,
    /// Publish snapshots (false during rebuild: versions are kept, nothing re-sent).
    pub publish: bool,
    /// Memory for decoded states of recently touched users (`UserCache`).
    pub user_cache_bytes: usize,
    /// Shortest time between two snapshots of one user (0: every batch).
    pub min_interval: Duration,
}

pub struct Materializer {
    pub topics: Topics,
    pub opts: MaterializerOptions,
    /// Settings in effect per partition (cache of `part/{p}/s`).
    settings: HashMap<u32, Arc<Settings>>,
    /// Users' states as this stage last wrote them.
    cache: UserCache,
    /// Users published less than `min_interval` ago: when, and that
    /// snapshot (protobuf), stored with a hold if one starts.
    recent: HashMap<(u32, String), (Instant, Payload)>,
    last_pruned: Instant,
    /// Whether `publish` fills `recent`: for snapshots of records and
    /// releases, not for the settling or re-publishing of a whole partition.
    remember: bool,
    /// Users whose next snapshot is held back, written with the state.
    held: HashMap<(u32, String), Held>,
    /// Snapshots (count, bytes) published since the metrics last counted
    /// them (`count_published`: once per batch, not per snapshot).
    published_uncounted: (u64, u64),
    /// Identifier keys known to be linked (in the store, or in a batch
    /// this stage produced): a record's links are looked up in the store
    /// only when not here. Links are only ever added, so an entry stays
    /// true; a failed commit clears it (`forget_all`), and it is cleared
    /// whenever it reaches `LINKED_MAX` entries.
    linked: HashSet<String>,
    /// The size of the last batch's write batch: the next one reserves
    /// that much at once instead of growing by doubling (every step a
    /// copy of what it holds, into fresh memory).
    batch_bytes: usize,
    /// Per partition, the records-log offset below which this stage sends
    /// no dead letters: a rebuild replays records its data dir processed
    /// before, and their dead letters were sent then.
    quiet_below: HashMap<u32, i64>,
}

/// Identifier keys `Materializer::linked` holds at most (a few MiB).
const LINKED_MAX: usize = 32_768;

struct Held {
    /// When the snapshot is published.
    due: Instant,
    /// Its `updated_at` so far (0: taken from the state).
    at_ns: i64,
}

/// What a materialized batch produces.
pub struct Materialized {
    pub batch: WriteBatch,
    /// Snapshots and dead letters to publish.
    pub out: Vec<OutRecord>,
    /// Snapshots published.
    pub published: usize,
    pub applied: usize,
    /// Log times of the records applied (input timestamps), for
    /// `observe_latency` once the batch is committed.
    pub log_times_ns: Vec<i64>,
}

/// Records, per record applied, the time from its input timestamp (the
/// HTTP append in embedded mode, the Kafka record's timestamp in Kafka
/// mode) to now, when its batch is committed: `contextd_record_latency_seconds`
/// (as Kafka Streams' record end-to-end latency; during a catch-up it
/// includes how far behind the stage was).
pub fn observe_latency(log_times_ns: &[i64]) {
    if log_times_ns.is_empty() {
        return;
    }
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    let h = metrics::histogram!("contextd_record_latency_seconds");
    for t in log_times_ns {
        h.record(now.saturating_sub(*t).max(0) as f64 / 1e9);
    }
}

struct Touched {
    state: apply::Working,
    last_log_ns: i64,
    /// The user was in the cache or the store before this batch.
    existed: bool,
    /// A record of this batch was applied to it (or was a duplicate).
    applied: bool,
}

impl Materializer {
    pub fn new(topics: Topics, opts: MaterializerOptions) -> Materializer {
        Materializer {
            topics,
            opts,
            settings: HashMap::new(),
            cache: UserCache::new(opts.user_cache_bytes),
            recent: HashMap::new(),
            last_pruned: Instant::now(),
            remember: false,
            held: HashMap::new(),
            linked: HashSet::new(),
            published_uncounted: (0, 0),
            batch_bytes: 0,
            quiet_below: HashMap::new(),
        }
    }

    /// Sends no dead letters for records of partition `p` below `offset`
    /// (their first processing sent them).
    pub fn quiet_dead_letters_below(&mut self, p: u32, offset: i64) {
        self.quiet_below.insert(p, offset);
    }

    /// Whether a dead letter for the records-log entry `offset` of `p` was
    /// sent when it was first processed.
    fn sent_before(&self, p: u32, offset: i64) -> bool {
        self.quiet_below
            .get(&p)
            .is_some_and(|below| offset < *below)
    }

    /// Adds the snapshots published since the last call to the metrics.
    pub fn count_published(&mut self) {
        let (n, bytes) = std::mem::take(&mut self.published_uncounted);
        if n > 0 {
            metrics::counter!("contextd_snapshots_published_total").increment(n);
            metrics::counter!("contextd_snapshot_bytes_total").increment(bytes);
        }
    }

    /// When the next held snapshot is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.values().map(|h| h.due).min()
    }

    /// After a start: the users of partition `p` held when the last run
    /// stopped are published by the next `release`.
    pub fn resume_held(&mut self, store: &Store, p: u32) -> Result<(), PipelineError> {
        let now = Instant::now();
        for uid in store.held_users(p)? {
            self.held.insert((p, uid), Held { due: now, at_ns: 0 });
        }
        Ok(())
    }

    /// Forget cached per-partition data (after a revoke or a rebuild, or
    /// before users of `p` are written by another path).
    pub fn forget(&mut self, p: u32) {
        self.settings.remove(&p);
        self.cache.forget_partition(p);
        self.recent.retain(|(q, _), _| *q != p);
        self.held.retain(|(q, _), _| *q != p);
    }

    /// Forget every cached user (after a failed commit: the cache would be
    /// ahead of the store).
    pub fn forget_all(&mut self) {
        self.settings.clear();
        self.cache.clear();
        self.linked.clear();
        // Snapshots of the failed batch were not published; holds are kept
        // (releasing a user whose hold was not written only publishes it).
        self.recent.clear();
    }

    pub fn settings(&mut self, store: &Store, p: u32) -> Result<Arc<Settings>, PipelineError> {
        if let Some(s) = self.settings.get(&p) {
            return Ok(s.clone());
        }
        let s = Arc::new(snapshot::prepared(
            store
                .get_settings(CF_PART, &keys::part_settings(p))?
                .unwrap_or_default(),
        ));
        self.settings.insert(p, s.clone());
        Ok(s)
    }

    /// Processes records of the records log (any partitions, in offset order
    /// within each partition). The returned batch must be committed before
    /// the next call, or `forget_all` called (touched users stay cached as
    /// the batch leaves them).
    pub fn process(
        &mut self,
        store: &Store,
        input: &[LogRecord],
    ) -> Result<Materialized, PipelineError> {
        // A little over the last batch's size: a batch like it fits.
        let mut batch = WriteBatch::with_capacity_bytes(self.batch_bytes + self.batch_bytes / 8);
        let mut out = Vec::new();
        let mut positions: BTreeMap<u32, i64> = BTreeMap::new();
        // The last input offset applied per (partition, input partition,
        // input topic), looked up without building a key per record.
        let mut marks: HashMap<(u32, i32), FastMap<String, i64>> = HashMap::new();
        let mut decoded: Vec<(u32, &LogRecord, Record)> = Vec::with_capacity(input.len());
        for rec in input {
            let p = rec.partition as u32;
            positions.insert(p, rec.offset + 1);
            match Record::decode(rec.value.clone()) {
                Ok(r) => decoded.push((p, rec, r)),
                Err(e) => {
                    let err = Rejection::new(
                        ErrorCode::InvalidField,
                        format!("records-log entry cannot be decoded: {e}"),
                    );
                    tracing::error!(partition = p, offset = rec.offset, error = %e, "undecodable records-log entry");
                    if !self.sent_before(p, rec.offset) {
                        out.push(dead_letter(&self.topics.dlq, &err, rec));
                    }
                }
            }
        }
        // Load every user the batch touches in one multi-get.
        let mut wanted: Vec<(u32, &str)> = decoded
            .iter()
            .filter(|(_, _, r)| !matches!(r.body, Some(record::Body::Settings(_))))
            .map(|(p, _, r)| (*p, r.user_id.as_str()))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let loaded = self.load(store, &wanted)?;
        // By partition, then user id: a record finds its user without
        // copying the id.
        let mut users: HashMap<u32, FastMap<String, Touched>> = HashMap::new();
        for ((p, uid), state) in wanted.iter().zip(loaded) {
            let existed = state.is_some();
            users.entry(*p).or_default().insert(
                uid.to_string(),
                Touched {
                    state: state.unwrap_or_else(|| apply::Working::new(apply::new_user(uid))),
                    last_log_ns: 0,
                    existed,
                    applied: false,
                },
            );
        }
        let mut catalogs: BTreeMap<u32, CatalogDelta> = BTreeMap::new();
        let mut settings_changed: HashSet<u32> = HashSet::new();
        let mut links_seen: HashSet<String> = HashSet::new();
        let mut applied = 0;
        let mut applied_by_topic: Vec<(&str, u64)> = Vec::new();
        let mut duplicates = 0u64;
        let mut log_times_ns = Vec::with_capacity(decoded.len());
        for (p, rec, r) in decoded.iter_mut() {
            let p = *p;
            if let Some(inp) = &r.input {
                let by_topic = marks.entry((p, inp.partition)).or_default();
                let mark = match by_topic.get_mut(inp.topic.as_str()) {
                    Some(m) => m,
                    None => {
                        let mk = keys::part_input_mark(p, &inp.topic, inp.partition);
                        let stored = store.get_i64(CF_PART, &mk)?.unwrap_or(-1);
                        by_topic.entry(inp.topic.clone()).or_insert(stored)
                    }
                };
                if inp.offset <= *mark {
                    metrics::counter!("contextd_records_duplicate_skipped_total").increment(1);
                    continue;
                }
                *mark = inp.offset;
            }
            for link in &r.links {
                let Some(id) = &link.identifier else { continue };
                let k = id.key();
                if self.linked.contains(&k) || links_seen.contains(&k) {
                    continue;
                }
                if store.linked_user(id)?.is_none() {
                    batch.put_cf(store.cf(CF_IDENT), keys::ident(&k), link.user_id.as_bytes());
                }
                links_seen.insert(k);
            }
            if let Some(record::Body::Settings(s)) = &r.body {
                let s = snapshot::prepared(s.clone());
                batch.put_cf(store.cf(CF_PART), keys::part_settings(p), s.encode_to_vec());
                // Settings are broadcast to every partition: the copy of
                // partition 0 is the one kept for the admin API (so stages
                // over different partitions never race on it).
                if p == 0 {
                    self.remember_latest_settings(store, &mut batch, r)?;
                }
                self.settings.insert(p, Arc::new(s));
                settings_changed.insert(p);
                applied += 1;
                log_times_ns.push(r.log_time_ns);
                count_topic(&mut applied_by_topic, &rec.topic);
                continue;
            }
            let t = users
                .get_mut(&p)
                .and_then(|u| u.get_mut(r.user_id.as_str()))
                .expect("loaded above");
            let catalog = catalogs.entry(p).or_default();
            let outcome = apply::apply(&mut t.state, r, self.opts.limits, catalog);
            if matches!(outcome, Outcome::Duplicate) {
                duplicates += 1;
            }
            match outcome {
                Outcome::Applied | Outcome::Duplicate => {
                    applied += 1;
                    log_times_ns.push(r.log_time_ns);
                    t.last_log_ns = t.last_log_ns.max(r.log_time_ns);
                    t.applied = true;
                    count_topic(&mut applied_by_topic, &rec.topic);
                }
                Outcome::Rejected(_) if self.sent_before(p, rec.offset) => {}
                Outcome::Rejected(err) => {
                    let inp = r.input.clone().unwrap_or_default();
                    let src = LogRecord {
                        topic: inp.topic,
                        partition: inp.partition,
                        offset: inp.offset,
                        timestamp_ms: r.log_time_ns / 1_000_000,
                        key: r.input_key.clone(),
                        value: std::mem::take(&mut r.input_value).into(),
                    };
                    out.push(dead_letter(&self.topics.dlq, &err, &src));
                }
            }
        }
        let mut published = 0;
        let mut created: BTreeMap<u32, i64> = BTreeMap::new();
        let mut touched: Vec<((u32, String), Touched)> = users
            .into_iter()
            .flat_map(|(p, u)| u.into_iter().map(move |(uid, t)| ((p, uid), t)))
            .collect();
        touched.sort_by(|a, b| a.0.cmp(&b.0));
        let now = Instant::now();
        self.prune_recent(now);
        self.remember = self.opts.publish && !self.opts.min_interval.is_zero();
        for ((p, uid), mut t) in touched {
            // A user whose every record was rejected (a `patch` or `delete`
            // naming a user that does not exist: `not_found`) is not created:
            // nothing stored, nothing published, and the API answers 404.
            if !t.existed && !t.applied {
                continue;
            }
            if !t.existed {
                *created.entry(p).or_default() += 1;
            }
            let changes = t.state.end_batch();
            let new_bodies = changes.new_bodies;
            let state = &mut t.state.state;
            // Only what changed is written: the events stored (one key each,
            // properties included) and dropped (and the properties of older
            // ones kept apart), and the user's value without its timeline.
            store.put_timeline_ops(&mut batch, p, &state.user_id, &changes.timeline_ops);
            let cf = store.cf(keys::CF_BODIES);
            for id in &changes.dropped_bodies {
                batch.delete_cf(cf, keys::body(p, &state.user_id, id));
            }
            // Without publishing (rebuild), snapshot versions are settled
            // after the replay (replay::settle_partition).
            if self.opts.publish {
                // The latest log time applied, never before the last
                // snapshot's: in Kafka mode records of one user can arrive
                // out of log-time order across batches (other topics).
                let mut at = t.last_log_ns.max(state.snapshot_updated_at_ns);
                if !self.hold(store, &mut batch, p, &uid, &mut at, now) {
                    let settings = self.settings(store, p)?;
                    if self.snapshot_if_changed(
                        store,
                        &mut batch,
                        &mut out,
                        p,
                        &settings,
                        state,
                        at,
                        Some(&new_bodies),
                        &mut t.state.shown_events,
                    ) {
                        published += 1;
                    }
                }
            }
            self.write_back(store, &mut batch, p, t.state);
        }
        self.remember = false;
        if self.opts.publish {
            for p in settings_changed {
                self.republish_partition(store, &mut batch, &mut out, &mut published, p, &decoded)?;
            }
            published += self.release_into(store, &mut batch, &mut out, now, false)?;
        }
        for (p, delta) in &catalogs {
            store.merge_catalog(&mut batch, *p, delta)?;
        }
        for (p, n) in created {
            // The count is written with the users it counts; one stage
            // writes a partition at a time.
            let before = match store.user_count(p)? {
                Some(c) => c,
                None => store.count_users(p)?,
            };
            store.put_i64(&mut batch, CF_PART, &keys::part_users(p), before + n);
        }
        for ((p, input_partition), by_topic) in marks {
            for (topic, off) in by_topic {
                let mk = keys::part_input_mark(p, &topic, input_partition);
                store.put_i64(&mut batch, CF_PART, &mk, off);
            }
        }
        for (p, next) in positions {
            store.put_i64(&mut batch, CF_PART, &keys::part_offset(p), next);
        }
        for (topic, n) in applied_by_topic {
            metrics::counter!("contextd_records_applied_total", "topic" => topic.to_string())
                .increment(n);
        }
        self.count_published();
        if duplicates > 0 {
            metrics::counter!("contextd_events_deduplicated_total").increment(duplicates);
        }
        if self.linked.len() + links_seen.len() > LINKED_MAX {
            self.linked.clear();
        }
        self.linked.extend(links_seen);
        self.batch_bytes = batch.size_in_bytes();
        Ok(Materialized {
            batch,
            out,
            published,
            applied,
            log_times_ns,
        })
    }

    /// The states of the users `wanted`: from the cache, the others in one
    /// multi-get (None: not in the store).
    fn load(
        &mut self,
        store: &Store,
        wanted: &[(u32, &str)],
    ) -> Result<Vec<Option<apply::Working>>, PipelineError> {
        let mut states = Vec::with_capacity(wanted.len());
        let mut misses = Vec::new();
        for (i, (p, uid)) in wanted.iter().enumerate() {
            let cached = self.cache.take(*p, uid);
            if cached.is_none() {
                misses.push(i);
            }
            states.push(cached);
        }
        let ids: Vec<(u32, &str)> = misses.iter().map(|i| wanted[*i]).collect();
        for (i, st) in misses
            .iter()
            .zip(store.get_users(&ids, self.opts.max_events)?)
        {
            states[*i] = st.map(apply::Working::new);
        }
        metrics::counter!("contextd_user_cache_hits_total")
            .increment((wanted.len() - misses.len()) as u64);
        metrics::counter!("contextd_user_cache_misses_total").increment(misses.len() as u64);
        Ok(states)
    }

    /// Publishes the held snapshots that are due (every held one if `all`)
    /// as a batch of their own: for a stage with no records to process.
    pub fn release(&mut self, store: &Store, all: bool) -> Result<Materialized, PipelineError> {
        let mut batch = WriteBatch::default();
        let mut out = Vec::new();
        let published = self.release_into(store, &mut batch, &mut out, Instant::now(), all)?;
        self.count_published();
        Ok(Materialized {
            batch,
            out,
            published,
            applied: 0,
            log_times_ns: Vec::new(),
        })
    }

    /// Whether the snapshot of a user this batch changed is held back: it
    /// is held already and not due, or it was published less than
    /// `min_interval` ago (a hold starts, stored with that snapshot). A due
    /// hold ends here (`at_ns`: the latest of the batches it covered).
    fn hold(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        p: u32,
        uid: &str,
        at_ns: &mut i64,
        now: Instant,
    ) -> bool {
        if self.held.is_empty() && self.recent.is_empty() {
            return false;
        }
        let key = (p, uid.to_string());
        if let Some(h) = self.held.get_mut(&key) {
            if now < h.due {
                h.at_ns = h.at_ns.max(*at_ns);
                return true;
            }
            *at_ns = (*at_ns).max(h.at_ns);
            self.held.remove(&key);
            batch.delete_cf(store.cf(CF_PART), keys::part_held(p, uid));
            return false;
        }
        match self.recent.get(&key) {
            Some((when, snap)) if now.duration_since(*when) < self.opts.min_interval => {
                batch.put_cf(store.cf(CF_PART), keys::part_held(p, uid), snap.to_vec());
                let due = *when + self.opts.min_interval;
                self.held.insert(key, Held { due, at_ns: *at_ns });
                metrics::counter!("contextd_snapshots_held_total").increment(1);
                true
            }
            _ => false,
        }
    }

    /// Forgets publications older than `min_interval` (at most once per interval).
    fn prune_recent(&mut self, now: Instant) {
        if now.duration_since(self.last_pruned) >= self.opts.min_interval {
            let keep = self.opts.min_interval;
            self.recent
                .retain(|_, (when, _)| now.duration_since(*when) < keep);
            self.last_pruned = now;
        }
    }

    /// Ends the due holds (every hold if `all`): one snapshot each, if the
    /// visible content changed since the last one published.
    fn release_into(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        out: &mut Vec<OutRecord>,
        now: Instant,
        all: bool,
    ) -> Result<usize, PipelineError> {
        let mut due: Vec<(u32, String)> = self
            .held
            .iter()
            .filter(|(_, h)| all || h.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        due.sort_unstable();
        self.remember = !self.opts.min_interval.is_zero();
        let result = self.release_users(store, batch, out, due);
        self.remember = false;
        result
    }

    fn release_users(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        out: &mut Vec<OutRecord>,
        due: Vec<(u32, String)>,
    ) -> Result<usize, PipelineError> {
        let ids: Vec<(u32, &str)> = due.iter().map(|(p, u)| (*p, u.as_str())).collect();
        let states = self.load(store, &ids)?;
        let mut published = 0;
        for ((p, uid), w) in due.into_iter().zip(states) {
            let h = self.held.remove(&(p, uid.clone())).expect("due");
            batch.delete_cf(store.cf(CF_PART), keys::part_held(p, &uid));
            let Some(mut w) = w else { continue };
            w.end_batch();
            let settings = self.settings(store, p)?;
            let at = if h.at_ns > 0 {
                h.at_ns
            } else {
                latest_change_ns(&w.state)
            };
            if self.snapshot_if_changed(
                store,
                batch,
                out,
                p,
                &settings,
                &mut w.state,
                at,
                None,
                &mut w.shown_events,
            ) {
                published += 1;
            }
            self.write_back(store, batch, p, w);
        }
        Ok(published)
    }

    /// A cached user, taken out of the cache (`write_back` returns it).
    pub fn take_cached(&mut self, p: u32, user_id: &str) -> Option<apply::Working> {
        self.cache.take(p, user_id)
    }

    /// Writes a user's state (without its timeline) and keeps it cached.
    pub fn write_back(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        p: u32,
        mut w: apply::Working,
    ) {
        let len = store.put_user(batch, p, &mut w.state);
        w.shed_properties();
        w.resume();
        self.cache.put(p, w, len);
    }

    /// Publishes a new snapshot of `state` if its visible context changed
    /// since the last one; true if it did. Its `updated_at` is `at_ns`,
    /// never before the last snapshot's (a settings record can be applied
    /// after records of a later log time). `pending`: properties of events
    /// not in the store yet (this batch's); `shown`: the last snapshot's
    /// encoded events, replaced by this one's.
    #[allow(clippy::too_many_arguments)]
    pub fn snapshot_if_changed(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        out: &mut Vec<OutRecord>,
        p: u32,
        settings: &Arc<Settings>,
        state: &mut crate::model::UserState,
        at_ns: i64,
        pending: Option<&crate::state::FastMap<String, bytes::Bytes>>,
        shown: &mut snapshot::EncodedEvents,
    ) -> bool {
        let at_ns = at_ns.max(state.snapshot_updated_at_ns);
        let uid = state.user_id.clone();
        let bodies = StoreBodies {
            store,
            partition: p,
            user_id: &uid,
            pending,
        };
        match snapshot::next_snapshot(
            state,
            settings,
            self.opts.max_events,
            snapshot::SizeLimit {
                bytes: self.opts.max_bytes,
                json: self.opts.format == SnapshotFormat::Json,
            },
            at_ns,
            shown,
            &bodies,
        ) {
            Some(snap) => {
                self.publish(store, batch, out, p, state, snap);
                if shown.cut() {
                    metrics::counter!("contextd_snapshots_cut_total").increment(1);
                }
                true
            }
            None => false,
        }
    }

    /// Marks the user's latest snapshot (version, content hash) in the state
    /// and queues the snapshot (`encoded`: protobuf) for the snapshots topic.
    /// The snapshot itself is not stored twice: `Store::context` rebuilds it
    /// from the state.
    pub fn publish(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        out: &mut Vec<OutRecord>,
        p: u32,
        state: &crate::model::UserState,
        encoded: Payload,
    ) {
        let updated_at = crate::model::time::to_timestamp(state.snapshot_updated_at_ns);
        store.put_mark(
            batch,
            p,
            &SnapshotMark {
                user_id: state.user_id.clone(),
                version: state.snapshot_version,
                updated_at: Some(updated_at),
                content_hash: state.snapshot_hash.clone(),
            },
        );
        if self.remember {
            // What a hold starting within the interval stores (and serves).
            self.recent.insert(
                (p, state.user_id.clone()),
                (Instant::now(), encoded.clone()),
            );
        } else if !self.recent.is_empty() {
            // Not kept (a whole partition is published): an older one must
            // not be taken for the last snapshot.
            self.recent.remove(&(p, state.user_id.clone()));
        }
        let value = match self.opts.format {
            SnapshotFormat::Protobuf => encoded,
            SnapshotFormat::Json => {
                let snap = ContextSnapshot::decode(&*encoded.contiguous()).expect("own encoding");
                snapshot::json_bytes(&snap, self.opts.max_bytes).into()
            }
        };
        self.published_uncounted.0 += 1;
        self.published_uncounted.1 += value.len() as u64;
        out.push(OutRecord {
            topic: self.topics.snapshots.clone(),
            partition: Some(p as i32),
            key: Some(state.user_id.as_bytes().to_vec()),
            value,
            timestamp_ms: state.snapshot_updated_at_ns / 1_000_000,
        });
    }

    /// The admin API shows the latest settings any partition applied.
    fn remember_latest_settings(
        &self,
        store: &Store,
        batch: &mut WriteBatch,
        r: &Record,
    ) -> Result<(), PipelineError> {
        let newer = match store.get_raw(CF_META, keys::META_SETTINGS)? {
            Some(v) => {
                Record::decode(&v[..])
                    .ok()
                    .and_then(|old| old.input)
                    .map(|i| i.offset)
                    < r.input.as_ref().map(|i| i.offset)
            }
            None => true,
        };
        if newer {
            batch.put_cf(store.cf(CF_META), keys::META_SETTINGS, r.encode_to_vec());
        }
        Ok(())
    }

    /// After a settings change: every user of partition `p` not touched by
    /// this batch gets a new snapshot if its visible context changed.
    fn republish_partition(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        out: &mut Vec<OutRecord>,
        published: &mut usize,
        p: u32,
        decoded: &[(u32, &LogRecord, Record)],
    ) -> Result<(), PipelineError> {
        // Users of `p` are written below from the store's pages.
        self.cache.forget_partition(p);
        let settings = self.settings(store, p)?;
        let in_batch: HashSet<&str> = decoded
            .iter()
            .filter(|(q, _, _)| *q == p)
            .map(|(_, _, r)| r.user_id.as_str())
            .collect();
        let at = decoded
            .iter()
            .filter(|(q, _, r)| *q == p && matches!(r.body, Some(record::Body::Settings(_))))
            .map(|(_, _, r)| r.log_time_ns)
            .max()
            .unwrap_or(0);
        let mut after: Option<String> = None;
        loop {
            let page = store.users_page(p, after.as_deref(), 1024)?;
            let Some(last) = page.last() else { break };
            after = Some(last.user_id.clone());
            for mut st in page {
                if in_batch.contains(st.user_id.as_str()) {
                    continue;
                }
                // A held snapshot is published now, with the new settings.
                if self.held.remove(&(p, st.user_id.clone())).is_some() {
                    batch.delete_cf(store.cf(CF_PART), keys::part_held(p, &st.user_id));
                }
                if self.snapshot_if_changed(
                    store,
                    batch,
                    out,
                    p,
                    &settings,
                    &mut st,
                    at,
                    None,
                    &mut Default::default(),
                ) {
                    *published += 1;
                    store.put_user(batch, p, &mut st);
                }
            }
        }
        Ok(())
    }
}

/// The latest change a state records (its events' and profiles' receipt,
/// or its last snapshot): the `updated_at` of a snapshot published without
/// the batch that caused it at hand.
pub fn latest_change_ns(st: &crate::model::UserState) -> i64 {
    st.timeline
        .iter()
        .map(|e| e.received_at_ns)
        .chain(st.profiles.iter().map(|x| x.updated_at_ns))
        .max()
        .unwrap_or(0)
        .max(st.snapshot_updated_at_ns)
}

/// Records-log entries for tests of the materializing stage, here and in
/// Kafka mode's.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::log::LogRecord;
    use crate::model::{record, EventRecord, Record, Settings, StoredEvent, TypeRef};
    use prost::Message;

    /// A records-log entry of `partition` at `offset` (the stage reads the
    /// user from the record, not the key).
    pub fn entry(partition: i32, offset: i64, r: &Record) -> LogRecord {
        LogRecord {
            topic: "context.records".into(),
            partition,
            offset,
            timestamp_ms: 0,
            key: None,
            value: r.encode_to_vec().into(),
        }
    }

    /// Settings that show custom events of type (`shop`, `order`) only.
    pub fn shop_orders_shown() -> Record {
        Record {
            body: Some(record::Body::Settings(Settings {
                events_api: true,
                shown_event_types: vec![TypeRef {
                    source: "shop".into(),
                    r#type: "order".into(),
                }],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// The `i`th event of user `u`: a `shop` event of type `ty`, id `e{i}`,
    /// logged at 1,000 + `i` ns, with `properties`.
    pub fn shop_event(
        i: i64,
        ty: &str,
        created_at_ns: i64,
        properties: &serde_json::Value,
    ) -> Record {
        Record {
            user_id: "u".into(),
            log_time_ns: 1_000 + i,
            body: Some(record::Body::Event(EventRecord {
                event: Some(StoredEvent {
                    id: format!("e{i}"),
                    source: "shop".into(),
                    r#type: ty.into(),
                    created_at_ns,
                    received_at_ns: 1_000 + i,
                    properties: crate::model::json::encode_struct(
                        &properties.as_object().expect("an object").into(),
                    )
                    .into(),
                    ..Default::default()
                }),
                profile: None,
            })),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{shop_event, shop_orders_shown};
    use super::*;
    use crate::model::{Identifier, IdentityLink};
    use crate::state::StoreOptions;

    /// A publishing stage with the default configuration on a fresh store.
    fn fresh() -> (
        tempfile::TempDir,
        Store,
        Materializer,
        crate::config::Config,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let c = crate::config::Config::default();
        let mat = Materializer::new(c.topics.clone(), crate::app::materializer_options(&c, true));
        (dir, store, mat, c)
    }

    /// A records-log entry of partition 0 at `offset`.
    fn entry(offset: i64, r: Record) -> LogRecord {
        super::fixtures::entry(0, offset, &r)
    }

    fn linking(offset: i64, user: &str) -> LogRecord {
        let r = Record {
            user_id: user.into(),
            links: vec![IdentityLink {
                identifier: Some(email()),
                user_id: user.into(),
            }],
            ..Default::default()
        };
        entry(offset, r)
    }

    fn email() -> Identifier {
        Identifier {
            r#type: "email".into(),
            value: "a@example.com".into(),
        }
    }

    /// A user the cache no longer holds is loaded with its newest events'
    /// properties; its snapshots are byte for byte those of a stage that
    /// kept it cached (and reused its last snapshot's encoded events).
    #[test]
    fn a_user_loaded_again_publishes_what_a_cached_one_does() {
        let mut c = crate::config::Config::default();
        c.snapshot.max_events = 3;
        c.timeline.max_events_per_user = 6;
        let settings = shop_orders_shown();
        let event = |i: i64, ty: &str| {
            // Out of order now and then: an older event lands among the
            // shown ones.
            let at = if i % 4 == 3 { i * 10 - 25 } else { i * 10 };
            shop_event(
                i,
                ty,
                at,
                &serde_json::json!({ "n": i, "pad": "x".repeat(i as usize) }),
            )
        };
        let mut batches = vec![vec![settings]];
        for b in 0..6 {
            batches.push(
                (0..3)
                    .map(|j| event(b * 3 + j, if j == 1 { "note" } else { "order" }))
                    .collect(),
            );
        }
        let run = |cache_mb: usize| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut c = c.clone();
            c.storage.user_cache_mb = cache_mb;
            let mut mat =
                Materializer::new(c.topics.clone(), crate::app::materializer_options(&c, true));
            let mut offset = 0;
            let mut published = Vec::new();
            for b in &batches {
                let input: Vec<LogRecord> = b
                    .iter()
                    .map(|r| {
                        offset += 1;
                        entry(offset, r.clone())
                    })
                    .collect();
                let m = mat.process(&store, &input).unwrap();
                store.write(m.batch).unwrap();
                published.extend(m.out.into_iter().map(|o| o.value.to_vec()));
            }
            (published, mat.cache.len())
        };
        let (cached, held) = run(16);
        let (loaded, none) = run(0);
        assert_eq!(
            (held, none),
            (1, 0),
            "one stage cached the user, the other never"
        );
        assert_eq!(cached.len(), 6, "a snapshot per batch");
        assert_eq!(loaded, cached);
    }

    /// Settings applied after a user's records of a later log time (Kafka
    /// orders nothing across topics) re-publish the user without moving
    /// its `updated_at` back.
    #[test]
    fn a_settings_change_never_moves_updated_at_back() {
        use crate::model::{record, ContextSnapshot, EventRecord, Settings, StoredEvent, TypeRef};
        let (_dir, store, mut mat, _) = fresh();
        let shown = |ty: &str| Record {
            log_time_ns: 1_000,
            body: Some(record::Body::Settings(Settings {
                events_api: true,
                shown_event_types: vec![TypeRef {
                    source: "shop".into(),
                    r#type: ty.into(),
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        let event = Record {
            user_id: "u".into(),
            log_time_ns: 5_000,
            body: Some(record::Body::Event(EventRecord {
                event: Some(StoredEvent {
                    id: "e".into(),
                    source: "shop".into(),
                    r#type: "order".into(),
                    received_at_ns: 5_000,
                    ..Default::default()
                }),
                profile: None,
            })),
            ..Default::default()
        };
        let mut updated = Vec::new();
        for (i, r) in [shown("order"), event, shown("none")]
            .into_iter()
            .enumerate()
        {
            let m = mat.process(&store, &[entry(i as i64, r)]).unwrap();
            store.write(m.batch).unwrap();
            for o in m.out {
                let s = ContextSnapshot::decode(&o.value.to_vec()[..]).unwrap();
                updated.push((
                    s.events.len(),
                    crate::model::time::from_timestamp(&s.updated_at),
                ));
            }
        }
        assert_eq!(updated, [(1, 5_000), (0, 5_000)]);
    }

    /// A `patch` or `delete` naming a user that does not exist is dead-
    /// lettered `not_found` and creates nothing: no user state, no
    /// snapshot (which would have had no content and `updated_at` 1970).
    /// A rejected operation on an existing user publishes nothing either.
    #[test]
    fn a_rejected_profile_operation_creates_no_user_and_publishes_nothing() {
        use crate::model::{record, InputRef, ProfileOp, ProfileOpKind, Settings, TypeRef};
        let (_dir, store, mut mat, c) = fresh();
        let op = |kind: ProfileOpKind, user: &str, ty: &str| Record {
            user_id: user.into(),
            log_time_ns: 7_000,
            input: Some(InputRef {
                topic: "sunshine.profiles".into(),
                partition: 0,
                offset: 0,
            }),
            input_value: br#"{"op":"patch"}"#.to_vec(),
            body: Some(record::Body::ProfileOp(ProfileOp {
                op: kind as i32,
                source: "shop".into(),
                r#type: ty.into(),
                attributes: Some(Default::default()),
                ..Default::default()
            })),
            ..Default::default()
        };
        let with_offset = |mut r: Record, offset: i64| {
            if let Some(i) = r.input.as_mut() {
                i.offset = offset;
            }
            r
        };
        let settings = Record {
            body: Some(record::Body::Settings(Settings {
                profiles_api: true,
                shown_profile_types: vec![TypeRef {
                    source: "shop".into(),
                    r#type: "customer".into(),
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        let batches = [
            vec![settings],
            // Unknown users, alone and twice in one batch.
            vec![with_offset(
                op(ProfileOpKind::Patch, "ghost", "customer"),
                1,
            )],
            vec![
                with_offset(op(ProfileOpKind::Delete, "ghost", "customer"), 2),
                with_offset(op(ProfileOpKind::Patch, "ghost", "member"), 3),
            ],
            // An existing user: its put publishes, a rejected patch of a
            // type it lacks does not.
            vec![with_offset(op(ProfileOpKind::Put, "u", "customer"), 4)],
            vec![with_offset(op(ProfileOpKind::Patch, "u", "member"), 5)],
        ];
        let mut outs = Vec::new();
        for (i, b) in batches.into_iter().enumerate() {
            let input: Vec<LogRecord> = b.into_iter().map(|r| entry(i as i64, r)).collect();
            let m = mat.process(&store, &input).unwrap();
            store.write(m.batch).unwrap();
            outs.push(
                m.out
                    .iter()
                    .map(|o| (o.topic.clone(), o.key.clone()))
                    .collect::<Vec<_>>(),
            );
        }
        let dlq = |n: usize| vec![(c.topics.dlq.clone(), None); n];
        let snapshot = (c.topics.snapshots.clone(), Some(b"u".to_vec()));
        assert_eq!(
            outs,
            [vec![], dlq(1), dlq(2), vec![snapshot], dlq(1)],
            "dead letters, and one snapshot: the put's"
        );
        assert!(store.get_user(0, "ghost").unwrap().is_none());
        assert!(store.get_user(0, "u").unwrap().is_some());
        // The users counted as they are created (`contextd_users`) are the
        // users stored.
        assert_eq!(store.user_count(0).unwrap(), Some(1));
        assert_eq!(store.count_users(0).unwrap(), 1);
        assert_eq!(store.count_users(1).unwrap(), 0);
    }

    #[test]
    fn links_are_written_again_after_a_failed_commit_and_never_replaced() {
        let (_dir, store, mut mat, c) = fresh();
        // A batch whose commit failed: dropped, and the stage told so.
        let _ = mat.process(&store, &[linking(0, "u1")]).unwrap();
        mat.forget_all();
        let m = mat.process(&store, &[linking(0, "u1")]).unwrap();
        store.write(m.batch).unwrap();
        assert_eq!(store.linked_user(&email()).unwrap().as_deref(), Some("u1"));
        // A link already made stays, from the store or from what the stage
        // remembers of its own batches.
        let m = mat.process(&store, &[linking(1, "u2")]).unwrap();
        store.write(m.batch).unwrap();
        let mut other =
            Materializer::new(c.topics.clone(), crate::app::materializer_options(&c, true));
        let m = other.process(&store, &[linking(2, "u3")]).unwrap();
        store.write(m.batch).unwrap();
        assert_eq!(store.linked_user(&email()).unwrap().as_deref(), Some("u1"));
    }
}
