//! Routing stage: input records -> normalized, resolved `Record`s keyed by
//! user_id on the records log, or dead letters. Settings records are
//! broadcast to every records-log partition, so each partition sees
//! visibility changes in order with its records (replays are deterministic).

use super::count_topic;
use super::deadletter::dead_letter;
use super::Topics;
use crate::identity::{resolve, IdentityLookup, Overlay};
use crate::ingest::{self, ErrorCode, InputKind, Limits, Normalized, Rejection};
use crate::log::{LogRecord, OutRecord};
use crate::model::{
    record, time, EventRecord, IdentityLink, InputRef, ProfileOpKind, Record, FORMAT_VERSION,
};
use prost::Message;
use std::collections::HashMap;

use crate::ingest::SETTINGS_KEY;

/// What a routed batch produces.
#[derive(Default)]
pub struct Routed {
    /// Records-log entries and dead letters, in input order.
    pub out: Vec<OutRecord>,
    /// Identity links made by this batch (to store, and in Kafka mode to publish).
    pub links: Vec<IdentityLink>,
    /// Next offset per consumed (topic, partition).
    pub positions: HashMap<(String, i32), i64>,
}

pub struct Router {
    pub topics: Topics,
    pub partitions: u32,
    pub limits: Limits,
}

impl Router {
    pub fn new(topics: Topics, partitions: u32, limits: Limits) -> Router {
        Router {
            topics,
            partitions,
            limits,
        }
    }

    /// Routes a batch. `lookup` sees committed links; links made earlier in
    /// the batch are seen through an overlay.
    pub fn route(&self, lookup: &impl IdentityLookup, input: &[LogRecord]) -> Routed {
        let mut routed = Routed::default();
        let mut pending: HashMap<String, String> = HashMap::new();
        let mut consumed: Vec<(&str, u64)> = Vec::new();
        for rec in input {
            count_topic(&mut consumed, &rec.topic);
            routed
                .positions
                .insert((rec.topic.clone(), rec.partition), rec.offset + 1);
            let result = match self.topics.kind(&rec.topic) {
                Some(InputKind::Settings) => self.settings(rec),
                Some(kind) => {
                    let overlay = Overlay {
                        base: lookup,
                        pending: &pending,
                    };
                    self.user_record(kind, rec, &overlay).map(|(r, links)| {
                        for l in links {
                            if let Some(id) = &l.identifier {
                                pending.insert(id.key(), l.user_id.clone());
                            }
                            routed.links.push(l);
                        }
                        vec![r]
                    })
                }
                None => Err(Rejection::new(
                    ErrorCode::InvalidField,
                    format!("{} is not an input topic", rec.topic),
                )),
            };
            match result {
                Ok(out) => routed.out.extend(out),
                Err(e) => routed.out.push(dead_letter(&self.topics.dlq, &e, rec)),
            }
        }
        for (topic, n) in consumed {
            metrics::counter!("contextd_records_consumed_total", "topic" => topic.to_string())
                .increment(n);
        }
        routed
    }

    fn input_ref(rec: &LogRecord) -> Option<InputRef> {
        Some(InputRef {
            topic: rec.topic.clone(),
            partition: rec.partition,
            offset: rec.offset,
        })
    }

    fn settings(&self, rec: &LogRecord) -> Result<Vec<OutRecord>, Rejection> {
        if let Some(k) = &rec.key {
            if k.as_slice() != SETTINGS_KEY {
                return Err(Rejection::new(
                    ErrorCode::InvalidField,
                    format!(
                        "{} records must have the key \"visibility\"",
                        self.topics.settings
                    ),
                ));
            }
        }
        let settings = ingest::settings_record(&rec.value, self.limits)?;
        let r = Record {
            format_version: FORMAT_VERSION,
            user_id: String::new(),
            log_time_ns: time::ms_to_ns(rec.timestamp_ms),
            input: Self::input_ref(rec),
            body: Some(record::Body::Settings(settings)),
            ..Default::default()
        };
        let value = r.encode_to_vec();
        self.fits(SETTINGS_KEY.len() + value.len())?;
        Ok((0..self.partitions as i32)
            .map(|p| OutRecord {
                topic: self.topics.records.clone(),
                partition: Some(p),
                key: Some(SETTINGS_KEY.to_vec()),
                value: value.clone().into(),
                timestamp_ms: rec.timestamp_ms,
            })
            .collect())
    }

    fn user_record(
        &self,
        kind: InputKind,
        rec: &LogRecord,
        lookup: &impl IdentityLookup,
    ) -> Result<(OutRecord, Vec<IdentityLink>), Rejection> {
        let log_time_ns = time::ms_to_ns(rec.timestamp_ms);
        let n = ingest::normalize(kind, &rec.value, log_time_ns, self.limits)?;
        let (explicit, ids) = n.identity();
        let op_kind = match &n {
            Normalized::Profile { op, .. } => ProfileOpKind::try_from(op.op).ok(),
            _ => None,
        };
        let finds_existing = matches!(op_kind, Some(ProfileOpKind::Patch | ProfileOpKind::Delete));
        let Some(res) = resolve(explicit, ids, lookup, !finds_existing) else {
            return Err(if finds_existing {
                Rejection::new(
                    ErrorCode::NotFound,
                    "no user has any of the profile's identifiers; nothing to patch or delete",
                )
            } else {
                Rejection::new(
                    ErrorCode::UnresolvableUser,
                    "the record has no user_id and no usable identifier",
                )
            });
        };
        for (id, other) in &res.conflicts {
            metrics::counter!("contextd_identity_conflicts_total").increment(1);
            tracing::debug!(identifier = %id.key(), linked_to = %other, user_id = %res.user_id, "identifier already linked to another user; link kept");
        }
        let links = if op_kind == Some(ProfileOpKind::Delete) {
            Vec::new()
        } else {
            res.new_links
        };
        let (body, keep_input) = match n {
            Normalized::Zendesk { event, .. } => (
                record::Body::Event(EventRecord {
                    event: Some(event),
                    profile: None,
                }),
                false,
            ),
            Normalized::Custom { profile, event, .. } => (
                record::Body::Event(EventRecord {
                    event: Some(event),
                    profile: Some(profile),
                }),
                false,
            ),
            Normalized::Profile { op, .. } => (record::Body::ProfileOp(op), finds_existing),
        };
        let r = Record {
            format_version: FORMAT_VERSION,
            user_id: res.user_id.clone(),
            log_time_ns,
            input: Self::input_ref(rec),
            links: links.clone(),
            input_key: if keep_input { rec.key.clone() } else { None },
            input_value: if keep_input {
                rec.value.to_vec()
            } else {
                Vec::new()
            },
            body: Some(body),
        };
        let value = r.encode_to_vec();
        // Its key, the user id, counts too.
        self.fits(res.user_id.len() + value.len())?;
        Ok((
            OutRecord {
                topic: self.topics.records.clone(),
                partition: None,
                key: Some(res.user_id.into_bytes()),
                value: value.into(),
                timestamp_ms: rec.timestamp_ms,
            },
            links,
        ))
    }

    /// A routed record of `len` bytes (key and value) fits the records
    /// log, or the input is dead-lettered `too_large` (Kafka mode: a
    /// message the producer refuses would stop the stage at it).
    fn fits(&self, len: usize) -> Result<(), Rejection> {
        if len > self.limits.max_routed_bytes {
            return Err(Rejection::new(
                ErrorCode::TooLarge,
                format!(
                    "the record routes to {len} bytes, more than the records topic takes \
                     ({} bytes: the producer's message.max.bytes less room for the key \
                     and headers)",
                    self.limits.max_routed_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(topic: &str, offset: i64, value: &str) -> LogRecord {
        LogRecord {
            topic: topic.into(),
            partition: 0,
            offset,
            timestamp_ms: 1_000,
            key: None,
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn a_record_that_routes_larger_than_the_records_topic_takes_is_dead_lettered() {
        let topics = Topics::default();
        let limits = Limits {
            max_routed_bytes: 2_000,
            ..Limits::default()
        };
        let router = Router::new(topics.clone(), 4, limits);
        // 600 bytes of JSON numbers route to several times that as a Struct
        // (a double and its framing each); an event of short strings fits.
        let numbers = format!(
            r#"{{"profile":{{"source":"shop","type":"c","identifiers":[{{"type":"email","value":"big@x"}}]}},"event":{{"source":"shop","type":"t","properties":{{"n":[{}]}}}}}}"#,
            vec!["1"; 300].join(",")
        );
        assert!(numbers.len() < 1_000);
        let small = r#"{"profile":{"source":"shop","type":"c","identifiers":[{"type":"email","value":"small@x"}]},"event":{"source":"shop","type":"t","properties":{"a":"b"}}}"#;
        let batch = [
            input(&topics.sunshine_events, 0, &numbers),
            input(&topics.sunshine_events, 1, small),
        ];
        let routed = router.route(&HashMap::<String, String>::new(), &batch);
        assert_eq!(routed.out.len(), 2);
        let dead: serde_json::Value =
            serde_json::from_slice(&routed.out[0].value.contiguous()).unwrap();
        assert_eq!(routed.out[0].topic, topics.dlq);
        assert_eq!(dead["error"]["code"], "too_large");
        assert!(dead["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2000 bytes"));
        assert_eq!(dead["offset"], 0);
        // The rest of the batch is routed; the dead letter linked nothing.
        assert_eq!(routed.out[1].topic, topics.records);
        let links: Vec<String> = routed
            .links
            .iter()
            .filter_map(|l| l.identifier.as_ref().map(|i| i.key()))
            .collect();
        assert_eq!(links, ["email:small@x"]);
        // Without the limit (embedded mode) both are routed.
        let router = Router::new(topics.clone(), 4, Limits::default());
        let routed = router.route(&HashMap::<String, String>::new(), &batch);
        assert!(routed.out.iter().all(|r| r.topic == topics.records));
    }

    /// A tombstone on the settings topic deletes the settings: every
    /// partition gets settings that show nothing, as before any existed.
    #[test]
    fn a_settings_tombstone_shows_nothing_again() {
        let topics = Topics::default();
        let router = Router::new(topics.clone(), 3, Limits::default());
        let shown = r#"{"zendesk_events": true, "shown_event_types": [{"source": "zendesk", "type": "article_viewed"}]}"#;
        let mut tombstone = input(&topics.settings, 1, "");
        tombstone.key = Some(SETTINGS_KEY.to_vec());
        let batch = [input(&topics.settings, 0, shown), tombstone];
        let routed = router.route(&HashMap::<String, String>::new(), &batch);
        assert_eq!(routed.out.len(), 6, "each broadcast to 3 partitions");
        let settings =
            |r: &OutRecord| match Record::decode(r.value.contiguous().as_ref()).unwrap().body {
                Some(record::Body::Settings(s)) => s,
                other => panic!("not settings: {other:?}"),
            };
        assert!(settings(&routed.out[0]).zendesk_events);
        for r in &routed.out[3..] {
            assert_eq!(r.topic, topics.records);
            assert_eq!(settings(r), crate::model::Settings::default());
        }
    }
}
