//! The tiered KV store of a node.
//!
//! Wave attention keeps the exact keys and values of every indexed token in cluster order outside
//! the attention kernels' working set. This crate holds them: pages of `page_tokens` key and value
//! vectors per (sequence, layer, KV head) in a host arena while it fits, spilled to files on local
//! disks (io_uring with O_DIRECT, or pread/pwrite where io_uring is not available) when it does
//! not, with prefetch, per-page checksums and metrics. One [`TieredStore`] serves every worker of a
//! node; it is `Send + Sync` and cheap to clone.
//!
//! The wave-buffer cache policy ([`policy`]) is pure: given the clusters a decode step selected it
//! returns hits, misses, admissions and evictions as values; backends execute them.

pub mod arena;
pub mod config;
pub mod disk;
mod error;
pub mod io;
pub mod layout;
pub mod metrics;
pub mod policy;
pub mod ranges;
mod store;

pub use arena::{ARENA_UNIT, HostArena, HostMemory, MmapAllocator, PageAllocator};
pub use config::StoreConfig;
pub use error::StoreError;
pub use io::{IoChoice, IoPath};
pub use layout::PageLayout;
pub use policy::Tier;
pub use store::{
    ClusterRef, HeadRef, PinnedRecords, RecordSpan, SeqId, StoreStats, Ticket, TieredStore,
};
