//! The `retrowave eval` command.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use retrowave_model::registry;
use serde_json::json;

use super::run::{self, EvalSettings, Table};
use super::tasks::{self, Haystack, TaskKind};
use crate::bench::{commit, cpu_device};
use crate::load;

/// Arguments of `retrowave eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Registry name or path of the model.
    #[arg(long, short, default_value = registry::DEFAULT_MODEL, env = "RETROWAVE_MODEL")]
    model: String,
    /// Generated tasks, comma-separated (single-needle, multi-key, multi-value,
    /// variable-tracking).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single-needle,multi-key,multi-value,variable-tracking"
    )]
    tasks: Vec<String>,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    lengths: Vec<usize>,
    /// Cases per (task, length).
    #[arg(long, default_value_t = 10)]
    cases: usize,
    /// Seed of the generated cases.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cases from a JSON-lines file (`input`, `outputs`) instead of generated tasks.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Attention modes to compare, comma-separated; the first is the baseline of the gap.
    /// `full`, `wave`, `wave:published`, or `wave=FILE.toml` for wave-index parameters from a
    /// file (labelled `wave:<file stem>`).
    #[arg(long, value_delimiter = ',', default_value = "full,wave")]
    attention: Vec<String>,
    /// TOML file of wave-index parameters for the wave mode.
    #[arg(long)]
    wave_config: Option<PathBuf>,
    /// Most answer tokens.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Also measure the fidelity of wave attention (per layer and head) over this many decode
    /// steps of every case (slow: exact attention in f64 beside every wave step).
    #[arg(long, default_value_t = 0)]
    fidelity: usize,
    /// Feed every mode the first mode's greedy answer and report, per mode, how often its most
    /// likely next token agrees with the first mode's and the mean KL divergence from it: a
    /// measure of an approximation's damage that does not hang on where greedy answers diverge.
    #[arg(long)]
    teacher_forced: bool,
    /// Tensor-parallel degree (workers; on GPUs, consecutive devices from --device's).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Where the model runs: cpu, cuda[:N] or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// JSON-lines file the records are appended to (default bench/results/eval-<model>.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the cases (generated or loaded) to this JSON-lines file, in the format
    /// `--data` reads.
    #[arg(long)]
    write_cases: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let model = load::open(&args.model)?;
    let tok = model.tokenizer.clone();
    let mut modes = Vec::with_capacity(args.attention.len());
    let mut names = Vec::with_capacity(args.attention.len());
    for a in &args.attention {
        if let Some(file) = a.strip_prefix("wave=") {
            let path = std::path::Path::new(file);
            modes.push(load::attention_mode("wave", Some(path))?);
            let stem = path
                .file_stem()
                .map_or_else(|| file.to_string(), |s| s.to_string_lossy().into_owned());
            names.push(format!("wave:{stem}"));
        } else {
            let mode = load::attention_mode(a, args.wave_config.as_deref())?;
            names.push(mode.label());
            modes.push(mode);
        }
    }
    if modes.is_empty() {
        bail!("--attention names no mode");
    }
    let cases = match &args.data {
        Some(path) => super::data::load_jsonl(path)?,
        None => {
            let kinds = args
                .tasks
                .iter()
                .map(|t| t.parse::<TaskKind>().map_err(anyhow::Error::msg))
                .collect::<Result<Vec<_>>>()?;
            let dir = registry::ensure_dataset("paul-graham-essays")?;
            let haystack = Haystack::load(&dir)?;
            let count = |s: &str| tok.encode(s, true, false).map_or(usize::MAX, |v| v.len());
            eprintln!(
                "generating {} cases ({} tasks x {} lengths x {})",
                kinds.len() * args.lengths.len() * args.cases,
                kinds.len(),
                args.lengths.len(),
                args.cases
            );
            tasks::suite(
                &kinds,
                &args.lengths,
                args.cases,
                args.seed,
                &haystack,
                &count,
            )?
        }
    };
    if cases.is_empty() {
        bail!("no cases to run");
    }
    if let Some(path) = &args.write_cases {
        super::data::write_jsonl(path, &cases)?;
        eprintln!("{} cases written to {}", cases.len(), path.display());
    }
    let mut lens = Vec::with_capacity(cases.len());
    for c in &cases {
        lens.push(tok.encode(&c.input, true, false)?.len());
    }
    let longest = lens.iter().copied().max().unwrap_or(0);
    let max_context = longest + args.max_tokens + 1;
    if max_context > model.config.context_length {
        tracing::warn!(
            "cases need {max_context} tokens of context; {} was trained for {}",
            model.config.name,
            model.config.context_length
        );
    }
    let ctx = Prepared {
        tok,
        cases,
        lens,
        names,
        modes,
        max_context,
    };
    match load::cuda_backends(&args.device, args.tp)? {
        Some(gpus) => {
            // With tensor parallelism the label says how many GPUs the ranks took.
            let name = match gpus.len() {
                1 => format!("{} (CUDA)", crate::gpubench::cards(&gpus)),
                n => format!(
                    "{} (CUDA, tensor parallel {n})",
                    crate::gpubench::cards(&gpus)
                ),
            };
            let group = retrowave_engine::WorkerGroup::load(&model.config, &model.source, gpus)
                .context("loading the model")?;
            evaluate(&args, group, ctx, name)
        }
        None => {
            let backends = (0..args.tp.max(1))
                .map(|_| retrowave_cpu::CpuBackend::new())
                .collect();
            let group = retrowave_engine::WorkerGroup::load(&model.config, &model.source, backends)
                .context("loading the model")?;
            evaluate(&args, group, ctx, cpu_device())
        }
    }
}

/// What the cases need, prepared before the workers are chosen.
struct Prepared {
    tok: std::sync::Arc<retrowave_model::tokenizer::Tokenizer>,
    cases: Vec<tasks::Case>,
    lens: Vec<usize>,
    names: Vec<String>,
    modes: Vec<retrowave_core::AttentionMode>,
    max_context: usize,
}

/// Runs every case on `group` and writes the table and records.
fn evaluate<B: retrowave_core::Backend + 'static>(
    args: &EvalArgs,
    mut group: retrowave_engine::WorkerGroup<B>,
    ctx: Prepared,
    device: String,
) -> Result<()> {
    let Prepared {
        tok,
        cases,
        lens,
        names,
        modes,
        max_context,
    } = ctx;
    let settings = EvalSettings {
        modes: modes.clone(),
        max_tokens: args.max_tokens,
        fidelity_steps: args.fidelity,
        teacher_forced: args.teacher_forced,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| run::default_out(&args.model));
    let commit = commit();
    let model_name = run::model_label(&args.model);
    let bar = ProgressBar::new(cases.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} cases, {elapsed} elapsed, eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut table = Table::new(&names, args.teacher_forced);
    let mut fidelity = Vec::new();
    for (case, &n_tokens) in cases.iter().zip(&lens) {
        let r = run::run_case(&mut group, &tok, case, &settings, max_context)?;
        let length = if case.context_tokens > 0 {
            case.context_tokens
        } else {
            n_tokens
        };
        table.add(&case.task, length, &r);
        let mut records = Vec::new();
        for (mode, a) in names.iter().zip(&r.answers) {
            records.push(json!({
                "bench": "eval", "kind": "case", "model": model_name, "task": case.task,
                "length": length, "prompt_tokens": r.prompt_tokens, "depth": case.depth,
                "seed": case.seed, "attention": mode, "score": a.score, "answer": a.text,
                "expected": case.outputs, "answer_tokens": a.tokens, "case_seconds": r.seconds,
                "top1_agreement": a.forced.map(|f| f.top1_percent()),
                "mean_kl": a.forced.map(|f| f.mean_kl()),
                "mean_nll": a.forced.map(|f| f.nll / f.steps.max(1) as f64),
                "teacher_forced": args.teacher_forced,
                // (The GPU backend does not count exact and estimated tokens yet: null there.)
                "exact_share": a.wave.filter(|w| w.exact_tokens > 0).map(|w| w.exact_tokens as f64 / w.context_tokens.max(1) as f64),
                "estimated_share": a.wave.filter(|w| w.exact_tokens > 0).map(|w| w.estimated_tokens as f64 / w.context_tokens.max(1) as f64),
                // The wave buffer (simulated on the CPU): pages of retrieval clusters it served,
                // after each head's first step, and the pages involved.
                "wave_buffer_warm_hit_ratio": a.wave.and_then(|w| w.warm_hit_ratio()),
                "wave_buffer_pages": a.wave.map(|w| json!({"hit": w.cache_hit_pages, "miss": w.cache_miss_pages, "cold": w.cache_cold_pages})),
                "device": device, "commit": commit,
            }));
        }
        run::append_records(&out, &records)?;
        fidelity.extend(r.fidelity);
        bar.set_message(format!(
            "{} @{}: {}",
            case.task,
            length,
            r.answers
                .iter()
                .zip(&names)
                .map(|(a, m)| format!("{m} {:.0}", a.score))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        bar.inc(1);
    }
    bar.finish();
    println!("{}", table.render());
    let ts = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut records = Vec::new();
    for row in table.rows() {
        let cells = names.iter().zip(&modes).zip(&row.means).zip(&row.agreement);
        for (((mode, m), mean), ag) in cells {
            records.push(json!({
                "bench": "eval", "kind": "summary", "model": model_name, "task": row.task,
                "length": row.length, "cases": row.cases, "attention": mode, "score": mean,
                "gap_vs_first": mean - row.means[0], "wave_config": m.wave().map(|c| json!(c)),
                "teacher_forced": args.teacher_forced,
                "top1_agreement": args.teacher_forced.then(|| ag.top1_percent()),
                "mean_kl": args.teacher_forced.then(|| ag.mean_kl()),
                "device": device, "commit": commit, "timestamp": ts,
            }));
        }
    }
    for (mi, label) in names.iter().enumerate() {
        let samples: Vec<_> = fidelity
            .iter()
            .filter(|(m, _)| *m == mi)
            .map(|(_, f)| *f)
            .collect();
        if samples.is_empty() {
            continue;
        }
        let rows = run::fidelity_summary(&samples);
        println!("fidelity of {label} attention (means over heads, decode steps and cases):");
        println!("{}", run::render_fidelity(&rows));
        for r in rows {
            let mut r = r;
            r["attention"] = json!(label);
            r["bench"] = json!("eval");
            r["kind"] = json!("fidelity");
            r["model"] = json!(model_name);
            r["lengths"] = json!(args.lengths);
            r["device"] = json!(device);
            r["commit"] = json!(commit);
            r["timestamp"] = json!(ts);
            records.push(r);
        }
    }
    run::append_records(&out, &records)?;
    eprintln!("records appended to {}", out.display());
    Ok(())
}
