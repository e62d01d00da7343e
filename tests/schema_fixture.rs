//! Schema evolution: records-log entries encoded by this version (a fixture
//! committed to the repo) must replay to the same state in every later
//! version. Regenerate only on purpose: `CONTEXTD_WRITE_FIXTURES=1 cargo test --test schema_fixture`.

use contextd::app::{embedded_topics, limits, materializer_options};
use contextd::config::Config;
use contextd::log::embedded::EmbeddedLog;
use contextd::log::OutRecord;
use contextd::pipeline::embedded::{MaterializerStep, RouterStep};
use contextd::pipeline::materializer::Materializer;
use contextd::pipeline::router::Router;
use contextd::state::digest::digest;
use contextd::state::Store;
use contextd::workload::Workload;
use std::path::Path;

const FIXTURE: &str = "tests/fixtures/records-v1.bin";
const DIGEST: &str = "tests/fixtures/records-v1.digest";

fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        partitions: 4,
        ..Config::default()
    }
}

fn open(c: &Config) -> EmbeddedLog {
    EmbeddedLog::open(
        Store::open(&c.data_dir, &c.store_options()).unwrap(),
        &embedded_topics(c),
    )
    .unwrap()
}

/// Routes a small generated workload and returns the records log entries.
fn write_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let log = open(&c);
    let mut w = Workload::new(9, 50, 1.0);
    let mut recs = vec![OutRecord {
        topic: c.topics.settings.clone(),
        partition: None,
        key: Some(b"visibility".to_vec()),
        value: Workload::visibility().to_string().into_bytes().into(),
        timestamp_ms: 1_764_000_000_000,
    }];
    for i in 0..400 {
        let g = w.next(&c.topics);
        recs.push(OutRecord {
            topic: g.topic,
            partition: None,
            key: g.key,
            value: g.value.into(),
            timestamp_ms: 1_764_000_000_000 + i,
        });
    }
    log.append(&recs).unwrap();
    let mut router = RouterStep::new(
        &log,
        Router::new(c.topics.clone(), c.partitions, limits(&c)),
    )
    .unwrap();
    while router.step(&log, 1000).unwrap() > 0 {}
    let mut out = Vec::new();
    for p in 0..c.partitions as i32 {
        for r in log.read(&c.topics.records, p, 0, 100_000).unwrap() {
            out.extend_from_slice(&(r.partition as u32).to_be_bytes());
            out.extend_from_slice(&r.timestamp_ms.to_be_bytes());
            let key = r.key.unwrap_or_default();
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(&key);
            out.extend_from_slice(&(r.value.len() as u32).to_be_bytes());
            out.extend_from_slice(&r.value);
        }
    }
    std::fs::write(FIXTURE, out).unwrap();
}

fn read_fixture(c: &Config) -> Vec<OutRecord> {
    let bytes =
        std::fs::read(FIXTURE).expect("fixture missing: run with CONTEXTD_WRITE_FIXTURES=1 once");
    let mut out = Vec::new();
    let mut i = 0;
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    while i < bytes.len() {
        let p = u32_at(i) as i32;
        let ts = i64::from_be_bytes(bytes[i + 4..i + 12].try_into().unwrap());
        let kl = u32_at(i + 12);
        let key = bytes[i + 16..i + 16 + kl].to_vec();
        i += 16 + kl;
        let vl = u32_at(i);
        let value = bytes[i + 4..i + 4 + vl].to_vec();
        i += 4 + vl;
        out.push(OutRecord {
            topic: c.topics.records.clone(),
            partition: Some(p),
            key: Some(key),
            value: value.into(),
            timestamp_ms: ts,
        });
    }
    out
}

#[test]
fn records_encoded_by_v1_still_replay_to_the_same_state() {
    if std::env::var("CONTEXTD_WRITE_FIXTURES").is_ok() {
        write_fixture();
    }
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let log = open(&c);
    let recs = read_fixture(&c);
    assert!(recs.len() > 400, "fixture has {} records", recs.len());
    log.append(&recs).unwrap();
    let mut mat = MaterializerStep::new(
        &log,
        Materializer::new(c.topics.clone(), materializer_options(&c, true)),
    )
    .unwrap();
    while mat.step(&log, 64).unwrap().0 > 0 {}
    let got = digest(log.store()).unwrap();
    if std::env::var("CONTEXTD_WRITE_FIXTURES").is_ok() {
        std::fs::write(DIGEST, &got).unwrap();
    }
    let want = std::fs::read_to_string(DIGEST).expect("digest fixture missing");
    assert_eq!(
        got,
        want.trim(),
        "records written by format v1 must replay to the same state"
    );
}
