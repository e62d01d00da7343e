//! The materializing stage over a stream of records-log entries, in one
//! thread: decode, load, apply, snapshot, and the RocksDB write of each
//! batch (the embedded log's append of the snapshots aside). Steadier than
//! the end-to-end harness for comparing two builds of this stage: no HTTP
//! loader, no routing thread, no second materializing thread beside it.
//! `cargo bench --bench materialize`

use contextd::app;
use contextd::config::Config;
use contextd::log::LogRecord;
use contextd::pipeline::materializer::Materializer;
use contextd::pipeline::router::Router;
use contextd::pipeline::Topics;
use contextd::state::keys::partition_for;
use contextd::state::store::{Store, StoreOptions};
use contextd::workload::Workload;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::collections::HashMap;

/// The allocator of the `contextd` binary (`src/main.rs`), so the stage
/// allocates here as it does there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: u32 = 8;
/// As `pipeline.batch_records` by default.
const BATCH: usize = 4096;

/// `records` workload records over `users` (the harness's workload: seed
/// 42, Zipf users, every type shown), routed as the routing stage does,
/// as records-log entries in log order, one partition after another
/// (one materializing thread takes a share of partitions).
fn records_log(records: usize, users: usize) -> Vec<LogRecord> {
    let t = Topics::default();
    let router = Router::new(t.clone(), PARTITIONS, Default::default());
    let mut w = Workload::new(42, users, 1.0);
    let mut input = vec![LogRecord {
        topic: t.settings.clone(),
        partition: 0,
        offset: 0,
        timestamp_ms: 0,
        key: None,
        value: serde_json::to_vec(&Workload::visibility()).unwrap().into(),
    }];
    for i in 0..records {
        let g = w.next(&t);
        input.push(LogRecord {
            topic: g.topic,
            partition: 0,
            offset: i as i64 + 1,
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: g.key,
            value: g.value.into(),
        });
    }
    // Links made so far: the router's view of committed links.
    let mut links: HashMap<String, String> = HashMap::new();
    let mut by_partition: Vec<Vec<LogRecord>> = (0..PARTITIONS).map(|_| Vec::new()).collect();
    for chunk in input.chunks(BATCH) {
        let routed = router.route(&links, chunk);
        for l in routed.links {
            if let Some(id) = &l.identifier {
                links.insert(id.key(), l.user_id.clone());
            }
        }
        for o in routed.out.into_iter().filter(|o| o.topic == t.records) {
            let p = match (o.partition, &o.key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for(k, PARTITIONS) as i32,
                (None, None) => 0,
            };
            let log = &mut by_partition[p as usize];
            log.push(LogRecord {
                topic: o.topic,
                partition: p,
                offset: log.len() as i64,
                timestamp_ms: o.timestamp_ms,
                key: o.key,
                value: o.value.to_vec().into(),
            });
        }
    }
    by_partition.into_iter().flatten().collect()
}

fn bench(c: &mut Criterion) {
    // Transparent huge pages off, as the binary turns them off (unless
    // MIMALLOC_ALLOW_THP is set).
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers, touches no memory.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    let log = records_log(40_000, 4_000);
    let config = Config::default();
    let mut g = c.benchmark_group("materialize");
    g.sample_size(10);
    g.throughput(Throughput::Elements(log.len() as u64));
    g.bench_function("records_log_40k_records_4k_users", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
                let mat =
                    Materializer::new(Topics::default(), app::materializer_share(&config, true, 2));
                (dir, store, mat)
            },
            |(dir, store, mut mat)| {
                let mut published = 0;
                for batch in log.chunks(BATCH) {
                    let m = mat.process(&store, batch).unwrap();
                    published += m.published;
                    store.write(m.batch).unwrap();
                }
                assert!(published > 0);
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
