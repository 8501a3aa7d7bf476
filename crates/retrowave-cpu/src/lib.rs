//! The CPU backend of retrowave.
//!
//! Runs every model operation on the host: quantized matrix multiplies that keep GGUF weights in
//! their stored blocks ([`quant`]), RMS norm / RoPE / SwiGLU ([`ops`]) and exact causal attention
//! over an f16 KV cache ([`attention`]). Work is spread over the rayon thread pool; set
//! `RAYON_NUM_THREADS` to choose its size. This backend is also the reference the GPU backend is
//! checked against, and it makes the whole system run (slowly) on any machine.

pub mod attention;
pub mod capture;
pub mod decode_kernel;
pub mod ops;
pub mod quant;
pub mod simd;
pub mod store;
pub mod wave;

use std::ops::Range;
use std::sync::Arc;

use retrowave_core::{
    Backend, BackendError, BatchLayout, Collective, FidelitySample, HeadLayout, HostGroup,
    RopeParams, WaveConfig, WaveStats, WeightView, join_col_blocks,
};

pub use attention::CpuKv;
pub use quant::CpuMatrix;

/// Row-major f32 activations.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuActs {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A tensor-parallel group and this backend's rank in it.
type Membership = (Arc<HostGroup>, usize);

/// The CPU backend: a thread pool; every buffer belongs to the matrices, caches and activations.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
    /// The tensor-parallel group this backend joined and its rank there: its collectives run in
    /// process over host memory (where the CPU's activations live).
    group: Arc<std::sync::Mutex<Option<Membership>>>,
    /// The first failure of a collective since the last [`Backend::check`].
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// Decode queries and KV captured for offline study ([`capture`]).
    capture: Option<Arc<capture::Capture>>,
    /// The node's tiered store, where wave indexes keep their sequences' exact KV (host arena,
    /// the coldest clusters spilled to disk); `None`: in host memory of each sequence's own.
    store: Option<retrowave_store::TieredStore>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// The group this backend is in and its rank there.
    fn group(&self) -> Option<Membership> {
        self.group.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the first failure of an operation that cannot return one, for [`Backend::check`].
    fn record(&self, e: impl std::fmt::Display) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }

    /// A backend with one thread per core (or `RETROWAVE_THREADS`).
    pub fn new() -> Self {
        let n = std::env::var("RETROWAVE_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        Self::with_threads(n)
    }

    /// A backend with `n` pool threads.
    pub fn with_threads(n: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .thread_name(|i| format!("retrowave-cpu-{i}"))
            .build()
            // Building a pool fails only when threads cannot be spawned at all; fall back to
            // running on the caller's thread.
            .or_else(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .use_current_thread()
                    .build()
            })
            .expect("a one-thread pool on the current thread always builds");
        CpuBackend {
            pool: Arc::new(pool),
            group: Arc::new(std::sync::Mutex::new(None)),
            failure: Arc::new(std::sync::Mutex::new(None)),
            capture: capture::Capture::from_env().map(Arc::new),
            store: None,
        }
    }

    /// This backend, keeping the exact KV of wave-indexed sequences in `store` (the node's
    /// tiered store, shared by every worker given a clone of it) instead of in host memory of
    /// each sequence's own (`None`).
    pub fn with_store(mut self, store: Option<retrowave_store::TieredStore>) -> Self {
        self.store = store;
        self
    }

    /// This backend, capturing the decode queries and KV cache of one sequence into `capture`
    /// (see [`capture`]; `RETROWAVE_CAPTURE_QK` sets it from the environment).
    pub fn with_capture(mut self, capture: capture::Capture) -> Self {
        self.capture = Some(Arc::new(capture));
        self
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Acts = CpuActs;
    type Kv = CpuKv;

    fn join_group(backends: &[Self]) -> Result<bool, BackendError> {
        if backends.len() < 2 {
            return Ok(false);
        }
        // A new group each time: joining again after an abort replaces the aborted one.
        let g = Arc::new(HostGroup::new(backends.len()));
        for (rank, b) in backends.iter().enumerate() {
            *b.group.lock().unwrap_or_else(|p| p.into_inner()) = Some((g.clone(), rank));
        }
        Ok(true)
    }

    fn all_reduce(&self, x: &mut CpuActs) {
        if let Some((g, rank)) = self.group()
            && let Err(e) = g.all_reduce_sum(rank, &mut x.data)
        {
            self.record(e);
        }
    }

    fn abort_group(backends: &[Self]) -> bool {
        for b in backends {
            if let Some((g, _)) = b.group() {
                g.abort();
            }
        }
        true
    }

    fn check(&self) -> Result<(), BackendError> {
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(f) => Err(BackendError::Device(f)),
            None => Ok(()),
        }
    }

    fn all_gather_cols(&self, part: &CpuActs, widths: &[usize]) -> Result<CpuActs, BackendError> {
        let (g, rank) = self.group().ok_or_else(|| {
            BackendError::Device("all_gather_cols on a CPU backend outside a group".into())
        })?;
        if widths.len() != g.world() || part.cols != widths[rank] {
            return Err(BackendError::Device(format!(
                "all_gather_cols: rank {rank} has {} columns, widths {widths:?}",
                part.cols
            )));
        }
        let parts = g.all_gather(rank, &part.data)?;
        Ok(CpuActs {
            data: join_col_blocks(&parts, part.rows, widths),
            rows: part.rows,
            cols: widths.iter().sum(),
        })
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn stack_matrices(&self, parts: &[&CpuMatrix]) -> Option<CpuMatrix> {
        CpuMatrix::stack(parts)
    }

    fn split_cols(&self, x: &CpuActs, widths: &[usize]) -> Vec<CpuActs> {
        let mut out: Vec<CpuActs> = widths
            .iter()
            .map(|&w| CpuActs {
                data: Vec::with_capacity(x.rows * w),
                rows: x.rows,
                cols: w,
            })
            .collect();
        for row in x.data.chunks(x.cols) {
            let mut c = 0;
            for (o, &w) in out.iter_mut().zip(widths) {
                o.data.extend_from_slice(&row[c..c + w]);
                c += w;
            }
        }
        out
    }

    fn load_matrix(
        &self,
        w: &WeightView<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<CpuMatrix, BackendError> {
        CpuMatrix::load(w, rows, cols)
    }

    fn load_vector(
        &self,
        w: &WeightView<'_>,
        range: Range<usize>,
    ) -> Result<Vec<f32>, BackendError> {
        retrowave_core::vector_f32(w, range, "cpu")
    }

    fn acts_from_host(&self, data: &[f32], rows: usize, cols: usize) -> CpuActs {
        CpuActs {
            data: data.to_vec(),
            rows,
            cols,
        }
    }

    fn acts_to_host(&self, a: &CpuActs) -> Vec<f32> {
        a.data.clone()
    }

    fn acts_shape(&self, a: &CpuActs) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn concat_rows(&self, parts: &[&CpuActs]) -> CpuActs {
        let cols = parts.first().map_or(0, |p| p.cols);
        debug_assert!(parts.iter().all(|p| p.cols == cols));
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        CpuActs {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data,
        }
    }

    fn select_rows(&self, a: &CpuActs, rows: &[usize]) -> CpuActs {
        let mut data = Vec::with_capacity(rows.len() * a.cols);
        for &r in rows {
            data.extend_from_slice(&a.data[r * a.cols..(r + 1) * a.cols]);
        }
        CpuActs {
            data,
            rows: rows.len(),
            cols: a.cols,
        }
    }

    fn embed(&self, table: &CpuMatrix, tokens: &[u32]) -> Result<CpuActs, BackendError> {
        let cols = table.cols;
        let mut data = vec![0f32; tokens.len() * cols];
        for (row, &t) in data.chunks_mut(cols).zip(tokens) {
            if t as usize >= table.rows {
                return Err(BackendError::TokenOutOfRange {
                    token: t,
                    vocab: table.rows,
                });
            }
            table.row_f32(t as usize, row)?;
        }
        Ok(CpuActs {
            data,
            rows: tokens.len(),
            cols,
        })
    }

    fn rms_norm(&self, x: &CpuActs, w: &Vec<f32>, eps: f32) -> CpuActs {
        CpuActs {
            data: ops::rms_norm(&x.data, x.cols, w, eps),
            rows: x.rows,
            cols: x.cols,
        }
    }

    fn linear(&self, x: &CpuActs, w: &CpuMatrix, bias: Option<&Vec<f32>>) -> CpuActs {
        let mut data = w.matmul(&x.data, x.rows);
        if let Some(b) = bias {
            for row in data.chunks_mut(w.rows) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        CpuActs {
            data,
            rows: x.rows,
            cols: w.rows,
        }
    }

    fn rope(
        &self,
        x: &mut CpuActs,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
        rope: &RopeParams,
    ) {
        ops::rope(&mut x.data, positions, n_heads, head_dim, rope)
    }

    fn silu_mul(&self, gate: &CpuActs, up: &CpuActs) -> CpuActs {
        CpuActs {
            data: ops::silu_mul(&gate.data, &up.data),
            rows: gate.rows,
            cols: gate.cols,
        }
    }

    fn add_bias(&self, x: &mut CpuActs, bias: &Vec<f32>) {
        for row in x.data.chunks_mut(x.cols) {
            row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
        }
    }

    fn add_assign(&self, x: &mut CpuActs, y: &CpuActs) {
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
    }

    fn new_kv(
        &self,
        n_layers: usize,
        heads: HeadLayout,
        max_tokens: usize,
    ) -> Result<CpuKv, BackendError> {
        Ok(CpuKv::new(n_layers, heads, max_tokens))
    }

    fn kv_len(&self, kv: &CpuKv) -> usize {
        kv.len()
    }

    fn kv_truncate(&self, kv: &mut CpuKv, len: usize) {
        kv.truncate(len)
    }

    fn attention(
        &self,
        layer: usize,
        q: &CpuActs,
        k: &CpuActs,
        v: &CpuActs,
        caches: &mut [&mut CpuKv],
        batch: &BatchLayout,
        heads: HeadLayout,
    ) -> Result<CpuActs, BackendError> {
        // Single-row steps of sequences with a wave index attend through it; everything else
        // (prefill chunks, sequences in full mode) attends exactly.
        let mut wave_seqs = Vec::new();
        let mut exact_seqs = Vec::new();
        for (i, (s, cache)) in batch.seqs.iter().zip(caches.iter_mut()).enumerate() {
            let w = k.cols;
            let rows = s.row * w..(s.row + s.n_tokens) * w;
            cache.write(layer, s.start_pos, &k.data[rows.clone()], &v.data[rows])?;
            if s.n_tokens == 1 && cache.wave_attends(layer) {
                wave::update(cache, layer)?;
                wave_seqs.push(i);
            } else {
                exact_seqs.push(i);
            }
        }
        if let Some(c) = &self.capture
            && self.group().is_none()
            && let [s] = batch.seqs[..]
            && s.n_tokens == 1
            && exact_seqs.len() == 1
        {
            let w = q.cols;
            c.step(
                layer,
                s.start_pos,
                &q.data[s.row * w..(s.row + 1) * w],
                caches[0],
                heads,
            );
        }
        let mut data = vec![0f32; q.data.len()];
        let pick = |ids: &[usize]| {
            (
                BatchLayout {
                    seqs: ids.iter().map(|&i| batch.seqs[i]).collect(),
                },
                ids.iter().map(|&i| &*caches[i]).collect::<Vec<&CpuKv>>(),
            )
        };
        if !exact_seqs.is_empty() {
            let (b, views) = pick(&exact_seqs);
            attention::attend_into(layer, &q.data, &views, &b, heads, &mut data);
        }
        if !wave_seqs.is_empty() {
            let (b, views) = pick(&wave_seqs);
            let per_seq = wave::decode(layer, &q.data, &views, &b, heads, &mut data)?;
            for (j, stats, probe, wanted) in per_seq {
                if let Some(w) = caches[wave_seqs[j]].wave.as_deref_mut() {
                    w.record(&stats, probe);
                    for (head, list) in &wanted {
                        w.buffer_step(*head, list);
                    }
                }
            }
        }
        Ok(CpuActs {
            data,
            rows: q.rows,
            cols: q.cols,
        })
    }

    fn kv_clone(&self, kv: &CpuKv) -> Result<CpuKv, BackendError> {
        kv.try_clone()
    }

    fn kv_build_index(&self, kv: &mut CpuKv, cfg: &WaveConfig) -> Result<(), BackendError> {
        let built = self
            .pool
            .install(|| wave::build(kv, cfg, self.store.as_ref()))?;
        kv.wave = Some(Box::new(built));
        Ok(())
    }

    fn kv_wave_stats(&self, kv: &CpuKv) -> Option<WaveStats> {
        kv.wave.as_deref().map(wave::WaveKv::stats)
    }

    fn kv_set_probe(&self, kv: &mut CpuKv, on: bool) {
        if let Some(w) = kv.wave.as_deref_mut() {
            w.set_probe(on);
        }
    }

    fn kv_take_probe(&self, kv: &mut CpuKv) -> Vec<FidelitySample> {
        kv.wave
            .as_deref_mut()
            .map(wave::WaveKv::take_probe)
            .unwrap_or_default()
    }
}
