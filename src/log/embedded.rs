//! Embedded mode's topics: durable local logs in the state store's `log`
//! column family, keyed by topic, partition and offset, with log timestamps.
//! Appends that must be atomic with a state change go into that change's
//! `WriteBatch` (`commit`), so embedded mode is exactly-once end to end.

use super::{LogError, LogRecord, OutRecord};
use crate::state::keys::{partition_for, CF_LOG};
use crate::state::Store;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

fn prefix(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&(partition as u32).to_be_bytes());
    k
}

fn entry_key(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut k = prefix(topic, partition);
    k.extend_from_slice(&(offset as u64).to_be_bytes());
    k
}

fn encode_entry(ts_ms: i64, key: Option<&[u8]>, value: &[u8]) -> Vec<u8> {
    let klen = key.map(|k| k.len()).unwrap_or(0);
    let mut v = Vec::with_capacity(12 + klen + value.len());
    v.extend_from_slice(&ts_ms.to_be_bytes());
    match key {
        Some(k) => {
            v.extend_from_slice(&(k.len() as i32).to_be_bytes());
            v.extend_from_slice(k);
        }
        None => v.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    v.extend_from_slice(value);
    v
}

fn decode_entry(v: &[u8]) -> Option<(i64, Option<Vec<u8>>, Vec<u8>)> {
    let ts = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let klen = i32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    let (key, rest) = if klen < 0 {
        (None, &v[12..])
    } else {
        let end = 12 + klen as usize;
        (Some(v.get(12..end)?.to_vec()), v.get(end..)?)
    };
    Some((ts, key, rest.to_vec()))
}

/// The embedded topics of one data dir.
pub struct EmbeddedLog {
    store: Store,
    /// topic -> next offset per partition. Guarded by one mutex held across
    /// offset assignment and the write, so readers never see a gap.
    ends: Mutex<HashMap<String, Vec<i64>>>,
    /// Bumped after every append; readers wait on it.
    generation: Mutex<u64>,
    appended: Condvar,
}

impl EmbeddedLog {
    /// Opens the topics (name, partition count), finding each partition's end.
    pub fn open(store: Store, topics: &[(String, u32)]) -> Result<EmbeddedLog, LogError> {
        let mut ends = HashMap::new();
        for (topic, n) in topics {
            let mut v = Vec::new();
            for p in 0..*n as i32 {
                let mut upper = prefix(topic, p);
                upper.extend_from_slice(&[0xff; 9]);
                let mut it = store.db().iterator_cf(
                    store.cf(CF_LOG),
                    IteratorMode::From(&upper, Direction::Reverse),
                );
                let next = match it.next().transpose()? {
                    Some((k, _))
                        if k.starts_with(&prefix(topic, p))
                            && k.len() == prefix(topic, p).len() + 8 =>
                    {
                        u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes")) as i64 + 1
                    }
                    _ => 0,
                };
                v.push(next);
            }
            ends.insert(topic.clone(), v);
        }
        Ok(EmbeddedLog {
            store,
            ends: Mutex::new(ends),
            generation: Mutex::new(0),
            appended: Condvar::new(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.ends
            .lock()
            .expect("log lock")
            .get(topic)
            .map(|v| v.len() as u32)
    }

    /// The next offset of every partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        self.ends
            .lock()
            .expect("log lock")
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    /// Appends `records` and writes `batch` atomically. Returns (partition, offset) of each record.
    pub fn commit(
        &self,
        mut batch: WriteBatch,
        records: &[OutRecord],
    ) -> Result<Vec<(i32, i64)>, LogError> {
        let cf = self.store.cf(CF_LOG);
        let mut ends = self.ends.lock().expect("log lock");
        let mut assigned = Vec::with_capacity(records.len());
        let mut next: HashMap<&str, Vec<i64>> = HashMap::new();
        for r in records {
            let cur = match next.get_mut(r.topic.as_str()) {
                Some(v) => v,
                None => {
                    let v = ends
                        .get(&r.topic)
                        .cloned()
                        .ok_or_else(|| LogError::UnknownTopic(r.topic.clone()))?;
                    next.entry(r.topic.as_str()).or_insert(v)
                }
            };
            let n = cur.len() as u32;
            let p = match (r.partition, &r.key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for(k, n) as i32,
                (None, None) => 0,
            };
            let slot = cur
                .get_mut(p as usize)
                .ok_or_else(|| LogError::UnknownTopic(format!("{}[{p}]", r.topic)))?;
            let off = *slot;
            *slot += 1;
            batch.put_cf(
                cf,
                entry_key(&r.topic, p, off),
                encode_entry(r.timestamp_ms, r.key.as_deref(), &r.value),
            );
            assigned.push((p, off));
        }
        self.store.write(batch)?;
        for (t, v) in next {
            ends.insert(t.to_string(), v);
        }
        drop(ends);
        if !records.is_empty() {
            *self.generation.lock().expect("gen lock") += 1;
            self.appended.notify_all();
        }
        Ok(assigned)
    }

    /// Appends records (no state change), durable when this returns.
    pub fn append(&self, records: &[OutRecord]) -> Result<Vec<(i32, i64)>, LogError> {
        self.commit(WriteBatch::default(), records)
    }

    /// Reads up to `max` records of one partition from `from`.
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        let end = {
            let ends = self.ends.lock().expect("log lock");
            let v = ends
                .get(topic)
                .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
            *v.get(partition as usize).unwrap_or(&0)
        };
        if from >= end || max == 0 {
            return Ok(Vec::new());
        }
        let pre = prefix(topic, partition);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(entry_key(topic, partition, end));
        let start = entry_key(topic, partition, from.max(0));
        let mut out = Vec::with_capacity(max.min((end - from) as usize));
        for item in self.store.db().iterator_cf_opt(
            self.store.cf(CF_LOG),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&pre) || out.len() >= max {
                break;
            }
            let offset = u64::from_be_bytes(k[pre.len()..].try_into().unwrap_or([0; 8])) as i64;
            let Some((ts, key, value)) = decode_entry(&v) else {
                continue;
            };
            out.push(LogRecord {
                topic: topic.to_string(),
                partition,
                offset,
                timestamp_ms: ts,
                key,
                value,
            });
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

    /// Deletes a topic's records below `before` in each partition (retention).
    pub fn truncate(&self, topic: &str, partition: i32, before: i64) -> Result<(), LogError> {
        let cf = self.store.cf(CF_LOG);
        self.store.db().delete_range_cf(
            cf,
            entry_key(topic, partition, 0),
            entry_key(topic, partition, before),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StoreOptions;

    fn out(topic: &str, key: Option<&str>, v: &str) -> OutRecord {
        OutRecord {
            topic: topic.into(),
            partition: None,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: v.as_bytes().to_vec(),
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
        assert_eq!(recs[1].value, b"b");
        assert_eq!(recs[0].key, None);
        assert_eq!(recs[0].timestamp_ms, 7);
        assert_eq!(log.read("in", 0, 1, 10).unwrap().len(), 1);
        assert_eq!(log.append(&[out("in", None, "c")]).unwrap(), vec![(0, 2)]);
    }
}
