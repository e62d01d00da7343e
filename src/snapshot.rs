//! Visibility filter and context snapshot (CONTRACT §4, §5), pure.
//!
//! A snapshot is what an agent sees: shown profile types sorted by
//! (source, type), shown event types newest first (ties: greater id first),
//! at most `max_events`. Until settings exist nothing is shown.

use crate::model::{
    json, time, ContextSnapshot, ContextSnapshotBytes, Identifier, Profile, Settings,
    SnapshotEventBytes, SnapshotProfile, StoredEvent, TypeRef, UserState,
};
use prost::Message;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ZENDESK: &str = "zendesk";

fn listed(list: &[TypeRef], source: &str, ty: &str) -> bool {
    list.binary_search_by(|t| (t.source.as_str(), t.r#type.as_str()).cmp(&(source, ty)))
        .is_ok()
}

/// Settings with their type lists sorted, ready for lookups.
pub fn prepared(mut s: Settings) -> Settings {
    for list in [&mut s.shown_event_types, &mut s.shown_profile_types] {
        list.sort_by(|a, b| (&a.source, &a.r#type).cmp(&(&b.source, &b.r#type)));
        list.dedup();
    }
    s
}

/// A Zendesk event is shown iff `zendesk_events` and its type is listed; a
/// custom event iff `events_api` and its (source, type) is listed.
pub fn event_shown(s: &Settings, source: &str, ty: &str) -> bool {
    let enabled = if source == ZENDESK {
        s.zendesk_events
    } else {
        s.events_api
    };
    enabled && listed(&s.shown_event_types, source, ty)
}

pub fn profile_shown(s: &Settings, source: &str, ty: &str) -> bool {
    s.profiles_api && listed(&s.shown_profile_types, source, ty)
}

/// Where the properties of stored events are (they live beside the
/// timeline, keyed by event id; older state keeps them inline).
pub trait Bodies {
    /// The encoded Struct properties of a timeline event without inline ones.
    fn properties(&self, e: &StoredEvent) -> Vec<u8>;

    /// The properties of many events (a store answers them in one lookup).
    fn properties_many(&self, events: &[&StoredEvent]) -> Vec<Vec<u8>> {
        events.iter().map(|e| self.properties(e)).collect()
    }
}

/// Only inline properties (tests, benchmarks).
impl Bodies for () {
    fn properties(&self, _: &StoredEvent) -> Vec<u8> {
        Vec::new()
    }
}

pub fn properties_of(e: &StoredEvent, bodies: &impl Bodies) -> Vec<u8> {
    if e.properties.is_empty() {
        bodies.properties(e)
    } else {
        e.properties.clone()
    }
}

fn snap_event(e: &StoredEvent, properties: Vec<u8>) -> SnapshotEventBytes {
    SnapshotEventBytes {
        id: e.id.clone(),
        source: e.source.clone(),
        r#type: e.r#type.clone(),
        description: e.description.clone(),
        properties,
        created_at: Some(time::to_timestamp(e.created_at_ns)),
        received_at: Some(time::to_timestamp(e.received_at_ns)),
    }
}

fn snap_profile(p: &Profile) -> SnapshotProfile {
    SnapshotProfile {
        source: p.source.clone(),
        r#type: p.r#type.clone(),
        name: p.name.clone(),
        identifiers: p.identifiers.clone(),
        attributes: p.attributes.clone(),
        created_at: Some(time::to_timestamp(p.created_at_ns)),
        updated_at: Some(time::to_timestamp(p.updated_at_ns)),
    }
}

/// The visible content of a user's context (version and updated_at unset).
/// `settings` must be `prepared`.
pub fn build(
    state: &UserState,
    settings: &Settings,
    max_events: usize,
    bodies: &impl Bodies,
) -> ContextSnapshotBytes {
    ContextSnapshotBytes {
        user_id: state.user_id.clone(),
        version: 0,
        updated_at: None,
        profiles: state
            .profiles
            .iter()
            .filter(|p| profile_shown(settings, &p.source, &p.r#type))
            .map(snap_profile)
            .collect(),
        events: shown_events(state, settings, max_events, bodies),
    }
}

/// The shown events, newest first, with their properties (the ones not
/// inline fetched in one `properties_many` call).
fn shown_events(
    state: &UserState,
    settings: &Settings,
    max_events: usize,
    bodies: &impl Bodies,
) -> Vec<SnapshotEventBytes> {
    let shown: Vec<&StoredEvent> = state
        .timeline
        .iter()
        .rev()
        .filter(|e| event_shown(settings, &e.source, &e.r#type))
        .take(max_events)
        .collect();
    let missing: Vec<&StoredEvent> = shown
        .iter()
        .copied()
        .filter(|e| e.properties.is_empty())
        .collect();
    let mut fetched = bodies.properties_many(&missing).into_iter();
    shown
        .into_iter()
        .map(|e| {
            let props = if e.properties.is_empty() {
                fetched.next().unwrap_or_default()
            } else {
                e.properties.clone()
            };
            snap_event(e, props)
        })
        .collect()
}

/// Hash of a snapshot's visible content (version and updated_at ignored):
/// a new snapshot is published only when it differs from the last one.
pub fn content_hash(content: &ContextSnapshot) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(content.user_id.as_bytes());
    for e in &content.events {
        h.update([0, b'e']);
        h.update(e.id.as_bytes());
        h.update(time::from_timestamp(&e.created_at).to_be_bytes());
    }
    for p in &content.profiles {
        h.update([0, b'p']);
        h.update(p.encode_to_vec());
    }
    h.finalize().to_vec()
}

/// The same hash as `content_hash(&build(..))`, without building the
/// snapshot: stored events never change once their id is held, so the shown
/// events are identified by (id, created_at).
pub fn visible_hash(state: &UserState, settings: &Settings, max_events: usize) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(state.user_id.as_bytes());
    for e in state
        .timeline
        .iter()
        .rev()
        .filter(|e| event_shown(settings, &e.source, &e.r#type))
        .take(max_events)
    {
        h.update([0, b'e']);
        h.update(e.id.as_bytes());
        h.update(e.created_at_ns.to_be_bytes());
    }
    for p in state
        .profiles
        .iter()
        .filter(|p| profile_shown(settings, &p.source, &p.r#type))
    {
        h.update([0, b'p']);
        h.update(snap_profile(p).encode_to_vec());
    }
    h.finalize().to_vec()
}

/// If the visible content changed since the last snapshot published, bumps
/// the state's version and returns the new snapshot.
pub fn next_snapshot(
    state: &mut UserState,
    settings: &Settings,
    max_events: usize,
    at_ns: i64,
    bodies: &impl Bodies,
) -> Option<ContextSnapshotBytes> {
    let hash = visible_hash(state, settings, max_events);
    if hash == state.snapshot_hash {
        return None;
    }
    let mut snap = build(state, settings, max_events, bodies);
    debug_assert_eq!(content_hash(&decode(&snap)), hash);
    state.snapshot_hash = hash;
    state.snapshot_version += 1;
    state.snapshot_updated_at_ns = at_ns;
    snap.version = state.snapshot_version;
    snap.updated_at = Some(time::to_timestamp(at_ns));
    Some(snap)
}

fn ids_json(ids: &[Identifier]) -> Value {
    Value::Array(
        ids.iter()
            .map(|i| json!({"type": i.r#type, "value": i.value}))
            .collect(),
    )
}

pub fn profile_json(p: &Profile) -> Value {
    json!({
        "source": p.source, "type": p.r#type, "name": p.name,
        "identifiers": ids_json(&p.identifiers),
        "attributes": json::from_struct(&p.attributes),
        "created_at": time::format_rfc3339(p.created_at_ns),
        "updated_at": time::format_rfc3339(p.updated_at_ns),
    })
}

/// A snapshot as consumers decode it (properties as Struct).
pub fn decode(s: &ContextSnapshotBytes) -> ContextSnapshot {
    ContextSnapshot::decode(&s.encode_to_vec()[..]).expect("wire-identical encodings")
}

pub fn event_json(e: &StoredEvent, bodies: &impl Bodies) -> Value {
    let props = prost_types::Struct::decode(&properties_of(e, bodies)[..]).ok();
    json!({
        "id": e.id, "source": e.source, "type": e.r#type, "description": e.description,
        "properties": json::from_struct(&props),
        "created_at": time::format_rfc3339(e.created_at_ns),
        "received_at": time::format_rfc3339(e.received_at_ns),
    })
}

fn ts_json(t: &Option<prost_types::Timestamp>) -> Value {
    Value::String(time::format_rfc3339(time::from_timestamp(t)))
}

/// The JSON form of a snapshot (CONTRACT §4).
pub fn to_json(s: &ContextSnapshot) -> Value {
    json!({
        "user_id": s.user_id,
        "version": s.version,
        "updated_at": ts_json(&s.updated_at),
        "profiles": s.profiles.iter().map(|p| json!({
            "source": p.source, "type": p.r#type, "name": p.name,
            "identifiers": ids_json(&p.identifiers),
            "attributes": json::from_struct(&p.attributes),
            "created_at": ts_json(&p.created_at), "updated_at": ts_json(&p.updated_at),
        })).collect::<Vec<_>>(),
        "events": s.events.iter().map(|e| json!({
            "id": e.id, "source": e.source, "type": e.r#type, "description": e.description,
            "properties": json::from_struct(&e.properties),
            "created_at": ts_json(&e.created_at), "received_at": ts_json(&e.received_at),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, source: &str, ty: &str, at: i64) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            source: source.into(),
            r#type: ty.into(),
            created_at_ns: at,
            ..Default::default()
        }
    }

    fn state() -> UserState {
        let mut s = crate::state::apply::new_user("u");
        s.timeline = vec![
            event("a", "zendesk", "article_viewed", 1),
            event("b", "shop", "order", 2),
            event("c", "zendesk", "article_viewed", 3),
            event("d", "zendesk", "article_viewed", 3),
            event("e", "zendesk", "hidden", 4),
        ];
        s.profiles = vec![
            Profile {
                source: "crm".into(),
                r#type: "contact".into(),
                ..Default::default()
            },
            Profile {
                source: "shop".into(),
                r#type: "customer".into(),
                ..Default::default()
            },
        ];
        s
    }

    fn settings(z: bool, e: bool, p: bool) -> Settings {
        prepared(Settings {
            zendesk_events: z,
            events_api: e,
            profiles_api: p,
            shown_event_types: vec![
                TypeRef::new("zendesk", "article_viewed"),
                TypeRef::new("shop", "order"),
            ],
            shown_profile_types: vec![TypeRef::new("shop", "customer")],
        })
    }

    fn ids(s: &ContextSnapshotBytes) -> Vec<&str> {
        s.events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn secure_by_default() {
        let snap = build(&state(), &Settings::default(), 50, &());
        assert!(snap.events.is_empty() && snap.profiles.is_empty());
    }

    #[test]
    fn visibility_rules_and_order() {
        let s = state();
        let snap = build(&s, &settings(true, true, true), 50, &());
        assert_eq!(
            ids(&snap),
            ["d", "c", "b", "a"],
            "newest first, equal times: greater id first"
        );
        assert_eq!(snap.profiles.len(), 1);
        assert_eq!(
            ids(&build(&s, &settings(true, false, true), 50, &())),
            ["d", "c", "a"]
        );
        assert_eq!(
            ids(&build(&s, &settings(false, true, true), 50, &())),
            ["b"]
        );
        assert!(build(&s, &settings(true, true, false), 50, &())
            .profiles
            .is_empty());
        assert_eq!(
            ids(&build(&s, &settings(true, true, true), 2, &())),
            ["d", "c"],
            "max events"
        );
    }

    #[test]
    fn versions_start_at_one_and_grow_only_on_change() {
        let mut s = state();
        let on = settings(true, true, true);
        let first = next_snapshot(&mut s, &on, 50, 10, &()).unwrap();
        assert_eq!(first.version, 1);
        assert!(
            next_snapshot(&mut s, &on, 50, 11, &()).is_none(),
            "same content, no new version"
        );
        s.timeline.push(event("f", "zendesk", "hidden", 9));
        assert!(
            next_snapshot(&mut s, &on, 50, 12, &()).is_none(),
            "hidden change, no new version"
        );
        s.timeline.push(event("g", "shop", "order", 9));
        assert_eq!(next_snapshot(&mut s, &on, 50, 13, &()).unwrap().version, 2);
        let snap = next_snapshot(&mut s, &settings(false, false, false), 50, 14, &()).unwrap();
        assert_eq!((snap.version, snap.events.len()), (3, 0));
        let back = next_snapshot(&mut s, &on, 50, 15, &()).unwrap();
        assert_eq!(
            back.events.len(),
            5,
            "hidden data is kept, showing brings it back"
        );
        assert_eq!(to_json(&decode(&back))["version"], 4);
    }
}
