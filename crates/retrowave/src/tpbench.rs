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

/// `retrowave bench tp-recover`: a rank of a tensor-parallel group of GPUs fails in the middle of
/// a step (asked to, at one layer): the step must fail on every rank instead of hanging in the
/// next collective (the failed rank goes on taking part in the step's collectives), and the
/// step run again gives the tokens of a run that never failed. Greedy decode through device
/// sampling (CUDA graphs with the collectives inside, captured again after the rebuild); once
/// with the failure in the prompt's last prefill chunk, once in a decode step.
#[allow(clippy::too_many_arguments)]
pub fn run_tp_recover(
    random_weights: &Path,
    device: &str,
    tp: usize,
    prompt_len: usize,
    tokens: usize,
    fail_rank: usize,
    fail_layer: usize,
    out: &Path,
) -> Result<()> {
    if tp < 2 || fail_rank >= tp || prompt_len == 0 || tokens < 4 {
        bail!("--tp >= 2, --fail-rank < --tp, --prompt >= 1 and --tokens >= 4 are needed");
    }
    let cfg = load_shape(random_weights)?;
    if fail_layer >= cfg.n_layers {
        bail!(
            "--fail-layer {fail_layer}: the model has {} layers",
            cfg.n_layers
        );
    }
    let gpus = gpus(device, tp)?;
    let src = RandomWeights::new(&cfg, 1)?;
    let mut g = WorkerGroup::load(&cfg, &src as &dyn WeightSource, gpus.clone())?;
    let prompt = random_prompt(prompt_len, cfg.vocab_size)?;
    let want = run_free(&mut g, &prompt, tokens, None)?;
    let row = [RowSampling::greedy()];
    // Step 0 is the prompt's last chunk; step k > 0 the k-th decode step.
    for (case, fail_step) in [("prefill", 0), ("decode", tokens / 2)] {
        let rebuilds0 = g.rebuilds();
        let mut failed = None;
        let mut step = |g: &mut WorkerGroup<CudaBackend>,
                        k: usize,
                        t: &[u32],
                        b: &BatchLayout,
                        r: &[usize]|
         -> Result<Vec<u32>> {
            if k == fail_step {
                g.fail_next_step(fail_rank, fail_layer, false)?;
                let t0 = Instant::now();
                match g.forward_sample(t, b, r, &row) {
                    Ok(_) => bail!("the step asked to fail on rank {fail_rank} succeeded"),
                    Err(e) => failed = Some((e.to_string(), t0.elapsed().as_secs_f64())),
                }
            }
            Ok(g.forward_sample(t, b, r, &row)?)
        };
        let mut toks = prefill(&mut g, &prompt, tokens, None, |g, t, l, r| {
            step(g, 0, t, l, r)
        })?;
        while toks.len() < tokens {
            let last = *toks.last().context("no token")?;
            let pos = prompt.len() + toks.len() - 1;
            toks.extend(step(&mut g, toks.len(), &[last], &one_seq(pos, 1), &[0])?);
        }
        g.close_slot(0);
        let (error, failed_s) = failed.context("the injected failure did not happen")?;
        let equal = toks.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let rec = json!({"bench": "gpu-tp-recover", "model": cfg.name, "tp": tp, "case": case,
            "prompt": prompt_len, "tokens": tokens, "fail_step": fail_step,
            "fail_rank": fail_rank, "fail_layer": fail_layer, "error": error,
            "failed_step_s": failed_s, "rebuilds": g.rebuilds() - rebuilds0,
            "tokens_equal_prefix": equal, "passed": equal == tokens,
            "weights": "random (bf16); random prompt tokens", "device": cards(&gpus),
            "commit": commit()});
        println!(
            "{case}: rank {fail_rank} failed at layer {fail_layer}; the step failed on every rank \
             in {failed_s:.3} s ({error}); then {equal}/{tokens} tokens equal to the run \
             without failure"
        );
        append(out, &rec)?;
        if equal != tokens {
            bail!("{case}: tokens after the recovery differ from the run without failure");
        }
    }
    Ok(())
}
