//! The step scheduler: a pure function from the state of the running sequences to the plan of the
//! next step (which sequences decode, which prefill how many prompt tokens).
//!
//! Policy (continuous batching with chunked prefill): every decoding sequence gets its next token
//! first, so running requests never stall behind a long prompt; the remaining token budget goes
//! to prompt chunks in arrival order.
//!
//! Admission ([`admit`]) is pure as well: requests wait in a FIFO queue until their KV reservation
//! (prompt + `max_tokens`, at most the context) fits the KV budget beside the running sequences.
//! The queue is strict FIFO: a large request at its head is not overtaken by smaller ones behind
//! it, so no request starves.

/// Identifies a sequence (one request) in the engine.
pub type SeqId = u64;

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most tokens (decode tokens + prompt tokens) in one step.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one sequence in one step.
    pub prefill_chunk: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 512,
            prefill_chunk: 512,
            max_seqs: 32,
        }
    }
}

/// Limits of admission: how many sequences run at once and how many KV tokens they may reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdmissionConfig {
    /// Most KV tokens reserved by the running sequences together (each reserves its prompt plus
    /// `max_tokens`, at most the context); 0 = no limit.
    pub kv_budget_tokens: usize,
    /// Most running sequences; 0 = no limit.
    pub max_running: usize,
}

impl AdmissionConfig {
    /// Whether a request reserving `tokens` could ever run (alone).
    pub fn fits_alone(&self, tokens: usize) -> bool {
        self.kv_budget_tokens == 0 || tokens <= self.kv_budget_tokens
    }
}

/// How many requests from the front of the waiting queue start now. `running` sequences reserve
/// `reserved` tokens; `waiting` are the reservations of the waiting requests in arrival order.
pub fn admit(cfg: &AdmissionConfig, running: usize, reserved: usize, waiting: &[usize]) -> usize {
    let mut n = 0;
    let mut reserved = reserved;
    for &r in waiting {
        if cfg.max_running > 0 && running + n >= cfg.max_running {
            break;
        }
        if cfg.kv_budget_tokens > 0 && reserved.saturating_add(r) > cfg.kv_budget_tokens {
            break;
        }
        reserved = reserved.saturating_add(r);
        n += 1;
    }
    n
}

/// What the scheduler needs to know of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqStatus {
    pub id: SeqId,
    /// Tokens already in the KV cache.
    pub cached: usize,
    /// Known tokens not yet in the cache (the rest of the prompt, or the last sampled token).
    pub pending: usize,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepEntry {
    pub id: SeqId,
    /// First position computed (= tokens cached before the step).
    pub start: usize,
    pub n_tokens: usize,
    /// Whether the step reaches the end of the known tokens, so the next token is sampled.
    pub wants_logits: bool,
}

/// The plan of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub entries: Vec<StepEntry>,
}

impl StepPlan {
    /// Tokens computed in the step.
    pub fn n_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.n_tokens).sum()
    }
}

/// Plans the next step for `seqs` (in arrival order).
pub fn schedule(cfg: &SchedulerConfig, seqs: &[SeqStatus]) -> StepPlan {
    let mut budget = cfg.max_batch_tokens.max(1);
    let mut entries = Vec::new();
    let decoding = seqs.iter().filter(|s| s.pending == 1 && s.cached > 0);
    let prefilling = seqs
        .iter()
        .filter(|s| s.pending > 0 && !(s.pending == 1 && s.cached > 0));
    for s in decoding.chain(prefilling) {
        if budget == 0 || entries.len() >= cfg.max_seqs {
            break;
        }
        let n = s.pending.min(cfg.prefill_chunk.max(1)).min(budget);
        budget -= n;
        entries.push(StepEntry {
            id: s.id,
            start: s.cached,
            n_tokens: n,
            wants_logits: n == s.pending,
        });
    }
    StepPlan { entries }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_first_then_chunks_prompts() {
        let cfg = SchedulerConfig {
            max_batch_tokens: 100,
            prefill_chunk: 64,
            max_seqs: 8,
        };
        let seqs = [
            SeqStatus {
                id: 1,
                cached: 0,
                pending: 150,
            },
            SeqStatus {
                id: 2,
                cached: 40,
                pending: 1,
            },
            SeqStatus {
                id: 3,
                cached: 0,
                pending: 10,
            },
            SeqStatus {
                id: 4,
                cached: 7,
                pending: 0,
            },
        ];
        let p = schedule(&cfg, &seqs);
        assert_eq!(
            p.entries,
            vec![
                StepEntry {
                    id: 2,
                    start: 40,
                    n_tokens: 1,
                    wants_logits: true
                },
                StepEntry {
                    id: 1,
                    start: 0,
                    n_tokens: 64,
                    wants_logits: false
                },
                StepEntry {
                    id: 3,
                    start: 0,
                    n_tokens: 10,
                    wants_logits: true
                },
            ]
        );
        assert_eq!(p.n_tokens(), 75);
    }

    #[test]
    fn admission_is_fifo_within_the_kv_budget() {
        let cfg = AdmissionConfig {
            kv_budget_tokens: 100,
            max_running: 0,
        };
        // 30 of 100 reserved: 40 and 30 fit, 50 does not, and 5 behind it waits its turn.
        assert_eq!(admit(&cfg, 1, 30, &[40, 30, 50, 5]), 2);
        assert_eq!(admit(&cfg, 0, 0, &[100]), 1);
        assert_eq!(admit(&cfg, 0, 0, &[101]), 0);
        assert_eq!(admit(&cfg, 3, 100, &[1]), 0);
        assert!(cfg.fits_alone(100) && !cfg.fits_alone(101));
        let unlimited = AdmissionConfig::default();
        assert_eq!(admit(&unlimited, 50, usize::MAX, &[usize::MAX, 7]), 2);
        assert!(unlimited.fits_alone(usize::MAX));
    }

    #[test]
    fn admission_respects_max_running() {
        let cfg = AdmissionConfig {
            kv_budget_tokens: 0,
            max_running: 4,
        };
        assert_eq!(admit(&cfg, 2, 0, &[1, 1, 1]), 2);
        assert_eq!(admit(&cfg, 4, 0, &[1]), 0);
        assert_eq!(admit(&cfg, 0, 0, &[]), 0);
    }

    #[test]
    fn budget_and_seq_limits_hold() {
        let cfg = SchedulerConfig {
            max_batch_tokens: 5,
            prefill_chunk: 512,
            max_seqs: 2,
        };
        let seqs: Vec<SeqStatus> = (0..4)
            .map(|i| SeqStatus {
                id: i,
                cached: 0,
                pending: 3,
            })
            .collect();
        let p = schedule(&cfg, &seqs);
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.n_tokens(), 5);
        assert!(p.entries[0].wants_logits && !p.entries[1].wants_logits);
        assert!(schedule(&cfg, &[]).entries.is_empty());
    }
}
