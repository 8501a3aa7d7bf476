//! `retrowave bench store`: the tiered KV store's two hot paths against their anchors.
//!
//! - Disk tier: random reads of cluster-sized records through the store's disk tier (io_uring and
//!   the pread fallback, checksums verified), against `fio --ioengine=io_uring --direct=1` on the
//!   same file with the same block size and queue depth, measured in the same run.
//! - Host tier: gathers of random clusters from the host arena into a contiguous buffer, against
//!   this machine's single-thread memcpy bandwidth.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use retrowave_store::disk::{DiskLoc, DiskTier, ReadItem, WriteItem};
use retrowave_store::io::{IoChoice, IoOptions};
use retrowave_store::{HeadRef, SeqId, StoreConfig, TieredStore};
use serde_json::json;

use crate::bench::{commit, cpu_device};
use crate::eval::tasks::Rng;

/// Parameters of the store benchmark.
pub struct StoreBench {
    /// Directory for the disk tier's file.
    pub dir: PathBuf,
    /// Bytes of records on disk.
    pub file_bytes: u64,
    /// Tokens per cluster record.
    pub cluster_tokens: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// I/O queue depth (ours and fio's).
    pub queue_depth: u32,
    /// Seconds per disk measurement.
    pub seconds: f64,
    /// Bytes of records in the host arena for the gather test.
    pub host_bytes: u64,
    /// Clusters per gather call.
    pub gather_clusters: usize,
    /// JSON-lines output.
    pub out: PathBuf,
}

/// Single-thread memcpy bandwidth in GB/s (bytes copied per second), best of 5 passes over
/// 256 MiB.
pub fn memcpy_bandwidth() -> f64 {
    let n = 256usize << 20;
    let src: Vec<u8> = (0..n).map(|i| i as u8).collect();
    let mut dst = vec![0u8; n];
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

struct DiskResult {
    mb_s: f64,
    iops: f64,
    ops: u64,
}

fn disk_reads(
    tier: &DiskTier,
    locs: &[DiskLoc],
    page_bytes: usize,
    batch: usize,
    seconds: f64,
) -> Result<DiskResult> {
    let rec = locs[0].bytes as usize;
    let mut dst = vec![0u8; rec * batch];
    let mut x = Rng::new(0x9E37_79B9_7F4A_7C15);
    let (mut ops, mut bytes) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < seconds {
        let picks: Vec<usize> = (0..batch)
            .map(|_| x.below(locs.len() as u64) as usize)
            .collect();
        let items: Vec<ReadItem<'_>> = picks
            .iter()
            .enumerate()
            .map(|(k, &i)| ReadItem {
                loc: &locs[i],
                // SAFETY: `dst` has `batch` record-sized slots, one per item.
                dst: unsafe { dst.as_mut_ptr().add(k * rec) },
                page_bytes,
                what: format!("record {i}"),
            })
            .collect();
        for r in tier.read(&items) {
            r.context("benchmark read")?;
        }
        ops += batch as u64;
        bytes += (batch * rec) as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(DiskResult {
        mb_s: bytes as f64 / secs / 1e6,
        iops: ops as f64 / secs,
        ops,
    })
}

fn fill_tier(tier: &DiskTier, n: usize, rec: usize, page_bytes: usize) -> Result<Vec<DiskLoc>> {
    let bar = indicatif::ProgressBar::new(n as u64).with_message("writing records");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut locs = Vec::with_capacity(n);
    let mut x = Rng::new(1);
    let recs: Vec<Vec<u8>> = (0..256)
        .map(|_| (0..rec).map(|_| x.next_u64() as u8).collect())
        .collect();
    let mut done = 0;
    while done < n {
        let k = 512.min(n - done);
        let items: Vec<WriteItem<'_>> = (0..k)
            .map(|i| WriteItem {
                record: &recs[(done + i) % recs.len()],
                page_bytes,
            })
            .collect();
        for r in tier.write(&items) {
            locs.push(r.context("writing benchmark records")?);
        }
        done += k;
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    Ok(locs)
}

/// fio's random-read throughput on `file` (MB/s, IOPS), or why it could not run.
fn fio(file: &Path, engine: &str, bs: usize, qd: u32, seconds: f64) -> Result<(f64, f64)> {
    let size = std::fs::metadata(file)?.len();
    let out = std::process::Command::new("fio")
        .args([
            "--name=anchor",
            &format!("--filename={}", file.display()),
            &format!("--ioengine={engine}"),
            "--direct=1",
            "--rw=randread",
            &format!("--bs={bs}"),
            &format!("--iodepth={qd}"),
            &format!("--size={size}"),
            &format!("--runtime={}", seconds.ceil() as u64),
            "--time_based",
            "--readonly",
            "--norandommap",
            "--output-format=json",
        ])
        .output()
        .context("running fio (install the Debian package `fio`)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing fio's JSON")?;
    let read = &v["jobs"][0]["read"];
    let bw = read["bw_bytes"]
        .as_f64()
        .context("fio output without read.bw_bytes")?;
    let iops = read["iops"].as_f64().unwrap_or(0.0);
    Ok((bw / 1e6, iops))
}

/// Runs the benchmark and appends records to `cfg.out`.
pub fn run(cfg: StoreBench) -> Result<()> {
    let device = cpu_device();
    let commit = commit();
    let ts = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let layout = retrowave_store::PageLayout::half(cfg.head_dim, 8);
    let rec = layout.record_bytes(cfg.cluster_tokens);
    let page_bytes = layout.page_bytes();
    if !rec.is_multiple_of(retrowave_store::io::IO_ALIGN) {
        bail!(
            "a cluster record of {} tokens x {} dims is {rec} bytes; pick sizes that make it a multiple of 4096 so fio reads the same blocks",
            cfg.cluster_tokens,
            cfg.head_dim
        );
    }
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    let n = (cfg.file_bytes / rec as u64).max(1) as usize;
    let mut records = Vec::new();
    let base = json!({
        "bench": "store", "record_bytes": rec, "head_dim": cfg.head_dim,
        "cluster_tokens": cfg.cluster_tokens, "queue_depth": cfg.queue_depth,
        "file_bytes": n * rec, "dir": cfg.dir.display().to_string(), "device": device,
        "commit": commit, "timestamp": ts,
    });
    let with = |extra: serde_json::Value| {
        let mut v = base.clone();
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };

    // Disk tier: each path writes its own file, then reads random records from it.
    let paths: &[IoChoice] = if cfg.file_bytes == 0 {
        &[]
    } else {
        &[IoChoice::Uring, IoChoice::Pread]
    };
    for &choice in paths {
        let io = IoOptions {
            choice,
            queue_depth: cfg.queue_depth,
            direct: true,
        };
        let tier = match DiskTier::open(
            std::slice::from_ref(&cfg.dir),
            None,
            &io,
            rec * cfg.queue_depth as usize * 64,
        ) {
            Ok(t) => t,
            Err(e) if choice == IoChoice::Uring => {
                eprintln!("io_uring is not available here: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let path = tier.io_path();
        eprintln!("{path}: writing {n} records of {rec} bytes...");
        let locs = fill_tier(&tier, n, rec, page_bytes)?;
        let batch = cfg.queue_depth as usize * 64;
        let file = tier.dirs().next().map(|d| d.join("pages.kv"));
        // Warm-up, then the measurement. For io_uring, fio runs before and after ours on the
        // same file (the disk's speed drifts; the anchor is the mean of the two).
        disk_reads(&tier, &locs, page_bytes, batch, 0.5)?;
        let mut fio_runs = Vec::new();
        let anchor = |fio_runs: &mut Vec<(f64, f64)>| {
            if let (IoChoice::Uring, Some(file)) = (choice, &file) {
                match fio(file, "io_uring", rec, cfg.queue_depth, cfg.seconds) {
                    Ok(r) => {
                        eprintln!(
                            "fio io_uring (qd {}): {:.0} MB/s, {:.0} IOPS",
                            cfg.queue_depth, r.0, r.1
                        );
                        fio_runs.push(r);
                    }
                    Err(e) => eprintln!("fio io_uring: {e:#}"),
                }
            }
        };
        anchor(&mut fio_runs);
        let r = disk_reads(&tier, &locs, page_bytes, batch, cfg.seconds)?;
        anchor(&mut fio_runs);
        eprintln!(
            "{path}: {:.0} MB/s, {:.0} IOPS ({} reads, checksums verified)",
            r.mb_s, r.iops, r.ops
        );
        let mut rec_ours = with(json!({
            "metric": "disk_random_read", "io_path": path.to_string(), "value": r.mb_s,
            "unit": "MB/s", "iops": r.iops, "seconds": cfg.seconds,
        }));
        if !fio_runs.is_empty() {
            let n = fio_runs.len() as f64;
            let mb = fio_runs.iter().map(|r| r.0).sum::<f64>() / n;
            let iops = fio_runs.iter().map(|r| r.1).sum::<f64>() / n;
            eprintln!(
                "io_uring path: {:.0}% of fio (mean of {} fio runs)",
                r.mb_s / mb * 100.0,
                fio_runs.len()
            );
            rec_ours["fraction_of_fio"] = json!(r.mb_s / mb);
            records.push(with(json!({
                "metric": "disk_random_read", "io_path": "fio-io_uring", "value": mb,
                "unit": "MB/s", "iops": iops, "seconds": cfg.seconds,
                "runs_mb_s": fio_runs.iter().map(|r| r.0).collect::<Vec<_>>(),
            })));
        }
        records.push(rec_ours);
        if choice == IoChoice::Pread
            && let Some(file) = &file
        {
            match fio(file, "psync", rec, 1, cfg.seconds) {
                Ok((mb, iops)) => {
                    eprintln!("fio psync (qd 1): {mb:.0} MB/s, {iops:.0} IOPS");
                    let mut v = with(json!({
                        "metric": "disk_random_read", "io_path": "fio-psync", "value": mb,
                        "unit": "MB/s", "iops": iops, "seconds": cfg.seconds,
                    }));
                    v["queue_depth"] = json!(1);
                    records.push(v);
                }
                Err(e) => eprintln!("fio psync: {e:#}"),
            }
        }
    }

    // Host tier: gathers from the arena.
    let memcpy = memcpy_bandwidth();
    eprintln!("memcpy bandwidth (1 thread): {memcpy:.1} GB/s");
    let store = TieredStore::new(StoreConfig {
        host_capacity_bytes: cfg.host_bytes + (64 << 20),
        ..StoreConfig::default()
    })?;
    let per_head = 4096usize;
    let heads = (cfg.host_bytes as usize / rec / per_head).max(1);
    let vb = layout.vector_bytes();
    let mut x = Rng::new(7);
    let kv: Vec<u8> = (0..per_head * cfg.cluster_tokens as usize * vb)
        .map(|_| x.next_u64() as u8)
        .collect();
    let sizes = vec![cfg.cluster_tokens; per_head];
    let hr = |h: usize| HeadRef {
        seq: SeqId(1),
        layer: (h / 8) as u32,
        kv_head: (h % 8) as u32,
    };
    for h in 0..heads {
        store.append(hr(h), cfg.head_dim, &kv, &kv, &sizes)?;
    }
    let huge = std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .unwrap_or_default();
    eprintln!("host arena: {huge} kB of anonymous memory in huge pages");
    // The destination is page-aligned, as a GPU backend's page-locked staging buffer is.
    let mut out = retrowave_store::io::AlignedBuf::zeroed(cfg.gather_clusters * rec);
    let mut measured = (0u64, 0u64, 1f64);
    let mut gather = |secs: f64| -> Result<(u64, u64, f64)> {
        let (mut bytes, mut calls) = (0u64, 0u64);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs_f64(secs) {
            let head = hr(x.below(heads as u64) as usize);
            let ids: Vec<u32> = (0..cfg.gather_clusters)
                .map(|_| x.below(per_head as u64) as u32)
                .collect();
            let spans = store.gather_into(head, &ids, &mut out)?;
            bytes += spans.iter().map(|s| s.bytes as u64).sum::<u64>();
            calls += 1;
        }
        Ok((bytes, calls, t.elapsed().as_secs_f64()))
    };
    // Warm-up, then the measurement.
    for pass in [1.0, cfg.seconds.min(3.0)] {
        let (b, c, secs) = gather(pass)?;
        eprintln!("gather pass: {:.1} GB/s", b as f64 / secs / 1e9);
        measured = (b, c, secs);
    }
    let (bytes, calls, secs) = measured;
    let gbs = bytes as f64 / secs / 1e9;
    eprintln!(
        "host gather: {gbs:.1} GB/s ({:.0}% of memcpy), {calls} gathers of {} clusters over {} MiB of records",
        gbs / memcpy * 100.0,
        cfg.gather_clusters,
        (heads * per_head * rec) >> 20
    );
    records.push(with(json!({
        "metric": "host_gather", "value": gbs, "unit": "GB/s", "memcpy_gb_s": memcpy,
        "fraction_of_memcpy": gbs / memcpy, "clusters_per_gather": cfg.gather_clusters,
        "host_record_bytes": heads * per_head * rec, "threads": 1,
        "anon_huge_pages_kb": huge.parse::<u64>().ok(),
    })));
    drop(store);

    crate::eval::run::append_records(&cfg.out, &records)?;
    eprintln!("records appended to {}", cfg.out.display());
    Ok(())
}
