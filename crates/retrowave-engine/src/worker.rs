//! One tensor-parallel worker: its shard of the weights on its backend, the KV caches of its heads,
//! and the model forward written once against [`Backend`].

use std::collections::HashMap;
use std::sync::Arc;

use retrowave_core::{
    Backend, BatchLayout, Collective, FidelitySample, HeadLayout, RopeParams, RowSampling, SeqRows,
    WaveConfig, WaveStats,
};
use retrowave_model::arch::{ModelConfig, WeightSource};

use crate::EngineError;
use crate::shard::Shard;

/// Projections of one input: stacked into one matrix when the backend can, else apart.
enum Projections<B: Backend> {
    Stacked { w: B::Matrix, widths: Vec<usize> },
    Apart(Vec<B::Matrix>),
}

impl<B: Backend> Projections<B> {
    fn new(backend: &B, parts: Vec<(B::Matrix, usize)>) -> Self {
        let refs: Vec<&B::Matrix> = parts.iter().map(|(m, _)| m).collect();
        match backend.stack_matrices(&refs) {
            Some(w) => Projections::Stacked {
                w,
                widths: parts.iter().map(|(_, n)| *n).collect(),
            },
            None => Projections::Apart(parts.into_iter().map(|(m, _)| m).collect()),
        }
    }

    fn apply(&self, b: &B, x: &B::Acts) -> Vec<B::Acts> {
        match self {
            Projections::Stacked { w, widths } => b.split_cols(&b.linear(x, w, None), widths),
            Projections::Apart(ws) => ws.iter().map(|w| b.linear(x, w, None)).collect(),
        }
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Vector,
    /// Q, K, V.
    qkv: Projections<B>,
    bq: Option<B::Vector>,
    bk: Option<B::Vector>,
    bv: Option<B::Vector>,
    wo: B::Matrix,
    ffn_norm: B::Vector,
    /// Gate, up.
    gate_up: Projections<B>,
    w_down: B::Matrix,
}

/// What a step returns on rank 0.
enum StepOutput {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

/// A worker: weights, caches and forward for one shard.
pub struct Worker<B: Backend> {
    backend: B,
    shard: Shard,
    heads: HeadLayout,
    rope: RopeParams,
    rms_eps: f32,
    n_layers: usize,
    embed: B::Matrix,
    layers: Vec<Layer<B>>,
    out_norm: B::Vector,
    /// The LM head: the separate output matrix on rank 0 (`None` with tied embeddings, which use
    /// `embed`), or with a split head this rank's vocabulary rows of it (tied or not).
    output: Option<B::Matrix>,
    /// With a split LM head, every rank's vocabulary width (rank order).
    lm_split: Option<Vec<usize>>,
    caches: HashMap<usize, B::Kv>,
    reduce: Reduce,
    overlap: Overlap,
    /// A failure to raise at this layer in the next step, and whether as a panic
    /// ([`Worker::fail_next_step`]).
    fail_at: Option<(usize, bool)>,
}

/// Where the LM head runs in a tensor-parallel group with a device collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmHead {
    /// Rank 0 holds the whole matrix and computes every logit (the other ranks wait).
    Rank0,
    /// Every rank holds and computes its share of the vocabulary; the logits are gathered.
    Split,
}

impl LmHead {
    /// `RETROWAVE_TP_LM_HEAD=rank0`, else `Split`, the default: measured faster at batch 1 and
    /// equal at large batches (4 x H200, README, issue 8).
    pub fn from_env() -> Self {
        match std::env::var("RETROWAVE_TP_LM_HEAD").as_deref() {
            Ok("rank0") => LmHead::Rank0,
            Ok("split") | Err(_) => LmHead::Split,
            Ok(other) => {
                tracing::warn!("RETROWAVE_TP_LM_HEAD={other:?} is not rank0 or split; using split");
                LmHead::Split
            }
        }
    }
}

/// How a worker sums the partial outputs of its row-parallel projections over the group.
#[derive(Clone)]
pub enum Reduce {
    /// A group of one: nothing to sum.
    Alone,
    /// Through host memory (the CPU backend, or a device backend without a collective).
    Host(Arc<dyn Collective<Vec<f32>>>),
    /// On the devices ([`Backend::all_reduce`], after [`Backend::join_group`]).
    Device,
}

/// Whether a tensor-parallel step is cut in two so that each half's collectives run beside the
/// other half's work ([`Backend::all_reduce_begin`]). Decode steps are never cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Never.
    Off,
    /// Steps with a prefill chunk of at least this many rows, on backends whose collectives
    /// really overlap (NCCL on GPUs).
    Auto(usize),
    /// Every step with a prefill chunk and at least two rows, whatever the backend (the CPU
    /// tests use it to check the cut against the uncut step; it gains nothing there).
    Always,
}

impl Overlap {
    /// Rows from which [`Overlap::Auto`] cuts a step by default. Measured on 4 x H200
    /// (random-weight Llama-3-8B, 32K prefill, tokens/s uncut -> cut): chunks of 4096 rows
    /// 33.1K -> 33.7K at TP=2 and 52.8K -> 55.8K at TP=4; 8192 rows 34.0K -> 35.4K and
    /// 54.2K -> 60.4K; but 2048 rows lost 1% and 13% (halves of 1024 rows run the GEMMs less
    /// efficiently than the overlap hides).
    pub const DEFAULT_MIN_ROWS: usize = 4096;

    /// `off` (or `0`), `auto` (from [`Overlap::DEFAULT_MIN_ROWS`]), `always`, or a number of
    /// rows (`Auto` from there).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "0" | "off" => Ok(Overlap::Off),
            "auto" => Ok(Overlap::Auto(Self::DEFAULT_MIN_ROWS)),
            "always" => Ok(Overlap::Always),
            n => n
                .parse()
                .map(Overlap::Auto)
                .map_err(|_| format!("{s:?} is not off, auto, always or a number of rows")),
        }
    }

    /// `RETROWAVE_TP_OVERLAP` ([`Overlap::parse`]); unset or unreadable (with a warning):
    /// `Auto(DEFAULT_MIN_ROWS)`.
    pub fn from_env() -> Self {
        let Ok(v) = std::env::var("RETROWAVE_TP_OVERLAP") else {
            return Overlap::Auto(Self::DEFAULT_MIN_ROWS);
        };
        Self::parse(&v).unwrap_or_else(|e| {
            tracing::warn!("RETROWAVE_TP_OVERLAP: {e}; using auto");
            Overlap::Auto(Self::DEFAULT_MIN_ROWS)
        })
    }
}

/// The failure [`Worker::fail_next_step`] asked for, raised at its layer (into `failed`), or
/// the panic.
fn injected(fail_at: Option<(usize, bool)>, layer: usize, failed: &mut Option<EngineError>) {
    match fail_at {
        Some((l, true)) if l == layer => panic!("injected panic at layer {layer}"),
        Some((l, false)) if l == layer && failed.is_none() => {
            *failed = Some(EngineError::InjectedFailure { layer });
        }
        _ => {}
    }
}

/// `batch` cut at row `at`: the layouts of rows `..at` and `at..` (rows renumbered from 0), each
/// with the indices of its sequences in `batch.seqs`. A sequence whose rows straddle `at` is in
/// both, its B part starting where its A part ends.
pub(crate) fn split_rows(batch: &BatchLayout, at: usize) -> [(BatchLayout, Vec<usize>); 2] {
    let mut out: [(BatchLayout, Vec<usize>); 2] = Default::default();
    for (i, s) in batch.seqs.iter().enumerate() {
        let (r0, r1) = (s.row, s.row + s.n_tokens);
        if r0 < at && r1 > r0 {
            out[0].0.seqs.push(SeqRows {
                n_tokens: r1.min(at) - r0,
                ..*s
            });
            out[0].1.push(i);
        }
        if r1 > at {
            let from = r0.max(at);
            out[1].0.seqs.push(SeqRows {
                slot: s.slot,
                row: from - at,
                start_pos: s.start_pos + (from - r0),
                n_tokens: r1 - from,
            });
            out[1].1.push(i);
        }
    }
    out
}

impl<B: Backend> Worker<B> {
    /// Loads this shard's weights from `src`.
    pub fn load(
        backend: B,
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        shard: Shard,
        reduce: Reduce,
    ) -> Result<Self, EngineError> {
        let hd = cfg.head_dim;
        let q_rows = shard.q_heads.start * hd..shard.q_heads.end * hd;
        let kv_rows = shard.kv_heads.start * hd..shard.kv_heads.end * hd;
        let all = |n: usize| 0..n;
        let w = |name: &str| src.weight(name).map_err(EngineError::from);
        let mat = |name: &str,
                   rows: std::ops::Range<usize>,
                   cols: std::ops::Range<usize>|
         -> Result<B::Matrix, EngineError> {
            let v = w(name)?;
            Ok(backend.load_matrix(&v, rows, cols)?)
        };
        let vec = |name: &str, range: std::ops::Range<usize>| -> Result<B::Vector, EngineError> {
            let v = w(name)?;
            Ok(backend.load_vector(&v, range)?)
        };
        let opt_vec =
            |name: &str, range: std::ops::Range<usize>| -> Result<Option<B::Vector>, EngineError> {
                if src.has(name) {
                    vec(name, range).map(Some)
                } else {
                    Ok(None)
                }
            };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |t: &str| format!("blk.{i}.{t}");
            let qkv = vec![
                (
                    mat(&n("attn_q.weight"), q_rows.clone(), all(cfg.hidden))?,
                    q_rows.len(),
                ),
                (
                    mat(&n("attn_k.weight"), kv_rows.clone(), all(cfg.hidden))?,
                    kv_rows.len(),
                ),
                (
                    mat(&n("attn_v.weight"), kv_rows.clone(), all(cfg.hidden))?,
                    kv_rows.len(),
                ),
            ];
            let gate_up = vec![
                (
                    mat(&n("ffn_gate.weight"), shard.ffn.clone(), all(cfg.hidden))?,
                    shard.ffn.len(),
                ),
                (
                    mat(&n("ffn_up.weight"), shard.ffn.clone(), all(cfg.hidden))?,
                    shard.ffn.len(),
                ),
            ];
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm.weight"), all(cfg.hidden))?,
                qkv: Projections::new(&backend, qkv),
                gate_up: Projections::new(&backend, gate_up),
                bq: opt_vec(&n("attn_q.bias"), q_rows.clone())?,
                bk: opt_vec(&n("attn_k.bias"), kv_rows.clone())?,
                bv: opt_vec(&n("attn_v.bias"), kv_rows.clone())?,
                wo: mat(&n("attn_output.weight"), all(cfg.hidden), q_rows.clone())?,
                ffn_norm: vec(&n("ffn_norm.weight"), all(cfg.hidden))?,
                w_down: mat(&n("ffn_down.weight"), all(cfg.hidden), shard.ffn.clone())?,
            });
        }
        let embed = mat("token_embd.weight", all(cfg.vocab_size), all(cfg.hidden))?;
        // A split LM head needs the device collective to gather its logits.
        let lm_split = (matches!(reduce, Reduce::Device) && LmHead::from_env() == LmHead::Split)
            .then(|| crate::shard::vocab_split(cfg.vocab_size, shard.world));
        let head_name = if cfg.tied_embeddings {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        // Tied embeddings without a split head use `embed` itself.
        let rows = match &lm_split {
            Some(v) => Some(v[shard.rank].clone()),
            None => (shard.rank == 0 && !cfg.tied_embeddings).then(|| all(cfg.vocab_size)),
        };
        let output = rows
            .map(|r| mat(head_name, r, all(cfg.hidden)))
            .transpose()?;
        let lm_split = lm_split.map(|v| v.iter().map(|r| r.len()).collect());
        let out_norm = vec("output_norm.weight", all(cfg.hidden))?;
        Ok(Worker {
            heads: HeadLayout {
                n_heads: shard.q_heads.len(),
                n_kv_heads: shard.kv_heads.len(),
                head_dim: hd,
            },
            rope: RopeParams {
                style: cfg.rope_style,
                theta: cfg.rope_theta,
                dim: cfg.rope_dim,
            },
            rms_eps: cfg.rms_eps,
            n_layers: cfg.n_layers,
            backend,
            shard,
            embed,
            layers,
            out_norm,
            output,
            lm_split,
            caches: HashMap::new(),
            reduce,
            overlap: Overlap::from_env(),
            fail_at: None,
        })
    }

    /// This worker's shard.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Sets when steps are cut in two to overlap collectives (default: [`Overlap::from_env`]).
    pub fn set_overlap(&mut self, overlap: Overlap) {
        self.overlap = overlap;
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Creates (or resets) the cache of `slot`.
    pub fn open_slot(&mut self, slot: usize, max_tokens: usize) -> Result<(), EngineError> {
        let kv = self.backend.new_kv(self.n_layers, self.heads, max_tokens)?;
        self.caches.insert(slot, kv);
        Ok(())
    }

    /// Drops the cache of `slot`.
    pub fn close_slot(&mut self, slot: usize) {
        self.caches.remove(&slot);
    }

    fn all_reduce(&self, x: &mut B::Acts) -> Result<(), EngineError> {
        match &self.reduce {
            Reduce::Alone => {}
            Reduce::Host(c) => {
                let (rows, cols) = self.backend.acts_shape(x);
                let mut host = self.backend.acts_to_host(x);
                c.all_reduce_sum(self.shard.rank, &mut host)?;
                *x = self.backend.acts_from_host(&host, rows, cols);
            }
            Reduce::Device => self.backend.all_reduce(x),
        }
        Ok(())
    }

    /// Replaces how partial sums are summed (a new group after an abort).
    pub(crate) fn set_reduce(&mut self, reduce: Reduce) {
        self.reduce = reduce;
    }

    /// Makes the next step fail at the attention of `layer` on this worker, as a rank-local
    /// failure in the middle of a step would (tests and `bench tp-recover`).
    /// With `panic`, the worker panics there instead (a bug in the middle of a step).
    pub(crate) fn fail_next_step(&mut self, layer: usize, panic: bool) {
        self.fail_at = Some((layer, panic));
    }

    /// Runs the model over `tokens` laid out by `batch`, appending to the caches of its slots.
    /// Returns the logits of `logits_rows` (`[logits_rows.len(), vocab]`) on rank 0, `None`
    /// elsewhere.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        batch: &BatchLayout,
        logits_rows: &[usize],
    ) -> Result<Option<Vec<f32>>, EngineError> {
        Ok(match self.step(tokens, batch, logits_rows, None)? {
            Some(StepOutput::Logits(l)) => Some(l),
            _ => None,
        })
    }

    /// Whether this worker's backend picks tokens on the device.
    pub fn samples_on_device(&self) -> bool {
        self.backend.samples_on_device()
    }

    /// As [`Worker::forward`], then picks one token per logits row on the device (`sampling[i]`
    /// for `logits_rows[i]`); returns the tokens on rank 0.
    pub fn forward_sample(
        &mut self,
        tokens: &[u32],
        batch: &BatchLayout,
        logits_rows: &[usize],
        sampling: &[RowSampling],
    ) -> Result<Option<Vec<u32>>, EngineError> {
        Ok(
            match self.step(tokens, batch, logits_rows, Some(sampling))? {
                Some(StepOutput::Tokens(t)) => Some(t),
                _ => None,
            },
        )
    }

    fn step(
        &mut self,
        tokens: &[u32],
        batch: &BatchLayout,
        logits_rows: &[usize],
        sampling: Option<&[RowSampling]>,
    ) -> Result<Option<StepOutput>, EngineError> {
        // Take the caches of the batch's slots out of the map for the duration of the step.
        let mut taken = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let kv = self
                .caches
                .remove(&s.slot)
                .ok_or(EngineError::UnknownSlot(s.slot));
            match kv {
                Ok(kv) => taken.push((s.slot, kv)),
                Err(e) => {
                    for (slot, kv) in taken {
                        self.caches.insert(slot, kv);
                    }
                    return Err(e);
                }
            }
        }
        // Decode steps that sample on the device may run as a captured graph (with a device
        // collective, each rank captures and replays its own, collectives included): the
        // backend replays one when it has captured this shape, else runs (and captures) the ops.
        // (A step asked to fail runs eagerly, so that the failure happens where it was asked.)
        let fail_at = self.fail_at.take();
        let graph =
            sampling.filter(|_| !matches!(self.reduce, Reduce::Host(_)) && fail_at.is_none());
        if let Some(rows) = graph {
            let mut caches: Vec<&mut B::Kv> = taken.iter_mut().map(|(_, kv)| kv).collect();
            let begun =
                self.backend
                    .graph_step_begin(tokens, batch, &mut caches, logits_rows, rows);
            drop(caches);
            match begun {
                Ok(Some(t)) => {
                    for (slot, kv) in taken {
                        self.caches.insert(slot, kv);
                    }
                    return Ok(Some(StepOutput::Tokens(t)));
                }
                Ok(None) => {}
                Err(e) => {
                    for ((slot, mut kv), s) in taken.into_iter().zip(&batch.seqs) {
                        self.backend.kv_truncate(&mut kv, s.start_pos);
                        self.caches.insert(slot, kv);
                    }
                    return Err(e.into());
                }
            }
        }
        let this = &*self;
        let halves = this.overlap_split(batch);
        let mut result = this
            .backend
            .run(|| -> Result<Option<StepOutput>, EngineError> {
                let mut caches: Vec<&mut B::Kv> = taken.iter_mut().map(|(_, kv)| kv).collect();
                let (x, failed) = match halves {
                    Some(at) => this.layers_overlapped(tokens, batch, &mut caches, at, fail_at)?,
                    None => this.layers_in_turn(tokens, batch, &mut caches, fail_at)?,
                };
                this.lm_head(&x, logits_rows, sampling, failed)
            });
        if graph.is_some() {
            match self.backend.graph_step_end(result.is_ok()) {
                Ok(Some(t)) if result.is_ok() => result = Ok(Some(StepOutput::Tokens(t))),
                Ok(_) => {}
                Err(e) => result = Err(e.into()),
            }
        }
        if result.is_err() {
            // A step that failed early (through `?`) may leave a failure recorded by a later
            // operation (an aborted collective): it belongs to this step, not the next.
            let _ = self.backend.check();
        }
        for ((slot, mut kv), s) in taken.into_iter().zip(&batch.seqs) {
            if result.is_err() {
                // A failed step leaves no partial token behind: rewind to the state before it.
                self.backend.kv_truncate(&mut kv, s.start_pos);
            }
            self.caches.insert(slot, kv);
        }
        result
    }

    /// Attention half of layer `li` for the rows of `batch`, from the normed activations `h`:
    /// this rank's partial output projection (to be summed over the group).
    fn attention_block(
        &self,
        li: usize,
        h: &B::Acts,
        positions: &[u32],
        batch: &BatchLayout,
        caches: &mut [&mut B::Kv],
    ) -> Result<B::Acts, EngineError> {
        let (b, l) = (&self.backend, &self.layers[li]);
        let hd = self.heads.head_dim;
        let mut qkv = l.qkv.apply(b, h).into_iter();
        let (Some(mut q), Some(mut k), Some(mut v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(EngineError::Config(
                "QKV projection gave fewer than 3 outputs".into(),
            ));
        };
        for (x, bias) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
            if let Some(bias) = bias {
                b.add_bias(x, bias);
            }
        }
        let (nh, nkv) = (self.heads.n_heads, self.heads.n_kv_heads);
        b.rope_qk(&mut q, &mut k, positions, nh, nkv, hd, &self.rope);
        let a = b.attention(li, &q, &k, &v, caches, batch, self.heads)?;
        Ok(b.linear(&a, &l.wo, None))
    }

    /// MLP half of layer `li`, from the normed activations `h`: this rank's partial down
    /// projection (to be summed).
    fn mlp_block(&self, li: usize, h: &B::Acts) -> Result<B::Acts, EngineError> {
        let (b, l) = (&self.backend, &self.layers[li]);
        let gu = l.gate_up.apply(b, h);
        let [g, u] = &gu[..] else {
            return Err(EngineError::Config(
                "gate/up projection gave other than 2 outputs".into(),
            ));
        };
        Ok(b.linear(&b.silu_mul(g, u), &l.w_down, None))
    }

    /// The layers over the whole batch, each collective waited for where it is needed.
    fn layers_in_turn(
        &self,
        tokens: &[u32],
        batch: &BatchLayout,
        caches: &mut [&mut B::Kv],
        fail_at: Option<(usize, bool)>,
    ) -> Result<(B::Acts, Option<EngineError>), EngineError> {
        let b = &self.backend;
        let positions = batch.positions();
        let mut x = b.embed(&self.embed, tokens)?;
        let mut failed = None;
        // Each residual add and the norm after it run as one operation (`add_rms_norm`).
        let mut normed = None;
        for (li, l) in self.layers.iter().enumerate() {
            injected(fail_at, li, &mut failed);
            let h = normed
                .take()
                .unwrap_or_else(|| b.rms_norm(&x, &l.attn_norm, self.rms_eps));
            let mut o = self.partial(&mut failed, &h, |h| {
                self.attention_block(li, h, &positions, batch, caches)
            });
            self.all_reduce(&mut o)?;
            let h = b.add_rms_norm(&mut x, &o, &l.ffn_norm, self.rms_eps);
            let mut d = self.partial(&mut failed, &h, |h| self.mlp_block(li, h));
            self.all_reduce(&mut d)?;
            match self.layers.get(li + 1) {
                Some(next) => {
                    normed = Some(b.add_rms_norm(&mut x, &d, &next.attn_norm, self.rms_eps));
                }
                None => b.add_assign(&mut x, &d),
            }
        }
        Ok((x, failed))
    }

    /// This rank's partial sum `f(x)` for the next collective, or, once the step has failed on
    /// this rank (`failed`, set here if `f` fails), zeros of `x`'s shape: a failed rank goes on
    /// taking part in the step's remaining collectives, so that the other ranks finish the step
    /// instead of waiting for it forever; the step then fails (see [`Worker::lm_head`]).
    fn partial(
        &self,
        failed: &mut Option<EngineError>,
        x: &B::Acts,
        f: impl FnOnce(&B::Acts) -> Result<B::Acts, EngineError>,
    ) -> B::Acts {
        if failed.is_none() {
            match f(x) {
                Ok(a) => return a,
                Err(e) => *failed = Some(e),
            }
        }
        let (rows, cols) = self.backend.acts_shape(x);
        self.zeros(rows, cols)
    }

    /// `[rows, cols]` zeros: what a failed rank sends into the step's remaining collectives.
    fn zeros(&self, rows: usize, cols: usize) -> B::Acts {
        self.backend
            .acts_from_host(&vec![0.0; rows * cols], rows, cols)
    }

    /// Where to cut this step's rows in two for [`Worker::layers_overlapped`], if it should be:
    /// see [`Overlap`].
    fn overlap_split(&self, batch: &BatchLayout) -> Option<usize> {
        let rows = batch.n_rows();
        let min_rows = match self.overlap {
            Overlap::Off => return None,
            Overlap::Always => 2,
            Overlap::Auto(min) => min.max(2),
        };
        let device = matches!(self.reduce, Reduce::Device);
        let overlaps =
            matches!(self.overlap, Overlap::Always) || self.backend.overlaps_collectives();
        // Steps of single-token rows only are decode steps: captured as graphs on GPUs, and
        // too small for a second copy of every weight read to pay (README, issue 8).
        let prefill = batch.seqs.iter().any(|s| s.n_tokens > 1);
        (device && overlaps && prefill && rows >= min_rows).then_some(rows / 2)
    }

    /// The layers over the batch cut at row `at` into two halves, interleaved so that each
    /// half's collective runs while the other half computes: attention of A, sum of A begins,
    /// attention of B, sum of B begins, A waits for its sum and runs its MLP, and so on. Every
    /// rank cuts the same rows (the batch is the same on all) and so begins and ends the same
    /// collectives in the same order. The B rows of a sequence cut in two attend to its A rows,
    /// whose keys and values the same layer's A attention wrote just before.
    fn layers_overlapped(
        &self,
        tokens: &[u32],
        batch: &BatchLayout,
        caches: &mut [&mut B::Kv],
        at: usize,
        fail_at: Option<(usize, bool)>,
    ) -> Result<(B::Acts, Option<EngineError>), EngineError> {
        let b = &self.backend;
        let halves = split_rows(batch, at);
        let positions = [halves[0].0.positions(), halves[1].0.positions()];
        let mut xs = [
            b.embed(&self.embed, &tokens[..at])?,
            b.embed(&self.embed, &tokens[at..])?,
        ];
        // The partial sum in flight of each half (tag h), waited for and added to the half's
        // activations just before their next use (and at the end).
        let mut pending: [Option<B::Acts>; 2] = [None, None];
        let settle = |h: usize, x: &mut B::Acts, p: &mut Option<B::Acts>| {
            if let Some(d) = p.take() {
                b.all_reduce_end(h);
                b.add_assign(x, &d);
            }
        };
        let mut failed = None;
        for li in 0..self.layers.len() {
            injected(fail_at, li, &mut failed);
            for (h, (half, seqs)) in halves.iter().enumerate() {
                settle(h, &mut xs[h], &mut pending[h]);
                let mut sub: Vec<&mut B::Kv> = caches
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| seqs.contains(i))
                    .map(|(_, c)| &mut **c)
                    .collect();
                let mut o = self.partial(&mut failed, &xs[h], |x| {
                    let n = b.rms_norm(x, &self.layers[li].attn_norm, self.rms_eps);
                    self.attention_block(li, &n, &positions[h], half, &mut sub)
                });
                b.all_reduce_begin(&mut o, h);
                pending[h] = Some(o);
            }
            for h in 0..2 {
                settle(h, &mut xs[h], &mut pending[h]);
                let mut d = self.partial(&mut failed, &xs[h], |x| {
                    self.mlp_block(li, &b.rms_norm(x, &self.layers[li].ffn_norm, self.rms_eps))
                });
                b.all_reduce_begin(&mut d, h);
                pending[h] = Some(d);
            }
        }
        for h in 0..2 {
            settle(h, &mut xs[h], &mut pending[h]);
        }
        Ok((b.concat_rows(&[&xs[0], &xs[1]]), failed))
    }

    /// Final norm and LM head of the rows `logits_rows` of `x`: logits (or sampled tokens) on
    /// rank 0, `None` elsewhere.
    /// `failed`: the step failed on this rank in a layer; it still takes part in the head's
    /// gather like the other ranks (with zeros), then returns that failure.
    fn lm_head(
        &self,
        x: &B::Acts,
        logits_rows: &[usize],
        sampling: Option<&[RowSampling]>,
        failed: Option<EngineError>,
    ) -> Result<Option<StepOutput>, EngineError> {
        let b = &self.backend;
        if logits_rows.is_empty() || (self.shard.rank != 0 && self.lm_split.is_none()) {
            b.check()?;
            return failed.map_or(Ok(None), Err);
        }
        if let Some(e) = failed {
            if let (Some(widths), Some(_)) = (&self.lm_split, &self.output) {
                let part = self.zeros(logits_rows.len(), widths[self.shard.rank]);
                let _ = b.all_gather_cols(&part, widths);
            }
            return Err(e);
        }
        let last = b.select_rows(x, logits_rows);
        let h = b.rms_norm(&last, &self.out_norm, self.rms_eps);
        let logits = match (&self.lm_split, &self.output) {
            (Some(widths), Some(part)) => b.all_gather_cols(&b.linear(&h, part, None), widths)?,
            (_, out) => b.linear(&h, out.as_ref().unwrap_or(&self.embed), None),
        };
        if self.shard.rank != 0 {
            b.check()?;
            return Ok(None);
        }
        if let Some(rows) = sampling {
            let t = b.sample_rows(&logits, rows)?;
            b.check()?;
            return Ok(Some(StepOutput::Tokens(t)));
        }
        let host = b.acts_to_host(&logits);
        b.check()?;
        Ok(Some(StepOutput::Logits(host)))
    }

    /// Runs `f` on the backend and the cache of `slot`.
    fn with_cache<R>(
        &mut self,
        slot: usize,
        f: impl FnOnce(&B, &mut B::Kv) -> R,
    ) -> Result<R, EngineError> {
        let kv = self
            .caches
            .get_mut(&slot)
            .ok_or(EngineError::UnknownSlot(slot))?;
        Ok(f(&self.backend, kv))
    }

    /// Builds the wave index over the cache of `slot`.
    pub fn build_index(&mut self, slot: usize, cfg: &WaveConfig) -> Result<(), EngineError> {
        Ok(self.with_cache(slot, |b, kv| b.kv_build_index(kv, cfg))??)
    }

    /// Fills the cache of `slot` with `len` synthetic tokens and indexes them, with room for
    /// `room` more (benchmarks only; see `Backend::kv_fill_synthetic_indexed`).
    pub fn fill_synthetic_indexed(
        &mut self,
        slot: usize,
        len: usize,
        room: usize,
        seed: u64,
        cfg: &WaveConfig,
    ) -> Result<(), EngineError> {
        Ok(self.with_cache(slot, |b, kv| {
            b.kv_fill_synthetic_indexed(kv, len, room, seed, cfg)
        })??)
    }

    /// Fills the cache of `slot` with `len` synthetic tokens (benchmarks only).
    pub fn fill_synthetic(
        &mut self,
        slot: usize,
        len: usize,
        seed: u64,
    ) -> Result<(), EngineError> {
        Ok(self.with_cache(slot, |b, kv| b.kv_fill_synthetic(kv, len, seed))??)
    }

    /// Copies the cache of `src` (index included) into `dst`.
    pub fn fork_slot(&mut self, src: usize, dst: usize) -> Result<(), EngineError> {
        let kv = self.caches.get(&src).ok_or(EngineError::UnknownSlot(src))?;
        let copy = self.backend.kv_clone(kv)?;
        self.caches.insert(dst, copy);
        Ok(())
    }

    /// Wave counters of `slot` (this worker's heads).
    pub fn wave_stats(&self, slot: usize) -> Option<WaveStats> {
        self.caches
            .get(&slot)
            .and_then(|kv| self.backend.kv_wave_stats(kv))
    }

    /// Turns the fidelity probe of `slot` on or off.
    pub fn set_probe(&mut self, slot: usize, on: bool) -> Result<(), EngineError> {
        self.with_cache(slot, |b, kv| b.kv_set_probe(kv, on))
    }

    /// Takes the fidelity samples of `slot`, with query heads numbered model-wide.
    pub fn take_probe(&mut self, slot: usize) -> Result<Vec<FidelitySample>, EngineError> {
        let q0 = self.shard.q_heads.start;
        let kv0 = self.shard.kv_heads.start;
        let mut samples = self.with_cache(slot, |b, kv| b.kv_take_probe(kv))?;
        for s in &mut samples {
            s.q_head += q0;
            s.kv_head += kv0;
        }
        Ok(samples)
    }

    /// Rewinds the cache of `slot` to `len` tokens.
    pub fn truncate_slot(&mut self, slot: usize, len: usize) {
        if let Some(kv) = self.caches.get_mut(&slot) {
            self.backend.kv_truncate(kv, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(slot: usize, row: usize, start_pos: usize, n_tokens: usize) -> SeqRows {
        SeqRows {
            slot,
            row,
            start_pos,
            n_tokens,
        }
    }

    #[test]
    fn overlap_modes_parse_and_bad_ones_are_named() {
        assert_eq!(Overlap::parse("off"), Ok(Overlap::Off));
        assert_eq!(Overlap::parse("0"), Ok(Overlap::Off));
        assert_eq!(
            Overlap::parse(" auto "),
            Ok(Overlap::Auto(Overlap::DEFAULT_MIN_ROWS))
        );
        assert_eq!(Overlap::parse("always"), Ok(Overlap::Always));
        assert_eq!(Overlap::parse("8192"), Ok(Overlap::Auto(8192)));
        let e = Overlap::parse("sometimes").unwrap_err();
        assert!(e.contains("sometimes"), "{e}");
    }

    #[test]
    fn a_cut_keeps_every_row_once_in_order_with_its_position() {
        // A decode row, a prefill of 6 rows cut after its 3rd, another prefill, a decode row.
        let batch = BatchLayout {
            seqs: vec![
                seq(7, 0, 40, 1),
                seq(3, 1, 10, 6),
                seq(5, 7, 0, 4),
                seq(9, 11, 8, 1),
            ],
        };
        let [(a, ia), (b, ib)] = split_rows(&batch, 4);
        assert_eq!(a.seqs, vec![seq(7, 0, 40, 1), seq(3, 1, 10, 3)]);
        assert_eq!(ia, vec![0, 1]);
        assert_eq!(
            b.seqs,
            vec![seq(3, 0, 13, 3), seq(5, 3, 0, 4), seq(9, 7, 8, 1)]
        );
        assert_eq!(ib, vec![1, 2, 3]);
        // Positions of A then B are those of the whole batch.
        let mut p = a.positions();
        p.extend(b.positions());
        assert_eq!(p, batch.positions());
        // A cut on a sequence boundary puts each sequence in one half only.
        let [(a, ia), (b, ib)] = split_rows(&batch, 7);
        assert_eq!((a.seqs.len(), ia), (2, vec![0, 1]));
        assert_eq!((b.seqs.len(), ib), (2, vec![2, 3]));
        assert_eq!(b.seqs[0], seq(5, 0, 0, 4));
    }
}
