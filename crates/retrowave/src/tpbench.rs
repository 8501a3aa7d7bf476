//! `retrowave bench tp-parity`: tensor-parallel decode against one GPU.
//!
//! The model runs on one GPU (TP=1) and then on `tp` GPUs (one worker each, NCCL all-reduce),
//! dense and wave. Each run prefills the same prompt, builds the index (wave), and decodes
//! teacher-forced on TP=1's greedy path through the decode kernels, so that every step compares
//! logits of the same inputs; then it decodes freely through device sampling (the serving path:
//! CUDA graphs with the collectives inside) and compares the greedy tokens.
//!
//! The ranks sum their row-parallel partial outputs in a different order from one GPU's GEMM
//! (and round the attention output of fewer heads), so logits differ at the level of bf16
//! rounding. Criteria, with a near-tie margin of 0.5 as for `bench parity`: the argmax equals
//! TP=1's wherever TP=1's top-2 margin exceeds it, and lies in the top 2 elsewhere; free-running
//! greedy tokens equal TP=1's up to TP=1's first near-tie; the largest |logit difference| on
//! TP=1's top-5 tokens is at most `tolerance`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use retrowave_core::{AttentionMode, BatchLayout, RowSampling, WaveConfig};
use retrowave_cuda::CudaBackend;
use retrowave_engine::WorkerGroup;
use retrowave_model::arch::WeightSource;
use retrowave_model::random::{RandomWeights, load_shape};
use serde_json::json;

use crate::bench::commit;
use crate::gpubench::{
    Agreement, agreement, append, cards, decode_steps, gpus, one_seq, random_prompt,
};

/// What one run (one degree, one attention mode) produced.
struct Run {
    /// Logits of every decode step, teacher-forced on the reference path.
    logits: Vec<Vec<f32>>,
    /// Free-running greedy tokens through device sampling.
    free: Vec<u32>,
}

/// Opens slot 0 for `prompt` and `n` more tokens and prefills it in chunks of 4096; `last` runs
/// the final chunk (asking for the prompt's last row), and its result is returned after the
/// index is built (wave).
fn prefill<T>(
    g: &mut WorkerGroup<CudaBackend>,
    prompt: &[u32],
    n: usize,
    wave: Option<&WaveConfig>,
    last: impl FnOnce(&mut WorkerGroup<CudaBackend>, &[u32], &BatchLayout, &[usize]) -> Result<T>,
) -> Result<T> {
    const CHUNK: usize = 4096;
    g.open_slot(0, prompt.len() + n + 1)?;
    let tail = (prompt.len() - 1) / CHUNK * CHUNK;
    for pos in (0..tail).step_by(CHUNK) {
        g.forward(&prompt[pos..pos + CHUNK], &one_seq(pos, CHUNK), &[])?;
    }
    let k = prompt.len() - tail;
    let out = last(g, &prompt[tail..], &one_seq(tail, k), &[k - 1])?;
    if let Some(w) = wave {
        g.build_index(0, w)?;
    }
    Ok(out)
}

/// Prefill (and index), then `n` decode steps through the decode kernels fed with `path` (the
/// reference's greedy tokens; `None`: this run's own argmax, which makes it the reference).
/// Returns the argmax and the logits of every step.
fn run_once(
    g: &mut WorkerGroup<CudaBackend>,
    prompt: &[u32],
    n: usize,
    vocab: usize,
    wave: Option<&WaveConfig>,
    path: Option<&[u32]>,
) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let logits = prefill(g, prompt, n, wave, |g, t, l, r| Ok(g.forward(t, l, r)?))?;
    let out = decode_steps(g, logits, prompt.len(), n, vocab, path)?;
    g.close_slot(0);
    Ok(out)
}

/// Prefill (and index), then free-running greedy decode through device sampling (the serving
/// path: CUDA graphs, the collectives inside).
fn run_free(
    g: &mut WorkerGroup<CudaBackend>,
    prompt: &[u32],
    n: usize,
    wave: Option<&WaveConfig>,
) -> Result<Vec<u32>> {
    let row = [RowSampling::greedy()];
    let mut toks = prefill(g, prompt, n, wave, |g, t, l, r| {
        Ok(g.forward_sample(t, l, r, &row)?)
    })?;
    while toks.len() < n {
        let last = *toks.last().context("no token")?;
        let pos = prompt.len() + toks.len() - 1;
        toks.extend(g.forward_sample(&[last], &one_seq(pos, 1), &[0], &row)?);
    }
    g.close_slot(0);
    Ok(toks)
}

/// `retrowave bench tp-parity`.
#[allow(clippy::too_many_arguments)]
pub fn run_tp_parity(
    model: Option<&str>,
    random_weights: Option<&Path>,
    device: &str,
    tps: &[usize],
    prompt_len: usize,
    n: usize,
    modes: &[AttentionMode],
    tolerance: f32,
    out: &Path,
) -> Result<()> {
    let margin = 0.5f32;
    enum Src {
        Model(crate::load::LoadedModel),
        Random(RandomWeights),
    }
    let (cfg, src, weights) = match (model, random_weights) {
        (Some(m), None) => {
            let m = crate::load::open(m)?;
            (
                m.config.clone(),
                Src::Model(m),
                "real (dequantized to bf16)",
            )
        }
        (None, Some(shape)) => {
            let cfg = load_shape(shape)?;
            let w = RandomWeights::new(&cfg, 1)?;
            (cfg, Src::Random(w), "random (bf16)")
        }
        _ => bail!("give exactly one of --model and --random-weights"),
    };
    let source: &dyn WeightSource = match &src {
        Src::Model(m) => &m.source,
        Src::Random(w) => w,
    };
    let (prompt, prompt_kind) = match &src {
        Src::Model(m) => match crate::bench::essay_prompt(&m.tokenizer, prompt_len) {
            Ok(p) => (p, "essays"),
            Err(e) => {
                eprintln!("no essay prompt ({e}); random tokens instead");
                (random_prompt(prompt_len, cfg.vocab_size)?, "random tokens")
            }
        },
        Src::Random(_) => (random_prompt(prompt_len, cfg.vocab_size)?, "random tokens"),
    };
    let vocab = cfg.vocab_size;
    let mut all_ok = true;
    for mode in modes {
        let wave = match mode {
            AttentionMode::Wave(w) => Some(w.clone()),
            AttentionMode::Full => None,
        };
        let name = if wave.is_some() { "wave" } else { "full" };
        let mut reference: Option<(Vec<u32>, Run)> = None;
        for &tp in std::iter::once(&1).chain(tps.iter().filter(|&&t| t > 1)) {
            let t = Instant::now();
            // Fresh backends for every group (a backend belongs to one group for its life).
            let backends = gpus(device, tp)?;
            let device_name = cards(&backends);
            let mut g = WorkerGroup::load(&cfg, source, backends)?;
            let path = reference.as_ref().map(|(p, _)| p.clone());
            let (own, logits) =
                run_once(&mut g, &prompt, n, vocab, wave.as_ref(), path.as_deref())?;
            let free = run_free(&mut g, &prompt, n, wave.as_ref())?;
            let run = Run { logits, free };
            let seconds = t.elapsed().as_secs_f64();
            drop(g);
            let Some((ref_path, r)) = &reference else {
                println!(
                    "{} {name} TP=1: reference path of {n} tokens ({:.1} s); free-running greedy equal to it: {}",
                    cfg.name,
                    seconds,
                    run.free == own
                );
                reference = Some((own, run));
                continue;
            };
            let Agreement {
                max_top5,
                clear,
                agree,
                top2_ok,
                first_tie,
            } = agreement(&r.logits, &run.logits, vocab, margin);
            let same = ref_path
                .iter()
                .zip(&run.free)
                .take_while(|(a, b)| a == b)
                .count();
            let ok = agree == clear && top2_ok && same >= first_tie.min(n) && max_top5 <= tolerance;
            all_ok &= ok;
            println!(
                "{} {name} TP={tp} vs TP=1: forced argmax {agree}/{clear} clear steps, near-ties in top-2 {top2_ok}; max |dlogit| on top-5 {max_top5:.4}; free-running greedy equal {same}/{n} (first near-tie at {first_tie}) {}",
                cfg.name,
                if ok { "ok" } else { "DIFFERENT" }
            );
            append(
                out,
                &json!({"bench": "gpu-tp-parity", "model": cfg.name, "weights": weights,
                        "attention": name, "tp": tp, "prompt_tokens": prompt.len(), "prompt": prompt_kind, "tokens": n,
                        "forced_argmax_agree_clear": agree, "clear_steps": clear,
                        "near_ties_in_top2": top2_ok, "margin": margin,
                        "max_abs_logit_diff_top5": max_top5, "tolerance_top5": tolerance,
                        "free_greedy_equal_prefix": same, "first_reference_near_tie": first_tie,
                        "seconds": seconds, "passed": ok,
                        "lm_head": format!("{:?}", retrowave_engine::LmHead::from_env()),
                        "wave_config": wave.as_ref().map(|w| format!("{w:?}")),
                        "device": device_name, "commit": commit()}),
            )?;
        }
    }
    if !all_ok {
        bail!("tensor-parallel decode differs from one GPU beyond the criteria");
    }
    Ok(())
}
