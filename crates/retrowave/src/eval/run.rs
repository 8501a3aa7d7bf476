//! Running evaluation cases through the worker group: one prefill per case, shared by every
//! attention mode (prefill is exact in all of them), then a fork of the cache per mode and greedy
//! decoding of all modes side by side in one batch.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use retrowave_core::{AttentionMode, BatchLayout, FidelitySample, SeqRows, WaveStats};
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
    /// With teacher forcing: how this mode's next-token distributions agreed with the
    /// baseline's (the first mode) along the baseline's answer.
    pub forced: Option<Agreement>,
}

/// `ln softmax(logits)` in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let z = logits
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    logits.iter().map(|&x| f64::from(x) - z).collect()
}

/// How one mode's next-token distributions compare with the baseline's along the baseline's
/// greedy answer (teacher forcing): a measure of the damage an approximation does that does not
/// depend on where a greedy answer first happens to diverge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Agreement {
    /// Answer positions compared.
    pub steps: usize,
    /// Positions where this mode's most likely token is the baseline's.
    pub top1: usize,
    /// Sum over positions of KL(baseline || this mode), in nats.
    pub kl: f64,
    /// Sum over positions of -log p(baseline's token) under this mode, in nats.
    pub nll: f64,
}

impl Agreement {
    /// Adds one position: the baseline's log-probabilities ([`log_softmax`]) and chosen token,
    /// and this mode's logits.
    fn add(&mut self, base: &[f64], token: usize, mine: &[f32]) {
        let q = log_softmax(mine);
        self.steps += 1;
        self.top1 += usize::from(argmax(mine) as usize == token);
        self.kl += base
            .iter()
            .zip(&q)
            .map(|(&a, &b)| if a > -60.0 { a.exp() * (a - b) } else { 0.0 })
            .sum::<f64>();
        self.nll -= q.get(token).copied().unwrap_or(f64::NEG_INFINITY);
    }

    /// Share of positions whose top token agrees, in percent.
    pub fn top1_percent(&self) -> f64 {
        100.0 * self.top1 as f64 / self.steps.max(1) as f64
    }

    /// Mean KL divergence per position.
    pub fn mean_kl(&self) -> f64 {
        self.kl / self.steps.max(1) as f64
    }
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
    /// Feed every mode the first mode's greedy answer and compare their next-token
    /// distributions with its ([`Answer::forced`]); the answers are then all the first mode's.
    pub teacher_forced: bool,
}

/// Runs `case` in every mode of `settings`.
pub fn run_case<B: retrowave_core::Backend + 'static>(
    group: &mut WorkerGroup<B>,
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
        let mut forced = vec![Agreement::default(); n_modes];
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
            if settings.teacher_forced {
                // Every mode is live until the baseline (row 0) finishes.
                let next = argmax(&logits[..vocab]);
                // The baseline's distribution once per position, for every mode.
                let base = log_softmax(&logits[..vocab]);
                for (r, &i) in live.iter().enumerate() {
                    forced[i].add(&base, next as usize, &logits[r * vocab..(r + 1) * vocab]);
                    generated[i].push(next);
                }
                let end = finished(tok, &generated[0], settings.max_tokens);
                done.iter_mut().for_each(|d| *d = end);
            } else {
                for (r, &i) in live.iter().enumerate() {
                    generated[i].push(argmax(&logits[r * vocab..(r + 1) * vocab]));
                    done[i] = finished(tok, &generated[i], settings.max_tokens);
                }
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
                forced: settings.teacher_forced.then_some(forced[i]),
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
    /// (task, length) -> per mode.
    cells: BTreeMap<(String, usize), Vec<Cell>>,
    modes: Vec<String>,
    forced: bool,
}

/// Sums over the cases of one (task, length, mode).
#[derive(Debug, Default, Clone, Copy)]
struct Cell {
    score: f64,
    cases: usize,
    agreement: Agreement,
}

/// One row of a [`Table`]: a (task, length) with its means per mode.
#[derive(Debug, Clone)]
pub struct Row {
    pub task: String,
    pub length: usize,
    /// Mean score per mode.
    pub means: Vec<f64>,
    pub cases: usize,
    /// Agreement with the first mode, summed over cases, per mode (teacher forcing).
    pub agreement: Vec<Agreement>,
}

impl Agreement {
    fn merge(&mut self, o: &Agreement) {
        self.steps += o.steps;
        self.top1 += o.top1;
        self.kl += o.kl;
        self.nll += o.nll;
    }
}

impl Table {
    /// A table of the modes labelled `labels`; `forced` for teacher-forced runs.
    pub fn new(labels: &[String], forced: bool) -> Self {
        Table {
            cells: BTreeMap::new(),
            modes: labels.to_vec(),
            forced,
        }
    }

    pub fn add(&mut self, task: &str, length: usize, result: &CaseResult) {
        let row = self
            .cells
            .entry((task.to_string(), length))
            .or_insert_with(|| vec![Cell::default(); self.modes.len()]);
        for (cell, a) in row.iter_mut().zip(&result.answers) {
            cell.score += a.score;
            cell.cases += 1;
            if let Some(f) = &a.forced {
                cell.agreement.merge(f);
            }
        }
    }

    /// The rows, by task and length.
    pub fn rows(&self) -> Vec<Row> {
        self.cells
            .iter()
            .map(|((task, len), cells)| Row {
                task: task.clone(),
                length: *len,
                means: cells
                    .iter()
                    .map(|c| c.score / c.cases.max(1) as f64)
                    .collect(),
                cases: cells.first().map_or(0, |c| c.cases),
                agreement: cells.iter().map(|c| c.agreement).collect(),
            })
            .collect()
    }

    /// The table as text: scores and the gap of each mode to the first, or with teacher forcing
    /// each mode's top-1 agreement with the first (percent) and mean KL divergence (millinats).
    pub fn render(&self) -> String {
        let mut s = format!("{:<20} {:>7} {:>6}", "task", "length", "cases");
        if self.forced {
            for m in self.modes.iter().skip(1) {
                s.push_str(&format!(" {:>22}", format!("{m} top1%/mKL")));
            }
        } else {
            for m in &self.modes {
                s.push_str(&format!(" {m:>8}"));
            }
            for m in self.modes.iter().skip(1) {
                s.push_str(&format!(" {:>10}", format!("{m}-{}", self.modes[0])));
            }
        }
        s.push('\n');
        for Row {
            task,
            length: len,
            means,
            cases: n,
            agreement: agree,
        } in self.rows()
        {
            s.push_str(&format!("{task:<20} {len:>7} {n:>6}"));
            if self.forced {
                for a in agree.iter().skip(1) {
                    s.push_str(&format!(
                        " {:>22}",
                        format!("{:.1}/{:.1}", a.top1_percent(), 1000.0 * a.mean_kl())
                    ));
                }
            } else {
                for m in &means {
                    s.push_str(&format!(" {m:>8.1}"));
                }
                for m in means.iter().skip(1) {
                    s.push_str(&format!(" {:>+10.1}", m - means[0]));
                }
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
    PathBuf::from(format!("bench/results/eval-{}.jsonl", model_label(model)))
}

/// The name records give a model: a registry name as it is, a path by its file stem
/// (`/models/smollm2-135m.gguf` -> `smollm2-135m`), so records of one model agree however it
/// was named on the command line.
pub fn model_label(model: &str) -> String {
    Path::new(model)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_path_is_labelled_by_its_file_stem() {
        assert_eq!(model_label("smollm2-135m"), "smollm2-135m");
        assert_eq!(
            model_label("/root/rwhome/models/qwen2.5-coder-0.5b.gguf"),
            "qwen2.5-coder-0.5b"
        );
        assert_eq!(
            default_out("/m/smollm2-135m.gguf"),
            PathBuf::from("bench/results/eval-smollm2-135m.jsonl")
        );
    }
}
