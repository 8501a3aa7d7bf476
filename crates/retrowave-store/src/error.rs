//! Errors of the store.

use crate::io::IoError;
use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the tiered store. Cloneable: one failed read is reported to every caller waiting
/// for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A configuration value that cannot work.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// Host memory for the arena could not be allocated.
    #[error(transparent)]
    Arena(Arc<crate::arena::ArenaError>),
    /// A head of a sequence that the store does not hold (never appended, or its sequence ended).
    #[error("sequence {seq}, layer {layer}, KV head {kv_head} is not in the store")]
    UnknownHead {
        /// Sequence.
        seq: u64,
        /// Layer.
        layer: u32,
        /// KV head.
        kv_head: u32,
    },
    /// A cluster id past the clusters of its head.
    #[error(
        "cluster {cluster} of sequence {seq}, layer {layer}, KV head {kv_head} is not in the store ({stored} clusters stored)"
    )]
    UnknownCluster {
        /// Sequence.
        seq: u64,
        /// Layer.
        layer: u32,
        /// KV head.
        kv_head: u32,
        /// The cluster asked for.
        cluster: u32,
        /// Clusters the head has.
        stored: usize,
    },
    /// Buffers whose lengths do not match the cluster sizes or the head's layout.
    #[error("{0}")]
    Shape(String),
    /// Host memory is full and nothing can be spilled (no disk tier, or everything is in use).
    #[error(
        "the KV store's host memory is full: {needed} more bytes needed, {used} of {capacity} bytes in use{hint}"
    )]
    HostFull {
        /// Bytes asked for.
        needed: usize,
        /// Bytes in use.
        used: u64,
        /// Capacity.
        capacity: u64,
        /// What to do about it.
        hint: &'static str,
    },
    /// The disk tier (or its configured quota) is full. Nothing was half-written.
    #[error("the KV store's disk tier is full ({}): {reason}", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))]
    DiskFull {
        /// The tier's directories.
        dirs: Vec<PathBuf>,
        /// What the system said.
        reason: String,
    },
    /// No disk tier is configured.
    #[error("the KV store has no disk tier (set store.dirs)")]
    NoDiskTier,
    /// A directory of the disk tier cannot be used.
    #[error("cannot use {dir} for the KV store's disk tier: {reason}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// A disk read or write failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: Arc<IoError>,
    },
    /// A page read from disk does not match the checksum it was written with.
    #[error("checksum mismatch in page {page} of {what} at offset {offset} of {}: the disk returned different bytes than were written", file.display())]
    Checksum {
        /// The record.
        what: String,
        /// Page within the record.
        page: u32,
        /// The file.
        file: PathBuf,
        /// Byte offset of the page.
        offset: u64,
    },
    /// A bug: an invariant of the store did not hold.
    #[error("internal error of the KV store: {0}")]
    Internal(String),
}

impl StoreError {
    /// Wraps an I/O error, turning "no space" into [`StoreError::DiskFull`].
    pub fn io(context: impl Into<String>, e: IoError) -> StoreError {
        let context = context.into();
        if let IoError::NoSpace { path, .. } = &e {
            return StoreError::DiskFull {
                dirs: path.parent().map(|p| p.to_path_buf()).into_iter().collect(),
                reason: format!("{context}: {e}"),
            };
        }
        StoreError::Io {
            context,
            source: Arc::new(e),
        }
    }
}
