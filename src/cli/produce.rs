//! `contextd produce`: NDJSON records from a file or stdin to a topic, over
//! the HTTP API (`--http-addr`) or straight to Kafka (`--brokers`).

use anyhow::{bail, Context, Result};
use contextd::config::Config;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

const CHUNK: usize = 5000;

fn post(addr: &str, topic: &str, lines: &[String]) -> Result<()> {
    let url = format!("http://{addr}/api/v1/topics/{topic}/records");
    let body = lines.join("\n") + "\n";
    match ureq::post(&url)
        .set("Content-Type", "application/x-ndjson")
        .send_string(&body)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            bail!("{url} answered {code}: {text}")
        }
        Err(e) => bail!("cannot reach contextd at {addr} ({e}); is it running? pass --http-addr"),
    }
}

pub fn produce(config: Config, topic: &str, file: Option<&Path>) -> Result<()> {
    let input: Box<dyn Read> = match file {
        Some(f) => Box::new(
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?,
        ),
        None => Box::new(std::io::stdin()),
    };
    if let Some(brokers) = &config.brokers {
        return super::kafka_produce(&config, brokers, topic, input);
    }
    let mut lines = Vec::with_capacity(CHUNK);
    let mut total = 0usize;
    for line in BufReader::new(input).lines() {
        let line = line.context("cannot read the input")?;
        if line.trim().is_empty() {
            continue;
        }
        lines.push(line);
        if lines.len() == CHUNK {
            post(&config.http_addr, topic, &lines)?;
            total += lines.len();
            lines.clear();
        }
    }
    if !lines.is_empty() {
        post(&config.http_addr, topic, &lines)?;
        total += lines.len();
    }
    println!(
        "appended {total} records to {topic} via http://{}",
        config.http_addr
    );
    Ok(())
}
