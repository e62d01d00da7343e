//! Decoded states of recently touched users, kept across batches by the
//! materializing stage: a busy user's timeline (up to
//! `timeline.max_events_per_user` events) is then not read, decoded and
//! indexed again for every batch. Bounded by an estimate of its memory
//! (`storage.user_cache_mb`); the least recently used users go first.
//!
//! The cache only ever holds states equal to what the stage last wrote to
//! the store; whoever writes users another way (settings re-publishing,
//! restore) forgets the partition first.

use super::apply::Working;
use std::collections::HashMap;

/// Bytes of memory per byte of encoded state (strings and the id index).
const MEMORY_PER_ENCODED_BYTE: usize = 4;
/// Heap blocks of even an empty user (its key, id, id index, timeline
/// buffer) with the allocator's rounding, besides the structs themselves.
const ALLOCATIONS_PER_USER: usize = 256;

/// Estimated memory of a cached user: the structs (the map's slot and one
/// per timeline event) plus the heap behind them. Users of one or two
/// events are mostly structs: counting their encoded bytes alone took a
/// budget of 96 MiB for about 190 MiB of memory (1M-user benchmark).
fn estimate(working: &Working, encoded_len: usize) -> usize {
    let shown = working.shown_events.encoded_len();
    std::mem::size_of::<((u32, String), Entry)>()
        + ALLOCATIONS_PER_USER
        + working.timeline().len() * std::mem::size_of::<crate::model::StoredEvent>()
        + encoded_len.saturating_mul(MEMORY_PER_ENCODED_BYTE)
        + shown
}

struct Entry {
    working: Working,
    bytes: usize,
    used: u64,
}

pub struct UserCache {
    map: HashMap<(u32, String), Entry>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

impl UserCache {
    pub fn new(budget_bytes: usize) -> UserCache {
        UserCache {
            map: HashMap::new(),
            bytes: 0,
            budget: budget_bytes,
            clock: 0,
        }
    }

    /// Takes a user's state out (the caller puts it back after the batch).
    pub fn take(&mut self, p: u32, user_id: &str) -> Option<Working> {
        let e = self.map.remove(&(p, user_id.to_string()))?;
        self.set_bytes(self.bytes - e.bytes);
        Some(e.working)
    }

    /// Sets the estimate held, and moves `contextd_user_cache_bytes` (the
    /// sum over every materializing thread's cache) by the difference.
    fn set_bytes(&mut self, bytes: usize) {
        let gauge = metrics::gauge!("contextd_user_cache_bytes");
        if bytes >= self.bytes {
            gauge.increment((bytes - self.bytes) as f64);
        } else {
            gauge.decrement((self.bytes - bytes) as f64);
        }
        self.bytes = bytes;
    }

    /// Keeps a user's state (`encoded_len`: its size in the store; the
    /// encoded snapshot events kept with it count as they are).
    pub fn put(&mut self, p: u32, working: Working, encoded_len: usize) {
        let bytes = estimate(&working, encoded_len);
        if bytes > self.budget / 4 {
            return; // one user never fills the cache
        }
        self.clock += 1;
        let key = (p, working.state.user_id.clone());
        let mut total = self.bytes + bytes;
        if let Some(old) = self.map.insert(
            key,
            Entry {
                working,
                bytes,
                used: self.clock,
            },
        ) {
            total -= old.bytes;
        }
        self.set_bytes(total);
        if self.bytes > self.budget {
            self.evict();
        }
    }

    /// Drops the least recently used users until a quarter of the budget is free.
    fn evict(&mut self) {
        let mut by_age: Vec<(u64, (u32, String))> =
            self.map.iter().map(|(k, e)| (e.used, k.clone())).collect();
        by_age.sort_unstable();
        let target = self.budget / 4 * 3;
        let mut total = self.bytes;
        for (_, k) in by_age {
            if total <= target {
                break;
            }
            if let Some(e) = self.map.remove(&k) {
                total -= e.bytes;
            }
        }
        self.set_bytes(total);
        metrics::counter!("contextd_user_cache_evictions_total").increment(1);
    }

    /// Forgets the users of partition `p`.
    pub fn forget_partition(&mut self, p: u32) {
        let mut total = self.bytes;
        self.map.retain(|(q, _), e| {
            if *q == p {
                total -= e.bytes;
                false
            } else {
                true
            }
        });
        self.set_bytes(total);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.set_bytes(0);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Estimated memory held, bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for UserCache {
    fn drop(&mut self) {
        self.set_bytes(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::apply::new_user;

    fn w(id: &str) -> Working {
        Working::new(new_user(id))
    }

    #[test]
    fn take_returns_what_was_put_and_budget_evicts_the_oldest() {
        let one = estimate(&w("a"), 100);
        assert!(one > 400, "encoded bytes x4 plus the structs: {one}");
        let budget = one * 10;
        let mut c = UserCache::new(budget);
        c.put(0, w("a"), 100);
        c.put(0, w("b"), 100);
        assert_eq!(c.bytes(), 2 * one);
        assert!(c.take(0, "a").is_some());
        assert!(c.take(0, "a").is_none());
        assert_eq!(c.bytes(), one);
        c.put(0, w("a"), 100); // now the newest
        for i in 0..9 {
            c.put(1, w(&format!("x{i}")), 100);
        }
        assert!(c.bytes() <= budget);
        assert!(
            c.take(0, "b").is_none(),
            "least recently used evicted first"
        );
    }

    #[test]
    fn forget_partition_and_oversized_users() {
        let mut c = UserCache::new(estimate(&w("a"), 100) * 10);
        c.put(0, w("a"), 100);
        c.put(1, w("b"), 100);
        c.forget_partition(0);
        assert!(c.take(0, "a").is_none());
        assert_eq!(c.len(), 1);
        c.put(2, w("huge"), 1000);
        assert!(
            c.take(2, "huge").is_none(),
            "a user over a quarter of the budget is not kept"
        );
        c.clear();
        assert!(c.is_empty() && c.bytes() == 0);
    }
}
