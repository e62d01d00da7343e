//! State: the pure fold (`apply`), key encoding (`keys`), the RocksDB store
//! (`store`) and the digest over its logical content (`digest`).

pub mod apply;
pub mod cache;
pub mod digest;
pub mod keys;
pub mod store;

pub use store::{Store, StoreError, StoreOptions};
