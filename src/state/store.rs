//! The RocksDB store: one database per data dir, column families for the
//! materialized state, identities, positions and the embedded topics' ends. Every stage
//! commits its state change and the offsets it consumed in one `WriteBatch`.

use super::apply::{merge_catalog, CatalogDelta, TypeKind};
use super::keys::{self, *};
use crate::model::{
    CatalogEntry, ContextSnapshotBytes, Identifier, Settings, SnapshotMark, StoredEvent, TypeRef,
    UserState,
};
use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store at {path}: {source}; check the data dir is writable and not used by another contextd")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("state store operation failed: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt value in the state store ({what}): {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("{0}")]
    Incompatible(String),
}

/// Memory and durability knobs (bounded so RSS stays predictable).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    pub max_write_buffers: i32,
    /// fsync the WAL on every commit (survives power loss, not only crashes).
    pub sync_writes: bool,
    /// RocksDB's background threads (flushes: a quarter of them, at least one).
    pub background_jobs: i32,
    /// Written by a rebuild, which flushes everything at its end: no
    /// write-ahead log, and every flush atomic across the column families,
    /// so that an interrupted rebuild leaves them all at one point of the
    /// replay, as the log would (an earlier one). `Store::begin_rebuild`
    /// marks the data dir until then.
    pub bulk: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 32 << 20,
            max_write_buffers: 3,
            sync_writes: false,
            background_jobs: 2,
            bulk: false,
        }
    }
}

/// A user's id and stored value (`Store::user_values_page`).
pub type StoredUser = (String, Box<[u8]>);

/// What a rebuild records before it starts (`Store::begin_rebuild`), for
/// one that is run again after it was interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildMark {
    /// A `--from-inputs` rebuild (the records log is then partly re-routed
    /// until one finishes).
    pub from_inputs: bool,
    /// Per partition, how far the live materializing stage had got (its
    /// dead letters below were sent): the interrupted rebuild emptied the
    /// positions this was read from.
    pub processed: Vec<i64>,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    sync_writes: bool,
    /// The data dir (the store lives in its `state` folder).
    dir: PathBuf,
    /// What it was opened with (column families created later use them).
    options: StoreOptions,
    cache: Cache,
}

/// A column family's options; every one shares the block cache.
fn cf_options(o: &StoreOptions, cache: &Cache, name: &str) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_block_cache(cache);
    block.set_bloom_filter(10.0, false);
    block.set_cache_index_and_filter_blocks(true);
    let mut c = Options::default();
    c.set_block_based_table_factory(&block);
    c.set_write_buffer_size(o.write_buffer_bytes);
    c.set_max_write_buffer_number(o.max_write_buffers);
    // Flushes and the first compaction stay uncompressed (most bytes
    // written are read once and soon compacted again); older levels
    // are compressed.
    c.set_compression_per_level(&[
        rocksdb::DBCompressionType::None,
        rocksdb::DBCompressionType::None,
        rocksdb::DBCompressionType::Lz4,
        rocksdb::DBCompressionType::Lz4,
        rocksdb::DBCompressionType::Lz4,
        rocksdb::DBCompressionType::Lz4,
        rocksdb::DBCompressionType::Lz4,
    ]);
    if name == CF_IDENT || name == CF_USERS {
        // Point lookups (every identifier the routing stage resolves, every
        // user not cached) mostly find keys flushed long ago: a bloom
        // filter over the memtable's keys skips searching it for them.
        c.set_memtable_prefix_bloom_ratio(0.05);
        c.set_memtable_whole_key_filtering(true);
    }
    if name == CF_USERS {
        // A user's value is small (the timeline is stored per event)
        // unless it holds many profiles; large ones go to blob files:
        // compaction then moves keys, not the values.
        c.set_enable_blob_files(true);
        c.set_min_blob_size(2048);
        c.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
        c.set_enable_blob_gc(true);
    }
    c
}

/// Options of a write through the write-ahead log, synced (also in a bulk
/// store, whose `Store::write` skips the log).
fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// A column family with at most this many keys is emptied key by key
/// (`Store::drop_column_families`).
const DELETE_KEYS_UP_TO: usize = 4096;

fn decode<M: Message + Default>(bytes: &[u8], what: &'static str) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Decode { what, source })
}

impl Store {
    pub fn open(dir: &Path, o: &StoreOptions) -> Result<Store, StoreError> {
        let path = dir.join("state");
        std::fs::create_dir_all(&path).map_err(|e| {
            StoreError::Incompatible(format!(
                "cannot create the data dir {}: {e}",
                path.display()
            ))
        })?;
        let cache = Cache::new_lru_cache(o.block_cache_bytes);
        let cf_opts = |name: &str| cf_options(o, &cache, name);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(o.background_jobs);
        db_opts.set_db_write_buffer_size(o.write_buffer_bytes * 4);
        db_opts.set_max_total_wal_size(256 << 20);
        // Files made obsolete (by a flush, a compaction, or a column
        // family dropped at a rebuild) are deleted by a background thread,
        // not by whichever thread let go of them last: a rebuild's open
        // no longer unlinks the old tables itself (its median 80 -> 69 ms,
        // BENCHMARKS.md item 79).
        db_opts.set_avoid_unnecessary_blocking_io(true);
        // Compactions run at the lowest CPU priority (nice 19, set by each
        // compaction thread when it next takes a job): on a busy machine
        // they no longer take a core from the pipeline's threads for a
        // second at a time, the half-load tail (BENCHMARKS.md, item 47).
        // Flushes keep theirs: a memtable not flushed in time stalls writes.
        // RocksDB's own backpressure (slower writes past 20 level-0 files)
        // still bounds how far compactions can fall behind.
        let mut env = rocksdb::Env::new().map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        env.lower_thread_pool_cpu_priority();
        db_opts.set_env(&env);
        if o.bulk {
            // A flush is then one job over every column family with data,
            // run on one thread (not two at a time): the final flush takes
            // longer, but the replay writes no log (BENCHMARKS.md item 83).
            db_opts.set_atomic_flush(true);
        }
        let cfs = ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, cf_opts(n)));
        let db =
            DB::open_cf_descriptors(&db_opts, &path, cfs).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Store {
            db: Arc::new(db),
            sync_writes: o.sync_writes,
            dir: dir.to_path_buf(),
            options: o.clone(),
            cache,
        })
    }

    /// Empties the column families `names`. A large one is dropped and
    /// created again: its files are deleted at once. (A range deletion keeps
    /// them until compactions have merged every old key with the
    /// tombstone; during a rebuild those compactions were 14% of the CPU
    /// samples, beside the replay.) A small one (at most
    /// `DELETE_KEYS_UP_TO` keys: the catalog, the partitions' positions)
    /// has its keys deleted instead, in one write: each drop and each
    /// create writes the manifest and writes and parses back an OPTIONS
    /// file of every column family (4–6 ms each here), where a few
    /// hundred tombstones cost nothing. One that holds no key is left as
    /// it is. The small ones go first, synced, and the drops after: a
    /// crash in between leaves positions gone beside state still there
    /// (replayed again), never the reverse. Only for a store not yet
    /// shared (right after `open`).
    pub fn drop_column_families(&mut self, names: &[&str]) -> Result<(), StoreError> {
        let db = Arc::get_mut(&mut self.db).ok_or_else(|| {
            StoreError::Incompatible(
                "column families are dropped before the store is shared".into(),
            )
        })?;
        let mut small = WriteBatch::default();
        let mut large = Vec::new();
        for name in names {
            let cf = db.cf_handle(name).expect("column family created at open");
            // Far more keys by RocksDB's estimate: large, without reading
            // them (the users' values may be in blob files).
            let estimate = db
                .property_int_value_cf(cf, "rocksdb.estimate-num-keys")?
                .unwrap_or(0);
            if estimate > 4 * DELETE_KEYS_UP_TO as u64 {
                large.push(*name);
                continue;
            }
            let mut it = db.raw_iterator_cf(cf);
            it.seek_to_first();
            let mut keys = Vec::new();
            while let Some(k) = it.key() {
                if keys.len() == DELETE_KEYS_UP_TO {
                    break;
                }
                keys.push(Box::<[u8]>::from(k));
                it.next();
            }
            let more = it.valid();
            it.status()?;
            drop(it);
            if more {
                large.push(*name);
            } else {
                for k in keys {
                    small.delete_cf(cf, k);
                }
            }
        }
        if !small.is_empty() {
            db.write_opt(small, &synced())?;
        }
        for name in large {
            db.drop_cf(name)?;
            db.create_cf(name, &cf_options(&self.options, &self.cache, name))?;
        }
        Ok(())
    }

    /// The data dir this store was opened in.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Whether commits are fsynced (`storage.sync_writes`).
    pub fn sync_writes(&self) -> bool {
        self.sync_writes
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        // A bulk store's writes are made durable by its flushes (with
        // `sync_writes` the log's segments are still synced before each
        // write, `EmbeddedLog::commit`).
        wo.set_sync(self.sync_writes && !self.options.bulk);
        wo.disable_wal(self.options.bulk);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// `write` through the write-ahead log and synced, also in a bulk
    /// store: for a change that must hold before what follows it outside
    /// the store (`EmbeddedLog::clear_topic` deletes files next).
    pub fn write_durable(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.db.write_opt(batch, &synced())?;
        Ok(())
    }

    pub fn get_raw(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Records the partition count on first start; refuses a different one later
    /// (state is partitioned by it).
    pub fn check_partitions(&self, partitions: u32) -> Result<(), StoreError> {
        if !self.has_partitions(partitions)? {
            self.db
                .put_cf(self.cf(CF_META), META_PARTITIONS, partitions.to_be_bytes())?;
        }
        Ok(())
    }

    /// Whether the data dir has recorded its partition count, refusing
    /// another one than `partitions`.
    fn has_partitions(&self, partitions: u32) -> Result<bool, StoreError> {
        match self.recorded_partitions()? {
            None => Ok(false),
            Some(had) if had == partitions => Ok(true),
            Some(had) => Err(StoreError::Incompatible(format!(
                "the data dir was created with {had} partitions, not {partitions}; start with --partitions {had} or use a new data dir"
            ))),
        }
    }

    /// The partition count the data dir in `dir` was created with, if it
    /// has a store that recorded one; read without opening the store for
    /// writing (another process may have it open).
    pub fn recorded_partitions_in(dir: &Path) -> Result<Option<u32>, StoreError> {
        let path = dir.join("state");
        if !path.exists() {
            return Ok(None);
        }
        let db = DB::open_cf_for_read_only(&Options::default(), &path, [CF_META], false).map_err(
            |source| StoreError::Open {
                path: path.clone(),
                source,
            },
        )?;
        let cf = db.cf_handle(CF_META).expect("opened with it");
        Ok(db.get_cf(cf, META_PARTITIONS)?.map(|v| partition_count(&v)))
    }

    /// Per partition, the next records-log offset the materializing stage
    /// would apply (0: none applied yet).
    pub fn materialized_ends(&self, partitions: u32) -> Result<Vec<i64>, StoreError> {
        (0..partitions)
            .map(|p| Ok(self.get_i64(CF_PART, &keys::part_offset(p))?.unwrap_or(0)))
            .collect()
    }

    /// The partition count the data dir was created with, if recorded.
    pub fn recorded_partitions(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .get_raw(CF_META, META_PARTITIONS)?
            .map(|v| partition_count(&v)))
    }

    /// `check_partitions` and `check_mode` without recording anything: a
    /// start that can still fail (a broker out of reach) refuses a data
    /// dir of another shape first and records its own only once it runs,
    /// so that a failed first start leaves the data dir to any other.
    pub fn refuse_other(&self, partitions: u32, kafka: bool) -> Result<(), StoreError> {
        self.has_partitions(partitions)?;
        self.has_mode(kafka)?;
        Ok(())
    }

    /// Whether the data dir was created in Kafka mode (`check_mode`).
    pub fn is_kafka_mode(&self) -> Result<bool, StoreError> {
        Ok(self.get_raw(CF_META, META_MODE)?.as_deref() == Some(mode_name(true)))
    }

    /// Records the mode (`kafka` or not) a new data dir is created in, and
    /// refuses one of the other mode: its offsets, outbox and topics mean
    /// nothing there (an embedded `rebuild` of a Kafka-mode data dir would
    /// replay an empty records log and drop its state). Data dirs of
    /// versions that did not record it take the mode they are opened in.
    pub fn check_mode(&self, kafka: bool) -> Result<(), StoreError> {
        if !self.has_mode(kafka)? {
            self.db
                .put_cf(self.cf(CF_META), META_MODE, mode_name(kafka))?;
        }
        Ok(())
    }

    /// Marks the data dir as being rebuilt (durably, before anything is
    /// dropped); `end_rebuild` clears it once the rebuilt state is flushed.
    /// In between the state is incomplete, and starts refuse it
    /// (`refuse_interrupted_rebuild`): a partition's users are settled
    /// against the snapshots published only once it is replayed, so the
    /// live stage could publish versions consumers have already seen.
    pub fn begin_rebuild(&self, mark: &RebuildMark) -> Result<(), StoreError> {
        let mut v = vec![if mark.from_inputs { b'i' } else { b'r' }];
        for end in &mark.processed {
            v.extend_from_slice(&end.to_be_bytes());
        }
        self.db
            .put_cf_opt(self.cf(CF_META), META_REBUILD, v, &synced())?;
        Ok(())
    }

    /// Clears `begin_rebuild`'s mark: the rebuilt state is complete (and
    /// flushed, see `StoreOptions::bulk`).
    pub fn end_rebuild(&self) -> Result<(), StoreError> {
        self.db
            .delete_cf_opt(self.cf(CF_META), META_REBUILD, &synced())?;
        Ok(())
    }

    /// The mark of a rebuild that did not finish, if any.
    pub fn interrupted_rebuild(&self) -> Result<Option<RebuildMark>, StoreError> {
        let Some(v) = self.get_raw(CF_META, META_REBUILD)? else {
            return Ok(None);
        };
        let unreadable =
            || StoreError::Incompatible("the data dir's rebuild mark is unreadable".into());
        let (kind, ends) = v.split_first().ok_or_else(unreadable)?;
        if ends.len() % 8 != 0 || !matches!(kind, b'i' | b'r') {
            return Err(unreadable());
        }
        Ok(Some(RebuildMark {
            from_inputs: *kind == b'i',
            processed: ends
                .chunks_exact(8)
                .map(|c| i64::from_be_bytes(c.try_into().expect("eight bytes")))
                .collect(),
        }))
    }

    /// Refuses a data dir whose last rebuild did not finish, naming the
    /// command to run again.
    pub fn refuse_interrupted_rebuild(&self) -> Result<(), StoreError> {
        let Some(mark) = self.interrupted_rebuild()? else {
            return Ok(());
        };
        let dir = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        Err(StoreError::Incompatible(format!(
            "a rebuild of this data dir was interrupted and its state is incomplete; run `contextd rebuild --data-dir {}{}` again (with the same --config, if it had one)",
            dir.display(),
            if mark.from_inputs { " --from-inputs" } else { "" }
        )))
    }

    /// Whether the data dir has recorded its mode, refusing the other one.
    fn has_mode(&self, kafka: bool) -> Result<bool, StoreError> {
        match self.get_raw(CF_META, META_MODE)? {
            None => Ok(false),
            Some(v) if v == mode_name(kafka) => Ok(true),
            Some(_) if kafka => Err(StoreError::Incompatible(
                "the data dir holds embedded mode's state and topics; run without --brokers, or give Kafka mode another data dir".into(),
            )),
            Some(_) => Err(StoreError::Incompatible(
                "the data dir holds Kafka mode's state (it was run with --brokers); pass --brokers, or use another data dir".into(),
            )),
        }
    }

    pub fn get_i64(&self, cf: &str, key: &[u8]) -> Result<Option<i64>, StoreError> {
        Ok(self
            .get_raw(cf, key)?
            .and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes)))
    }

    pub fn put_i64(&self, batch: &mut WriteBatch, cf: &str, key: &[u8], v: i64) {
        batch.put_cf(self.cf(cf), key, v.to_be_bytes());
    }

    pub fn get_user(&self, p: u32, user_id: &str) -> Result<Option<UserState>, StoreError> {
        let view = self.db.snapshot();
        match view.get_cf(self.cf(CF_USERS), keys::user(p, user_id))? {
            Some(v) => Ok(Some(self.user_from(Some(&view), p, &v, 0)?)),
            None => Ok(None),
        }
    }

    /// A user from its stored value (as iterated), timeline included.
    pub fn user_value(&self, p: u32, value: &[u8]) -> Result<UserState, StoreError> {
        self.user_from(None, p, value, 0)
    }

    /// Decodes a stored user value and reads its timeline (one key per
    /// event), with the properties of its newest `with_properties` events
    /// as well (a snapshot shows the newest events: it then reads none of
    /// them back). Those are read after the timeline, from one seek to the
    /// first of them, instead of one lookup each later.
    fn user_from(
        &self,
        view: Option<&rocksdb::SnapshotWithThreadMode<'_, DB>>,
        p: u32,
        value: &[u8],
        with_properties: usize,
    ) -> Result<UserState, StoreError> {
        let mut s: UserState = decode(value, "user state")?;
        if s.timeline_split {
            let prefix = keys::timeline_prefix(p, &s.user_id);
            let mut end = prefix.clone();
            *end.last_mut().expect("non-empty") = 1;
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(end);
            if let Some(v) = view {
                ro.set_snapshot(v);
            }
            // The raw iterator lends each value where RocksDB holds it
            // (the `Iterator` impl copies every key and value into a new
            // box first: a user loaded again reads up to 1,000 of them).
            let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_TIMELINE), ro);
            it.seek(&prefix);
            while let Some(v) = it.value() {
                s.timeline.push(timeline_event(v)?);
                it.next();
            }
            it.status()?;
            let newest = s.timeline.len().saturating_sub(with_properties);
            if s.timeline[newest..].iter().any(|e| e.body_in_timeline) {
                let first = &s.timeline[newest];
                it.seek(keys::timeline_event(
                    p,
                    &s.user_id,
                    first.created_at_ns,
                    &first.id,
                ));
                // Should a key differ from the one just read (a write in
                // between, without a view), the rest is left to the
                // snapshot's lookup.
                for e in &mut s.timeline[newest..] {
                    let (Some(k), Some(v)) = (it.key(), it.value()) else {
                        break;
                    };
                    if !keys::is_timeline_event(k, prefix.len(), e.created_at_ns, &e.id) {
                        break;
                    }
                    if e.body_in_timeline {
                        e.properties = decode::<TimelineBody>(v, "timeline event")?.properties;
                    }
                    it.next();
                }
                it.status()?;
            }
        }
        Ok(s)
    }

    /// Many users in one call (one RocksDB multi-get), each with the
    /// properties of its newest `with_properties` events (`user_from`).
    pub fn get_users(
        &self,
        ids: &[(u32, &str)],
        with_properties: usize,
    ) -> Result<Vec<Option<UserState>>, StoreError> {
        let cf = self.cf(CF_USERS);
        let ks: Vec<_> = ids.iter().map(|(p, u)| (cf, keys::user(*p, u))).collect();
        self.db
            .multi_get_cf(ks)
            .into_iter()
            .zip(ids)
            .map(|(r, (p, _))| {
                r?.map(|v| self.user_from(None, *p, &v, with_properties))
                    .transpose()
            })
            .collect()
    }

    /// Adds a user's state to the batch (the timeline apart: see
    /// `put_timeline_ops`); returns the encoded size of the user's value,
    /// timeline not included. A state with its timeline still inline (older
    /// format) is split on the way.
    pub fn put_user(&self, batch: &mut WriteBatch, p: u32, s: &mut UserState) -> usize {
        let timeline = std::mem::take(&mut s.timeline);
        if !s.timeline_split {
            let cf = self.cf(CF_TIMELINE);
            for e in &timeline {
                let v = e.encode_to_vec();
                batch.put_cf(
                    cf,
                    keys::timeline_event(p, &s.user_id, e.created_at_ns, &e.id),
                    v,
                );
            }
            s.timeline_split = true;
        }
        let v = s.encode_to_vec();
        s.timeline = timeline;
        batch.put_cf(self.cf(CF_USERS), keys::user(p, &s.user_id), &v);
        v.len()
    }

    /// Adds a batch's timeline changes of one user (in their order).
    pub fn put_timeline_ops(
        &self,
        batch: &mut WriteBatch,
        p: u32,
        user_id: &str,
        ops: &[crate::state::apply::TimelineOp],
    ) {
        use crate::state::apply::TimelineOp;
        let cf = self.cf(CF_TIMELINE);
        for op in ops {
            match op {
                TimelineOp::Put(at, id, encoded) => {
                    batch.put_cf(cf, keys::timeline_event(p, user_id, *at, id), encoded)
                }
                TimelineOp::Delete(at, id) => {
                    batch.delete_cf(cf, keys::timeline_event(p, user_id, *at, id))
                }
            }
        }
    }

    /// The mark of the last snapshot published for a user (kept across rebuilds).
    pub fn get_mark(&self, p: u32, user_id: &str) -> Result<Option<SnapshotMark>, StoreError> {
        self.get_raw(CF_SNAP, &keys::user(p, user_id))?
            .map(|v| decode(&v, "snapshot mark"))
            .transpose()
    }

    /// The marks of `user_ids` (in key order, as a page of users comes) in
    /// one batched multi-get: a settle reads one per user of a partition.
    pub fn get_marks(
        &self,
        p: u32,
        user_ids: &[&str],
    ) -> Result<Vec<Option<SnapshotMark>>, StoreError> {
        let ks: Vec<Vec<u8>> = user_ids.iter().map(|u| keys::user(p, u)).collect();
        self.db
            .batched_multi_get_cf_opt(self.cf(CF_SNAP), &ks, true, &ReadOptions::default())
            .into_iter()
            .map(|r| match r? {
                Some(v) => decode(&v, "snapshot mark").map(Some),
                None => Ok(None),
            })
            .collect()
    }

    pub fn put_mark(&self, batch: &mut WriteBatch, p: u32, m: &SnapshotMark) {
        batch.put_cf(
            self.cf(CF_SNAP),
            keys::user(p, &m.user_id),
            m.encode_to_vec(),
        );
    }

    /// The user's current context snapshot, built from the state as of one
    /// consistent read (user, settings and properties from the same RocksDB
    /// snapshot). It equals the last snapshot published: every committed
    /// batch publishes the snapshot of each user whose visible content it
    /// changed. `None` for an unknown user (or one never published).
    pub fn context(
        &self,
        p: u32,
        user_id: &str,
        max_events: usize,
        limit: crate::snapshot::SizeLimit,
    ) -> Result<Option<ContextSnapshotBytes>, StoreError> {
        let view = self.db.snapshot();
        // A held snapshot: the last one published is what consumers have.
        if let Some(held) = view.get_cf(self.cf(CF_PART), keys::part_held(p, user_id))? {
            return Ok(Some(decode(&held, "held snapshot")?));
        }
        let Some(raw) = view.get_cf(self.cf(CF_USERS), keys::user(p, user_id))? else {
            return Ok(None);
        };
        let state = self.user_from(Some(&view), p, &raw, max_events)?;
        if state.snapshot_version == 0 {
            return Ok(None);
        }
        let settings: Settings = match view.get_cf(self.cf(CF_PART), keys::part_settings(p))? {
            Some(v) => decode(&v, "settings")?,
            None => Settings::default(),
        };
        let bodies = ViewBodies {
            store: self,
            view: &view,
            partition: p,
            user_id,
        };
        let mut snap = crate::snapshot::build(
            &state,
            &crate::snapshot::prepared(settings),
            max_events,
            limit,
            &bodies,
        );
        snap.version = state.snapshot_version;
        snap.updated_at = Some(crate::model::time::to_timestamp(
            state.snapshot_updated_at_ns,
        ));
        Ok(Some(snap))
    }

    pub fn linked_user(&self, id: &Identifier) -> Result<Option<String>, StoreError> {
        Ok(self
            .get_raw(CF_IDENT, &keys::ident(&id.key()))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn get_settings(&self, key_cf: &str, key: &[u8]) -> Result<Option<Settings>, StoreError> {
        self.get_raw(key_cf, key)?
            .map(|v| decode(&v, "settings"))
            .transpose()
    }

    /// Adds a catalog delta for partition `p` to the batch (read-modify-write).
    pub fn merge_catalog(
        &self,
        batch: &mut WriteBatch,
        p: u32,
        delta: &CatalogDelta,
    ) -> Result<(), StoreError> {
        for ((kind, source, ty), d) in delta {
            let key = keys::catalog(p, kind.tag(), source, ty);
            let mut cur: CatalogEntry = match self.get_raw(CF_CATALOG, &key)? {
                Some(v) => decode(&v, "catalog entry")?,
                None => CatalogEntry::default(),
            };
            merge_catalog(&mut cur, d);
            batch.put_cf(self.cf(CF_CATALOG), key, cur.encode_to_vec());
        }
        Ok(())
    }

    /// The type catalog summed over partitions.
    pub fn catalog(&self, kind: TypeKind) -> Result<BTreeMap<TypeRef, CatalogEntry>, StoreError> {
        let mut out: BTreeMap<(String, String), CatalogEntry> = BTreeMap::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CATALOG), IteratorMode::Start)
        {
            let (k, v) = item?;
            let Some((_, tag, source, ty)) = keys::split_catalog(&k) else {
                continue;
            };
            if tag != kind.tag() {
                continue;
            }
            let e: CatalogEntry = decode(&v, "catalog entry")?;
            merge_catalog(
                out.entry((source.to_string(), ty.to_string())).or_default(),
                &e,
            );
        }
        Ok(out
            .into_iter()
            .map(|((s, t), e)| (TypeRef::new(s, t), e))
            .collect())
    }

    /// Users of partition `p` whose next snapshot is held back (`keys::part_held`).
    pub fn held_users(&self, p: u32) -> Result<Vec<String>, StoreError> {
        let prefix = keys::part_held_prefix(p);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_PART),
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, _) = item?;
            let Some(uid) = k.strip_prefix(&prefix[..]) else {
                break;
            };
            out.push(String::from_utf8_lossy(uid).into_owned());
        }
        Ok(out)
    }

    /// Iterates the users of partition `p` from `after` (exclusive), up to `limit`.
    pub fn users_page(
        &self,
        p: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<UserState>, StoreError> {
        self.user_values_page(p, after, limit)?
            .iter()
            .map(|(_, v)| self.user_from(None, p, v, 0))
            .collect()
    }

    /// Like `users_page`, the users' ids and stored values only (their
    /// timelines not read): `user_value` completes the ones needed.
    pub fn user_values_page(
        &self,
        p: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredUser>, StoreError> {
        let prefix = keys::partition_prefix(p);
        let start = match after {
            Some(u) => {
                let mut k = keys::user(p, u);
                k.push(0);
                k
            }
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_USERS),
            within_partition(p),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let Some((_, uid)) = keys::split_user(&k) else {
                return Err(StoreError::Incompatible(format!(
                    "a user key of partition {p} is not UTF-8: {k:?}"
                )));
            };
            out.push((uid.to_string(), v));
        }
        Ok(out)
    }

    /// Deletes a prefix range from a column family (into a batch).
    pub fn delete_prefix(&self, batch: &mut WriteBatch, cf: &str, prefix: &[u8]) {
        let mut end = prefix.to_vec();
        // prefix + 0xff.. as the exclusive upper bound
        end.extend_from_slice(&[0xff; 8]);
        batch.delete_range_cf(self.cf(cf), prefix, &end[..]);
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        if self.options.bulk {
            return self.flush_atomically(true);
        }
        // Every column family's flush is scheduled first, so they run in
        // parallel (`flush_cf` waits for each in turn); then each is waited for.
        self.start_flush()?;
        for name in ALL_CFS {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }

    /// Schedules a flush of every column family's memtable and returns
    /// without waiting for it (writes go on into new memtables meanwhile).
    /// The fullest go first: a rebuild's flushes run two at a time (eight
    /// background jobs), and the largest one (most often the timelines')
    /// is the one that ends last. A bulk store flushes them all as one
    /// atomic job.
    pub fn start_flush(&self) -> Result<(), StoreError> {
        if self.options.bulk {
            return self.flush_atomically(false);
        }
        let mut start = rocksdb::FlushOptions::default();
        start.set_wait(false);
        let mut order: Vec<(u64, &str)> = ALL_CFS
            .iter()
            .map(|name| {
                let held = self
                    .db
                    .property_int_value_cf(self.cf(name), "rocksdb.cur-size-active-mem-table")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                (held, *name)
            })
            .collect();
        order.sort_by_key(|(held, _)| std::cmp::Reverse(*held));
        for (_, name) in order {
            self.db.flush_cf_opt(self.cf(name), &start)?;
        }
        Ok(())
    }

    /// A `bulk` store's flush: one request for every column family, which
    /// RocksDB's atomic flush carries out as one (a flush of one column
    /// family alone would leave the others behind it).
    fn flush_atomically(&self, wait: bool) -> Result<(), StoreError> {
        let mut o = rocksdb::FlushOptions::default();
        o.set_wait(wait);
        let all: Vec<_> = ALL_CFS.iter().map(|n| self.cf(n)).collect();
        self.db.flush_cfs_opt(&all, &o)?;
        Ok(())
    }

    /// RocksDB's estimate of the state's live bytes: in its tables and in
    /// its memtables (data not flushed yet).
    pub fn approximate_size(&self) -> u64 {
        ALL_CFS
            .iter()
            .flat_map(|n| {
                [
                    "rocksdb.estimate-live-data-size",
                    "rocksdb.cur-size-all-mem-tables",
                ]
                .map(|prop| {
                    self.db
                        .property_int_value_cf(self.cf(n), prop)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                })
            })
            .sum()
    }

    /// The users of partition `p`, counted by the materializing stage as it
    /// creates them (`count_users` the first time, for a data dir of a
    /// version that did not count).
    pub fn user_count(&self, p: u32) -> Result<Option<i64>, StoreError> {
        self.get_i64(CF_PART, &keys::part_users(p))
    }

    /// Counts the users of partition `p` key by key.
    pub fn count_users(&self, p: u32) -> Result<i64, StoreError> {
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.cf(CF_USERS), within_partition(p));
        it.seek(keys::partition_prefix(p));
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }
}

/// The partition count a data dir recorded (`META_PARTITIONS`).
fn partition_count(v: &[u8]) -> u32 {
    u32::from_be_bytes(v.try_into().unwrap_or([0; 4]))
}

/// The value of `META_MODE` for a data dir of Kafka mode or embedded mode.
fn mode_name(kafka: bool) -> &'static [u8] {
    if kafka {
        b"kafka"
    } else {
        b"embedded"
    }
}

/// Read options that end iteration at partition `p`'s last key.
fn within_partition(p: u32) -> ReadOptions {
    let mut ro = ReadOptions::default();
    if let Some(next) = p.checked_add(1) {
        ro.set_iterate_upper_bound(keys::partition_prefix(next).to_vec());
    }
    ro
}

/// Event properties stored beside the timelines (with the ones a batch has
/// not written yet).
pub struct StoreBodies<'a> {
    pub store: &'a Store,
    pub partition: u32,
    pub user_id: &'a str,
    pub pending: Option<&'a crate::state::FastMap<String, bytes::Bytes>>,
}

/// A timeline value's properties (its other fields skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct TimelineBody {
    #[prost(bytes = "bytes", tag = "5")]
    properties: bytes::Bytes,
}

/// A timeline value without its properties (skipped, not copied): what the
/// cached timeline holds. The fields of `StoredEvent` but `properties`.
#[derive(Clone, PartialEq, prost::Message)]
struct TimelineHead {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    source: String,
    #[prost(string, tag = "3")]
    r#type: String,
    #[prost(string, tag = "4")]
    description: String,
    #[prost(int64, tag = "6")]
    created_at_ns: i64,
    #[prost(int64, tag = "7")]
    received_at_ns: i64,
    #[prost(bool, tag = "8")]
    body_in_timeline: bool,
}

/// A stored timeline event, as the cached timeline holds it: properties
/// stored in its value are left there (`body_in_timeline`); older values
/// keep theirs (inline, or empty with the properties in `bodies`).
fn timeline_event(value: &[u8]) -> Result<StoredEvent, StoreError> {
    let h: TimelineHead = decode(value, "timeline event")?;
    if !h.body_in_timeline {
        return decode(value, "timeline event");
    }
    Ok(StoredEvent {
        id: h.id,
        source: h.source,
        r#type: h.r#type,
        description: h.description,
        properties: bytes::Bytes::new(),
        created_at_ns: h.created_at_ns,
        received_at_ns: h.received_at_ns,
        body_in_timeline: true,
    })
}

/// Reads the properties of many events of one user in one multi-get: from
/// their timeline values, or for events stored before `body_in_timeline`
/// from the `bodies` column family (sorted keys of one user: one pass over
/// the memtable and blocks instead of a lookup each).
fn multi_get_bodies<'a>(
    store: &Store,
    view: Option<&rocksdb::SnapshotWithThreadMode<'a, DB>>,
    partition: u32,
    user_id: &str,
    events: &[&StoredEvent],
) -> Vec<Vec<u8>> {
    if events.is_empty() {
        return Vec::new();
    }
    let mut ro = ReadOptions::default();
    if let Some(v) = view {
        ro.set_snapshot(v);
    }
    // One batched multi-get per column family: RocksDB lends the values
    // (`multi_get_cf` copies each into a zeroed vector first).
    let mut out = vec![Vec::new(); events.len()];
    for in_timeline in [true, false] {
        let (at, ks): (Vec<usize>, Vec<Vec<u8>>) = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.body_in_timeline == in_timeline)
            .map(|(i, e)| {
                let k = if in_timeline {
                    keys::timeline_event(partition, user_id, e.created_at_ns, &e.id)
                } else {
                    keys::body(partition, user_id, &e.id)
                };
                (i, k)
            })
            .unzip();
        if at.is_empty() {
            continue;
        }
        let cf = store.cf(if in_timeline { CF_TIMELINE } else { CF_BODIES });
        for (i, r) in at
            .into_iter()
            .zip(store.db.batched_multi_get_cf_opt(cf, &ks, false, &ro))
        {
            let read = r.map_err(StoreError::from).and_then(|v| match v {
                Some(v) if in_timeline => {
                    decode::<TimelineBody>(&v, "timeline event").map(|b| Vec::from(b.properties))
                }
                v => Ok(v.map(|v| v.to_vec()).unwrap_or_default()),
            });
            out[i] = read.unwrap_or_else(|err| {
                tracing::error!(error = %err, event = %events[i].id, "cannot read event properties");
                Vec::new()
            });
        }
    }
    out
}

impl crate::snapshot::Bodies for StoreBodies<'_> {
    fn properties(&self, e: &StoredEvent) -> Vec<u8> {
        self.properties_many(&[e])
            .pop()
            .map(Vec::from)
            .unwrap_or_default()
    }

    fn properties_many(&self, events: &[&StoredEvent]) -> Vec<bytes::Bytes> {
        let pending = |e: &StoredEvent| self.pending.and_then(|m| m.get(&e.id));
        let stored: Vec<&StoredEvent> = events
            .iter()
            .copied()
            .filter(|e| pending(e).is_none())
            .collect();
        let mut fetched =
            multi_get_bodies(self.store, None, self.partition, self.user_id, &stored).into_iter();
        events
            .iter()
            .map(|e| match pending(e) {
                Some(b) => b.clone(),
                None => fetched.next().unwrap_or_default().into(),
            })
            .collect()
    }
}

/// Properties as of a consistent read (`Store::context`).
struct ViewBodies<'a, 'v> {
    store: &'a Store,
    view: &'a rocksdb::SnapshotWithThreadMode<'v, DB>,
    partition: u32,
    user_id: &'a str,
}

impl crate::snapshot::Bodies for ViewBodies<'_, '_> {
    fn properties(&self, e: &StoredEvent) -> Vec<u8> {
        self.properties_many(&[e])
            .pop()
            .map(Vec::from)
            .unwrap_or_default()
    }

    fn properties_many(&self, events: &[&StoredEvent]) -> Vec<bytes::Bytes> {
        multi_get_bodies(
            self.store,
            Some(self.view),
            self.partition,
            self.user_id,
            events,
        )
        .into_iter()
        .map(bytes::Bytes::from)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::apply::{new_user, TimelineOp};

    fn event(id: &str, at: i64) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            source: "shop".into(),
            r#type: "order".into(),
            created_at_ns: at,
            ..Default::default()
        }
    }

    /// `refuse_other` records nothing (a start that fails after it leaves a
    /// new data dir to either mode) and refuses what `check_*` recorded;
    /// the count is read back without opening the store for writing.
    #[test]
    fn a_data_dir_records_its_shape_only_when_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        store.refuse_other(3, true).unwrap();
        assert_eq!(store.recorded_partitions().unwrap(), None);
        assert!(!store.is_kafka_mode().unwrap());
        store.check_partitions(5).unwrap();
        store.check_mode(false).unwrap();
        store.refuse_other(5, false).unwrap();
        assert!(store.refuse_other(3, false).is_err(), "another count");
        assert!(store.refuse_other(5, true).is_err(), "the other mode");
        assert_eq!(
            Store::recorded_partitions_in(dir.path()).unwrap(),
            Some(5),
            "read beside the open store"
        );
        drop(store);
        let none = tempfile::tempdir().unwrap();
        assert_eq!(Store::recorded_partitions_in(none.path()).unwrap(), None);
    }

    /// A compaction thread lowers its CPU priority to nice 19 when it runs
    /// a job; the flush thread keeps the process's.
    #[test]
    fn compactions_run_at_the_lowest_cpu_priority() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        for round in 0..2u8 {
            for i in 0..100u32 {
                store
                    .db()
                    .put_cf(store.cf(CF_BODIES), i.to_be_bytes(), [round; 64])
                    .unwrap();
            }
            store.flush().unwrap();
        }
        store
            .db()
            .compact_range_cf(store.cf(CF_BODIES), None::<&[u8]>, None::<&[u8]>);
        let threads = crate::threads::all();
        // This thread's nice is the process's (e.g. 0, or more under `nice`).
        let (_, own) = crate::threads::this();
        // The pool is the process's (tests share it): the thread that ran
        // this compaction is one of them.
        assert!(
            threads.iter().any(|(n, v)| n == "rocksdb:low" && *v == 19),
            "{threads:?}"
        );
        assert!(
            threads
                .iter()
                .any(|(n, v)| n == "rocksdb:high" && *v == own),
            "{threads:?}"
        );
    }

    /// Whatever a batch's timeline changes leave out (events stored and
    /// dropped by one batch), the store holds exactly the timeline after
    /// every batch: batches of random sizes, out-of-order times, ids sent
    /// again after they were dropped, and duplicates.
    #[test]
    fn the_stored_timeline_is_the_working_timeline_after_every_batch() {
        use crate::model::{record, EventRecord, Record};
        use crate::state::apply::{apply, ApplyLimits, Working};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let limits = ApplyLimits {
            max_events_per_user: 5,
        };
        let mut w = Working::new(new_user("u"));
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            for _ in 0..1 + next(12) {
                let id = format!("e{}", next(40));
                // Times from the id, so an id sent again has its key again,
                // and out of order across ids.
                let at = 1_000 + id[1..].parse::<i64>().unwrap() * 7 % 40;
                let mut rec = Record {
                    log_time_ns: at,
                    body: Some(record::Body::Event(EventRecord {
                        event: Some(event(&id, at)),
                        profile: None,
                    })),
                    ..Default::default()
                };
                apply(&mut w, &mut rec, limits, &mut Default::default());
            }
            let changes = w.end_batch();
            let mut b = WriteBatch::default();
            store.put_timeline_ops(&mut b, 3, "u", &changes.timeline_ops);
            store.put_user(&mut b, 3, &mut w.state);
            store.write(b).unwrap();
            let key = |e: &StoredEvent| (e.created_at_ns, e.id.clone());
            let stored: Vec<_> = store
                .get_user(3, "u")
                .unwrap()
                .unwrap()
                .timeline
                .iter()
                .map(key)
                .collect();
            let working: Vec<_> = w.state.timeline.iter().map(key).collect();
            assert_eq!(stored, working);
            w.resume();
        }
    }

    #[test]
    fn timeline_is_stored_per_event_and_older_inline_state_is_split_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        // Older format: the timeline inline in the user's value.
        let mut old = new_user("u");
        old.timeline_split = false;
        old.timeline = vec![event("a", 1), event("b", 2)];
        store
            .db()
            .put_cf(store.cf(CF_USERS), keys::user(3, "u"), old.encode_to_vec())
            .unwrap();
        let mut got = store.get_user(3, "u").unwrap().unwrap();
        assert_eq!(got.timeline, old.timeline, "inline timelines still read");
        // Written again (e.g. after a batch that added "c"): split.
        got.timeline.push(event("c", 3));
        let mut b = WriteBatch::default();
        store.put_user(&mut b, 3, &mut got);
        store.write(b).unwrap();
        let raw: UserState = decode(
            &store
                .get_raw(CF_USERS, &keys::user(3, "u"))
                .unwrap()
                .unwrap(),
            "user",
        )
        .unwrap();
        assert!(raw.timeline_split && raw.timeline.is_empty());
        let ids = |s: &UserState| s.timeline.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(&store.get_user(3, "u").unwrap().unwrap()),
            ["a", "b", "c"]
        );
        // Later batches write only their changes, in order.
        let mut b = WriteBatch::default();
        store.put_timeline_ops(
            &mut b,
            3,
            "u",
            &[
                TimelineOp::put(&event("d", 0)),
                TimelineOp::Delete(0, "d".into()),
                TimelineOp::Delete(1, "a".into()),
                TimelineOp::put(&event("e", 9)),
            ],
        );
        store.write(b).unwrap();
        let users = store.get_users(&[(3, "u"), (3, "nobody")], 0).unwrap();
        assert_eq!(ids(users[0].as_ref().unwrap()), ["b", "c", "e"]);
        assert!(users[1].is_none());
        // Another user's events never show up (prefix bounded by the separator).
        let mut other = new_user("u2");
        other.timeline = vec![event("x", 1)];
        let mut b = WriteBatch::default();
        store.put_user(&mut b, 3, &mut other);
        store.put_timeline_ops(&mut b, 3, "u2", &[TimelineOp::put(&event("x", 1))]);
        store.write(b).unwrap();
        assert_eq!(
            ids(&store.get_user(3, "u").unwrap().unwrap()),
            ["b", "c", "e"]
        );
        assert_eq!(ids(&store.users_page(3, None, 10).unwrap()[1]), ["x"]);
    }

    /// `TimelineHead` mirrors `StoredEvent` but for the properties: every
    /// other field survives the cached form (a field added to one and not
    /// the other fails here).
    #[test]
    fn timeline_values_read_back_every_field_but_the_properties() {
        let full = StoredEvent {
            id: "e".into(),
            source: "shop".into(),
            r#type: "order".into(),
            description: "d".into(),
            properties: vec![10, 0].into(),
            created_at_ns: -3,
            received_at_ns: 9,
            body_in_timeline: true,
        };
        let cached = timeline_event(&full.encode_to_vec()).unwrap();
        assert_eq!(
            cached,
            StoredEvent {
                properties: Vec::new().into(),
                ..full.clone()
            }
        );
        let head = TimelineHead::decode(&full.encode_to_vec()[..]).unwrap();
        assert_eq!(head.encoded_len() + 4, full.encoded_len());
        // Older values keep what they hold (inline properties included).
        let older = StoredEvent {
            body_in_timeline: false,
            ..full
        };
        assert_eq!(timeline_event(&older.encode_to_vec()).unwrap(), older);
    }

    /// Events are stored as one key each, properties included; events of
    /// state written before (properties in `bodies`) stay readable, are
    /// trimmed with their bodies, and digest the same.
    #[test]
    fn event_properties_live_in_the_timeline_and_older_bodies_stay_readable() {
        use crate::model::{record, EventRecord, Record};
        use crate::snapshot::Bodies;
        use crate::state::apply::{apply, ApplyLimits, Working};
        let props = |v: &str| {
            crate::model::json::encode_struct(
                &serde_json::json!({ "v": v }).as_object().unwrap().into(),
            )
        };
        // The older layout: the timeline value without properties, the
        // properties under the body key.
        let old_layout = |store: &Store, e: &StoredEvent, body: &[u8]| {
            let mut b = WriteBatch::default();
            b.put_cf(
                store.cf(CF_TIMELINE),
                keys::timeline_event(3, "u", e.created_at_ns, &e.id),
                e.encode_to_vec(),
            );
            b.put_cf(store.cf(CF_BODIES), keys::body(3, "u", &e.id), body);
            store.write(b).unwrap();
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut b = WriteBatch::default();
        store.put_user(&mut b, 3, &mut new_user("u"));
        store.write(b).unwrap();
        old_layout(&store, &event("a", 1), &props("a"));
        old_layout(&store, &event("b", 2), &props("b"));
        // A batch stores "c" and trims "a" (at most two events).
        let mut w = Working::new(store.get_user(3, "u").unwrap().unwrap());
        let mut c = event("c", 3);
        c.properties = props("c").into();
        let mut rec = Record {
            log_time_ns: 3,
            body: Some(record::Body::Event(EventRecord {
                event: Some(c),
                profile: None,
            })),
            ..Default::default()
        };
        let limits = ApplyLimits {
            max_events_per_user: 2,
        };
        apply(&mut w, &mut rec, limits, &mut Default::default());
        let changes = w.end_batch();
        assert_eq!(changes.dropped_bodies, ["a"]);
        let mut b = WriteBatch::default();
        store.put_timeline_ops(&mut b, 3, "u", &changes.timeline_ops);
        for id in &changes.dropped_bodies {
            b.delete_cf(store.cf(CF_BODIES), keys::body(3, "u", id));
        }
        store.put_user(&mut b, 3, &mut w.state);
        store.write(b).unwrap();
        // "c" is one key, its properties in it; "a" is gone with its body.
        let get = |cf: &str, k: Vec<u8>| store.get_raw(cf, &k).unwrap();
        let stored: StoredEvent = decode(
            &get(CF_TIMELINE, keys::timeline_event(3, "u", 3, "c")).unwrap(),
            "e",
        )
        .unwrap();
        assert!(stored.body_in_timeline);
        assert_eq!(stored.properties, props("c"));
        assert_eq!(get(CF_BODIES, keys::body(3, "u", "c")), None);
        assert_eq!(get(CF_BODIES, keys::body(3, "u", "a")), None);
        assert_eq!(get(CF_TIMELINE, keys::timeline_event(3, "u", 1, "a")), None);
        // Read back: the cached form has no properties; both layouts'
        // properties are found.
        let st = store.get_user(3, "u").unwrap().unwrap();
        let ids: Vec<_> = st.timeline.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert!(st.timeline.iter().all(|e| e.properties.is_empty()));
        assert_eq!(
            (
                st.timeline[0].body_in_timeline,
                st.timeline[1].body_in_timeline
            ),
            (false, true)
        );
        let bodies = StoreBodies {
            store: &store,
            partition: 3,
            user_id: "u",
            pending: None,
        };
        let events: Vec<&StoredEvent> = st.timeline.iter().collect();
        assert_eq!(
            bodies.properties_many(&events),
            [bytes::Bytes::from(props("b")), props("c").into()]
        );
        // The digest is the content's: the same as with "c" in the older layout.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Store::open(other_dir.path(), &StoreOptions::default()).unwrap();
        other
            .db()
            .put_cf(
                other.cf(CF_USERS),
                keys::user(3, "u"),
                get(CF_USERS, keys::user(3, "u")).unwrap(),
            )
            .unwrap();
        old_layout(&other, &event("b", 2), &props("b"));
        let mut c = event("c", 3);
        c.received_at_ns = stored.received_at_ns;
        old_layout(&other, &c, &props("c"));
        assert_eq!(
            crate::state::digest::digest(&store).unwrap(),
            crate::state::digest::digest(&other).unwrap()
        );
    }

    /// A user read for the materializing stage comes with the properties
    /// of its newest events (those a snapshot shows), as their timeline
    /// values hold them; the cached form sheds them and counts the same
    /// bytes as a user read without them.
    #[test]
    fn the_newest_events_properties_come_with_the_user_and_are_shed() {
        use crate::state::apply::Working;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut b = WriteBatch::default();
        store.put_user(&mut b, 3, &mut new_user("u"));
        // "a" in the oldest layout (properties inline, not in the timeline
        // value's own field), then b..f.
        let mut a = event("a", 1);
        a.properties = vec![10, 1, b'a'].into();
        store.put_timeline_ops(&mut b, 3, "u", &[TimelineOp::put(&a)]);
        let props = |id: &str| vec![10, 1, id.as_bytes()[0]];
        for (i, id) in ["b", "c", "d", "e", "f"].into_iter().enumerate() {
            let mut e = event(id, 2 + i as i64);
            e.properties = props(id).into();
            e.body_in_timeline = true;
            store.put_timeline_ops(&mut b, 3, "u", &[TimelineOp::put(&e)]);
        }
        // Another user's events right after (the same prefix but longer).
        let mut x = event("x", 0);
        x.body_in_timeline = true;
        x.properties = props("x").into();
        store.put_timeline_ops(&mut b, 3, "u2", &[TimelineOp::put(&x)]);
        store.write(b).unwrap();
        let with = |n: usize| {
            let st = store.get_users(&[(3, "u")], n).unwrap().remove(0).unwrap();
            st.timeline
                .iter()
                .map(|e| (e.id.clone(), e.properties.to_vec()))
                .collect::<Vec<_>>()
        };
        let none: Vec<_> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|id| (id.to_string(), if *id == "a" { props("a") } else { vec![] }))
            .collect();
        assert_eq!(with(0), none, "the older layout's inline properties only");
        let mut two = none.clone();
        two[4].1 = props("e");
        two[5].1 = props("f");
        assert_eq!(with(2), two);
        let all: Vec<_> = none.iter().map(|(id, _)| (id.clone(), props(id))).collect();
        assert_eq!(with(50), all, "more than it has: every one");
        // Cached: the properties read with it are shed, the estimate is
        // the same as without them.
        let plain = Working::new(store.get_users(&[(3, "u")], 0).unwrap().remove(0).unwrap());
        let mut w = Working::new(store.get_users(&[(3, "u")], 50).unwrap().remove(0).unwrap());
        assert_eq!(w.timeline_bytes(), plain.timeline_bytes());
        w.end_batch();
        w.shed_properties();
        let shed: Vec<_> = w
            .state
            .timeline
            .iter()
            .map(|e| (e.id.clone(), e.properties.to_vec()))
            .collect();
        assert_eq!(shed, none);
        w.resume();
        assert_eq!(w.timeline_bytes(), plain.timeline_bytes());
    }

    #[test]
    fn marks_of_a_page_of_users_come_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mark = |u: &str, version| SnapshotMark {
            user_id: u.into(),
            version,
            ..Default::default()
        };
        let mut b = WriteBatch::default();
        for (u, v) in [("a", 3), ("c", 5), ("d", 1)] {
            store.put_mark(&mut b, 2, &mark(u, v));
        }
        // The same user in another partition is not theirs.
        store.put_mark(&mut b, 1, &mark("b", 9));
        store.write(b).unwrap();
        let got: Vec<Option<u64>> = store
            .get_marks(2, &["a", "b", "c", "d", "e"])
            .unwrap()
            .into_iter()
            .map(|m| m.map(|m| m.version))
            .collect();
        assert_eq!(got, [Some(3), None, Some(5), Some(1), None]);
        assert_eq!(store.get_marks(2, &[]).unwrap(), Vec::new());
        assert_eq!(store.get_mark(2, "c").unwrap(), Some(mark("c", 5)));
    }

    #[test]
    fn dropped_column_families_start_empty_and_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut user = new_user("u");
        user.timeline = vec![event("a", 1)];
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut b = WriteBatch::default();
            store.put_user(&mut b, 3, &mut user);
            store.put_timeline_ops(&mut b, 3, "u", &[TimelineOp::put(&event("a", 1))]);
            store.put_i64(&mut b, CF_SNAP, b"mark", 7);
            // More identities than are deleted key by key: that column
            // family is dropped (users and timelines, one key each, are
            // emptied key by key).
            for i in 0..DELETE_KEYS_UP_TO + 1 {
                store.put_i64(&mut b, CF_IDENT, format!("id{i}").as_bytes(), 1);
            }
            store.write(b).unwrap();
        }
        let mut store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        // `outbox` never held a key and `catalog` only a deleted one: both
        // are left as they are, and read as empty as the emptied ones.
        let mut b = WriteBatch::default();
        store.put_i64(&mut b, CF_CATALOG, b"gone", 1);
        store.write(b).unwrap();
        store.db().delete_cf(store.cf(CF_CATALOG), b"gone").unwrap();
        store
            .drop_column_families(&[CF_USERS, CF_TIMELINE, CF_OUTBOX, CF_CATALOG, CF_IDENT])
            .unwrap();
        let ident = store
            .db()
            .iterator_cf(store.cf(CF_IDENT), IteratorMode::Start);
        assert_eq!(ident.count(), 0);
        assert_eq!(store.get_i64(CF_IDENT, b"id0").unwrap(), None);
        assert!(store.get_user(3, "u").unwrap().is_none());
        assert_eq!(store.get_i64(CF_SNAP, b"mark").unwrap(), Some(7));
        assert_eq!(store.get_i64(CF_CATALOG, b"gone").unwrap(), None);
        let mut b = WriteBatch::default();
        store.put_i64(&mut b, CF_OUTBOX, b"o", 2);
        store.write(b).unwrap();
        assert_eq!(store.get_i64(CF_OUTBOX, b"o").unwrap(), Some(2));
        // The new column families take writes, and all of it survives a reopen.
        let mut b = WriteBatch::default();
        let mut other = new_user("v");
        store.put_user(&mut b, 3, &mut other);
        store.write(b).unwrap();
        drop(store);
        let mut store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert!(store.get_user(3, "u").unwrap().is_none());
        assert!(store.get_user(3, "v").unwrap().is_some());
        assert_eq!(store.get_i64(CF_SNAP, b"mark").unwrap(), Some(7));
        // Not once the store is shared.
        let shared = store.clone();
        assert!(store.drop_column_families(&[CF_USERS]).is_err());
        assert!(shared.get_user(3, "v").unwrap().is_some());
    }

    #[test]
    fn a_rebuild_mark_refuses_the_data_dir_until_the_rebuild_ends() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        let records = RebuildMark {
            from_inputs: false,
            processed: vec![3, 0, 7],
        };
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            store.refuse_interrupted_rebuild().unwrap();
            assert_eq!(store.interrupted_rebuild().unwrap(), None);
            store.begin_rebuild(&records).unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.interrupted_rebuild().unwrap(), Some(records));
        let err = store.refuse_interrupted_rebuild().unwrap_err().to_string();
        assert!(
            err.contains("interrupted")
                && err.contains(&format!(
                    "run `contextd rebuild --data-dir {}` again",
                    canonical.display()
                )),
            "{err}"
        );
        let inputs = RebuildMark {
            from_inputs: true,
            processed: vec![0; 3],
        };
        store.begin_rebuild(&inputs).unwrap();
        assert_eq!(store.interrupted_rebuild().unwrap(), Some(inputs));
        let err = store.refuse_interrupted_rebuild().unwrap_err().to_string();
        assert!(err.contains(" --from-inputs` again"), "{err}");
        store.end_rebuild().unwrap();
        drop(store);
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        store.refuse_interrupted_rebuild().unwrap();
        assert_eq!(store.interrupted_rebuild().unwrap(), None);
    }

    /// A bulk store writes no write-ahead log, and each flush takes every
    /// column family to one point, also the flush RocksDB starts itself
    /// when one memtable is full: a copy of its files taken while it is
    /// open (as after a crash, what the memtables held is gone) holds each
    /// batch in every column family it wrote or in none.
    #[test]
    fn a_bulk_store_writes_no_log_and_flushes_its_column_families_together() {
        let dir = tempfile::tempdir().unwrap();
        let bulk = StoreOptions {
            bulk: true,
            sync_writes: true,
            write_buffer_bytes: 256 << 10,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), &bulk).unwrap();
        let wal_bytes = || -> u64 {
            std::fs::read_dir(dir.path().join("state"))
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        };
        let before = wal_bytes();
        let write = |round: &str, catalog_bytes: usize| {
            let mut b = WriteBatch::default();
            let mut user = new_user(round);
            store.put_user(&mut b, 1, &mut user);
            let e = event(round, 1);
            store.put_timeline_ops(&mut b, 1, round, &[TimelineOp::put(&e)]);
            store.put_i64(&mut b, CF_SNAP, round.as_bytes(), 1);
            store.put_i64(&mut b, CF_META, round.as_bytes(), 1);
            b.put_cf(store.cf(CF_CATALOG), round, vec![7u8; catalog_bytes]);
            store.write(b).unwrap();
        };
        write("a", 64 << 10);
        assert!(
            wal_bytes() - before < 1024,
            "{} bytes logged",
            wal_bytes() - before
        );
        store.start_flush().unwrap();
        store.flush().unwrap();
        // "b" fills the catalog's memtable: the next write has RocksDB
        // flush it, and with it every other column family's.
        write("b", 1 << 20);
        write("c", 16);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let busy = |p: &str| store.db.property_int_value(p).unwrap().unwrap_or(0);
        while busy("rocksdb.num-running-flushes") > 0
            || ALL_CFS.iter().any(|n| {
                store
                    .db
                    .property_int_value_cf(store.cf(n), "rocksdb.num-immutable-mem-table")
                    .unwrap()
                    .unwrap_or(0)
                    > 0
            })
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the flush never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir(copy.path().join("state")).unwrap();
        for e in std::fs::read_dir(dir.path().join("state")).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "LOCK" {
                std::fs::copy(e.path(), copy.path().join("state").join(e.file_name())).unwrap();
            }
        }
        let crashed = Store::open(copy.path(), &StoreOptions::default()).unwrap();
        for (round, there) in [("a", true), ("b", true), ("c", false)] {
            assert_eq!(
                crashed.get_user(1, round).unwrap().is_some(),
                there,
                "{round}"
            );
            assert_eq!(
                crashed
                    .get_i64(CF_SNAP, round.as_bytes())
                    .unwrap()
                    .is_some(),
                there
            );
            assert_eq!(
                crashed
                    .get_i64(CF_META, round.as_bytes())
                    .unwrap()
                    .is_some(),
                there
            );
            assert_eq!(
                crashed
                    .get_raw(CF_CATALOG, round.as_bytes())
                    .unwrap()
                    .is_some(),
                there
            );
        }
        // Closed normally, it has everything.
        drop(store);
        let reopened = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let c = reopened
            .get_user(1, "c")
            .unwrap()
            .expect("flushed at close");
        assert_eq!(c.timeline.len(), 1);
    }
}
