//! `retrowave bench ...`: benchmarks that write JSON records (one object per line) to
//! bench/results/.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use retrowave_engine::Event;
use retrowave_model::registry;
use retrowave_model::sampling::SamplingParams;
use serde_json::json;

use crate::load;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Load generator for `retrowave serve`: request throughput, output tokens/s, time to first
    /// token and inter-token latency (p50, p99) under concurrent streaming requests.
    Serve(crate::servebench::ServeBenchArgs),
    /// GPU: kernel checks, measured ceilings (copy, cuBLAS), decode and prefill attention
    /// kernels at the Llama-3-8B layer shape, end-to-end dense decode of a random-weight model.
    Gpu {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Model shape for the end-to-end decode (random weights).
        #[arg(long, default_value = "configs/models/llama-3-8b.toml")]
        shape: PathBuf,
        /// Contexts of the end-to-end decode (empty: skip it).
        #[arg(long, default_value = "8192,32768,131072", value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Timed decode steps per context.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Only the ceilings and the decode attention kernel (e.g. to compare
        /// `RETROWAVE_DECODE_STAGES` settings).
        #[arg(long)]
        decode_attention_only: bool,
        /// Only the kernel checks.
        #[arg(long)]
        checks_only: bool,
        /// Contexts of the decode attention kernel benchmark.
        #[arg(long, default_value = "32768,131072", value_delimiter = ',')]
        decode_contexts: Vec<usize>,
        #[arg(long, default_value = "bench/results/gpu.jsonl")]
        out: PathBuf,
    },
    /// GPU end-to-end decode of a random-weight model, dense and wave attention, over contexts
    /// and a batch sweep (synthetic KV, no prefill): tokens/s of each at its best batch, bytes
    /// a step moves and the roofline from the measured copy rate.
    Decode {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, default_value = "configs/models/llama-3-8b.toml")]
        shape: PathBuf,
        #[arg(long, default_value = "32768,131072", value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Batches to try (the largest that fits is always added).
        #[arg(long, default_value = "1,4,8,16,32,64", value_delimiter = ',')]
        batches: Vec<usize>,
        /// Timed decode steps per point (after 3 warm-up steps); the median is reported.
        #[arg(long, default_value_t = 12)]
        steps: usize,
        /// Attention modes: full and/or wave.
        #[arg(long, default_value = "full,wave", value_delimiter = ',')]
        attention: Vec<String>,
        /// TOML file of wave-index parameters (retrowave's defaults otherwise).
        #[arg(long)]
        wave_config: Option<PathBuf>,
        /// Batches of the per-stage breakdown of one wave attention layer (0: none).
        #[arg(long, default_value = "1,8", value_delimiter = ',')]
        stage_batches: Vec<usize>,
        /// Input tokens of the timed steps: `random` (a new random token per row and step: no
        /// locality between steps' queries, the worst case for the wave buffers) or `greedy`
        /// (each row's greedy pick of the step before, as a real decode feeds them).
        #[arg(long, default_value = "random", value_parser = ["random", "greedy"])]
        tokens: String,
        /// Tensor-parallel degree: GPUs from --device on, one worker each (NCCL between them).
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Most sequences (0: as many as fit in GPU and, with the host tier, host memory).
        #[arg(long, default_value_t = 0)]
        max_batch: usize,
        #[arg(long, default_value = "bench/results/gpu-decode.jsonl")]
        out: PathBuf,
    },
    /// GPU against CPU on the golden prompts: greedy tokens and teacher-forced logits.
    Parity {
        #[arg(long, short)]
        model: String,
        /// Golden file with `prompts[].prompt_ids` (../shared/golden/<model>.json).
        #[arg(long)]
        golden: PathBuf,
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Largest |logit difference| accepted on the CPU's top-5 tokens.
        #[arg(long, default_value_t = 1.0)]
        tolerance: f32,
        #[arg(long, default_value = "bench/results/gpu-parity.jsonl")]
        out: PathBuf,
    },
    /// Tensor-parallel decode on several GPUs against one GPU: logits teacher-forced on one
    /// GPU's greedy path and free-running greedy tokens, dense and wave.
    TpParity {
        #[arg(long, short)]
        model: Option<String>,
        /// Model shape file: random bf16 weights and random prompt tokens.
        #[arg(long)]
        random_weights: Option<PathBuf>,
        /// First GPU; ranks take consecutive GPUs from it.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Tensor-parallel degrees to compare with one GPU.
        #[arg(long, default_value = "2", value_delimiter = ',')]
        tp: Vec<usize>,
        #[arg(long, default_value_t = 8192)]
        prompt: usize,
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Attention modes: full and/or wave.
        #[arg(long, default_value = "full,wave", value_delimiter = ',')]
        attention: Vec<String>,
        /// TOML file of wave-index parameters (retrowave's defaults otherwise).
        #[arg(long)]
        wave_config: Option<PathBuf>,
        /// Largest |logit difference| accepted on one GPU's top-5 tokens.
        #[arg(long, default_value_t = 0.5)]
        tolerance: f32,
        #[arg(long, default_value = "bench/results/gpu-tp-parity.jsonl")]
        out: PathBuf,
    },
    /// A rank of a tensor-parallel GPU group failing in the middle of a step: the step fails on
    /// every rank instead of hanging, the group is rebuilt, and decoding goes on unchanged.
    TpRecover {
        /// Model shape file: random bf16 weights and random prompt tokens.
        #[arg(long, default_value = "configs/models/llama-3-8b.toml")]
        random_weights: PathBuf,
        /// First GPU; ranks take consecutive GPUs from it.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, default_value_t = 2)]
        tp: usize,
        #[arg(long, default_value_t = 8192)]
        prompt: usize,
        #[arg(long, default_value_t = 16)]
        tokens: usize,
        /// The rank that fails, and the layer where it fails.
        #[arg(long, default_value_t = 1)]
        fail_rank: usize,
        #[arg(long, default_value_t = 16)]
        fail_layer: usize,
        #[arg(long, default_value = "bench/results/gpu-tp-recover.jsonl")]
        out: PathBuf,
    },
    /// GPU prefill and decode tokens/s of a model at one context: real weights (--model) or
    /// random weights of a shape (--random-weights configs/models/llama-3-8b.toml).
    GpuModel {
        #[arg(long, short)]
        model: Option<String>,
        /// Model shape file: random bf16 weights and random prompt tokens (records say so).
        #[arg(long)]
        random_weights: Option<PathBuf>,
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, default_value_t = 32768)]
        context: usize,
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 8192)]
        prefill_chunk: usize,
        /// Tensor-parallel degree: GPUs from --device on, one worker each.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// With --tp > 1, how steps overlap their collectives, each timed over the whole
        /// prefill in turn: `off`, `auto` (the default rule), `always`, or a row count (cut
        /// prefill steps from there).
        #[arg(long, default_value = "auto", value_delimiter = ',')]
        overlap: Vec<String>,
        /// Timed prefills per overlap mode (alternating between modes); the fastest is kept.
        #[arg(long, default_value_t = 1)]
        prefill_runs: usize,
        #[arg(long, default_value = "bench/results/gpu.jsonl")]
        out: PathBuf,
    },
    /// Prefill and decode tokens/s of one sequence at given prompt lengths.
    Generate {
        #[arg(long, short, default_value = registry::DEFAULT_MODEL)]
        model: String,
        /// Prompt lengths in tokens, comma-separated.
        #[arg(long, default_value = "2048,8192", value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Greedy decode steps after the prompt.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Runs per length (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Tensor-parallel degree.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Decode attention: full or wave.
        #[arg(long, default_value = "full")]
        attention: String,
        /// TOML file of wave-index parameters for `--attention wave` (retrowave's defaults
        /// otherwise; keys not given keep them).
        #[arg(long)]
        wave_config: Option<PathBuf>,
        /// JSON-lines file to append to (default bench/results/generate-<model>.jsonl).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Decode attention of one layer, full vs wave, on synthetic KV (Llama-3-8B layer shape by
    /// default), with bytes read per step against the measured memory bandwidth.
    Attention {
        /// Context lengths, comma-separated.
        #[arg(long, default_value = "8192,32768,131072", value_delimiter = ',')]
        contexts: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        heads: usize,
        #[arg(long, default_value_t = 8)]
        kv_heads: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Timed steps per (context, mode); the median is reported.
        #[arg(long, default_value_t = 15)]
        runs: usize,
        /// Timed wave steps (default: --runs), e.g. many more to profile the wave path.
        #[arg(long)]
        wave_runs: Option<usize>,
        /// TOML file of wave-index parameters (retrowave's defaults otherwise; keys not given keep
        /// them).
        #[arg(long)]
        wave_config: Option<PathBuf>,
        /// Layers of KV (each its own data and index), attended in turn every step as in a
        /// decode step, so that no layer finds its own data of the step before in the caches
        /// (1: the same layer repeated, on warm caches).
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Keep the wave KV in a tiered store with its disk tier in this directory (as `generate
        /// --store-dir`), to measure what reading through the store costs a step.
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// Host memory of that store, in bytes (records beyond it spill to the disk tier).
        #[arg(long, default_value_t = retrowave_store::StoreConfig::default().host_capacity_bytes)]
        store_host_bytes: u64,
        /// JSON-lines file to append to (default bench/results/attention-cpu.jsonl).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The tiered KV store: random reads of cluster records from the disk tier (io_uring and
    /// pread, against fio on the same file) and gathers from the host arena (against memcpy).
    Store {
        /// Directory for the disk tier's file (put it on the disk to measure).
        #[arg(long, default_value = "/var/tmp")]
        dir: PathBuf,
        /// MiB of records on disk (0: skip the disk tier).
        #[arg(long, default_value_t = 1024)]
        file_mib: u64,
        /// Tokens per cluster record (16 tokens x 128 dims x bf16 keys and values = 8 KiB).
        #[arg(long, default_value_t = 16)]
        cluster_tokens: u32,
        #[arg(long, default_value_t = 128)]
        head_dim: u32,
        /// Reads in flight (ours and fio's).
        #[arg(long, default_value_t = 64)]
        queue_depth: u32,
        /// Seconds per disk measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// MiB of records in host memory for the gather test.
        #[arg(long, default_value_t = 1024)]
        host_mib: u64,
        /// Clusters per gather.
        #[arg(long, default_value_t = 256)]
        gather_clusters: usize,
        /// JSON-lines file to append to (default bench/results/store.jsonl).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The haystack prompt: the Paul Graham essays, sorted by file name, joined by blank lines,
/// tokenized without special-token parsing and cut to `n` tokens (the llama.cpp anchor script
/// builds its prompt the same way).
pub fn essay_prompt(tok: &retrowave_model::tokenizer::Tokenizer, n: usize) -> Result<Vec<u32>> {
    let dir = registry::ensure_dataset("paul-graham-essays")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in &files {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        );
    }
    let mut ids = tok.encode(&text, true, false)?;
    if ids.len() < n {
        bail!("the essays give only {} tokens, {n} asked", ids.len());
    }
    ids.truncate(n);
    Ok(ids)
}

/// The CPU model name and the worker threads, for the `device` field.
pub fn cpu_device() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{name}, {} threads", rayon::current_num_threads())
}

/// The commit the binary was built from (`-dirty` if the tree had uncommitted changes).
pub fn commit() -> String {
    env!("RETROWAVE_BUILD_COMMIT").to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Serve(args) => crate::servebench::run(args),
        BenchCommand::Gpu {
            device,
            shape,
            contexts,
            steps,
            decode_attention_only,
            checks_only,
            decode_contexts,
            out,
        } => crate::gpubench::run_gpu(
            &device,
            &shape,
            &contexts,
            steps,
            decode_attention_only,
            checks_only,
            &decode_contexts,
            &out,
        ),
        BenchCommand::Decode {
            device,
            shape,
            contexts,
            batches,
            steps,
            attention,
            wave_config,
            stage_batches,
            tokens,
            tp,
            max_batch,
            out,
        } => {
            let wave = match load::attention_mode("wave", wave_config.as_deref())? {
                retrowave_core::AttentionMode::Wave(c) => c,
                retrowave_core::AttentionMode::Full => retrowave_core::WaveConfig::retrowave(),
            };
            crate::decodebench::run_decode(
                &device,
                &shape,
                &contexts,
                &batches,
                steps,
                &attention,
                &wave,
                &stage_batches,
                tokens == "greedy",
                tp,
                max_batch,
                &out,
            )
        }
        BenchCommand::Parity {
            model,
            golden,
            device,
            tokens,
            tolerance,
            out,
        } => crate::gpubench::run_parity(&model, &golden, &device, tokens, tolerance, &out),
        BenchCommand::TpParity {
            model,
            random_weights,
            device,
            tp,
            prompt,
            tokens,
            attention,
            wave_config,
            tolerance,
            out,
        } => {
            if tokens == 0 || prompt == 0 {
                bail!("--prompt and --tokens must be at least 1");
            }
            let modes = attention
                .iter()
                .map(|a| load::attention_mode(a, wave_config.as_deref()))
                .collect::<Result<Vec<_>>>()?;
            crate::tpbench::run_tp_parity(
                model.as_deref(),
                random_weights.as_deref(),
                &device,
                &tp,
                prompt,
                tokens,
                &modes,
                tolerance,
                &out,
            )
        }
        BenchCommand::TpRecover {
            random_weights,
            device,
            tp,
            prompt,
            tokens,
            fail_rank,
            fail_layer,
            out,
        } => crate::tpbench::run_tp_recover(
            &random_weights,
            &device,
            tp,
            prompt,
            tokens,
            fail_rank,
            fail_layer,
            &out,
        ),
        BenchCommand::GpuModel {
            model,
            random_weights,
            device,
            context,
            decode_tokens,
            prefill_chunk,
            tp,
            overlap,
            prefill_runs,
            out,
        } => crate::gpubench::run_model(
            model.as_deref(),
            random_weights.as_deref(),
            &crate::gpubench::ModelRun {
                device: &device,
                context,
                decode: decode_tokens,
                chunk: prefill_chunk,
                tp,
                overlap: &overlap,
                prefill_runs,
            },
            &out,
        ),
        BenchCommand::Store {
            dir,
            file_mib,
            cluster_tokens,
            head_dim,
            queue_depth,
            seconds,
            host_mib,
            gather_clusters,
            out,
        } => {
            if cluster_tokens == 0 || head_dim == 0 || queue_depth == 0 || gather_clusters == 0 {
                bail!(
                    "--cluster-tokens, --head-dim, --queue-depth and --gather-clusters must be at least 1"
                );
            }
            crate::storebench::run(crate::storebench::StoreBench {
                dir,
                file_bytes: file_mib << 20,
                cluster_tokens,
                head_dim,
                queue_depth,
                seconds,
                host_bytes: host_mib << 20,
                gather_clusters,
                out: out.unwrap_or_else(|| PathBuf::from("bench/results/store.jsonl")),
            })
        }
        BenchCommand::Attention {
            contexts,
            heads,
            kv_heads,
            head_dim,
            runs,
            wave_runs,
            wave_config,
            layers,
            store_dir,
            store_host_bytes,
            out,
        } => {
            if kv_heads == 0 || heads % kv_heads != 0 || head_dim == 0 {
                anyhow::bail!(
                    "--heads must be a multiple of --kv-heads, and both and --head-dim non-zero"
                );
            }
            let wave = match load::attention_mode("wave", wave_config.as_deref())? {
                retrowave_core::AttentionMode::Wave(c) => c,
                retrowave_core::AttentionMode::Full => retrowave_core::WaveConfig::published(),
            };
            let layout = retrowave_core::HeadLayout {
                n_heads: heads,
                n_kv_heads: kv_heads,
                head_dim,
            };
            let store = load::cpu_store_in(store_dir.into_iter().collect(), store_host_bytes)?;
            crate::attnbench::run(
                &contexts,
                layout,
                crate::attnbench::Steps {
                    runs,
                    wave_runs,
                    layers,
                },
                &wave,
                store,
                out,
            )
        }
        BenchCommand::Generate {
            model,
            contexts,
            decode_tokens,
            runs,
            tp,
            prefill_chunk,
            attention,
            wave_config,
            out,
        } => {
            let loaded = load::open(&model)?;
            let max_ctx = contexts.iter().max().copied().unwrap_or(0) + decode_tokens + 16;
            let mode = load::attention_mode(&attention, wave_config.as_deref())?;
            let wave_cfg = mode.wave().map(serde_json::to_value).transpose()?;
            let mut engine = load::engine(
                &loaded,
                load::EngineOptions {
                    attention: mode,
                    tp,
                    max_context: max_ctx,
                    prefill_chunk,
                    store: None,
                },
            )?;
            let out = out
                .unwrap_or_else(|| PathBuf::from(format!("bench/results/generate-{model}.jsonl")));
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let device = cpu_device();
            let commit = commit();
            let tok = engine.tokenizer().clone();
            for &n in &contexts {
                let prompt = essay_prompt(&tok, n)?;
                let (mut pre, mut dec, mut build) = (Vec::new(), Vec::new(), Vec::new());
                for run in 0..runs.max(1) {
                    let params = SamplingParams {
                        max_tokens: decode_tokens + 1,
                        ignore_eos: true,
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let id = engine.add_request(prompt.clone(), params)?;
                    let usage = loop {
                        let evs = engine.step()?;
                        if let Some(u) = evs.iter().find_map(|e| match e {
                            Event::Finished { id: f, usage, .. } if *f == id => Some(*usage),
                            _ => None,
                        }) {
                            break u;
                        }
                    };
                    let p = n as f64 / usage.prefill.as_secs_f64();
                    let d = decode_tokens as f64 / usage.decode.as_secs_f64();
                    eprintln!(
                        "{model} context {n} run {}: prefill {p:.1} tok/s, decode {d:.1} tok/s ({:.1} s)",
                        run + 1,
                        t.elapsed().as_secs_f64()
                    );
                    pre.push(p);
                    dec.push(d);
                    build.push(usage.wave.map_or(0.0, |w| w.build_seconds));
                }
                let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&out)?;
                let mut metrics = vec![
                    ("prefill_tokens_per_s", median(pre), "tokens/s"),
                    ("decode_tokens_per_s", median(dec), "tokens/s"),
                ];
                if attention == "wave" {
                    metrics.push(("index_build_seconds", median(build), "s"));
                }
                for (metric, v, unit) in metrics {
                    let rec = json!({
                        "bench": "generate", "engine": "retrowave", "metric": metric, "value": v,
                        "unit": unit, "attention": attention, "device": device, "model": model, "context": n,
                        "decode_tokens": decode_tokens, "runs": runs, "tp": tp, "commit": commit, "timestamp": ts,
                        "wave_config": wave_cfg,
                    });
                    writeln!(f, "{rec}")?;
                    println!("{rec}");
                }
            }
            Ok(())
        }
    }
}
