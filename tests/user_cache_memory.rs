//! The user cache's memory estimate against the heap its users really hold
//! (`storage.user_cache_mb` bounds the estimate, so an estimate far above
//! the truth wastes the budget, one below it breaks the memory bound).
//! Users are built as the materializing stage builds them: the workload's
//! events applied, the batch ended (properties handed to the store), the
//! snapshot made (its events kept encoded), the state resumed and cached.

use contextd::ingest::{normalize, Limits, Normalized};
use contextd::model::{record, EventRecord, Record, Settings, StoredEvent, TypeRef, UserState};
use contextd::pipeline::Topics;
use contextd::snapshot::{self, Bodies};
use contextd::state::apply::{apply, new_user, ApplyLimits, CatalogDelta, Working};
use contextd::state::cache::UserCache;
use contextd::workload::Workload;
use prost::Message;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

/// mimalloc (the binary's allocator), counting every live block at the
/// size of its mimalloc size class (multiples of 8 bytes up to 64, then
/// four classes per power of two).
struct Counting;

fn class(size: usize) -> isize {
    let words = size.div_ceil(8).max(1);
    if words <= 8 {
        return (words * 8) as isize;
    }
    let top = usize::BITS - 1 - (words - 1).leading_zeros();
    let step = 1usize << (top - 2);
    ((words - 1) / step + 1) as isize * step as isize * 8
}

static LIVE: AtomicIsize = AtomicIsize::new(0);
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = INNER.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(class(l.size()), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(class(l.size()), Ordering::Relaxed);
        INNER.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = INNER.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(class(l.size()), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = INNER.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(class(new) - class(l.size()), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct MapBodies(contextd::state::FastMap<String, bytes::Bytes>);

impl Bodies for MapBodies {
    fn properties(&self, e: &StoredEvent) -> Vec<u8> {
        self.0.get(&e.id).map(|b| b.to_vec()).unwrap_or_default()
    }
}

/// The workload's events, as the router stores them.
fn events(n: usize) -> Vec<StoredEvent> {
    let t = Topics::default();
    let mut w = Workload::new(7, 1000, 1.0);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let g = w.next(&t);
        match normalize(t.kind(&g.topic).unwrap(), &g.value, 0, Limits::default()) {
            Ok(Normalized::Zendesk { event, .. }) | Ok(Normalized::Custom { event, .. }) => {
                out.push(event)
            }
            _ => {}
        }
    }
    out
}

/// A user of `events` as the materializing stage caches it after a batch;
/// returns it with the encoded length of its value, timeline apart (what
/// `write_back` passes).
fn cached_user(id: &str, events: &[StoredEvent], settings: &Arc<Settings>) -> (Working, usize) {
    let mut w = Working::new(new_user(id));
    let mut cat = CatalogDelta::new();
    for e in events {
        let mut r = Record {
            log_time_ns: e.created_at_ns,
            body: Some(record::Body::Event(EventRecord {
                event: Some(e.clone()),
                profile: None,
            })),
            ..Default::default()
        };
        apply(&mut w, &mut r, ApplyLimits::default(), &mut cat);
    }
    let changes = w.end_batch();
    let bodies = MapBodies(changes.new_bodies);
    let mut shown = std::mem::take(&mut w.shown_events);
    snapshot::next_snapshot(
        &mut w.state,
        settings,
        50,
        usize::MAX,
        1,
        &mut shown,
        &bodies,
    );
    w.shown_events = shown;
    let value = UserState {
        timeline: Vec::new(),
        ..w.state.clone()
    }
    .encoded_len();
    w.resume();
    (w, value)
}

/// (estimate, heap) in bytes for `users` users of `per_user` events each.
fn measure(users: usize, per_user: usize) -> (usize, usize) {
    let all = events(per_user);
    let settings = Arc::new(snapshot::prepared(Settings {
        zendesk_events: true,
        events_api: true,
        profiles_api: true,
        // Every type the events have: the benchmark's settings.
        shown_event_types: all
            .iter()
            .map(|e| TypeRef::new(e.source.clone(), e.r#type.clone()))
            .collect(),
        shown_profile_types: Vec::new(),
    }));
    let mut cache = UserCache::new(usize::MAX / 2);
    let built: Vec<_> = (0..users)
        .map(|i| cached_user(&format!("user-{i:08}"), &all, &settings))
        .collect();
    for (w, len) in built {
        cache.put(0, w, len);
    }
    let estimate = cache.bytes();
    // What the cache holds is what dropping it frees: the users and the
    // map's table.
    let before = LIVE.load(Ordering::Relaxed);
    drop(cache);
    let heap = before - LIVE.load(Ordering::Relaxed);
    (estimate, heap as usize)
}

#[test]
fn the_estimate_is_within_reach_of_the_heap_users_hold() {
    for (users, per_user) in [(20_000, 1), (2_000, 50), (200, 1000)] {
        let (estimate, heap) = measure(users, per_user);
        let ratio = estimate as f64 / heap as f64;
        eprintln!(
            "{users} users of {per_user} events: estimate {estimate} B, heap {heap} B, ratio {ratio:.2}"
        );
        assert!(
            (0.85..=1.25).contains(&ratio),
            "{users} users of {per_user} events: the estimate is {ratio:.2} times the heap"
        );
    }
}
