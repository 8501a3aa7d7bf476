//! The engine: requests in, tokens and text out.
//!
//! Each call to [`Engine::step`] asks the scheduler for a plan, runs one forward over the worker
//! group for every sequence in it (prompt chunks and decode tokens batched together), samples the
//! sequences whose known tokens are all cached, and returns what happened as [`Event`]s. Text is
//! produced incrementally: bytes of byte-level tokens are held until they form whole UTF-8
//! characters, and text that could be the start of a stop string is held until it cannot.
//!
//! Requests first wait in a FIFO queue; each step starts the ones at its front whose KV
//! reservation fits ([`scheduler::admit`], limits in [`AdmissionConfig`]), and ends those whose
//! deadline passed ([`RequestOptions::deadline`]), waiting or running.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use retrowave_core::{AttentionMode, Backend, BatchLayout, RowSampling, SeqRows, WaveStats};
use retrowave_model::sampling::{Sampler, SamplingParams};
use retrowave_model::tokenizer::Tokenizer;

use crate::EngineError;
use crate::group::WorkerGroup;
use crate::scheduler::{self, AdmissionConfig, SchedulerConfig, SeqId, SeqStatus};

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
    /// Cancelled by the client (or ended by a failed step).
    Cancelled,
    /// Its deadline passed ([`RequestOptions::deadline`]).
    Timeout,
}

impl FinishReason {
    /// The OpenAI name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
        }
    }
}

/// Token counts and timings of a finished sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From arrival to admission (time in the waiting queue).
    pub queued: Duration,
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

/// Options of one request beyond its sampling parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// When the request ends with [`FinishReason::Timeout`], whether it waits or runs.
    pub deadline: Option<Instant>,
}

/// Counts of the engine's state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sequences admitted (with a KV slot).
    pub running: usize,
    /// Requests in the waiting queue.
    pub waiting: usize,
    /// KV tokens reserved by the running sequences (prompt + `max_tokens` each, capped by the
    /// context).
    pub kv_reserved_tokens: usize,
    /// KV tokens computed and held by the running sequences.
    pub kv_cached_tokens: usize,
    /// The KV budget of admission (0 = no limit).
    pub kv_budget_tokens: usize,
}

/// A request in the waiting queue.
struct Waiting {
    id: SeqId,
    prompt: Vec<u32>,
    params: SamplingParams,
    options: RequestOptions,
    arrived: Instant,
    reserve: usize,
}

struct Sequence {
    slot: usize,
    /// KV tokens reserved at admission.
    reserve: usize,
    deadline: Option<Instant>,
    arrived: Instant,
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
    waiting: VecDeque<Waiting>,
    admission: AdmissionConfig,
    /// Sum of the reservations of `seqs`.
    reserved: usize,
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
            waiting: VecDeque::new(),
            admission: AdmissionConfig::default(),
            reserved: 0,
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

    /// The worker group, to change (tests: [`WorkerGroup::fail_next_step`]).
    #[doc(hidden)]
    pub fn group_mut(&mut self) -> &mut WorkerGroup<B> {
        &mut self.group
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Replaces the step limits (they apply from the next step).
    pub fn set_scheduler(&mut self, cfg: SchedulerConfig) {
        self.cfg.scheduler = cfg;
    }

    /// The admission limits (no limits unless [`Engine::set_admission`] set some).
    pub fn admission(&self) -> &AdmissionConfig {
        &self.admission
    }

    /// Replaces the admission limits (they apply to requests that arrive or wait from now on).
    pub fn set_admission(&mut self, cfg: AdmissionConfig) {
        self.admission = cfg;
    }

    /// Whether no sequence is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.waiting.is_empty()
    }

    /// The counts of running and waiting requests and of KV tokens.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.seqs.len(),
            waiting: self.waiting.len(),
            kv_reserved_tokens: self.reserved,
            kv_cached_tokens: self.seqs.values().map(|s| s.cached).sum(),
            kv_budget_tokens: self.admission.kv_budget_tokens,
        }
    }

    /// The KV tokens a request reserves: its prompt plus `max_tokens`, at most the context.
    pub fn reservation(&self, prompt_tokens: usize, max_tokens: usize) -> usize {
        prompt_tokens
            .saturating_add(max_tokens)
            .min(self.cfg.max_context)
    }

    /// Admits a request (see [`Engine::submit`]), with no deadline.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<SeqId, EngineError> {
        self.submit(prompt, params, RequestOptions::default())
    }

    /// Queues a request; it starts at once if its KV reservation fits, else in a later step, in
    /// arrival order. Fails (and queues nothing) for an empty or too long prompt, token ids
    /// outside the vocabulary, invalid sampling parameters, or a reservation larger than the
    /// whole KV budget.
    pub fn submit(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        options: RequestOptions,
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
        let reserve = self.reservation(prompt.len(), params.max_tokens);
        if !self.admission.fits_alone(reserve) {
            return Err(EngineError::ExceedsKvBudget {
                tokens: reserve,
                budget: self.admission.kv_budget_tokens,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            id,
            prompt,
            params,
            options,
            arrived: Instant::now(),
            reserve,
        });
        // Start it now if it is at the front and fits; a failure to open its cache is the
        // caller's error, as before queueing existed.
        if self.waiting.len() == 1
            && self.admit_count() == 1
            && let Some(w) = self.waiting.pop_front()
        {
            self.start(w)?;
        }
        Ok(id)
    }

    /// How many requests from the front of the queue fit now.
    fn admit_count(&self) -> usize {
        let waiting: Vec<usize> = self.waiting.iter().map(|w| w.reserve).collect();
        scheduler::admit(&self.admission, self.seqs.len(), self.reserved, &waiting)
    }

    /// Opens a KV slot for a waiting request and makes it run.
    fn start(&mut self, w: Waiting) -> Result<(), EngineError> {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        });
        if let Err(e) = self.group.open_slot(slot, self.cfg.max_context) {
            self.free_slots.push(slot);
            return Err(e);
        }
        self.reserved += w.reserve;
        self.seqs.insert(
            w.id,
            Sequence {
                slot,
                reserve: w.reserve,
                deadline: w.options.deadline,
                arrived: w.arrived,
                n_prompt: w.prompt.len(),
                tokens: w.prompt,
                cached: 0,
                sampler: Sampler::new(w.params),
                bytes: Vec::new(),
                text: String::new(),
                sent: 0,
                admitted: Instant::now(),
                first_token: None,
                indexed: false,
            },
        );
        Ok(())
    }

    /// Starts the waiting requests that fit, in order; a request whose cache cannot be opened
    /// ends (as cancelled, with an error in the log).
    fn admit_waiting(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..self.admit_count() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let (id, n_prompt, arrived) = (w.id, w.prompt.len(), w.arrived);
            if let Err(e) = self.start(w) {
                tracing::error!(seq = id, error = %e, "cannot open a KV cache for the request");
                events.push(unstarted_event(
                    id,
                    n_prompt,
                    arrived,
                    FinishReason::Cancelled,
                ));
            }
        }
        events
    }

    /// Ends the requests whose deadline passed, waiting or running.
    fn expire(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].options.deadline.is_some_and(|d| d <= now) {
                if let Some(w) = self.waiting.remove(i) {
                    events.push(unstarted_event(
                        w.id,
                        w.prompt.len(),
                        w.arrived,
                        FinishReason::Timeout,
                    ));
                }
            } else {
                i += 1;
            }
        }
        let late: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            events.extend(self.finish(id, FinishReason::Timeout));
        }
        events
    }

    /// Stops a sequence, running or waiting; returns its final event, or `None` if it is unknown.
    pub fn cancel(&mut self, id: SeqId) -> Option<Event> {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            let w = self.waiting.remove(i)?;
            return Some(unstarted_event(
                w.id,
                w.prompt.len(),
                w.arrived,
                FinishReason::Cancelled,
            ));
        }
        self.finish(id, FinishReason::Cancelled)
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason) -> Option<Event> {
        let mut s = self.seqs.remove(&id)?;
        self.reserved -= s.reserve;
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
                queued: s.admitted - s.arrived,
                prefill: first - s.admitted,
                decode: now - first,
                wave,
            },
        })
    }

    /// Runs one step: ends requests past their deadline, starts waiting requests that fit, and
    /// computes the planned tokens. Returns the events of the step (empty when idle).
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        let mut events = self.expire(Instant::now());
        events.extend(self.admit_waiting());
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
            return Ok(events);
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

/// The final event of a request that never started.
fn unstarted_event(
    id: SeqId,
    prompt_tokens: usize,
    arrived: Instant,
    reason: FinishReason,
) -> Event {
    Event::Finished {
        id,
        reason,
        text: String::new(),
        usage: Usage {
            prompt_tokens,
            completion_tokens: 0,
            queued: arrived.elapsed(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            wave: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retrowave_cpu::CpuBackend;
    use retrowave_model::arch;
    use retrowave_model::registry;

    /// SmolLM2 on one CPU worker with a 256-token context.
    fn smollm2() -> Engine<CpuBackend> {
        let path = registry::ensure_model(registry::DEFAULT_MODEL).expect("SmolLM2 in the cache");
        let source = arch::open_model(&path).expect("open SmolLM2");
        let config = source.config().expect("SmolLM2 config");
        let tokenizer = match &source {
            arch::ModelSource::Gguf(g) => Tokenizer::from_gguf(g).expect("tokenizer"),
            arch::ModelSource::HfFolder(_) => unreachable!("registry models are GGUF"),
        };
        let group =
            WorkerGroup::load(&config, &source, vec![CpuBackend::new()]).expect("load SmolLM2");
        let cfg = EngineConfig {
            scheduler: SchedulerConfig::default(),
            max_context: 256,
            attention: AttentionMode::Full,
        };
        Engine::new(group, Arc::new(tokenizer), cfg)
    }

    fn params(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        }
    }

    /// Steps until idle; returns the final events by id and the most requests seen running.
    fn run(e: &mut Engine<CpuBackend>) -> (BTreeMap<SeqId, (FinishReason, Usage)>, usize) {
        let mut done = BTreeMap::new();
        let mut most_running = 0;
        while !e.is_idle() {
            for ev in e.step().expect("step") {
                if let Event::Finished {
                    id, reason, usage, ..
                } = ev
                {
                    done.insert(id, (reason, usage));
                }
            }
            most_running = most_running.max(e.stats().running);
        }
        (done, most_running)
    }

    #[test]
    fn kv_budget_queues_requests_in_arrival_order() {
        let mut e = smollm2();
        let prompt = e
            .tokenizer()
            .encode("The sky is", true, false)
            .expect("encode");
        let one = e.reservation(prompt.len(), 4);
        // Room for two requests at a time out of three.
        e.set_admission(AdmissionConfig {
            kv_budget_tokens: 2 * one + 1,
            max_running: 0,
        });
        let ids: Vec<SeqId> = (0..3)
            .map(|_| e.add_request(prompt.clone(), params(4)).expect("queued"))
            .collect();
        let s = e.stats();
        assert_eq!((s.running, s.waiting), (2, 1));
        assert_eq!(s.kv_reserved_tokens, 2 * one);
        let (done, most_running) = run(&mut e);
        assert_eq!(most_running, 2);
        for id in &ids {
            let (reason, usage) = done[id];
            assert_eq!(reason, FinishReason::Length);
            assert_eq!(usage.completion_tokens, 4);
            assert_eq!(usage.prompt_tokens, prompt.len());
        }
        // The third waited for a slot; the first two did not.
        assert!(done[&ids[2]].1.queued > done[&ids[0]].1.queued);
        assert_eq!(
            e.stats(),
            EngineStats {
                kv_budget_tokens: 2 * one + 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn too_large_requests_fail_and_waiting_requests_cancel() {
        let mut e = smollm2();
        let prompt = e.tokenizer().encode("Hello", true, false).expect("encode");
        e.set_admission(AdmissionConfig {
            kv_budget_tokens: prompt.len() + 8,
            max_running: 1,
        });
        let err = e
            .add_request(prompt.clone(), params(9))
            .expect_err("over budget");
        assert!(
            matches!(err, EngineError::ExceedsKvBudget { budget, .. } if budget == prompt.len() + 8)
        );
        let a = e.add_request(prompt.clone(), params(8)).expect("runs");
        let b = e.add_request(prompt.clone(), params(2)).expect("waits");
        assert_eq!((e.stats().running, e.stats().waiting), (1, 1));
        match e.cancel(b) {
            Some(Event::Finished {
                id, reason, usage, ..
            }) => {
                assert_eq!(
                    (id, reason, usage.completion_tokens),
                    (b, FinishReason::Cancelled, 0)
                );
            }
            other => panic!("expected the final event of {b}, got {other:?}"),
        }
        assert_eq!(e.stats().waiting, 0);
        assert!(matches!(
            e.cancel(a),
            Some(Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ));
        assert!(e.is_idle());
        assert_eq!(e.stats().kv_reserved_tokens, 0);
        assert!(e.cancel(a).is_none());
    }

    #[test]
    fn deadlines_end_running_and_waiting_requests() {
        let mut e = smollm2();
        let prompt = e
            .tokenizer()
            .encode("Once upon a time", true, false)
            .expect("encode");
        e.set_admission(AdmissionConfig {
            kv_budget_tokens: 0,
            max_running: 1,
        });
        let past = RequestOptions {
            deadline: Some(Instant::now()),
        };
        let a = e.submit(prompt.clone(), params(50), past).expect("runs");
        let b = e.submit(prompt.clone(), params(50), past).expect("waits");
        let c = e.add_request(prompt.clone(), params(3)).expect("waits");
        let (done, _) = run(&mut e);
        assert_eq!(done[&a].0, FinishReason::Timeout);
        assert_eq!(done[&b].0, FinishReason::Timeout);
        assert_eq!(done[&b].1.completion_tokens, 0);
        assert_eq!(done[&c].0, FinishReason::Length);
        assert_eq!(done[&c].1.completion_tokens, 3);
    }
}
