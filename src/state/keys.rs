//! Key encoding. State keys of the materializing stage start with the
//! records-log partition (u32 big endian), so one partition's state is one
//! contiguous key range: dropping or restoring a partition is a range operation.

/// Embedded topics of earlier versions (now segment files under
/// `<data_dir>/log`); kept so their data dirs open and move over.
pub const CF_LOG: &str = "log";
pub const CF_META: &str = "meta";
pub const CF_USERS: &str = "users";
pub const CF_SNAP: &str = "snap";
pub const CF_IDENT: &str = "ident";
pub const CF_CATALOG: &str = "catalog";
pub const CF_PART: &str = "part";
pub const CF_OUTBOX: &str = "outbox";
/// Event properties, one value per stored event (written once, deleted on trim).
pub const CF_BODIES: &str = "bodies";

/// Timeline events, one key per event, in timeline order within a user.
pub const CF_TIMELINE: &str = "timeline";

pub const ALL_CFS: [&str; 10] = [
    CF_LOG,
    CF_META,
    CF_USERS,
    CF_SNAP,
    CF_IDENT,
    CF_CATALOG,
    CF_PART,
    CF_OUTBOX,
    CF_BODIES,
    CF_TIMELINE,
];
/// Column families a rebuild drops and replays (identities included: the
/// replay writes them again from the records' links, `--from-inputs` from
/// its routing). The last snapshot per user (`CF_SNAP`) is kept, so
/// versions continue where consumers saw them.
pub const REBUILT_CFS: [&str; 7] = [
    CF_USERS,
    CF_CATALOG,
    CF_PART,
    CF_OUTBOX,
    CF_BODIES,
    CF_TIMELINE,
    CF_IDENT,
];

pub fn partition_prefix(p: u32) -> [u8; 4] {
    p.to_be_bytes()
}

/// users / snap: partition + user_id.
pub fn user(p: u32, user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + user_id.len());
    k.extend_from_slice(&p.to_be_bytes());
    k.extend_from_slice(user_id.as_bytes());
    k
}

pub fn split_user(key: &[u8]) -> Option<(u32, &str)> {
    if key.len() < 4 {
        return None;
    }
    let p = u32::from_be_bytes(key[..4].try_into().ok()?);
    Some((p, std::str::from_utf8(&key[4..]).ok()?))
}

/// bodies: partition + user_id + 0 + event id.
pub fn body(p: u32, user_id: &str, event_id: &str) -> Vec<u8> {
    let mut k = user(p, user_id);
    k.push(0);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// timeline: partition + user_id + 0, the prefix of a user's events.
pub fn timeline_prefix(p: u32, user_id: &str) -> Vec<u8> {
    let mut k = user(p, user_id);
    k.push(0);
    k
}

/// timeline: partition + user_id + 0 + created_at + event id, so key order
/// is timeline order (created_at, then id). created_at is big endian with
/// the sign bit flipped (negative times sort first).
pub fn timeline_event(p: u32, user_id: &str, created_at_ns: i64, event_id: &str) -> Vec<u8> {
    let mut k = timeline_prefix(p, user_id);
    k.extend_from_slice(&sortable_time(created_at_ns));
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// A time in a timeline key: big endian with the sign bit flipped.
fn sortable_time(ns: i64) -> [u8; 8] {
    ((ns as u64) ^ (1 << 63)).to_be_bytes()
}

/// Whether `key`, a key of the user's timeline (its prefix of `prefix_len`
/// bytes), is the event's (`timeline_event` without building it).
pub fn is_timeline_event(
    key: &[u8],
    prefix_len: usize,
    created_at_ns: i64,
    event_id: &str,
) -> bool {
    let Some(rest) = key.get(prefix_len..) else {
        return false;
    };
    rest.len() == 8 + event_id.len()
        && rest[..8] == sortable_time(created_at_ns)
        && &rest[8..] == event_id.as_bytes()
}

/// catalog: partition + kind tag + source + 0 + type.
pub fn catalog(p: u32, tag: u8, source: &str, ty: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + source.len() + ty.len());
    k.extend_from_slice(&p.to_be_bytes());
    k.push(tag);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(ty.as_bytes());
    k
}

pub fn split_catalog(key: &[u8]) -> Option<(u32, u8, &str, &str)> {
    if key.len() < 6 {
        return None;
    }
    let p = u32::from_be_bytes(key[..4].try_into().ok()?);
    let tag = key[4];
    let rest = &key[5..];
    let zero = rest.iter().position(|b| *b == 0)?;
    Some((
        p,
        tag,
        std::str::from_utf8(&rest[..zero]).ok()?,
        std::str::from_utf8(&rest[zero + 1..]).ok()?,
    ))
}

/// part: the partition's next records-log offset.
pub fn part_offset(p: u32) -> Vec<u8> {
    let mut k = p.to_be_bytes().to_vec();
    k.push(b'o');
    k
}

/// part: a user whose next snapshot is held back (`snapshot.min_interval_ms`);
/// the value is the last snapshot published for it (protobuf), which
/// `GET /context` serves until the held one is published.
pub fn part_held(p: u32, user_id: &str) -> Vec<u8> {
    let mut k = part_held_prefix(p);
    k.extend_from_slice(user_id.as_bytes());
    k
}

/// part: the prefix of partition `p`'s held users.
pub fn part_held_prefix(p: u32) -> Vec<u8> {
    let mut k = p.to_be_bytes().to_vec();
    k.push(b'h');
    k
}

/// part: how many users the partition holds (`contextd_users`).
pub fn part_users(p: u32) -> Vec<u8> {
    let mut k = p.to_be_bytes().to_vec();
    k.push(b'n');
    k
}

/// part: the visibility settings in effect for the partition.
pub fn part_settings(p: u32) -> Vec<u8> {
    let mut k = p.to_be_bytes().to_vec();
    k.push(b's');
    k
}

/// part: highest input offset applied from an input topic partition
/// (skips records the routing stage re-sent after a crash).
pub fn part_input_mark(p: u32, topic: &str, input_partition: i32) -> Vec<u8> {
    let mut k = p.to_be_bytes().to_vec();
    k.push(b'w');
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&input_partition.to_be_bytes());
    k
}

/// meta: a consumer position (next offset) of a stage.
pub fn position(stage: &str, topic: &str, partition: i32) -> Vec<u8> {
    format!("pos/{stage}/{topic}/{partition}").into_bytes()
}

/// meta: the latest settings seen (any partition), for the admin API.
pub const META_SETTINGS: &[u8] = b"settings";
/// meta: the partition count the data dir was created with.
pub const META_PARTITIONS: &[u8] = b"partitions";
/// meta: the mode the data dir was created in (`embedded` or `kafka`).
pub const META_MODE: &[u8] = b"mode";
/// meta: set while an embedded rebuild runs (`RebuildMark`: its kind and
/// how far the live stage had got); deleted once its state is flushed.
pub const META_REBUILD: &[u8] = b"rebuild";

/// ident: identifier key `type:value`.
pub fn ident(type_value: &str) -> Vec<u8> {
    type_value.as_bytes().to_vec()
}

/// The Kafka default partitioner: murmur2 of the key, positive, modulo the
/// partition count. Used for the embedded log so keys land where Kafka puts them.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions.max(1)
}

/// Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2).
pub fn murmur2(data: &[u8]) -> i32 {
    let length = data.len() as i32;
    let seed: i32 = 0x9747b28c_u32 as i32;
    let m: i32 = 0x5bd1e995;
    let r = 24;
    let mut h: i32 = seed ^ length;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= ((k as u32) >> r) as i32;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as i32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as i32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as i32;
        h = h.wrapping_mul(m);
    }
    h ^= ((h as u32) >> 13) as i32;
    h = h.wrapping_mul(m);
    h ^= ((h as u32) >> 15) as i32;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_keys_sort_in_timeline_order() {
        let k = |at: i64, id: &str| timeline_event(1, "u", at, id);
        let mut ks = vec![k(5, "b"), k(-3, "z"), k(5, "a"), k(0, "a"), k(i64::MAX, "")];
        ks.sort();
        assert_eq!(
            ks,
            vec![k(-3, "z"), k(0, "a"), k(5, "a"), k(5, "b"), k(i64::MAX, "")]
        );
        assert!(k(1, "a").starts_with(&timeline_prefix(1, "u")));
        let n = timeline_prefix(1, "u").len();
        assert!(is_timeline_event(&k(-3, "z"), n, -3, "z"));
        assert!(!is_timeline_event(&k(-3, "z"), n, 3, "z"));
        assert!(!is_timeline_event(&k(5, "ab"), n, 5, "a"));
        assert!(!is_timeline_event(&k(5, "a"), n, 5, "ab"));
        assert!(!is_timeline_event(&k(5, "a")[..n + 4], n, 5, ""));
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }

    #[test]
    fn keys_split_back() {
        assert_eq!(split_user(&user(7, "email:a@x")), Some((7, "email:a@x")));
        assert_eq!(
            split_catalog(&catalog(3, b'e', "zendesk", "article_viewed")),
            Some((3, b'e', "zendesk", "article_viewed"))
        );
    }
}
