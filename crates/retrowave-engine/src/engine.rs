//! The engine: requests in, tokens and text out.
//!
//! Each call to [`Engine::step`] asks the scheduler for a plan, runs one forward over the worker
//! group for every sequence in it (prompt chunks and decode tokens batched together), samples the
//! sequences whose known tokens are all cached, and returns what happened as [`Event`]s. Text is
//! produced incrementally: bytes of byte-level tokens are held until they form whole UTF-8
//! characters, and text that could be the start of a stop string is held until it cannot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use retrowave_core::{AttentionMode, Backend, BatchLayout, RowSampling, SeqRows, WaveStats};
use retrowave_model::sampling::{Sampler, SamplingParams};
use retrowave_model::tokenizer::Tokenizer;

use crate::EngineError;
use crate::group::WorkerGroup;
use crate::scheduler::{self, SchedulerConfig, SeqId, SeqStatus};

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Most tokens (prompt + generated) of one sequence; at most the model's context length.
    pub max_context: usize,
    /// How decode steps attend: exactly, or through a wave index built after each prefill.
    pub attention: AttentionMode,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` generated.
    Length,
    /// The context window is full.
    ContextFull,
    /// Cancelled by the client.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts and timings of a finished sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From admission to the first sampled token (prefill).
    pub prefill: Duration,
    /// From the first sampled token to the end (decode of the remaining tokens).
    pub decode: Duration,
    /// Counters of the wave index, in wave mode.
    pub wave: Option<WaveStats>,
}

/// Something that happened to a sequence during a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token was generated; `text` is the newly printable text (may be empty).
    Token { id: SeqId, token: u32, text: String },
    /// The sequence ended; `text` is any text released at the end.
    Finished {
        id: SeqId,
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
}

/// What a step gave back: logits to sample on the host, or tokens picked on the device.
enum Picked {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

struct Sequence {
    slot: usize,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    n_prompt: usize,
    cached: usize,
    sampler: Sampler,
    /// Bytes of generated tokens not yet decoded to text (an incomplete UTF-8 sequence).
    bytes: Vec<u8>,
    /// Generated text decoded so far, and how much of it was emitted.
    text: String,
    sent: usize,
    admitted: Instant,
    first_token: Option<Instant>,
    /// Whether the wave index was built (or its build was attempted).
    indexed: bool,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
}

/// The engine over a worker group of backend `B`.
pub struct Engine<B: Backend + 'static> {
    group: WorkerGroup<B>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: SeqId,
    free_slots: Vec<usize>,
    next_slot: usize,
}

impl<B: Backend + 'static> Engine<B> {
    /// An engine over a loaded group.
    pub fn new(group: WorkerGroup<B>, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Self {
        Engine {
            group,
            tokenizer,
            cfg,
            seqs: BTreeMap::new(),
            next_id: 1,
            free_slots: Vec::new(),
            next_slot: 0,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The worker group.
    pub fn group(&self) -> &WorkerGroup<B> {
        &self.group
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Whether no sequence is running.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Admits a request. Fails (and admits nothing) for an empty or too long prompt, token ids
    /// outside the vocabulary, or invalid sampling parameters.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<SeqId, EngineError> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= self.cfg.max_context {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                max: self.cfg.max_context - 1,
            });
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.group.vocab()) {
            return Err(EngineError::TokenOutOfRange {
                token: t,
                vocab: self.group.vocab(),
            });
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        });
        if let Err(e) = self.group.open_slot(slot, self.cfg.max_context) {
            self.free_slots.push(slot);
            return Err(e);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                slot,
                n_prompt: prompt.len(),
                tokens: prompt,
                cached: 0,
                sampler: Sampler::new(params),
                bytes: Vec::new(),
                text: String::new(),
                sent: 0,
                admitted: Instant::now(),
                first_token: None,
                indexed: false,
            },
        );
        Ok(id)
    }

    /// Stops a sequence; returns its final event, or `None` if it is unknown.
    pub fn cancel(&mut self, id: SeqId) -> Option<Event> {
        self.finish(id, FinishReason::Cancelled)
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason) -> Option<Event> {
        let mut s = self.seqs.remove(&id)?;
        let wave = if s.indexed {
            self.group.wave_stats(s.slot).ok().flatten()
        } else {
            None
        };
        self.group.close_slot(s.slot);
        self.free_slots.push(s.slot);
        // Release held-back text (and a lossy rendering of an incomplete UTF-8 tail).
        if !s.bytes.is_empty() {
            s.text.push_str(&String::from_utf8_lossy(&s.bytes));
        }
        let text = s.text[s.sent..].to_string();
        let now = Instant::now();
        let first = s.first_token.unwrap_or(now);
        Some(Event::Finished {
            id,
            reason,
            text,
            usage: Usage {
                prompt_tokens: s.n_prompt,
                completion_tokens: s.generated(),
                prefill: first - s.admitted,
                decode: now - first,
                wave,
            },
        })
    }

    /// Runs one step. Returns the events of the step (empty when idle).
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        let status: Vec<SeqStatus> = self
            .seqs
            .iter()
            .map(|(&id, s)| SeqStatus {
                id,
                cached: s.cached,
                pending: s.tokens.len() - s.cached,
            })
            .collect();
        let plan = scheduler::schedule(&self.cfg.scheduler, &status);
        if plan.entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut tokens = Vec::with_capacity(plan.n_tokens());
        let mut batch = BatchLayout::default();
        let mut logits_rows = Vec::new();
        let mut sampled = Vec::new();
        for e in &plan.entries {
            let s = &self.seqs[&e.id];
            batch.seqs.push(SeqRows {
                slot: s.slot,
                row: tokens.len(),
                start_pos: e.start,
                n_tokens: e.n_tokens,
            });
            tokens.extend_from_slice(&s.tokens[e.start..e.start + e.n_tokens]);
            if e.wants_logits {
                logits_rows.push(tokens.len() - 1);
                sampled.push(e.id);
            }
        }
        // Backends that sample on the device return token ids only; the others return logits
        // that the per-request samplers read here.
        let result = if self.group.samples_on_device() {
            let rows: Vec<RowSampling> = sampled
                .iter()
                .filter_map(|id| self.seqs.get_mut(id).map(|s| s.sampler.device_row()))
                .collect();
            self.group
                .forward_sample(&tokens, &batch, &logits_rows, &rows)
                .map(Picked::Tokens)
        } else {
            self.group
                .forward(&tokens, &batch, &logits_rows)
                .map(Picked::Logits)
        };
        let picked = match result {
            Ok(l) => l,
            Err(e) => {
                // The step is undone on every worker; fail its sequences, keep the others.
                let mut events = Vec::new();
                for entry in &plan.entries {
                    tracing::error!(seq = entry.id, error = %e, "step failed");
                    events.extend(self.finish(entry.id, FinishReason::Cancelled));
                }
                return Err(EngineError::StepFailed {
                    source: Box::new(e),
                    events,
                });
            }
        };
        for e in &plan.entries {
            if let Some(s) = self.seqs.get_mut(&e.id) {
                s.cached += e.n_tokens;
            }
        }
        if let AttentionMode::Wave(wave) = &self.cfg.attention {
            // The prompt is in the cache: cluster it. Decode steps then attend through the index.
            for e in &plan.entries {
                let Some(s) = self.seqs.get_mut(&e.id) else {
                    continue;
                };
                if !s.indexed && s.cached >= s.n_prompt {
                    s.indexed = true;
                    if let Err(err) = self.group.build_index(s.slot, wave) {
                        tracing::warn!(seq = e.id, error = %err, "wave index build failed; this sequence attends exactly");
                    }
                }
            }
        }
        let vocab = self.group.vocab();
        let mut events = Vec::new();
        for (i, id) in sampled.into_iter().enumerate() {
            let token = match &picked {
                Picked::Tokens(t) => t.get(i).copied(),
                Picked::Logits(l) => l
                    .get(i * vocab..(i + 1) * vocab)
                    .and_then(|row| self.seqs.get_mut(&id).map(|s| s.sampler.sample(row))),
            };
            if let Some(token) = token {
                events.extend(self.accept(id, token));
            }
        }
        Ok(events)
    }

    /// Appends the sampled `token` to `id` and updates its text and state.
    fn accept(&mut self, id: SeqId, token: u32) -> Vec<Event> {
        let tok = self.tokenizer.clone();
        let max_context = self.cfg.max_context;
        let Some(s) = self.seqs.get_mut(&id) else {
            return Vec::new();
        };
        if s.first_token.is_none() {
            s.first_token = Some(Instant::now());
        }
        let params = s.sampler.params().clone();
        if tok.is_end_of_generation(token) && !params.ignore_eos {
            // The end token itself is not part of the output.
            s.tokens.push(token);
            s.cached = s.tokens.len(); // nothing left to compute for this sequence
            return self.finish(id, FinishReason::Stop).into_iter().collect();
        }
        s.tokens.push(token);
        if let Some(b) = tok.token_bytes(token) {
            s.bytes.extend_from_slice(&b);
        }
        let valid = match std::str::from_utf8(&s.bytes) {
            Ok(_) => s.bytes.len(),
            Err(e) if e.error_len().is_some() => s.bytes.len(), // invalid, not just incomplete
            Err(e) => e.valid_up_to(),
        };
        if valid > 0 {
            let chunk: Vec<u8> = s.bytes.drain(..valid).collect();
            s.text.push_str(&String::from_utf8_lossy(&chunk));
        }
        // Stop strings: search the text that is new or held back.
        let max_stop = params.stop.iter().map(|x| x.len()).max().unwrap_or(0);
        let mut from = s.sent.saturating_sub(max_stop);
        while !s.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = params
            .stop
            .iter()
            .filter(|x| !x.is_empty())
            .filter_map(|x| s.text[from..].find(x.as_str()).map(|p| from + p))
            .min();
        if let Some(at) = hit {
            s.text.truncate(at);
            s.bytes.clear();
            let text = s.text[s.sent.min(at)..].to_string();
            s.sent = s.text.len();
            let mut ev = vec![Event::Token { id, token, text }];
            ev.extend(self.finish(id, FinishReason::Stop));
            return ev;
        }
        // Hold back the longest tail that could begin a stop string.
        let mut hold = 0;
        for x in params.stop.iter() {
            for (i, _) in x.char_indices().skip(1) {
                if s.text.ends_with(&x[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        let emit_to = s.text.len() - hold;
        let text = if emit_to > s.sent {
            s.text[s.sent..emit_to].to_string()
        } else {
            String::new()
        };
        s.sent = s.sent.max(emit_to);
        let mut ev = vec![Event::Token { id, token, text }];
        if s.generated() >= params.max_tokens {
            ev.extend(self.finish(id, FinishReason::Length));
        } else if s.tokens.len() >= max_context {
            ev.extend(self.finish(id, FinishReason::ContextFull));
        }
        ev
    }
}
