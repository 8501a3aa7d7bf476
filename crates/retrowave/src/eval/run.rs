//! Running evaluation cases through the worker group: one prefill per case, shared by every
//! attention mode (prefill is exact in all of them), then a fork of the cache per mode and greedy
//! decoding of all modes side by side in one batch.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use retrowave_core::{AttentionMode, BatchLayout, FidelitySample, SeqRows, WaveStats};
use retrowave_cpu::CpuBackend;
use retrowave_engine::WorkerGroup;
use retrowave_model::sampling::argmax;
use retrowave_model::tokenizer::Tokenizer;
use serde_json::json;

use super::tasks::{Case, score};

/// Prompt tokens per prefill step.
const PREFILL_CHUNK: usize = 512;

/// The answer of one mode to one case.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub score: f64,
    pub tokens: usize,
    pub wave: Option<WaveStats>,
}

/// Everything one case produced.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub prompt_tokens: usize,
    /// One answer per mode, in the order of the modes given.
    pub answers: Vec<Answer>,
    /// Fidelity samples of the wave modes (with `--fidelity`), with the index of their mode.
    pub fidelity: Vec<(usize, FidelitySample)>,
    pub seconds: f64,
}

/// Evaluation settings.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub modes: Vec<AttentionMode>,
    pub max_tokens: usize,
    /// Record fidelity samples over the first `fidelity_steps` decode steps of the wave mode.
    pub fidelity_steps: usize,
}

/// Runs `case` in every mode of `settings`.
pub fn run_case(
    group: &mut WorkerGroup<CpuBackend>,
    tok: &Tokenizer,
    case: &Case,
    settings: &EvalSettings,
    max_context: usize,
) -> Result<CaseResult> {
    let t = Instant::now();
    let prompt = tok.encode(&case.input, true, false)?;
    if prompt.is_empty() {
        bail!("case {}: the input is empty", case.task);
    }
    if prompt.len() + settings.max_tokens > max_context {
        bail!(
            "case {}: {} prompt tokens + {} answer tokens exceed the context of {max_context}",
            case.task,
            prompt.len(),
            settings.max_tokens
        );
    }
    let n_modes = settings.modes.len();
    // Slot 0 holds the prefill; mode i decodes in slot i + 1.
    group.open_slot(0, max_context)?;
    let result = (|| -> Result<CaseResult> {
        let mut logits = Vec::new();
        let mut start = 0;
        while start < prompt.len() {
            let n = PREFILL_CHUNK.min(prompt.len() - start);
            let batch = BatchLayout {
                seqs: vec![SeqRows {
                    slot: 0,
                    row: 0,
                    start_pos: start,
                    n_tokens: n,
                }],
            };
            let last = if start + n == prompt.len() {
                vec![n - 1]
            } else {
                vec![]
            };
            logits = group.forward(&prompt[start..start + n], &batch, &last)?;
            start += n;
        }
        let first = argmax(&logits);
        for (i, mode) in settings.modes.iter().enumerate() {
            group.fork_slot(0, i + 1)?;
            if let AttentionMode::Wave(cfg) = mode {
                group.build_index(i + 1, cfg)?;
                if settings.fidelity_steps > 0 {
                    group.set_probe(i + 1, true)?;
                }
            }
        }
        group.close_slot(0);
        let mut generated: Vec<Vec<u32>> = vec![vec![first]; n_modes];
        let mut done: Vec<bool> = vec![false; n_modes];
        for (i, g) in generated.iter().enumerate() {
            done[i] = finished(tok, g, settings.max_tokens);
        }
        let mut fidelity = Vec::new();
        let mut step = 0;
        while done.iter().any(|d| !d) {
            let live: Vec<usize> = (0..n_modes).filter(|&i| !done[i]).collect();
            let batch = BatchLayout {
                seqs: live
                    .iter()
                    .enumerate()
                    .map(|(row, &i)| SeqRows {
                        slot: i + 1,
                        row,
                        start_pos: prompt.len() + generated[i].len() - 1,
                        n_tokens: 1,
                    })
                    .collect(),
            };
            let tokens: Vec<u32> = live
                .iter()
                .map(|&i| *generated[i].last().unwrap_or(&first))
                .collect();
            let rows: Vec<usize> = (0..live.len()).collect();
            let logits = group.forward(&tokens, &batch, &rows)?;
            let vocab = group.vocab();
            for (r, &i) in live.iter().enumerate() {
                generated[i].push(argmax(&logits[r * vocab..(r + 1) * vocab]));
                done[i] = finished(tok, &generated[i], settings.max_tokens);
            }
            step += 1;
            if step == settings.fidelity_steps {
                for (i, mode) in settings.modes.iter().enumerate() {
                    if matches!(mode, AttentionMode::Wave(_)) {
                        let samples = group.take_probe(i + 1)?;
                        fidelity.extend(samples.into_iter().map(|f| (i, f)));
                        group.set_probe(i + 1, false)?;
                    }
                }
            }
        }
        let mut answers = Vec::with_capacity(n_modes);
        for (i, g) in generated.iter().enumerate() {
            let ids: Vec<u32> = g
                .iter()
                .copied()
                .filter(|&t| !tok.is_end_of_generation(t))
                .collect();
            let text = tok.decode(&ids)?;
            let wave = group.wave_stats(i + 1)?;
            if settings.fidelity_steps > 0 && step < settings.fidelity_steps && wave.is_some() {
                let samples = group.take_probe(i + 1)?;
                fidelity.extend(samples.into_iter().map(|f| (i, f)));
            }
            answers.push(Answer {
                score: score(&case.outputs, &text),
                text,
                tokens: g.len(),
                wave,
            });
        }
        Ok(CaseResult {
            prompt_tokens: prompt.len(),
            answers,
            fidelity,
            seconds: t.elapsed().as_secs_f64(),
        })
    })();
    for i in 0..=n_modes {
        group.close_slot(i);
    }
    result
}

/// Whether an answer is complete: an end-of-generation token, `max_tokens` tokens, or a line
/// break after some text.
fn finished(tok: &Tokenizer, ids: &[u32], max_tokens: usize) -> bool {
    if ids.len() >= max_tokens || ids.last().is_some_and(|&t| tok.is_end_of_generation(t)) {
        return true;
    }
    let text = tok.decode(ids).unwrap_or_default();
    let trimmed = text.trim_start();
    !trimmed.is_empty() && trimmed.contains('\n')
}

/// Mean scores per (task, length, mode) over cases.
#[derive(Debug, Default)]
pub struct Table {
    /// (task, length) -> per mode (sum of scores, cases).
    cells: BTreeMap<(String, usize), Vec<(f64, usize)>>,
    modes: Vec<String>,
}

impl Table {
    pub fn new(modes: &[AttentionMode]) -> Self {
        Table {
            cells: BTreeMap::new(),
            modes: modes.iter().map(AttentionMode::label).collect(),
        }
    }

    pub fn add(&mut self, task: &str, length: usize, result: &CaseResult) {
        let row = self
            .cells
            .entry((task.to_string(), length))
            .or_insert_with(|| vec![(0.0, 0); self.modes.len()]);
        for (cell, a) in row.iter_mut().zip(&result.answers) {
            cell.0 += a.score;
            cell.1 += 1;
        }
    }

    /// Rows of (task, length, mean score per mode).
    pub fn rows(&self) -> Vec<(String, usize, Vec<f64>, usize)> {
        self.cells
            .iter()
            .map(|((task, len), cells)| {
                let means = cells
                    .iter()
                    .map(|&(s, n)| if n > 0 { s / n as f64 } else { 0.0 })
                    .collect();
                let n = cells.first().map_or(0, |c| c.1);
                (task.clone(), *len, means, n)
            })
            .collect()
    }

    /// The table as text, with the gap of each mode to the first.
    pub fn render(&self) -> String {
        let mut s = format!("{:<20} {:>7} {:>6}", "task", "length", "cases");
        for m in &self.modes {
            s.push_str(&format!(" {m:>8}"));
        }
        for m in self.modes.iter().skip(1) {
            s.push_str(&format!(" {:>10}", format!("{m}-{}", self.modes[0])));
        }
        s.push('\n');
        for (task, len, means, n) in self.rows() {
            s.push_str(&format!("{task:<20} {len:>7} {n:>6}"));
            for m in &means {
                s.push_str(&format!(" {m:>8.1}"));
            }
            for m in means.iter().skip(1) {
                s.push_str(&format!(" {:>+10.1}", m - means[0]));
            }
            s.push('\n');
        }
        s
    }
}

/// Sums of fidelity numbers over samples.
#[derive(Debug, Clone, Copy)]
struct FidelitySums {
    rel_l2: f64,
    mass_exact: f64,
    mass_all: f64,
    min_mass_all: f64,
    n: usize,
}

impl Default for FidelitySums {
    fn default() -> Self {
        FidelitySums {
            rel_l2: 0.0,
            mass_exact: 0.0,
            mass_all: 0.0,
            min_mass_all: f64::INFINITY,
            n: 0,
        }
    }
}

impl FidelitySums {
    fn add(&mut self, rel_l2: f64, mass_exact: f64, mass_all: f64) {
        self.rel_l2 += rel_l2;
        self.mass_exact += mass_exact;
        self.mass_all += mass_all;
        self.min_mass_all = self.min_mass_all.min(mass_all);
        self.n += 1;
    }

    fn means(&self) -> (f64, f64, f64) {
        let n = self.n.max(1) as f64;
        (self.rel_l2 / n, self.mass_exact / n, self.mass_all / n)
    }
}

/// Per-(layer, query head) means of fidelity samples.
pub fn fidelity_summary(samples: &[FidelitySample]) -> Vec<serde_json::Value> {
    let mut by: BTreeMap<(usize, usize), FidelitySums> = BTreeMap::new();
    for s in samples {
        by.entry((s.layer, s.q_head))
            .or_default()
            .add(s.rel_l2, s.mass_exact, s.mass_all);
    }
    by.into_iter()
        .map(|((layer, head), sums)| {
            let (l2, me, ma) = sums.means();
            json!({
                "layer": layer, "q_head": head, "samples": sums.n,
                "rel_l2": l2, "mass_exact": me, "mass_all": ma, "min_mass_all": sums.min_mass_all,
            })
        })
        .collect()
}

/// Renders per-layer means (over heads) of fidelity summaries, with the worst head's mass.
pub fn render_fidelity(rows: &[serde_json::Value]) -> String {
    let mut by_layer: BTreeMap<u64, FidelitySums> = BTreeMap::new();
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    for r in rows {
        by_layer
            .entry(r["layer"].as_u64().unwrap_or(0))
            .or_default()
            .add(f(r, "rel_l2"), f(r, "mass_exact"), f(r, "mass_all"));
    }
    let mut s = format!(
        "{:>5} {:>10} {:>12} {:>10} {:>14}\n",
        "layer", "rel_l2", "mass_exact", "mass_all", "worst_head_all"
    );
    for (layer, sums) in by_layer {
        let (l2, me, ma) = sums.means();
        s.push_str(&format!(
            "{layer:>5} {l2:>10.4} {me:>12.4} {ma:>10.4} {:>14.4}\n",
            sums.min_mass_all
        ));
    }
    s
}

/// Appends JSON records to `path`, creating its folder.
pub fn append_records(path: &Path, records: &[serde_json::Value]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    for r in records {
        writeln!(f, "{r}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The default results file of a model.
pub fn default_out(model: &str) -> PathBuf {
    let name = Path::new(model)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_string());
    PathBuf::from(format!("bench/results/eval-{name}.jsonl"))
}
