//! `contextd produce`: NDJSON records from a file or stdin to a topic, over
//! the HTTP API (`--http-addr`) or straight to Kafka (`--brokers`).
//!
//! Lines are passed on as bytes: a line that is not UTF-8 or not JSON is
//! appended like any other and dead-lettered by the pipeline (`invalid_json`),
//! as `POST /api/v1/topics/{topic}/records` does with it. Straight to Kafka,
//! each record is keyed as the HTTP API keys it (`ingest::input_key`):
//! settings `visibility`, other records by user id or highest-priority
//! identifier, so one customer's records share a partition and stay in
//! order. Straight to Kafka, contextd's topics are created first if missing
//! (as `contextd run` creates them).

use anyhow::{bail, Context, Result};
use contextd::config::Config;
use contextd::ingest;
use contextd::log::OutRecord;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

const CHUNK: usize = 5000;

/// Where `produce` sends: Kafka if brokers are configured, unless
/// `--http-addr` was given on the command line (flags beat the environment
/// and the config file; both flags at once are refused by clap).
pub fn produce(
    config: Config,
    topic: &str,
    file: Option<&Path>,
    http_flag_given: bool,
) -> Result<()> {
    let input: Box<dyn Read> = match file {
        Some(f) => Box::new(
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?,
        ),
        None => Box::new(std::io::stdin()),
    };
    let lines = ndjson_lines(input);
    match &config.brokers {
        Some(brokers) if !http_flag_given => to_kafka(&config, brokers, topic, lines),
        _ => to_http(&config.http_addr, topic, lines),
    }
}

/// The non-blank lines of an NDJSON stream (a trailing `\r` dropped), as bytes.
fn ndjson_lines(input: impl Read) -> impl Iterator<Item = Result<Vec<u8>>> {
    BufReader::new(input)
        .split(b'\n')
        .map(|l| {
            let mut l = l.context("cannot read the input")?;
            if l.last() == Some(&b'\r') {
                l.pop();
            }
            Ok(l)
        })
        .filter(|l| {
            l.as_ref()
                .map_or(true, |l| l.iter().any(|b| !b.is_ascii_whitespace()))
        })
}

fn post(addr: &str, topic: &str, lines: &[Vec<u8>]) -> Result<()> {
    let url = format!("http://{addr}/api/v1/topics/{topic}/records");
    let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        body.extend_from_slice(l);
        body.push(b'\n');
    }
    match ureq::post(&url)
        .set("Content-Type", "application/x-ndjson")
        .send_bytes(&body)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            bail!("{url} answered {code}: {text}")
        }
        Err(e) => bail!("cannot reach contextd at {addr} ({e}); is it running? pass --http-addr"),
    }
}

/// Hands `items` to `send` in chunks of `CHUNK`; returns how many.
fn in_chunks<T>(
    items: impl Iterator<Item = Result<T>>,
    mut send: impl FnMut(&[T]) -> Result<()>,
) -> Result<usize> {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut total = 0;
    for item in items {
        chunk.push(item?);
        if chunk.len() == CHUNK {
            send(&chunk)?;
            total += chunk.len();
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        send(&chunk)?;
        total += chunk.len();
    }
    Ok(total)
}

fn to_http(addr: &str, topic: &str, lines: impl Iterator<Item = Result<Vec<u8>>>) -> Result<()> {
    let total = in_chunks(lines, |chunk| post(addr, topic, chunk))?;
    println!("appended {total} records to {topic} via http://{addr}");
    Ok(())
}

fn to_kafka(
    config: &Config,
    brokers: &str,
    topic: &str,
    lines: impl Iterator<Item = Result<Vec<u8>>>,
) -> Result<()> {
    // Only contextd's inputs, as `POST /api/v1/topics/{topic}/records`
    // takes them: an unknown name would wait for a topic that never comes,
    // and an output topic's readers trust what contextd writes there.
    let kind = config
        .topics
        .input_kind(topic)
        .map_err(anyhow::Error::msg)?;
    // contextd's topics exist before anything is written to them, as `run`
    // creates them: partitioned and compacted as configured, not as the
    // broker would auto-create them. A deployment's existing topic is
    // appended to as it is, whatever `--partitions` says.
    let exists = contextd::log::kafka::topic_exists(config, topic)
        .with_context(|| format!("cannot read the topics of {brokers}"))?;
    if !exists {
        contextd::log::kafka::ensure_topics(config)
            .with_context(|| format!("cannot create contextd's topics on {brokers}"))?;
    }
    let producer = contextd::log::kafka::KafkaProducer::new(config)
        .with_context(|| format!("cannot connect to {brokers}"))?;
    let limits = contextd::app::limits(config);
    // A line the topic cannot take (over the producer's message size, less
    // room for key and headers) would fail the whole file: it is left out,
    // the others are appended, and the lines left out are named at the end.
    let fits = config
        .kafka
        .max_message_bytes()
        .saturating_sub(contextd::config::KAFKA_MESSAGE_ROOM);
    let mut too_large: Vec<usize> = Vec::new();
    let mut number = 0usize;
    let records = lines.filter_map(|line| {
        number += 1;
        match line {
            Ok(value) if value.len() > fits => {
                too_large.push(number);
                None
            }
            other => Some(other),
        }
    });
    let records = records.map(|line| {
        let value = line?;
        Ok(OutRecord {
            topic: topic.to_string(),
            partition: None,
            key: ingest::input_key(kind, &value, limits),
            value: value.into(),
            timestamp_ms: contextd::model::time::now_ms(),
        })
    });
    let total = in_chunks(records, |chunk| {
        producer
            .send_all_blocking(chunk)
            .with_context(|| format!("producing to {topic} on {brokers} failed"))
    })?;
    println!("appended {total} records to {topic} on {brokers}");
    if !too_large.is_empty() {
        let shown: Vec<String> = too_large.iter().take(20).map(|n| n.to_string()).collect();
        bail!(
            "{} record(s) over the {fits}-byte message limit were not appended (non-blank lines {}{} of the input)",
            too_large.len(),
            shown.join(", "),
            if too_large.len() > shown.len() { ", ..." } else { "" }
        );
    }
    Ok(())
}
