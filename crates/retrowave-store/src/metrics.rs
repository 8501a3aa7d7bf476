//! Metrics of the store, through the `metrics` facade (exported by whatever recorder the process
//! installs, e.g. the server's Prometheus exporter).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `retrowave_store_bytes` | gauge | `tier` = host, disk |
//! | `retrowave_store_pages` | gauge | `tier` |
//! | `retrowave_store_cluster_reads_total` | counter | `tier` (where the cluster was when asked for) |
//! | `retrowave_store_host_hit_ratio` | gauge | |
//! | `retrowave_store_spilled_records_total` | counter | |
//! | `retrowave_store_prefetch_requests_total` | counter | |
//! | `retrowave_store_disk_read_seconds` | histogram | (one sample per batch of reads) |
//! | `retrowave_store_io_queue_depth` | gauge | (operations in the last batch) |
//! | `retrowave_store_checksum_failures_total` | counter | |
//! | `retrowave_store_io_errors_total` | counter | |
//! | `retrowave_store_io_path` | gauge | `path` = io_uring, pread (1 for the active one) |
//! | `retrowave_store_io_ops_total` | counter | `op` = read, write; `path` |
//! | `retrowave_store_io_bytes_total` | counter | `op`, `path` |

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use std::time::Duration;

/// Registers descriptions of every metric (call once, after installing a recorder).
pub fn describe() {
    describe_gauge!("retrowave_store_bytes", "Bytes of KV records per tier");
    describe_gauge!("retrowave_store_pages", "KV pages per tier");
    describe_counter!(
        "retrowave_store_cluster_reads_total",
        "Clusters handed out, by the tier they were in"
    );
    describe_gauge!(
        "retrowave_store_host_hit_ratio",
        "Share of cluster reads served from host memory"
    );
    describe_counter!(
        "retrowave_store_spilled_records_total",
        "Cluster records written to the disk tier"
    );
    describe_counter!(
        "retrowave_store_prefetch_requests_total",
        "Clusters named by prefetch requests"
    );
    describe_histogram!(
        "retrowave_store_disk_read_seconds",
        metrics::Unit::Seconds,
        "Latency of a batch of disk reads"
    );
    describe_gauge!(
        "retrowave_store_io_queue_depth",
        "Operations submitted in the last disk batch"
    );
    describe_counter!(
        "retrowave_store_checksum_failures_total",
        "Disk pages whose checksum did not match"
    );
    describe_counter!(
        "retrowave_store_io_errors_total",
        "Failed disk reads or writes"
    );
    describe_gauge!(
        "retrowave_store_io_path",
        "The disk tier's I/O path (1 = active)"
    );
    describe_counter!(
        "retrowave_store_io_ops_total",
        "Disk reads and writes completed, by operation and I/O path"
    );
    describe_counter!(
        "retrowave_store_io_bytes_total",
        metrics::Unit::Bytes,
        "Bytes read from and written to the disk tier, by operation and I/O path"
    );
}

pub(crate) fn disk_read_batch(elapsed: Duration, ops: usize) {
    histogram!("retrowave_store_disk_read_seconds").record(elapsed.as_secs_f64());
    gauge!("retrowave_store_io_queue_depth").set(ops as f64);
}

pub(crate) fn checksum_failure() {
    counter!("retrowave_store_checksum_failures_total").increment(1);
}

pub(crate) fn io_error() {
    counter!("retrowave_store_io_errors_total").increment(1);
}

pub(crate) fn io_path(path: crate::io::IoPath) {
    for p in [crate::io::IoPath::Uring, crate::io::IoPath::Pread] {
        gauge!("retrowave_store_io_path", "path" => p.to_string()).set(if p == path {
            1.0
        } else {
            0.0
        });
    }
}

pub(crate) fn tiers(host_bytes: u64, host_pages: u64, disk_bytes: u64, disk_pages: u64) {
    gauge!("retrowave_store_bytes", "tier" => "host").set(host_bytes as f64);
    gauge!("retrowave_store_pages", "tier" => "host").set(host_pages as f64);
    gauge!("retrowave_store_bytes", "tier" => "disk").set(disk_bytes as f64);
    gauge!("retrowave_store_pages", "tier" => "disk").set(disk_pages as f64);
}

pub(crate) fn cluster_reads(host: u64, disk: u64, total_host: u64, total_disk: u64) {
    if host > 0 {
        counter!("retrowave_store_cluster_reads_total", "tier" => "host").increment(host);
    }
    if disk > 0 {
        counter!("retrowave_store_cluster_reads_total", "tier" => "disk").increment(disk);
    }
    let all = total_host + total_disk;
    if all > 0 {
        gauge!("retrowave_store_host_hit_ratio").set(total_host as f64 / all as f64);
    }
}

pub(crate) fn spilled(records: u64) {
    counter!("retrowave_store_spilled_records_total").increment(records);
}

pub(crate) fn prefetch_requests(n: u64) {
    counter!("retrowave_store_prefetch_requests_total").increment(n);
}
