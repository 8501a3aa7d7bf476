//! GPU benchmarks and checks (`retrowave bench gpu`, `bench parity`, `bench gpu-model`): kernel
//! checks, the measured ceilings of the card (copy bandwidth, cuBLAS bf16 rate), decode and
//! prefill attention kernels, end-to-end dense decode of a random-weight model against its
//! bandwidth roofline, real-model prefill/decode, and CPU-vs-GPU parity on the golden prompts.
//! Every record names the card and the commit.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use retrowave_core::{Backend, BatchLayout, HeadLayout, RowSampling, SeqRows};
use retrowave_cpu::CpuBackend;
use retrowave_cuda::backend::dp;
use retrowave_cuda::timing::{median, time_back_to_back_us, time_us};
use retrowave_cuda::{CudaBackend, DevKv, checks};
use retrowave_engine::{Overlap, WorkerGroup};
use retrowave_model::arch::{ModelConfig, WeightSource};
use retrowave_model::random::{RandomWeights, load_shape};
use serde_json::{Value, json};

use crate::bench::commit;

pub(crate) fn append(out: &Path, rec: &Value) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    writeln!(f, "{rec}")?;
    Ok(())
}

pub(crate) fn gpu(device: &str) -> Result<CudaBackend> {
    let req: retrowave_cuda::DeviceRequest = device.parse()?;
    let Some(n) = req.resolve()? else {
        bail!("--device {device} resolves to the CPU; these benchmarks need a GPU");
    };
    Ok(CudaBackend::new(n)?)
}

pub(crate) fn card(b: &CudaBackend) -> String {
    b.info().name.clone()
}

/// The card of a tensor-parallel group's GPUs, with their count when there are several
/// ("NVIDIA H200 x2").
pub(crate) fn cards(gpus: &[CudaBackend]) -> String {
    match gpus {
        [b] => card(b),
        [b, ..] => format!("{} x{}", card(b), gpus.len()),
        [] => String::new(),
    }
}

/// The GPUs of `--device` and `--tp` (one backend a rank, `load::cuda_backends`), or an error
/// where the device resolves to the CPU.
pub(crate) fn gpus(device: &str, tp: usize) -> Result<Vec<CudaBackend>> {
    crate::load::cuda_backends(device, tp)?.with_context(|| {
        format!("--device {device} resolves to the CPU; these benchmarks need a GPU")
    })
}

/// Waits for the work queued on every GPU of a group.
pub(crate) fn synchronize(gpus: &[CudaBackend]) -> Result<()> {
    for b in gpus {
        b.synchronize()?;
    }
    Ok(())
}

/// Measured device-to-device copy rate (bytes read + written per second) and bf16 GEMM rate.
pub struct Ceilings {
    pub copy_gbs: f64,
    pub gemm_tflops: f64,
    /// Host-to-device copies from pinned memory (PCIe).
    pub h2d_gbs: f64,
}

pub(crate) fn ceilings(b: &CudaBackend, out: &Path) -> Result<Ceilings> {
    let n: usize = 1 << 30; // bf16 elements: 2 GiB per buffer
    let src = b.alloc::<bf16>(n)?;
    let mut dst = b.alloc::<bf16>(n)?;
    b.fill_uniform(dp(&src), n, 1, 1.0)?;
    let s = b.stream().clone();
    let t = time_us(&s, 3, 20, || {
        s.memcpy_dtod(&src, &mut dst)
            .map_err(|e| retrowave_cuda::CudaError::Driver {
                what: "copy".into(),
                source: e,
            })
    })?;
    let copy_gbs = 2.0 * (n * 2) as f64 / (median(&t) * 1e-6) / 1e9;
    drop((src, dst));
    let m = 8192usize;
    let a = b.alloc::<bf16>(m * m)?;
    let w = b.alloc::<bf16>(m * m)?;
    let c = b.alloc::<bf16>(m * m)?;
    b.fill_uniform(dp(&a), m * m, 2, 1.0)?;
    b.fill_uniform(dp(&w), m * m, 3, 1.0)?;
    let t = time_us(&s, 3, 20, || {
        b.gemm_bf16_bf16(dp(&a), dp(&w), dp(&c), m, m, m)
    })?;
    let gemm_tflops = 2.0 * (m as f64).powi(3) / (median(&t) * 1e-6) / 1e12;
    drop((a, w, c));
    // Host to device: page-locked (what the tiered store hands the GPU) vs pageable memory.
    let bytes = 1usize << 30;
    let mut pinned = retrowave_cuda::PinnedBuffer::new(b.context(), bytes)?;
    pinned.as_mut_slice().fill(7);
    let pageable = vec![7u8; bytes];
    let mut dev = b.alloc::<u8>(bytes)?;
    let t = time_us(&s, 1, 5, || {
        s.memcpy_htod(pinned.as_slice(), &mut dev)
            .map_err(retrowave_cuda::CudaError::driver_error("pinned copy"))
    })?;
    let pinned_gbs = bytes as f64 / (median(&t) * 1e-6) / 1e9;
    let t = time_us(&s, 1, 3, || {
        s.memcpy_htod(&pageable, &mut dev)
            .map_err(retrowave_cuda::CudaError::driver_error("pageable copy"))
    })?;
    let pageable_gbs = bytes as f64 / (median(&t) * 1e-6) / 1e9;
    println!("host->device 1 GiB: pinned {pinned_gbs:.1} GB/s, pageable {pageable_gbs:.1} GB/s");
    drop((pinned, pageable, dev));
    for (what, v, unit) in [
        (
            "copy device-to-device 2 GiB (read + write)",
            copy_gbs,
            "GB/s",
        ),
        (
            "cuBLAS bf16 GEMM 8192^3 (random data)",
            gemm_tflops,
            "TFLOP/s",
        ),
        (
            "host-to-device 1 GiB from pinned memory",
            pinned_gbs,
            "GB/s",
        ),
        (
            "host-to-device 1 GiB from pageable memory",
            pageable_gbs,
            "GB/s",
        ),
    ] {
        append(
            out,
            &json!({"bench": "gpu-ceiling", "what": what, "value": v, "unit": unit,
                    "device": card(b), "commit": commit()}),
        )?;
    }
    println!("copy {copy_gbs:.0} GB/s, cuBLAS bf16 {gemm_tflops:.0} TFLOP/s");
    Ok(Ceilings {
        copy_gbs,
        gemm_tflops,
        h2d_gbs: pinned_gbs,
    })
}

const L3_HEADS: (usize, usize, usize) = (32, 8, 128);

/// One sequence (slot 0) with `n_tokens` rows from position `start_pos`.
pub(crate) fn one_seq(start_pos: usize, n_tokens: usize) -> BatchLayout {
    BatchLayout {
        seqs: vec![SeqRows {
            slot: 0,
            row: 0,
            start_pos,
            n_tokens,
        }],
    }
}

/// A decode step of `batch` sequences (slots and rows 0..batch), all at position `start_pos`.
pub(crate) fn decode_batch(batch: usize, start_pos: usize) -> BatchLayout {
    BatchLayout {
        seqs: (0..batch)
            .map(|i| SeqRows {
                slot: i,
                row: i,
                start_pos,
                n_tokens: 1,
            })
            .collect(),
    }
}

fn decode_attention_bench(
    b: &CudaBackend,
    ceil: &Ceilings,
    contexts: &[usize],
    out: &Path,
) -> Result<Vec<String>> {
    let (nh, nkv, hd) = L3_HEADS;
    let heads = HeadLayout {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    };
    let mut lines = Vec::new();
    for &ctx in contexts {
        for &batch in &[1usize, 2, 4, 8] {
            let mut kvs: Vec<DevKv> = Vec::new();
            for i in 0..batch {
                let mut kv = b.new_kv(1, heads, ctx)?;
                b.kv_fill_synthetic(&mut kv, ctx - 1, 100 + i as u64)?;
                kvs.push(kv);
            }
            let layout = decode_batch(batch, ctx - 1);
            let refs: Vec<&DevKv> = kvs.iter().collect();
            let tables = b.step_tables(&refs, &layout, nkv)?;
            let o = b.alloc::<f32>(batch * nh * hd)?;
            let mut rng = StdRng::seed_from_u64(ctx as u64 + batch as u64);
            let qh: Vec<f32> = (0..batch * nh * hd)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let qd = b.upload(&qh)?;
            let t = time_us(b.stream(), 5, 50, || {
                b.decode_attention(&tables, 0, dp(&qd), dp(&o), nh, nkv, hd)
            })?;
            let us = median(&t);
            let b2b = time_back_to_back_us(b.stream(), 5, 50, || {
                b.decode_attention(&tables, 0, dp(&qd), dp(&o), nh, nkv, hd)
            })?;
            let bytes = (batch * ctx * nkv * hd * 2 * 2) as f64;
            let gbs = bytes / (us * 1e-6) / 1e9;
            let pct = 100.0 * gbs / ceil.copy_gbs;
            append(
                out,
                &json!({"bench": "gpu-decode-attention", "context": ctx, "batch": batch,
                        "heads": nh, "kv_heads": nkv, "head_dim": hd, "dtype": "bf16",
                        "split_tokens": tables.split, "splits": tables.max_splits,
                        "decode_waves_env": std::env::var("RETROWAVE_DECODE_WAVES").ok(),
                        "us": us, "us_p10": t[t.len() / 10], "us_p90": t[t.len() * 9 / 10],
                        "kv_bytes": bytes, "gbs": gbs, "copy_gbs": ceil.copy_gbs,
                        "pct_of_copy": pct, "kv": "synthetic uniform random",
                        "decode_stages": retrowave_cuda::compile::decode_stages(),
                        "pdl": retrowave_cuda::backend::pdl_enabled(),
                        "us_back_to_back": b2b,
                        "gbs_back_to_back": bytes / (b2b * 1e-6) / 1e9,
                        "device": card(b), "commit": commit()}),
            )?;
            let line = format!(
                "decode attn ctx {ctx:>6} batch {batch}: {us:>8.1} us  {gbs:>6.0} GB/s  {pct:>4.0}% of copy; back to back {b2b:>8.1} us  {:>4.0}%",
                100.0 * bytes / (b2b * 1e-6) / 1e9 / ceil.copy_gbs
            );
            println!("{line}");
            lines.push(line);
        }
    }
    Ok(lines)
}

/// Wave selection (scoring + zones) at the Llama-3-8B layer shape, 128K context (8192 clusters
/// of 16 tokens per KV head; published budgets 205 + 1900 clusters), random bf16 centroids.
fn wave_select_bench(b: &CudaBackend, out: &Path) -> Result<Vec<String>> {
    use retrowave_cuda::wave::WaveUnit;
    let (nh, nkv, hd) = L3_HEADS;
    let clusters = 8192usize;
    let mut lines = Vec::new();
    let mut rng = StdRng::seed_from_u64(17);
    // Every unit its own centroids and means (as every sequence has its own index), so that the
    // reads come from HBM, not from L2.
    let max_units = 32 * nkv;
    let cent = b.alloc::<bf16>(clusters * hd * max_units)?;
    b.fill_uniform(dp(&cent), clusters * hd * max_units, 3, 1.0)?;
    let means = b.alloc::<bf16>(clusters * hd * max_units)?;
    b.fill_uniform(dp(&means), clusters * hd * max_units, 4, 1.0)?;
    let ln: Vec<f32> = (0..clusters)
        .map(|i| ((i % 29) as f32 + 1.0).ln())
        .collect();
    let dln = b.upload(&ln)?;
    for &batch in &[1usize, 8, 32] {
        let units: Vec<WaveUnit> = (0..batch * nkv)
            .map(|u| WaveUnit {
                centroids: dp(&cent) + (u * clusters * hd * 2) as u64,
                ln_sizes: dp(&dln),
                means: dp(&means) + (u * clusters * hd * 2) as u64,
                n_clusters: clusters as i32,
                q_row: (u / nkv) as i32,
                retrieval: 205,
                estimation: 1900,
                ..Default::default()
            })
            .collect();
        let qh: Vec<f32> = (0..batch * nh * hd)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let qd = b.upload(&qh)?;
        let t = time_us(b.stream(), 3, 20, || {
            b.wave_select(&units, dp(&qd), nh, nkv, hd, 2105)
                .map(|_| ())
        })?;
        let us = median(&t);
        let sel = b.wave_select(&units, dp(&qd), nh, nkv, hd, 2105)?;
        let te = time_us(b.stream(), 3, 20, || b.wave_estimate(&sel).map(|_| ()))?;
        let us_est = median(&te);
        append(
            out,
            &json!({"bench": "gpu-wave-select", "batch": batch, "heads": nh, "kv_heads": nkv,
                    "head_dim": hd, "clusters_per_head": clusters, "retrieval": 205,
                    "estimation": 1900, "us": us, "us_p10": t[t.len() / 10],
                    "estimate_us": us_est, "mean_bytes": batch * nkv * 1900 * hd * 2,
                    "us_p90": t[t.len() * 9 / 10],
                    "centroid_bytes": batch * nkv * clusters * hd * 2,
                    "note": "one layer; scoring + zone selection, incl. the per-call uploads and allocations; every unit its own centroids and means (read from HBM)",
                    "device": card(b), "commit": commit()}),
        )?;
        let line = format!(
            "wave select 128K (8192 clusters x {nkv} heads) batch {batch}: {us:>8.1} us; estimate {us_est:>8.1} us"
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

fn prefill_attention_bench(b: &CudaBackend, ceil: &Ceilings, out: &Path) -> Result<Vec<String>> {
    let (nh, nkv, hd) = L3_HEADS;
    let heads = HeadLayout {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    };
    let mut lines = Vec::new();
    for &ctx in &[8192usize, 32768] {
        let mut kv = b.new_kv(1, heads, ctx)?;
        b.kv_fill_synthetic(&mut kv, ctx, 5)?;
        kv.len = 0;
        let layout = one_seq(0, ctx);
        let tables = b.step_tables(&[&kv], &layout, nkv)?;
        let qb = b.alloc::<bf16>(ctx * nh * hd)?;
        b.fill_uniform(dp(&qb), ctx * nh * hd, 9, 2.0)?;
        let o = b.alloc::<f32>(ctx * nh * hd)?;
        let t = time_us(b.stream(), 2, 10, || {
            b.prefill_attention(&tables, 0, dp(&qb), dp(&o), nh, nkv, hd)
        })?;
        let us = median(&t);
        let flops = 4.0 * (ctx as f64).powi(2) / 2.0 * (nh * hd) as f64;
        let tflops = flops / (us * 1e-6) / 1e12;
        let pct = 100.0 * tflops / ceil.gemm_tflops;
        append(
            out,
            &json!({"bench": "gpu-prefill-attention", "tokens": ctx, "heads": nh, "kv_heads": nkv,
                    "head_dim": hd, "causal": true, "us": us, "tflops": tflops,
                    "cublas_tflops": ceil.gemm_tflops, "pct_of_cublas": pct,
                    "device": card(b), "commit": commit()}),
        )?;
        let line = format!(
            "prefill attn {ctx:>6} tokens: {:>8.2} ms  {tflops:>5.0} TFLOP/s  {pct:>4.0}% of cuBLAS",
            us / 1000.0
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

/// Bytes of every matrix a decode step reads (the embedding table only through its rows, unless
/// it is also the output matrix).
pub(crate) fn weight_bytes(cfg: &ModelConfig) -> f64 {
    let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_hidden);
    let per_layer = h * (q + 2 * kv) + q * h + 3 * h * f;
    ((cfg.n_layers * per_layer + cfg.vocab_size * h) * 2) as f64
}

/// Runs 3 warm-up and `steps` timed greedy decode steps of slots `0..batch`, all at position
/// `ctx` onwards, with random input tokens; returns the timed steps' wall times (seconds), each
/// ending when the sampled tokens are back on the host.
pub(crate) fn timed_decode_steps(
    group: &mut WorkerGroup<CudaBackend>,
    vocab: usize,
    batch: usize,
    ctx: usize,
    steps: usize,
    rng: &mut StdRng,
    feed_back: bool,
) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    let mut picked_before: Vec<u32> = Vec::new();
    for step in 0..steps + 3 {
        // Random input tokens, or (`feed_back`) each row's greedy pick of the step before, as a
        // real decode does (random tokens at the first step).
        let tokens: Vec<u32> = if feed_back && picked_before.len() == batch {
            picked_before.clone()
        } else {
            (0..batch)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        };
        let layout = decode_batch(batch, ctx + step);
        let rows: Vec<usize> = (0..batch).collect();
        let greedy = vec![RowSampling::greedy(); batch];
        let t = Instant::now();
        let picked = group.forward_sample(&tokens, &layout, &rows, &greedy)?;
        let dt = t.elapsed().as_secs_f64();
        if picked.len() != batch || picked.iter().any(|&x| x as usize >= vocab) {
            bail!("decode step gave {} tokens for {batch} rows", picked.len());
        }
        picked_before = picked;
        if step >= 3 {
            times.push(dt);
        }
    }
    Ok(times)
}

/// Gathers of scattered 8-token pages (Llama-3-8B heads: 2 KB of K and 2 KB of V each) from
/// pinned memory, as a decode layer's wave buffer misses: the fill kernel's own loads against the
/// copy engine (one copy per page, and one batched call). Part of `bench gpu`, not of every
/// benchmark's ceilings (it allocates and fills 2 GiB of pinned memory).
fn pcie_gather_bench(b: &CudaBackend, out: &Path) -> Result<()> {
    for (pages, units) in [(4096usize, 8usize), (32768, 64)] {
        let g = b.pcie_gather_bench(pages, units, 8, 128)?;
        let bytes = (pages * 2 * 8 * 128 * 2) as f64;
        let gbs = |us: f64| bytes / (us * 1e-6) / 1e9;
        println!(
            "gather {pages} pages (K+V, 4 KB each) from pinned memory over {units} units: kernel {:.1} GB/s ({:.0} us), copy per page {:.1} GB/s, batched copy {:.1} GB/s",
            gbs(g.kernel_us),
            g.kernel_us,
            gbs(g.memcpy_us),
            gbs(g.batch_us)
        );
        for (how, us) in [
            ("wave_cache_fill kernel", g.kernel_us),
            ("cuMemcpyHtoDAsync per page", g.memcpy_us),
            ("cuMemcpyBatchAsync", g.batch_us),
        ] {
            append(
                out,
                &json!({"bench": "gpu-ceiling", "what": format!("gather {pages} scattered pages (K and V, 2 KB each) from pinned host memory, {units} units: {how}"),
                        "value": gbs(us), "unit": "GB/s", "us": us,
                        "device": card(b), "commit": commit()}),
            )?;
        }
    }
    Ok(())
}

fn e2e_bench(
    b: &CudaBackend,
    ceil: &Ceilings,
    shape: &Path,
    contexts: &[usize],
    steps: usize,
    out: &Path,
) -> Result<Vec<String>> {
    let cfg = load_shape(shape)?;
    let t = Instant::now();
    let src = RandomWeights::new(&cfg, 1)?;
    let mut group = WorkerGroup::load(&cfg, &src as &dyn WeightSource, vec![b.clone()])?;
    drop(src);
    println!(
        "{}: weights on the GPU in {:.1} s",
        cfg.name,
        t.elapsed().as_secs_f64()
    );
    let mut lines = Vec::new();
    let kv_per_token = (2 * cfg.n_layers * cfg.kv_dim() * 2) as f64;
    for &ctx in contexts {
        // Freed caches of the previous context stay in the pool until trimmed.
        b.trim_pool()?;
        let (free, _) = b.context().mem_get_info()?;
        let per_seq = kv_per_token * (ctx + steps + 8) as f64;
        let reserve = 4.0e9;
        let batch = (((free as f64 - reserve) / per_seq).floor() as usize).clamp(0, 64);
        if batch == 0 {
            println!("context {ctx}: no sequence fits");
            continue;
        }
        for s in 0..batch {
            group.open_slot(s, ctx + steps + 8)?;
            group.fill_synthetic(s, ctx, 1000 + s as u64)?;
        }
        let mut rng = StdRng::seed_from_u64(ctx as u64);
        let (caps0, reps0) = b.graph_counts();
        let mut times = timed_decode_steps(
            &mut group,
            cfg.vocab_size,
            batch,
            ctx,
            steps,
            &mut rng,
            false,
        )?;
        for s in 0..batch {
            group.close_slot(s);
        }
        times.sort_by(f64::total_cmp);
        let step_s = times[times.len() / 2];
        let tok_s = batch as f64 / step_s;
        let bytes = weight_bytes(&cfg) + batch as f64 * kv_per_token * (ctx + steps / 2) as f64;
        let roof_s = bytes / (ceil.copy_gbs * 1e9);
        let roof_tok_s = batch as f64 / roof_s;
        let pct = 100.0 * tok_s / roof_tok_s;
        append(
            out,
            &json!({"bench": "gpu-e2e-decode", "model": cfg.name, "weights": "random (bf16)",
                    "kv": "synthetic uniform random (no prefill)", "context": ctx, "batch": batch,
                    "step_ms": step_s * 1e3, "tokens_per_s": tok_s, "bytes_per_step": bytes,
                    "roofline_tokens_per_s": roof_tok_s, "pct_of_roofline": pct,
                    "copy_gbs": ceil.copy_gbs, "attention": "full", "cuda_graphs": {"captures": b.graph_counts().0 - caps0, "replays": b.graph_counts().1 - reps0},
                    "sampling": "greedy on the GPU (token ids back)",
                    "device": card(b), "commit": commit()}),
        )?;
        let line = format!(
            "e2e {} ctx {ctx:>6} batch {batch:>2}: step {:>6.2} ms  {tok_s:>7.1} tok/s  roofline {roof_tok_s:>7.1}  {pct:>4.0}%",
            cfg.name,
            step_s * 1e3
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

/// `retrowave bench gpu`.
#[allow(clippy::too_many_arguments)]
pub fn run_gpu(
    device: &str,
    shape: &Path,
    contexts: &[usize],
    steps: usize,
    decode_attention_only: bool,
    checks_only: bool,
    decode_contexts: &[usize],
    out: &Path,
) -> Result<()> {
    let b = gpu(device)?;
    println!(
        "{} ({} SMs, {:.0} GiB); kernels: {}",
        b.info().name,
        b.info().multiprocessors,
        b.info().total_memory as f64 / (1u64 << 30) as f64,
        b.module_reports()
            .iter()
            .map(|r| format!(
                "{} {} {:.2}s",
                r.file,
                if r.from_cache { "cached" } else { "compiled" },
                r.seconds
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if decode_attention_only {
        let ceil = ceilings(&b, out)?;
        for l in decode_attention_bench(&b, &ceil, decode_contexts, out)? {
            println!("{l}");
        }
        wave_select_bench(&b, out)?;
        return Ok(());
    }
    let results = checks::run_all(&b, rand::random()).map_err(anyhow::Error::msg)?;
    let failed = results.iter().filter(|r| !r.passed).count();
    for r in &results {
        println!(
            "check {:<62} rel {:.2e} max {:.2e} nan {} {}",
            r.name,
            r.rel_l2,
            r.max_abs,
            r.non_finite,
            if r.passed { "ok" } else { "FAIL" }
        );
        append(
            out,
            &json!({"bench": "gpu-kernel-check", "check": r.name, "rel_l2": r.rel_l2,
                    "max_abs": r.max_abs, "non_finite": r.non_finite, "tolerance": r.tolerance,
                    "passed": r.passed, "device": card(&b), "commit": commit()}),
        )?;
    }
    if checks_only {
        println!("checks {}/{} passed", results.len() - failed, results.len());
        if failed > 0 {
            bail!("{failed} kernel checks failed");
        }
        return Ok(());
    }
    let ceil = ceilings(&b, out)?;
    pcie_gather_bench(&b, out)?;
    let mut table = vec![format!(
        "{}: checks {}/{} passed; copy {:.0} GB/s; cuBLAS bf16 {:.0} TFLOP/s",
        card(&b),
        results.len() - failed,
        results.len(),
        ceil.copy_gbs,
        ceil.gemm_tflops
    )];
    table.extend(decode_attention_bench(&b, &ceil, decode_contexts, out)?);
    table.extend(wave_select_bench(&b, out)?);
    table.extend(prefill_attention_bench(&b, &ceil, out)?);
    if !contexts.is_empty() {
        match e2e_bench(&b, &ceil, shape, contexts, steps, out) {
            Ok(l) => table.extend(l),
            Err(e) => table.push(format!("e2e failed: {e:#}")),
        }
    }
    println!("\n== summary ==");
    for l in table {
        println!("{l}");
    }
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}

/// Greedy decode of `n` tokens after `prompt` on a worker group; returns the tokens and the
/// logits at each generated position.
fn greedy<B: Backend + 'static>(
    g: &mut WorkerGroup<B>,
    prompt: &[u32],
    n: usize,
    vocab: usize,
) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    g.open_slot(0, prompt.len() + n + 1)?;
    let logits = g.forward(prompt, &one_seq(0, prompt.len()), &[prompt.len() - 1])?;
    let out = decode_steps(g, logits, prompt.len(), n, vocab, None)?;
    g.close_slot(0);
    Ok(out)
}

/// `n` decode steps of slot 0 through the decode kernels, from `logits` (the prompt's last row;
/// the first step is at position `start`): every step's argmax and logits. Each step is fed its
/// own argmax, or `path[i]` when given (teacher forcing).
pub(crate) fn decode_steps<B: Backend + 'static>(
    g: &mut WorkerGroup<B>,
    mut logits: Vec<f32>,
    start: usize,
    n: usize,
    vocab: usize,
    path: Option<&[u32]>,
) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut toks = Vec::with_capacity(n);
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let own = argmax(&logits[..vocab]);
        toks.push(own);
        all.push(logits[..vocab].to_vec());
        if i + 1 == n {
            break;
        }
        let t = path.map_or(own, |p| p[i]);
        logits = g.forward(&[t], &one_seq(start + i, 1), &[0])?;
    }
    Ok((toks, all))
}

pub(crate) fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decode through device sampling (the serving path: token ids back, decode steps as
/// CUDA graphs).
fn greedy_device<B: Backend + 'static>(
    g: &mut WorkerGroup<B>,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>> {
    let row = [RowSampling::greedy()];
    g.open_slot(0, prompt.len() + n + 1)?;
    let mut toks =
        g.forward_sample(prompt, &one_seq(0, prompt.len()), &[prompt.len() - 1], &row)?;
    while toks.len() < n {
        let last = *toks.last().context("no token")?;
        let t = g.forward_sample(
            &[last],
            &one_seq(prompt.len() + toks.len() - 1, 1),
            &[0],
            &row,
        )?;
        toks.extend(t);
    }
    g.close_slot(0);
    Ok(toks)
}

/// Teacher-forced logits of `path` (prompt + tokens) at the positions that predict each token.
fn forced<B: Backend + 'static>(
    g: &mut WorkerGroup<B>,
    prompt: &[u32],
    toks: &[u32],
    vocab: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut seq = prompt.to_vec();
    seq.extend_from_slice(&toks[..toks.len() - 1]);
    g.open_slot(0, seq.len() + 1)?;
    let rows: Vec<usize> = (prompt.len() - 1..seq.len()).collect();
    let l = g.forward(&seq, &one_seq(0, seq.len()), &rows)?;
    g.close_slot(0);
    Ok(l.chunks(vocab).map(|c| c.to_vec()).collect())
}

fn top2(v: &[f32]) -> (usize, usize) {
    let (mut a, mut b) = (0usize, usize::MAX);
    for i in 1..v.len() {
        if v[i] > v[a] {
            b = a;
            a = i;
        } else if b == usize::MAX || v[i] > v[b] {
            b = i;
        }
    }
    (a, b)
}

/// How one run's logits compare with a reference's at the same steps (the parity criteria).
pub(crate) struct Agreement {
    /// Largest |logit difference| on the reference's top-5 tokens.
    pub max_top5: f32,
    /// Steps whose reference top-2 margin exceeds the near-tie margin, and how many of them
    /// have the same argmax in the run.
    pub clear: usize,
    pub agree: usize,
    /// Whether at every near-tie the reference's argmax is in the run's top 2.
    pub top2_ok: bool,
    /// First near-tie step of the reference (`reference.len()` when none).
    pub first_tie: usize,
}

/// Compares `run` with `reference`, step by step, over `vocab` logits each.
pub(crate) fn agreement(
    reference: &[Vec<f32>],
    run: &[Vec<f32>],
    vocab: usize,
    margin: f32,
) -> Agreement {
    let mut a = Agreement {
        max_top5: 0.0,
        clear: 0,
        agree: 0,
        top2_ok: true,
        first_tie: reference.len(),
    };
    for (pos, (c, g)) in reference.iter().zip(run).enumerate() {
        let mut idx: Vec<usize> = (0..vocab).collect();
        idx.sort_by(|&x, &y| c[y].total_cmp(&c[x]));
        for &i in &idx[..5] {
            a.max_top5 = a.max_top5.max((c[i] - g[i]).abs());
        }
        let (ga, gb) = top2(g);
        if c[idx[0]] - c[idx[1]] > margin {
            a.clear += 1;
            a.agree += usize::from(ga == idx[0]);
        } else {
            a.first_tie = a.first_tie.min(pos);
            a.top2_ok &= ga == idx[0] || gb == idx[0];
        }
    }
    a
}

/// `retrowave bench parity`: the GPU against the CPU backend and against the golden llama.cpp
/// outputs on the golden prompts.
///
/// The two backends compute differently (the CPU quantizes activations to 8 bits inside its
/// quantized dot products, the GPU runs bf16 weights and activations with f32 accumulation), so
/// greedy paths may part at a near-tie. Criteria, with `margin` = 0.5 as for the golden tests:
/// teacher-forced on the CPU's greedy path, the GPU's argmax equals the CPU's wherever the CPU's
/// top-2 margin exceeds `margin`, and is in the GPU's top 2 elsewhere; free-running greedy tokens
/// are equal up to the first near-tie of the CPU path (all `n` when there is none); the largest
/// |logit difference| on the CPU's top-5 tokens is at most `tolerance`.
pub fn run_parity(
    model: &str,
    golden: &Path,
    device: &str,
    n: usize,
    tolerance: f32,
    out: &Path,
) -> Result<()> {
    let margin = 0.5f32;
    let m = crate::load::open(model)?;
    let vocab = m.config.vocab_size;
    let text =
        std::fs::read_to_string(golden).with_context(|| format!("reading {}", golden.display()))?;
    let gold: Value = serde_json::from_str(&text)?;
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|v| v as u32))
                    .collect()
            })
            .unwrap_or_default()
    };
    let prompts = gold["prompts"]
        .as_array()
        .context("golden file has no prompts")?;
    let b = gpu(device)?;
    let mut gpu_g = WorkerGroup::load(&m.config, &m.source, vec![b.clone()])?;
    let mut cpu_g = WorkerGroup::load(&m.config, &m.source, vec![CpuBackend::new()])?;
    let mut all_ok = true;
    for (pi, p) in prompts.iter().enumerate() {
        let prompt = ids(&p["prompt_ids"]);
        let (ct, cl) = greedy(&mut cpu_g, &prompt, n, vocab)?;
        let (gt, _) = greedy(&mut gpu_g, &prompt, n, vocab)?;
        let (caps0, reps0) = b.graph_counts();
        let gg = greedy_device(&mut gpu_g, &prompt, n)?;
        let (caps1, reps1) = b.graph_counts();
        let graph_equal = gg == gt;
        let gf = forced(&mut gpu_g, &prompt, &ct, vocab)?;
        let same = ct.iter().zip(&gt).take_while(|(a, b)| a == b).count();
        let Agreement {
            max_top5,
            clear,
            agree: agree_clear,
            top2_ok,
            first_tie,
        } = agreement(&cl, &gf, vocab, margin);
        // Against llama.cpp: teacher-forced on the golden path, its top-5 logits.
        let gold_ids = ids(&p["generated_ids"]);
        let steps = p["per_step"].as_array().cloned().unwrap_or_default();
        let (mut gold_max, mut gold_agree, mut gold_clear) = (0f32, 0usize, 0usize);
        if !gold_ids.is_empty() && steps.len() == gold_ids.len() {
            let gl = forced(&mut gpu_g, &prompt, &gold_ids, vocab)?;
            for (st, g) in steps.iter().zip(&gl) {
                let top5 = st["top5"].as_array().cloned().unwrap_or_default();
                for e in &top5 {
                    if let (Some(id), Some(l)) = (e[0].as_u64(), e[1].as_f64()) {
                        gold_max = gold_max.max((g[id as usize] - l as f32).abs());
                    }
                }
                if st["margin_top1_top2"].as_f64().unwrap_or(0.0) > margin as f64 {
                    gold_clear += 1;
                    gold_agree += usize::from(
                        top5.first().and_then(|e| e[0].as_u64()) == Some(top2(g).0 as u64),
                    );
                }
            }
        }
        let ok =
            agree_clear == clear && top2_ok && same >= first_tie.min(n) && max_top5 <= tolerance;
        all_ok &= ok;
        println!(
            "{} prompt {pi}: greedy equal {same}/{n} (first CPU near-tie at {first_tie}); forced argmax {agree_clear}/{clear} clear positions, near-ties in top-2: {top2_ok}; max |dlogit| vs CPU top-5 {max_top5:.3}; vs llama.cpp top-5 {gold_max:.3}, argmax {gold_agree}/{gold_clear}; graph decode equal {graph_equal} ({} captures, {} replays) {}",
            m.config.name,
            caps1 - caps0,
            reps1 - reps0,
            if ok { "ok" } else { "DIFFERENT" }
        );
        append(
            out,
            &json!({"bench": "gpu-parity", "model": m.config.name, "prompt": pi, "tokens": n,
                    "greedy_equal_prefix": same, "first_cpu_near_tie": first_tie,
                    "forced_argmax_agree_clear": agree_clear, "clear_positions": clear,
                    "near_ties_in_top2": top2_ok, "margin": margin,
                    "max_abs_logit_diff_top5_vs_cpu": max_top5, "tolerance_top5": tolerance,
                    "graph_tokens_equal": graph_equal, "graph_captures": caps1 - caps0,
                    "graph_replays": reps1 - reps0,
                    "max_abs_logit_diff_top5_vs_llamacpp": gold_max,
                    "llamacpp_argmax_agree": gold_agree, "llamacpp_clear_positions": gold_clear,
                    "passed": ok, "device": card(&b), "commit": commit()}),
        )?;
    }
    if !all_ok {
        bail!("GPU and CPU disagree beyond the criteria on some prompt");
    }
    Ok(())
}

pub(crate) fn random_prompt(n: usize, vocab: usize) -> Result<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(3);
    Ok((0..n).map(|_| rng.random_range(0..vocab as u32)).collect())
}

/// What `retrowave bench gpu-model` measures.
pub struct ModelRun<'a> {
    pub device: &'a str,
    pub context: usize,
    pub decode: usize,
    pub chunk: usize,
    pub tp: usize,
    /// Overlap modes to time the prefill with ([`Overlap::parse`]).
    pub overlap: &'a [String],
    pub prefill_runs: usize,
}

/// `retrowave bench gpu-model`: prefill and decode tokens/s of a real model at a context, on one
/// GPU or a tensor-parallel group (the prefill timed once per overlap mode).
pub fn run_model(
    model: Option<&str>,
    random_weights: Option<&Path>,
    run: &ModelRun<'_>,
    out: &Path,
) -> Result<()> {
    let (context, decode, chunk) = (run.context, run.decode, run.chunk);
    let modes = run
        .overlap
        .iter()
        .map(|m| Overlap::parse(m).map_err(|e| anyhow::anyhow!("--overlap {e}")))
        .collect::<Result<Vec<_>>>()?;
    let gpus = gpus(run.device, run.tp)?;
    // Seconds to put the weights on the GPUs (file opening and prompt building excluded).
    let load_s;
    let (cfg, weights, mut g, prompt) = match (model, random_weights) {
        (Some(model), None) => {
            let m = crate::load::open(model)?;
            let t = Instant::now();
            let g = WorkerGroup::load(&m.config, &m.source, gpus.clone())?;
            synchronize(&gpus)?;
            load_s = t.elapsed().as_secs_f64();
            let prompt = crate::bench::essay_prompt(&m.tokenizer, context)
                .or_else(|_| random_prompt(context, m.config.vocab_size))?;
            (m.config.clone(), "real (dequantized to bf16)", g, prompt)
        }
        (None, Some(shape)) => {
            let cfg = load_shape(shape)?;
            let t = Instant::now();
            let src = RandomWeights::new(&cfg, 1)?;
            let g = WorkerGroup::load(&cfg, &src as &dyn WeightSource, gpus.clone())?;
            synchronize(&gpus)?;
            load_s = t.elapsed().as_secs_f64();
            let prompt = random_prompt(context, cfg.vocab_size)?;
            (cfg, "random (bf16); random prompt tokens", g, prompt)
        }
        _ => bail!("give exactly one of --model and --random-weights"),
    };
    let b = &gpus[0];
    // Prefill once per mode and run, alternating; the fastest run of each mode is kept.
    let mut best = vec![f64::INFINITY; modes.len()];
    let mut last = Vec::new();
    for _ in 0..run.prefill_runs.max(1) {
        for (mi, &mode) in modes.iter().enumerate() {
            g.set_overlap(mode)?;
            g.close_slot(0);
            g.open_slot(0, context + decode + 1)?;
            synchronize(&gpus)?;
            let t = Instant::now();
            let mut pos = 0;
            while pos < context {
                let n = chunk.min(context - pos);
                let rows = if pos + n == context {
                    vec![n - 1]
                } else {
                    vec![]
                };
                last = g.forward(&prompt[pos..pos + n], &one_seq(pos, n), &rows)?;
                pos += n;
            }
            synchronize(&gpus)?;
            best[mi] = best[mi].min(t.elapsed().as_secs_f64());
        }
    }
    let mut tok = argmax(&last[..cfg.vocab_size]);
    let greedy = [RowSampling::greedy()];
    let (caps0, reps0) = b.graph_counts();
    let t = Instant::now();
    for i in 0..decode {
        let l = g.forward_sample(&[tok], &one_seq(context + i, 1), &[0], &greedy)?;
        tok = *l.first().context("no token")?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    for (mode, prefill_s) in run.overlap.iter().zip(&best) {
        let rec = json!({"bench": "gpu-model", "model": cfg.name, "context": context,
            "prefill_chunk": chunk, "prefill_tokens_per_s": context as f64 / prefill_s,
            "tp": run.tp, "overlap": mode, "prefill_runs": run.prefill_runs,
            "skip_all_reduce": retrowave_cuda::nccl::skipping(),
            "decode_tokens": decode, "decode_tokens_per_s": decode as f64 / decode_s,
            "weights": weights, "load_seconds": load_s,
            "cuda_graphs": {"captures": b.graph_counts().0 - caps0, "replays": b.graph_counts().1 - reps0},
            "device": cards(&gpus), "commit": commit()});
        println!("{rec}");
        append(out, &rec)?;
    }
    Ok(())
}
