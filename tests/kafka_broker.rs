//! Kafka mode against a real Kafka-protocol broker (tansu, started here on a
//! free port; `make test` builds it), with kcat as the third-party client.

mod common;

use common::{enc, free_port, Server};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Broker {
    child: Child,
    addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tansu_bin() -> PathBuf {
    let p = std::env::var("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/contextd/tansu/bin/tansu")
        });
    assert!(
        p.exists(),
        "tansu broker not found at {} (run `make tansu`, or set TANSU_BIN)",
        p.display()
    );
    p
}

fn start_broker(dir: &Path) -> Broker {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("tcp://{addr}");
    let log = std::fs::File::create(dir.join(format!("tansu-{port}.log"))).unwrap();
    let child = Command::new(tansu_bin())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start tansu");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Broker { child, addr }
}

/// Config for short group timeouts (tansu joins wait for the session timeout).
fn kafka_config(dir: &Path, advertised: Option<&str>) -> PathBuf {
    let p = dir.join(format!("kafka-{}.toml", free_port()));
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(f, "[pipeline]\nbatch_records = 500\n[kafka]").unwrap();
    if let Some(a) = advertised {
        writeln!(f, "advertised_http_addr = \"{a}\"").unwrap();
    }
    writeln!(f, "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"max.poll.interval.ms\" = \"10000\"\n\"fetch.wait.max.ms\" = \"10\"\n\"heartbeat.interval.ms\" = \"1000\"").unwrap();
    p
}

fn kcat_produce(broker: &str, topic: &str, lines: &[(String, String)]) {
    let mut child = Command::new("kcat")
        .args(["-P", "-b", broker, "-t", topic, "-K", "\t", "-z", "lz4"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat (apt-get install kcat)");
    {
        let stdin = child.stdin.as_mut().unwrap();
        for (k, v) in lines {
            writeln!(stdin, "{k}\t{v}").unwrap();
        }
    }
    assert!(
        child.wait().unwrap().success(),
        "kcat produce to {topic} failed"
    );
}

/// The visibility settings record (`SETTINGS`), produced with kcat.
fn produce_settings(broker: &str) {
    kcat_produce(
        broker,
        "context.settings",
        &[("visibility".into(), SETTINGS.replace('\n', " "))],
    );
}

/// `contextd produce --brokers` of an NDJSON file (creating contextd's
/// topics with 4 partitions if missing).
fn contextd_produce(broker: &str, topic: &str, file: &Path) {
    let (ok, out, err) = common::run_cli(&[
        "produce",
        "--brokers",
        broker,
        "--partitions",
        "4",
        "--topic",
        topic,
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{out} {err}");
}

/// (partition, offset, key, value) of every record of a topic, via kcat.
fn kcat_consume(broker: &str, topic: &str) -> Vec<(i32, i64, String, String)> {
    let out = Command::new("kcat")
        .args([
            "-C",
            "-b",
            broker,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%p\t%o\t%k\t%s\n",
        ])
        .output()
        .expect("kcat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(4, '\t');
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.to_string(),
                it.next()?.to_string(),
            ))
        })
        .collect()
}

struct Workload {
    /// topic -> (key, value) lines
    by_topic: BTreeMap<String, Vec<(String, String)>>,
    users: Vec<String>,
    bad: usize,
    /// Events that end in timelines.
    events: usize,
}

const SETTINGS: &str = r#"{"zendesk_events": true, "events_api": true, "profiles_api": true,
  "shown_event_types": [{"source": "zendesk", "type": "article_viewed"}, {"source": "shop", "type": "order_completed"}],
  "shown_profile_types": [{"source": "shop", "type": "customer"}, {"source": "crm", "type": "contact"}]}"#;

/// `contextd produce --brokers` keys every record as the HTTP API does:
/// settings `visibility` (the compacted key), a record by its user id or
/// else its highest-priority identifier, so one customer's records share
/// a partition and keep their order; a line that does not validate goes
/// unkeyed (the pipeline dead-letters it).
#[test]
fn produce_keys_settings_and_each_customers_records() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let b = &broker.addr;
    let write = |name: &str, lines: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    };
    let settings = write(
        "settings.ndjson",
        &[
            r#"{"profiles_api": false}"#.into(),
            SETTINGS.replace('\n', " "),
        ],
    );
    let mut lines = Vec::new();
    for i in 0..12 {
        let email = format!("Buyer{i}@Example.com ");
        let profile = |tier: &str| {
            json!({"source": "shop", "type": "customer",
                   "identifiers": [{"type": "email", "value": email}],
                   "attributes": {"tier": tier}})
        };
        lines.push(json!({"op": "put", "profile": profile("gold")}).to_string());
        lines.push(json!({"op": "patch", "profile": profile("silver")}).to_string());
        lines.push(
            json!({"op": "put", "user_id": format!("u{i}"), "profile": profile("x")}).to_string(),
        );
    }
    lines.push("not json".into());
    let profiles = write("profiles.ndjson", &lines);
    for (topic, file) in [
        ("context.settings", &settings),
        ("sunshine.profiles", &profiles),
    ] {
        // The first produce creates contextd's topics, with 4 partitions.
        contextd_produce(b, topic, file);
    }
    let got = kcat_consume(b, "context.settings");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|(_, _, k, _)| k == "visibility"), "{got:?}");
    let got = kcat_consume(b, "sunshine.profiles");
    assert_eq!(got.len(), lines.len(), "{got:?}");
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    for (p, _, k, v) in &got {
        let rec: Value = serde_json::from_str(v).unwrap_or(Value::Null);
        let want = match rec["user_id"].as_str() {
            Some(u) => u.to_string(),
            None if rec.is_object() => {
                let e = rec["profile"]["identifiers"][0]["value"].as_str().unwrap();
                format!("email:{}", e.trim().to_lowercase())
            }
            None => String::new(),
        };
        assert_eq!(k, &want, "{v}");
        assert_eq!(*partition_of.entry(k.clone()).or_insert(*p), *p, "{k}");
    }
    assert!(
        partition_of
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1,
        "keys spread over partitions: {partition_of:?}"
    );
    // A line the topic cannot take is left out and named; the others go.
    let small = json!({"user_id": "z1", "type": "article_viewed"}).to_string();
    let big = format!(
        r#"{{"user_id": "z1", "type": "{}"}}"#,
        "x".repeat(1_000_000)
    );
    let mixed = write("mixed.ndjson", &[small.clone(), big, small]);
    let (ok, out, err) = common::run_cli(&[
        "produce",
        "--brokers",
        b,
        "--topic",
        "zendesk.events",
        mixed.to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("not appended") && err.contains("lines 2 of"),
        "{err}"
    );
    assert!(out.contains("appended 2 records"), "{out}");
    assert_eq!(kcat_consume(b, "zendesk.events").len(), 2);
}

/// At a first start on a backlog, the settings already on their topic are
/// routed before any input record, even ones produced earlier (as Kafka
/// Streams restores a global table first): no snapshot is published under
/// the default settings (nothing shown) and then again under the real ones.
#[test]
fn the_settings_on_the_topic_are_routed_before_the_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let b = &broker.addr;
    let users = 60;
    let mut lines = Vec::new();
    for i in 0..1200 {
        let u = 7000 + i % users;
        lines.push(json!({"id": format!("a{i}"), "user_id": u.to_string(), "type": "article_viewed", "properties": {"n": i}}).to_string());
    }
    let inputs = dir.path().join("inputs.ndjson");
    std::fs::write(&inputs, lines.join("\n")).unwrap();
    let settings = dir.path().join("settings.ndjson");
    std::fs::write(&settings, SETTINGS.replace('\n', " ")).unwrap();
    // The inputs first, the settings after them (a later log time).
    for (topic, file) in [("zendesk.events", &inputs), ("context.settings", &settings)] {
        contextd_produce(b, topic, file);
    }
    let s = start_kafka(dir.path(), "k1", b, "g-settings-first");
    s.wait_for(60, "every event applied", |s| {
        let n: usize = (0..users)
            .filter_map(|i| s.all_events(&(7000 + i).to_string()))
            .map(|e| e.len())
            .sum();
        (n == lines.len()).then_some(())
    });
    let snaps = s.wait_for(20, "every user's snapshot on the topic", |_| {
        let snaps = kcat_consume(b, "context.snapshots");
        let keys: std::collections::HashSet<&String> = snaps.iter().map(|x| &x.2).collect();
        (keys.len() == users).then_some(snaps)
    });
    for (_, _, k, v) in &snaps {
        let snap: Value = serde_json::from_str(v).unwrap();
        assert!(
            !snap["events"].as_array().unwrap().is_empty(),
            "{k}: a snapshot under the default settings: {snap}"
        );
    }
    // A tombstone deletes the settings: nothing is shown again, every
    // context re-published empty, the admin API shows the defaults.
    let mut kcat = Command::new("kcat")
        .args(["-P", "-b", b, "-t", "context.settings", "-K", "\t", "-Z"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat");
    writeln!(kcat.stdin.as_mut().unwrap(), "visibility\t").unwrap();
    assert!(kcat.wait().unwrap().success());
    s.wait_for(60, "every context empty", |s| {
        (0..users)
            .all(|i| {
                let (_, ctx) = s.get(&format!("/api/v2/users/{}/context", 7000 + i));
                ctx["events"].as_array().is_some_and(|e| e.is_empty())
            })
            .then_some(())
    });
    let (_, v) = s.get("/api/admin/visibility");
    assert_eq!(v["zendesk_events"], false, "{v}");
    let (_, api) = s.get("/api/admin/dead_letters");
    assert_eq!(
        api["dead_letters"],
        json!([]),
        "the tombstone is no dead letter"
    );
}

/// Records whose outcome does not depend on the order across topics and
/// partitions: every record names its user, keys are user ids.
fn workload(users: usize, per_user: usize) -> Workload {
    let mut by_topic: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut bad = 0;
    let mut events = 0;
    let ts = |i: usize| {
        format!(
            "2026-11-20T{:02}:{:02}:{:02}Z",
            8 + i / 3600 % 10,
            i / 60 % 60,
            i % 60
        )
    };
    for u in 0..users {
        let uid = format!("{}", 5000 + u);
        for i in 0..per_user {
            let n = u * per_user + i;
            if i % 6 < 4 {
                events += 1;
            }
            let (topic, v) = match i % 6 {
                0..=2 => (
                    "zendesk.events",
                    json!({"id": format!("z{n}"), "user_id": uid, "type": if i % 2 == 0 {"article_viewed"} else {"help_center_searched"}, "created_at": ts(n), "properties": {"article": {"display_name": format!("A{n}")}}}),
                ),
                3 => (
                    "sunshine.events",
                    json!({"user_id": uid, "profile": {"source": "shop", "type": "customer", "name": format!("N{u}"), "identifiers": [{"type": "email", "value": format!("c{u}@x.example")}]},
                        "event": {"source": "shop", "type": "order_completed", "created_at": ts(n), "description": format!("Order {n}"), "properties": {"total": n}}}),
                ),
                4 => (
                    "sunshine.profiles",
                    json!({"op": "put", "user_id": uid, "profile": {"source": "crm", "type": "contact", "name": format!("C{u}"), "identifiers": [{"type": "external_id", "value": format!("E{u}")}], "attributes": {"n": i, "tier": "gold"}}}),
                ),
                _ => (
                    "sunshine.profiles",
                    json!({"op": "patch", "user_id": uid, "profile": {"source": "crm", "type": "contact", "attributes": {"tier": null, "last": i}}}),
                ),
            };
            by_topic
                .entry(topic.into())
                .or_default()
                .push((uid.clone(), v.to_string()));
        }
        if u % 7 == 0 {
            by_topic
                .entry("sunshine.events".into())
                .or_default()
                .push((uid.clone(), format!("{{\"broken\": {u}")));
            bad += 1;
        }
    }
    Workload {
        by_topic,
        users: (0..users).map(|u| format!("{}", 5000 + u)).collect(),
        bad,
        events,
    }
}

/// A context without the fields that legitimately differ between runs
/// (versions and log times).
fn comparable(ctx: &Value) -> Value {
    let mut c = ctx.clone();
    for k in ["version", "updated_at"] {
        c.as_object_mut().unwrap().remove(k);
    }
    for e in c["events"].as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("received_at");
    }
    for p in c["profiles"].as_array_mut().unwrap() {
        for k in ["created_at", "updated_at"] {
            p.as_object_mut().unwrap().remove(k);
        }
    }
    c
}

fn embedded_expectation(dir: &Path, w: &Workload) -> HashMap<String, Value> {
    let s = Server::start(&dir.join("embedded"), &[]);
    let settings: Value = serde_json::from_str(SETTINGS).unwrap();
    s.set_visibility(&settings);
    for (topic, lines) in &w.by_topic {
        let body: Vec<&str> = lines.iter().map(|(_, v)| v.as_str()).collect();
        let (st, _) = s
            .post_raw(&format!("/api/v1/topics/{topic}/records"), &body.join("\n"))
            .unwrap();
        assert_eq!(st, 202);
    }
    s.wait_for(60, "embedded run applied everything", |s| {
        let dl = s.dead_letters().len();
        let applied: usize = w
            .users
            .iter()
            .filter_map(|u| s.all_events(u))
            .map(|e| e.len())
            .sum();
        (dl == w.bad && applied == w.events).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    w.users
        .iter()
        .map(|u| {
            (
                u.clone(),
                comparable(&s.get(&format!("/api/v2/users/{}/context", enc(u))).1),
            )
        })
        .collect()
}

fn wait_contexts(s: &Server, want: &HashMap<String, Value>, secs: u64) {
    s.wait_for(secs, "Kafka-mode contexts equal to embedded mode's", |s| {
        for (u, exp) in want {
            let (st, ctx) = s
                .try_get(&format!("/api/v2/users/{}/context", enc(u)))
                .ok()?;
            if st != 200 || &comparable(&ctx) != exp {
                return None;
            }
        }
        Some(())
    });
}

fn start_kafka(dir: &Path, name: &str, broker: &str, group: &str) -> Server {
    start_kafka_with(dir, name, broker, group, "")
}

/// `start_kafka` with more TOML (whole tables) in its config file.
fn start_kafka_with(dir: &Path, name: &str, broker: &str, group: &str, toml: &str) -> Server {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = kafka_config(dir, Some(&addr));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&cfg)
        .unwrap()
        .write_all(toml.as_bytes())
        .unwrap();
    Server::start_at(
        &dir.join(name),
        &addr,
        &[
            "--brokers",
            broker,
            "--group-id",
            group,
            "--partitions",
            "4",
            "--snapshot-format",
            "json",
            "--config",
            cfg.to_str().unwrap(),
        ],
    )
}

#[test]
fn kafka_mode_matches_embedded_mode_end_to_end_with_kcat() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let w = workload(24, 18);
    let want = embedded_expectation(dir.path(), &w);
    let s = start_kafka(dir.path(), "k1", &broker.addr, "g-e2e");
    // The settings through the NDJSON endpoint: keyed `visibility` (below).
    let (st, _) = s
        .post_raw(
            "/api/v1/topics/context.settings/records",
            &SETTINGS.replace('\n', " "),
        )
        .unwrap();
    assert_eq!(st, 202);
    for (topic, lines) in &w.by_topic {
        kcat_produce(&broker.addr, topic, lines);
    }
    wait_contexts(&s, &want, 120);
    // A patch of a profile type the user lacks: dead-lettered `not_found` by
    // the materializing stage (a rebuild below does not send it again).
    let patch = serde_json::json!({"op": "patch", "user_id": w.users[0],
        "profile": {"source": "shop", "type": "absent", "attributes": {"a": "1"}}});
    let (st, _) = s
        .post_raw(
            "/api/v1/topics/sunshine.profiles/records",
            &patch.to_string(),
        )
        .unwrap();
    assert_eq!(st, 202);
    s.wait_for(60, "the not_found dead letter", |s| {
        let (_, api) = s.get("/api/admin/dead_letters");
        api["dead_letters"]
            .as_array()?
            .iter()
            .any(|d| d["error"]["code"] == "not_found")
            .then_some(())
    });
    // What a downstream consumer sees: the last snapshot per key equals the API's context.
    let snaps = kcat_consume(&broker.addr, "context.snapshots");
    let mut last: HashMap<String, Value> = HashMap::new();
    for (_, _, k, v) in &snaps {
        last.insert(k.clone(), serde_json::from_str(v).unwrap());
    }
    for u in &w.users {
        let (_, ctx) = s.get(&format!("/api/v2/users/{}/context", enc(u)));
        assert_eq!(
            last.get(u),
            Some(&ctx),
            "last snapshot on the topic for {u}"
        );
    }
    let settings = kcat_consume(&broker.addr, "context.settings");
    assert_eq!(settings.len(), 1);
    assert_eq!(settings[0].2, "visibility");
    let dlq = kcat_consume(&broker.addr, "context.dlq");
    assert!(
        dlq.len() >= w.bad,
        "dead letters: {} of {}",
        dlq.len(),
        w.bad
    );
    let mut not_found = 0;
    for (_, _, _, v) in &dlq {
        let d: Value = serde_json::from_str(v).unwrap();
        if d["error"]["code"] == "not_found" {
            not_found += 1;
            assert_eq!(d["topic"], "sunshine.profiles");
            continue;
        }
        assert_eq!(d["error"]["code"], "invalid_json");
        assert_eq!(d["topic"], "sunshine.events");
    }
    assert_eq!(not_found, 1);
    // The admin API reads the same topic (every one: fewer than its limit).
    let (st, api) = s.get("/api/admin/dead_letters");
    assert_eq!(st, 200);
    assert_eq!(api["dead_letters"].as_array().unwrap().len(), dlq.len());
    assert_eq!(api["meta"]["has_more"], false, "{}", api["meta"]);
    // Lag is a metric; SIGTERM exits cleanly; a rebuild from the records topic keeps the digest.
    s.wait_for(20, "consumer lag metric", |s| {
        let (_, m) = s.get("/metrics");
        m.as_str()
            .is_some_and(|t| {
                t.contains("contextd_consumer_lag{")
                    && t.contains("contextd_record_latency_seconds_count ")
            })
            .then_some(())
    });
    let mut s = s;
    assert_eq!(s.stop(), Some(0));
    let data = dir.path().join("k1");
    let d = data.to_str().unwrap();
    let (ok, before, err) = common::run_cli(&["digest", "--data-dir", d]);
    assert!(ok, "{err}");
    let (ok, out, err) = common::run_cli(&[
        "rebuild",
        "--data-dir",
        d,
        "--brokers",
        &broker.addr,
        "--partitions",
        "4",
    ]);
    assert!(ok, "kafka rebuild: {out} {err}");
    assert!(out.contains("0 snapshots re-published"), "{out}");
    assert_eq!(
        kcat_consume(&broker.addr, "context.dlq").len(),
        dlq.len(),
        "the rebuild sent a dead letter again"
    );
    let (ok, after, err) = common::run_cli(&["digest", "--data-dir", d]);
    assert!(ok, "{err}");
    assert_eq!(before, after, "digest after a Kafka-mode rebuild");
    // An embedded-mode command on the Kafka-mode data dir is refused
    // before it touches the state.
    let (ok, out, err) = common::run_cli(&["rebuild", "--data-dir", d, "--partitions", "4"]);
    assert!(!ok && err.contains("Kafka mode's state"), "{out} {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, again, err) = common::run_cli(&["digest", "--data-dir", d]);
    assert!(ok, "{err}");
    assert_eq!(again, before, "the refused rebuild dropped nothing");
    // A checkpoint of the Kafka-mode state restores to the same digest.
    let cp = dir.path().join("cp");
    let copy = dir.path().join("k1-restored");
    let (ok, out, err) = common::run_cli(&[
        "checkpoint",
        "create",
        "--data-dir",
        d,
        "--partitions",
        "4",
        cp.to_str().unwrap(),
    ]);
    assert!(ok, "{out} {err}");
    let (ok, out, err) = common::run_cli(&[
        "checkpoint",
        "restore",
        "--data-dir",
        copy.to_str().unwrap(),
        "--partitions",
        "4",
        cp.to_str().unwrap(),
    ]);
    assert!(ok, "{out} {err}");
    let (ok, restored, err) = common::run_cli(&["digest", "--data-dir", copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(restored, before, "a Kafka-mode checkpoint restored");
    let embedded = dir.path().join("embedded");
    let e = embedded.to_str().unwrap();
    let (ok, before, err) = common::run_cli(&["digest", "--data-dir", e]);
    assert!(ok, "{err}");
    let (ok, out, err) = common::run_cli(&["rebuild", "--data-dir", e, "--brokers", &broker.addr]);
    assert!(!ok && err.contains("embedded mode's state"), "{out} {err}");
    let (ok, again, err) = common::run_cli(&["digest", "--data-dir", e]);
    assert!(ok, "{err}");
    assert_eq!(again, before);
}

#[test]
fn two_instances_survive_a_kill_9_with_no_loss_and_monotonic_versions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let w = workload(40, 18);
    let want = embedded_expectation(dir.path(), &w);
    let mut a = start_kafka(dir.path(), "a", &broker.addr, "g-two");
    let b = start_kafka(dir.path(), "b", &broker.addr, "g-two");
    produce_settings(&broker.addr);
    // Both instances own partitions once the group settles.
    a.wait_for(60, "both instances serving partitions", |a| {
        let (_, ma) = a.try_get("/metrics").ok()?;
        let (_, mb) = b.try_get("/metrics").ok()?;
        let live = |m: &Value| {
            m.as_str()
                .map(|t| {
                    t.lines()
                        .filter(|l| l.starts_with("contextd_partition_live") && l.ends_with(" 1"))
                        .count()
                })
                .unwrap_or(0)
        };
        (live(&ma) > 0 && live(&mb) > 0).then_some(())
    });
    let mut halves: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (topic, lines) in &w.by_topic {
        let mid = lines.len() / 2;
        halves.push((topic.clone(), lines[..mid].to_vec()));
        halves.push((topic.clone(), lines[mid..].to_vec()));
    }
    for (topic, lines) in halves.iter().step_by(2) {
        kcat_produce(&broker.addr, topic, lines);
    }
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    for (topic, lines) in halves.iter().skip(1).step_by(2) {
        kcat_produce(&broker.addr, topic, lines);
    }
    // Queries for every user go to the survivor, which took over A's partitions.
    wait_contexts(&b, &want, 150);
    // A restarts on its data dir: what its outbox still held from before the
    // kill is sent again only where B has not published a newer version
    // since (checked below: versions never go back in topic order).
    let a = start_kafka(dir.path(), "a", &broker.addr, "g-two");
    a.wait_ready(Duration::from_secs(90));
    wait_contexts(&a, &want, 60);
    // Within each key, versions never go backwards in topic order; a new
    // version shows something new (the survivor, taking over A's
    // partitions, does not publish A's last contexts again), a re-send is
    // the same snapshot, and updated_at never goes back.
    let snaps = kcat_consume(&broker.addr, "context.snapshots");
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut last: HashMap<String, Value> = HashMap::new();
    for (p, o, k, v) in &snaps {
        let snap = serde_json::from_str::<Value>(v).unwrap();
        let ver = snap["version"].as_u64().unwrap();
        let prev = seen.insert(k.clone(), ver).unwrap_or(0);
        assert!(
            ver >= prev,
            "version of {k} went from {prev} to {ver} at {p}/{o}"
        );
        if let Some(before) = last.insert(k.clone(), snap.clone()) {
            let shows = |s: &Value| (s["profiles"].clone(), s["events"].clone());
            if ver == prev {
                assert_eq!(before, snap, "a re-send of {k} v{ver} at {p}/{o}");
            } else {
                assert!(
                    shows(&before) != shows(&snap),
                    "{k} v{ver} at {p}/{o} shows nothing new"
                );
                let t = |s: &Value| s["updated_at"].as_str().unwrap().to_string();
                let (t0, t1) = (t(&before), t(&snap));
                assert!(
                    contextd::model::time::parse_rfc3339(&t1)
                        >= contextd::model::time::parse_rfc3339(&t0),
                    "updated_at of {k} went back from {t0} to {t1} at {p}/{o}"
                );
            }
        }
    }
    for u in &w.users {
        let (_, ctx) = b.get(&format!("/api/v2/users/{}/context", enc(u)));
        assert_eq!(
            seen.get(u).copied(),
            ctx["version"].as_u64(),
            "the API serves the latest version of {u}"
        );
    }
}

/// Input records consumed by the routing stage since the process started.
fn inputs_consumed(s: &Server) -> Option<u64> {
    let (_, m) = s.try_get("/metrics").ok()?;
    Some(
        m.as_str()?
            .lines()
            .filter(|l| {
                l.starts_with("contextd_records_consumed_total{")
                    && ["zendesk.events", "sunshine.events", "sunshine.profiles"]
                        .iter()
                        .any(|t| l.contains(&format!("topic=\"{t}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

/// A stopped instance commits where its routing stage got to, and on its
/// next start resumes every input partition exactly there: no input record
/// skipped, none routed twice (records produced while it was down included).
#[test]
fn a_restarted_instance_resumes_every_input_partition_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let w = workload(24, 18);
    let want = embedded_expectation(dir.path(), &w);
    let mut s = start_kafka(dir.path(), "r1", &broker.addr, "g-restart");
    produce_settings(&broker.addr);
    let mut first = 0;
    let mut rest: Vec<(&String, &[(String, String)])> = Vec::new();
    for (topic, lines) in &w.by_topic {
        let mid = lines.len() / 2;
        kcat_produce(&broker.addr, topic, &lines[..mid]);
        first += mid as u64;
        rest.push((topic, &lines[mid..]));
    }
    s.wait_for(60, "the first half routed", |s| {
        (inputs_consumed(s)? == first).then_some(())
    });
    // Routed offsets are stored once the records-topic writes are acked.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.stop(), Some(0));
    let mut second = 0;
    for (topic, lines) in rest {
        kcat_produce(&broker.addr, topic, lines);
        second += lines.len() as u64;
    }
    let s = start_kafka(dir.path(), "r1", &broker.addr, "g-restart");
    wait_contexts(&s, &want, 120);
    assert_eq!(
        inputs_consumed(&s),
        Some(second),
        "after the restart the routing stage consumed exactly what was produced while it was down"
    );
}

/// With `snapshot.min_interval_ms`, a change that comes within the interval
/// is held; once nothing else arrives, the idle materializing worker
/// publishes it when the interval ends (not only at the next record or at
/// shutdown).
#[test]
fn a_held_snapshot_is_published_when_its_interval_ends_with_no_more_records() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let s = start_kafka_with(
        dir.path(),
        "k1",
        &broker.addr,
        "g-hold",
        "\n[snapshot]\nmin_interval_ms = 4000\n",
    );
    produce_settings(&broker.addr);
    s.wait_ready(Duration::from_secs(60));
    let event = |n: usize| {
        (
            "hold-u".to_string(),
            json!({"id": format!("h{n}"), "user_id": "hold-u", "type": "article_viewed",
                "created_at": format!("2026-11-20T10:00:0{n}Z"),
                "properties": {"article": {"display_name": format!("A{n}")}}})
            .to_string(),
        )
    };
    // The settings are applied before the first event shows: the admin
    // API has them (the follower), and so has every partition of the
    // materializing stage (a copy per partition, 4, counted as applied),
    // or an event could be applied before them and publish once more.
    s.wait_for(30, "visibility settings applied", |s| {
        let (_, v) = s.get("/api/admin/visibility");
        (v["shown_event_types"].as_array().map(|a| a.len()) == Some(2)).then_some(())
    });
    s.wait_for(30, "visibility settings applied on every partition", |s| {
        let (_, m) = s.try_get("/metrics").ok()?;
        let applied: f64 = m
            .as_str()?
            .lines()
            .filter(|l| l.starts_with("contextd_records_applied_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (applied >= 4.0).then_some(())
    });
    kcat_produce(&broker.addr, "zendesk.events", &[event(1)]);
    let snapshots_of_user = || -> Vec<Value> {
        kcat_consume(&broker.addr, "context.snapshots")
            .into_iter()
            .filter(|(_, _, k, _)| k == "hold-u")
            .map(|(_, _, _, v)| serde_json::from_str(&v).unwrap())
            .collect()
    };
    s.wait_for(60, "the first snapshot published", |_| {
        (!snapshots_of_user().is_empty()).then_some(())
    });
    // Within the interval of the first publish: held.
    kcat_produce(&broker.addr, "zendesk.events", &[event(2)]);
    let snaps = s.wait_for(30, "the held snapshot published", |_| {
        let snaps = snapshots_of_user();
        (snaps.last()?["events"].as_array().map(|a| a.len()) == Some(2)).then_some(snaps)
    });
    assert_eq!(snaps.len(), 2, "one snapshot per publish: {snaps:?}");
    assert!(snaps[1]["version"].as_u64() > snaps[0]["version"].as_u64());
}

/// A snapshot larger than a Kafka message can be (the producer's
/// `message.max.bytes`) is published without its oldest events, and a
/// record that routes larger than the records topic takes is dead-lettered
/// `too_large`: either one used to stop its stage at it, retrying forever,
/// and every user after it waited.
#[test]
fn oversized_snapshots_are_cut_and_oversized_records_dead_lettered_without_stopping_others() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let s = start_kafka(dir.path(), "k1", &broker.addr, "g-large");
    produce_settings(&broker.addr);
    s.wait_ready(Duration::from_secs(60));
    s.wait_for(30, "visibility settings applied", |s| {
        let (_, v) = s.get("/api/admin/visibility");
        (v["shown_event_types"].as_array().map(|a| a.len()) == Some(2)).then_some(())
    });
    // 40 events of 30 kB for one user: 1.2 MB of snapshot uncut.
    let blob = "x".repeat(30_000);
    let big: Vec<(String, String)> = (0..40)
        .map(|n| {
            (
                "big-u".to_string(),
                json!({"id": format!("b{n:02}"), "user_id": "big-u", "type": "article_viewed",
                    "created_at": format!("2026-11-20T10:00:{n:02}Z"), "properties": {"blob": blob}})
                .to_string(),
            )
        })
        .collect();
    kcat_produce(&broker.addr, "zendesk.events", &big);
    // 150,000 numbers: 300 kB of JSON, over a megabyte routed (a Struct
    // takes 11 bytes a number), then a small event for the same user.
    let numbers = vec!["1"; 150_000].join(",");
    let custom = |id: &str, props: &str| {
        (
            "num-u".to_string(),
            format!(
                r#"{{"user_id":"num-u","profile":{{"source":"shop","type":"customer"}},"event":{{"id":"{id}","source":"shop","type":"order_completed","created_at":"2026-11-20T10:00:00Z","properties":{props}}}}}"#
            ),
        )
    };
    kcat_produce(
        &broker.addr,
        "sunshine.events",
        &[
            custom("n-big", &format!(r#"{{"n":[{numbers}]}}"#)),
            custom("n-small", r#"{"order":"1"}"#),
        ],
    );
    let small = (
        "small-u".to_string(),
        json!({"id": "s1", "user_id": "small-u", "type": "article_viewed",
            "created_at": "2026-11-20T11:00:00Z", "properties": {}})
        .to_string(),
    );
    kcat_produce(&broker.addr, "zendesk.events", &[small]);
    s.wait_for(60, "the small user's snapshot", |s| {
        (s.try_get("/api/v2/users/small-u/context").ok()?.0 == 200).then_some(())
    });
    let num = s.wait_for(60, "the small record after the dead-lettered one", |s| {
        let (st, v) = s.try_get("/api/v2/users/num-u/context").ok()?;
        (st == 200).then_some(v)
    });
    let ids: Vec<&str> = num["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["n-small"]);
    let dead = s.wait_for(30, "the dead letter", |_| {
        kcat_consume(&broker.addr, "context.dlq")
            .into_iter()
            .map(|(_, _, _, v)| serde_json::from_str::<Value>(&v).unwrap())
            .find(|d| d["error"]["code"] == "too_large")
    });
    assert_eq!(dead["topic"], "sunshine.events");
    assert!(
        dead["error"]["message"]
            .as_str()
            .unwrap()
            .contains("records topic"),
        "{dead}"
    );
    // The big user's last snapshot: its newest events, within 900,000 bytes.
    let last = s.wait_for(60, "the big user's newest event published", |_| {
        let snaps: Vec<(usize, Value)> = kcat_consume(&broker.addr, "context.snapshots")
            .into_iter()
            .filter(|(_, _, k, _)| k == "big-u")
            .map(|(_, _, _, v)| (v.len(), serde_json::from_str(&v).unwrap()))
            .collect();
        let (_, last) = snaps.last()?;
        (last["events"][0]["id"] == "b39").then(|| snaps.last().cloned().unwrap())
    });
    let (len, snap) = last;
    assert!(len <= 900_000, "{len} bytes");
    let events = snap["events"].as_array().unwrap();
    assert!((20..40).contains(&events.len()), "{} events", events.len());
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["id"], format!("b{:02}", 39 - i));
    }
    // GET /context serves what was published.
    let (_, ctx) = s.get("/api/v2/users/big-u/context");
    assert_eq!(ctx, snap);
    // An input the producer would refuse (under max_record_bytes, over
    // message.max.bytes less room for the key) is refused as too large.
    let huge = json!({"user_id": "big-u", "type": "article_viewed",
        "properties": {"blob": "z".repeat(950_000)}})
    .to_string();
    let (st, body) = s.post_raw("/api/v2/zendesk/events", &huge).unwrap();
    assert_eq!(st, 413, "{body}");
    assert_eq!(body["errors"][0]["code"], "too_large");
    assert!(
        s.metric("contextd_snapshots_cut_total") > 0.0,
        "cut snapshots counted"
    );
}
