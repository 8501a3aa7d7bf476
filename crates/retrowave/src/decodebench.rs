//! `retrowave bench decode`: end-to-end decode tokens/s of a random-weight model on one GPU,
//! dense against wave attention, over contexts and a batch sweep, each at its best batch.
//!
//! The KV of the context is synthetic (uniform random keys and values written straight into the
//! caches, no prefill: records say so). Slot 0 is filled and, for wave, indexed on the GPU (the
//! build is timed); the other sequences of the batch are device copies of slot 0 (their own KV
//! and index memory, so no two sequences share a byte), and their queries differ because their
//! input tokens do. Between batch points the caches are cut back to the context length.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use retrowave_core::{WaveConfig, WaveStats};
use retrowave_cuda::CudaBackend;
use retrowave_engine::WorkerGroup;
use retrowave_model::arch::{ModelConfig, WeightSource};
use retrowave_model::random::{RandomWeights, load_shape};
use serde_json::json;

use crate::bench::commit;
use crate::gpubench::{
    append, card, cards, ceilings, decode_batch, timed_decode_steps, weight_bytes,
};

/// What one batch point measured.
struct Point {
    batch: usize,
    step_s: f64,
    tok_s: f64,
    /// The wave buffers over the point's steps (host tier only): pages served, read over PCIe
    /// and their bytes, misses of cold buffers.
    buffer: WaveStats,
    /// GPU memory in use during the point (bytes).
    gpu_used: u64,
}

/// The GPUs of the tensor-parallel group, in rank order (one for `--tp 1`).
struct Gpus(Vec<CudaBackend>);

impl Gpus {
    fn sync(&self) -> Result<()> {
        crate::gpubench::synchronize(&self.0)
    }

    fn trim(&self) -> Result<()> {
        for b in &self.0 {
            b.trim_pool()?;
        }
        Ok(())
    }

    /// Free bytes of the GPU with the least free, and bytes in use over all of them.
    fn mem(&self) -> Result<(u64, u64)> {
        let (mut least, mut used) = (u64::MAX, 0u64);
        for b in &self.0 {
            let (free, total) = b.context().mem_get_info()?;
            least = least.min(free as u64);
            used += (total - free) as u64;
        }
        Ok((least, used))
    }

    fn card(&self) -> String {
        cards(&self.0)
    }
}

/// The wave counters of slots `0..n`, summed.
fn wave_counters(group: &mut WorkerGroup<CudaBackend>, n: usize) -> Result<WaveStats> {
    let mut t = WaveStats::default();
    for s in 0..n {
        if let Some(w) = group.wave_stats(s)? {
            t.add_counters(&w);
        }
    }
    Ok(t)
}

/// The wave buffers' counters between `before` and `after`.
fn buffer_delta(after: &WaveStats, before: &WaveStats) -> WaveStats {
    WaveStats {
        cache_hit_pages: after.cache_hit_pages - before.cache_hit_pages,
        cache_miss_pages: after.cache_miss_pages - before.cache_miss_pages,
        cache_cold_pages: after.cache_cold_pages - before.cache_cold_pages,
        host_to_device_bytes: after.host_to_device_bytes - before.host_to_device_bytes,
        ..WaveStats::default()
    }
}

/// Bytes a wave step must move per sequence, from the index's shape: every centroid and ln size,
/// the logits written and read back, the estimation means, the exact tokens' keys and values and
/// their positions (list written and read, members read).
fn wave_bytes_per_seq(cfg: &ModelConfig, wcfg: &WaveConfig, ctx: usize) -> (f64, usize, usize) {
    let hd = cfg.head_dim;
    let units = (cfg.n_layers * cfg.n_kv_heads) as f64;
    let g = (cfg.n_heads / cfg.n_kv_heads) as f64;
    let plan = retrowave_cuda::wave_step::BuildPlan::of(wcfg, ctx);
    let (start, end, k) = (plan.sink, plan.end, plan.clusters());
    // The GPU's budgets; the adaptive one may grow to its cap (on uniform random KV it always
    // does).
    let b = retrowave_cuda::wave_step::StepBudgets::of(wcfg, k, end - start, 0, k);
    let (r, e) = (b.retrieval_cap, b.estimation);
    let avg = (end - start) as f64 / k.max(1) as f64;
    let exact = (wcfg.sink_tokens + wcfg.window_tokens) as f64 + r as f64 * avg;
    let per_unit = k as f64 * (hd * 2 + 4) as f64
        + 2.0 * g * k as f64 * 4.0
        + e as f64 * (hd * 2) as f64
        + exact * (hd * 4) as f64
        + exact * 12.0;
    (units * per_unit, r, e)
}

#[allow(clippy::too_many_arguments)]
fn sweep(
    b: &Gpus,
    group: &mut WorkerGroup<CudaBackend>,
    cfg: &ModelConfig,
    ctx: usize,
    batches: &[usize],
    steps: usize,
    wave: Option<&WaveConfig>,
    max_batch: usize,
    feed_back: bool,
) -> Result<(Vec<Point>, f64)> {
    let room = steps + 8;
    let cap = ctx + room;
    let t = Instant::now();
    let mut build_s = 0.0;
    if let Some(w) = wave.filter(|w| w.host_kv) {
        // Straight into the host tier, a group of heads at a time: the context never has to
        // fit in GPU memory.
        group.open_slot(0, room)?;
        let t = Instant::now();
        group.fill_synthetic_indexed(0, ctx, room, 1000, w)?;
        b.sync()?;
        build_s = t.elapsed().as_secs_f64();
    } else {
        group.open_slot(0, cap)?;
        group.fill_synthetic(0, ctx, 1000)?;
    }
    if let Some(w) = wave.filter(|w| !w.host_kv) {
        b.sync()?;
        let t = Instant::now();
        group.build_index(0, w)?;
        b.sync()?;
        build_s = t.elapsed().as_secs_f64();
    }
    for s in 1..max_batch {
        group.fork_slot(0, s)?;
    }
    b.sync()?;
    println!(
        "  {} x {ctx} tokens ready in {:.1} s{}",
        max_batch,
        t.elapsed().as_secs_f64(),
        if wave.is_some() {
            format!(" (index build {build_s:.2} s)")
        } else {
            String::new()
        }
    );
    let mut points = Vec::new();
    let mut rng = StdRng::seed_from_u64(ctx as u64);
    for &batch in batches.iter().filter(|&&x| x <= max_batch) {
        let before = wave_counters(group, batch)?;
        let mut times = timed_decode_steps(
            group,
            cfg.vocab_size,
            batch,
            ctx,
            steps,
            &mut rng,
            feed_back,
        )?;
        let after = wave_counters(group, batch)?;
        let (_, used) = b.mem()?;
        for s in 0..batch {
            group.truncate_slot(s, ctx);
        }
        times.sort_by(f64::total_cmp);
        let step_s = times[times.len() / 2];
        points.push(Point {
            batch,
            step_s,
            tok_s: batch as f64 / step_s,
            buffer: buffer_delta(&after, &before),
            gpu_used: used,
        });
    }
    for s in 0..max_batch {
        group.close_slot(s);
    }
    b.trim()?;
    Ok((points, build_s))
}

/// Per-stage times of one wave attention layer (Llama-3-8B layer shape by default) at `batch`
/// sequences of `ctx` tokens, on one-layer caches of synthetic KV, each with its own index: the
/// kernels of `wave_decode_layer` timed one by one with CUDA events, the whole layer, and dense
/// flash-decoding over the same caches.
fn stage_bench(
    b: &CudaBackend,
    cfg: &ModelConfig,
    wcfg: &WaveConfig,
    ctx: usize,
    batch: usize,
    out: &Path,
) -> Result<String> {
    use retrowave_core::{Backend, HeadLayout};
    use retrowave_cuda::backend::dp;
    use retrowave_cuda::timing::{median, time_us};
    use retrowave_cuda::wave_step::HostStep;
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let heads = HeadLayout {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    };
    let mut kvs = Vec::new();
    for i in 0..batch {
        let mut kv = b.new_kv(1, heads, ctx + 8)?;
        b.kv_fill_synthetic(&mut kv, ctx, 500 + i as u64)?;
        b.kv_build_index(&mut kv, wcfg)?;
        kvs.push(kv);
    }
    let refs: Vec<&retrowave_cuda::DevKv> = kvs.iter().collect();
    // Decode rows at the last cached position (nothing is appended here).
    let layout = decode_batch(batch, ctx - 1);
    let t = b.step_tables(&refs, &layout, nkv)?;
    let ws = b.wave_step_units(&HostStep::of(&t), &refs)?;
    let mut rng = StdRng::seed_from_u64(7);
    let qh: Vec<f32> = (0..batch * nh * hd)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let q = b.upload(&qh)?;
    let o = b.alloc::<f32>(batch * nh * hd)?;
    let s = b.stream().clone();
    let (w, r) = (3, 20);
    let sel_f = || {
        b.wave_select_dev(
            ws.layer_ptr(0),
            ws.per_layer,
            ws.max_clusters,
            dp(&q),
            nh,
            nkv,
            hd,
            ws.max_ids,
            ws.union,
        )
    };
    let t_sel = median(&time_us(&s, w, r, || sel_f().map(|_| ()))?);
    let sel = sel_f()?;
    let t_est = median(&time_us(&s, w, r, || b.wave_estimate(&sel).map(|_| ()))?);
    let est = b.wave_estimate(&sel)?;
    let t_tok = median(&time_us(&s, w, r, || {
        b.wave_tokens(&t, &sel, ws.list_cap).map(|_| ())
    })?);
    let toks = b.wave_tokens(&t, &sel, ws.list_cap)?;
    // With a host tier: this step's misses copied into the wave buffers (after the timing
    // loop above, the buffers hold this query's clusters: these are warm steps).
    let t_fill = if ws.tiers {
        median(&time_us(&s, w, r, || {
            b.wave_cache_fill(ws.layer_ptr(0), ws.per_layer, hd)
        })?)
    } else {
        0.0
    };
    let t_exact = median(&time_us(&s, w, r, || {
        b.wave_exact_attention(&t, 0, dp(&q), dp(&o), &toks, &est, nh, nkv, hd)
    })?);
    let t_layer = median(&time_us(&s, w, r, || {
        b.wave_decode_layer(&t, &ws, 0, dp(&q), dp(&o), nh, nkv, hd)
    })?);
    let t_dense = median(&time_us(&s, w, r, || {
        b.decode_attention(&t, 0, dp(&q), dp(&o), nh, nkv, hd)
    })?);
    let counts = b.download(&toks.count, toks.count.len())?;
    let exact_mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len().max(1) as f64;
    append(
        out,
        &json!({"bench": "gpu-wave-stages", "context": ctx, "batch": batch, "heads": nh,
                "kv_heads": nkv, "head_dim": hd, "clusters": ws.max_clusters,
                "selected_max": ws.max_ids, "exact_tokens_mean": exact_mean,
                "select_us": t_sel, "estimate_us": t_est, "tokens_us": t_tok,
                "fill_us": t_fill, "host_kv": wcfg.host_kv,
                "exact_us": t_exact, "layer_us": t_layer, "dense_us": t_dense,
                "kv": "synthetic uniform random, one layer per sequence",
                "device": card(b), "commit": commit()}),
    )?;
    Ok(format!(
        "stages ctx {ctx:>7} batch {batch:>3}: select {t_sel:>6.1}  estimate {t_est:>6.1}  tokens {t_tok:>5.1}  fill {t_fill:>5.1}  exact {t_exact:>6.1} ({exact_mean:.0} tokens)  = layer {t_layer:>6.1} us; dense {t_dense:>7.1} us"
    ))
}

/// `retrowave bench decode`.
#[allow(clippy::too_many_arguments)]
pub fn run_decode(
    device: &str,
    shape: &Path,
    contexts: &[usize],
    batches: &[usize],
    steps: usize,
    modes: &[String],
    wcfg: &WaveConfig,
    stage_batches: &[usize],
    feed_back: bool,
    tp: usize,
    batch_cap: usize,
    out: &Path,
) -> Result<()> {
    // Every GPU of the group opens first (too few is an error before any work); the first also
    // runs the ceilings and the per-stage breakdown.
    let gpus = Gpus(crate::gpubench::gpus(device, tp)?);
    let b = gpus.0[0].clone();
    let ceil = ceilings(&b, out)?;
    let cfg = load_shape(shape)?;
    let mut stage_lines = Vec::new();
    for &ctx in contexts {
        for &batch in stage_batches.iter().filter(|&&x| x > 0) {
            let line = stage_bench(&b, &cfg, wcfg, ctx, batch, out)?;
            println!("{line}");
            stage_lines.push(line);
            b.trim_pool()?;
        }
    }
    let modes: Vec<String> = modes.iter().filter(|m| !m.is_empty()).cloned().collect();
    if modes.is_empty() {
        return Ok(());
    }
    for m in &modes {
        if m != "full" && m != "wave" {
            bail!("--attention takes full and/or wave, not {m:?}");
        }
    }
    let t = Instant::now();
    let src = RandomWeights::new(&cfg, 1)?;
    let mut group = WorkerGroup::load(&cfg, &src as &dyn WeightSource, gpus.0.clone())?;
    drop(src);
    let collective = match (tp, b.group_place()) {
        (1, _) => "none (one GPU)",
        (_, Some(_)) if retrowave_cuda::nccl::skipping() => {
            "SKIPPED (RETROWAVE_TP_SKIP_ALL_REDUCE=1: timing without the collectives, outputs wrong)"
        }
        (_, Some(_)) => "NCCL all-reduce (f32), in the CUDA graphs",
        (_, None) => "host memory (NCCL not available)",
    };
    println!(
        "{} (random weights): on {} in {:.1} s (tensor parallel {tp}, collective: {collective})",
        cfg.name,
        gpus.card(),
        t.elapsed().as_secs_f64()
    );
    let kv_per_token = (2 * cfg.n_layers * cfg.kv_dim() * 2) as f64;
    let wb = weight_bytes(&cfg);
    let mut summary = Vec::new();
    for &ctx in contexts {
        let mut best = Vec::new();
        for mode in &modes {
            let wave = (mode == "wave").then_some(wcfg);
            gpus.trim()?;
            let (free, _) = gpus.mem()?;
            let cap = ctx + steps + 8;
            // Wave keeps the dense cache plus the index (centroids and means: 2 x 1/16 of the
            // keys at 16 tokens a cluster; members 4 bytes a token a head) and its build's
            // temporaries.
            let host_kv = wave.is_some_and(|w| w.host_kv);
            // With the host tier a sequence keeps its index (centroids and means: 1/16 of the
            // KV), wave buffers (about 1/16 at 128K) and steady zone on the GPU, and its KV in
            // pinned host memory (built a group of heads at a time).
            // Each GPU holds its share of the KV heads.
            let per_seq = kv_per_token / tp as f64
                * cap as f64
                * match wave {
                    None => 1.0,
                    Some(_) if host_kv => 0.16,
                    Some(_) => 1.09,
                };
            let reserve = match wave {
                None => 4.0e9,
                Some(_) if host_kv => 8.0e9,
                Some(_) => 8.0e9,
            };
            let mut max_batch = (((free as f64 - reserve) / per_seq).floor() as usize).min(256);
            if host_kv {
                let host = retrowave_cuda::host_budget::mem_available().unwrap_or(0) as f64;
                let by_host = ((host - 16.0e9) / (kv_per_token * ctx as f64))
                    .floor()
                    .max(0.0);
                println!(
                    "context {ctx} wave, host tier: {:.0} GB of host memory available, room for {by_host} sequences",
                    host / 1e9
                );
                max_batch = max_batch.min(by_host as usize);
            }
            if batch_cap > 0 {
                max_batch = max_batch.min(batch_cap);
            }
            if max_batch == 0 {
                println!("context {ctx} {mode}: no sequence fits");
                continue;
            }
            let mut bs: Vec<usize> = batches.iter().copied().filter(|&x| x < max_batch).collect();
            bs.push(max_batch);
            println!("context {ctx} {mode}: batches {bs:?}");
            let (points, build_s) = sweep(
                &gpus, &mut group, &cfg, ctx, &bs, steps, wave, max_batch, feed_back,
            )?;
            let (wave_seq_bytes, r, e) = wave_bytes_per_seq(&cfg, wcfg, ctx);
            for p in &points {
                let seq_bytes = if wave.is_some() {
                    wave_seq_bytes
                } else {
                    kv_per_token * (ctx + steps / 2) as f64
                };
                let bytes = wb + p.batch as f64 * seq_bytes;
                // Pages that crossed PCIe per step (host tier), and the roofline with them: HBM
                // and PCIe time add up when nothing overlaps them, the larger counts when all do.
                let timed_steps = (steps + 3) as f64;
                let pcie_bytes = p.buffer.host_to_device_bytes as f64 / timed_steps;
                let pcie_s = pcie_bytes / (tp as f64 * ceil.h2d_gbs * 1e9);
                // The GPUs of the group read their shares in parallel (the roofline counts
                // every GPU at the copy rate measured on the first).
                let hbm_s = bytes / (tp as f64 * ceil.copy_gbs * 1e9);
                let roof_tok_s = p.batch as f64 / hbm_s.max(pcie_s);
                let pct = 100.0 * p.tok_s / roof_tok_s;
                let hit_ratio = p.buffer.warm_hit_ratio();
                append(
                    out,
                    &json!({"bench": "gpu-decode", "model": cfg.name, "weights": "random (bf16)",
                            "input_tokens": if feed_back { "greedy (fed back)" } else { "random" },
                            "kv": "synthetic uniform random (no prefill); sequences 1.. are device copies of sequence 0",
                            "attention": mode, "context": ctx, "batch": p.batch,
                            "max_batch": max_batch,
                            "step_ms": p.step_s * 1e3, "tokens_per_s": p.tok_s,
                            "bytes_per_step": bytes, "roofline_tokens_per_s": roof_tok_s,
                            "pct_of_roofline": pct, "copy_gbs": ceil.copy_gbs,
                            "wave": wave.map(|w| json!({"config": format!("{w:?}"), "retrieval_clusters": r,
                                "estimation_clusters": e, "index_build_s": build_s,
                                "kv_placement": if w.host_kv {
                                    "pinned host memory in cluster order, GPU wave buffers (LRU, store policy), misses copied in over PCIe"
                                } else {
                                    "GPU memory, position order (every cluster hits)"
                                },
                                "buffer_hit_pages": p.buffer.cache_hit_pages,
                                "buffer_miss_pages": p.buffer.cache_miss_pages,
                                "buffer_cold_pages": p.buffer.cache_cold_pages, "buffer_warm_hit_ratio": hit_ratio,
                                "pcie_bytes_per_step": pcie_bytes,
                                "pcie_gbs": pcie_bytes / p.step_s / 1e9,
                                "host_kv_bytes": if w.host_kv { kv_per_token * ctx as f64 * p.batch as f64 } else { 0.0 }})),
                            "gpu_memory_used": p.gpu_used,
                            "cuda_graphs": b.graph_counts().1 > 0,
                            "tp": tp, "collective": collective,
                            "lm_head": if tp > 1 { format!("{:?}", retrowave_engine::LmHead::from_env()) } else { "one GPU".into() },
                            "device": gpus.card(), "commit": commit()}),
                )?;
                println!(
                    "  {mode:>4} ctx {ctx:>7} batch {:>3}: step {:>7.2} ms {:>8.1} tok/s  roofline {roof_tok_s:>8.1} ({pct:>3.0}%)  GPU {:.1} GB{}",
                    p.batch,
                    p.step_s * 1e3,
                    p.tok_s,
                    p.gpu_used as f64 / 1e9,
                    if host_kv {
                        format!(
                            "  buffer hits {} PCIe {:.1} MB/step {:.1} GB/s",
                            hit_ratio.map_or("-".into(), |h| format!("{:.1}%", 100.0 * h)),
                            pcie_bytes / 1e6,
                            pcie_bytes / p.step_s / 1e9
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if let Some(p) = points.iter().max_by(|a, b| a.tok_s.total_cmp(&b.tok_s)) {
                best.push((mode.clone(), p.batch, p.tok_s));
            }
        }
        let full = best.iter().find(|x| x.0 == "full").map(|x| x.2);
        for (mode, batch, tok_s) in &best {
            let ratio = full.map(|f| tok_s / f);
            summary.push(format!(
                "ctx {ctx:>7} {mode:>4}: best {tok_s:>8.1} tok/s at batch {batch:>3}{}",
                ratio.map_or(String::new(), |r| format!("  ({r:.2}x dense)"))
            ));
            append(
                out,
                &json!({"bench": "gpu-decode-best", "model": cfg.name, "attention": mode,
                        "context": ctx, "batch": batch, "tokens_per_s": tok_s, "tp": tp,
                        "ratio_to_dense": ratio, "device": gpus.card(), "commit": commit()}),
            )?;
        }
    }
    println!("\n{} on {}:", cfg.name, gpus.card());
    for l in stage_lines.iter().chain(&summary) {
        println!("{l}");
    }
    Ok(())
}
