//! Store configuration: page shape, host capacity, disk directories and the I/O path.

use crate::io::IoChoice;
use serde::Deserialize;
use std::path::PathBuf;

/// Configuration of a [`TieredStore`](crate::TieredStore). Every field has a default; in TOML,
/// unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Key and value vectors per page.
    pub page_tokens: u32,
    /// Bytes of host memory for pages. When they run out, the least recently used clusters spill
    /// to the disk tier (or, without one, writes fail with [`StoreError::HostFull`](crate::StoreError::HostFull)).
    pub host_capacity_bytes: u64,
    /// Directories of the disk tier, one file each; several directories on different disks are
    /// striped. Empty: no disk tier.
    pub dirs: Vec<PathBuf>,
    /// Limit of the bytes the store writes into each directory (`None`: until the disk is full).
    pub max_disk_bytes_per_dir: Option<u64>,
    /// io_uring, pread/pwrite, or io_uring when it works (the default).
    pub io: IoChoice,
    /// I/O operations kept in flight.
    pub queue_depth: u32,
    /// Open the disk files with O_DIRECT (bypassing the page cache) where the filesystem allows.
    pub direct: bool,
    /// Bytes of the staging buffers that disk transfers go through (registered with io_uring).
    pub staging_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            page_tokens: 8,
            host_capacity_bytes: 4 << 30,
            dirs: Vec::new(),
            max_disk_bytes_per_dir: None,
            io: IoChoice::Auto,
            queue_depth: 64,
            direct: true,
            staging_bytes: 8 << 20,
        }
    }
}

impl StoreConfig {
    /// Checks values that would make the store unusable.
    pub fn validate(&self) -> Result<(), String> {
        if self.page_tokens == 0 {
            return Err("store.page_tokens must be at least 1".into());
        }
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return Err(format!(
                "store.queue_depth must be in 1..=4096, got {}",
                self.queue_depth
            ));
        }
        if self.staging_bytes < crate::io::IO_ALIGN {
            return Err(format!(
                "store.staging_bytes must be at least {} bytes, got {}",
                crate::io::IO_ALIGN,
                self.staging_bytes
            ));
        }
        Ok(())
    }
}
