//! # contextd
//!
//! A Kafka-native, self-hostable engine for customer context: it ingests
//! Zendesk product events, custom events and custom profiles, resolves each
//! to a user, materializes every user's timeline and latest profiles in
//! RocksDB, and publishes a visibility-filtered context snapshot per user.
//!
//! ## Layout: a functional core inside an I/O shell
//!
//! ```text
//!  input topics ──► ingest ──► identity ──► records log ──► state::apply ──► state (RocksDB)
//!  (Kafka or        (pure:      (resolve     (re-keyed by    (pure fold)      timelines, profiles,
//!   embedded log)    JSON→proto  the user)    user_id)                         identities, catalog,
//!                    or DLQ)                                                   offsets: one WriteBatch)
//!                                                               │
//!                                   settings ──► snapshot (visibility, pure) ──► context.snapshots + HTTP
//! ```
//!
//! - Pure core: [`ingest`], [`identity`], [`state::apply`], [`snapshot`]; no
//!   I/O, no clock: time comes from log timestamps, so replays are deterministic.
//! - Shell: [`log`] (embedded topics as segment files, Kafka via rdkafka), [`state::store`],
//!   [`pipeline`] (the two stages, written once), [`api`] (axum), [`app`] (wiring),
//!   [`replay`] (rebuild), [`telemetry`], [`config`].
//! - Each stage commits its state change, the ends of the records it appended
//!   (embedded mode; the entries are in segment files) and the positions it
//!   consumed in one RocksDB `WriteBatch`.

pub mod api;
pub mod app;
pub mod config;
pub mod console;
pub mod identity;
pub mod ingest;
pub mod log;
pub mod model;
pub mod pipeline;
pub mod replay;
pub mod snapshot;
pub mod state;
pub mod telemetry;
pub mod workload;

/// This process's threads as (name, nice), from `/proc` (tests that check
/// what the process's threads are and how they run).
#[cfg(test)]
pub(crate) mod threads {
    /// (name, nice) from a `stat` file: the name in parentheses, the nice
    /// field 19 (the 17th after the name).
    fn name_nice(stat: &str) -> Option<(String, i64)> {
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_string();
        let nice = rest.split_whitespace().nth(16)?.parse().ok()?;
        Some((name, nice))
    }

    /// Every thread of the process.
    pub fn all() -> Vec<(String, i64)> {
        std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .filter_map(|st| name_nice(&st))
            .collect()
    }

    /// The calling thread.
    pub fn this() -> (String, i64) {
        name_nice(&std::fs::read_to_string("/proc/thread-self/stat").expect("own stat"))
            .expect("own stat")
    }
}
