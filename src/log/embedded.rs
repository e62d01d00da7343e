//! Embedded mode's topics: durable local logs, one folder per topic
//! partition under `<data_dir>/log/`, each a sequence of append-only segment
//! files (`segment.rs`), as Kafka keeps them.
//!
//! Atomicity with the state: a commit writes its entries to the segment
//! files first, then one RocksDB `WriteBatch` holding the state change and
//! each written partition's new end (next offset, active segment, its
//! length). Readers only see offsets below the committed end; on open every
//! partition is cut back to its stored end, so entries of a batch whose
//! state write never happened are gone, as if never appended. Embedded
//! mode is exactly-once end to end.
//!
//! Data dirs of versions that kept these topics in the store's `log`
//! column family are moved into segment files on first open.

use super::segment::{self, encode_entry, Segment};
use super::{LogError, LogRecord, OutRecord};
use crate::state::keys::{partition_for, CF_LOG, CF_META};
use crate::state::Store;
use rocksdb::{Direction, IteratorMode, WriteBatch};
use std::collections::HashMap;
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

/// Knobs of the embedded log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A partition starts a new segment file once its active one holds this
    /// many bytes; retention deletes whole segments.
    pub segment_bytes: u64,
    /// Topics whose segments are written past the page cache
    /// (`Segment::open_direct`): ones nothing reads right behind the end.
    pub direct_topics: Vec<String>,
}

/// How often the embedded runtime runs `EmbeddedLog::drop_behind`.
pub const DROP_BEHIND_EVERY: Duration = Duration::from_millis(100);
/// Drop-behind ranges are at least this long.
pub const DROP_BEHIND_STEP: u64 = 4 << 20;

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            direct_topics: Vec::new(),
        }
    }
}

/// The key of a partition's committed end in `CF_META`.
fn end_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + topic.len() + 5);
    k.extend_from_slice(b"logend/");
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&(partition as u32).to_be_bytes());
    k
}

/// A partition's committed end: the next offset, the active segment's base
/// offset, and how many of its bytes are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct End {
    next: i64,
    base: i64,
    len: u64,
}

impl End {
    fn encode(&self) -> [u8; 24] {
        let mut v = [0; 24];
        v[..8].copy_from_slice(&self.next.to_be_bytes());
        v[8..16].copy_from_slice(&self.base.to_be_bytes());
        v[16..].copy_from_slice(&self.len.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<End> {
        Some(End {
            next: i64::from_be_bytes(v.get(..8)?.try_into().ok()?),
            base: i64::from_be_bytes(v.get(8..16)?.try_into().ok()?),
            len: u64::from_be_bytes(v.get(16..24)?.try_into().ok()?),
        })
    }
}

/// A topic name as a folder name: Kafka's topic characters kept, any other
/// byte as `%XX`.
fn folder_name(topic: &str) -> String {
    let mut s = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

struct Partition {
    dir: PathBuf,
    /// The next offset readers may read: everything below is committed.
    committed: AtomicI64,
    /// Segments are opened with `Segment::open_direct`.
    direct: bool,
    /// Segments by base offset; the last one is appended to.
    segments: RwLock<Vec<Arc<Segment>>>,
    /// The committed end as the writer sees it. Held across offset
    /// assignment, the file write and the state commit, so the partition's
    /// offsets are committed in order and readers never see a gap. Each
    /// partition has its own: commits to different partitions (HTTP appends
    /// to the inputs, routing to the records log, each materializing thread
    /// to its snapshot partitions) run at the same time.
    tail: Mutex<End>,
}

struct Topic {
    name: String,
    partitions: Vec<Partition>,
}

/// The embedded topics of one data dir.
pub struct EmbeddedLog {
    store: Store,
    opts: LogOptions,
    topics: Vec<Topic>,
    by_name: HashMap<String, usize>,
    /// Bumped after every append; readers wait on it.
    generation: Mutex<u64>,
    appended: Condvar,
}

impl EmbeddedLog {
    /// Opens the topics (name, partition count) with default options.
    pub fn open(store: Store, topics: &[(String, u32)]) -> Result<EmbeddedLog, LogError> {
        EmbeddedLog::open_with(store, topics, LogOptions::default())
    }

    /// Opens the topics, cutting every partition back to its committed end.
    pub fn open_with(
        store: Store,
        topics: &[(String, u32)],
        opts: LogOptions,
    ) -> Result<EmbeddedLog, LogError> {
        let root = store.data_dir().join("log");
        migrate_from_store(&store, &root, topics, &opts)?;
        let mut list = Vec::new();
        let mut by_name = HashMap::new();
        for (name, n) in topics {
            let direct = opts.direct_topics.contains(name);
            let mut partitions = Vec::new();
            for p in 0..*n as i32 {
                let dir = root.join(folder_name(name)).join(p.to_string());
                let (segments, end) = recover(&store, &dir, name, p, direct)?;
                partitions.push(Partition {
                    dir,
                    committed: AtomicI64::new(end.next),
                    direct,
                    segments: RwLock::new(segments),
                    tail: Mutex::new(end),
                });
            }
            by_name.insert(name.clone(), list.len());
            list.push(Topic {
                name: name.clone(),
                partitions,
            });
        }
        Ok(EmbeddedLog {
            store,
            opts,
            topics: list,
            by_name,
            generation: Mutex::new(0),
            appended: Condvar::new(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn topic(&self, name: &str) -> Result<(usize, &Topic), LogError> {
        self.by_name
            .get(name)
            .map(|i| (*i, &self.topics[*i]))
            .ok_or_else(|| LogError::UnknownTopic(name.to_string()))
    }

    fn partition(&self, name: &str, partition: i32) -> Result<&Partition, LogError> {
        let (_, t) = self.topic(name)?;
        usize::try_from(partition)
            .ok()
            .and_then(|p| t.partitions.get(p))
            .ok_or_else(|| LogError::UnknownTopic(format!("{name}[{partition}]")))
    }

    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.topic(topic)
            .ok()
            .map(|(_, t)| t.partitions.len() as u32)
    }

    /// The next offset of every partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        self.topic(topic)
            .map(|(_, t)| {
                t.partitions
                    .iter()
                    .map(|p| p.committed.load(Ordering::Acquire))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Bytes in the segment files of every topic.
    pub fn disk_bytes(&self) -> u64 {
        let mut total = 0;
        for t in &self.topics {
            for p in &t.partitions {
                for s in p.segments.read().expect("segments lock").iter() {
                    total += s.file_len().unwrap_or(0);
                }
            }
        }
        total
    }

    /// One pass of drop-behind over every partition (`Segment::drop_behind`):
    /// the active segment's bytes but its newest `keep`, and all of the
    /// segment before it (rolled since the last passes), in ranges of at
    /// least `step` bytes. Called every `DROP_BEHIND_EVERY` by a thread of
    /// its own, so the writeback it starts never holds up a commit.
    pub fn drop_behind(&self, keep: u64, step: u64) {
        for t in &self.topics {
            for p in &t.partitions {
                let last_two: Vec<Arc<Segment>> = {
                    let segs = p.segments.read().expect("segments lock");
                    segs.iter().rev().take(2).cloned().collect()
                };
                for (i, seg) in last_two.iter().enumerate() {
                    let Ok(len) = seg.file_len() else { continue };
                    if i == 0 {
                        seg.drop_behind(len.saturating_sub(keep) & !4095, step);
                    } else {
                        seg.drop_behind(len, 0);
                    }
                }
            }
        }
    }

    /// Appends `records` and writes `batch` atomically. Returns (partition, offset) of each record.
    pub fn commit(
        &self,
        batch: WriteBatch,
        records: &[OutRecord],
    ) -> Result<Vec<(i32, i64)>, LogError> {
        self.commit_with(batch, records, false)
    }

    /// `commit`, writing the records of `LogOptions::direct_topics` past the
    /// page cache: for a stage that is behind, whose output nothing reads
    /// soon. (It waits for the device instead of leaving the writeback to
    /// the OS, so a stage that keeps up commits with `commit`.)
    pub fn commit_direct(
        &self,
        batch: WriteBatch,
        records: &[OutRecord],
    ) -> Result<Vec<(i32, i64)>, LogError> {
        self.commit_with(batch, records, true)
    }

    fn commit_with(
        &self,
        mut batch: WriteBatch,
        records: &[OutRecord],
        direct: bool,
    ) -> Result<Vec<(i32, i64)>, LogError> {
        // Each record's partition, and each partition's framed size and
        // entry count, first.
        let mut slot: HashMap<(usize, i32), usize> = HashMap::new();
        let mut parts: Vec<(usize, i32)> = Vec::new();
        let mut sizes: Vec<usize> = Vec::new();
        let mut counts: Vec<usize> = Vec::new();
        let mut slots = Vec::with_capacity(records.len());
        for r in records {
            let (ti, t) = self.topic(&r.topic)?;
            let n = t.partitions.len() as u32;
            let p = match (r.partition, &r.key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for(k, n) as i32,
                (None, None) => 0,
            };
            if p < 0 || p as u32 >= n {
                return Err(LogError::UnknownTopic(format!("{}[{p}]", r.topic)));
            }
            let i = *slot.entry((ti, p)).or_insert_with(|| {
                parts.push((ti, p));
                sizes.push(0);
                counts.push(0);
                parts.len() - 1
            });
            sizes[i] += segment::entry_len(r.key.as_deref(), r.value.len());
            counts[i] += 1;
            slots.push(i);
        }
        // Every commit locks the partitions it writes in one order (topic,
        // partition), so no two commits can each hold one the other waits for.
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_unstable_by_key(|i| parts[*i]);
        let mut locked: Vec<Option<MutexGuard<'_, End>>> = parts.iter().map(|_| None).collect();
        for i in order {
            let (ti, p) = parts[i];
            locked[i] = Some(
                self.topics[ti].partitions[p as usize]
                    .tail
                    .lock()
                    .expect("log tail lock"),
            );
        }
        let mut tails: Vec<MutexGuard<'_, End>> = locked.into_iter().flatten().collect();
        let mut next: Vec<i64> = tails.iter().map(|t| t.next).collect();
        let mut assigned = Vec::with_capacity(records.len());
        let mut heads = Vec::with_capacity(records.len());
        for (r, &i) in records.iter().zip(&slots) {
            heads.push(segment::entry_head_of(
                next[i],
                r.timestamp_ms,
                r.key.as_deref(),
                r.value.slices(),
            ));
            assigned.push((parts[i].1, next[i]));
            next[i] += 1;
        }
        // Each partition's entries as the parts `writev` copies into its
        // file from where they are: framing, key, value (staging them in a
        // buffer first copied every byte once more, into fresh pages:
        // BENCHMARKS.md, item 46).
        let mut iov: Vec<Vec<IoSlice<'_>>> =
            counts.iter().map(|n| Vec::with_capacity(3 * n)).collect();
        for ((r, &i), head) in records.iter().zip(&slots).zip(&heads) {
            let v = &mut iov[i];
            v.push(IoSlice::new(head));
            if let Some(k) = r.key.as_deref().filter(|k| !k.is_empty()) {
                v.push(IoSlice::new(k));
            }
            v.extend(r.value.slices().map(IoSlice::new));
        }
        // Write the files; what was written is cut off again if anything fails.
        let mut written: Vec<(usize, Arc<Segment>, u64, End)> = Vec::new();
        let mut wrote_direct = false;
        let undo = |written: &[(usize, Arc<Segment>, u64, End)]| {
            for (_, seg, old_len, _) in written {
                if let Err(e) = seg.truncate(*old_len) {
                    tracing::error!(error = %e, "cannot drop an uncommitted log write");
                }
            }
        };
        for (i, ((ti, p), parts_of)) in parts.iter().zip(&mut iov).enumerate() {
            let tail = &mut *tails[i];
            let res = self.active_segment(*ti, *p, tail).and_then(|seg| {
                let old = *tail;
                seg.append_parts(parts_of, direct).inspect_err(|_| {
                    let _ = seg.truncate(old.len);
                })?;
                wrote_direct |= direct && seg.is_direct();
                Ok((seg, old))
            });
            match res {
                Ok((seg, old)) => {
                    let end = End {
                        next: next[i],
                        base: seg.base,
                        len: old.len + sizes[i] as u64,
                    };
                    batch.put_cf(
                        self.store.cf(CF_META),
                        end_key(&self.topics[*ti].name, *p),
                        end.encode(),
                    );
                    written.push((i, seg, old.len, end));
                }
                Err(e) => {
                    undo(&written);
                    return Err(e);
                }
            }
        }
        if self.store.sync_writes() {
            for (_, seg, _, _) in &written {
                if let Err(e) = seg.sync() {
                    undo(&written);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.store.write(batch) {
            undo(&written);
            return Err(e.into());
        }
        for (i, _, _, end) in &written {
            let (ti, p) = parts[*i];
            *tails[*i] = *end;
            self.topics[ti].partitions[p as usize]
                .committed
                .store(end.next, Ordering::Release);
        }
        drop(tails);
        if wrote_direct {
            metrics::counter!("contextd_direct_commits_total").increment(1);
        }
        if !records.is_empty() {
            *self.generation.lock().expect("gen lock") += 1;
            self.appended.notify_all();
        }
        Ok(assigned)
    }

    /// The segment the next write of a partition goes to: the last one, or
    /// a new one when it is full (or there is none). A new segment becomes
    /// the writer's tail at once (empty); it is committed with the first
    /// batch written to it.
    fn active_segment(&self, ti: usize, p: i32, tail: &mut End) -> Result<Arc<Segment>, LogError> {
        let part = &self.topics[ti].partitions[p as usize];
        let mut segs = part.segments.write().expect("segments lock");
        if let Some(last) = segs.last() {
            // (A segment rolled by a commit that failed is the tail already, empty.)
            if last.base == tail.base && tail.len < self.opts.segment_bytes {
                return Ok(last.clone());
            }
            last.seal()?;
        }
        std::fs::create_dir_all(&part.dir).map_err(|e| LogError::io("create", &part.dir, e))?;
        let seg = Arc::new(open_segment(&part.dir, tail.next, part.direct)?);
        seg.truncate(0)?;
        if self.store.sync_writes() {
            sync_dir(&part.dir)?;
        }
        segs.push(seg.clone());
        *tail = End {
            next: tail.next,
            base: tail.next,
            len: 0,
        };
        Ok(seg)
    }

    /// Appends records (no state change), durable when this returns.
    pub fn append(&self, records: &[OutRecord]) -> Result<Vec<(i32, i64)>, LogError> {
        self.commit(WriteBatch::default(), records)
    }

    /// The first retained offset of a partition and its end (the next
    /// offset to append).
    pub fn offset_range(&self, topic: &str, partition: i32) -> Result<(i64, i64), LogError> {
        let part = self.partition(topic, partition)?;
        let end = part.committed.load(Ordering::Acquire);
        let segs = part.segments.read().expect("segments lock");
        let start = segs.first().map_or(end, |s| s.base.min(end));
        Ok((start, end))
    }

    /// Reads up to `max` records of one partition from `from` (from the
    /// partition's first retained offset if `from` is below it).
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        let part = self.partition(topic, partition)?;
        let end = part.committed.load(Ordering::Acquire);
        if from >= end || max == 0 {
            return Ok(Vec::new());
        }
        let segs: Vec<Arc<Segment>> = part.segments.read().expect("segments lock").clone();
        let Some(first) = segs.first() else {
            return Ok(Vec::new());
        };
        let mut from = from.max(first.base);
        let mut i = segs.partition_point(|s| s.base <= from).saturating_sub(1);
        let mut out = Vec::with_capacity(max.min((end - from).max(0) as usize));
        while from < end && out.len() < max && i < segs.len() {
            let last = segs
                .get(i + 1)
                .map(|s| s.base - 1)
                .unwrap_or(i64::MAX)
                .min(end - 1);
            if from <= last {
                let room = max - out.len();
                segs[i].read(topic, partition, from, last, room, &mut out)?;
            }
            from = last + 1;
            i += 1;
        }
        Ok(out)
    }

    /// The current append generation (pass to `wait`).
    pub fn generation(&self) -> u64 {
        *self.generation.lock().expect("gen lock")
    }

    /// Blocks until something is appended after `seen`, or `timeout`.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.generation.lock().expect("gen lock");
        let (g, _) = self
            .appended
            .wait_timeout_while(g, timeout, |g| *g == seen)
            .expect("gen lock");
        *g
    }

    /// Wakes every waiter (shutdown).
    pub fn wake_all(&self) {
        *self.generation.lock().expect("gen lock") += 1;
        self.appended.notify_all();
    }

    /// Retention: deletes the segments of a partition whose records all lie
    /// below `before` (the active segment is always kept, so slightly more
    /// than asked may remain, as in Kafka).
    pub fn truncate(&self, topic: &str, partition: i32, before: i64) -> Result<(), LogError> {
        let part = self.partition(topic, partition)?;
        let mut segs = part.segments.write().expect("segments lock");
        while segs.len() > 1 && segs[1].base <= before {
            let s = segs.remove(0);
            remove_file(s.path())?;
        }
        Ok(())
    }

    /// Deletes every record of a topic; offsets start at 0 again (rebuild).
    pub fn clear_topic(&self, topic: &str) -> Result<(), LogError> {
        let (_, t) = self.topic(topic)?;
        let mut tails: Vec<MutexGuard<'_, End>> = t
            .partitions
            .iter()
            .map(|part| part.tail.lock().expect("log tail lock"))
            .collect();
        let mut batch = WriteBatch::default();
        for p in 0..t.partitions.len() as i32 {
            batch.delete_cf(self.store.cf(CF_META), end_key(topic, p));
        }
        // Ends first, durably (also in a rebuild's store, which writes no
        // log): a crash before the files are gone leaves files without an
        // end, which the next open deletes.
        self.store.write_durable(batch)?;
        for (p, part) in t.partitions.iter().enumerate() {
            let mut segs = part.segments.write().expect("segments lock");
            for s in segs.drain(..) {
                remove_file(s.path())?;
            }
            part.committed.store(0, Ordering::Release);
            *tails[p] = End::default();
        }
        Ok(())
    }
}

/// Where a checkpoint keeps the embedded topics (beside the store's files).
pub const CHECKPOINT_FOLDER: &str = "embedded-log";

impl EmbeddedLog {
    /// Writes the committed part of every topic into `dst` (a folder of the
    /// same layout as `<data_dir>/log`) for a checkpoint taken with nothing
    /// writing: full segments are hard-linked (they never change again),
    /// the active one is copied up to its committed end.
    pub fn checkpoint(&self, dst: &Path) -> Result<(), LogError> {
        for t in &self.topics {
            for (p, part) in t.partitions.iter().enumerate() {
                let tail = part.tail.lock().expect("log tail lock");
                let segs = part.segments.read().expect("segments lock");
                if segs.is_empty() {
                    continue;
                }
                let to = dst.join(folder_name(&t.name)).join(p.to_string());
                std::fs::create_dir_all(&to).map_err(|e| LogError::io("create", &to, e))?;
                for (i, seg) in segs.iter().enumerate() {
                    let target = to.join(segment::file_name(seg.base));
                    if i + 1 < segs.len() {
                        link_or_copy(seg.path(), &target)?;
                    } else {
                        copy_prefix(seg.path(), &target, tail.len)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Replaces the embedded topics of `data_dir` with those of a checkpoint
/// folder (`src`, as written by `EmbeddedLog::checkpoint`; none for a
/// checkpoint of a data dir without embedded topics). The last segment of
/// each partition is copied (it is appended to again), the others are
/// hard-linked where possible.
pub fn restore_checkpoint(src: &Path, data_dir: &Path) -> Result<(), LogError> {
    let root = data_dir.join("log");
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| LogError::io("delete", &root, e))?;
    }
    if !src.exists() {
        return Ok(());
    }
    let dirs = |d: &Path| -> Result<Vec<PathBuf>, LogError> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(d).map_err(|e| LogError::io("list", d, e))? {
            let e = e.map_err(|e| LogError::io("list", d, e))?;
            if e.path().is_dir() {
                v.push(e.path());
            }
        }
        Ok(v)
    };
    for topic in dirs(src)? {
        for part in dirs(&topic)? {
            let to = root
                .join(topic.file_name().expect("named"))
                .join(part.file_name().expect("named"));
            std::fs::create_dir_all(&to).map_err(|e| LogError::io("create", &to, e))?;
            let bases = list_segments(&part)?;
            for (i, base) in bases.iter().enumerate() {
                let from = part.join(segment::file_name(*base));
                let target = to.join(segment::file_name(*base));
                if i + 1 < bases.len() {
                    link_or_copy(&from, &target)?;
                } else {
                    std::fs::copy(&from, &target).map_err(|e| LogError::io("copy", &from, e))?;
                }
            }
        }
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), LogError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| LogError::io("copy", from, e))
}

fn copy_prefix(from: &Path, to: &Path, len: u64) -> Result<(), LogError> {
    use std::io::Read;
    let src = std::fs::File::open(from).map_err(|e| LogError::io("open", from, e))?;
    let mut dst = std::fs::File::create(to).map_err(|e| LogError::io("create", to, e))?;
    let copied =
        std::io::copy(&mut src.take(len), &mut dst).map_err(|e| LogError::io("copy", from, e))?;
    if copied != len {
        return Err(LogError::Corrupt(format!(
            "{} holds {copied} bytes but {len} were committed; the data dir is damaged",
            from.display()
        )));
    }
    dst.sync_all().map_err(|e| LogError::io("fsync", to, e))
}

fn remove_file(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io("delete", path, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| LogError::io("fsync", dir, e))
}

/// The segment files in `dir`, by base offset.
fn list_segments(dir: &Path) -> Result<Vec<i64>, LogError> {
    let mut bases = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(bases),
        Err(e) => return Err(LogError::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("list", dir, e))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn open_segment(dir: &Path, base: i64, direct: bool) -> Result<Segment, LogError> {
    if direct {
        Segment::open_direct(dir, base)
    } else {
        Segment::open(dir, base)
    }
}

/// Opens a partition's segments and cuts them back to the committed end
/// (only the active one of a `direct` topic is opened for direct writes).
fn recover(
    store: &Store,
    dir: &Path,
    topic: &str,
    p: i32,
    direct: bool,
) -> Result<(Vec<Arc<Segment>>, End), LogError> {
    let bases = list_segments(dir)?;
    let end = match store.get_raw(CF_META, &end_key(topic, p))? {
        Some(v) => End::decode(&v).ok_or_else(|| {
            LogError::Corrupt(format!("the stored end of {topic}[{p}] is unreadable"))
        })?,
        None => End::default(),
    };
    let mut segments = Vec::new();
    for base in bases {
        let path = dir.join(segment::file_name(base));
        if base > end.base || (end.next == 0 && end.len == 0) {
            // Written by a batch whose commit never happened.
            tracing::info!(path = %path.display(), "dropping an uncommitted log segment");
            remove_file(&path)?;
            continue;
        }
        let seg = open_segment(dir, base, direct && base == end.base)?;
        if base == end.base {
            let len = seg.file_len()?;
            if len < end.len {
                return Err(LogError::Corrupt(format!(
                    "{} holds {len} bytes but {} were committed; the data dir is damaged (restore it, or delete the topic's files and rebuild)",
                    path.display(),
                    end.len
                )));
            }
            if len > end.len {
                if seg.is_padding_past(end.len)? {
                    tracing::debug!(path = %path.display(), padding = len - end.len, "cutting the padding of the last direct write");
                } else {
                    tracing::info!(path = %path.display(), dropped = len - end.len, "dropping uncommitted log bytes");
                }
                seg.truncate(end.len)?;
            }
        }
        segments.push(Arc::new(seg));
    }
    if end.len > 0 && segments.last().map(|s| s.base) != Some(end.base) {
        return Err(LogError::Corrupt(format!(
            "the active segment of {topic}[{p}] ({}) is missing; the data dir is damaged",
            dir.join(segment::file_name(end.base)).display()
        )));
    }
    Ok((segments, end))
}

/// Moves topics kept by earlier versions in the store's `log` column family
/// (keys: topic, 0, partition, offset; values: timestamp, key length, key,
/// value) into segment files: every partition's files are written, then one
/// batch stores their ends and deletes the old entries. A crash before that
/// batch leaves files without ends (deleted on the next open) and the old
/// entries in place, so the move starts over.
fn migrate_from_store(
    store: &Store,
    root: &Path,
    topics: &[(String, u32)],
    opts: &LogOptions,
) -> Result<(), LogError> {
    let cf = store.cf(CF_LOG);
    if store
        .db()
        .iterator_cf(cf, IteratorMode::Start)
        .next()
        .transpose()?
        .is_none()
    {
        return Ok(());
    }
    let mut batch = WriteBatch::default();
    let mut moved = 0u64;
    let mut segments = Vec::new();
    for (topic, n) in topics {
        for p in 0..*n as i32 {
            let mut prefix = topic.as_bytes().to_vec();
            prefix.push(0);
            prefix.extend_from_slice(&(p as u32).to_be_bytes());
            let mut entries = store
                .db()
                .iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward))
                .map_while(|item| match item {
                    Ok((k, v)) if k.starts_with(&prefix) && k.len() == prefix.len() + 8 => {
                        let offset =
                            u64::from_be_bytes(k[prefix.len()..].try_into().expect("8")) as i64;
                        Some(Ok((offset, v)))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .peekable();
            if entries.peek().is_none() {
                continue;
            }
            if store.get_raw(CF_META, &end_key(topic, p))?.is_some() {
                return Err(LogError::Corrupt(format!(
                    "{topic}[{p}] has both segment files and entries in the state store's log; the data dir is damaged"
                )));
            }
            if moved == 0 {
                tracing::info!(
                    "moving the embedded topics from the state store into segment files"
                );
            }
            let dir = root.join(folder_name(topic)).join(p.to_string());
            // Left by a move that crashed before its commit.
            for base in list_segments(&dir)? {
                remove_file(&dir.join(segment::file_name(base)))?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| LogError::io("create", &dir, e))?;
            let mut end = End::default();
            let mut seg: Option<Segment> = None;
            let mut buf = Vec::new();
            for item in entries {
                let (offset, v) = item?;
                let (ts, key, value) = decode_old_entry(&v).ok_or_else(|| {
                    LogError::Corrupt(format!(
                        "unreadable entry {topic}[{p}]@{offset} in the state store's log"
                    ))
                })?;
                if seg.is_some() && offset != end.next {
                    return Err(LogError::Corrupt(format!(
                        "{topic}[{p}] jumps from offset {} to {offset} in the state store's log",
                        end.next
                    )));
                }
                if seg.is_none() || end.len >= opts.segment_bytes {
                    if let Some(s) = &seg {
                        s.append(&buf)?;
                        buf.clear();
                        segments.push(s.path().to_path_buf());
                    }
                    seg = Some(Segment::open(&dir, offset)?);
                    end = End {
                        next: offset,
                        base: offset,
                        len: 0,
                    };
                }
                let before = buf.len();
                encode_entry(&mut buf, offset, ts, key, value);
                end.len += (buf.len() - before) as u64;
                end.next = offset + 1;
                if buf.len() >= 8 << 20 {
                    seg.as_ref().expect("opened above").append(&buf)?;
                    buf.clear();
                }
                moved += 1;
            }
            let seg = seg.expect("at least one entry");
            seg.append(&buf)?;
            segments.push(seg.path().to_path_buf());
            batch.put_cf(store.cf(CF_META), end_key(topic, p), end.encode());
            let mut upper = prefix.clone();
            upper.extend_from_slice(&[0xff; 9]);
            batch.delete_range_cf(cf, &prefix[..], &upper[..]);
        }
    }
    if moved == 0 {
        return Ok(());
    }
    for path in &segments {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| LogError::io("fsync", path, e))?;
    }
    store.write(batch)?;
    store
        .db()
        .compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
    tracing::info!(records = moved, "embedded topics moved into segment files");
    Ok(())
}

/// An entry of the old `log` column family: (timestamp, key, value).
type OldEntry<'a> = (i64, Option<&'a [u8]>, &'a [u8]);

fn decode_old_entry(v: &[u8]) -> Option<OldEntry<'_>> {
    let ts = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let klen = i32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    if klen < 0 {
        return Some((ts, None, &v[12..]));
    }
    let end = 12 + klen as usize;
    Some((ts, Some(v.get(12..end)?), v.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Payload;
    use crate::state::StoreOptions;

    fn out(topic: &str, key: Option<&str>, v: &str) -> OutRecord {
        OutRecord {
            topic: topic.into(),
            partition: None,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: v.as_bytes().into(),
            timestamp_ms: 7,
        }
    }

    #[test]
    fn appends_are_durable_ordered_and_partitioned_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("in".to_string(), 1), ("rec".to_string(), 4)];
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let log = EmbeddedLog::open(store, &topics).unwrap();
            let got = log
                .append(&[out("in", None, "a"), out("in", Some("k"), "b")])
                .unwrap();
            assert_eq!(got, vec![(0, 0), (0, 1)]);
            let p = partition_for(b"user-1", 4) as i32;
            assert_eq!(
                log.append(&[out("rec", Some("user-1"), "x")]).unwrap(),
                vec![(p, 0)]
            );
            assert!(log.append(&[out("nope", None, "x")]).is_err());
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let log = EmbeddedLog::open(store, &topics).unwrap();
        assert_eq!(log.end_offsets("in"), vec![2]);
        let recs = log.read("in", 0, 0, 10).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(&recs[1].value[..], b"b");
        assert_eq!(recs[0].key, None);
        assert_eq!(recs[0].timestamp_ms, 7);
        assert_eq!(log.read("in", 0, 1, 10).unwrap().len(), 1);
        assert_eq!(log.append(&[out("in", None, "c")]).unwrap(), vec![(0, 2)]);
    }

    fn open(dir: &Path, topics: &[(String, u32)], segment_bytes: u64) -> EmbeddedLog {
        let store = Store::open(dir, &StoreOptions::default()).unwrap();
        EmbeddedLog::open_with(
            store,
            topics,
            LogOptions {
                segment_bytes,
                ..LogOptions::default()
            },
        )
        .unwrap()
    }

    /// A topic written past the page cache: commits land whole, segments
    /// roll, a reopen cuts the active file's padding back to the committed
    /// end and appends carry on from there (a failed write's undo is
    /// `Segment::truncate`, tested in `segment.rs`). Beside it a buffered
    /// topic. In a dir of the checkout (a tmpfs `/tmp` may refuse direct
    /// I/O).
    #[test]
    fn direct_topics_commit_roll_and_reopen_like_the_others() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let topics = vec![("d".to_string(), 2), ("b".to_string(), 1)];
        let open_d = |dir: &Path| {
            let store = Store::open(dir, &StoreOptions::default()).unwrap();
            let opts = LogOptions {
                segment_bytes: 20_000,
                direct_topics: vec!["d".to_string()],
            };
            EmbeddedLog::open_with(store, &topics, opts).unwrap()
        };
        let value = |i: usize| format!("{i}-{}", "v".repeat(i * 131 % 3000));
        // Every other value in two pieces, as a snapshot's payload is.
        let payload = |i: usize| {
            let v = value(i).into_bytes();
            if i.is_multiple_of(2) {
                return Payload::from(v);
            }
            let (a, b) = v.split_at(v.len() / 3);
            Payload::from_parts(a.to_vec(), bytes::Bytes::copy_from_slice(b))
        };
        let log = open_d(dir.path());
        let mut n = 0;
        let mut want: HashMap<(String, i32), Vec<(i64, String)>> = HashMap::new();
        for batch in 0..40 {
            let recs: Vec<OutRecord> = (0..batch % 7)
                .map(|j| {
                    n += 1;
                    let t = if j % 3 == 2 { "b" } else { "d" };
                    OutRecord {
                        partition: Some((n % 2) as i32 * (t == "d") as i32),
                        value: payload(n),
                        ..out(t, Some("k"), "")
                    }
                })
                .collect();
            let at = if batch % 5 == 3 {
                log.commit(WriteBatch::default(), &recs).unwrap()
            } else {
                log.commit_direct(WriteBatch::default(), &recs).unwrap()
            };
            for (r, (p, off)) in recs.iter().zip(at) {
                let v = String::from_utf8(r.value.to_vec()).unwrap();
                want.entry((r.topic.clone(), p)).or_default().push((off, v));
            }
        }
        let before: Vec<Vec<(i64, String)>> = [("d", 0), ("d", 1), ("b", 0)]
            .iter()
            .map(|(t, p)| values(&log, t, *p, 0))
            .collect();
        for ((t, p), read) in [("d", 0), ("d", 1), ("b", 0)].iter().zip(&before) {
            assert_eq!(read, &want[&(t.to_string(), *p)], "{t}[{p}]");
        }
        assert!(segment_files(dir.path(), "d", 0).len() > 2);
        {
            let segs = log.topics[0].partitions[0].segments.read().unwrap();
            let (last, full) = segs.split_last().unwrap();
            assert!(last.is_direct());
            for s in full {
                assert!(!s.is_direct(), "sealed");
                let len = std::fs::metadata(s.path()).unwrap().len();
                assert!(
                    len >= 20_000 && !len.is_multiple_of(4096),
                    "no padding: {len}"
                );
            }
        }
        let active = |log: &EmbeddedLog, p: usize| {
            let segs = log.topics[0].partitions[p].segments.read().unwrap();
            segs.last().unwrap().clone()
        };
        assert!(active(&log, 0).is_direct());
        assert!(!log.topics[1].partitions[0].segments.read().unwrap()[0].is_direct());
        let committed = log.topics[0].partitions[0].tail.lock().unwrap().len;
        assert!(active(&log, 0).file_len().unwrap() > committed, "padded");
        // What a reopen cuts is told apart from an uncommitted batch's bytes.
        assert!(active(&log, 0).is_padding_past(committed).unwrap());
        assert!(!active(&log, 0).is_padding_past(committed - 1).unwrap());
        drop(log);
        let log = open_d(dir.path());
        let reopened: Vec<Vec<(i64, String)>> = [("d", 0), ("d", 1), ("b", 0)]
            .iter()
            .map(|(t, p)| values(&log, t, *p, 0))
            .collect();
        assert_eq!(reopened, before);
        assert_eq!(active(&log, 0).file_len().unwrap(), committed);
        assert!(active(&log, 0).is_direct());
        let next = log.end_offsets("d")[0];
        let r = OutRecord {
            partition: Some(0),
            ..out("d", Some("k"), "after")
        };
        assert_eq!(
            log.commit_direct(WriteBatch::default(), &[r]).unwrap(),
            vec![(0, next)]
        );
        let mut want = before[0].clone();
        want.push((next, "after".to_string()));
        assert_eq!(values(&log, "d", 0, 0), want);
        drop(log);
        assert_eq!(values(&open_d(dir.path()), "d", 0, 0), want);
    }

    fn values(log: &EmbeddedLog, topic: &str, p: i32, from: i64) -> Vec<(i64, String)> {
        log.read(topic, p, from, 10_000)
            .unwrap()
            .into_iter()
            .map(|r| (r.offset, String::from_utf8(r.value.to_vec()).unwrap()))
            .collect()
    }

    fn segment_files(dir: &Path, topic: &str, p: i32) -> Vec<i64> {
        list_segments(&dir.join("log").join(folder_name(topic)).join(p.to_string())).unwrap()
    }

    /// A drop-behind pass leaves each partition's newest `keep` bytes cached
    /// and drops the rest of its active segment and all of the segment
    /// before (synced writes: clean pages go at the first pass); reads
    /// still return everything.
    #[test]
    fn drop_behind_keeps_the_newest_bytes_of_each_partition_cached() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let opts = StoreOptions {
            sync_writes: true,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), &opts).unwrap();
        let topics = vec![("a".to_string(), 2)];
        let log = EmbeddedLog::open_with(
            store,
            &topics,
            LogOptions {
                segment_bytes: 3 << 20,
                ..LogOptions::default()
            },
        )
        .unwrap();
        let value = "x".repeat(64 << 10);
        for _ in 0..80 {
            let r = OutRecord {
                partition: Some(0),
                ..out("a", None, &value)
            };
            log.commit(WriteBatch::default(), &[r]).unwrap();
        }
        let seg_path = |base: i64| {
            dir.path()
                .join("log")
                .join(folder_name("a"))
                .join("0")
                .join(segment::file_name(base))
        };
        let bases = segment_files(dir.path(), "a", 0);
        assert!(bases.len() >= 2, "{bases:?}");
        let (rolled, active) = (
            seg_path(bases[bases.len() - 2]),
            seg_path(bases[bases.len() - 1]),
        );
        let len = |p: &PathBuf| std::fs::metadata(p).unwrap().len();
        let resident = |p: &PathBuf, from: u64, to: u64| segment::resident_pages(p, from, to);
        assert!(resident(&rolled, 0, len(&rolled)) > 0);
        let keep = 1 << 20;
        log.drop_behind(keep, 0);
        assert_eq!(
            resident(&rolled, 0, len(&rolled)),
            0,
            "the rolled segment dropped"
        );
        let cut = (len(&active) - keep) & !4095;
        assert_eq!(
            resident(&active, 0, cut),
            0,
            "behind the newest bytes dropped"
        );
        assert_eq!(
            resident(&active, cut, len(&active)) as u64,
            (len(&active) - cut).div_ceil(4096),
            "the newest bytes stay cached"
        );
        let all = values(&log, "a", 0, 0);
        assert_eq!(all.len(), 80);
        assert!(all.iter().all(|(_, v)| v == &value));
    }

    /// Commits from several threads at once, each over partitions of its
    /// own and one partition shared by all (several per commit, in any
    /// order): every partition's offsets are gapless, each value is where
    /// its commit was told, once, and everything is still there after a
    /// reopen.
    #[test]
    fn concurrent_commits_keep_every_partition_gapless() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("a".to_string(), 4), ("b".to_string(), 2)];
        let log = open(dir.path(), &topics, 4096);
        let commits = 200;
        std::thread::scope(|s| {
            for w in 0..4i32 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..commits {
                        let mine = |v: String| OutRecord {
                            partition: Some(w),
                            ..out("a", None, &v)
                        };
                        let shared = |v: String| OutRecord {
                            partition: Some(i % 2),
                            ..out("b", None, &v)
                        };
                        let recs = vec![
                            shared(format!("{w}-{i}-x")),
                            mine(format!("{w}-{i}-0")),
                            mine(format!("{w}-{i}-1")),
                        ];
                        let got = log.commit(WriteBatch::default(), &recs).unwrap();
                        for (r, (p, off)) in recs.iter().zip(got) {
                            let read = log.read(&r.topic, p, off, 1).unwrap();
                            assert_eq!(read[0].offset, off);
                            assert_eq!(
                                read[0].value[..],
                                r.value.contiguous()[..],
                                "{} {p} {off}",
                                r.topic
                            );
                        }
                    }
                });
            }
        });
        let check = |log: &EmbeddedLog| {
            for w in 0..4 {
                let all = values(log, "a", w, 0);
                assert_eq!(all.len(), 2 * commits as usize);
                for (n, (off, v)) in all.iter().enumerate() {
                    assert_eq!(*off, n as i64);
                    let i = n / 2;
                    assert_eq!(v, &format!("{w}-{i}-{}", n % 2), "partition {w} in order");
                }
            }
            let mut shared: Vec<String> = Vec::new();
            for p in 0..2 {
                let all = values(log, "b", p, 0);
                for (n, (off, _)) in all.iter().enumerate() {
                    assert_eq!(*off, n as i64, "b/{p} gapless");
                }
                shared.extend(all.into_iter().map(|(_, v)| v));
            }
            shared.sort();
            let mut want: Vec<String> = (0..4)
                .flat_map(|w| (0..commits).map(move |i| format!("{w}-{i}-x")))
                .collect();
            want.sort();
            assert_eq!(shared, want, "each shared value once");
        };
        check(&log);
        drop(log);
        check(&open(dir.path(), &topics, 4096));
    }

    #[test]
    fn segments_roll_reads_cross_them_and_retention_drops_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("t".to_string(), 1)];
        let log = open(dir.path(), &topics, 1000);
        for i in 0..100 {
            log.append(&[out("t", None, &format!("value-{i:03}-{}", "x".repeat(40)))])
                .unwrap();
        }
        let files = segment_files(dir.path(), "t", 0);
        assert!(files.len() > 5, "{files:?}");
        let all = values(&log, "t", 0, 0);
        assert_eq!(all.len(), 100);
        assert!(all
            .iter()
            .enumerate()
            .all(|(i, (o, v))| *o == i as i64 && v.starts_with(&format!("value-{i:03}-"))));
        // Small reads from anywhere, across segment boundaries.
        for from in [0, 13, 17, 18, 50, 99] {
            let got = log.read("t", 0, from, 3).unwrap();
            let want: Vec<i64> = (from..(from + 3).min(100)).collect();
            assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
        }
        log.truncate("t", 0, 60).unwrap();
        let left = segment_files(dir.path(), "t", 0);
        assert!(left[0] <= 60 && left.len() < files.len(), "{left:?}");
        let rest = values(&log, "t", 0, 0);
        assert_eq!(rest.first().unwrap().0, left[0]);
        assert_eq!(rest.last().unwrap().0, 99);
        drop(log);
        let log = open(dir.path(), &topics, 1000);
        assert_eq!(log.end_offsets("t"), vec![100]);
        assert_eq!(values(&log, "t", 0, 0), rest);
        assert_eq!(
            log.append(&[out("t", None, "next")]).unwrap(),
            vec![(0, 100)]
        );
    }

    #[test]
    fn bytes_of_a_batch_that_never_committed_are_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("t".to_string(), 2)];
        let log = open(dir.path(), &topics, 1 << 20);
        log.append(&[out("t", Some("a"), "one"), out("t", Some("a"), "two")])
            .unwrap();
        let p = partition_for(b"a", 2) as i32;
        drop(log);
        // As if a commit wrote its entries and crashed before the state
        // write: more bytes in the active segment, and a new segment.
        let pdir = dir.path().join("log/t").join(p.to_string());
        let mut torn = Vec::new();
        encode_entry(&mut torn, 2, 7, None, b"lost");
        torn.truncate(torn.len() - 2);
        let seg = Segment::open(&pdir, 0).unwrap();
        seg.append(&torn).unwrap();
        Segment::open(&pdir, 3).unwrap().append(b"garbage").unwrap();
        let other = dir.path().join("log/t").join((1 - p).to_string());
        std::fs::create_dir_all(&other).unwrap();
        Segment::open(&other, 0)
            .unwrap()
            .append(b"garbage")
            .unwrap();

        let log = open(dir.path(), &topics, 1 << 20);
        assert_eq!(segment_files(dir.path(), "t", p), vec![0]);
        assert_eq!(segment_files(dir.path(), "t", 1 - p), Vec::<i64>::new());
        assert_eq!(log.end_offsets("t")[p as usize], 2);
        assert_eq!(
            log.append(&[out("t", Some("a"), "three")]).unwrap(),
            vec![(p, 2)]
        );
        assert_eq!(
            values(&log, "t", p, 0),
            vec![(0, "one".into()), (1, "two".into()), (2, "three".into())]
        );
        assert_eq!(log.append(&[out("t", Some("b"), "x")]).unwrap().len(), 1);
    }

    #[test]
    fn a_segment_shorter_than_committed_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("t".to_string(), 1)];
        let log = open(dir.path(), &topics, 1 << 20);
        log.append(&[out("t", None, "one"), out("t", None, "two")])
            .unwrap();
        drop(log);
        let seg = Segment::open(&dir.path().join("log/t/0"), 0).unwrap();
        seg.truncate(10).unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let err = EmbeddedLog::open(store, &topics).err().unwrap();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn cleared_topics_start_again_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("t".to_string(), 1), ("u".to_string(), 1)];
        let log = open(dir.path(), &topics, 100);
        for i in 0..20 {
            log.append(&[out("t", None, &format!("t{i}")), out("u", None, "u")])
                .unwrap();
        }
        log.clear_topic("t").unwrap();
        assert_eq!(log.end_offsets("t"), vec![0]);
        assert!(log.read("t", 0, 0, 10).unwrap().is_empty());
        assert_eq!(segment_files(dir.path(), "t", 0), Vec::<i64>::new());
        assert_eq!(
            log.append(&[out("t", None, "again")]).unwrap(),
            vec![(0, 0)]
        );
        drop(log);
        let log = open(dir.path(), &topics, 100);
        assert_eq!(values(&log, "t", 0, 0), vec![(0, "again".into())]);
        assert_eq!(log.end_offsets("u"), vec![20]);
    }

    /// The layout of earlier versions: entries in the `log` column family.
    fn put_old(store: &Store, topic: &str, p: i32, offset: i64, key: Option<&[u8]>, value: &[u8]) {
        let mut k = topic.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&(p as u32).to_be_bytes());
        k.extend_from_slice(&(offset as u64).to_be_bytes());
        let mut v = (offset * 10).to_be_bytes().to_vec();
        match key {
            Some(key) => {
                v.extend_from_slice(&(key.len() as i32).to_be_bytes());
                v.extend_from_slice(key);
            }
            None => v.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        v.extend_from_slice(value);
        store.db().put_cf(store.cf(CF_LOG), k, v).unwrap();
    }

    #[test]
    fn topics_of_earlier_versions_move_into_segments_once() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![("in".to_string(), 1), ("rec".to_string(), 2)];
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            for o in 0..30 {
                put_old(&store, "in", 0, o, None, format!("in-{o}").as_bytes());
            }
            // Retention had dropped the start of this partition.
            for o in 5..9 {
                put_old(
                    &store,
                    "rec",
                    1,
                    o,
                    Some(b"user"),
                    format!("rec-{o}").as_bytes(),
                );
            }
            // A topic no longer configured stays where it is.
            put_old(&store, "gone", 0, 0, None, b"old");
        }
        for _ in 0..2 {
            let log = open(dir.path(), &topics, 200);
            assert_eq!(log.end_offsets("in"), vec![30]);
            assert_eq!(log.end_offsets("rec"), vec![0, 9]);
            let ins = log.read("in", 0, 0, 100).unwrap();
            assert_eq!(ins.len(), 30);
            assert_eq!(&ins[29].value[..], b"in-29");
            assert_eq!(ins[29].timestamp_ms, 290);
            assert_eq!(ins[29].key, None);
            let recs = log.read("rec", 1, 0, 100).unwrap();
            assert_eq!(
                recs.iter().map(|r| r.offset).collect::<Vec<_>>(),
                vec![5, 6, 7, 8]
            );
            assert_eq!(recs[0].key.as_deref(), Some(&b"user"[..]));
            assert!(segment_files(dir.path(), "in", 0).len() > 1);
            let store = log.store();
            let left: Vec<_> = store
                .db()
                .iterator_cf(store.cf(CF_LOG), IteratorMode::Start)
                .map(|kv| kv.unwrap().0.to_vec())
                .collect();
            assert_eq!(left.len(), 1);
            assert!(left[0].starts_with(b"gone\0"));
            log.append(&[out("in", None, "new")]).unwrap();
            drop(log);
            // The second round: nothing moved again, the new entry kept.
            let log = open(dir.path(), &topics, 200);
            assert_eq!(&log.read("in", 0, 30, 10).unwrap()[0].value[..], b"new");
            log.clear_topic("in").unwrap();
            for o in 0..30 {
                put_old(log.store(), "in", 0, o, None, format!("in-{o}").as_bytes());
            }
        }
    }

    #[test]
    fn checkpoints_hold_the_committed_topics_and_share_nothing_that_changes() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let topics = vec![("t".to_string(), 1)];
        let log = open(&live, &topics, 300);
        for i in 0..40 {
            log.append(&[out("t", None, &format!("v{i}-{}", "y".repeat(30)))])
                .unwrap();
        }
        let cp = dir.path().join("cp");
        rocksdb::checkpoint::Checkpoint::new(log.store().db())
            .unwrap()
            .create_checkpoint(&cp)
            .unwrap();
        log.checkpoint(&cp.join(CHECKPOINT_FOLDER)).unwrap();
        let want = values(&log, "t", 0, 0);
        // The live log goes on after the checkpoint.
        for i in 40..50 {
            log.append(&[out("t", None, &format!("v{i}"))]).unwrap();
        }
        let restored = dir.path().join("restored");
        std::fs::create_dir_all(restored.join("state")).unwrap();
        for e in std::fs::read_dir(&cp).unwrap() {
            let e = e.unwrap();
            if e.file_name() != CHECKPOINT_FOLDER {
                std::fs::copy(e.path(), restored.join("state").join(e.file_name())).unwrap();
            }
        }
        restore_checkpoint(&cp.join(CHECKPOINT_FOLDER), &restored).unwrap();
        let back = open(&restored, &topics, 300);
        assert_eq!(values(&back, "t", 0, 0), want);
        back.append(&[out("t", None, "restored-only")]).unwrap();
        assert_eq!(values(&log, "t", 0, 40)[0].1, "v40");
        assert_eq!(values(&back, "t", 0, 40)[0].1, "restored-only");
        assert_eq!(log.end_offsets("t"), vec![50]);
    }
}
