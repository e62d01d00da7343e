//! Applying a record to a user's state: a pure fold, the heart of the
//! materializing stage. Deterministic: same state + record = same result.

use crate::ingest::{ErrorCode, Rejection};
use crate::model::{
    json, record, CatalogEntry, EventRecord, Identifier, Profile, ProfileOp, ProfileOpKind,
    ProfileRef, Record, StoredEvent, UserState, FORMAT_VERSION,
};
use prost_types::{value::Kind, Struct};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::OnceLock;

/// Kind of a catalog entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TypeKind {
    Event,
    Profile,
}

impl TypeKind {
    pub fn tag(self) -> u8 {
        match self {
            TypeKind::Event => b'e',
            TypeKind::Profile => b'p',
        }
    }
}

/// Catalog changes of a batch: (kind, source, type) -> counts.
pub type CatalogDelta = BTreeMap<(TypeKind, String, String), CatalogEntry>;

pub fn catalog_add(delta: &mut CatalogDelta, kind: TypeKind, source: &str, ty: &str, at_ns: i64) {
    let e = delta
        .entry((kind, source.to_string(), ty.to_string()))
        .or_insert(CatalogEntry {
            count: 0,
            first_seen_ns: at_ns,
            last_seen_ns: at_ns,
        });
    merge_catalog(
        e,
        &CatalogEntry {
            count: 1,
            first_seen_ns: at_ns,
            last_seen_ns: at_ns,
        },
    );
}

pub fn merge_catalog(into: &mut CatalogEntry, d: &CatalogEntry) {
    if into.count == 0 {
        *into = *d;
        return;
    }
    into.count += d.count;
    into.first_seen_ns = into.first_seen_ns.min(d.first_seen_ns);
    into.last_seen_ns = into.last_seen_ns.max(d.last_seen_ns);
}

#[derive(Debug, Clone, Copy)]
pub struct ApplyLimits {
    pub max_events_per_user: usize,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        ApplyLimits {
            max_events_per_user: 1000,
        }
    }
}

/// What applying a record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed (or may have).
    Applied,
    /// An event whose id the timeline already holds: the event is not
    /// stored (a custom event's profile part is applied all the same).
    Duplicate,
    /// Not applied; goes to the dead-letter topic.
    Rejected(Rejection),
}

/// The ids of a timeline, for duplicate checks in O(1): a count per 64-bit
/// hash of an id, not the ids themselves (a cached user of 1,000 events
/// held every id twice). A hash found is confirmed against the timeline,
/// so two ids of one hash are still told apart.
#[derive(Default)]
struct IdIndex(HashMap<u64, u32, BuildHasherDefault<Prehashed>>);

/// The keys of `IdIndex` are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// One keyed hash for every id index of the process (foldhash, seeded at
/// random per process: ids come from outside).
fn id_hash(id: &str) -> u64 {
    static KEYS: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(id)
}

impl IdIndex {
    fn new<'a>(ids: impl Iterator<Item = &'a str>) -> IdIndex {
        let mut index = IdIndex::default();
        for id in ids {
            index.insert(id_hash(id));
        }
        index
    }

    /// Counts an id by its `id_hash`.
    fn insert(&mut self, hash: u64) {
        *self.0.entry(hash).or_insert(0) += 1;
    }

    fn remove(&mut self, id: &str) {
        let h = id_hash(id);
        if let Some(n) = self.0.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&h);
            }
        }
    }

    /// Whether `timeline` or `late` holds `id` (`hash`: its `id_hash`),
    /// looked for newest first: duplicates are mostly recent ones.
    fn holds(
        &self,
        hash: u64,
        id: &str,
        timeline: &VecDeque<StoredEvent>,
        late: &VecDeque<StoredEvent>,
    ) -> bool {
        self.0.contains_key(&hash)
            && (late.iter().rev().any(|e| e.id == id) || timeline.iter().rev().any(|e| e.id == id))
    }

    fn table_bytes(&self) -> usize {
        crate::state::cache::table_bytes(self.0.capacity(), std::mem::size_of::<(u64, u32)>())
    }
}

/// A user's state while a batch is applied to it: the timeline as a deque
/// (appending the newest and dropping the oldest are O(1)) with an index of
/// its ids (duplicate checks are O(1)).
pub struct Working {
    pub state: UserState,
    timeline: VecDeque<StoredEvent>,
    /// Events of this batch older than the timeline's newest, in order,
    /// each older than `timeline.back()`: merged into `timeline` once, by
    /// `end_batch`. Inserting each into the timeline moved up to half of
    /// it (a thousand events of 150 bytes) per event, and consumers that
    /// fetch one topic's partition after another's (Kafka's do) deliver
    /// whole runs of such events.
    late: VecDeque<StoredEvent>,
    ids: IdIndex,
    /// Properties of events stored by this batch (event id -> encoded
    /// Struct), for its snapshot: the store has them in the events'
    /// timeline values (written once), the cached timeline does not.
    pub new_bodies: crate::state::FastMap<String, bytes::Bytes>,
    /// Ids of events trimmed by this batch whose properties are in the
    /// `bodies` column family (state written before `body_in_timeline`).
    pub dropped_bodies: Vec<String>,
    /// The events the last snapshot showed, encoded (memory only, while the
    /// user is cached): the next snapshot copies them instead of reading
    /// their properties back and encoding them again. Only ids the timeline
    /// holds: dropping an id removes its entry (an id dropped and sent again
    /// may carry other content).
    pub shown_events: crate::snapshot::EncodedEvents,
    /// Timeline changes of this batch, in order (stored one key per event).
    pub timeline_ops: Vec<TimelineOp>,
    /// Encoded size of the timeline's events, kept as events come and go
    /// (the user cache's estimate; summing it per batch touched every event).
    timeline_bytes: usize,
    /// Whether events of the timeline hold properties their timeline values
    /// hold too (read with the user for its next snapshot): `shed_properties`
    /// drops them before the user is cached.
    stored_properties: bool,
    /// Events the timeline held when the batch began, and events dropped
    /// since: more drops than that means the batch dropped events it
    /// stored itself (`end_batch` then writes neither).
    held_at_start: usize,
    dropped: usize,
}

/// A change to a user's timeline.
#[derive(Debug, Clone, PartialEq)]
pub enum TimelineOp {
    /// An event stored: created_at_ns, id, and the event encoded with its
    /// properties (what its key holds).
    Put(i64, String, Vec<u8>),
    /// An event dropped: (created_at_ns, id).
    Delete(i64, String),
}

impl TimelineOp {
    /// Storing `e` (as it is, properties included if inline).
    pub fn put(e: &StoredEvent) -> TimelineOp {
        use prost::Message;
        TimelineOp::Put(e.created_at_ns, e.id.clone(), e.encode_to_vec())
    }
}

impl Working {
    pub fn new(mut state: UserState) -> Working {
        let timeline = VecDeque::from(std::mem::take(&mut state.timeline));
        let ids = IdIndex::new(timeline.iter().map(|e| e.id.as_str()));
        let held_at_start = timeline.len();
        let (timeline_bytes, stored_properties) =
            timeline.iter().fold((0, false), |(bytes, stored), e| {
                (
                    bytes + stored_len(e),
                    stored || (e.body_in_timeline && !e.properties.is_empty()),
                )
            });
        Working {
            state,
            timeline,
            late: VecDeque::new(),
            ids,
            new_bodies: Default::default(),
            dropped_bodies: Vec::new(),
            shown_events: Default::default(),
            held_at_start,
            dropped: 0,
            timeline_ops: Vec::new(),
            timeline_bytes,
            stored_properties,
        }
    }

    /// After `end_batch`: drops the properties read with the user (the
    /// store has them in the events' timeline values, and the snapshot made
    /// of them keeps its events encoded), so the cached timeline holds none.
    pub fn shed_properties(&mut self) {
        if std::mem::take(&mut self.stored_properties) {
            for e in &mut self.state.timeline {
                if e.body_in_timeline && !e.properties.is_empty() {
                    e.properties = bytes::Bytes::new();
                }
            }
        }
    }

    /// Encoded bytes of the timeline's events (as `UserState::timeline`
    /// would hold them).
    pub fn timeline_bytes(&self) -> usize {
        self.timeline_bytes
    }

    /// Bytes of the id index's table (the user cache's estimate).
    pub fn index_bytes(&self) -> usize {
        self.ids.table_bytes()
    }

    /// The timeline, oldest first, once `end_batch` or `merge_late` has
    /// merged this batch's late events into it.
    pub fn timeline(&self) -> &VecDeque<StoredEvent> {
        debug_assert!(self.late.is_empty(), "late events not merged");
        &self.timeline
    }

    /// Merges the late events into the timeline. Both are in order, so the
    /// sort merges two runs: only the timeline's events newer than the
    /// oldest late one move, once.
    fn merge_late(&mut self) {
        if self.late.is_empty() {
            return;
        }
        self.timeline.extend(self.late.drain(..));
        self.timeline
            .make_contiguous()
            .sort_by(|a, b| event_order(a).cmp(&event_order(b)));
    }

    /// Ends a batch: puts the timeline into `self.state` (complete, to
    /// snapshot and store) and hands over the bodies to write and delete.
    /// `resume` makes the state ready for the next batch (the id index is kept).
    pub fn end_batch(&mut self) -> BatchChanges {
        self.merge_late();
        self.state.timeline = Vec::from(std::mem::take(&mut self.timeline));
        if self.dropped > self.held_at_start {
            cancel_transient(&mut self.timeline_ops);
        }
        self.dropped = 0;
        BatchChanges {
            new_bodies: std::mem::take(&mut self.new_bodies),
            dropped_bodies: std::mem::take(&mut self.dropped_bodies),
            timeline_ops: std::mem::take(&mut self.timeline_ops),
        }
    }

    /// After `end_batch`: takes the timeline back for applying.
    pub fn resume(&mut self) {
        self.timeline = VecDeque::from(std::mem::take(&mut self.state.timeline));
        self.held_at_start = self.timeline.len();
    }

    /// The state to store, with the bodies to write and delete.
    pub fn finish(
        mut self,
    ) -> (
        UserState,
        crate::state::FastMap<String, bytes::Bytes>,
        Vec<String>,
    ) {
        let c = self.end_batch();
        (self.state, c.new_bodies, c.dropped_bodies)
    }

    /// The state with event properties inline (tests, benchmarks).
    pub fn into_state(self) -> UserState {
        let (mut st, mut bodies, _) = self.finish();
        for e in &mut st.timeline {
            if let Some(b) = bodies.remove(&e.id) {
                e.properties = b;
            }
        }
        st
    }
}

/// Drops from a batch's timeline changes each event both stored and
/// dropped by the batch (a `Put` and a later `Delete` of its key): its key
/// did not exist before the `Put` (an event is stored only when the
/// timeline does not hold its id, and a key dropped earlier in the batch
/// keeps its `Delete`), so writing neither leaves the store as writing
/// both would. A user receiving more events in one batch than
/// `max_events_per_user` (the head of a replay's large batches) wrote
/// each of them, and a tombstone, for nothing.
fn cancel_transient(ops: &mut Vec<TimelineOp>) {
    let mut keep = vec![true; ops.len()];
    let mut stored: crate::state::FastMap<(i64, &str), usize> = Default::default();
    for (i, op) in ops.iter().enumerate() {
        match op {
            TimelineOp::Put(at, id, _) => {
                stored.insert((*at, id.as_str()), i);
            }
            TimelineOp::Delete(at, id) => {
                if let Some(j) = stored.remove(&(*at, id.as_str())) {
                    keep[i] = false;
                    keep[j] = false;
                }
            }
        }
    }
    let mut i = 0;
    ops.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// What a batch changed besides the state value itself.
pub struct BatchChanges {
    /// Properties of events stored by the batch (event id -> encoded Struct).
    pub new_bodies: crate::state::FastMap<String, bytes::Bytes>,
    /// Ids of events dropped by the batch whose properties are in the store.
    pub dropped_bodies: Vec<String>,
    /// Timeline events stored and dropped, in order.
    pub timeline_ops: Vec<TimelineOp>,
}

pub fn new_user(user_id: &str) -> UserState {
    UserState {
        format_version: FORMAT_VERSION,
        user_id: user_id.to_string(),
        timeline_split: true,
        ..Default::default()
    }
}

/// Applies one user record (event or profile operation) to a user. What
/// the state keeps (a stored event, a profile's attributes) is moved out of
/// the record, not copied; its user, input and links stay.
pub fn apply(
    state: &mut Working,
    rec: &mut Record,
    limits: ApplyLimits,
    catalog: &mut CatalogDelta,
) -> Outcome {
    let at = rec.log_time_ns;
    match &mut rec.body {
        Some(record::Body::Event(e)) => apply_event(state, e, at, limits, catalog),
        Some(record::Body::ProfileOp(op)) => {
            state.shown_events.forget_profiles();
            apply_profile_op(&mut state.state, op, at, catalog)
        }
        Some(record::Body::Settings(_)) | None => Outcome::Applied,
    }
}

fn profile_index(state: &UserState, source: &str, ty: &str) -> Result<usize, usize> {
    state
        .profiles
        .binary_search_by(|p| (p.source.as_str(), p.r#type.as_str()).cmp(&(source, ty)))
}

fn add_identifiers(into: &mut Vec<Identifier>, ids: &[Identifier]) -> bool {
    let mut changed = false;
    for id in ids {
        if !into.contains(id) {
            into.push(id.clone());
            changed = true;
        }
    }
    changed
}

/// The profile `p` names, created or given its new identifiers; whether
/// anything changed.
fn ensure_profile(
    state: &mut UserState,
    p: &ProfileRef,
    at: i64,
    catalog: &mut CatalogDelta,
) -> bool {
    match profile_index(state, &p.source, &p.r#type) {
        Ok(i) => {
            let prof = &mut state.profiles[i];
            let changed = add_identifiers(&mut prof.identifiers, &p.identifiers);
            if changed {
                prof.updated_at_ns = at;
            }
            changed
        }
        Err(i) => {
            catalog_add(catalog, TypeKind::Profile, &p.source, &p.r#type, at);
            state.profiles.insert(
                i,
                Profile {
                    source: p.source.clone(),
                    r#type: p.r#type.clone(),
                    name: p.name.clone(),
                    identifiers: p.identifiers.clone(),
                    attributes: Some(Struct::default()),
                    created_at_ns: at,
                    updated_at_ns: at,
                },
            );
            true
        }
    }
}

/// An event's share of an encoded timeline (its field tag and length too),
/// as the cached timeline holds it: without properties its timeline value
/// holds (read with the user only until `Working::shed_properties`).
fn stored_len(e: &StoredEvent) -> usize {
    use prost::Message;
    let stored = if e.body_in_timeline && !e.properties.is_empty() {
        prost::encoding::bytes::encoded_len(5, &e.properties)
    } else {
        0
    };
    share_of_timeline(e.encoded_len() - stored)
}

/// The share of an event encoded in `encoded` bytes (an estimate: one byte
/// of tag, one of length).
fn share_of_timeline(encoded: usize) -> usize {
    encoded + 2
}

fn event_order(e: &StoredEvent) -> (i64, &str) {
    (e.created_at_ns, e.id.as_str())
}

fn apply_event(
    w: &mut Working,
    rec: &mut EventRecord,
    at: i64,
    limits: ApplyLimits,
    catalog: &mut CatalogDelta,
) -> Outcome {
    if let Some(p) = &rec.profile {
        if ensure_profile(&mut w.state, p, at, catalog) {
            w.shown_events.forget_profiles();
        }
    }
    let Some(event) = &rec.event else {
        return Outcome::Applied;
    };
    let hash = id_hash(&event.id);
    if w.ids.holds(hash, &event.id, &w.timeline, &w.late) {
        return Outcome::Duplicate;
    }
    let mut event = rec.event.take().expect("checked above");
    catalog_add(catalog, TypeKind::Event, &event.source, &event.r#type, at);
    // One key per event: its timeline value, properties included; the
    // cached timeline keeps the event without them.
    event.body_in_timeline = true;
    let op = TimelineOp::put(&event);
    let props = std::mem::take(&mut event.properties);
    // Newer than every event held (the late ones are older than the
    // timeline's newest).
    let newest = match w.timeline.back() {
        Some(e) => event_order(e) <= event_order(&event),
        None => w
            .late
            .back()
            .is_none_or(|e| event_order(e) <= event_order(&event)),
    };
    w.ids.insert(hash);
    if !props.is_empty() {
        w.new_bodies.insert(event.id.clone(), props);
    }
    w.timeline_bytes += stored_len(&event);
    w.timeline_ops.push(op);
    if newest {
        w.timeline.push_back(event);
    } else if w
        .late
        .back()
        .is_none_or(|e| event_order(e) <= event_order(&event))
    {
        w.late.push_back(event);
    } else {
        let pos = w
            .late
            .partition_point(|e| event_order(e) < event_order(&event));
        w.late.insert(pos, event);
    }
    let max = limits.max_events_per_user.max(1);
    while w.timeline.len() + w.late.len() > max {
        // The oldest of both (the late ones are older than the newest).
        let late_first = match (w.timeline.front(), w.late.front()) {
            (Some(t), Some(l)) => event_order(l) < event_order(t),
            (None, Some(_)) => true,
            _ => false,
        };
        let oldest = if late_first {
            w.late.pop_front()
        } else {
            w.timeline.pop_front()
        };
        if let Some(old) = oldest {
            w.timeline_bytes = w.timeline_bytes.saturating_sub(stored_len(&old));
            w.ids.remove(&old.id);
            w.shown_events.remove(old.created_at_ns, &old.id);
            w.dropped += 1;
            w.timeline_ops
                .push(TimelineOp::Delete(old.created_at_ns, old.id.clone()));
            if w.new_bodies.remove(&old.id).is_none()
                && old.properties.is_empty()
                && !old.body_in_timeline
            {
                w.dropped_bodies.push(old.id);
            }
        }
    }
    Outcome::Applied
}

fn not_found(op: &ProfileOp, what: &str) -> Outcome {
    Outcome::Rejected(Rejection::new(
        ErrorCode::NotFound,
        format!(
            "cannot {what} profile ({}, {}): the user has no such profile",
            op.source, op.r#type
        ),
    ))
}

fn apply_profile_op(
    state: &mut UserState,
    op: &mut ProfileOp,
    at: i64,
    catalog: &mut CatalogDelta,
) -> Outcome {
    let idx = profile_index(state, &op.source, &op.r#type);
    match ProfileOpKind::try_from(op.op).unwrap_or(ProfileOpKind::Unspecified) {
        ProfileOpKind::Put => {
            catalog_add(catalog, TypeKind::Profile, &op.source, &op.r#type, at);
            let created_at_ns = idx.map(|i| state.profiles[i].created_at_ns).unwrap_or(at);
            let prof = Profile {
                source: op.source.clone(),
                r#type: op.r#type.clone(),
                name: op.name.clone(),
                identifiers: op.identifiers.clone(),
                attributes: Some(op.attributes.take().unwrap_or_default()),
                created_at_ns,
                updated_at_ns: at,
            };
            match idx {
                Ok(i) => state.profiles[i] = prof,
                Err(i) => state.profiles.insert(i, prof),
            }
            Outcome::Applied
        }
        ProfileOpKind::Patch => {
            let Ok(i) = idx else {
                return not_found(op, "patch");
            };
            catalog_add(catalog, TypeKind::Profile, &op.source, &op.r#type, at);
            let prof = &mut state.profiles[i];
            if let Some(patch) = &op.patch {
                if let Some(name) = patch.fields.get("name") {
                    prof.name = match &name.kind {
                        Some(Kind::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    };
                }
                if let Some(attrs) = patch.fields.get("attributes") {
                    let target = prof.attributes.get_or_insert_with(Struct::default);
                    match &attrs.kind {
                        Some(Kind::StructValue(p)) => json::merge_patch(target, p),
                        _ => target.fields.clear(),
                    }
                }
            }
            add_identifiers(&mut prof.identifiers, &op.identifiers);
            prof.updated_at_ns = at;
            Outcome::Applied
        }
        ProfileOpKind::Delete => {
            let Ok(i) = idx else {
                return not_found(op, "delete");
            };
            catalog_add(catalog, TypeKind::Profile, &op.source, &op.r#type, at);
            state.profiles.remove(i);
            Outcome::Applied
        }
        ProfileOpKind::Unspecified => Outcome::Rejected(Rejection::new(
            ErrorCode::InvalidField,
            "profile operation has no op",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_id_index_counts_hashes_and_confirms_against_the_timeline() {
        let tl: VecDeque<StoredEvent> = ["a", "b"]
            .iter()
            .map(|id| StoredEvent {
                id: id.to_string(),
                ..Default::default()
            })
            .collect();
        let late: VecDeque<StoredEvent> = [StoredEvent {
            id: "l".into(),
            ..Default::default()
        }]
        .into();
        let mut ix = IdIndex::new(tl.iter().chain(&late).map(|e| e.id.as_str()));
        let holds = |ix: &IdIndex, id: &str| ix.holds(id_hash(id), id, &tl, &late);
        assert!(holds(&ix, "a") && holds(&ix, "b"));
        assert!(holds(&ix, "l"), "a late event is held too");
        assert!(!holds(&ix, "c"));
        // A hash present for an id the timeline does not hold (what two ids
        // of one hash look like): not a duplicate.
        ix.insert(id_hash("c"));
        assert!(!holds(&ix, "c"));
        // Counted: one of two entries of a hash removed leaves the other.
        ix.insert(id_hash("a"));
        ix.remove("a");
        assert!(holds(&ix, "a"));
        ix.remove("a");
        assert!(!holds(&ix, "a"));
        assert!(ix.table_bytes() > 0);
    }

    fn ev(id: &str, at: i64) -> Record {
        Record {
            log_time_ns: at,
            body: Some(record::Body::Event(EventRecord {
                event: Some(StoredEvent {
                    id: id.into(),
                    source: "s".into(),
                    r#type: "t".into(),
                    created_at_ns: at,
                    ..Default::default()
                }),
                profile: None,
            })),
            ..Default::default()
        }
    }

    fn op(
        kind: ProfileOpKind,
        name: Option<&str>,
        attrs: serde_json::Value,
        patch: Option<serde_json::Value>,
    ) -> Record {
        Record {
            log_time_ns: 5,
            body: Some(record::Body::ProfileOp(ProfileOp {
                op: kind as i32,
                source: "shop".into(),
                r#type: "customer".into(),
                identifiers: vec![Identifier::new("email", "a@x")],
                name: name.map(Into::into),
                attributes: Some(json::to_struct(&attrs.as_object().unwrap().into())),
                patch: patch.map(|p| json::to_struct(&p.as_object().unwrap().into())),
            })),
            ..Default::default()
        }
    }

    /// `ev` of a custom event naming the shop/customer profile.
    fn ev_for(id: &str, at: i64, name: &str, ident: Identifier) -> Record {
        let mut r = ev(id, at);
        let Some(record::Body::Event(er)) = &mut r.body else {
            unreachable!()
        };
        er.profile = Some(ProfileRef {
            source: "shop".into(),
            r#type: "customer".into(),
            name: Some(name.into()),
            identifiers: vec![ident],
        });
        r
    }

    fn ids(s: &mut Working) -> Vec<String> {
        s.merge_late();
        s.timeline().iter().map(|e| e.id.clone()).collect()
    }

    fn op_keys(ops: &[TimelineOp]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                TimelineOp::Put(at, id, _) => format!("put {id}@{at}"),
                TimelineOp::Delete(at, id) => format!("del {id}@{at}"),
            })
            .collect()
    }

    #[test]
    fn events_stored_and_dropped_by_one_batch_are_not_written() {
        let mut w = Working::new(new_user("u"));
        let mut c = CatalogDelta::new();
        let l = ApplyLimits {
            max_events_per_user: 3,
        };
        for (id, at) in [("a", 1), ("b", 2)] {
            apply(&mut w, &mut ev(id, at), l, &mut c);
        }
        assert_eq!(op_keys(&w.end_batch().timeline_ops), ["put a@1", "put b@2"]);
        w.resume();
        // Four more in one batch of a three-event timeline: "a" and "b"
        // were stored before and are deleted; "c" comes and goes within
        // the batch and is written neither way.
        for (id, at) in [("c", 3), ("d", 4), ("e", 5), ("f", 6)] {
            apply(&mut w, &mut ev(id, at), l, &mut c);
        }
        assert_eq!(
            op_keys(&w.end_batch().timeline_ops),
            ["put d@4", "del a@1", "put e@5", "del b@2", "put f@6"]
        );
        w.resume();
        // An id dropped and sent again within one batch: its earlier key's
        // delete stays; the copy stored and dropped again is not written.
        let l1 = ApplyLimits {
            max_events_per_user: 1,
        };
        apply(&mut w, &mut ev("g", 7), l1, &mut c);
        apply(&mut w, &mut ev("f", 6), l1, &mut c);
        assert_eq!(ids(&mut w), ["g"]);
        assert_eq!(
            op_keys(&w.end_batch().timeline_ops),
            ["put g@7", "del d@4", "del e@5", "del f@6"]
        );
        w.resume();
        // Fewer drops than events held: nothing to cancel, written as is.
        apply(&mut w, &mut ev("h", 8), l1, &mut c);
        assert_eq!(op_keys(&w.end_batch().timeline_ops), ["put h@8", "del g@7"]);
    }

    #[test]
    fn timeline_is_ordered_deduplicated_and_trimmed() {
        let mut s = Working::new(new_user("u"));
        let mut c = CatalogDelta::new();
        let l = ApplyLimits {
            max_events_per_user: 3,
        };
        for (id, at) in [("b", 2), ("a", 1), ("d", 4), ("c", 2)] {
            assert_eq!(apply(&mut s, &mut ev(id, at), l, &mut c), Outcome::Applied);
        }
        assert_eq!(
            ids(&mut s),
            ["b", "c", "d"],
            "oldest dropped, equal times ordered by id"
        );
        assert_eq!(
            apply(&mut s, &mut ev("c", 9), l, &mut c),
            Outcome::Duplicate
        );
        assert_eq!(ids(&mut s), ["b", "c", "d"]);
        let e = c.get(&(TypeKind::Event, "s".into(), "t".into())).unwrap();
        assert_eq!((e.count, e.first_seen_ns, e.last_seen_ns), (4, 1, 4));
    }

    /// Events out of order (late ones wait in `late` until the batch ends)
    /// leave the timeline, its changes and its duplicates exactly as
    /// inserting each in place did: checked against that, over random
    /// times, repeated ids, limits and batch ends.
    #[test]
    fn late_events_end_a_batch_as_if_each_was_inserted_in_place() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let max = rng.gen_range(1..12);
            let l = ApplyLimits {
                max_events_per_user: max,
            };
            let mut w = Working::new(new_user("u"));
            let mut c = CatalogDelta::new();
            // The reference: a sorted vector, each event inserted in place
            // and the oldest dropped beyond `max`.
            let mut model: Vec<(i64, String)> = Vec::new();
            let mut model_ops: Vec<TimelineOp> = Vec::new();
            for _batch in 0..rng.gen_range(1..5) {
                let held = model.len();
                let mut dropped = 0;
                for _ in 0..rng.gen_range(0..40) {
                    let at = rng.gen_range(0..60);
                    let id = format!("e{}", rng.gen_range(0..50));
                    let got = apply(&mut w, &mut ev(&id, at), l, &mut c);
                    if model.iter().any(|(_, i)| *i == id) {
                        assert_eq!(got, Outcome::Duplicate, "seed {seed}: {id}");
                        continue;
                    }
                    assert_eq!(got, Outcome::Applied, "seed {seed}: {id}");
                    let pos = model.partition_point(|(t, i)| (*t, i.as_str()) < (at, id.as_str()));
                    model.insert(pos, (at, id.clone()));
                    model_ops.push(TimelineOp::Put(at, id, Vec::new()));
                    while model.len() > max {
                        let (t, i) = model.remove(0);
                        model_ops.push(TimelineOp::Delete(t, i));
                        dropped += 1;
                    }
                }
                // As `end_batch` does: events stored and dropped by the
                // same batch are written as neither.
                if dropped > held {
                    cancel_transient(&mut model_ops);
                }
                let changes = w.end_batch();
                assert_eq!(
                    op_keys(&changes.timeline_ops),
                    op_keys(&std::mem::take(&mut model_ops)),
                    "seed {seed}"
                );
                let got: Vec<(i64, String)> = w
                    .state
                    .timeline
                    .iter()
                    .map(|e| (e.created_at_ns, e.id.clone()))
                    .collect();
                assert_eq!(got, model, "seed {seed}");
                w.resume();
            }
        }
    }

    #[test]
    fn timeline_bytes_follow_stored_and_dropped_events() {
        let sum = |w: &mut Working| {
            w.merge_late();
            w.timeline().iter().map(stored_len).sum::<usize>()
        };
        let mut s = Working::new(new_user("u"));
        let mut c = CatalogDelta::new();
        let l = ApplyLimits {
            max_events_per_user: 3,
        };
        for (id, at) in [
            ("b", 2),
            ("a", 1),
            ("d", 4),
            ("c", 2),
            ("c", 9),
            ("long-id", 0),
        ] {
            apply(&mut s, &mut ev(id, at), l, &mut c);
            assert_eq!(s.timeline_bytes(), sum(&mut s), "after {id}");
        }
        assert!(s.timeline_bytes() > 0);
        s.end_batch();
        s.resume();
        let mut again = Working::new(s.into_state());
        assert_eq!(again.timeline_bytes(), sum(&mut again), "counted on load");
    }

    #[test]
    fn event_creates_its_profile_once_and_adds_identifiers() {
        let mut s = Working::new(new_user("u"));
        let mut c = CatalogDelta::new();
        let mut r = ev_for("e1", 1, "Jane", Identifier::new("email", "a@x"));
        apply(&mut s, &mut r, ApplyLimits::default(), &mut c);
        let mut r2 = ev_for("e2", 2, "Other", Identifier::new("external_id", "E"));
        apply(&mut s, &mut r2, ApplyLimits::default(), &mut c);
        assert_eq!(s.state.profiles.len(), 1);
        assert_eq!(
            s.state.profiles[0].name.as_deref(),
            Some("Jane"),
            "an event never renames an existing profile"
        );
        assert_eq!(s.state.profiles[0].identifiers.len(), 2);
    }

    /// Snapshots made with the encoded profiles kept between them (in
    /// `shown_events`) are the ones made from scratch, after every kind of
    /// change to a profile: created by an event, given an identifier by one
    /// (same count of profiles), put, patched, deleted.
    #[test]
    fn kept_profile_bytes_follow_every_profile_change() {
        use crate::model::{Settings, TypeRef};
        use crate::snapshot::{next_snapshot, prepared, EncodedEvents};
        use std::sync::Arc;
        let settings = Arc::new(prepared(Settings {
            zendesk_events: true,
            events_api: true,
            profiles_api: true,
            shown_event_types: vec![TypeRef::new("s", "t")],
            shown_profile_types: vec![TypeRef::new("shop", "customer")],
        }));
        let with_profile = |id: &str, at: i64, ident| ev_for(id, at, "Jane", ident);
        let steps = [
            with_profile("e1", 1, Identifier::new("email", "a@x")),
            with_profile("e2", 2, Identifier::new("external_id", "E")),
            ev("e3", 3),
            op(
                ProfileOpKind::Put,
                Some("Pat"),
                json!({"tier": "gold"}),
                None,
            ),
            op(
                ProfileOpKind::Patch,
                None,
                json!({}),
                Some(json!({"attributes": {"tier": "silver"}})),
            ),
            with_profile("e4", 4, Identifier::new("phone_number", "+47")),
            op(ProfileOpKind::Delete, None, json!({}), None),
            with_profile("e5", 6, Identifier::new("email", "b@x")),
        ];
        // The profile type hidden (a new `Arc`) in every other snapshot of
        // the second pass: a hidden profile is not encoded, and is once
        // shown again.
        let hidden = Arc::new(prepared(Settings {
            shown_profile_types: vec![],
            ..(*settings).clone()
        }));
        for alternate in [false, true] {
            let mut w = Working::new(new_user("u"));
            let mut c = CatalogDelta::new();
            for (i, r) in steps.clone().iter_mut().enumerate() {
                let now = if alternate && i % 2 == 1 {
                    &hidden
                } else {
                    &settings
                };
                apply(&mut w, r, ApplyLimits::default(), &mut c);
                w.end_batch();
                let mut fresh_state = w.state.clone();
                let want = next_snapshot(
                    &mut fresh_state,
                    now,
                    50,
                    usize::MAX,
                    10 + i as i64,
                    &mut EncodedEvents::new(),
                    &(),
                );
                let got = next_snapshot(
                    &mut w.state,
                    now,
                    50,
                    usize::MAX,
                    10 + i as i64,
                    &mut w.shown_events,
                    &(),
                );
                assert_eq!(got, want, "step {i}, alternate {alternate}");
                assert!(alternate || got.is_some(), "step {i} changes what is shown");
                w.resume();
            }
        }
    }

    #[test]
    fn put_replaces_patch_merges_delete_removes() {
        let mut s = Working::new(new_user("u"));
        let mut c = CatalogDelta::new();
        let l = ApplyLimits::default();
        let r = apply(
            &mut s,
            &mut op(
                ProfileOpKind::Patch,
                None,
                json!({}),
                Some(json!({"name": "x"})),
            ),
            l,
            &mut c,
        );
        assert!(matches!(r, Outcome::Rejected(ref e) if e.code == ErrorCode::NotFound));
        apply(
            &mut s,
            &mut op(
                ProfileOpKind::Put,
                Some("Pat"),
                json!({"a": "1", "b": "2", "addr": {"city": "Oslo", "zip": "0150"}}),
                None,
            ),
            l,
            &mut c,
        );
        apply(
            &mut s,
            &mut op(
                ProfileOpKind::Put,
                Some("Pat"),
                json!({"a": "10", "addr": {"city": "Oslo", "zip": "0150"}}),
                None,
            ),
            l,
            &mut c,
        );
        assert_eq!(
            json::from_struct(&s.state.profiles[0].attributes),
            json!({"a": "10", "addr": {"city": "Oslo", "zip": "0150"}})
        );
        let mut p = op(
            ProfileOpKind::Patch,
            None,
            json!({}),
            Some(
                json!({"name": "Patricia", "attributes": {"a": null, "c": "3", "addr": {"zip": null}}}),
            ),
        );
        let Some(record::Body::ProfileOp(o)) = &mut p.body else {
            unreachable!()
        };
        o.identifiers = vec![Identifier::new("external_id", "X")];
        apply(&mut s, &mut p, l, &mut c);
        let prof = &s.state.profiles[0];
        assert_eq!(prof.name.as_deref(), Some("Patricia"));
        assert_eq!(
            json::from_struct(&prof.attributes),
            json!({"c": "3", "addr": {"city": "Oslo"}})
        );
        assert_eq!(prof.identifiers.len(), 2, "patch only adds identifiers");
        apply(
            &mut s,
            &mut op(
                ProfileOpKind::Patch,
                None,
                json!({}),
                Some(json!({"name": null})),
            ),
            l,
            &mut c,
        );
        assert_eq!(s.state.profiles[0].name, None);
        assert_eq!(
            apply(
                &mut s,
                &mut op(ProfileOpKind::Delete, None, json!({}), None),
                l,
                &mut c
            ),
            Outcome::Applied
        );
        assert!(s.state.profiles.is_empty());
        let r = apply(
            &mut s,
            &mut op(ProfileOpKind::Delete, None, json!({}), None),
            l,
            &mut c,
        );
        assert!(matches!(r, Outcome::Rejected(ref e) if e.code == ErrorCode::NotFound));
    }
}
