//! Micro-benchmarks of the hot path: parse+validate, resolve, apply, snapshot encode.
//! `cargo bench --bench hot_path`

use contextd::identity::resolve;
use contextd::ingest::{normalize, InputKind, Limits, Normalized};
use contextd::model::{record, EventRecord, Record, Settings, TypeRef};
use contextd::pipeline::Topics;
use contextd::snapshot;
use contextd::state::apply::{apply, new_user, ApplyLimits, CatalogDelta, Working};
use contextd::workload::Workload;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;
use std::collections::HashMap;

fn inputs(n: usize) -> Vec<(InputKind, Vec<u8>)> {
    let t = Topics::default();
    let mut w = Workload::new(1, 10_000, 1.0);
    (0..n)
        .map(|_| {
            let g = w.next(&t);
            (t.kind(&g.topic).unwrap(), g.value)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let recs = inputs(1000);
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.bench_function("parse_validate", |b| {
        b.iter(|| {
            for (k, v) in &recs {
                black_box(normalize(*k, v, 0, Limits::default()).ok());
            }
        })
    });
    // The parse alone (BENCHMARKS.md item 54): `serde_json`'s tree against
    // the borrowed view the validators read.
    let texts: Vec<&str> = recs
        .iter()
        .map(|(_, v)| std::str::from_utf8(v).expect("utf-8"))
        .collect();
    g.bench_function("parse_json_serde_value", |b| {
        b.iter(|| {
            for t in &texts {
                black_box(serde_json::from_str::<serde_json::Value>(t).ok());
            }
        })
    });
    g.bench_function("parse_json_borrowed", |b| {
        b.iter(|| {
            for t in &texts {
                black_box(contextd::model::value::from_str(t).ok());
            }
        })
    });
    let normalized: Vec<Normalized> = recs
        .iter()
        .filter_map(|(k, v)| normalize(*k, v, 0, Limits::default()).ok())
        .collect();
    let links: HashMap<String, String> = (0..10_000)
        .map(|i| {
            (
                format!("email:customer{i}@example.com"),
                format!("{}", 10_000_000 + i),
            )
        })
        .collect();
    g.bench_function("resolve", |b| {
        b.iter(|| {
            for n in &normalized {
                let (u, ids) = n.identity();
                black_box(resolve(u, ids, &links, true));
            }
        })
    });
    let events: Vec<Record> = normalized
        .iter()
        .filter_map(|n| match n {
            Normalized::Zendesk { event, .. } => Some(Record {
                log_time_ns: event.created_at_ns,
                body: Some(record::Body::Event(EventRecord {
                    event: Some(event.clone()),
                    profile: None,
                })),
                ..Default::default()
            }),
            _ => None,
        })
        .collect();
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("apply_to_state", |b| {
        // The records are consumed (their events move into the state):
        // each iteration gets fresh copies, made outside the timing.
        b.iter_batched(
            || events.clone(),
            |mut records| {
                let mut s = Working::new(new_user("u"));
                let mut cat = CatalogDelta::new();
                for r in &mut records {
                    apply(&mut s, r, ApplyLimits::default(), &mut cat);
                }
                black_box(s.timeline().len())
            },
            BatchSize::LargeInput,
        )
    });
    let mut w = Working::new(new_user("u"));
    let mut cat = CatalogDelta::new();
    for mut r in events {
        apply(&mut w, &mut r, ApplyLimits::default(), &mut cat);
    }
    let full = w.into_state();
    let settings = std::sync::Arc::new(snapshot::prepared(Settings {
        zendesk_events: true,
        events_api: true,
        profiles_api: true,
        shown_event_types: vec![
            TypeRef::new("zendesk", "article_viewed"),
            TypeRef::new("zendesk", "help_center_searched"),
        ],
        shown_profile_types: vec![],
    }));
    g.throughput(Throughput::Elements(1));
    g.bench_function("snapshot_unchanged_check", |b| {
        b.iter(|| black_box(snapshot::visible_hash(&full, &settings, 50)))
    });
    g.bench_function("snapshot_build_encode", |b| {
        b.iter(|| {
            black_box(
                snapshot::build(&full, &settings, 50, usize::MAX, &())
                    .encode_to_vec()
                    .len(),
            )
        })
    });
    g.bench_function("snapshot_next_reusing_encoded_events", |b| {
        // The materializer's case: the events of the user's last snapshot
        // are kept encoded; the hash is cleared so a snapshot is made.
        let mut st = full.clone();
        let mut shown = snapshot::EncodedEvents::new();
        snapshot::next_snapshot(&mut st, &settings, 50, usize::MAX, 1, &mut shown, &()).unwrap();
        b.iter(|| {
            st.snapshot_hash.clear();
            black_box(
                snapshot::next_snapshot(&mut st, &settings, 50, usize::MAX, 2, &mut shown, &())
                    .map(|s| s.len()),
            )
        })
    });
    g.bench_function("user_state_decode_encode_1000_events", |b| {
        let bytes = full.encode_to_vec();
        b.iter(|| {
            black_box(
                contextd::model::UserState::decode(&bytes[..])
                    .unwrap()
                    .encode_to_vec()
                    .len(),
            )
        })
    });
    // A user loaded again after the user cache evicted it: its value and
    // its 1,000 timeline keys (each with ~500 bytes of properties, as the
    // workload's events) read back from RocksDB, flushed to a table.
    let dir = tempfile::tempdir().unwrap();
    let store = contextd::state::Store::open(dir.path(), &Default::default()).unwrap();
    let mut stored = full.clone();
    stored.timeline_split = false;
    for (i, e) in stored.timeline.iter_mut().enumerate() {
        let mut props = prost_types::Struct::default();
        props.fields.insert(
            "note".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(format!("{i:0>500}"))),
            },
        );
        e.properties = props.encode_to_vec().into();
        e.body_in_timeline = true;
    }
    let mut batch = rocksdb::WriteBatch::default();
    store.put_user(&mut batch, 0, &mut stored);
    store.write(batch).unwrap();
    store.flush().unwrap();
    g.bench_function("store_load_user_1000_events", |b| {
        b.iter(|| {
            black_box(
                store
                    .get_user(0, &full.user_id)
                    .unwrap()
                    .expect("stored")
                    .timeline
                    .len(),
            )
        })
    });
    // As the materializing stage loads it: with its newest 50 events'
    // properties (what its next snapshot shows), read after the timeline.
    g.bench_function("store_load_user_1000_events_with_50_properties", |b| {
        b.iter(|| {
            let users = store.get_users(&[(0, full.user_id.as_str())], 50).unwrap();
            black_box(users[0].as_ref().expect("stored").timeline.len())
        })
    });
    // The properties a snapshot of that user shows, read back (its last
    // snapshot's encoded events went with it from the cache: a user loaded
    // without them, as `GET .../events` does).
    let loaded = store.get_user(0, &full.user_id).unwrap().expect("stored");
    let newest: Vec<&contextd::model::StoredEvent> =
        loaded.timeline.iter().rev().take(50).collect();
    let bodies = contextd::state::store::StoreBodies {
        store: &store,
        partition: 0,
        user_id: &loaded.user_id,
        pending: None,
    };
    g.bench_function("store_properties_of_50_events", |b| {
        b.iter(|| {
            use contextd::snapshot::Bodies;
            black_box(bodies.properties_many(&newest).len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
