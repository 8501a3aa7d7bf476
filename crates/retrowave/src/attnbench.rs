//! `retrowave bench attention`: decode attention of one layer, full vs wave, on synthetic KV, with
//! the bytes each reads per step against the measured memory bandwidth of the machine.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use retrowave_core::{Backend, BatchLayout, HeadLayout, SeqRows, WaveConfig};
use retrowave_cpu::{CpuActs, CpuBackend, CpuKv};
use retrowave_store::TieredStore;
use serde_json::json;

use crate::bench::{commit, cpu_device};

/// Read bandwidth of host memory in GB/s: `threads` threads each summing their part of a 1 GiB
/// buffer, best of several passes.
pub fn memory_bandwidth(threads: usize) -> f64 {
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let threads = threads.max(1);
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let chunk = n.div_ceil(threads);
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut acc = [0f32; 16];
                        for c in part.chunks_exact(16) {
                            for l in 0..16 {
                                acc[l] += c[l];
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        black_box(total);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Deterministic synthetic KV rows: independent uniform noise. Cluster sizes come out even and
/// attention spreads over the whole context, so the adaptive retrieval budget runs to its cap:
/// the slow case for wave attention.
fn synthetic_rows(start: usize, n: usize, width: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut k = vec![0f32; n * width];
    let mut v = vec![0f32; n * width];
    let mut x = (seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for (kv, vv) in k.iter_mut().zip(v.iter_mut()) {
        *kv = rnd() * 4.0;
        *vv = rnd();
    }
    (k, v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Untimed steps before the timed ones of [`time_steps`].
const WARMUP_STEPS: usize = 2;

/// Times decode steps of one layer (write one token, attend) and restores the cache after each.
fn time_steps(
    b: &CpuBackend,
    kv: &mut CpuKv,
    heads: HeadLayout,
    ctx: usize,
    runs: usize,
    layers: usize,
) -> Result<f64> {
    let qw = heads.n_heads * heads.head_dim;
    let kw = heads.n_kv_heads * heads.head_dim;
    let (q, _) = synthetic_rows(ctx + 7, 4, qw / 4, 99);
    let (k, v) = synthetic_rows(ctx, 1, kw, 5);
    let q = CpuActs {
        data: q[..qw].to_vec(),
        rows: 1,
        cols: qw,
    };
    let k = CpuActs {
        data: k,
        rows: 1,
        cols: kw,
    };
    let v = CpuActs {
        data: v,
        rows: 1,
        cols: kw,
    };
    let batch = BatchLayout {
        seqs: vec![SeqRows {
            slot: 0,
            row: 0,
            start_pos: ctx,
            n_tokens: 1,
        }],
    };
    let mut times = Vec::new();
    // Each step runs every layer in turn, as a decode step does: a layer's step then finds in
    // the caches what the other layers left there, not its own data of the step before.
    for i in 0..runs + WARMUP_STEPS {
        for layer in 0..layers {
            let t = Instant::now();
            let out = b.run(|| b.attention(layer, &q, &k, &v, &mut [&mut *kv], &batch, heads))?;
            let dt = t.elapsed().as_secs_f64();
            black_box(out);
            if i >= WARMUP_STEPS {
                times.push(dt);
            }
        }
        b.kv_truncate(kv, ctx);
    }
    Ok(median(times))
}

/// How many steps the attention benchmark times, over how many layers.
pub struct Steps {
    /// Timed steps per (context, mode); the median is reported.
    pub runs: usize,
    /// Timed wave steps (default: `runs`).
    pub wave_runs: Option<usize>,
    /// Layers of KV attended in turn every step.
    pub layers: usize,
}

/// Runs the attention benchmark and appends records to `out`; with `store`, wave attention
/// reads the exact KV through that tiered store.
pub fn run(
    contexts: &[usize],
    heads: HeadLayout,
    steps: Steps,
    wave: &WaveConfig,
    store: Option<TieredStore>,
    out: Option<PathBuf>,
) -> Result<()> {
    let Steps {
        runs,
        wave_runs,
        layers,
    } = steps;
    let layers = layers.max(1);
    let b = CpuBackend::new().with_store(store.clone());
    let store_cfg = store.as_ref().map(|s| {
        json!({"host_capacity_bytes": s.config().host_capacity_bytes, "dirs": s.disk_dirs(),
               "io": s.io_path().map(|p| format!("{p:?}"))})
    });
    let threads = b.threads();
    eprintln!("measuring memory bandwidth ({threads} threads)...");
    let bw = memory_bandwidth(threads);
    let bw1 = memory_bandwidth(1);
    eprintln!("memory read bandwidth: {bw:.1} GB/s ({threads} threads), {bw1:.1} GB/s (1 thread)");
    let out = out.unwrap_or_else(|| PathBuf::from("bench/results/attention-cpu.jsonl"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let device = cpu_device();
    let commit = commit();
    let ts = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut records = vec![json!({
        "bench": "attention", "metric": "memory_read_bandwidth", "value": bw, "unit": "GB/s",
        "threads": threads, "single_thread_gb_s": bw1, "device": device, "commit": commit,
        "timestamp": ts,
    })];
    println!(
        "{:>8} {:>6} {:>12} {:>12} {:>9} {:>10} {:>9}",
        "context", "mode", "us/layer", "MB/step", "GB/s", "of_bw", "speedup"
    );
    let kw = heads.n_kv_heads * heads.head_dim;
    for &ctx in contexts {
        let mut kv = b.new_kv(layers, heads, ctx + 1)?;
        let chunk = 4096;
        for layer in 0..layers {
            let mut start = 0;
            while start < ctx {
                let n = chunk.min(ctx - start);
                let (k, v) = synthetic_rows(start, n, kw, 1 + layer as u64);
                kv.write(layer, start, &k, &v)?;
                start += n;
            }
        }
        let dense_bytes = (ctx + 1) * kw * 2 * 2;
        let dense = time_steps(&b, &mut kv, heads, ctx, runs, layers)?;
        let t = Instant::now();
        b.kv_build_index(&mut kv, wave)?;
        let store0 = store.as_ref().map(|s| s.stats());
        // Per layer.
        let build = t.elapsed().as_secs_f64() / layers as f64;
        let before = b.kv_wave_stats(&kv).unwrap_or_default();
        let phases0 = retrowave_cpu::wave::phase_nanos();
        retrowave_cpu::wave::set_phase_timing(true);
        let sparse = time_steps(&b, &mut kv, heads, ctx, wave_runs.unwrap_or(runs), layers)?;
        retrowave_cpu::wave::set_phase_timing(false);
        let phases1 = retrowave_cpu::wave::phase_nanos();
        let after = b.kv_wave_stats(&kv).unwrap_or_default();
        let steps = (after.head_steps - before.head_steps).max(1) / heads.n_kv_heads as u64;
        let wave_bytes = (after.bytes_read - before.bytes_read) as f64 / steps as f64;
        // CPU time per step in each phase of the wave units, summed over the threads (the
        // warm-up steps of time_steps are in the sums too).
        let timed_steps = ((wave_runs.unwrap_or(runs) + WARMUP_STEPS) * layers) as f64;
        let phase_us: Vec<f64> = phases0
            .iter()
            .zip(&phases1)
            .map(|(a, b)| (b - a) as f64 / 1e3 / timed_steps)
            .collect();
        // What the timed steps read through the store, per step and layer.
        let store_reads = store.as_ref().zip(store0).map(|(s, a)| {
            let z = s.stats();
            let per = timed_steps.max(1.0);
            json!({"host_reads_per_layer_step": (z.host_reads - a.host_reads) as f64 / per,
                   "disk_reads_per_layer_step": (z.disk_reads - a.disk_reads) as f64 / per,
                   "spilled_records": z.spilled, "host_bytes": z.host_bytes,
                   "disk_only_bytes": z.disk_bytes})
        });
        let exact_share = (after.exact_tokens - before.exact_tokens) as f64
            / (after.context_tokens - before.context_tokens).max(1) as f64;
        for (mode, secs, bytes) in [
            ("full", dense, dense_bytes as f64),
            ("wave", sparse, wave_bytes),
        ] {
            let gbs = bytes / secs / 1e9;
            println!(
                "{ctx:>8} {mode:>6} {:>12.1} {:>12.2} {gbs:>9.2} {:>9.0}% {:>8.1}x",
                secs * 1e6,
                bytes / 1e6,
                gbs / bw * 100.0,
                dense / secs
            );
            records.push(json!({
                "bench": "attention", "metric": "decode_attention_us_per_layer", "value": secs * 1e6,
                "unit": "us", "attention": mode, "context": ctx, "batch": 1,
                "n_heads": heads.n_heads, "n_kv_heads": heads.n_kv_heads, "head_dim": heads.head_dim,
                "kv_dtype": "f16", "bytes_per_step": bytes, "gb_per_s": gbs,
                "fraction_of_bandwidth": gbs / bw, "memory_bandwidth_gb_s": bw,
                "speedup_vs_full": dense / secs, "synthetic_kv": true, "layers": layers,
                "index_build_seconds": if mode == "wave" { Some(build) } else { None },
                "exact_token_share": if mode == "wave" { Some(exact_share) } else { None },
                "wave_config": if mode == "wave" { Some(json!(wave)) } else { None },
                "store": if mode == "wave" { store_cfg.clone() } else { None },
                "store_reads": if mode == "wave" { store_reads.clone() } else { None },
                "wave_phase_cpu_us": if mode == "wave" { Some(json!({"score": phase_us[0], "select": phase_us[1], "exact": phase_us[2], "estimate": phase_us[3]})) } else { None },
                "runs": if mode == "wave" { wave_runs.unwrap_or(runs) } else { runs }, "threads": threads, "device": device, "commit": commit, "timestamp": ts,
            }));
        }
        eprintln!(
            "context {ctx}: index build {build:.1} s; wave CPU us/step (all threads): score {:.0}, select {:.0}, exact {:.0}, estimate {:.0}",
            phase_us[0], phase_us[1], phase_us[2], phase_us[3]
        );
        if let Some(r) = &store_reads {
            eprintln!("context {ctx}: tiered store, per layer step: {r}");
        }
    }
    crate::eval::run::append_records(&out, &records)?;
    eprintln!("records appended to {}", out.display());
    Ok(())
}
