//! The backend trait: the operations a model forward needs, at the level of model operations.
//!
//! The forward pass (in `retrowave-engine`) is written once against [`Backend`]; each device kind
//! (CPU now, CUDA later) implements it with its own memory and kernels. A backend instance belongs
//! to one worker, which owns a slice of the attention heads and of the FFN (tensor parallelism);
//! the partial sums of the row-parallel projections are combined by a [`Collective`].

use std::ops::Range;

use crate::wave::{FidelitySample, WaveConfig, WaveStats};
use crate::weights::WeightView;

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The weight has a storage type this backend cannot execute.
    #[error("tensor {name}: type {dtype} is not supported by the {backend} backend")]
    UnsupportedType {
        name: String,
        dtype: crate::TensorType,
        backend: &'static str,
    },
    /// A slice of a weight was asked for that does not fit its shape.
    #[error(
        "tensor {name}: slice rows {rows:?} cols {cols:?} does not fit shape [{shape_rows} x {shape_cols}]"
    )]
    BadSlice {
        name: String,
        rows: Range<usize>,
        cols: Range<usize>,
        shape_rows: usize,
        shape_cols: usize,
    },
    /// A token id outside the embedding table.
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, vocab: usize },
    /// The device ran out of memory for the KV cache or activations.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Device not present or failed.
    #[error("device error: {0}")]
    Device(String),
}

/// Elements `range` of a weight read as one flat vector and dequantized to f32 (what every
/// backend's `load_vector` starts from); `backend` names the caller in errors.
pub fn vector_f32(
    w: &WeightView<'_>,
    range: Range<usize>,
    backend: &'static str,
) -> Result<Vec<f32>, BackendError> {
    let n = w.n_elements();
    if range.start > range.end || range.end > n {
        return Err(BackendError::BadSlice {
            name: w.name.to_string(),
            rows: 0..1,
            cols: range,
            shape_rows: w.rows,
            shape_cols: w.cols,
        });
    }
    let mut all = vec![0f32; n];
    crate::quant::dequantize_row(w.dtype, w.data, &mut all).map_err(|_| {
        BackendError::UnsupportedType {
            name: w.name.to_string(),
            dtype: w.dtype,
            backend,
        }
    })?;
    all.truncate(range.end);
    all.drain(..range.start);
    Ok(all)
}

/// How rotary position embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs `(x0, x1), (x2, x3), ...` (GGUF `llama`, whose Q/K rows are permuted for it).
    Interleaved,
    /// Rotate halves `(x_i, x_{i + d/2})` (GGUF `qwen2`, Hugging Face checkpoints).
    NeoX,
}

/// Rotary embedding parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub style: RopeStyle,
    pub theta: f32,
    /// Number of leading dimensions of each head that are rotated (usually `head_dim`).
    pub dim: usize,
}

/// Attention head geometry of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Query heads owned by this worker.
    pub n_heads: usize,
    /// KV heads owned by this worker; `n_heads` is a multiple of it (GQA groups stay whole).
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadLayout {
    /// Query heads sharing one KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }
}

/// One sequence's share of a batch of rows: `n_tokens` consecutive activation rows starting at
/// `row`, at positions `start_pos..start_pos + n_tokens` of the sequence whose cache is `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRows {
    pub slot: usize,
    pub row: usize,
    pub start_pos: usize,
    pub n_tokens: usize,
}

/// The layout of a batch: which rows belong to which sequence. Built by the engine per step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchLayout {
    pub seqs: Vec<SeqRows>,
}

impl BatchLayout {
    /// Total rows in the batch.
    pub fn n_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.n_tokens).sum()
    }

    /// Position of every row, in row order.
    pub fn positions(&self) -> Vec<u32> {
        let mut p = vec![0u32; self.n_rows()];
        for s in &self.seqs {
            for i in 0..s.n_tokens {
                p[s.row + i] = (s.start_pos + i) as u32;
            }
        }
        p
    }
}

/// How to pick one row's next token on the device: temperature (0 = greedy), top-k (0 = off),
/// top-p (1 = off), and the uniform draw in [0, 1) that selects the token by inverse CDF.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub uniform: f32,
}

impl RowSampling {
    /// The most likely token (temperature 0).
    pub const fn greedy() -> Self {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        }
    }
}

/// Sums partial activations across the workers of a tensor-parallel group.
pub trait Collective<A>: Send + Sync {
    /// Number of workers in the group.
    fn world(&self) -> usize;
    /// Replaces `x` on every rank by the sum of all ranks' `x` (same order on every rank, so the
    /// result is bit-identical everywhere). Fails once the group is aborted.
    fn all_reduce_sum(&self, rank: usize, x: &mut A) -> Result<(), BackendError>;
    /// Fails every collective now waiting and every later one (see [`Backend::abort_group`]).
    fn abort(&self);
}

/// An in-process group of `world` ranks that exchange host buffers (one thread a rank): every
/// rank publishes its buffer, waits for the others, then reads them all in rank order, so that
/// each rank gets a bit-identical result. The host-memory collective of the CPU workers, and of
/// GPU workers where NCCL is missing.
///
/// A group can be aborted ([`HostGroup::abort`]): every rank waiting in an exchange, and every
/// later exchange, then fails instead of waiting for a rank that will not come.
#[derive(Debug)]
pub struct HostGroup {
    slots: Vec<std::sync::Mutex<Vec<f32>>>,
    gate: Gate,
}

/// A reusable barrier that can be aborted.
#[derive(Debug)]
struct Gate {
    world: usize,
    state: std::sync::Mutex<GateState>,
    cv: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Ranks arrived in the current round.
    arrived: usize,
    /// The current round's number.
    round: u64,
    aborted: bool,
}

impl Gate {
    fn wait(&self) -> Result<(), BackendError> {
        let aborted = || BackendError::Device("the tensor-parallel group was aborted".into());
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.aborted {
            return Err(aborted());
        }
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.round += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let round = st.round;
        while st.round == round && !st.aborted {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.round == round {
            Err(aborted())
        } else {
            Ok(())
        }
    }

    fn abort(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).aborted = true;
        self.cv.notify_all();
    }
}

impl HostGroup {
    /// A group of `world` ranks (at least one).
    pub fn new(world: usize) -> Self {
        HostGroup {
            slots: (0..world.max(1))
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
            gate: Gate {
                world: world.max(1),
                state: std::sync::Mutex::default(),
                cv: std::sync::Condvar::new(),
            },
        }
    }

    /// Calls `read` with every rank's buffer in rank order, after each rank published `x`;
    /// returns when every rank has read (so the slots can be reused by the next call).
    fn exchange<R>(
        &self,
        rank: usize,
        x: &[f32],
        read: impl FnOnce(&[&[f32]]) -> R,
    ) -> Result<R, BackendError> {
        {
            let mut slot = self.slots[rank].lock().unwrap_or_else(|p| p.into_inner());
            slot.clear();
            slot.extend_from_slice(x);
        }
        self.gate.wait()?;
        let out = {
            let guards: Vec<_> = self
                .slots
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
                .collect();
            let views: Vec<&[f32]> = guards.iter().map(|g| g.as_slice()).collect();
            read(&views)
        };
        self.gate.wait()?;
        Ok(out)
    }

    /// Replaces `x` by the sum over the ranks (summed in rank order).
    pub fn all_reduce_sum(&self, rank: usize, x: &mut [f32]) -> Result<(), BackendError> {
        let n = x.len();
        let sum = self.exchange(rank, x, |all| {
            let mut acc = vec![0f32; n];
            for s in all {
                acc.iter_mut().zip(s.iter()).for_each(|(a, b)| *a += b);
            }
            acc
        })?;
        x.copy_from_slice(&sum);
        Ok(())
    }

    /// Every rank's `part`, in rank order.
    pub fn all_gather(&self, rank: usize, part: &[f32]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.exchange(rank, part, |all| all.iter().map(|s| s.to_vec()).collect())
    }

    /// Fails every exchange now waiting and every later one.
    pub fn abort(&self) {
        self.gate.abort();
    }
}

impl Collective<Vec<f32>> for HostGroup {
    fn world(&self) -> usize {
        self.slots.len()
    }

    fn all_reduce_sum(&self, rank: usize, x: &mut Vec<f32>) -> Result<(), BackendError> {
        HostGroup::all_reduce_sum(self, rank, x)
    }

    fn abort(&self) {
        HostGroup::abort(self);
    }
}

/// Assembles `[rows, sum(widths)]` from the ranks' `[rows, widths[r]]` blocks (rank order): what
/// [`Backend::all_gather_cols`] returns.
pub fn join_col_blocks(parts: &[Vec<f32>], rows: usize, widths: &[usize]) -> Vec<f32> {
    let total: usize = widths.iter().sum();
    let mut out = vec![0f32; rows * total];
    let mut off = 0;
    for (p, &w) in parts.iter().zip(widths) {
        for r in 0..rows {
            out[r * total + off..r * total + off + w].copy_from_slice(&p[r * w..(r + 1) * w]);
        }
        off += w;
    }
    out
}

/// The operations the model forward is written against.
pub trait Backend: Send + Sync + Clone {
    /// A weight matrix `[rows = out features, cols = in features]` in the backend's layout.
    type Matrix: Send + Sync + 'static;
    /// A 1-D f32 parameter (norm weight, bias).
    type Vector: Send + Sync + 'static;
    /// Activations: `rows x cols` f32, row-major.
    type Acts: Send + 'static;
    /// The KV cache of one sequence for every layer of this worker's KV heads.
    type Kv: Send + Sync + 'static;

    /// A short name ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Runs `f` in the backend's execution context (the CPU backend's thread pool, so that the
    /// operations inside it run on pool threads without a hand-off per operation).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Reports a failure recorded by an operation that cannot return one (a GPU backend records
    /// launch errors and exhausted device memory and reports them here, once per step).
    fn check(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Joins `backends` (one per tensor-parallel rank, in rank order) into a group whose
    /// activations are summed on the devices by [`Backend::all_reduce`] (NCCL on GPUs).
    /// `Ok(false)` when this backend has no device collective: the workers then sum through host
    /// memory (a [`Collective`]).
    fn join_group(backends: &[Self]) -> Result<bool, BackendError>
    where
        Self: Sized,
    {
        let _ = backends;
        Ok(false)
    }

    /// Replaces `x` on every rank of the group made by [`Backend::join_group`] by the sum of all
    /// ranks' `x`. Called only on backends that joined one; failures are reported by
    /// [`Backend::check`].
    fn all_reduce(&self, x: &mut Self::Acts) {
        let _ = x;
    }

    /// Starts [`Backend::all_reduce`] of `x` without making this rank's next operations wait
    /// for it, so that work independent of `x` runs while the sum is in flight (NCCL on a second
    /// stream of the GPU). Neither `x` nor its sum may be touched until
    /// [`Backend::all_reduce_end`] with the same `tag`; tags 0 and 1 may be in flight at once,
    /// and every rank begins and ends them in the same order. The default blocks, like
    /// `all_reduce`: see [`Backend::overlaps_collectives`].
    fn all_reduce_begin(&self, x: &mut Self::Acts, tag: usize) {
        let _ = tag;
        self.all_reduce(x);
    }

    /// Makes this rank's next operations wait for the sum begun with `tag` (no-op if none is).
    fn all_reduce_end(&self, tag: usize) {
        let _ = tag;
    }

    /// Whether [`Backend::all_reduce_begin`] really runs beside later work (the engine splits a
    /// large step in two to overlap the halves' collectives with each other's work only then).
    fn overlaps_collectives(&self) -> bool {
        false
    }

    /// Aborts the group that `backends` (all its ranks, in rank order) joined with
    /// [`Backend::join_group`], after one rank failed in the middle of a step: the collectives
    /// of the other ranks that wait for it return, and every later one fails (reported by
    /// [`Backend::check`]) instead of waiting for a rank that will not come. Called from a
    /// thread other than the ranks' own, while they may be blocked. Returns whether it did
    /// (then `join_group` on the same backends makes a new group). Default: `false`, cannot.
    ///
    /// (The CUDA backend cannot: `ncclCommAbort` of a group whose peer stopped mid-step did not
    /// return on the H200s, README issue 8. Its ranks avoid the wait instead: a rank whose step
    /// fails goes on taking part in the step's collectives, see the engine's worker.)
    fn abort_group(backends: &[Self]) -> bool
    where
        Self: Sized,
    {
        let _ = backends;
        false
    }

    /// Gathers the ranks' column blocks into `[rows, sum(widths)]` on every rank of the group
    /// made by [`Backend::join_group`]: rank r's `part` (`[rows, widths[r]]`) lands in columns
    /// `widths[..r].sum()..`, in rank order (the vocabulary-parallel LM head).
    fn all_gather_cols(
        &self,
        part: &Self::Acts,
        widths: &[usize],
    ) -> Result<Self::Acts, BackendError> {
        let _ = (part, widths);
        Err(BackendError::Device(format!(
            "the {} backend has no device collective",
            self.name()
        )))
    }

    /// Whether [`Backend::sample_rows`] picks tokens on the device (so that only token ids, not
    /// the logits, travel back to the host).
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Picks one token per row of `logits` (`[rows, vocab]`) on the device.
    fn sample_rows(
        &self,
        logits: &Self::Acts,
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, BackendError> {
        let _ = (logits, rows);
        Err(BackendError::Device(format!(
            "the {} backend samples on the host",
            self.name()
        )))
    }

    /// Starts a decode step that the backend may run as a captured graph (CUDA graphs): returns
    /// the sampled tokens when it replayed a graph captured for this shape (the step is then
    /// done, caches included), or `None` when the worker should run the operations, which the
    /// backend may be capturing; [`Backend::graph_step_end`] follows them.
    fn graph_step_begin(
        &self,
        tokens: &[u32],
        batch: &BatchLayout,
        caches: &mut [&mut Self::Kv],
        logits_rows: &[usize],
        sampling: &[RowSampling],
    ) -> Result<Option<Vec<u32>>, BackendError> {
        let _ = (tokens, batch, caches, logits_rows, sampling);
        Ok(None)
    }

    /// Ends a step started by [`Backend::graph_step_begin`] whose operations ran (`ok` false
    /// when one failed): returns the sampled tokens when the step was captured (and then
    /// launched), `None` when it ran directly.
    fn graph_step_end(&self, ok: bool) -> Result<Option<Vec<u32>>, BackendError> {
        let _ = ok;
        Ok(None)
    }

    /// Stacks the rows of several weights with the same input width into one matrix, so that
    /// projections of the same input (Q/K/V, gate/up) run as one operation. `None` when the
    /// backend cannot stack them (different storage types, say); callers then run them apart.
    fn stack_matrices(&self, parts: &[&Self::Matrix]) -> Option<Self::Matrix> {
        let _ = parts;
        None
    }

    /// Splits activations column-wise into consecutive blocks of the given widths.
    fn split_cols(&self, x: &Self::Acts, widths: &[usize]) -> Vec<Self::Acts>;

    /// Loads the sub-matrix `rows x cols` of a weight. `cols` must cover whole quantization blocks
    /// or the backend dequantizes that slice.
    fn load_matrix(
        &self,
        w: &WeightView<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Self::Matrix, BackendError>;

    /// Loads elements `range` of a 1-D weight as f32.
    fn load_vector(
        &self,
        w: &WeightView<'_>,
        range: Range<usize>,
    ) -> Result<Self::Vector, BackendError>;

    /// Activations from host data.
    fn acts_from_host(&self, data: &[f32], rows: usize, cols: usize) -> Self::Acts;
    /// Copies activations to the host.
    fn acts_to_host(&self, a: &Self::Acts) -> Vec<f32>;
    /// `(rows, cols)` of activations.
    fn acts_shape(&self, a: &Self::Acts) -> (usize, usize);
    /// Keeps only the listed rows, in the listed order.
    fn select_rows(&self, a: &Self::Acts, rows: &[usize]) -> Self::Acts;
    /// The rows of `parts`, one part after another (`[sum of rows, cols]`; equal `cols`).
    fn concat_rows(&self, parts: &[&Self::Acts]) -> Self::Acts;

    /// Looks up embedding rows.
    fn embed(&self, table: &Self::Matrix, tokens: &[u32]) -> Result<Self::Acts, BackendError>;
    /// Row-wise RMS normalisation scaled by `w`.
    fn rms_norm(&self, x: &Self::Acts, w: &Self::Vector, eps: f32) -> Self::Acts;
    /// `x += y`, then [`Backend::rms_norm`] of the new `x`: the residual add and the next
    /// layer's norm, which a backend may do in one pass over `x` (the same values either way).
    fn add_rms_norm(
        &self,
        x: &mut Self::Acts,
        y: &Self::Acts,
        w: &Self::Vector,
        eps: f32,
    ) -> Self::Acts {
        self.add_assign(x, y);
        self.rms_norm(x, w, eps)
    }
    /// `x @ w^T (+ bias)`.
    fn linear(&self, x: &Self::Acts, w: &Self::Matrix, bias: Option<&Self::Vector>) -> Self::Acts;
    /// Applies rotary embeddings in place to `x` viewed as `[rows, n_heads, head_dim]`.
    fn rope(
        &self,
        x: &mut Self::Acts,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
        rope: &RopeParams,
    );
    /// [`Backend::rope`] of the queries `q` (`n_heads` heads) and the keys `k` (`n_kv_heads`)
    /// of the same rows, which a backend may do in one operation (the same values either way).
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        q: &mut Self::Acts,
        k: &mut Self::Acts,
        positions: &[u32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rope: &RopeParams,
    ) {
        self.rope(q, positions, n_heads, head_dim, rope);
        self.rope(k, positions, n_kv_heads, head_dim, rope);
    }
    /// `silu(gate) * up`, element-wise.
    fn silu_mul(&self, gate: &Self::Acts, up: &Self::Acts) -> Self::Acts;
    /// Adds `bias` to every row of `x`.
    fn add_bias(&self, x: &mut Self::Acts, bias: &Self::Vector);
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Acts, y: &Self::Acts);

    /// Creates an empty KV cache for one sequence, able to grow to `max_tokens`.
    fn new_kv(
        &self,
        n_layers: usize,
        heads: HeadLayout,
        max_tokens: usize,
    ) -> Result<Self::Kv, BackendError>;
    /// Tokens stored in a cache.
    fn kv_len(&self, kv: &Self::Kv) -> usize;
    /// Drops the cached tokens from position `len` on (to rewind or reuse a cache).
    fn kv_truncate(&self, kv: &mut Self::Kv, len: usize);

    /// A copy of a cache (to fork a sequence after a shared prefix).
    fn kv_clone(&self, kv: &Self::Kv) -> Result<Self::Kv, BackendError>;

    /// Fills the cache with `len` tokens of synthetic keys and values (uniform random from
    /// `seed`) without running the model: for benchmarks of long contexts, which say so.
    fn kv_fill_synthetic(
        &self,
        kv: &mut Self::Kv,
        len: usize,
        seed: u64,
    ) -> Result<(), BackendError> {
        let _ = (kv, len, seed);
        Err(BackendError::Device(format!(
            "the {} backend cannot fill caches synthetically",
            self.name()
        )))
    }

    /// Fills the cache with `len` synthetic tokens (as [`Self::kv_fill_synthetic`]) and builds
    /// the wave index over them (as [`Self::kv_build_index`]), leaving room for `room` more
    /// tokens. A backend may do this without ever holding the whole context in device memory
    /// (the CUDA backend with `cfg.host_kv` builds in groups of heads, so contexts beyond GPU
    /// memory can be benchmarked); the cache's capacity is then replaced. By default the cache
    /// must already hold `len + room` tokens.
    fn kv_fill_synthetic_indexed(
        &self,
        kv: &mut Self::Kv,
        len: usize,
        room: usize,
        seed: u64,
        cfg: &WaveConfig,
    ) -> Result<(), BackendError> {
        let _ = room;
        self.kv_fill_synthetic(kv, len, seed)?;
        self.kv_build_index(kv, cfg)
    }

    /// Builds the wave index over everything the cache holds (called once the prompt is
    /// prefilled); later decode steps of this sequence attend through it and update it.
    fn kv_build_index(&self, kv: &mut Self::Kv, cfg: &WaveConfig) -> Result<(), BackendError> {
        let _ = (kv, cfg);
        Err(BackendError::Device(format!(
            "the {} backend has no wave attention",
            self.name()
        )))
    }

    /// Counters of the cache's wave index, if it has one.
    fn kv_wave_stats(&self, kv: &Self::Kv) -> Option<WaveStats> {
        let _ = kv;
        None
    }

    /// Turns fidelity probing on or off: while on, every wave decode step also computes exact
    /// attention and records [`FidelitySample`]s (slow; for `retrowave eval --fidelity`).
    fn kv_set_probe(&self, kv: &mut Self::Kv, on: bool) {
        let _ = (kv, on);
    }

    /// Takes the fidelity samples recorded so far.
    fn kv_take_probe(&self, kv: &mut Self::Kv) -> Vec<FidelitySample> {
        let _ = kv;
        Vec::new()
    }

    /// Causal attention for one layer: appends `k`/`v` rows (`[rows, n_kv_heads*head_dim]`) to the
    /// caches of their sequences at their positions, then attends each query row to every cached
    /// position up to its own. `caches[i]` is the cache of `batch.seqs[i]`.
    #[allow(clippy::too_many_arguments)] // one layer's attention: the inputs are all distinct
    fn attention(
        &self,
        layer: usize,
        q: &Self::Acts,
        k: &Self::Acts,
        v: &Self::Acts,
        caches: &mut [&mut Self::Kv],
        batch: &BatchLayout,
        heads: HeadLayout,
    ) -> Result<Self::Acts, BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_group_sums_and_gathers_in_rank_order_on_every_rank() {
        let g = HostGroup::new(3);
        let (sums, gathers): (Vec<_>, Vec<_>) = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    let g = &g;
                    s.spawn(move || {
                        // Twice, so that the slots are reused between calls.
                        let mut last = Vec::new();
                        for round in 0..2 {
                            let mut x = vec![0.1 * (rank + 1) as f32, 1e8, round as f32];
                            g.all_reduce_sum(rank, &mut x).unwrap();
                            last = x;
                        }
                        let parts = g.all_gather(rank, &vec![rank as f32; rank + 1]).unwrap();
                        (last, parts)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).unzip()
        });
        // Summed in rank order: 0.1 + 0.2 + 0.3 in f32, the same bits on every rank.
        let want = (0.1f32 + 0.2f32) + 0.3f32;
        for s in &sums {
            assert_eq!(s[0].to_bits(), want.to_bits());
            assert_eq!(s[1], 3e8);
            assert_eq!(s[2], 3.0);
        }
        for p in &gathers {
            assert_eq!(p, &vec![vec![0.0], vec![1.0, 1.0], vec![2.0, 2.0, 2.0]]);
        }
    }

    #[test]
    fn an_aborted_host_group_frees_the_ranks_waiting_for_a_lost_one() {
        // Ranks 0 and 1 of 3 enter an all-reduce that rank 2 never joins (it failed); aborting
        // the group returns them an error instead of leaving them waiting, and the group stays
        // failed for later calls.
        let g = HostGroup::new(3);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|rank| {
                    let g = &g;
                    s.spawn(move || g.all_reduce_sum(rank, &mut [1.0]))
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            g.abort();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!(g.all_gather(2, &[1.0]).is_err());
    }

    #[test]
    fn column_blocks_join_into_rows() {
        // Two rows; rank 0 holds columns 0..2, rank 1 column 2.
        let parts = vec![vec![1.0, 2.0, 4.0, 5.0], vec![3.0, 6.0]];
        assert_eq!(
            join_col_blocks(&parts, 2, &[2, 1]),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
    }
}
