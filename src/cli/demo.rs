//! `contextd demo`: a generated workload through the embedded pipeline, a
//! summary of what happened and one customer's context card.

use anyhow::{Context, Result};
use contextd::app::EmbeddedRuntime;
use contextd::config::Config;
use contextd::ingest::SETTINGS_KEY;
use contextd::log::OutRecord;
use contextd::model::{json, time, ContextSnapshot};
use contextd::pipeline::embedded::lag;
use contextd::telemetry;
use contextd::workload::Workload;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::time::{Duration, Instant};

pub fn demo(
    mut config: Config,
    dir_given: bool,
    serve: bool,
    users: usize,
    records: usize,
    seed: u64,
) -> Result<()> {
    telemetry::metrics();
    if let Some(brokers) = config.brokers.take() {
        tracing::warn!(%brokers, "the demo runs embedded mode; the brokers are not used");
    }
    let temp = !dir_given;
    if temp {
        config.data_dir =
            std::env::temp_dir().join(format!("contextd-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&config.data_dir);
    }
    let topics = config.topics.clone();
    println!(
        "contextd demo: {records} records for {users} users, embedded mode, data in {}",
        config.data_dir.display()
    );
    let rt = EmbeddedRuntime::start(config.clone())?;
    let now = time::now_ms();
    rt.log.append(&[OutRecord {
        topic: topics.settings.clone(),
        partition: None,
        key: Some(SETTINGS_KEY.to_vec()),
        value: Workload::visibility().to_string().into_bytes().into(),
        timestamp_ms: now,
    }])?;
    let pb = ProgressBar::new(records as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {human_pos}/{human_len} {per_sec}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message("records");
    let started = Instant::now();
    let mut w = Workload::new(seed, users, 1.0);
    let mut by_topic = std::collections::BTreeMap::new();
    let mut produced = 0;
    while produced < records {
        let n = (records - produced).min(5000);
        let chunk: Vec<OutRecord> = (0..n)
            .map(|_| {
                let g = w.next(&topics);
                *by_topic.entry(g.topic.clone()).or_insert(0usize) += 1;
                OutRecord {
                    topic: g.topic,
                    partition: None,
                    key: g.key,
                    value: g.value.into(),
                    timestamp_ms: time::now_ms(),
                }
            })
            .collect();
        rt.log.append(&chunk)?;
        produced += n;
        let (route, mat) = lag(&rt.log, &topics)?;
        pb.set_position((produced as i64 - route - mat).max(0) as u64);
    }
    loop {
        let (route, mat) = lag(&rt.log, &topics)?;
        pb.set_position((records as i64 + 1 - route - mat).clamp(0, records as i64) as u64);
        if route == 0 && mat == 0 {
            break;
        }
        if !rt.healthy() {
            anyhow::bail!("the pipeline stopped; see the log above");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let snapshots: i64 = rt.log.end_offsets(&topics.snapshots).iter().sum();
    let dead: i64 = rt.log.end_offsets(&topics.dlq).iter().sum();
    println!("processed {records} records in {secs:.2}s: {:.0} records/s end to end (append -> snapshot)", records as f64 / secs);
    for (t, n) in &by_topic {
        println!("  {t:<20} {n}");
    }
    println!("  {snapshots} context snapshots published (coalesced: one per user per batch), {dead} records dead-lettered");
    let user = Workload::zendesk_id(0);
    let p = contextd::state::keys::partition_for(user.as_bytes(), config.partitions);
    let snap = rt
        .app
        .store
        .context(
            p,
            &user,
            config.snapshot.max_events,
            contextd::snapshot::SizeLimit::of(&config),
        )?
        .map(|s| contextd::snapshot::decode(&s))
        .context("the demo user has no snapshot")?;
    println!();
    print_card(&snap);
    if serve {
        println!(
            "\nconsole and API: http://{}/  (Ctrl-C to stop)",
            config.http_addr
        );
        let rtm = super::runtime()?;
        let listener = super::listen(&config.http_addr)?;
        rtm.block_on(super::serve(rt.app.clone(), listener))?;
    }
    rt.shutdown()?;
    if temp && !serve {
        let _ = std::fs::remove_dir_all(&config.data_dir);
    }
    Ok(())
}

/// A one-line summary of an event, as an agent would read it.
pub fn summarize(source: &str, ty: &str, description: &str, props: &Value) -> String {
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let article = || {
        let a = &props["article"]["display_name"];
        if a.is_null() {
            s(&props["article_id"])
        } else {
            s(a)
        }
    };
    match (source, ty) {
        ("zendesk", "article_viewed") => format!("Viewed article: {}", article()),
        ("zendesk", "help_center_searched") => {
            format!("Searched help center: '{}'", s(&props["search_query"]))
        }
        ("zendesk", t) if t.contains("clicked") => format!("Clicked article: {}", article()),
        ("zendesk", "answers_suggested") => "Answer Bot suggested articles".to_string(),
        ("zendesk", "page_view") => format!("Viewed page: {}", s(&props["title"])),
        _ if !description.is_empty() => format!("{description} ({source})"),
        _ => format!("{ty} ({source})"),
    }
}

fn print_card(s: &ContextSnapshot) {
    let line = "─".repeat(72);
    println!("┌{line}");
    println!(
        "│ Customer context: user {}  (snapshot v{}, updated {})",
        s.user_id,
        s.version,
        time::format_rfc3339(time::from_timestamp(&s.updated_at))
    );
    println!("├{line}");
    for p in &s.profiles {
        let ids: Vec<String> = p
            .identifiers
            .iter()
            .map(|i| format!("{}:{}", i.r#type, i.value))
            .collect();
        println!(
            "│ {}/{}  {}  [{}]",
            p.source,
            p.r#type,
            p.name.as_deref().unwrap_or("-"),
            ids.join(", ")
        );
        if let Value::Object(attrs) = json::from_struct(&p.attributes) {
            let shown: Vec<String> = attrs
                .iter()
                .filter(|(k, _)| *k != "notes")
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    )
                })
                .collect();
            if !shown.is_empty() {
                println!("│     {}", shown.join("  "));
            }
        }
    }
    println!("├{line}");
    println!(
        "│ Recent activity (newest first, {} shown)",
        s.events.len().min(10)
    );
    for e in s.events.iter().take(10) {
        let props = json::from_struct(&e.properties);
        println!(
            "│   {}  {}",
            time::format_rfc3339(time::from_timestamp(&e.created_at)),
            summarize(&e.source, &e.r#type, &e.description, &props)
        );
    }
    println!("└{line}");
}
