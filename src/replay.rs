//! Rebuild: drop the materialized state and replay the retained log.
//!
//! Default: replay the records log as resolved live (identity decisions
//! kept). `--from-inputs`: re-run normalization and resolution over the
//! input topics first. Replay uses the same `Materializer` as live
//! processing (and partition restore), with snapshot publishing off; at the
//! end every user's snapshot is settled against the last one published, so
//! versions continue where they were and only changed contexts are re-sent.

use crate::app;
use crate::config::Config;
use crate::log::embedded::EmbeddedLog;
use crate::log::LogRecord;
use crate::pipeline::embedded::RouterStep;
use crate::pipeline::materializer::Materializer;
use crate::pipeline::router::Router;
use crate::pipeline::PipelineError;
use crate::snapshot::Published;
use crate::state::apply::Working;
use crate::state::keys::{self, CF_META, CF_PART};
use crate::state::{RebuildMark, Store, StoreError, StoreOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct RebuildReport {
    pub routed: u64,
    pub replayed: u64,
    pub republished: u64,
    pub elapsed: Duration,
}

fn bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {human_pos}/{human_len} {per_sec} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Reads partition `p` of a topic in chunks, up to its end when called.
fn for_each_chunk(
    log: &EmbeddedLog,
    topic: &str,
    p: u32,
    chunk: usize,
    mut f: impl FnMut(Vec<LogRecord>) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    let end = log.end_offsets(topic).get(p as usize).copied().unwrap_or(0);
    let mut pos = 0i64;
    while pos < end {
        let recs = log.read(topic, p as i32, pos, chunk.min((end - pos) as usize))?;
        let Some(last) = recs.last() else {
            return Ok(());
        };
        pos = last.offset + 1;
        f(recs)?;
    }
    Ok(())
}

/// Materializer options of one of `workers` replay workers: no publishing,
/// and a share of the user-cache budget (as the live threads have; a
/// bigger cache made the replay slower, by the page faults of filling it:
/// BENCHMARKS.md, item 19).
fn replay_options(
    config: &Config,
    workers: usize,
) -> crate::pipeline::materializer::MaterializerOptions {
    app::materializer_share(config, false, workers)
}

/// Runs `f(i)` for each `i` in `0..threads`, each on a thread of its own;
/// returns the sum of what they return, or the first error (a thread that
/// panicked is one).
pub(crate) fn on_threads(
    threads: usize,
    f: impl Fn(usize) -> Result<u64, PipelineError> + Sync,
) -> Result<u64, PipelineError> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|i| s.spawn(move || f(i))).collect();
        let mut total = 0;
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(PipelineError::Store(
                        crate::state::StoreError::Incompatible("a rebuild thread panicked".into()),
                    ));
                }
            }
        }
        first_err.map_or(Ok(total), Err)
    })
}

/// Runs `work` on `workers` threads (at least one, at most one per
/// partition); each thread takes partitions one at a time, the largest
/// first (`sizes`: entries per partition), while any are left (state is
/// partitioned, so threads never touch the same users; taking them as they
/// finish keeps a thread with a busy partition from holding up the
/// others). `work` gets the function that hands out the next partition and
/// the number of threads; returns the sum of what they return, or the
/// first error.
fn on_partition_workers(
    sizes: &[i64],
    workers: usize,
    work: impl Fn(&dyn Fn() -> Option<u32>, usize) -> Result<u64, PipelineError> + Sync,
) -> Result<u64, PipelineError> {
    let workers = workers.clamp(1, sizes.len().max(1));
    let mut order: Vec<u32> = (0..sizes.len() as u32).collect();
    order.sort_by_key(|p| std::cmp::Reverse(sizes[*p as usize]));
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(order));
    let next = || queue.lock().expect("partition queue").pop_front();
    on_threads(workers, |_| work(&next, workers))
}

/// Rebuilds the state of an embedded data dir (contextd must not be running on it).
pub fn rebuild_embedded(
    config: &Config,
    from_inputs: bool,
    progress: bool,
) -> Result<RebuildReport, PipelineError> {
    let started = Instant::now();
    // More background jobs than a live run's: RocksDB gives flushes one
    // thread per four jobs (an atomic flush, below, is one job over every
    // column family; several may run while the replay writes).
    let store_options = StoreOptions {
        background_jobs: 8,
        // No write-ahead log: everything is flushed at the end, and every
        // flush covers all column families at once (BENCHMARKS.md item 83).
        bulk: true,
        ..config.store_options()
    };
    // The materialized state and the identities are dropped; the marks of
    // the last published snapshots (CF snap: version, content hash) are
    // kept so versions continue where consumers saw them. (With
    // `--from-inputs` the routing below rebuilds the identities too: it
    // writes none of the other column families dropped.)
    // How far the live materializing stage got, per partition: it sent the
    // dead letters of those records, so the replay does not send them
    // again (with `--from-inputs` the dead-letter log starts over).
    let mut processed = vec![0i64; config.partitions as usize];
    let log = app::open_embedded_with(config, &store_options, |store| {
        let interrupted = store.interrupted_rebuild()?;
        if interrupted.as_ref().is_some_and(|m| m.from_inputs) && !from_inputs {
            return Err(StoreError::Incompatible(
                "a `contextd rebuild --from-inputs` of this data dir was interrupted, so its records log is only partly re-routed; run it again with --from-inputs".into(),
            )
            .into());
        }
        if !from_inputs {
            processed = match interrupted {
                // The interrupted rebuild emptied the positions: the live
                // stage's are in its mark.
                Some(mark) if mark.processed.len() == processed.len() => mark.processed,
                _ => store.materialized_ends(config.partitions)?,
            };
        }
        // Until the end the state is incomplete: should the rebuild be
        // interrupted, starts refuse the data dir until it is run again.
        store.begin_rebuild(&RebuildMark {
            from_inputs,
            processed: processed.clone(),
        })?;
        Ok(store.drop_column_families(&keys::REBUILT_CFS)?)
    })?;
    let store = log.store().clone();
    tracing::debug!(elapsed = ?started.elapsed(), "rebuild: store opened");
    let mut routed = 0u64;
    let log = if from_inputs {
        let t = &config.topics;
        log.clear_topic(&t.records)?;
        log.clear_topic(&t.dlq)?;
        let mut batch = rocksdb::WriteBatch::default();
        store.delete_prefix(&mut batch, CF_META, b"pos/router/");
        // Durably, as the topics' ends: the routing starts over from here.
        store.write_durable(batch)?;
        let router = Router::new(
            config.topics.clone(),
            config.partitions,
            app::limits(config),
        );
        let total: i64 = t
            .inputs()
            .iter()
            .map(|x| log.end_offsets(x).iter().sum::<i64>())
            .sum();
        let pb = bar(total as u64, "route", progress);
        // The live routing stage's own code, from the start of the inputs.
        let mut stage = RouterStep::new(&log, router)?;
        loop {
            let n = stage.step(&log, config.pipeline.batch_records.max(1))?;
            if n == 0 {
                break;
            }
            routed += n as u64;
            pb.inc(n as u64);
        }
        pb.finish();
        log
    } else {
        log
    };
    store
        .db()
        .delete_cf(store.cf(CF_META), keys::META_SETTINGS)?;
    let topic = config.topics.records.clone();
    let ends = log.end_offsets(&topic);
    let total: i64 = ends.iter().sum();
    let pb = bar(total as u64, "replay", progress);
    // Partitions replay in parallel, each with the live stage's own code;
    // the worker that replayed one settles its snapshots right after, from
    // the users its replay left in its cache.
    let republished = AtomicU64::new(0);
    let flush_started = AtomicBool::new(false);
    let sizes: Vec<i64> = (0..config.partitions)
        .map(|p| ends.get(p as usize).copied().unwrap_or(0))
        .collect();
    // `pipeline.materializer_threads` threads, as the live stage (one per
    // core by default).
    let threads = app::materializer_threads(config) as usize;
    let replayed = on_partition_workers(&sizes, threads, |next, workers| {
        let mut mat = Materializer::new(config.topics.clone(), replay_options(config, workers));
        for (p, done) in processed.iter().enumerate() {
            mat.quiet_dead_letters_below(p as u32, *done);
        }
        let mut replayed = 0u64;
        while let Some(p) = next() {
            for_each_chunk(
                &log,
                &topic,
                p,
                config.pipeline.batch_records.max(1) * 4,
                |chunk| {
                    let m = mat.process(&store, &chunk)?;
                    log.commit(m.batch, &m.out)?;
                    replayed += chunk.len() as u64;
                    pb.inc(chunk.len() as u64);
                    Ok(())
                },
            )?;
            tracing::debug!(elapsed = ?started.elapsed(), p, "rebuild: partition replayed");
            // Settled at once, while its users are the ones in the cache;
            // the partitions left are shared out meanwhile, so the two
            // threads finish closer together than when each replayed all
            // its partitions before settling any.
            republished.fetch_add(settle_snapshots(&log, &mut mat, p)?, Ordering::Relaxed);
            // Its users are not touched again: their memory goes to the
            // next partition's (a smaller peak, fewer pages first touched).
            mat.forget(p);
            tracing::debug!(elapsed = ?started.elapsed(), p, "rebuild: partition settled");
        }
        // The first thread out of partitions starts flushing what the
        // memtables hold so far, on the core it leaves idle while the
        // others finish; the final flush below then writes only the rest.
        // (Not one that only drew empty partitions: it is out at once.)
        // Only an early start: should RocksDB refuse it (writes stalled),
        // the final flush does it all.
        if replayed > 0 && !flush_started.swap(true, Ordering::Relaxed) {
            if let Err(e) = store.start_flush() {
                tracing::debug!(error = %e, "rebuild: early flush not started");
            }
        }
        Ok(replayed)
    })?;
    pb.finish();
    let republished = republished.into_inner();
    store.flush()?;
    store.end_rebuild()?;
    tracing::debug!(elapsed = ?started.elapsed(), "rebuild: store flushed");
    Ok(RebuildReport {
        routed,
        replayed,
        republished,
        elapsed: started.elapsed(),
    })
}

/// After a replay or a partition restore (the one code path for both):
/// every user of partition `p` continues from the last snapshot published
/// (`published`: what a Kafka restore saw on the snapshots topic; else the
/// user's mark in the store), and a snapshot is published only where the visible
/// content differs from it (or its content is unknown). `commit` makes each
/// page of users durable with the snapshots it publishes. Users `mat` has
/// cached are taken from its cache (a replay leaves most of them there), so
/// its cache must agree with the store: `Materializer::forget` the
/// partition first if its users were written by another path.
pub fn settle_partition(
    store: &Store,
    mat: &mut Materializer,
    p: u32,
    published: &dyn Fn(&str) -> Option<Published>,
    commit: &mut dyn FnMut(
        rocksdb::WriteBatch,
        Vec<crate::log::OutRecord>,
    ) -> Result<(), PipelineError>,
) -> Result<usize, PipelineError> {
    let settings = mat.settings(store, p)?;
    let mut count = 0;
    let mut after: Option<String> = None;
    // Held snapshots are settled with the rest: every changed context is
    // published below.
    let mut batch = rocksdb::WriteBatch::default();
    store.delete_prefix(&mut batch, CF_PART, &keys::part_held_prefix(p));
    loop {
        let page = store.user_values_page(p, after.as_deref(), 1024)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut out = Vec::new();
        let uids: Vec<&str> = page.iter().map(|(uid, _)| uid.as_str()).collect();
        let marks = store.get_marks(p, &uids)?;
        for ((uid, value), mark) in page.iter().zip(marks) {
            let mut w = match mat.take_cached(p, uid) {
                Some(w) => w,
                None => Working::new(store.user_value(p, value)?),
            };
            w.end_batch();
            let st = &mut w.state;
            if let Some(last) = published(&st.user_id).or_else(|| mark.as_ref().map(Published::of))
            {
                if last.version > st.snapshot_version
                    || (last.version == st.snapshot_version && last.hash.is_some())
                {
                    st.snapshot_version = last.version;
                    st.snapshot_hash = last.hash.unwrap_or_default();
                    st.snapshot_updated_at_ns = st.snapshot_updated_at_ns.max(last.updated_at_ns);
                }
            }
            let latest = crate::pipeline::materializer::latest_change_ns(st);
            if mat.snapshot_if_changed(
                store,
                &mut batch,
                &mut out,
                p,
                &settings,
                st,
                latest,
                None,
                &mut w.shown_events,
            ) {
                count += 1;
            }
            mat.write_back(store, &mut batch, p, w);
        }
        mat.count_published();
        commit(std::mem::take(&mut batch), out)?;
    }
    if !batch.is_empty() {
        commit(batch, Vec::new())?;
    }
    Ok(count)
}

/// After a rebuild of an embedded data dir (partition `p`, which `mat` has
/// just replayed): versions continue from the marks of the last snapshots
/// published (the rebuild does not drop them).
fn settle_snapshots(
    log: &EmbeddedLog,
    mat: &mut Materializer,
    p: u32,
) -> Result<u64, PipelineError> {
    // A bulk write nothing reads right away: past the page cache.
    let mut commit = |batch, out: Vec<crate::log::OutRecord>| {
        log.commit_direct(batch, &out)
            .map(|_| ())
            .map_err(PipelineError::from)
    };
    Ok(settle_partition(log.store(), mat, p, &|_| None, &mut commit)? as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StoreError;

    fn failed(what: &str) -> PipelineError {
        PipelineError::Store(StoreError::Incompatible(what.into()))
    }

    #[test]
    fn rebuild_threads_sum_what_they_return_and_report_the_first_error() {
        assert_eq!(on_threads(3, |i| Ok(i as u64 + 1)).unwrap(), 6);
        let err = on_threads(3, |i| {
            if i == 0 {
                Ok(1)
            } else {
                Err(failed(&format!("thread {i}")))
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), failed("thread 1").to_string());
        // A thread that panics is an error, not a panic of the caller.
        let err = on_threads(2, |i| if i == 1 { panic!("boom") } else { Ok(1) }).unwrap_err();
        assert!(
            err.to_string().contains("a rebuild thread panicked"),
            "{err}"
        );
    }

    #[test]
    fn partitions_go_out_largest_first_each_to_one_thread() {
        let taken = std::sync::Mutex::new(Vec::new());
        let n = on_partition_workers(&[5, 40, 0, 17], 8, |next, threads| {
            assert_eq!(threads, 4, "at most one per partition");
            let mut mine = 0;
            loop {
                // Taken and noted under one lock: the order noted is the
                // order handed out, whichever thread takes each.
                let mut noted = taken.lock().unwrap();
                let Some(p) = next() else { break };
                noted.push(p);
                mine += 1;
            }
            Ok(mine)
        })
        .unwrap();
        assert_eq!(n, 4, "each partition once");
        assert_eq!(taken.into_inner().unwrap(), [1, 3, 0, 2]);
        // One thread (`pipeline.materializer_threads = 1`) takes them all.
        let n = on_partition_workers(&[5, 40, 0], 1, |next, threads| {
            assert_eq!(threads, 1);
            let mut mine = 0;
            while next().is_some() {
                mine += 1;
            }
            Ok(mine)
        })
        .unwrap();
        assert_eq!(n, 3);
    }
}
