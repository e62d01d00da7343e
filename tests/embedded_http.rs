//! Embedded mode end to end: the real binary on a temp data dir, over HTTP.

mod common;

use common::{enc, run_cli, Server};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

fn ts(sec: u64) -> String {
    format!("2026-11-20T10:{:02}:{:02}Z", (sec / 60) % 60, sec % 60)
}

/// Appends Zendesk events (JSON lines) through the NDJSON endpoint.
fn post_zendesk_events(s: &Server, lines: &[String]) {
    let (st, resp) = s
        .post_raw("/api/v1/topics/zendesk.events/records", &lines.join("\n"))
        .unwrap();
    assert_eq!(st, 202, "{resp}");
}

/// Waits until `user`'s timeline holds `n` events.
fn wait_events(s: &Server, user: &str, n: usize) {
    s.wait_for(20, &format!("{n} events"), |s| {
        s.all_events(user).filter(|e| e.len() == n)
    });
}

fn custom(source: &str, ty: &str, id: Option<&str>, at: u64, ids: Value) -> Value {
    let mut ev =
        json!({"source": source, "type": ty, "created_at": ts(at), "properties": {"n": at}});
    if let Some(i) = id {
        ev["id"] = json!(i);
    }
    json!({"profile": {"source": source, "type": "customer", "identifiers": ids}, "event": ev})
}

fn all_visible(events: &[(&str, &str)], profiles: &[(&str, &str)]) -> Value {
    json!({"zendesk_events": true, "events_api": true, "profiles_api": true,
           "shown_event_types": events.iter().map(|(s, t)| json!({"source": s, "type": t})).collect::<Vec<_>>(),
           "shown_profile_types": profiles.iter().map(|(s, t)| json!({"source": s, "type": t})).collect::<Vec<_>>()})
}

#[test]
fn identity_resolution_dedupe_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("d"), &[]);
    s.set_visibility(&all_visible(
        &[("zendesk", "article_viewed"), ("shop", "order")],
        &[("shop", "customer")],
    ));

    // identity_created links the email to Zendesk user 777; a custom event with that email resolves to 777.
    let (st, _) = s.post(
        "/api/v2/zendesk/events",
        &json!({"user_id": 777, "type": "identity_created", "id": "ic1",
        "created_at": ts(1), "properties": {"identity_type": "email", "value": "Ann@Example.com"}}),
    );
    assert_eq!(st, 202);
    let ev = custom(
        "shop",
        "order",
        Some("o1"),
        2,
        json!([{"type": "email", "value": " ANN@example.com"}]),
    );
    assert_eq!(s.post("/api/v2/user_profiles/events", &ev).0, 202);
    let events = s.wait_for(20, "o1 on user 777", |s| {
        s.all_events("777").filter(|e| e.len() == 2)
    });
    assert_eq!(events[0]["id"], "o1", "newest first");
    let (_, profiles) = s.get("/api/v2/users/777/profiles");
    assert_eq!(
        profiles["profiles"][0]["identifiers"][0]["value"],
        "ann@example.com"
    );

    // An exact re-send without an id is stored once; with an id the timeline holds, not again.
    let no_id = custom(
        "shop",
        "order",
        None,
        3,
        json!([{"type": "email", "value": "ann@example.com"}]),
    );
    for _ in 0..3 {
        assert_eq!(s.post("/api/v2/user_profiles/events", &no_id).0, 202);
    }
    assert_eq!(s.post("/api/v2/user_profiles/events", &ev).0, 202);
    let (_, lookup) = s.get("/api/v2/users/lookup?identifier=email:ann@example.com");
    assert_eq!(lookup["user_id"], "777");
    s.wait_for(20, "derived-id event once", |s| {
        s.all_events("777").filter(|e| e.len() == 3)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(s.all_events("777").unwrap().len(), 3);

    // A new identifier-only user is named TYPE:VALUE; an explicit user_id links too.
    let ev2 = custom(
        "shop",
        "order",
        Some("o2"),
        4,
        json!([{"type": "phone_number", "value": "+4712"}, {"type": "external_id", "value": "X-9"}]),
    );
    assert_eq!(s.post("/api/v2/user_profiles/events", &ev2).0, 202);
    s.wait_for(20, "external_id user", |s| s.all_events("external_id:X-9"));
    let ev3 = custom(
        "shop",
        "order",
        Some("o3"),
        5,
        json!([{"type": "phone_number", "value": "+4712"}]),
    );
    assert_eq!(s.post("/api/v2/user_profiles/events", &ev3).0, 202);
    s.wait_for(20, "phone resolves to the same user", |s| {
        s.all_events("external_id:X-9").filter(|e| e.len() == 2)
    });

    // patch/delete of a missing profile -> not_found dead letter; the records around it apply.
    let before = s.dead_letters().len();
    let (st, _) = s.patch(
        "/api/v2/user_profiles?identifier=shop:member:email:nobody@example.com",
        &json!({"profile": {"name": "x"}}),
    );
    assert_eq!(st, 202);
    let (st, _) = s.delete("/api/v2/user_profiles?identifier=shop:member:email:ann@example.com");
    assert_eq!(st, 202);
    let dls = s.wait_for(20, "two not_found dead letters", |s| {
        let d = s.dead_letters();
        (d.len() >= before + 2).then_some(d)
    });
    for d in &dls[before..] {
        assert_eq!(d["error"]["code"], "not_found", "{d}");
        assert_eq!(d["topic"], "sunshine.profiles");
        assert!(!d["payload_base64"].as_str().unwrap().is_empty());
    }

    // The state's gauges are read when scraped: exact users (777 and
    // external_id:X-9; the rejected operations created none), readiness,
    // bytes; the events not stored again are counted.
    let (_, m) = s.get("/metrics");
    let m = m.as_str().unwrap().to_string();
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {m}"))
    };
    assert_eq!(value("contextd_users"), 2.0);
    assert_eq!(value("contextd_ready"), 1.0);
    assert_eq!(value("contextd_events_deduplicated_total"), 3.0);
    assert_eq!(value("contextd_records_duplicate_skipped_total"), 0.0);
    assert!(value("contextd_state_bytes") > 0.0);
    assert!(value("contextd_log_bytes") > 0.0);
    assert!(value("contextd_batch_records_count{stage=\"route\"}") > 0.0);

    // PUT and PATCH need {"profile": {...}}; nothing is appended without it.
    let path = "/api/v2/user_profiles?identifier=shop:member:email:ann@example.com";
    for (method, body, status, code) in [
        ("PUT", "", 400, "invalid_json"),
        ("PATCH", " ", 400, "invalid_json"),
        ("PUT", "{}", 422, "missing_field"),
        ("PUT", r#"{"profile": null}"#, 422, "missing_field"),
    ] {
        let (st, err) = s.raw(method, path, Some(body));
        assert_eq!(
            (st, err["errors"][0]["code"].as_str()),
            (status, Some(code)),
            "{method} {body:?}: {err}"
        );
    }
    // Errors axum answers before a handler runs have the same shape.
    // The server may answer and close while the client is still sending
    // (the client then sees a broken pipe): tried again a few times.
    let big = "x".repeat(65 << 20);
    let (st, err) = (0..5)
        .find_map(
            |_| match s.post_raw("/api/v1/topics/zendesk.events/records", &big) {
                Ok(answer) => Some(answer),
                Err(e) if e.contains("Broken pipe") || e.contains("reset") => None,
                Err(e) => panic!("{e}"),
            },
        )
        .expect("an answer to an oversized body");
    assert_eq!(
        (st, err["errors"][0]["code"].as_str()),
        (413, Some("too_large")),
        "{err}"
    );
    let (st, err) = s.get("/api/v2/no/such/route");
    assert_eq!(
        (st, err["errors"][0]["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    let (st, err) = s.raw("DELETE", "/api/admin/visibility", None);
    assert_eq!(
        (st, err["errors"][0]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{err}"
    );
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn pagination_filters_max_events_and_settings_republish() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let user = "pag-user";
    let body: Vec<String> = (0..130)
        .map(|i| {
            let ty = if i % 2 == 0 {
                "article_viewed"
            } else {
                "help_center_searched"
            };
            json!({"id": format!("e{i:03}"), "user_id": user, "type": ty, "created_at": ts(i)})
                .to_string()
        })
        .collect();
    post_zendesk_events(&s, &body);
    wait_events(&s, user, 130);
    // pages of 50, newest first, cursor advances
    let (_, p1) = s.get(&format!("/api/v2/users/{user}/events?page[size]=50"));
    assert_eq!(p1["events"].as_array().unwrap().len(), 50);
    assert_eq!(p1["events"][0]["id"], "e129");
    assert_eq!(p1["meta"]["has_more"], true);
    let cursor = p1["meta"]["after_cursor"].as_str().unwrap();
    let (_, p2) = s.get(&format!(
        "/api/v2/users/{user}/events?page[size]=50&page[after]={cursor}"
    ));
    assert_eq!(p2["events"][0]["id"], "e079");
    // The last page has a cursor too (as Zendesk's); after it, an empty page without one.
    let c2 = p2["meta"]["after_cursor"].as_str().unwrap();
    let (_, p3) = s.get(&format!(
        "/api/v2/users/{user}/events?page[size]=50&page[after]={c2}"
    ));
    assert_eq!(p3["events"].as_array().unwrap().len(), 30);
    assert_eq!(p3["meta"]["has_more"], false);
    let c3 = p3["meta"]["after_cursor"].as_str().unwrap();
    let (_, p4) = s.get(&format!(
        "/api/v2/users/{user}/events?page[size]=50&page[after]={c3}"
    ));
    assert_eq!(p4["events"].as_array().unwrap().len(), 0, "{p4}");
    assert_eq!(p4["meta"], json!({"has_more": false, "after_cursor": null}));
    let (_, f) = s.get(&format!("/api/v2/users/{user}/events?filter[type]=help_center_searched&filter[start_time]={}&filter[end_time]={}", ts(10), ts(20)));
    let ids: Vec<&str> = f["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["e019", "e017", "e015", "e013", "e011"]);
    let (st, err) = s.get(&format!("/api/v2/users/{user}/events?page[size]=abc"));
    assert_eq!(st, 422, "{err}");
    // Above 1000 is 1000, also past what an i64 holds; 0 and -1 are refused.
    for size in [
        "5000",
        "9223372036854775808",
        "123456789012345678901234567890",
    ] {
        let (st, page) = s.get(&format!("/api/v2/users/{user}/events?page[size]={size}"));
        assert_eq!(
            (st, page["events"].as_array().unwrap().len()),
            (200, 130),
            "{size}"
        );
    }
    for size in ["0", "000", "-1"] {
        let (st, err) = s.get(&format!("/api/v2/users/{user}/events?page[size]={size}"));
        assert_eq!(st, 422, "{size}: {err}");
    }

    // Secure default: nothing shown, version 1.
    let (_, ctx) = s.get(&format!("/api/v2/users/{user}/context"));
    assert_eq!(ctx["events"], json!([]));
    let v0 = ctx["version"].as_u64().unwrap();
    assert!(v0 >= 1);
    // Showing a type re-publishes with at most 50 events, newest first.
    s.set_visibility(&all_visible(&[("zendesk", "article_viewed")], &[]));
    let ctx = s.wait_for(20, "republished context", |s| {
        let (_, c) = s.get(&format!("/api/v2/users/{user}/context"));
        (c["version"].as_u64() > Some(v0)).then_some(c)
    });
    let ev = ctx["events"].as_array().unwrap();
    assert_eq!(ev.len(), 50);
    assert_eq!(ev[0]["id"], "e128");
    assert!(ev.iter().all(|e| e["type"] == "article_viewed"));
    let v1 = ctx["version"].as_u64().unwrap();
    // Same settings again: no visible change, no new version.
    s.set_visibility(&all_visible(&[("zendesk", "article_viewed")], &[]));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        s.get(&format!("/api/v2/users/{user}/context")).1["version"].as_u64(),
        Some(v1)
    );
    // Catalog
    let (_, types) = s.get("/api/admin/event_types");
    let t: HashMap<String, (u64, bool)> = types["event_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                (e["count"].as_u64().unwrap(), e["shown"].as_bool().unwrap()),
            )
        })
        .collect();
    assert_eq!(t["article_viewed"], (65, true));
    assert_eq!(t["help_center_searched"], (65, false));
    assert_eq!(s.get("/api/v2/users/nobody-here/context").0, 404);
    assert_eq!(
        s.post_raw("/api/v1/topics/context.snapshots/records", "{}")
            .unwrap()
            .0,
        404
    );
}

/// kill -9 during a stream of appends, then restart: every record answered
/// 202 is applied exactly once (valid events are in the timeline; each bad
/// line has exactly one dead letter).
#[test]
fn kill9_during_appends_loses_nothing_and_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = Server::start(&data, &[]);
    let base = s.base.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked_good = Vec::new();
            let mut acked_bad = Vec::new();
            for i in 0..100_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (path, body, good) = if i % 5 == 4 {
                    (
                        "/api/v1/topics/sunshine.events/records".to_string(),
                        format!("{{\"bad-{i}\": "),
                        false,
                    )
                } else {
                    ("/api/v2/zendesk/events".to_string(), json!({"id": format!("k{i}"), "user_id": format!("u{}", i % 37), "type": "article_viewed", "created_at": ts(i as u64 % 3000)}).to_string(), true)
                };
                match ureq::post(&format!("{base}{path}"))
                    .timeout(std::time::Duration::from_secs(5))
                    .send_string(&body)
                {
                    Ok(r) if r.status() == 202 => {
                        if good {
                            acked_good.push(i)
                        } else {
                            acked_bad.push(i)
                        }
                    }
                    _ => break,
                }
            }
            (acked_good, acked_bad)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    s.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (good, bad) = writer.join().unwrap();
    assert!(
        good.len() > 100,
        "only {} appends before the kill",
        good.len()
    );
    let s = Server::start(&data, &[]);
    let mut per_user: HashMap<String, HashSet<String>> = HashMap::new();
    for i in &good {
        per_user
            .entry(format!("u{}", i % 37))
            .or_default()
            .insert(format!("k{i}"));
    }
    for (u, want) in &per_user {
        let events = s.wait_for(30, "acked events applied", |s| {
            let ev = s.all_events(u)?;
            let have: HashSet<String> = ev
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect();
            want.is_subset(&have).then_some(ev)
        });
        let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        let unique: HashSet<&&str> = ids.iter().collect();
        assert_eq!(ids.len(), unique.len(), "duplicate events for {u}");
    }
    let dls = s.wait_for(30, "dead letters of acked bad lines", |s| {
        let d = s.dead_letters();
        let markers: HashSet<u32> = d
            .iter()
            .filter_map(|x| {
                let p = base64_decode(x["payload_base64"].as_str()?);
                p.strip_prefix("{\"bad-")?.split('"').next()?.parse().ok()
            })
            .collect();
        bad.iter().all(|b| markers.contains(b)).then_some(d)
    });
    let mut seen = HashMap::new();
    for d in &dls {
        *seen
            .entry((d["partition"].as_i64(), d["offset"].as_i64()))
            .or_insert(0) += 1;
        let p = base64_decode(d["payload_base64"].as_str().unwrap());
        assert_eq!(
            dls.iter()
                .filter(|x| base64_decode(x["payload_base64"].as_str().unwrap()) == p)
                .count(),
            1,
            "dead-lettered twice: {p}"
        );
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "a record was dead-lettered twice"
    );
}

fn base64_decode(s: &str) -> String {
    use base64::Engine;
    String::from_utf8_lossy(
        &base64::engine::general_purpose::STANDARD
            .decode(s)
            .unwrap_or_default(),
    )
    .into_owned()
}

/// digest -> rebuild -> digest are equal, also after kill -9 and restart;
/// checkpoint -> wipe -> restore gives the same digest.
/// A data dir (`d` in a temp dir) filled by `contextd demo`; its output.
fn demo_data_dir(records: &str, users: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let (ok, out, err) = run_cli(&[
        "demo",
        "--data-dir",
        data.to_str().unwrap(),
        "--records",
        records,
        "--users",
        users,
    ]);
    assert!(ok, "demo failed: {out}\n{err}");
    (dir, data, out)
}

#[test]
fn rebuild_and_checkpoint_keep_the_digest() {
    let (dir, data, out) = demo_data_dir("8000", "500");
    let d = data.to_str().unwrap();
    assert!(out.contains("Customer context"), "{out}");
    let digest = |label: &str| {
        let (ok, out, err) = run_cli(&["digest", "--data-dir", d]);
        assert!(ok, "digest ({label}): {err}");
        let h = out.trim().to_string();
        assert_eq!(h.len(), 64, "{h}");
        h
    };
    let d0 = digest("live");
    // A rebuild that cannot run loses nothing.
    let (ok, out, err) = run_cli(&["rebuild", "--data-dir", d, "--partitions", "3"]);
    assert!(!ok && err.contains("partitions"), "{out} {err}");
    assert_eq!(digest("after a refused rebuild"), d0);
    let (ok, out, err) = run_cli(&["rebuild", "--data-dir", d]);
    assert!(ok, "rebuild: {out} {err}");
    assert!(
        out.contains("entries/s") && out.contains("0 snapshots re-published"),
        "{out}"
    );
    assert_eq!(digest("rebuilt"), d0);
    // Without --partitions a rebuild takes the data dir's own count, also
    // where the config file says another one (for new data dirs).
    let cfg = dir.path().join("three.toml");
    std::fs::write(&cfg, "partitions = 3\n").unwrap();
    let (ok, out, err) = run_cli(&[
        "rebuild",
        "--data-dir",
        d,
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(ok, "rebuild with another count configured: {out} {err}");
    assert_eq!(digest("rebuilt with the recorded count"), d0);

    // Checkpoint, wipe, restore.
    let cp = dir.path().join("cp");
    let (ok, _, err) = run_cli(&[
        "checkpoint",
        "create",
        "--data-dir",
        d,
        cp.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    std::fs::remove_dir_all(&data).unwrap();
    let (ok, _, err) = run_cli(&[
        "checkpoint",
        "restore",
        "--data-dir",
        d,
        cp.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(digest("restored"), d0);

    // A live server after restore serves the same contexts; kill -9 and restart keep the digest.
    let mut s = Server::start(&data, &[]);
    let (st, ctx) = s.get(&format!("/api/v2/users/{}/context", enc("10000000")));
    assert_eq!(st, 200);
    assert!(!ctx["events"].as_array().unwrap().is_empty());
    s.kill9();
    assert_eq!(digest("after kill -9"), d0);
    let (ok, _, err) = run_cli(&["rebuild", "--data-dir", d, "--from-inputs"]);
    assert!(ok, "{err}");
    let (ok, _, _) = run_cli(&["digest", "--data-dir", "/nonexistent/contextd"]);
    assert!(!ok, "digest of a missing data dir must fail");
}

/// Starts `contextd rebuild ARGS` on `d` and kills it (SIGKILL) once it
/// logs a line containing `at`; true if that left the data dir marked as
/// interrupted (`digest` refuses it), false if the rebuild got to its end
/// first.
fn kill_rebuild(d: &str, args: &[&str], at: &str) -> bool {
    use std::io::BufRead;
    let mut all = vec!["rebuild", "--data-dir", d];
    all.extend_from_slice(args);
    let mut child = common::command(&all)
        .env("CONTEXTD_LOG", "contextd::replay=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains(at) {
            let _ = child.kill();
            break;
        }
    }
    child.wait().unwrap();
    let (ok, _, err) = run_cli(&["digest", "--data-dir", d]);
    assert!(ok || err.contains("interrupted"), "{err}");
    !ok
}

/// `contextd ARGS`, which must fail within a minute; its stderr.
fn fails_at_once(args: &[&str]) -> String {
    let mut child = common::command(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} still running after a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A rebuild killed half way (kill -9; it writes no RocksDB log) leaves a
/// data dir that `digest` and `run` refuse, naming the command to run
/// again; run again, it gives the live run's digest and sends no dead
/// letter the live run sent. A `--from-inputs` one killed while it
/// re-routes is refused to a plain rebuild and finishes when run again.
#[test]
fn an_interrupted_rebuild_is_refused_until_it_is_run_again() {
    let (dir, data, _) = demo_data_dir("60000", "3000");
    let d = data.to_str().unwrap();
    let canonical = std::fs::canonicalize(&data).unwrap();
    let digest = || {
        let (ok, out, err) = run_cli(&["digest", "--data-dir", d]);
        assert!(ok, "{err}");
        out
    };
    let dead_letters = || {
        let mut s = Server::start(&data, &[]);
        let n = s.dead_letters().len();
        s.stop();
        n
    };
    let d0 = digest();
    let dlq0 = dead_letters();
    assert!(dlq0 > 0, "the demo's workload has bad records");
    // Killed when its first partition is replayed (about a quarter of the
    // way). Should one finish first on a slow machine, another is killed.
    assert!(
        (0..5).any(|_| kill_rebuild(d, &[], "partition replayed")),
        "every rebuild finished before it was killed"
    );
    let (_, _, err) = run_cli(&["digest", "--data-dir", d]);
    assert!(
        err.contains(&format!(
            "run `contextd rebuild --data-dir {}` again",
            canonical.display()
        )),
        "{err}"
    );
    let addr = format!("127.0.0.1:{}", common::free_port());
    let err = fails_at_once(&["run", "--data-dir", d, "--http-addr", &addr]);
    assert!(err.contains("interrupted"), "{err}");
    let cp = dir.path().join("cp");
    let err = fails_at_once(&[
        "checkpoint",
        "create",
        "--data-dir",
        d,
        cp.to_str().unwrap(),
    ]);
    assert!(err.contains("interrupted") && !cp.exists(), "{err}");
    let (ok, out, err) = run_cli(&["rebuild", "--data-dir", d]);
    assert!(ok, "{out} {err}");
    assert_eq!(digest(), d0);
    assert_eq!(dead_letters(), dlq0, "no dead letter sent twice");

    // --from-inputs, killed as it starts re-routing the inputs.
    assert!(
        (0..5).any(|_| kill_rebuild(d, &["--from-inputs"], "rebuild: store opened")),
        "every rebuild finished before it was killed"
    );
    let (_, _, err) = run_cli(&["digest", "--data-dir", d]);
    assert!(err.contains(" --from-inputs` again"), "{err}");
    let (ok, _, err) = run_cli(&["rebuild", "--data-dir", d]);
    assert!(!ok && err.contains("--from-inputs"), "{err}");
    let (ok, out, err) = run_cli(&["rebuild", "--data-dir", d, "--from-inputs"]);
    assert!(ok, "{out} {err}");
    assert_eq!(digest(), d0);
    assert_eq!(dead_letters(), dlq0);
}

/// A rebuild replays records whose dead letters the live run sent: it does
/// not send them again. `--from-inputs` starts the dead-letter log over and
/// sends each once more. Here a patch of a profile type the user lacks
/// (`not_found`, decided by the materializing stage).
#[test]
fn a_rebuild_sends_no_dead_letter_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let d = data.to_str().unwrap();
    let codes = |s: &Server| -> Vec<String> {
        s.dead_letters()
            .iter()
            .map(|x| x["error"]["code"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let mut s = Server::start(&data, &[]);
    let event = json!({
        "profile": {"source": "shop", "type": "customer",
                    "identifiers": [{"type": "email", "value": "a@x.com"}]},
        "event": {"id": "e1", "source": "shop", "type": "order_completed"}});
    assert_eq!(s.post("/api/v2/users/u1/events", &event).0, 202);
    let patch = json!({"profile": {"attributes": {"tier": "gold"}}});
    let (st, _) = s.patch(
        "/api/v2/user_profiles?identifier=shop:other:email:a@x.com",
        &patch,
    );
    assert_eq!(st, 202);
    s.wait_for(20, "the dead letter", |s| {
        (codes(s) == ["not_found"]).then_some(())
    });
    s.stop();
    for args in [
        &["rebuild", "--data-dir", d][..],
        &["rebuild", "--data-dir", d, "--from-inputs"],
    ] {
        let (ok, out, err) = run_cli(args);
        assert!(ok, "{args:?}: {out} {err}");
        let s = Server::start(&data, &[]);
        assert_eq!(codes(&s), ["not_found"], "after {args:?}");
    }
}

/// A rebuild settles every user against the last snapshot published: with
/// fewer events per snapshot, each context that showed more is re-published
/// once, with the next version; a second rebuild re-publishes nothing. The
/// first settles the users its replay left cached, the second (no user
/// cache) reads every user back from the store.
#[test]
fn rebuild_republishes_changed_contexts_with_the_next_version() {
    let (dir, data, _) = demo_data_dir("3000", "100");
    let d = data.to_str().unwrap();
    let path = format!("/api/v2/users/{}/context", enc("10000000"));
    let context = |extra: &[&str]| {
        let s = Server::start(&data, extra);
        let (st, ctx) = s.get(&path);
        assert_eq!(st, 200, "{ctx}");
        ctx
    };
    let before = context(&[]);
    let shown = before["events"].as_array().unwrap().len();
    assert!(
        shown > 5,
        "the busiest user shows more than 5 events: {shown}"
    );
    let v0 = before["version"].as_u64().unwrap();
    let cfg = dir.path().join("contextd.toml");
    let cfg_path = cfg.to_str().unwrap();
    let rebuild = |toml: &str| -> u64 {
        std::fs::write(&cfg, toml).unwrap();
        let (ok, out, err) = run_cli(&["rebuild", "--data-dir", d, "--config", cfg_path]);
        assert!(ok, "rebuild: {out}\n{err}");
        let n = out
            .split(", ")
            .find_map(|part| part.trim().strip_suffix(" snapshots re-published"))
            .unwrap_or_else(|| panic!("no re-published count in {out:?}"));
        n.parse().unwrap()
    };
    let first = rebuild("[snapshot]\nmax_events = 5\n");
    assert!(first > 0, "contexts with more than 5 events changed");
    let after = context(&["--config", cfg_path]);
    assert_eq!(after["version"].as_u64(), Some(v0 + 1), "{after}");
    assert_eq!(after["events"].as_array().unwrap().len(), 5);
    assert_eq!(after["events"][0], before["events"][0], "newest first");
    let second = rebuild("[snapshot]\nmax_events = 5\n[storage]\nuser_cache_mb = 0\n");
    assert_eq!(second, 0, "nothing changed since the first rebuild");
    assert_eq!(
        context(&["--config", cfg_path])["version"],
        after["version"]
    );
}

/// `contextd produce` over HTTP passes every line on as bytes: one that
/// is not UTF-8 is dead-lettered by the pipeline (`invalid_json`) like any
/// bad line, and the lines around it are applied; `\r\n` endings and
/// blank lines are fine.
#[test]
fn produce_appends_every_line_and_the_pipeline_sorts_out_the_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let ids = |e: &str| json!([{"type": "email", "value": e}]);
    let mut file = Vec::new();
    for line in [
        custom("shop", "order", Some("p1"), 1, ids("p1@example.com")).to_string(),
        custom("shop", "order", Some("p2"), 2, ids("p2@example.com")).to_string(),
    ] {
        file.extend_from_slice(line.as_bytes());
        file.extend_from_slice(b"\r\n\n");
        file.extend_from_slice(b"{\"not utf-8\": \"\xff\xfe\"}\n");
    }
    let path = dir.path().join("in.ndjson");
    std::fs::write(&path, &file).unwrap();
    let (ok, out, err) = run_cli(&[
        "produce",
        "--http-addr",
        &s.addr,
        "--topic",
        "sunshine.events",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{out} {err}");
    assert!(out.contains("appended 4 records"), "{out}");
    for u in ["email:p1@example.com", "email:p2@example.com"] {
        s.wait_for(20, u, |s| {
            (s.get(&format!("/api/v2/users/{}/events", enc(u))).0 == 200).then_some(())
        });
    }
    let dead = s.wait_for(20, "two dead letters", |s| {
        let d = s.dead_letters();
        (d.len() == 2).then_some(d)
    });
    for d in &dead {
        assert_eq!(d["error"]["code"], "invalid_json", "{d}");
    }
    // The answer says how many there are and whether it holds them all;
    // `from` reads on through the dead-letter log.
    let page = |q: &str| s.get(&format!("/api/admin/dead_letters{q}"));
    let (st, all) = page("");
    assert_eq!(st, 200);
    assert_eq!(
        all["meta"],
        json!({"total": 2, "has_more": false, "next_from": 2})
    );
    let (_, newest) = page("?limit=1");
    assert_eq!(newest["dead_letters"], json!([dead[1]]));
    assert_eq!(
        newest["meta"],
        json!({"total": 2, "has_more": true, "next_from": 2})
    );
    let (_, first) = page("?from=0&limit=1");
    assert_eq!(first["dead_letters"], json!([dead[0]]));
    assert_eq!(
        first["meta"],
        json!({"total": 2, "has_more": true, "next_from": 1})
    );
    let (_, rest) = page("?from=1");
    assert_eq!(rest["dead_letters"], json!([dead[1]]));
    assert_eq!(
        rest["meta"],
        json!({"total": 2, "has_more": false, "next_from": 2})
    );
    let (_, past) = page("?from=2");
    assert_eq!(past["dead_letters"], json!([]));
    assert_eq!(
        past["meta"],
        json!({"total": 2, "has_more": false, "next_from": 2})
    );
    for q in ["?limit=0", "?limit=x", "?from=-1"] {
        let (st, body) = page(q);
        assert_eq!(st, 422, "{q}: {body}");
        assert_eq!(body["errors"][0]["code"], "invalid_field", "{q}");
    }
}

/// Properties and attributes as deep as validation allows (30 levels of
/// objects, the deepest `google.protobuf.Struct` for it) go through every
/// stage, the API and a rebuild unchanged; one level more is refused at
/// the door (422), not accepted and then undecodable.
#[test]
fn the_deepest_properties_allowed_round_trip_and_deeper_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = Server::start(&data, &[]);
    s.set_visibility(&all_visible(&[("shop", "order")], &[("shop", "customer")]));
    let nested = |levels: usize| {
        let mut v = json!("leaf");
        for _ in 0..levels {
            v = json!({ "k": v });
        }
        v
    };
    let ids = json!([{"type": "email", "value": "deep@example.com"}]);
    let mut ev = custom("shop", "order", Some("d1"), 1, ids.clone());
    ev["event"]["properties"] = nested(30);
    ev["profile"]["attributes"] = nested(30);
    let (st, body) = s.post("/api/v2/user_profiles/events", &ev);
    assert_eq!(st, 202, "{body}");
    let put = json!({"profile": {"attributes": nested(30)}});
    let q = "/api/v2/user_profiles?identifier=shop:customer:email:deep@example.com";
    assert_eq!(s.put(q, &put).0, 202);
    let ctx = s.wait_for(20, "the deep context", |s| {
        let (st, c) = s.get("/api/v2/users/email:deep@example.com/context");
        (st == 200 && c["profiles"][0]["attributes"] == nested(30)).then_some(c)
    });
    assert_eq!(ctx["events"][0]["properties"], nested(30));
    for (path, body) in [
        ("/api/v2/user_profiles/events", {
            let mut e = ev.clone();
            e["event"]["properties"] = nested(31);
            e
        }),
        (
            "/api/v2/zendesk/events",
            json!({"user_id": "z", "type": "article_viewed", "properties": nested(31)}),
        ),
    ] {
        let (st, b) = s.post(path, &body);
        assert_eq!(st, 422, "{path}: {b}");
        assert!(
            b["errors"][0]["title"].as_str().unwrap().contains("nested"),
            "{b}"
        );
    }
    let (st, b) = s.patch(q, &json!({"profile": {"attributes": nested(31)}}));
    assert_eq!(st, 422, "{b}");
    assert_eq!(s.stop(), Some(0));
    let d = data.to_str().unwrap();
    let (ok, before, err) = run_cli(&["digest", "--data-dir", d]);
    assert!(ok, "{err}");
    let (ok, out, err) = run_cli(&["rebuild", "--data-dir", d]);
    assert!(ok, "{out} {err}");
    let (ok, after, err) = run_cli(&["digest", "--data-dir", d]);
    assert!(ok, "{err}");
    assert_eq!(before, after);
}

/// A `+` in an `identifier` query parameter is a plus (phone numbers,
/// sub-addressed emails), whether sent as is or as `%2B`.
#[test]
fn identifier_values_keep_a_plus() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let put = |q: &str, tier: &str| {
        let body = json!({"profile": {"attributes": {"tier": tier}}});
        let (st, b) = s.put(&format!("/api/v2/user_profiles?identifier={q}"), &body);
        assert_eq!(st, 202, "{q}: {b}");
    };
    put("shop:customer:phone_number:+4712345678", "gold");
    put("shop:customer:email:Jane+Tag@Example.com", "gold");
    put("shop:customer:phone_number:%2B4798765432", "gold");
    for (q, user) in [
        ("phone_number:+4712345678", "phone_number:+4712345678"),
        ("phone_number:%2B4712345678", "phone_number:+4712345678"),
        ("email:jane+tag@example.com", "email:jane+tag@example.com"),
        ("phone_number:+4798765432", "phone_number:+4798765432"),
    ] {
        let body = s.wait_for(20, q, |s| {
            let (st, b) = s.get(&format!("/api/v2/users/lookup?identifier={q}"));
            (st == 200).then_some(b)
        });
        assert_eq!(body["user_id"], user, "{q}");
    }
    // A patch through the identifier finds the profile the put made.
    let body = json!({"profile": {"attributes": {"tier": "silver"}}});
    let (st, _) = s.patch(
        "/api/v2/user_profiles?identifier=shop:customer:phone_number:+4712345678",
        &body,
    );
    assert_eq!(st, 202);
    s.wait_for(20, "patched", |s| {
        let (_, b) = s.get("/api/v2/users/phone_number:+4712345678/profiles");
        (b["profiles"][0]["attributes"]["tier"] == "silver").then_some(())
    });
    assert!(s.dead_letters().is_empty(), "{:?}", s.dead_letters());
}

/// A user named after an identifier whose value has surrounding whitespace
/// (kept in the value: only emails and twitter handles are trimmed) keeps
/// it in its id, so `C-77` and ` C-77 ` stay two customers, and the API
/// finds it by that id though it trims other ids.
#[test]
fn a_user_named_after_an_identifier_with_whitespace_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let body = json!({
        "profile": {"source": "shop", "type": "customer",
                    "identifiers": [{"type": "external_id", "value": " C-77 "}]},
        "event": {"id": "e1", "source": "shop", "type": "order_completed",
                  "created_at": "2026-11-20T10:00:00Z"}});
    let (st, b) = s.post("/api/v2/user_profiles/events", &body);
    assert_eq!(st, 202, "{b}");
    let mut other = body.clone();
    other["profile"]["identifiers"][0]["value"] = json!("C-77");
    other["event"]["id"] = json!("e2");
    let (st, b) = s.post("/api/v2/user_profiles/events", &other);
    assert_eq!(st, 202, "{b}");
    for (q, user) in [
        ("%20C-77%20", "external_id: C-77 "),
        ("C-77", "external_id:C-77"),
    ] {
        let found = s.wait_for(20, "lookup", |s| {
            let (st, b) = s.get(&format!("/api/v2/users/lookup?identifier=external_id:{q}"));
            (st == 200).then_some(b)
        });
        assert_eq!(found["user_id"], user);
    }
    // (A lookup can answer before the user is materialized.)
    let events = s.wait_for(20, "the user's events", |s| {
        let (st, b) = s.get("/api/v2/users/external_id:%20C-77%20/events");
        (st == 200).then_some(b)
    });
    let ids: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(
        ids,
        [&json!("e1")],
        "the other customer's event is not here"
    );
    let (st, ctx) = s.get("/api/v2/users/external_id:%20C-77%20/context");
    assert_eq!((st, &ctx["user_id"]), (200, &json!("external_id: C-77 ")));
    // Other ids are trimmed as ingest trims a user_id (the lookup above
    // can answer before the user is materialized: wait for it).
    let profiles = s.wait_for(20, "the other customer", |s| {
        let (st, b) = s.get("/api/v2/users/%20external_id:C-77%20/profiles");
        (st == 200).then_some(b)
    });
    assert_eq!(profiles["profiles"][0]["identifiers"][0]["value"], "C-77");
}

#[test]
fn bad_flags_and_config_fail_clearly() {
    let (ok, _, err) = run_cli(&[
        "run",
        "--partitions",
        "0",
        "--data-dir",
        "/tmp/x-contextd-never",
    ]);
    assert!(!ok);
    assert!(err.contains("partitions"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    let (ok, _, err) = run_cli(&["run", "--config", "/nonexistent.toml"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    // A directory is not read as an empty config.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let (ok, _, err) = run_cli(&["digest", "--config", &d, "--data-dir", &d]);
    assert!(!ok && err.contains("is not a file"), "{err}");
    // An address in use fails the start before the data dir is made.
    let s = Server::start(&dir.path().join("running"), &[]);
    let other = dir.path().join("other");
    let (ok, _, err) = run_cli(&[
        "run",
        "--data-dir",
        other.to_str().unwrap(),
        "--http-addr",
        &s.addr,
    ]);
    assert!(!ok && err.contains("cannot listen"), "{err}");
    assert!(!other.exists(), "a failed start made {}", other.display());
    // `produce` takes input topics only, and says so at once (no broker here).
    for topic in ["no.such.topic", "", "context.snapshots"] {
        let (ok, _, err) = run_cli(&[
            "produce",
            "--brokers",
            "127.0.0.1:1",
            "--topic",
            topic,
            "/dev/null",
        ]);
        assert!(
            !ok && err.contains("is not an input topic"),
            "{topic}: {err}"
        );
    }
    // Usage errors are one line too, not clap's block with the usage.
    for args in [
        &["run", "--bogus"][..],
        &["bogus"],
        &[],
        &["run", "--partitions", "abc"],
        &["run", "--snapshot-format", "xml"],
        &["produce"],
        &[
            "produce",
            "--topic",
            "t",
            "--brokers",
            "b:1",
            "--http-addr",
            "h:2",
        ],
        &["run", "--partitions", "10001"],
    ] {
        let (ok, _, err) = run_cli(args);
        assert!(!ok, "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("contextd: error: "), "{args:?}: {err}");
    }
    let (ok, out, _) = run_cli(&["--help"]);
    assert!(ok && out.contains("Usage"), "{out}");
    // A typo in the config file is named, not silently a default.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("typo.toml");
    std::fs::write(&cfg, "partitons = 3\n").unwrap();
    let (ok, _, err) = run_cli(&["digest", "--config", cfg.to_str().unwrap()]);
    assert!(
        !ok && err.contains("unknown key") && err.contains("partitons"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // rebuild of a data dir that holds no state (a typo) fails, as digest does.
    let missing = dir.path().join("never-created");
    let (ok, _, err) = run_cli(&["rebuild", "--data-dir", missing.to_str().unwrap()]);
    assert!(!ok && err.contains("no contextd state"), "{err}");
    assert!(!missing.exists(), "nothing created");
}

/// `snapshot.min_interval_ms`: changes for a user published less than the
/// interval ago are held and published as one snapshot when it ends; the
/// context served meanwhile is the last snapshot published (its version
/// and content agree); a hold survives kill -9. Every record applied
/// counts in the record-latency histogram.
#[test]
fn a_burst_for_one_user_is_held_and_published_as_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("contextd.toml");
    std::fs::write(&config, "[snapshot]\nmin_interval_ms = 3000\n").unwrap();
    let data = dir.path().join("d");
    let args = ["--config", config.to_str().unwrap()];
    let mut s = Server::start(&data, &args);
    s.set_visibility(&all_visible(&[("shop", "order")], &[]));
    let ids = json!([{"type": "email", "value": "burst@example.com"}]);
    let post = |s: &Server, n: u64| {
        let ev = custom("shop", "order", Some(&format!("o{n}")), n, ids.clone());
        assert_eq!(s.post("/api/v2/user_profiles/events", &ev).0, 202);
    };
    let user = |s: &Server| {
        let (st, body) = s.get("/api/v2/users/lookup?identifier=email:burst@example.com");
        (st == 200).then(|| body["user_id"].as_str().unwrap().to_string())
    };
    let shown = |c: &Value| -> Vec<String> {
        c["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    post(&s, 1);
    let uid = s.wait_for(20, "the user", user);
    let context = |s: &Server| s.get(&format!("/api/v2/users/{}/context", enc(&uid)));
    s.wait_for(20, "the first snapshot", |s| {
        let (st, c) = context(s);
        (st == 200 && c["version"] == 1).then_some(())
    });
    let held_total = |s: &Server| s.metric("contextd_snapshots_held_total") as u64;
    // A burst within the interval: held, and the context stays version 1.
    for n in 2..=4 {
        post(&s, n);
    }
    s.wait_for(20, "the burst held", |s| (held_total(s) >= 1).then_some(()));
    let c = s.wait_for(20, "the burst published", |s| {
        let (_, c) = context(s);
        match c["version"].as_u64() {
            Some(1) => {
                assert_eq!(shown(&c), ["o1"], "version 1 keeps its content");
                None
            }
            _ => Some(c),
        }
    });
    assert_eq!(c["version"], 2, "one snapshot for the burst: {c}");
    assert_eq!(shown(&c), ["o4", "o3", "o2", "o1"]);
    // Every record applied counts in the latency histogram: from its append
    // to its batch's commit (just now here, so well under a minute).
    let (_, m) = s.get("/metrics");
    let metric = |name: &str| -> f64 {
        m.as_str()
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(-1.0, |v| v.trim().parse::<f64>().unwrap())
    };
    let count = metric("contextd_record_latency_seconds_count ");
    assert!(count >= 4.0, "{m}");
    let sum = metric("contextd_record_latency_seconds_sum ");
    assert!(sum >= 0.0 && sum < 60.0 * count, "{m}");
    assert_eq!(
        metric("contextd_record_latency_seconds_bucket{le=\"+Inf\"} "),
        count
    );
    // The user this test touched is cached: the estimate counts it.
    let cached = metric("contextd_user_cache_bytes ");
    assert!(cached > 0.0 && cached < (128 << 20) as f64, "{m}");
    // Held when the process is killed: published after the restart.
    post(&s, 5);
    s.wait_for(20, "the next change held", |s| {
        (held_total(s) >= 2).then_some(())
    });
    let (_, c) = context(&s);
    assert_eq!((c["version"].as_u64(), shown(&c).len()), (Some(2), 4));
    s.kill9();
    let s = Server::start(&data, &args);
    let c = s.wait_for(20, "the held change published", |s| {
        let (_, c) = context(s);
        (c["version"] != 2).then_some(c)
    });
    assert_eq!(c["version"], 3);
    assert_eq!(shown(&c), ["o5", "o4", "o3", "o2", "o1"]);
}

/// The process runs with transparent huge pages off (mimalloc's arenas
/// would otherwise fault in 2 MiB pages, zeroed whole at first touch),
/// unless the operator sets mimalloc's own `MIMALLOC_ALLOW_THP`.
#[test]
fn transparent_huge_pages_are_off_unless_the_operator_allows_them() {
    fn field(status: &str) -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim().to_string())
            .expect("the kernel reports THP_enabled")
    }
    fn thp_enabled(env: &[(&str, &str)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = common::command(&[
            "run",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--http-addr",
            &addr,
        ])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        // Listening means main has long run its first line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "contextd did not listen"
            );
            assert!(child.try_wait().unwrap().is_none(), "contextd exited");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        field(&status)
    }
    assert_eq!(thp_enabled(&[]), "0");
    // Allowed, the process has what this test process has (1 on a kernel
    // built with transparent huge pages).
    let ours = field(&std::fs::read_to_string("/proc/self/status").unwrap());
    assert_eq!(thp_enabled(&[("MIMALLOC_ALLOW_THP", "1")]), ours);
}

/// A materializing stage that is behind writes its snapshots past the page
/// cache (BENCHMARKS.md, item 53): with small batches and a long linger a
/// burst fills the batches, the direct commits are counted, and after a
/// kill -9 and a restart the local snapshots log holds, as each user's
/// last snapshot, what `GET /context` serves. (The data dir is in the
/// target dir: a tmpfs `/tmp` may refuse direct I/O.)
#[test]
fn snapshots_written_direct_by_a_stage_behind_are_what_is_served() {
    use contextd::model::ContextSnapshot;
    use prost::Message;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("d");
    let cfg = dir.path().join("contextd.toml");
    std::fs::write(&cfg, "[pipeline]\nbatch_records = 16\nlinger_ms = 100\n").unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let mut s = Server::start(&data, &args);
    s.set_visibility(&all_visible(&[("zendesk", "article_viewed")], &[]));
    let users = 40;
    let records = 3000;
    let body: Vec<String> = (0..records)
        .map(|i| {
            json!({"id": format!("e{i}"), "user_id": format!("u{}", i % users),
                   "type": "article_viewed", "created_at": ts(i as u64),
                   "properties": {"n": i, "pad": "x".repeat(300 + i % 700)}})
            .to_string()
        })
        .collect();
    post_zendesk_events(&s, &body);
    let served = |s: &Server| -> HashMap<String, (u64, Vec<String>)> {
        (0..users)
            .map(|u| {
                let (_, c) = s.get(&format!("/api/v2/users/u{u}/context"));
                let ids = c["events"]
                    .as_array()
                    .map(|e| e.iter().map(|e| e["id"].as_str().unwrap().into()).collect())
                    .unwrap_or_default();
                (format!("u{u}"), (c["version"].as_u64().unwrap_or(0), ids))
            })
            .collect()
    };
    let newest = |u: usize| format!("e{}", records - users + u);
    let before = s.wait_for(60, "every record applied", |s| {
        let all = served(s);
        (0..users)
            .all(|u| all[&format!("u{u}")].1.first() == Some(&newest(u)))
            .then_some(all)
    });
    let direct = s.metric("contextd_direct_commits_total");
    assert!(direct > 0.0, "no batch was written direct");
    s.kill9();
    let mut s = Server::start(&data, &args);
    assert_eq!(served(&s), before, "served the same after a kill -9");
    assert_eq!(s.stop(), Some(0));
    let c = contextd::config::Config {
        data_dir: data.clone(),
        ..Default::default()
    };
    let log = contextd::app::open_embedded(&c).unwrap();
    let mut last: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    for (p, end) in log.end_offsets(&c.topics.snapshots).into_iter().enumerate() {
        for r in log
            .read(&c.topics.snapshots, p as i32, 0, end as usize)
            .unwrap()
        {
            let snap = ContextSnapshot::decode(&r.value[..]).unwrap();
            let ids = snap.events.iter().map(|e| e.id.clone()).collect();
            last.insert(snap.user_id.clone(), (snap.version, ids));
        }
    }
    assert_eq!(
        last, before,
        "the last snapshot published is what is served"
    );
}

/// A stage that keeps up (batches far under `pipeline.batch_records`)
/// writes a commit whose snapshots take 1 MiB or more past the page cache,
/// and a small one through it (BENCHMARKS.md, item 86): the direct commits
/// are counted for the large burst only, and every snapshot is served.
/// (The data dir is in the target dir: a tmpfs `/tmp` may refuse direct I/O.)
#[test]
fn a_stage_that_keeps_up_writes_only_its_large_commits_direct() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("d");
    let cfg = dir.path().join("contextd.toml");
    std::fs::write(
        &cfg,
        "[pipeline]\nbatch_records = 100000\nlinger_ms = 200\n",
    )
    .unwrap();
    let mut s = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    s.set_visibility(&all_visible(&[("zendesk", "article_viewed")], &[]));
    let direct_commits = |s: &Server| s.metric("contextd_direct_commits_total");
    let event = |i: usize, user: &str| {
        json!({"id": format!("e{i}"), "user_id": user, "type": "article_viewed",
               "created_at": ts(i as u64), "properties": {"pad": "x".repeat(2000)}})
        .to_string()
    };
    // Small commits: one event at a time, each waited for.
    for i in 0..3 {
        post_zendesk_events(&s, &[event(i, "small")]);
        wait_events(&s, "small", i + 1);
    }
    assert_eq!(direct_commits(&s), 0.0, "a small commit was written direct");
    // A burst of 40 users' full contexts: 40 snapshots of 50 events of
    // about 2 KB, some 4 MB in a batch or two of 2,000 records.
    let users = 40;
    let body: Vec<String> = (0..2000)
        .map(|i| event(1000 + i, &format!("u{}", i % users)))
        .collect();
    post_zendesk_events(&s, &body);
    s.wait_for(60, "every user's newest event served", |s| {
        (0..users)
            .all(|u| {
                let (_, c) = s.get(&format!("/api/v2/users/u{u}/context"));
                c["events"][0]["id"] == json!(format!("e{}", 1000 + 2000 - users + u))
                    && c["events"].as_array().map(Vec::len) == Some(50)
            })
            .then_some(())
    });
    assert!(
        direct_commits(&s) > 0.0,
        "no large commit was written direct"
    );
    assert_eq!(s.stop(), Some(0));
}

/// `snapshot.max_bytes`: a context larger than it leaves out its oldest
/// events, in either snapshot format (measured in that format), and the
/// timeline keeps them all.
#[test]
fn a_context_over_max_bytes_leaves_out_its_oldest_events() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[snapshot]\nmax_bytes = 20000\n").unwrap();
    for format in ["protobuf", "json"] {
        let s = Server::start(
            &dir.path().join(format),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--snapshot-format",
                format,
            ],
        );
        s.set_visibility(&json!({"zendesk_events": true,
            "shown_event_types": [{"source": "zendesk", "type": "article_viewed"}]}));
        let user = "big-user";
        // 4 kB of properties each: four fit in 20,000 bytes, not five.
        let body: Vec<String> = (0..12)
            .map(|i| {
                json!({"id": format!("e{i:02}"), "user_id": user, "type": "article_viewed",
                    "created_at": ts(i), "properties": {"text": "y".repeat(4000)}})
                .to_string()
            })
            .collect();
        post_zendesk_events(&s, &body);
        wait_events(&s, user, 12);
        let (_, ctx) = s.get(&format!("/api/v2/users/{user}/context"));
        let ids: Vec<&str> = ctx["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["e11", "e10", "e09", "e08"], "{format}");
        assert!(serde_json::to_vec(&ctx).unwrap().len() <= 20_000);
        assert!(
            s.metric("contextd_snapshots_cut_total") > 0.0,
            "{format}: cut snapshots counted"
        );
    }
}
