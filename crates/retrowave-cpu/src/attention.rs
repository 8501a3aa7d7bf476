//! Exact causal attention over an f16 KV cache.
//!
//! The cache of one sequence keeps, per layer and KV head, the keys and the values of every
//! position contiguously (`[kv_head][position][head_dim]`), so one head's history streams from
//! memory in order. Work is split into units of (sequence, KV head, block of query rows, range of
//! key positions); each unit computes an online-softmax partial result (running max, sum and
//! weighted value sum for every query head of the GQA group) and the partials of a row are merged
//! by their log-sum-exp, as flash-decoding does. Decode steps split long histories into several
//! key ranges so that both cores work even when a model has few KV heads.

use half::f16;
use rayon::prelude::*;
use retrowave_core::{BackendError, BatchLayout, HeadLayout};

use crate::{decode_kernel, simd};

/// Keys converted from f16 per tile.
const KEY_TILE: usize = 32;
/// Query rows per work unit during prefill.
const ROW_BLOCK: usize = 16;
/// Sequences with at most this many query rows in a step attend as decode: their key range is
/// split over several work units and scored by the streaming [`decode_kernel`].
const DECODE_ROWS: usize = 4;
/// Decode work units aimed at per pool thread: enough for work stealing to even out the ends,
/// few enough that the per-unit partials cost nothing to merge.
const DECODE_UNITS_PER_THREAD: usize = 8;
/// Smallest key range of a decode work unit (and the granularity of the ranges).
const DECODE_MIN_KEYS: usize = 256;
/// Keys per tile when the streaming kernel serves several query rows of one unit (the tile is
/// re-read from cache by each row).
const ROW_KEY_TILE: usize = 256;

/// One layer's keys and values of one sequence.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// The KV cache of one sequence: every layer, this worker's KV heads.
#[derive(Debug)]
pub struct CpuKv {
    layers: Vec<LayerKv>,
    heads: HeadLayout,
    /// Allocated positions per head.
    cap: usize,
    /// Positions written in each layer.
    lens: Vec<usize>,
    max_tokens: usize,
    /// The wave index and cluster-ordered KV, once built.
    pub(crate) wave: Option<Box<crate::wave::WaveKv>>,
}

impl CpuKv {
    /// A copy of the cache and its wave state (a fork of the sequence).
    pub fn try_clone(&self) -> Result<Self, retrowave_core::BackendError> {
        Ok(CpuKv {
            layers: self.layers.clone(),
            heads: self.heads,
            cap: self.cap,
            lens: self.lens.clone(),
            max_tokens: self.max_tokens,
            wave: match self.wave.as_deref() {
                Some(w) => Some(Box::new(w.try_clone()?)),
                None => None,
            },
        })
    }

    /// An empty cache.
    pub fn new(n_layers: usize, heads: HeadLayout, max_tokens: usize) -> Self {
        CpuKv {
            layers: vec![LayerKv::default(); n_layers],
            heads,
            cap: 0,
            lens: vec![0; n_layers],
            max_tokens,
            wave: None,
        }
    }

    /// Positions stored (in the last layer written).
    pub fn len(&self) -> usize {
        self.lens.iter().copied().min().unwrap_or(0)
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn n_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * 2)
            .sum()
    }

    /// Forgets positions from `len` on. A wave index that covers forgotten positions is dropped
    /// (attention falls back to the exact cache, which always holds every position).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.lens {
            *l = (*l).min(len);
        }
        if self.wave.as_ref().is_some_and(|w| w.indexed_end() > len) {
            self.wave = None;
        }
    }

    /// Positions written in `layer`.
    pub(crate) fn layer_len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    /// The head geometry.
    pub(crate) fn heads(&self) -> HeadLayout {
        self.heads
    }

    /// Layers.
    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether decode steps attend through a wave index.
    pub fn has_wave(&self) -> bool {
        self.wave.is_some()
    }

    /// Whether decode steps of `layer` attend through the wave index (not one of the configured
    /// dense layers).
    pub fn wave_attends(&self, layer: usize) -> bool {
        self.wave
            .as_deref()
            .is_some_and(|w| layer >= w.config().dense_layers)
    }

    fn reserve(&mut self, needed: usize) -> Result<(), BackendError> {
        if needed <= self.cap {
            return Ok(());
        }
        if needed > self.max_tokens {
            return Err(BackendError::OutOfMemory(format!(
                "KV cache holds at most {} tokens, {needed} needed",
                self.max_tokens
            )));
        }
        let new_cap = needed.max(self.cap * 2).max(256).min(self.max_tokens);
        let (nh, hd) = (self.heads.n_kv_heads, self.heads.head_dim);
        for (layer, &len) in self.layers.iter_mut().zip(&self.lens) {
            for buf in [&mut layer.k, &mut layer.v] {
                let mut grown = vec![f16::ZERO; nh * new_cap * hd];
                if self.cap > 0 {
                    for h in 0..nh {
                        let src = &buf[h * self.cap * hd..(h * self.cap + len) * hd];
                        grown[h * new_cap * hd..(h * new_cap + len) * hd].copy_from_slice(src);
                    }
                }
                *buf = grown;
            }
        }
        self.cap = new_cap;
        Ok(())
    }

    /// Stores rows of K and V (`[n, n_kv_heads * head_dim]`) at positions `start..start + n`.
    pub fn write(
        &mut self,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), BackendError> {
        let (nh, hd) = (self.heads.n_kv_heads, self.heads.head_dim);
        let n = k.len() / (nh * hd);
        if start > self.lens[layer] {
            return Err(BackendError::Device(format!(
                "KV write at position {start} leaves a gap after {} cached positions",
                self.lens[layer]
            )));
        }
        self.reserve(start + n)?;
        let cap = self.cap;
        let l = &mut self.layers[layer];
        for i in 0..n {
            for h in 0..nh {
                let src = (i * nh + h) * hd;
                let dst = (h * cap + start + i) * hd;
                simd::f32_to_f16(&k[src..src + hd], &mut l.k[dst..dst + hd]);
                simd::f32_to_f16(&v[src..src + hd], &mut l.v[dst..dst + hd]);
            }
        }
        self.lens[layer] = self.lens[layer].max(start + n);
        Ok(())
    }

    pub(crate) fn head_keys(&self, layer: usize, h: usize) -> (&[f16], &[f16]) {
        let hd = self.heads.head_dim;
        let len = self.lens[layer];
        let base = h * self.cap * hd;
        let l = &self.layers[layer];
        (&l.k[base..base + len * hd], &l.v[base..base + len * hd])
    }
}

/// Online-softmax state of one work unit.
struct Partial {
    out_row: usize,
    n_rows: usize,
    head0: usize,
    /// `[n_rows][group]` running max / sum, `[n_rows][group][head_dim]` weighted values.
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

struct Unit {
    seq: usize,
    kv_head: usize,
    row0: usize,
    n_rows: usize,
    key0: usize,
    key1: usize,
}

/// Key positions per decode work unit: the decode keys of the whole batch (every KV head)
/// spread over [`DECODE_UNITS_PER_THREAD`] units per pool thread, so that both cores stay busy
/// whatever the number of KV heads, rounded up to [`DECODE_MIN_KEYS`].
fn decode_key_split(batch: &BatchLayout, n_kv_heads: usize) -> usize {
    let keys: usize = batch
        .seqs
        .iter()
        .filter(|s| s.n_tokens <= DECODE_ROWS)
        .map(|s| s.start_pos + s.n_tokens)
        .sum::<usize>()
        * n_kv_heads;
    let units = rayon::current_num_threads().max(1) * DECODE_UNITS_PER_THREAD;
    keys.div_ceil(units)
        .div_ceil(DECODE_MIN_KEYS)
        .max(1)
        .saturating_mul(DECODE_MIN_KEYS)
}

/// Attends every query row of `q` (`[rows, n_heads * head_dim]`) to its sequence's cache.
pub fn attend(
    layer: usize,
    q: &[f32],
    caches: &[&CpuKv],
    batch: &BatchLayout,
    heads: HeadLayout,
) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    attend_into(layer, q, caches, batch, heads, &mut out);
    out
}

/// [`attend`] writing the rows of the sequences in `batch` into `out` (`[rows, n_heads *
/// head_dim]`, the shape of `q`); other rows are left as they are.
pub fn attend_into(
    layer: usize,
    q: &[f32],
    caches: &[&CpuKv],
    batch: &BatchLayout,
    heads: HeadLayout,
    out: &mut [f32],
) {
    let (nq, nkv, hd) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let group = heads.group();
    let rows = q.len() / (nq * hd).max(1);
    let split = decode_key_split(batch, nkv);
    let mut units = Vec::new();
    for (si, s) in batch.seqs.iter().enumerate() {
        let ctx = s.start_pos + s.n_tokens;
        let split = if s.n_tokens <= DECODE_ROWS {
            split
        } else {
            usize::MAX
        };
        for h in 0..nkv {
            let mut r = 0;
            while r < s.n_tokens {
                let nr = ROW_BLOCK.min(s.n_tokens - r);
                let last_pos = s.start_pos + r + nr;
                let mut k0 = 0;
                while k0 < last_pos.min(ctx) {
                    let k1 = (k0.saturating_add(split)).min(last_pos);
                    units.push(Unit {
                        seq: si,
                        kv_head: h,
                        row0: s.row + r,
                        n_rows: nr,
                        key0: k0,
                        key1: k1,
                    });
                    k0 = k1;
                }
                r += nr;
            }
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let partials: Vec<Partial> = units
        .par_iter()
        .map(|u| {
            let s = &batch.seqs[u.seq];
            let (keys, vals) = caches[u.seq].head_keys(layer, u.kv_head);
            let mut p = Partial {
                out_row: u.row0,
                n_rows: u.n_rows,
                head0: u.kv_head * group,
                m: vec![f32::NEG_INFINITY; u.n_rows * group],
                l: vec![0.0; u.n_rows * group],
                acc: vec![0.0; u.n_rows * group * hd],
            };
            let pos0 = s.start_pos + (u.row0 - s.row);
            if s.n_tokens <= DECODE_ROWS || u.n_rows * group < 8 {
                // Decode (and small blocks): the streaming kernel, row by row over tiles that
                // stay in cache for the block's other rows.
                let tile = if u.n_rows == 1 {
                    usize::MAX
                } else {
                    ROW_KEY_TILE
                };
                let mut t0 = u.key0;
                while t0 < u.key1 {
                    let t1 = t0.saturating_add(tile).min(u.key1);
                    for r in 0..u.n_rows {
                        let lim = (pos0 + r + 1).min(t1);
                        if lim <= t0 {
                            continue;
                        }
                        let qo = (u.row0 + r) * nq * hd + p.head0 * hd;
                        let st = r * group;
                        decode_kernel::attend_group(
                            &q[qo..qo + group * hd],
                            &keys[t0 * hd..lim * hd],
                            &vals[t0 * hd..lim * hd],
                            scale,
                            &mut p.m[st..st + group],
                            &mut p.l[st..st + group],
                            &mut p.acc[st * hd..(st + group) * hd],
                        );
                    }
                    t0 = t1;
                }
                return p;
            }
            // Prefill: K tile transposed to [head_dim][KEY_TILE] so that one query row scores
            // the whole tile with vertical FMAs; V tile row-major [KEY_TILE][head_dim].
            let mut khalf = vec![0f32; KEY_TILE * hd];
            let mut kt = vec![0f32; KEY_TILE * hd];
            let mut vbuf = vec![0f32; KEY_TILE * hd];
            let mut t0 = u.key0;
            while t0 < u.key1 {
                let t1 = (t0 + KEY_TILE).min(u.key1);
                let nt = t1 - t0;
                simd::f16_to_f32(&keys[t0 * hd..t1 * hd], &mut khalf[..nt * hd]);
                simd::f16_to_f32(&vals[t0 * hd..t1 * hd], &mut vbuf[..nt * hd]);
                kt.iter_mut().for_each(|v| *v = 0.0);
                for (j, krow) in khalf[..nt * hd].chunks_exact(hd).enumerate() {
                    for (d, &kv) in krow.iter().enumerate() {
                        kt[d * KEY_TILE + j] = kv;
                    }
                }
                for r in 0..u.n_rows {
                    let pos = pos0 + r;
                    let lim = (pos + 1).min(t1);
                    if lim <= t0 {
                        continue;
                    }
                    let nk = lim - t0;
                    let qrow = &q[(u.row0 + r) * nq * hd..(u.row0 + r + 1) * nq * hd];
                    for g in 0..group {
                        let qh = &qrow[(p.head0 + g) * hd..(p.head0 + g + 1) * hd];
                        let mut scores = [0f32; KEY_TILE];
                        qk_transposed(qh, &kt, &mut scores);
                        let mut tmax = f32::NEG_INFINITY;
                        for sc in scores[..nk].iter_mut() {
                            *sc *= scale;
                            tmax = tmax.max(*sc);
                        }
                        let idx = r * group + g;
                        let m_old = p.m[idx];
                        let m_new = m_old.max(tmax);
                        for sc in scores[..nk].iter_mut() {
                            *sc -= m_new;
                        }
                        simd::exp_inplace_scalar(&mut scores[..nk]);
                        let corr = simd::exp_approx(m_old - m_new);
                        let acc = &mut p.acc[idx * hd..(idx + 1) * hd];
                        if corr != 1.0 {
                            acc.iter_mut().for_each(|a| *a *= corr);
                        }
                        let mut lsum = 0f32;
                        for j in 0..nk {
                            lsum += scores[j];
                            simd::axpy(acc, scores[j], &vbuf[j * hd..(j + 1) * hd]);
                        }
                        p.l[idx] = p.l[idx] * corr + lsum;
                        p.m[idx] = m_new;
                    }
                }
                t0 = t1;
            }
            p
        })
        .collect();

    // Merge the partials of each (row, head) by their log-sum-exp.
    let mut m_all = vec![f32::NEG_INFINITY; rows * nq];
    for p in &partials {
        for r in 0..p.n_rows {
            for g in 0..group {
                let i = (p.out_row + r) * nq + p.head0 + g;
                m_all[i] = m_all[i].max(p.m[r * group + g]);
            }
        }
    }
    let mut l_all = vec![0f32; rows * nq];
    for s in &batch.seqs {
        out[s.row * nq * hd..(s.row + s.n_tokens) * nq * hd].fill(0.0);
    }
    for p in &partials {
        for r in 0..p.n_rows {
            for g in 0..group {
                let idx = r * group + g;
                if p.l[idx] == 0.0 {
                    continue;
                }
                let i = (p.out_row + r) * nq + p.head0 + g;
                let w = (p.m[idx] - m_all[i]).exp();
                l_all[i] += w * p.l[idx];
                simd::axpy(
                    &mut out[i * hd..(i + 1) * hd],
                    w,
                    &p.acc[idx * hd..(idx + 1) * hd],
                );
            }
        }
    }
    for (i, l) in l_all.iter().enumerate() {
        if *l > 0.0 {
            let inv = 1.0 / l;
            out[i * hd..(i + 1) * hd].iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// `scores[j] = sum_d qh[d] * kt[d * KEY_TILE + j]`: one query row against a transposed key
/// tile, with vertical FMAs (explicit AVX2 where present: the compiler stopped vectorising the
/// plain loop here, which made prefill attention three times slower).
fn qk_transposed(qh: &[f32], kt: &[f32], scores: &mut [f32; KEY_TILE]) {
    assert!(kt.len() >= qh.len() * KEY_TILE);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::decode_kernel::has_avx2_f16c() {
            // SAFETY: AVX2 and FMA were detected; the assert bounds every load.
            unsafe { qk_transposed_avx2(qh, kt, scores) };
            return;
        }
    }
    for (d, &qd) in qh.iter().enumerate() {
        for (sc, &k) in scores.iter_mut().zip(&kt[d * KEY_TILE..(d + 1) * KEY_TILE]) {
            *sc = qd.mul_add(k, *sc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_transposed_avx2(qh: &[f32], kt: &[f32], scores: &mut [f32; KEY_TILE]) {
    use std::arch::x86_64::*;
    const _: () = assert!(KEY_TILE == 32);
    // SAFETY: the caller checked kt.len() >= qh.len() * KEY_TILE; scores has 32 elements.
    unsafe {
        let mut a = [_mm256_setzero_ps(); 4];
        let base = kt.as_ptr();
        for (d, &qd) in qh.iter().enumerate() {
            let q = _mm256_set1_ps(qd);
            let row = base.add(d * KEY_TILE);
            for (i, acc) in a.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(q, _mm256_loadu_ps(row.add(i * 8)), *acc);
            }
        }
        for (i, acc) in a.iter().enumerate() {
            _mm256_storeu_ps(scores.as_mut_ptr().add(i * 8), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retrowave_core::SeqRows;

    /// Naive attention in f64 over f16-rounded K/V.
    fn reference(q: &[f32], k: &[f32], v: &[f32], pos: usize, heads: HeadLayout) -> Vec<f32> {
        let (nq, nkv, hd) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
        let r16 = |x: f32| f16::from_f32(x).to_f32() as f64;
        let mut out = vec![0f32; nq * hd];
        for h in 0..nq {
            let kh = h / heads.group();
            let s: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..hd)
                        .map(|d| q[h * hd + d] as f64 * r16(k[(j * nkv + kh) * hd + d]))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for d in 0..hd {
                out[h * hd + d] = ((0..=pos)
                    .map(|j| (s[j] - m).exp() * r16(v[(j * nkv + kh) * hd + d]))
                    .sum::<f64>()
                    / z) as f32;
            }
        }
        out
    }

    #[test]
    fn prefill_then_decode_match_naive_attention() {
        let heads = HeadLayout {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let n = 2100; // spans several key splits and tiles
        let kvw = heads.n_kv_heads * heads.head_dim;
        let qw = heads.n_heads * heads.head_dim;
        let f = |i: usize, s: f32| (i as f32 * s).sin() * 2.0;
        let k: Vec<f32> = (0..n * kvw).map(|i| f(i, 0.37)).collect();
        let v: Vec<f32> = (0..n * kvw).map(|i| f(i, 0.11)).collect();
        let q: Vec<f32> = (0..n * qw).map(|i| f(i, 0.23)).collect();
        let mut kv = CpuKv::new(1, heads, 4096);
        // prefill n-1 tokens in one go, then one decode token
        let p = n - 1;
        kv.write(0, 0, &k[..p * kvw], &v[..p * kvw]).unwrap();
        let batch = BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: 0,
                n_tokens: p,
            }],
        };
        let out = attend(0, &q[..p * qw], &[&kv], &batch, heads);
        for &row in &[0usize, 1, 17, 1500, p - 1] {
            let r = reference(&q[row * qw..(row + 1) * qw], &k, &v, row, heads);
            for (a, b) in out[row * qw..(row + 1) * qw].iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "row {row}: {a} vs {b}");
            }
        }
        kv.write(0, p, &k[p * kvw..], &v[p * kvw..]).unwrap();
        let batch = BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: p,
                n_tokens: 1,
            }],
        };
        let out = attend(0, &q[p * qw..], &[&kv], &batch, heads);
        let r = reference(&q[p * qw..], &k, &v, p, heads);
        for (a, b) in out.iter().zip(&r) {
            assert!((a - b).abs() < 1e-4, "decode: {a} vs {b}");
        }
        assert_eq!(kv.len(), n);
    }

    #[test]
    fn cache_refuses_gaps_and_overflow() {
        let heads = HeadLayout {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut kv = CpuKv::new(1, heads, 8);
        assert!(kv.write(0, 1, &[0.0; 4], &[0.0; 4]).is_err());
        assert!(kv.write(0, 0, &[0.0; 36], &[0.0; 36]).is_err());
        kv.write(0, 0, &[1.0; 8], &[1.0; 8]).unwrap();
        assert_eq!(kv.len(), 2);
        kv.truncate(1);
        assert_eq!(kv.len(), 1);
    }
}
