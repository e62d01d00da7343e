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
use super::FastMap;

/// Bytes of memory per encoded byte of a user's value (profiles and
/// their attributes: strings, maps and their nodes).
const MEMORY_PER_VALUE_BYTE: usize = 4;
/// Heap per encoded byte of the timeline's events, besides their structs
/// (their strings, with the allocator's rounding).
const HEAP_PER_TIMELINE_BYTE: f64 = 1.5;
/// Heap blocks of even an empty user (its key, id, timeline buffer) with
/// the allocator's rounding, besides the structs themselves.
const ALLOCATIONS_PER_USER: usize = 384;

/// An eviction frees this share of the budget.
const EVICT_SHARE: usize = 16;

/// Bytes of a hash table of `capacity` entries of `entry` bytes: its
/// capacity is 7/8 of its slots, each with a control byte.
pub fn table_bytes(capacity: usize, entry: usize) -> usize {
    capacity * (entry + 1) / 7 * 8
}

/// A slot of the cache's table (the states are boxed: a table keeps its
/// size as users leave it, so its slots stay small).
const SLOT: usize = std::mem::size_of::<((u32, String), Entry)>();

/// Estimated memory of a cached user besides its slot in the cache's
/// table: one struct per timeline event, the id index, the heap behind
/// them, the encoded events of its last snapshot. `tests/user_cache_memory.rs`
/// measures it against the heap for users of 1, 50 and 1,000 events.
fn estimate(working: &Working, value_len: usize) -> usize {
    let shown = working.shown_events.memory();
    std::mem::size_of::<Working>()
        + ALLOCATIONS_PER_USER
        + working.timeline().len() * std::mem::size_of::<crate::model::StoredEvent>()
        + working.index_bytes()
        + (working.timeline_bytes() as f64 * HEAP_PER_TIMELINE_BYTE) as usize
        + value_len.saturating_mul(MEMORY_PER_VALUE_BYTE)
        + shown
}

struct Entry {
    working: Box<Working>,
    bytes: usize,
    used: u64,
}

pub struct UserCache {
    map: FastMap<(u32, String), Entry>,
    /// The users' estimates, summed (their slots in the table apart).
    users: usize,
    /// What `contextd_user_cache_bytes` was last moved to, for this cache.
    reported: usize,
    budget: usize,
    clock: u64,
}

impl UserCache {
    pub fn new(budget_bytes: usize) -> UserCache {
        UserCache {
            map: FastMap::default(),
            users: 0,
            reported: 0,
            budget: budget_bytes,
            clock: 0,
        }
    }

    /// Takes a user's state out (the caller puts it back after the batch).
    pub fn take(&mut self, p: u32, user_id: &str) -> Option<Working> {
        let e = self.map.remove(&(p, user_id.to_string()))?;
        self.users -= e.bytes;
        self.report();
        Some(*e.working)
    }

    /// Moves `contextd_user_cache_bytes` (the sum over every materializing
    /// thread's cache) to this cache's estimate.
    fn report(&mut self) {
        let bytes = self.bytes();
        let gauge = metrics::gauge!("contextd_user_cache_bytes");
        if bytes >= self.reported {
            gauge.increment((bytes - self.reported) as f64);
        } else {
            gauge.decrement((self.reported - bytes) as f64);
        }
        self.reported = bytes;
    }

    /// Keeps a user's state (`value_len`: the encoded size of its value in
    /// the store, the timeline apart).
    pub fn put(&mut self, p: u32, working: Working, value_len: usize) {
        let bytes = estimate(&working, value_len);
        if bytes > self.budget / 4 {
            return; // one user never fills the cache
        }
        self.clock += 1;
        let key = (p, working.state.user_id.clone());
        self.users += bytes;
        if let Some(old) = self.map.insert(
            key,
            Entry {
                working: Box::new(working),
                bytes,
                used: self.clock,
            },
        ) {
            self.users -= old.bytes;
        }
        if self.bytes() > self.budget {
            self.evict();
        }
        self.report();
    }

    /// Drops the least recently used users until a sixteenth of the budget
    /// is free. Freeing more at once dropped warm users that the next
    /// batches loaded again (a quarter: 6.6% of the materializing samples
    /// at a steady 30,000 records/s); freeing less makes these passes over
    /// every user more frequent.
    fn evict(&mut self) {
        let target = self.budget - self.budget / EVICT_SHARE;
        let Some(excess) = self.bytes().checked_sub(target) else {
            return;
        };
        // The age below which users go: the oldest first until enough is
        // freed (ages are unique ticks of `clock`).
        let mut by_age: Vec<(u64, usize)> = self.map.values().map(|e| (e.used, e.bytes)).collect();
        by_age.sort_unstable();
        let mut freed = 0;
        let mut cut = 0;
        for (used, bytes) in by_age {
            if freed >= excess {
                break;
            }
            freed += bytes;
            cut = used + 1;
        }
        let before = self.map.len();
        let mut users = self.users;
        self.map.retain(|_, e| {
            if e.used < cut {
                users -= e.bytes;
                false
            } else {
                true
            }
        });
        self.users = users;
        metrics::counter!("contextd_user_cache_evictions_total")
            .increment((before - self.map.len()) as u64);
    }

    /// Forgets the users of partition `p`.
    pub fn forget_partition(&mut self, p: u32) {
        let mut users = self.users;
        self.map.retain(|(q, _), e| {
            if *q == p {
                users -= e.bytes;
                false
            } else {
                true
            }
        });
        self.users = users;
        self.report();
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.users = 0;
        self.report();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Estimated memory held, bytes: the users and the table's slots (a
    /// table keeps its size as users leave it).
    pub fn bytes(&self) -> usize {
        self.users + self.table_bytes()
    }

    fn table_bytes(&self) -> usize {
        table_bytes(self.map.capacity(), SLOT)
    }
}

impl Drop for UserCache {
    fn drop(&mut self) {
        metrics::gauge!("contextd_user_cache_bytes").decrement(self.reported as f64);
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
        let budget = one * 10 + 32 * SLOT / 7 * 8;
        let mut c = UserCache::new(budget);
        c.put(0, w("a"), 100);
        c.put(0, w("b"), 100);
        assert_eq!(c.users, 2 * one);
        assert_eq!(c.bytes(), 2 * one + c.table_bytes());
        assert!(c.table_bytes() >= 2 * SLOT, "the table counts");
        assert!(c.take(0, "a").is_some());
        assert!(c.take(0, "a").is_none());
        assert_eq!(c.users, one);
        c.put(0, w("a"), 100); // now the newest
        for i in 0..20 {
            c.put(1, w(&format!("x{i}")), 100);
        }
        assert!(c.bytes() <= budget, "{} > {budget}", c.bytes());
        assert!(
            c.take(0, "b").is_none(),
            "least recently used evicted first"
        );
    }

    #[test]
    fn an_eviction_frees_a_sixteenth_of_the_budget_oldest_first() {
        let one = estimate(&w("a"), 100);
        let budget = one * 160;
        let mut c = UserCache::new(budget);
        let mut evicted = 0;
        for i in 0..1000 {
            let before = c.len();
            c.put(0, w(&format!("u{i}")), 100);
            assert!(c.bytes() <= budget, "{} > {budget}", c.bytes());
            if c.len() <= before {
                evicted += 1;
                // Enough for the newest user and a sixteenth of the budget,
                // not much more (one user's worth of slack).
                let free = budget - c.bytes();
                assert!(free >= budget / 16, "{free}");
                assert!(free < budget / 16 + 2 * one, "{free}");
            }
        }
        assert!(evicted > 10, "{evicted}");
        let kept = c.len();
        assert!(
            (0..1000 - kept).all(|i| c.take(0, &format!("u{i}")).is_none()),
            "the oldest went"
        );
        assert!((1000 - kept..1000).all(|i| c.take(0, &format!("u{i}")).is_some()));
    }

    #[test]
    fn forget_partition_and_oversized_users() {
        let mut c = UserCache::new(estimate(&w("a"), 100) * 10 + 16 * SLOT);
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
        assert!(c.is_empty() && c.users == 0);
        assert_eq!(c.bytes(), c.table_bytes(), "the table stays allocated");
    }
}
