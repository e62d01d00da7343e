//! Visibility filter and context snapshot (CONTRACT §4, §5), pure.
//!
//! A snapshot is what an agent sees: shown profile types sorted by
//! (source, type), shown event types newest first (ties: greater id first),
//! at most `max_events`. Until settings exist nothing is shown.

use crate::log::Payload;
use crate::model::{
    json, time, ContextSnapshot, ContextSnapshotBytes, Identifier, Profile, Settings,
    SnapshotEventBytes, SnapshotProfile, StoredEvent, TypeRef, UserState,
};
use bytes::Bytes;
use prost::Message;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;

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

    /// The properties of many events (a store answers them in one lookup;
    /// ones held in memory are shared, not copied).
    fn properties_many(&self, events: &[&StoredEvent]) -> Vec<Bytes> {
        events.iter().map(|e| self.properties(e).into()).collect()
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
        e.properties.to_vec()
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

/// `snap_profile(p).encode_to_vec()`, without copying the profile (its
/// attributes are a tree of maps) first.
fn encode_profile(p: &Profile) -> Vec<u8> {
    use prost::encoding::{message, string};
    let mut buf = Vec::with_capacity(
        p.source.len()
            + p.r#type.len()
            + p.name.as_ref().map_or(0, String::len)
            + p.identifiers
                .iter()
                .map(|i| i.encoded_len() + 2)
                .sum::<usize>()
            + p.attributes.as_ref().map_or(0, |a| a.encoded_len() + 4)
            + 48,
    );
    if !p.source.is_empty() {
        string::encode(1, &p.source, &mut buf);
    }
    if !p.r#type.is_empty() {
        string::encode(2, &p.r#type, &mut buf);
    }
    if let Some(name) = &p.name {
        string::encode(3, name, &mut buf);
    }
    message::encode_repeated(4, &p.identifiers, &mut buf);
    if let Some(attributes) = &p.attributes {
        message::encode(5, attributes, &mut buf);
    }
    message::encode(6, &time::to_timestamp(p.created_at_ns), &mut buf);
    message::encode(7, &time::to_timestamp(p.updated_at_ns), &mut buf);
    buf
}

/// The visible content of a user's context (version and updated_at unset):
/// at most `max_events` events, at most `max_bytes` when encoded (`within`).
/// `settings` must be `prepared`.
pub fn build(
    state: &UserState,
    settings: &Settings,
    max_events: usize,
    limit: impl Into<SizeLimit>,
    bodies: &impl Bodies,
) -> ContextSnapshotBytes {
    let limit = limit.into();
    let mut profiles: Vec<SnapshotProfile> = state
        .profiles
        .iter()
        .filter(|p| profile_shown(settings, &p.source, &p.r#type))
        .map(snap_profile)
        .collect();
    let mut events = shown_events(state, settings, max_events, bodies);
    let profile_sizes: Vec<usize> = profiles.iter().map(|p| framed(p.encoded_len())).collect();
    let event_sizes: Vec<usize> = events.iter().map(|e| framed(e.encoded_len())).collect();
    let (np, ne) = within(
        limit.bytes,
        state.user_id.len(),
        &profile_sizes,
        &event_sizes,
    );
    profiles.truncate(np);
    events.truncate(ne);
    let mut snap = ContextSnapshotBytes {
        user_id: state.user_id.clone(),
        version: 0,
        updated_at: None,
        profiles,
        events,
    };
    let protobuf = framed(state.user_id.len())
        + profile_sizes[..np].iter().sum::<usize>()
        + event_sizes[..ne].iter().sum::<usize>();
    if limit.json && json_may_exceed(protobuf, np + ne, limit.bytes) {
        let (np, ne) = json_within(&decode(&snap), limit.bytes);
        snap.profiles.truncate(np);
        snap.events.truncate(ne);
    }
    snap
}

/// Whether the JSON form of a snapshot whose protobuf form takes
/// `protobuf` bytes, with `elements` events and profiles, may take more
/// than `max_bytes`: JSON takes at most six times the protobuf's bytes (a
/// control character, escaped as `\u00XX`; a number's digits, at most 24,
/// against a double's 11 bytes with its framing), plus the names of the
/// fields and the timestamps as text, under 256 bytes an element. Below
/// that it is not measured.
fn json_may_exceed(protobuf: usize, elements: usize, max_bytes: usize) -> bool {
    protobuf.saturating_mul(6) + 256 * (elements + 1) > max_bytes
}

/// How many of `s`'s profiles and events its JSON form keeps within
/// `max_bytes` with its key (`within` for JSON: oldest events first, then
/// last profiles). Its version and `updated_at` are counted at their longest,
/// so the cut depends on the content only.
fn json_within(s: &ContextSnapshot, max_bytes: usize) -> (usize, usize) {
    let mut probe = s.clone();
    probe.version = u64::MAX;
    probe.updated_at = Some(prost_types::Timestamp {
        seconds: 253_402_300_799,
        nanos: 999_999_999,
    });
    // With its key, the user id.
    let whole = serde_json::to_vec(&to_json(&probe)).expect("json").len() + s.user_id.len();
    let (mut np, mut ne) = (s.profiles.len(), s.events.len());
    if whole <= max_bytes {
        return (np, ne);
    }
    // Leaving out the last element of an array shortens the text by the
    // element's own text and, unless it was the only one, a comma.
    let len = |v: Value| serde_json::to_vec(&v).expect("json").len();
    let mut total = whole;
    while total > max_bytes && ne > 0 {
        total -= len(snapshot_event_json(&s.events[ne - 1])) + usize::from(ne > 1);
        ne -= 1;
    }
    while total > max_bytes && np > 0 {
        total -= len(snapshot_profile_json(&s.profiles[np - 1])) + usize::from(np > 1);
        np -= 1;
    }
    (np, ne)
}

/// How large a snapshot may be: `bytes` (`snapshot.max_bytes`) of the
/// form it is published in, JSON (`snapshot_format = "json"`) or protobuf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimit {
    pub bytes: usize,
    pub json: bool,
}

impl SizeLimit {
    /// The configuration's: `snapshot.max_bytes` of `snapshot_format`.
    pub fn of(c: &crate::config::Config) -> SizeLimit {
        SizeLimit {
            bytes: c.snapshot.max_bytes,
            json: c.snapshot_format == crate::pipeline::SnapshotFormat::Json,
        }
    }
}

/// A limit on the protobuf form.
impl From<usize> for SizeLimit {
    fn from(bytes: usize) -> SizeLimit {
        SizeLimit { bytes, json: false }
    }
}

/// Room a snapshot's version (field 2) and `updated_at` (field 3) take at
/// most, counted whatever they are: whether a snapshot is cut depends on
/// its content only.
const STAMP_ROOM: usize = 32;

/// A length-delimited field of `len` bytes with its key (tags below 16)
/// and length.
fn framed(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// How many of a snapshot's shown profiles and events (`profiles`,
/// `events`: their fields' sizes, in snapshot order, events newest first)
/// it keeps so that its protobuf form and its key (the user id) take at
/// most `max_bytes` (`snapshot.max_bytes`): all of them if they fit; otherwise its oldest
/// events are left out, then its last profiles, until it fits (a Kafka
/// message has a maximum size, and one user's large events must not stop
/// the snapshots of everyone else). `build` and `next_snapshot` cut alike.
fn within(
    max_bytes: usize,
    user_id_len: usize,
    profiles: &[usize],
    events: &[usize],
) -> (usize, usize) {
    // The user id twice: in the snapshot and as its key.
    let mut total = framed(user_id_len)
        + user_id_len
        + STAMP_ROOM
        + profiles.iter().sum::<usize>()
        + events.iter().sum::<usize>();
    let (mut np, mut ne) = (profiles.len(), events.len());
    while total > max_bytes && ne > 0 {
        ne -= 1;
        total -= events[ne];
    }
    while total > max_bytes && np > 0 {
        np -= 1;
        total -= profiles[np];
    }
    (np, ne)
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
    let mut fetched = bodies.properties_many(&missing).into_iter().map(Vec::from);
    shown
        .into_iter()
        .map(|e| {
            let props = if e.properties.is_empty() {
                fetched.next().unwrap_or_default()
            } else {
                e.properties.to_vec()
            };
            snap_event(e, props)
        })
        .collect()
}

/// Hash of a snapshot's visible content (version and updated_at ignored):
/// a new snapshot is published only when it differs from the last one.
pub fn content_hash(content: &ContextSnapshot) -> Vec<u8> {
    hash_content(
        &content.user_id,
        content
            .events
            .iter()
            .map(|e| (e.id.as_str(), time::from_timestamp(&e.created_at))),
        content.profiles.iter().map(|p| p.encode_to_vec()),
    )
}

/// The hash behind `content_hash` and `parts_hash`: the user, each shown
/// event's (id, created_at) (a stored event never changes once its id is
/// held), each shown profile's encoding.
fn hash_content<'a>(
    user_id: &str,
    events: impl Iterator<Item = (&'a str, i64)>,
    profiles: impl Iterator<Item = impl AsRef<[u8]>>,
) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(user_id.as_bytes());
    for (id, created_at_ns) in events {
        h.update([0, b'e']);
        h.update(id.as_bytes());
        h.update(created_at_ns.to_be_bytes());
    }
    for p in profiles {
        h.update([0, b'p']);
        h.update(p.as_ref());
    }
    h.finalize().to_vec()
}

/// The last snapshot published for a user: its version, the hash of its
/// visible content (`content_hash`) if known, and its time.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub version: u64,
    pub hash: Option<Vec<u8>>,
    pub updated_at_ns: i64,
}

impl Published {
    /// From the mark of the last snapshot published (a mark without a hash,
    /// written by an older version, leaves the content unknown: re-sent).
    pub fn of(mark: &crate::model::SnapshotMark) -> Published {
        Published {
            version: mark.version,
            hash: (!mark.content_hash.is_empty()).then(|| mark.content_hash.clone()),
            updated_at_ns: time::from_timestamp(&mark.updated_at),
        }
    }
}

/// Reads a snapshot as published (protobuf, or the JSON form with
/// `json`) without decoding its events' properties; None if it is neither.
/// A new owner of a partition compares what it would publish with this,
/// so content another instance published is not published again.
pub fn published(value: &[u8], json: bool) -> Option<Published> {
    let s = if json {
        from_json(value)?
    } else {
        ContextSnapshotBytes::decode(value).ok()?
    };
    Some(Published {
        version: s.version,
        hash: Some(hash_content(
            &s.user_id,
            s.events
                .iter()
                .map(|e| (e.id.as_str(), time::from_timestamp(&e.created_at))),
            s.profiles.iter().map(|p| p.encode_to_vec()),
        )),
        updated_at_ns: time::from_timestamp(&s.updated_at),
    })
}

/// The JSON form (`to_json`) read back, as far as `published` needs it:
/// the events' properties are left out.
fn from_json(value: &[u8]) -> Option<ContextSnapshotBytes> {
    use crate::model::value::Value as In;
    let text = std::str::from_utf8(value).ok()?;
    let In::Object(o) = crate::model::value::from_str(text).ok()? else {
        return None;
    };
    let text_of = |o: &crate::model::value::Obj, k: &str| match o.get(k) {
        Some(In::String(s)) => Some(s.to_string()),
        _ => None,
    };
    let time_of = |o: &crate::model::value::Obj, k: &str| {
        text_of(o, k)
            .and_then(|t| time::parse_rfc3339(&t))
            .map(time::to_timestamp)
    };
    let items = |k: &str| match o.get(k) {
        Some(In::Array(a)) => a
            .iter()
            .map(|v| match v {
                In::Object(o) => Some(o),
                _ => None,
            })
            .collect::<Option<Vec<_>>>(),
        _ => None,
    };
    let mut profiles = Vec::new();
    for p in items("profiles")? {
        let identifiers = match p.get("identifiers") {
            Some(In::Array(a)) => a
                .iter()
                .map(|i| match i {
                    In::Object(i) => Some(Identifier {
                        r#type: text_of(i, "type")?,
                        value: text_of(i, "value")?,
                    }),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?,
            _ => return None,
        };
        profiles.push(SnapshotProfile {
            source: text_of(p, "source")?,
            r#type: text_of(p, "type")?,
            name: text_of(p, "name"),
            identifiers,
            attributes: match p.get("attributes") {
                Some(In::Object(a)) => Some(json::to_struct(a)),
                _ => None,
            },
            created_at: time_of(p, "created_at"),
            updated_at: time_of(p, "updated_at"),
        });
    }
    let mut events = Vec::new();
    for e in items("events")? {
        events.push(SnapshotEventBytes {
            id: text_of(e, "id")?,
            created_at: time_of(e, "created_at"),
            ..Default::default()
        });
    }
    Some(ContextSnapshotBytes {
        user_id: text_of(&o, "user_id")?,
        version: match o.get("version") {
            Some(In::Number(n)) => n.as_u64()?,
            _ => return None,
        },
        updated_at: time_of(&o, "updated_at"),
        profiles,
        events,
    })
}

/// A shown event, with the index of its entry among the last snapshot's.
type ShownPart<'a> = (&'a StoredEvent, Option<usize>);

/// What a snapshot of `state` shows: the shown events, newest first, and
/// the shown profiles, encoded (`SnapshotProfile`).
/// `last`: the events of the user's last snapshot, newest first (their
/// bytes in `last_bytes`); each shown event is paired with the index of
/// its entry there, if any (found by one merge on (created_at, id), the
/// timeline's order). `last_settings`:
/// whether `last` was chosen under these very settings, so its events are
/// shown without checking their types again.
fn shown_parts<'a, 'b>(
    state: &'a UserState,
    settings: &Settings,
    max_events: usize,
    last: &[ShownEvent],
    last_bytes: &[u8],
    last_settings: bool,
    encoded_profiles: &'b [Option<Vec<u8>>],
) -> (Vec<ShownPart<'a>>, Vec<&'b [u8]>) {
    let mut events = Vec::new();
    let mut next = 0;
    for e in state.timeline.iter().rev() {
        if events.len() == max_events {
            break;
        }
        let mut found = None;
        let want = (e.created_at_ns, e.id.as_bytes());
        // One comparison per entry passed (an event the timeline kept
        // compares its id once, not twice).
        while let Some(entry) = last.get(next) {
            match entry.order(last_bytes).cmp(&want) {
                std::cmp::Ordering::Greater => next += 1,
                std::cmp::Ordering::Equal => {
                    found = Some(next);
                    next += 1;
                    break;
                }
                std::cmp::Ordering::Less => break,
            }
        }
        if (found.is_some() && last_settings) || event_shown(settings, &e.source, &e.r#type) {
            events.push((e, found));
        }
    }
    let profiles = state
        .profiles
        .iter()
        .zip(encoded_profiles)
        .filter(|(p, _)| profile_shown(settings, &p.source, &p.r#type))
        .map(|(_, encoded)| encoded.as_deref().expect("shown profiles are encoded"))
        .collect();
    (events, profiles)
}

/// `encoded` made to hold, in `state`'s order, the encoding
/// (`SnapshotProfile`) of every profile `settings` shows: the ones it
/// holds already are kept (the caller drops them when profiles change).
fn encode_shown_profiles(
    state: &UserState,
    settings: &Settings,
    encoded: &mut Vec<Option<Vec<u8>>>,
) {
    if encoded.len() != state.profiles.len() {
        encoded.clear();
        encoded.resize(state.profiles.len(), None);
    }
    for (p, slot) in state.profiles.iter().zip(encoded.iter_mut()) {
        if slot.is_none() && profile_shown(settings, &p.source, &p.r#type) {
            *slot = Some(encode_profile(p));
        }
    }
}

/// `content_hash` of the snapshot these parts make: stored events never
/// change once their id is held, so they are identified by (id, created_at).
fn parts_hash<'a>(
    user_id: &str,
    events: impl Iterator<Item = &'a StoredEvent>,
    profiles: &[&[u8]],
) -> Vec<u8> {
    hash_content(
        user_id,
        events.map(|e| (e.id.as_str(), e.created_at_ns)),
        profiles.iter(),
    )
}

/// The same hash as `content_hash(&build(..))` with no `max_bytes`,
/// without building the snapshot (the benchmarks' measure of hashing).
pub fn visible_hash(state: &UserState, settings: &Settings, max_events: usize) -> Vec<u8> {
    let mut encoded = Vec::new();
    encode_shown_profiles(state, settings, &mut encoded);
    let (events, profiles) = shown_parts(state, settings, max_events, &[], &[], false, &encoded);
    parts_hash(&state.user_id, events.iter().map(|(e, _)| *e), &profiles)
}

/// The wire form of the events the last snapshot showed, kept between
/// snapshots in its order (newest first), back to back in one buffer: an
/// event is encoded once, and the next snapshot copies the ones it keeps
/// from here, in order from one buffer, into a buffer of its own, which
/// its payload shares. An id's content never changes while the id
/// is held (dropping an id removes its entry).
///
/// One buffer, not one per event: reading each event's bytes from its own
/// heap block for every snapshot, with an id string and a refcount each,
/// cost more than the copy it saved (BENCHMARKS.md item 56).
#[derive(Debug, Default, Clone)]
pub struct EncodedEvents {
    /// The events as the last snapshot's field 5 (key and length first).
    bytes: Bytes,
    events: Vec<ShownEvent>,
    /// The settings these events were chosen under. The next snapshot made
    /// under the same settings (the same `Arc`: held here, so never a new
    /// one at the same address) knows these events are shown without
    /// checking their types again.
    settings: Option<Arc<Settings>>,
    /// The user's profiles encoded, in the state's order, each once a
    /// snapshot showed it: profiles change far less often than events,
    /// and encoding them for every snapshot was 3–4% of the materializing
    /// threads' time (BENCHMARKS.md item 55). Emptied when anything
    /// changed a profile (`forget_profiles`, called by `apply`).
    profiles: Vec<Option<Vec<u8>>>,
    /// Whether the last snapshot left out events or profiles to stay
    /// within `snapshot.max_bytes`.
    cut: bool,
}

/// Where one shown event is in `EncodedEvents::bytes`.
#[derive(Debug, Clone, Copy)]
struct ShownEvent {
    created_at_ns: i64,
    start: u32,
    len: u32,
    /// Its id, inside its bytes.
    id_start: u32,
    id_len: u32,
}

/// What a `Bytes` made from a `Vec` adds to it (its shared count).
const SHARED_OVERHEAD: usize = 32;

impl ShownEvent {
    /// Snapshot order (newest first), as `timeline` reversed; an id's bytes
    /// order as the id does.
    fn order<'a>(&self, bytes: &'a [u8]) -> (i64, &'a [u8]) {
        let id = self.id_start as usize;
        (self.created_at_ns, &bytes[id..id + self.id_len as usize])
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

impl EncodedEvents {
    pub fn new() -> EncodedEvents {
        EncodedEvents::default()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Memory held (the user cache's estimate): the entries, the events'
    /// buffer and the encoded profiles (these with an eighth for the
    /// allocator's rounding).
    pub fn memory(&self) -> usize {
        let profiles: usize = self.profiles.iter().flatten().map(Vec::capacity).sum();
        // Made at its exact size (`next_snapshot`).
        let buffer = if !self.bytes.is_empty() {
            self.bytes.len() + SHARED_OVERHEAD
        } else {
            0
        };
        self.events.capacity() * std::mem::size_of::<ShownEvent>()
            + self.profiles.capacity() * std::mem::size_of::<Option<Vec<u8>>>()
            + buffer
            + profiles
            + profiles / 8
    }

    /// Whether the last snapshot made left out events or profiles to stay
    /// within its `max_bytes`.
    pub fn cut(&self) -> bool {
        self.cut
    }

    /// The user's profiles changed: encode them again for the next snapshot.
    pub fn forget_profiles(&mut self) {
        self.profiles.clear();
    }

    /// Forgets the event `id` (dropped from the timeline); its bytes stay
    /// in the buffer until the next snapshot makes a new one.
    pub fn remove(&mut self, created_at_ns: i64, id: &str) {
        let bytes = &self.bytes;
        self.events
            .retain(|e| e.order(bytes) != (created_at_ns, id.as_bytes()));
    }
}

/// The length of one snapshot event's encoding (`SnapshotEvent`) with
/// `properties_len` bytes of properties, not framed.
fn event_len(e: &StoredEvent, properties_len: usize) -> usize {
    use prost::encoding::{encoded_len_varint, key_len, message, string};
    let str_len = |tag: u32, v: &String| {
        if v.is_empty() {
            0
        } else {
            string::encoded_len(tag, v)
        }
    };
    let props_len = if properties_len == 0 {
        0
    } else {
        key_len(5) + encoded_len_varint(properties_len as u64) + properties_len
    };
    str_len(1, &e.id)
        + str_len(2, &e.source)
        + str_len(3, &e.r#type)
        + str_len(4, &e.description)
        + props_len
        + message::encoded_len(6, &time::to_timestamp(e.created_at_ns))
        + message::encoded_len(7, &time::to_timestamp(e.received_at_ns))
}

/// What `put_event_field` appends for an event of `event_len` bytes.
fn field_len(event_len: usize) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    key_len(5) + encoded_len_varint(event_len as u64) + event_len
}

/// Appends one snapshot event, encoded as `snap_event(e,
/// properties).encode_to_vec()` would (without copying its strings first),
/// as a snapshot's field 5 (its key and length first), to `buf`; returns
/// where in `buf` its id is. `len`: `event_len(e, properties.len())`.
fn put_event_field(e: &StoredEvent, properties: &[u8], len: usize, buf: &mut Vec<u8>) -> usize {
    use prost::encoding::{encode_key, encode_varint, message, string, WireType};
    debug_assert_eq!(len, event_len(e, properties.len()));
    let start = buf.len();
    buf.reserve(field_len(len));
    encode_key(5, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    let mut id_at = buf.len();
    if !e.id.is_empty() {
        string::encode(1, &e.id, buf);
        id_at = buf.len() - e.id.len();
    }
    if !e.source.is_empty() {
        string::encode(2, &e.source, buf);
    }
    if !e.r#type.is_empty() {
        string::encode(3, &e.r#type, buf);
    }
    if !e.description.is_empty() {
        string::encode(4, &e.description, buf);
    }
    if !properties.is_empty() {
        put_bytes(5, properties, buf);
    }
    message::encode(6, &time::to_timestamp(e.created_at_ns), buf);
    message::encode(7, &time::to_timestamp(e.received_at_ns), buf);
    debug_assert_eq!(buf.len() - start, field_len(len));
    id_at
}

/// A `ContextSnapshot` in protobuf form from its parts, the profiles
/// already encoded and the events already encoded as its field 5, back to
/// back (`put_event_field`): the same bytes as `build(..)` with version
/// and updated_at set, then `encode_to_vec()`. The events are shared, not
/// copied: the embedded log copies them once, into its file.
pub fn encode_snapshot(
    user_id: &str,
    version: u64,
    updated_at_ns: i64,
    profiles: &[&[u8]],
    events: Bytes,
) -> Payload {
    use prost::encoding::{message, uint64};
    let len: usize = profiles.iter().map(|p| p.len() + 4).sum::<usize>() + user_id.len() + 32;
    let mut head = Vec::with_capacity(len);
    if !user_id.is_empty() {
        put_bytes(1, user_id.as_bytes(), &mut head);
    }
    if version != 0 {
        uint64::encode(2, &version, &mut head);
    }
    message::encode(3, &time::to_timestamp(updated_at_ns), &mut head);
    for p in profiles {
        put_bytes(4, p, &mut head);
    }
    Payload::from_parts(head, events)
}

/// A length-delimited field (string, bytes or an encoded message).
fn put_bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    use prost::encoding::{encode_key, encode_varint, WireType};
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// If the visible content changed since the last snapshot published, bumps
/// the state's version and returns the new snapshot, encoded (protobuf).
/// `shown`: the encoded events of the last snapshot (reused, then replaced
/// by this snapshot's; made under the same `settings`, they are known shown);
/// the properties of the others come from `bodies`. At most `max_events`
/// events, and at most `max_bytes` in all (`within`: `build` cuts alike).
pub fn next_snapshot(
    state: &mut UserState,
    settings: &Arc<Settings>,
    max_events: usize,
    limit: impl Into<SizeLimit>,
    at_ns: i64,
    shown: &mut EncodedEvents,
    bodies: &impl Bodies,
) -> Option<Payload> {
    let limit = limit.into();
    let same_settings = matches!(&shown.settings, Some(s) if Arc::ptr_eq(s, settings));
    encode_shown_profiles(state, settings, &mut shown.profiles);
    let (mut events, mut profiles) = shown_parts(
        state,
        settings,
        max_events,
        &shown.events,
        &shown.bytes,
        same_settings,
        &shown.profiles,
    );
    let mut hash = parts_hash(&state.user_id, events.iter().map(|(e, _)| *e), &profiles);
    if hash == state.snapshot_hash {
        return None;
    }
    // The events shown last time are copied as they are (their entries
    // were found by `shown_parts`'s merge); the others are encoded, with
    // the properties not inline fetched in one call.
    let missing: Vec<&StoredEvent> = events
        .iter()
        .filter(|(e, found)| found.is_none() && e.properties.is_empty())
        .map(|(e, _)| *e)
        .collect();
    let fetched = bodies.properties_many(&missing);
    let mut fetched = fetched.iter().map(|b| &b[..]);
    // Each new event's properties and encoded length, so the buffer is
    // made at its exact size.
    let properties: Vec<(&[u8], usize)> = events
        .iter()
        .map(|(e, found)| {
            let props = match found {
                Some(_) => return (&[][..], 0),
                None if e.properties.is_empty() => fetched.next().unwrap_or_default(),
                None => &e.properties[..],
            };
            (props, event_len(e, props.len()))
        })
        .collect();
    let (last, last_bytes) = (&shown.events, &shown.bytes[..]);
    let sizes: Vec<usize> = events
        .iter()
        .zip(&properties)
        .map(|((_, found), (_, len))| match found {
            Some(i) => last[*i].len as usize,
            None => field_len(*len),
        })
        .collect();
    let profile_sizes: Vec<usize> = profiles.iter().map(|p| framed(p.len())).collect();
    let (np, ne) = within(limit.bytes, state.user_id.len(), &profile_sizes, &sizes);
    let mut cut = (np, ne) != (profiles.len(), events.len());
    if cut {
        profiles.truncate(np);
        events.truncate(ne);
        hash = parts_hash(&state.user_id, events.iter().map(|(e, _)| *e), &profiles);
        if hash == state.snapshot_hash {
            return None;
        }
    }
    let size: usize = sizes[..ne].iter().sum();
    let mut buf = Vec::with_capacity(size);
    let mut entries = Vec::with_capacity(events.len());
    for ((e, found), (props, len)) in events.iter().zip(&properties) {
        let start = buf.len();
        let id_start = match found {
            Some(i) => {
                let old = last[*i];
                buf.extend_from_slice(&last_bytes[old.range()]);
                start + (old.id_start - old.start) as usize
            }
            None => put_event_field(e, props, *len, &mut buf),
        };
        entries.push(ShownEvent {
            created_at_ns: e.created_at_ns,
            start: start as u32,
            len: (buf.len() - start) as u32,
            id_start: id_start as u32,
            id_len: e.id.len() as u32,
        });
    }
    debug_assert_eq!(buf.len(), size);
    let protobuf = framed(state.user_id.len()) + profile_sizes[..np].iter().sum::<usize>() + size;
    if limit.json && json_may_exceed(protobuf, np + ne, limit.bytes) {
        // Measured as JSON (as `build` does): the content hash is then the
        // one consumers compute from what they receive.
        let whole = encode_snapshot(&state.user_id, 0, 0, &profiles, Bytes::from(buf.clone()));
        let decoded = ContextSnapshot::decode(&*whole.contiguous()).expect("own encoding");
        let (jp, je) = json_within(&decoded, limit.bytes);
        if (jp, je) != (profiles.len(), events.len()) {
            profiles.truncate(jp);
            events.truncate(je);
            buf.truncate(entries.get(je).map_or(buf.len(), |e| e.start as usize));
            entries.truncate(je);
            hash = parts_hash(&state.user_id, events.iter().map(|(e, _)| *e), &profiles);
            if hash == state.snapshot_hash {
                return None;
            }
            cut = true;
        }
    }
    shown.cut = cut;
    shown.bytes = Bytes::from(buf);
    shown.events = entries;
    shown.settings = Some(settings.clone());
    let version = state.snapshot_version + 1;
    let snap = encode_snapshot(
        &state.user_id,
        version,
        at_ns,
        &profiles,
        shown.bytes.clone(),
    );
    debug_assert_eq!(
        content_hash(&ContextSnapshot::decode(&snap.to_vec()[..]).expect("own encoding")),
        hash
    );
    state.snapshot_hash = hash;
    state.snapshot_version = version;
    state.snapshot_updated_at_ns = at_ns;
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
        "profiles": s.profiles.iter().map(snapshot_profile_json).collect::<Vec<_>>(),
        "events": s.events.iter().map(snapshot_event_json).collect::<Vec<_>>(),
    })
}

fn snapshot_profile_json(p: &crate::model::SnapshotProfile) -> Value {
    json!({
        "source": p.source, "type": p.r#type, "name": p.name,
        "identifiers": ids_json(&p.identifiers),
        "attributes": json::from_struct(&p.attributes),
        "created_at": ts_json(&p.created_at), "updated_at": ts_json(&p.updated_at),
    })
}

fn snapshot_event_json(e: &crate::model::SnapshotEvent) -> Value {
    json!({
        "id": e.id, "source": e.source, "type": e.r#type, "description": e.description,
        "properties": json::from_struct(&e.properties),
        "created_at": ts_json(&e.created_at), "received_at": ts_json(&e.received_at),
    })
}

/// A snapshot's JSON form as published with `snapshot_format = "json"`.
/// Its content was cut to `max_bytes` of JSON already (`build` and
/// `next_snapshot` measure it when it may be larger); should it still be
/// larger, it is cut here too, as they would, and the error logged: a
/// message larger than Kafka takes would stop the stage.
pub fn json_bytes(s: &ContextSnapshot, max_bytes: usize) -> Vec<u8> {
    let json = serde_json::to_vec(&to_json(s)).expect("json");
    if json.len() + s.user_id.len() <= max_bytes {
        return json;
    }
    let (np, ne) = json_within(s, max_bytes);
    tracing::error!(
        user_id = %s.user_id,
        bytes = json.len(),
        max_bytes,
        "a JSON snapshot was larger than its protobuf form let expect; cut to fit"
    );
    let mut cut = s.clone();
    cut.profiles.truncate(np);
    cut.events.truncate(ne);
    serde_json::to_vec(&to_json(&cut)).expect("json")
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
    fn profiles_encode_as_their_snapshot_form_does() {
        let attrs = json::to_struct(
            &json!({"tier": "gold", "n": 3, "tags": ["a", "b"], "nested": {"x": null, "y": true}})
                .as_object()
                .unwrap()
                .into(),
        );
        let full = Profile {
            source: "shop".into(),
            r#type: "customer".into(),
            name: Some("Jane".into()),
            identifiers: vec![
                Identifier::new("email", "a@x"),
                Identifier::new("phone", "1"),
            ],
            attributes: Some(attrs),
            created_at_ns: -5,
            updated_at_ns: 1_700_000_000_123_456_789,
        };
        let bare = Profile {
            name: Some(String::new()),
            attributes: Some(prost_types::Struct::default()),
            ..Profile::default()
        };
        for p in [full, bare, Profile::default()] {
            assert_eq!(
                encode_profile(&p),
                snap_profile(&p).encode_to_vec(),
                "{p:?}"
            );
        }
    }

    #[test]
    fn secure_by_default() {
        let snap = build(&state(), &Settings::default(), 50, usize::MAX, &());
        assert!(snap.events.is_empty() && snap.profiles.is_empty());
    }

    #[test]
    fn visibility_rules_and_order() {
        let s = state();
        let snap = build(&s, &settings(true, true, true), 50, usize::MAX, &());
        assert_eq!(
            ids(&snap),
            ["d", "c", "b", "a"],
            "newest first, equal times: greater id first"
        );
        assert_eq!(snap.profiles.len(), 1);
        assert_eq!(
            ids(&build(
                &s,
                &settings(true, false, true),
                50,
                usize::MAX,
                &()
            )),
            ["d", "c", "a"]
        );
        assert_eq!(
            ids(&build(
                &s,
                &settings(false, true, true),
                50,
                usize::MAX,
                &()
            )),
            ["b"]
        );
        assert!(build(&s, &settings(true, true, false), 50, usize::MAX, &())
            .profiles
            .is_empty());
        assert_eq!(
            ids(&build(&s, &settings(true, true, true), 2, usize::MAX, &())),
            ["d", "c"],
            "max events"
        );
    }

    fn next(s: &mut UserState, on: &Settings, at: i64) -> Option<ContextSnapshot> {
        let mut shown = EncodedEvents::new();
        next_snapshot(
            s,
            &Arc::new(on.clone()),
            50,
            usize::MAX,
            at,
            &mut shown,
            &(),
        )
        .map(|b| ContextSnapshot::decode(&b.to_vec()[..]).unwrap())
    }

    #[test]
    fn versions_start_at_one_and_grow_only_on_change() {
        let mut s = state();
        let on = settings(true, true, true);
        let first = next(&mut s, &on, 10).unwrap();
        assert_eq!(first.version, 1);
        assert!(
            next(&mut s, &on, 11).is_none(),
            "same content, no new version"
        );
        s.timeline.push(event("f", "zendesk", "hidden", 9));
        assert!(
            next(&mut s, &on, 12).is_none(),
            "hidden change, no new version"
        );
        s.timeline.push(event("g", "shop", "order", 9));
        assert_eq!(next(&mut s, &on, 13).unwrap().version, 2);
        let snap = next(&mut s, &settings(false, false, false), 14).unwrap();
        assert_eq!((snap.version, snap.events.len()), (3, 0));
        let back = next(&mut s, &on, 15).unwrap();
        assert_eq!(
            back.events.len(),
            5,
            "hidden data is kept, showing brings it back"
        );
        assert_eq!(to_json(&back)["version"], 4);
    }

    /// Bodies kept outside the timeline, answered from a map.
    struct MapBodies(std::collections::HashMap<String, Vec<u8>>);

    impl Bodies for MapBodies {
        fn properties(&self, e: &StoredEvent) -> Vec<u8> {
            self.0.get(&e.id).cloned().unwrap_or_default()
        }
    }

    #[test]
    fn encoded_snapshots_are_the_bytes_build_encodes() {
        let mut s = state();
        s.user_id = "email:jane@example.com".into();
        let props = |k: &str| {
            let mut st = prost_types::Struct::default();
            st.fields.insert(
                k.into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(k.repeat(3))),
                },
            );
            st.encode_to_vec()
        };
        // Some properties inline, some in the body store, one empty.
        s.timeline[0].properties = props("inline").into();
        s.timeline[1].description = "Order #1001".into();
        s.timeline[2].received_at_ns = 1_700_000_000_123_456_789;
        let bodies = MapBodies(
            [
                ("c".to_string(), props("c")),
                ("d".to_string(), props("dd")),
            ]
            .into_iter()
            .collect(),
        );
        s.profiles[1].name = Some("Jane".into());
        s.profiles[1].identifiers = vec![Identifier {
            r#type: "email".into(),
            value: "jane@example.com".into(),
        }];
        let on = Arc::new(settings(true, true, true));
        let mut shown = EncodedEvents::new();
        for (round, max) in [(1u64, 50usize), (2, 2), (3, 50)] {
            // Each round shows a different set, so a new snapshot is due;
            // the events kept from the round before are reused.
            s.snapshot_hash.clear();
            let got = next_snapshot(
                &mut s,
                &on,
                max,
                usize::MAX,
                77 + round as i64,
                &mut shown,
                &bodies,
            )
            .unwrap();
            let mut want = build(&s, &on, max, usize::MAX, &bodies);
            want.version = round;
            want.updated_at = Some(time::to_timestamp(77 + round as i64));
            assert_eq!(got, want.encode_to_vec(), "round {round}");
            assert_eq!(shown.len(), want.events.len());
        }
    }

    #[test]
    fn a_published_snapshot_tells_its_version_hash_and_time_in_either_format() {
        let mut s = state();
        s.user_id = "email:jane@example.com".into();
        let text = json!({"tier": "gold", "orders": 12, "ratio": 0.25,
            "nested": {"a": [1, null, true, "x"]}})
        .to_string();
        let attrs = crate::model::value::from_str(&text).unwrap();
        let crate::model::value::Value::Object(attrs) = attrs else {
            unreachable!()
        };
        for (i, p) in s.profiles.iter_mut().enumerate() {
            p.attributes = Some(json::to_struct(&attrs));
            p.created_at_ns = 1_700_000_000_123_456_789 + i as i64;
            p.updated_at_ns = 1_700_000_001_000_000_000;
        }
        s.profiles[1].name = Some("Jane".into());
        s.profiles[1].identifiers = vec![Identifier {
            r#type: "email".into(),
            value: "jane@example.com".into(),
        }];
        s.timeline[0].properties = json::encode_struct(&attrs).into();
        let at = 1_700_000_002_500_000_000;
        let on = Arc::new(settings(true, true, true));
        let snap = next_snapshot(
            &mut s,
            &on,
            50,
            usize::MAX,
            at,
            &mut EncodedEvents::new(),
            &(),
        )
        .unwrap();
        let want = Published {
            version: 1,
            hash: Some(s.snapshot_hash.clone()),
            updated_at_ns: at,
        };
        let proto = snap.to_vec();
        assert_eq!(published(&proto, false), Some(want.clone()));
        let decoded = ContextSnapshot::decode(&proto[..]).unwrap();
        let as_json = serde_json::to_vec(&to_json(&decoded)).unwrap();
        assert_eq!(published(&as_json, true), Some(want));
        // Another content, another hash.
        s.timeline.pop();
        s.timeline.pop();
        let other = next_snapshot(
            &mut s,
            &on,
            50,
            usize::MAX,
            at,
            &mut EncodedEvents::new(),
            &(),
        )
        .unwrap();
        let other = published(&other.to_vec(), false).unwrap();
        assert_eq!(other.version, 2);
        assert_ne!(other.hash, Some(content_hash(&decoded)));
        assert_eq!(published(b"not a snapshot", false), None);
        assert_eq!(published(b"{\"user_id\": \"u\"}", true), None);
    }

    #[test]
    fn events_known_shown_are_checked_again_under_new_settings() {
        // The last snapshot's events are taken as shown only under the very
        // settings they were chosen under: new settings (a new `Arc`; the
        // events hold the old one, so none gets its address) check every
        // type again.
        let mut s = state();
        let mut shown = EncodedEvents::new();
        let all = Arc::new(settings(true, true, true));
        next_snapshot(&mut s, &all, 50, usize::MAX, 1, &mut shown, &()).unwrap();
        assert_eq!(shown.len(), 4, "a, b, c, d");
        s.timeline.push(event("f", "zendesk", "article_viewed", 5));
        let got = next_snapshot(&mut s, &all, 50, usize::MAX, 2, &mut shown, &()).unwrap();
        let want = build(&s, &all, 50, usize::MAX, &());
        assert_eq!(
            ids(&ContextSnapshotBytes::decode(&got.to_vec()[..]).unwrap()),
            ids(&want)
        );
        // Zendesk events off: a, c, d and f are hidden though `shown` holds them.
        let zendesk_off = Arc::new(settings(false, true, true));
        drop(all);
        let got = next_snapshot(&mut s, &zendesk_off, 50, usize::MAX, 3, &mut shown, &()).unwrap();
        assert_eq!(
            ids(&ContextSnapshotBytes::decode(&got.to_vec()[..]).unwrap()),
            ["b"]
        );
        let mut want = build(&s, &zendesk_off, 50, usize::MAX, &());
        want.version = 3;
        want.updated_at = Some(time::to_timestamp(3));
        assert_eq!(got, want.encode_to_vec());
    }

    /// A user with 40 shown events of 100 to 4,000 bytes of properties
    /// (every third in the body store) and two shown profiles.
    fn large_user() -> (UserState, MapBodies) {
        let mut s = crate::state::apply::new_user("u-large");
        let mut bodies = std::collections::HashMap::new();
        for i in 0..40i64 {
            let mut e = event(&format!("e{i}"), "shop", "order", i);
            let mut st = prost_types::Struct::default();
            st.fields.insert(
                "blob".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        "x".repeat(100 + (i as usize * 997) % 3900),
                    )),
                },
            );
            if i % 3 == 0 {
                bodies.insert(e.id.clone(), st.encode_to_vec());
            } else {
                e.properties = st.encode_to_vec().into();
            }
            s.timeline.push(e);
        }
        for ty in ["customer", "customer"] {
            s.profiles.push(Profile {
                source: "shop".into(),
                r#type: ty.into(),
                name: Some("n".repeat(300)),
                // As the state holds them: `{}` in JSON reads back as one.
                attributes: Some(Default::default()),
                ..Default::default()
            });
        }
        s.profiles[1].source = "shop2".into();
        (s, MapBodies(bodies))
    }

    #[test]
    fn a_snapshot_over_max_bytes_leaves_out_its_oldest_events_in_both_paths() {
        let mut on = settings(true, true, true);
        on.shown_profile_types
            .push(TypeRef::new("shop2", "customer"));
        let on = Arc::new(prepared(on));
        let (base, bodies) = large_user();
        let all = build(&base, &on, 50, usize::MAX, &bodies);
        assert_eq!((all.events.len(), all.profiles.len()), (40, 2));
        let body_len = |b: &ContextSnapshotBytes| b.encoded_len();
        let whole = body_len(&all);
        for max in [
            usize::MAX,
            whole + 7 + STAMP_ROOM,
            whole,
            60_000,
            20_000,
            4_100,
            700,
            100,
        ] {
            let mut s = base.clone();
            let mut shown = EncodedEvents::new();
            let got = next_snapshot(&mut s, &on, 50, max, 5, &mut shown, &bodies).expect("new");
            let mut want = build(&s, &on, 50, max, &bodies);
            // Newest first, a prefix of what is shown uncut; profiles too.
            assert_eq!(
                want.events[..],
                all.events[..want.events.len()],
                "max {max}"
            );
            assert_eq!(want.profiles[..], all.profiles[..want.profiles.len()]);
            let (body, kept) = (body_len(&want), want.events.len());
            let key = s.user_id.len();
            if kept < 40 || want.profiles.len() < 2 {
                assert!(body + key + STAMP_ROOM <= max || kept == 0 && want.profiles.is_empty());
                // One more event (or profile) would not have fitted.
                let mut more = want.clone();
                if kept < 40 {
                    more.events.push(all.events[kept].clone());
                } else {
                    more.profiles
                        .push(all.profiles[more.profiles.len()].clone());
                }
                assert!(
                    body_len(&more) + key + STAMP_ROOM > max,
                    "max {max}: cut more than needed"
                );
            } else {
                assert_eq!(kept, 40);
                assert!(whole + key + STAMP_ROOM <= max, "max {max}: not cut");
            }
            want.version = 1;
            want.updated_at = Some(time::to_timestamp(5));
            assert_eq!(got, want.encode_to_vec(), "max {max}");
            assert!(got.len() + key <= max, "max {max}: {} bytes", got.len());
            assert_eq!(shown.len(), kept);
            assert_eq!(
                shown.cut(),
                kept < 40 || want.profiles.len() < 2,
                "max {max}"
            );
            // Nothing changed: nothing new. An event older than the cut
            // changes nothing shown either.
            assert!(next_snapshot(&mut s, &on, 50, max, 6, &mut shown, &bodies).is_none());
            if kept < 40 {
                let mut late = event("late", "shop", "order", -1);
                late.properties = vec![1u8; 10].into();
                s.timeline.insert(0, late);
                assert!(next_snapshot(&mut s, &on, 50, max, 7, &mut shown, &bodies).is_none());
            }
            // A newer event is published, cut again to fit (unless not
            // even it fits: then nothing shown changed).
            let before = build(&s, &on, 50, max, &bodies);
            let mut newer = event("newest", "shop", "order", 100);
            newer.properties = vec![].into();
            s.timeline.push(newer);
            let mut want = build(&s, &on, 50, max, &bodies);
            let got = next_snapshot(&mut s, &on, 50, max, 8, &mut shown, &bodies);
            if want == before {
                assert!(got.is_none() && max < 1000, "max {max}");
                continue;
            }
            let got = got.expect("new");
            want.version = 2;
            want.updated_at = Some(time::to_timestamp(8));
            assert_eq!(got, want.encode_to_vec(), "max {max}, second");
        }
    }

    #[test]
    fn a_json_snapshot_over_max_bytes_is_measured_as_the_json_consumers_read() {
        let mut on = settings(true, true, true);
        on.shown_profile_types
            .push(TypeRef::new("shop2", "customer"));
        let on = Arc::new(prepared(on));
        let (mut base, bodies) = large_user();
        // Text that JSON escapes (a control character takes six bytes) and
        // long numbers: the JSON form is larger than the protobuf one, and
        // cuts more.
        for (i, e) in base
            .timeline
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
        {
            let mut st = prost_types::Struct::default();
            st.fields.insert(
                "escaped".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        "\u{1}".repeat(500 + i),
                    )),
                },
            );
            st.fields.insert(
                "n".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(1.0 / 3.0 + i as f64)),
                },
            );
            e.properties = st.encode_to_vec().into();
        }
        let json_limit = |bytes| SizeLimit { bytes, json: true };
        let all = decode(&build(&base, &on, 50, usize::MAX, &bodies));
        let whole = serde_json::to_vec(&to_json(&all)).unwrap().len();
        let mut json_cut_more = 0;
        for max in [usize::MAX, whole + 200, whole, 60_000, 20_000, 4_100, 700] {
            let mut s = base.clone();
            let mut shown = EncodedEvents::new();
            let got = next_snapshot(&mut s, &on, 50, json_limit(max), 5, &mut shown, &bodies)
                .expect("new");
            let got = ContextSnapshot::decode(&*got.contiguous()).unwrap();
            let mut want = decode(&build(&s, &on, 50, json_limit(max), &bodies));
            want.version = 1;
            want.updated_at = Some(time::to_timestamp(5));
            assert_eq!(got, want, "max {max}: publish and GET /context");
            // What consumers receive fits, and its content hash (what a
            // restart reads back from the topic) is the state's.
            let text = json_bytes(&got, max);
            assert_eq!(text, serde_json::to_vec(&to_json(&got)).unwrap());
            let (kept, profiles) = (got.events.len(), got.profiles.len());
            assert!(
                text.len() + s.user_id.len() <= max || kept + profiles == 0,
                "max {max}: {} bytes",
                text.len()
            );
            assert_eq!(
                published(&text, true).unwrap().hash.unwrap(),
                s.snapshot_hash,
                "max {max}"
            );
            assert_eq!(got.events[..], all.events[..kept]);
            assert_eq!(got.profiles[..], all.profiles[..profiles]);
            assert_eq!(shown.cut(), kept < 40 || profiles < 2, "max {max}");
            if kept < 40 || profiles < 2 {
                // One more would not have fitted (version and time counted
                // at their longest).
                let mut more = got.clone();
                if kept < 40 {
                    more.events.push(all.events[kept].clone());
                } else {
                    more.profiles.push(all.profiles[profiles].clone());
                }
                more.version = u64::MAX;
                more.updated_at = Some(prost_types::Timestamp {
                    seconds: 253_402_300_799,
                    nanos: 999_999_999,
                });
                assert!(
                    serde_json::to_vec(&to_json(&more)).unwrap().len() + s.user_id.len() > max,
                    "max {max}"
                );
                // The protobuf limit alone keeps more.
                let proto = build(&s, &on, 50, max, &bodies);
                json_cut_more += usize::from(proto.events.len() > kept);
            }
            // Unchanged: nothing new.
            assert!(
                next_snapshot(&mut s, &on, 50, json_limit(max), 6, &mut shown, &bodies).is_none()
            );
        }
        assert!(
            json_cut_more >= 3,
            "the JSON form cut more than the protobuf one"
        );
    }

    #[test]
    fn kept_events_follow_a_timeline_that_moves() {
        // New events in front, old ones trimmed, one inserted in the middle
        // (an older created_at), one id dropped and sent again with other
        // content: every snapshot is the bytes `build` encodes.
        let mut s = state();
        let on = Arc::new(settings(true, true, true));
        let mut shown = EncodedEvents::new();
        let check = |s: &mut UserState, shown: &mut EncodedEvents, max: usize, round: u64| {
            let got =
                next_snapshot(s, &on, max, usize::MAX, round as i64, shown, &()).expect("changed");
            let mut want = build(s, &on, max, usize::MAX, &());
            want.version = s.snapshot_version;
            want.updated_at = Some(time::to_timestamp(round as i64));
            assert_eq!(got, want.encode_to_vec(), "round {round}");
            assert_eq!(shown.len(), want.events.len());
        };
        check(&mut s, &mut shown, 3, 1);
        s.timeline.push(event("f", "shop", "order", 5));
        s.timeline.push(event("g", "zendesk", "article_viewed", 6));
        check(&mut s, &mut shown, 3, 2);
        s.timeline.insert(4, event("h", "shop", "order", 3));
        s.timeline.remove(0);
        check(&mut s, &mut shown, 4, 3);
        // "g" is dropped (its entry with it) and comes back changed.
        let g = s.timeline.pop().expect("g");
        shown.remove(g.created_at_ns, &g.id);
        let mut g2 = event("g", "zendesk", "article_viewed", 6);
        g2.description = "changed".into();
        s.timeline.push(g2);
        s.snapshot_hash.clear();
        check(&mut s, &mut shown, 4, 4);
        let last =
            ContextSnapshot::decode(&*build(&s, &on, 4, usize::MAX, &()).encode_to_vec()).unwrap();
        assert_eq!(last.events[0].description, "changed");
    }
}
