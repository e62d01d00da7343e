//! `contextd digest`: one hex digest over the logical content of the state
//! (timelines, profiles, identity links, type catalog), independent of how
//! the work was batched, of RocksDB's files and of the partition layout.
//!
//! Snapshot versions are deliberately not covered: coalescing a burst of
//! records into one snapshot makes the version count depend on batching.

use super::apply::TypeKind;
use super::keys::{self, CF_IDENT, CF_USERS};
use super::store::{Store, StoreBodies, StoreError};
use crate::model::{Profile, StoredEvent, UserState};
use crate::snapshot::properties_of;
use prost::Message;
use rocksdb::IteratorMode;
use sha2::{Digest, Sha256};

/// A user's logical content: each event hashed with its properties, wherever
/// they are stored (beside the timeline, or inline in older state).
fn user_hash(store: &Store, p: u32, s: &UserState) -> [u8; 32] {
    let bodies = StoreBodies {
        store,
        partition: p,
        user_id: &s.user_id,
        pending: None,
    };
    let mut h = Sha256::new();
    h.update(s.user_id.as_bytes());
    h.update([0]);
    for e in &s.timeline {
        h.update(b"e");
        let mut full = e.clone();
        full.properties = properties_of(e, &bodies).into();
        // Where the properties are stored is not content.
        full.body_in_timeline = false;
        h.update(StoredEvent::encode_to_vec(&full));
    }
    for p in &s.profiles {
        h.update(b"p");
        h.update(Profile::encode_to_vec(p));
    }
    h.finalize().into()
}

pub fn digest(store: &Store) -> Result<String, StoreError> {
    let mut users: Vec<(String, [u8; 32])> = Vec::new();
    for item in store
        .db()
        .iterator_cf(store.cf(CF_USERS), IteratorMode::Start)
    {
        let (k, v) = item?;
        let Some((p, uid)) = keys::split_user(&k) else {
            continue;
        };
        let s = store.user_value(p, &v)?;
        users.push((uid.to_string(), user_hash(store, p, &s)));
    }
    users.sort();
    let mut h = Sha256::new();
    h.update(b"contextd-digest-v1\0users\0");
    for (uid, uh) in &users {
        h.update(uid.as_bytes());
        h.update([0]);
        h.update(uh);
    }
    h.update(b"\0identities\0");
    for item in store
        .db()
        .iterator_cf(store.cf(CF_IDENT), IteratorMode::Start)
    {
        let (k, v) = item?;
        h.update(&k);
        h.update([0]);
        h.update(&v);
        h.update([0]);
    }
    for kind in [TypeKind::Event, TypeKind::Profile] {
        h.update([0, kind.tag()]);
        for (t, e) in store.catalog(kind)? {
            h.update(t.source.as_bytes());
            h.update([0]);
            h.update(t.r#type.as_bytes());
            h.update([0]);
            h.update(e.count.to_be_bytes());
            h.update(e.first_seen_ns.to_be_bytes());
            h.update(e.last_seen_ns.to_be_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}
