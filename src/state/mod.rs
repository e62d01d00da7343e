//! State: the pure fold (`apply`), key encoding (`keys`), the RocksDB store
//! (`store`) and the digest over its logical content (`digest`).

pub mod apply;
pub mod cache;
pub mod digest;
pub mod keys;
pub mod store;

pub use store::{RebuildMark, Store, StoreError, StoreOptions};

/// The maps of the hot path (a batch's users, the user cache, a batch's
/// event properties): std's map with foldhash instead of SipHash, which
/// was 4-5% of a replay's samples. foldhash is seeded at random per
/// process, as std's hasher is.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
