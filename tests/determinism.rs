//! Property tests: any stream of valid and invalid records, applied in any
//! split into batches, with restarts at any point, gives the same state
//! (digest) and the same final snapshots as one uninterrupted run.

use contextd::app::{embedded_topics, limits, log_options, materializer_options};
use contextd::config::Config;
use contextd::log::embedded::EmbeddedLog;
use contextd::log::OutRecord;
use contextd::model::ContextSnapshot;
use contextd::pipeline::embedded::{MaterializerStep, RouterStep};
use contextd::pipeline::materializer::Materializer;
use contextd::pipeline::router::Router;
use contextd::state::digest::digest;
use contextd::state::keys::{split_user, CF_USERS};
use contextd::state::Store;
use proptest::prelude::*;
use prost::Message;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone)]
enum Rec {
    Zendesk {
        user: u8,
        ty: u8,
        id: Option<u8>,
        at: u16,
    },
    Identity {
        user: u8,
        email: u8,
    },
    Custom {
        user: Option<u8>,
        email: u8,
        ty: u8,
        id: Option<u8>,
        at: u16,
    },
    Profile {
        op: u8,
        email: u8,
        attr: u8,
    },
    Settings {
        mask: u8,
    },
    Garbage(u8),
}

fn arb_rec() -> impl Strategy<Value = Rec> {
    prop_oneof![
        4 => (0u8..6, 0u8..3, proptest::option::of(0u8..20), 0u16..500).prop_map(|(user, ty, id, at)| Rec::Zendesk { user, ty, id, at }),
        1 => (0u8..6, 0u8..8).prop_map(|(user, email)| Rec::Identity { user, email }),
        3 => (proptest::option::of(0u8..6), 0u8..8, 0u8..2, proptest::option::of(0u8..20), 0u16..500).prop_map(|(user, email, ty, id, at)| Rec::Custom { user, email, ty, id, at }),
        2 => (0u8..3, 0u8..8, 0u8..4).prop_map(|(op, email, attr)| Rec::Profile { op, email, attr }),
        1 => (0u8..16).prop_map(|mask| Rec::Settings { mask }),
        1 => (0u8..4).prop_map(Rec::Garbage),
    ]
}

fn ts(at: u16) -> String {
    format!("2026-11-20T10:{:02}:{:02}Z", at / 60 % 60, at % 60)
}

fn to_out(r: &Rec, i: usize, c: &Config) -> OutRecord {
    let t = &c.topics;
    let (topic, v) = match r {
        Rec::Zendesk { user, ty, id, at } => {
            let mut v = json!({"user_id": format!("z{user}"), "type": (["article_viewed", "help_center_searched", "page_view"][*ty as usize]), "created_at": ts(*at), "properties": {"i": i}});
            if let Some(id) = id { v["id"] = json!(format!("ev{id}")); }
            (&t.zendesk_events, v.to_string())
        }
        Rec::Identity { user, email } => (&t.zendesk_events, json!({"user_id": format!("z{user}"), "type": "identity_created", "id": format!("id{i}"), "properties": {"identity_type": "email", "value": format!("E{email}@x.example")}}).to_string()),
        Rec::Custom { user, email, ty, id, at } => {
            let mut v = json!({"profile": {"source": "shop", "type": "customer", "identifiers": [{"type": "email", "value": format!("e{email}@x.example")}]},
                               "event": {"source": "shop", "type": (["order", "cart"][*ty as usize]), "created_at": ts(*at), "properties": {"n": at}}});
            if let Some(u) = user { v["user_id"] = json!(format!("z{u}")); }
            if let Some(id) = id { v["event"]["id"] = json!(format!("c{id}")); }
            (&t.sunshine_events, v.to_string())
        }
        Rec::Profile { op, email, attr } => {
            let op = ["put", "patch", "delete"][*op as usize];
            (&t.sunshine_profiles, json!({"op": op, "profile": {"source": "crm", "type": "contact", "name": format!("n{attr}"),
                "identifiers": [{"type": "email", "value": format!("e{email}@x.example")}], "attributes": {"a": attr, "drop": null}}}).to_string())
        }
        Rec::Settings { mask } => (&t.settings, json!({"zendesk_events": mask & 1 == 1, "events_api": mask & 2 == 2, "profiles_api": mask & 4 == 4,
            "shown_event_types": [{"source": "zendesk", "type": "article_viewed"}, {"source": "shop", "type": if mask & 8 == 8 {"order"} else {"cart"}}],
            "shown_profile_types": [{"source": "crm", "type": "contact"}, {"source": "shop", "type": "customer"}]}).to_string()),
        Rec::Garbage(k) => (&[&t.zendesk_events, &t.sunshine_events, &t.sunshine_profiles, &t.settings][*k as usize].to_string(), format!("{{not json {i}")),
    };
    OutRecord {
        topic: topic.clone(),
        partition: None,
        key: None,
        value: v.into_bytes().into(),
        timestamp_ms: 1_700_000_000_000 + i as i64,
    }
}

/// Opens the data dir's log as `contextd run` does: the snapshots topic
/// is written past the page cache by batches that fill their budget (the
/// dirs are in the target dir: a tmpfs `/tmp` may refuse direct I/O).
fn open(dir: &Path, c: &Config) -> EmbeddedLog {
    EmbeddedLog::open_with(
        Store::open(dir, &c.store_options()).unwrap(),
        &embedded_topics(c),
        log_options(c),
    )
    .unwrap()
}

/// The last snapshot published per user (from the embedded snapshots log)
/// is what the query API serves, whether or not a newer one is held.
fn served_equals_published(log: &EmbeddedLog, c: &Config) -> BTreeMap<String, ContextSnapshot> {
    let store = log.store();
    let mut published = BTreeMap::new();
    for (p, end) in log.end_offsets(&c.topics.snapshots).into_iter().enumerate() {
        for r in log
            .read(&c.topics.snapshots, p as i32, 0, end as usize)
            .unwrap()
        {
            let s = ContextSnapshot::decode(&r.value[..]).unwrap();
            published.insert(s.user_id.clone(), s);
        }
    }
    let mut snaps = BTreeMap::new();
    for item in store
        .db()
        .iterator_cf(store.cf(CF_USERS), rocksdb::IteratorMode::Start)
    {
        let (k, _) = item.unwrap();
        let (p, uid) = split_user(&k).unwrap();
        let Some(built) = store
            .context(
                p,
                uid,
                c.snapshot.max_events,
                contextd::snapshot::SizeLimit::of(c),
            )
            .unwrap()
        else {
            assert!(!published.contains_key(uid), "{uid} was published");
            continue;
        };
        let s = contextd::snapshot::decode(&built);
        assert_eq!(
            published.get(uid),
            Some(&s),
            "context of {uid} equals its last snapshot"
        );
        snaps.insert(s.user_id.clone(), s);
    }
    snaps
}

/// Runs the stream: `splits` gives batch sizes, `restarts` the batch indices
/// after which the process "restarts", `shares` how many materializing
/// stages split the records partitions between them (as threads do),
/// `interval_ms` the snapshots' `min_interval_ms` (held snapshots are
/// released at the end, as a running stage does when they are due).
fn run(
    dir: &Path,
    recs: &[Rec],
    splits: &[usize],
    restarts: &[usize],
    shares: u32,
    interval_ms: u64,
) -> (String, BTreeMap<String, ContextSnapshot>) {
    let mut c = Config {
        partitions: 3,
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.snapshot.min_interval_ms = interval_ms;
    c.snapshot.max_events = 5;
    c.timeline.max_events_per_user = 8;
    let outs: Vec<OutRecord> = recs
        .iter()
        .enumerate()
        .map(|(i, r)| to_out(r, i, &c))
        .collect();
    {
        let log = open(dir, &c);
        log.append(&outs).unwrap();
    }
    let mut log = open(dir, &c);
    let mut split = splits.iter().cycle();
    let mut batch_no = 0;
    let mut router = RouterStep::new(
        &log,
        Router::new(c.topics.clone(), c.partitions, limits(&c)),
    )
    .unwrap();
    let stages = |log: &EmbeddedLog| -> Vec<MaterializerStep> {
        (0..shares)
            .map(|i| {
                let parts: Vec<u32> = (0..c.partitions).filter(|p| p % shares == i).collect();
                MaterializerStep::for_partitions(
                    log,
                    Materializer::new(c.topics.clone(), materializer_options(&c, true)),
                    &parts,
                )
                .unwrap()
            })
            .collect()
    };
    let mut mats = stages(&log);
    loop {
        let n = *split.next().unwrap();
        let routed = router.step(&log, n).unwrap();
        let mut applied = 0;
        for mat in mats.iter_mut() {
            applied += mat.step(&log, n).unwrap().0;
        }
        batch_no += 1;
        if routed == 0 && applied == 0 {
            break;
        }
        served_equals_published(&log, &c);
        if restarts.contains(&batch_no) {
            drop(router);
            drop(mats);
            drop(log);
            log = open(dir, &c);
            router = RouterStep::new(
                &log,
                Router::new(c.topics.clone(), c.partitions, limits(&c)),
            )
            .unwrap();
            mats = stages(&log);
        }
    }
    for mat in mats.iter_mut() {
        mat.release(&log, true).unwrap();
        assert_eq!(mat.next_due(), None, "nothing held after a release of all");
    }
    let mut snaps = served_equals_published(&log, &c);
    let users = log
        .store()
        .db()
        .iterator_cf(log.store().cf(CF_USERS), rocksdb::IteratorMode::Start)
        .count();
    assert_eq!(snaps.len(), users, "every user has a snapshot");
    for s in snaps.values_mut() {
        s.version = 0;
        s.updated_at = None;
    }
    (digest(log.store()).unwrap(), snaps)
}

/// The materializer keeps the events of a user's last snapshot encoded; an
/// event id trimmed from the timeline and sent again (new content) in the
/// same batch must be encoded anew, not taken from that cache.
#[test]
fn an_event_trimmed_and_sent_again_in_one_batch_shows_its_new_content() {
    let shown = |id, at| Rec::Zendesk {
        user: 0,
        ty: 0,
        id: Some(id),
        at,
    };
    let hidden = |id, at| Rec::Zendesk {
        user: 0,
        ty: 2,
        id: Some(id),
        at,
    };
    // Shows Zendesk article_viewed only; ev0 is the oldest of 8 events.
    let mut recs = vec![Rec::Settings { mask: 1 }, shown(0, 1)];
    recs.extend((1..8).map(|i| hidden(i, 1 + i as u16)));
    // Batches: the settings; the 8 events (ev0 shown, kept encoded); then
    // ev9 trims ev0 and ev0 comes again, newer, with new properties.
    recs.extend([hidden(9, 20), shown(0, 30)]);
    let a = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let b = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (da, sa) = run(a.path(), &recs, &[100_000], &[], 1, 0);
    let (db, sb) = run(b.path(), &recs, &[1, 8, 2], &[], 2, 0);
    assert_eq!(da, db);
    assert_eq!(sa, sb);
    let events = &sb["z0"].events;
    assert_eq!(events.len(), 1);
    assert_eq!(
        contextd::model::time::from_timestamp(&events[0].created_at),
        contextd::model::time::from_timestamp(&sa["z0"].events[0].created_at)
    );
}

/// A snapshot held back when the process stops is published after the
/// restart (the hold is stored with the state), and until then the query
/// API serves the last snapshot published.
#[test]
fn a_snapshot_held_at_a_restart_is_published_after_it() {
    let shown = |id, at| Rec::Zendesk {
        user: 0,
        ty: 0,
        id: Some(id),
        at,
    };
    let recs = vec![
        Rec::Settings { mask: 1 },
        shown(0, 1),
        shown(1, 2),
        shown(2, 3),
    ];
    let a = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let b = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (da, sa) = run(a.path(), &recs, &[100_000], &[], 1, 0);
    // One record per batch, a restart after each, and holds that never end
    // by themselves: every snapshot after the first is held at a restart.
    let (db, sb) = run(b.path(), &recs, &[1], &[1, 2, 3, 4, 5, 6], 1, 3_600_000);
    assert_eq!(da, db);
    assert_eq!(sa, sb);
    assert_eq!(sb["z0"].events.len(), 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn any_batching_and_restarts_give_the_same_state(
        recs in proptest::collection::vec(arb_rec(), 1..120),
        splits in proptest::collection::vec(1usize..40, 1..6),
        restarts in proptest::collection::vec(1usize..30, 0..4),
        shares in 1u32..4,
        interval_ms in prop_oneof![Just(0u64), Just(1), Just(3_600_000)],
    ) {
        let a = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let b = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let (da, sa) = run(a.path(), &recs, &[100_000], &[], 1, 0);
        let (db, sb) = run(b.path(), &recs, &splits, &restarts, shares, interval_ms);
        prop_assert_eq!(da, db);
        prop_assert_eq!(sa.len(), sb.len());
        for (u, s) in &sa {
            prop_assert_eq!(Some(s), sb.get(u), "final snapshot of {}", u);
        }
    }
}
