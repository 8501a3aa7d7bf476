//! Wave attention on the CPU: the index build after prefill, index updates during decode, and the
//! decode kernel that executes a zone plan.
//!
//! The decisions come from `retrowave-index` (clustering, budgets, zone plans); this module
//! executes them fast. Per (sequence, KV head) of a decode step: score every cluster for the
//! GQA group from int8 centroids (softmax per query head, summed over the group), plan the zones,
//! run one online softmax over the steady zone (read from the exact cache) and the retrieval
//! clusters (read from the cluster store), and fold the estimation clusters into the same state
//! with the estimation formula (`exp(q.c_i) * VS_i` over `|C_i| exp(q.c_i)`), which is exactly the
//! log-sum-exp merge of the two parts. Units run in parallel across sequences and KV heads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use half::f16;
use rayon::prelude::*;
use retrowave_core::{
    BackendError, BatchLayout, ClusterStore, FidelitySample, HeadKey, HeadLayout, WaveConfig,
    WaveStats,
};
use retrowave_index::{ClusterIndex, HeadDims, KvView, ZonePlan, plan_step, plan_step_union};
use retrowave_store::policy::{CacheConfig, Tier, Wanted, WaveBufferPolicy};

use crate::attention::CpuKv;
use crate::decode_kernel::GroupState;
use crate::simd;
use crate::store::{HostClusterStore, TieredClusterStore};
use retrowave_store::TieredStore;

/// The index of one (layer, KV head) with its int8 centroids for scoring.
#[derive(Debug, Clone)]
struct WaveHead {
    index: ClusterIndex,
    /// `[clusters, head_dim]`: the index's centroids as int8 codes, one scale per centroid, for
    /// scoring (a quarter of the bytes of f32 centroids; ranking and the estimation logits need
    /// no more precision than that).
    codes: Vec<i8>,
    code_scales: Vec<f32>,
    /// The same codes for the AVX-512 VNNI kernel (empty on CPUs without it): blocks of
    /// [`VNNI_BLOCK`] clusters, each `[head_dim / 4][VNNI_BLOCK][4]` bytes biased by 128 (`vpdpbusd`
    /// multiplies unsigned by signed bytes), so that one 64-byte load holds four dimensions of
    /// sixteen clusters and the dot products land in the lanes without horizontal sums.
    vnni_codes: Vec<u8>,
    /// `ln |C_i|` (`-inf` for empty clusters), for ranking by estimated mass.
    ln_sizes: Vec<f32>,
    /// `[clusters, head_dim]`: mean values `value_sum / |C_i|` for the estimation zone as int8
    /// codes, one scale per cluster (two cache lines a mean at head_dim 128: the estimation zone
    /// reads its means scattered over the index, where a step waits on every line).
    mean_codes: Vec<i8>,
    mean_scales: Vec<f32>,
}

impl WaveHead {
    fn new(index: ClusterIndex) -> Self {
        let mut head = WaveHead {
            index,
            codes: Vec::new(),
            code_scales: Vec::new(),
            vnni_codes: Vec::new(),
            ln_sizes: Vec::new(),
            mean_codes: Vec::new(),
            mean_scales: Vec::new(),
        };
        head.refresh();
        head
    }

    /// Recomputes the derived arrays after the index changed.
    fn refresh(&mut self) {
        let hd = self.index.dims().key_dim;
        let centroids = self.index.centroids();
        self.codes = vec![0; centroids.len()];
        self.code_scales = vec![0.0; centroids.len() / hd.max(1)];
        for ((row, codes), scale) in centroids
            .chunks_exact(hd)
            .zip(self.codes.chunks_exact_mut(hd))
            .zip(self.code_scales.iter_mut())
        {
            let amax = row.iter().fold(0f32, |m, &x| m.max(x.abs()));
            if amax > 0.0 && amax.is_finite() {
                *scale = amax / 127.0;
                let inv = 127.0 / amax;
                for (c, &x) in codes.iter_mut().zip(row) {
                    *c = (x * inv).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        let n = self.code_scales.len();
        self.vnni_codes = if has_avx512_vnni() && hd.is_multiple_of(4) {
            vnni_layout(&self.codes, n, hd)
        } else {
            Vec::new()
        };
        self.ln_sizes = self
            .index
            .sizes()
            .iter()
            .map(|&s| (s as f32).ln())
            .collect();
        let dv = self.index.dims().value_dim;
        self.mean_codes = vec![0; self.index.value_sums().len()];
        self.mean_scales = vec![0.0; self.index.sizes().len()];
        for (((sum, codes), scale), &size) in self
            .index
            .value_sums()
            .chunks_exact(dv)
            .zip(self.mean_codes.chunks_exact_mut(dv))
            .zip(self.mean_scales.iter_mut())
            .zip(self.index.sizes())
        {
            let amax = sum.iter().fold(0f32, |m, &x| m.max(x.abs()));
            if size > 0 && amax > 0.0 && amax.is_finite() {
                // mean = sum / size = code * scale with |code| <= 127.
                *scale = amax / size as f32 / 127.0;
                let inv = 127.0 / amax;
                for (c, &x) in codes.iter_mut().zip(sum) {
                    *c = (x * inv).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
    }
}

/// Clusters per block of [`WaveHead::vnni_codes`].
const VNNI_BLOCK: usize = 16;

/// Whether the CPU has AVX-512 with VNNI (checked once).
fn has_avx512_vnni() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Row-major int8 codes of `n` clusters as [`WaveHead::vnni_codes`] (padding clusters are zero
/// codes).
fn vnni_layout(codes: &[i8], n: usize, hd: usize) -> Vec<u8> {
    let quads = hd / 4;
    let mut out = vec![128u8; n.div_ceil(VNNI_BLOCK) * quads * VNNI_BLOCK * 4];
    for (c, row) in codes.chunks_exact(hd).take(n).enumerate() {
        let (b, j) = (c / VNNI_BLOCK, c % VNNI_BLOCK);
        for (q, quad) in row.chunks_exact(4).enumerate() {
            let at = ((b * quads + q) * VNNI_BLOCK + j) * 4;
            for (o, &x) in out[at..at + 4].iter_mut().zip(quad) {
                *o = (i16::from(x) + 128) as u8;
            }
        }
    }
    out
}

/// `out[g * n + c] = (q_g . code_c) * code_scale_c * scale` for every non-empty cluster `c`
/// (`-inf` for empty ones); `qs` is `[group, hd]`.
#[inline(never)]
fn centroid_logits(
    head: &WaveHead,
    qs: &[f32],
    group: usize,
    hd: usize,
    scale: f32,
    out: &mut Vec<f32>,
) {
    let n = head.index.n_clusters();
    let sizes = head.index.sizes();
    out.clear();
    out.resize(group * n, f32::NEG_INFINITY);
    #[cfg(target_arch = "x86_64")]
    {
        // Queries quantized to int8 as well: integer dot products, with `vpdpbusd` over sixteen
        // clusters at a time where AVX-512 VNNI is (the blocked codes exist only then), else
        // 32 products per AVX2 instruction pair.
        let vnni = !head.vnni_codes.is_empty();
        if vnni || (hd.is_multiple_of(32) && crate::decode_kernel::has_avx2_f16c()) {
            let (qi, qscale) = quantize_queries(qs, group, hd);
            macro_rules! dispatch {
                ($($g:literal)*) => {
                    match group {
                        // SAFETY: the kernel's features were detected (above); each kernel
                        // checks every slice length.
                        $($g => unsafe {
                            if vnni {
                                centroid_logits_vnni::<$g>(head, &qi, &qscale, hd, scale, out)
                            } else {
                                centroid_logits_i8::<$g>(head, &qi, &qscale, hd, scale, out)
                            }
                            return;
                        })*
                        _ => {}
                    }
                };
            }
            dispatch!(1 2 3 4 5 6 7 8);
        }
        if hd.is_multiple_of(8) && crate::decode_kernel::has_avx2_f16c() {
            // SAFETY: AVX2 and FMA were detected; slices are checked by the loops' bounds.
            unsafe { centroid_logits_avx2(head, qs, group, hd, scale, out) };
            return;
        }
    }
    let mut row = vec![0f32; hd];
    for (c, codes) in head.codes.chunks_exact(hd).enumerate() {
        if sizes[c] == 0 {
            continue;
        }
        for (r, &x) in row.iter_mut().zip(codes) {
            *r = f32::from(x);
        }
        let k = head.code_scales[c] * scale;
        for g in 0..group {
            out[g * n + c] = simd::dot_f32(&qs[g * hd..(g + 1) * hd], &row) * k;
        }
    }
}

/// Each query head's row as int8 with one scale (`max |q| / 127`); `[group, hd]` codes.
fn quantize_queries(qs: &[f32], group: usize, hd: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = vec![0i8; group * hd];
    let mut scales = vec![0f32; group];
    for g in 0..group {
        let q = &qs[g * hd..(g + 1) * hd];
        let amax = q.iter().fold(0f32, |m, &x| m.max(x.abs()));
        if amax > 0.0 && amax.is_finite() {
            scales[g] = amax / 127.0;
            let inv = 127.0 / amax;
            for (c, &x) in codes[g * hd..(g + 1) * hd].iter_mut().zip(q) {
                // Round half away from zero without a libm call.
                let y = x * inv;
                *c = (y + 0.5f32.copysign(y)).clamp(-127.0, 127.0) as i8;
            }
        }
    }
    (codes, scales)
}

/// [`centroid_logits`] with int8 queries: `|code|` (unsigned) times `q * sign(code)` (signed) in
/// `vpmaddubsw`, pairs summed to i32 by `vpmaddwd`; 32 products per two instructions. Sums stay
/// exact (|products| <= 127 * 127, two per i16 lane).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn centroid_logits_i8<const G: usize>(
    head: &WaveHead,
    qi: &[i8],
    qscale: &[f32],
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = head.index.n_clusters();
    let sizes = head.index.sizes();
    assert!(
        hd.is_multiple_of(32)
            && head.codes.len() >= n * hd
            && head.code_scales.len() >= n
            && qi.len() >= G * hd
            && qscale.len() >= G
            && out.len() >= G * n
    );
    let ones = _mm256_set1_epi16(1);
    for c in 0..n {
        if sizes[c] == 0 {
            continue;
        }
        let mut acc = [_mm256_setzero_si256(); G];
        // SAFETY: c * hd + k + 32 <= n * hd <= codes.len(); g * hd + k + 32 <= G * hd.
        unsafe {
            let codes = head.codes.as_ptr().add(c * hd);
            for k in (0..hd).step_by(32) {
                let v = _mm256_loadu_si256(codes.add(k).cast());
                let av = _mm256_sign_epi8(v, v);
                for (g, a) in acc.iter_mut().enumerate() {
                    let q = _mm256_loadu_si256(qi.as_ptr().add(g * hd + k).cast());
                    let sq = _mm256_sign_epi8(q, v);
                    let p16 = _mm256_maddubs_epi16(av, sq);
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p16, ones));
                }
            }
        }
        let kscale = head.code_scales[c] * scale;
        for (g, a) in acc.iter().enumerate() {
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(*a), _mm256_extracti128_si256(*a, 1));
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
            out[g * n + c] = _mm_cvtsi128_si32(s1) as f32 * qscale[g] * kscale;
        }
    }
}

/// [`centroid_logits`] over [`WaveHead::vnni_codes`]: per block of sixteen clusters and per
/// four dimensions one 64-byte load and one `vpdpbusd` per query head, the sixteen sums in the
/// lanes; the bias of the codes is taken off once (`128 * sum(q)`). The integer sums, and so the
/// logits, are exactly those of [`centroid_logits_i8`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn centroid_logits_vnni<const G: usize>(
    head: &WaveHead,
    qi: &[i8],
    qscale: &[f32],
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = head.index.n_clusters();
    let sizes = head.index.sizes();
    let quads = hd / 4;
    let blocks = n.div_ceil(VNNI_BLOCK);
    assert!(
        hd.is_multiple_of(4)
            && head.vnni_codes.len() >= blocks * quads * VNNI_BLOCK * 4
            && head.code_scales.len() >= n
            && sizes.len() >= n
            && qi.len() >= G * hd
            && qscale.len() >= G
            && out.len() >= G * n
    );
    // Each head's query as little-endian groups of four bytes, and the bias correction.
    let qq: Vec<i32> = qi[..G * hd]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]))
        .collect();
    let bias: [i32; G] = std::array::from_fn(|g| {
        128 * qi[g * hd..(g + 1) * hd]
            .iter()
            .map(|&x| i32::from(x))
            .sum::<i32>()
    });
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    for b in 0..blocks {
        let c0 = b * VNNI_BLOCK;
        let cn = (n - c0).min(VNNI_BLOCK);
        let mut acc = [_mm512_setzero_si512(); G];
        // SAFETY: block b spans quads * 64 bytes inside vnni_codes (checked above); qq has
        // G * quads entries.
        unsafe {
            let base = head.vnni_codes.as_ptr().add(b * quads * VNNI_BLOCK * 4);
            for q in 0..quads {
                let v = _mm512_loadu_si512(base.add(q * VNNI_BLOCK * 4).cast());
                for (g, a) in acc.iter_mut().enumerate() {
                    let qv = _mm512_set1_epi32(*qq.get_unchecked(g * quads + q));
                    *a = _mm512_dpbusd_epi32(*a, v, qv);
                }
            }
        }
        let mut ks = [0f32; VNNI_BLOCK];
        let mut live: u16 = 0;
        for j in 0..cn {
            ks[j] = head.code_scales[c0 + j] * scale;
            if sizes[c0 + j] > 0 {
                live |= 1 << j;
            }
        }
        let all: u16 = if cn == VNNI_BLOCK {
            u16::MAX
        } else {
            (1u16 << cn) - 1
        };
        // SAFETY: ks has 16 lanes; the store covers out[g * n + c0 .. + cn] (masked to cn).
        unsafe {
            let ksv = _mm512_loadu_ps(ks.as_ptr());
            for (g, a) in acc.iter().enumerate() {
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(*a, _mm512_set1_epi32(bias[g])));
                let x = _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(qscale[g])), ksv);
                let x = _mm512_mask_blend_ps(live, neg_inf, x);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(g * n + c0), all, x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn centroid_logits_avx2(
    head: &WaveHead,
    qs: &[f32],
    group: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = head.index.n_clusters();
    let sizes = head.index.sizes();
    assert!(head.codes.len() >= n * hd && qs.len() >= group * hd && out.len() >= group * n);
    // SAFETY: every pointer offset stays inside the slices checked above.
    unsafe {
        for g0 in (0..group).step_by(8) {
            let gn = (group - g0).min(8);
            for c in 0..n {
                if sizes[c] == 0 {
                    continue;
                }
                let mut acc = [_mm256_setzero_ps(); 8];
                let codes = head.codes.as_ptr().add(c * hd);
                for k in (0..hd).step_by(8) {
                    let raw = _mm_loadl_epi64(codes.add(k) as *const __m128i);
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                    for (g, a) in acc.iter_mut().enumerate().take(gn) {
                        let q = _mm256_loadu_ps(qs.as_ptr().add((g0 + g) * hd + k));
                        *a = _mm256_fmadd_ps(q, v, *a);
                    }
                }
                let kscale = head.code_scales[c] * scale;
                for (g, a) in acc.iter().enumerate().take(gn) {
                    let hi = _mm256_extractf128_ps(*a, 1);
                    let s4 = _mm_add_ps(_mm256_castps256_ps128(*a), hi);
                    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                    out[(g0 + g) * n + c] = _mm_cvtss_f32(s1) * kscale;
                }
            }
        }
    }
}

/// The wave state of one sequence: the index of every (layer, KV head), the cluster-ordered exact
/// KV of the indexed tokens, counters and the optional fidelity probe.
#[derive(Debug)]
pub struct WaveKv {
    cfg: WaveConfig,
    /// `[layer * n_kv_heads + kv_head]`.
    heads: Vec<WaveHead>,
    /// The simulated wave buffer of each head (see [`WaveStats::cache_hit_pages`]).
    buffers: Vec<WaveBufferPolicy>,
    /// The exact KV of the indexed tokens: in host memory, or in the node's tiered store.
    store: Box<dyn ClusterStore>,
    stats: WaveStats,
    probe: Option<Vec<FidelitySample>>,
}

impl WaveKv {
    /// A copy with the same index, counters and clusters (a fork of the sequence).
    pub fn try_clone(&self) -> Result<Self, BackendError> {
        Ok(WaveKv {
            cfg: self.cfg.clone(),
            heads: self.heads.clone(),
            buffers: self.buffers.clone(),
            store: self.store.try_clone().map_err(index_err)?,
            stats: self.stats,
            probe: self.probe.clone(),
        })
    }

    /// The index parameters.
    pub fn config(&self) -> &WaveConfig {
        &self.cfg
    }

    /// End of the indexed token range (the same for every head).
    pub fn indexed_end(&self) -> usize {
        self.heads
            .iter()
            .map(|h| h.index.indexed_range().end)
            .max()
            .unwrap_or(0)
    }

    /// Counters so far.
    pub fn stats(&self) -> WaveStats {
        let mut s = self.stats;
        if let Some(h) = self.heads.first() {
            s.indexed_tokens = h.index.indexed_range().len();
            s.clusters = h.index.n_clusters();
            s.updates = h.index.updates();
        }
        s
    }

    /// Adds one decode step's counters and fidelity samples.
    pub fn record(&mut self, stats: &WaveStats, probe: Vec<FidelitySample>) {
        self.stats.add_counters(stats);
        if let Some(p) = self.probe.as_mut() {
            p.extend(probe);
        }
    }

    /// Runs head `head`'s wave buffer over this step's retrieval clusters (`wanted`, best
    /// first) and counts its hits and misses.
    pub fn buffer_step(&mut self, head: usize, wanted: &[Wanted]) {
        let Some(buf) = self.buffers.get_mut(head) else {
            return;
        };
        let cold = buf.counters().steps == 0;
        let plan = buf.plan(wanted);
        let (hit, miss) = (plan.hit_pages(), plan.miss_pages());
        self.stats.cache_hit_pages += hit;
        self.stats.cache_miss_pages += miss;
        if cold {
            self.stats.cache_cold_pages += miss;
        }
    }

    /// Turns the fidelity probe on or off.
    pub fn set_probe(&mut self, on: bool) {
        self.probe = if on { Some(Vec::new()) } else { None };
    }

    /// Takes the recorded fidelity samples.
    pub fn take_probe(&mut self) -> Vec<FidelitySample> {
        self.probe.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The index of one head (for tests and tools).
    pub fn index(&self, layer: usize, kv_head: usize, n_kv_heads: usize) -> Option<&ClusterIndex> {
        self.heads
            .get(layer * n_kv_heads + kv_head)
            .map(|h| &h.index)
    }

    /// Bytes of the store and the index summaries.
    pub fn n_bytes(&self) -> usize {
        self.store.n_bytes()
            + self
                .heads
                .iter()
                .map(|h| {
                    h.codes.len()
                        + h.vnni_codes.len()
                        + h.mean_codes.len()
                        + h.mean_scales.len() * 4
                        + (h.index.centroids().len() + h.index.value_sums().len()) * 4
                        + h.index.all_members().len() * 4
                })
                .sum::<usize>()
    }
}

fn index_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(format!("wave index: {e}"))
}

/// Keys and values `0..n` of one head as f32.
fn head_f32(kv: &CpuKv, layer: usize, h: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let hd = kv.heads().head_dim;
    let (k, v) = kv.head_keys(layer, h);
    let mut kf = vec![0f32; n * hd];
    let mut vf = vec![0f32; n * hd];
    simd::f16_to_f32(&k[..n * hd], &mut kf);
    simd::f16_to_f32(&v[..n * hd], &mut vf);
    (kf, vf)
}

/// The exact KV of `clusters` (ids of `index`) gathered from the cache in cluster order.
fn gather(
    kv: &CpuKv,
    layer: usize,
    h: usize,
    index: &ClusterIndex,
    clusters: std::ops::Range<usize>,
) -> (Vec<f16>, Vec<f16>, Vec<u32>) {
    let hd = kv.heads().head_dim;
    let (k, v) = kv.head_keys(layer, h);
    let sizes: Vec<u32> = index.sizes()[clusters.clone()].to_vec();
    let n: usize = sizes.iter().map(|&s| s as usize).sum();
    let (mut ko, mut vo) = (Vec::with_capacity(n * hd), Vec::with_capacity(n * hd));
    for c in clusters {
        for &t in index.members(c).unwrap_or_default() {
            let t = t as usize;
            ko.extend_from_slice(&k[t * hd..(t + 1) * hd]);
            vo.extend_from_slice(&v[t * hd..(t + 1) * hd]);
        }
    }
    (ko, vo, sizes)
}

/// Builds the wave state over everything `kv` holds, with the exact KV in `tiered` (a node's
/// tiered store) when given, else in host memory of its own.
pub fn build(
    kv: &CpuKv,
    cfg: &WaveConfig,
    tiered: Option<&TieredStore>,
) -> Result<WaveKv, BackendError> {
    cfg.validate().map_err(index_err)?;
    let t = Instant::now();
    let heads = kv.heads();
    let (nkv, hd) = (heads.n_kv_heads, heads.head_dim);
    let n_layers = kv.n_layers();
    let n = kv.len();
    let dims = HeadDims {
        key_dim: hd,
        value_dim: hd,
    };
    let built: Vec<_> = (0..n_layers * nkv)
        .into_par_iter()
        .map(|i| {
            let (layer, h) = (i / nkv, i % nkv);
            let (kf, vf) = head_f32(kv, layer, h, n);
            let view = KvView::new(&kf, &vf, dims).map_err(index_err)?;
            let index = ClusterIndex::build(&view, cfg).map_err(index_err)?;
            let runs = gather(kv, layer, h, &index, 0..index.n_clusters());
            Ok((WaveHead::new(index), runs))
        })
        .collect::<Result<_, BackendError>>()?;
    let mut store: Box<dyn ClusterStore> = match tiered {
        Some(t) => Box::new(TieredClusterStore::new(t.clone(), n_layers, nkv, hd)),
        None => Box::new(HostClusterStore::new(n_layers, nkv, hd)),
    };
    let mut wave_heads = Vec::with_capacity(built.len());
    for (i, (head, (k, v, sizes))) in built.into_iter().enumerate() {
        let key = HeadKey {
            layer: (i / nkv) as u32,
            kv_head: (i % nkv) as u32,
        };
        store.append(key, &k, &v, &sizes).map_err(index_err)?;
        wave_heads.push(head);
    }
    let buffers = wave_heads
        .iter()
        .map(|h| WaveBufferPolicy::new(buffer_config(&h.index, cfg)))
        .collect();
    Ok(WaveKv {
        cfg: cfg.clone(),
        heads: wave_heads,
        buffers,
        store,
        stats: WaveStats {
            build_seconds: t.elapsed().as_secs_f64(),
            ..WaveStats::default()
        },
        probe: None,
    })
}

/// The wave buffer of one head: `cache_ratio` times the step's least retrieval budget, in pages
/// of `page_size` tokens of an average cluster.
fn buffer_config(index: &ClusterIndex, cfg: &WaveConfig) -> CacheConfig {
    let pages = cfg.cache_pages(
        index.budgets(cfg).retrieval,
        index.n_clusters(),
        index.indexed_range().len(),
    );
    CacheConfig {
        capacity_pages: pages.min(u32::MAX as usize) as u32,
    }
}

/// Pages of a cluster of `size` tokens.
fn cluster_pages(size: u32, cfg: &WaveConfig) -> u32 {
    size.div_ceil(cfg.page_size.max(1) as u32)
}

/// Clusters the tokens gathered since the last update of `layer`, once enough have gathered
/// (`update_interval` beyond the window), and appends them to the index and the store.
pub fn update(kv: &mut CpuKv, layer: usize) -> Result<(), BackendError> {
    let Some(mut wave) = kv.wave.take() else {
        return Ok(());
    };
    let result = update_layer(kv, &mut wave, layer);
    kv.wave = Some(wave);
    result
}

fn update_layer(kv: &CpuKv, wave: &mut WaveKv, layer: usize) -> Result<(), BackendError> {
    let heads = kv.heads();
    let (nkv, hd) = (heads.n_kv_heads, heads.head_dim);
    let n = kv.layer_len(layer);
    let cfg = &wave.cfg;
    let dims = HeadDims {
        key_dim: hd,
        value_dim: hd,
    };
    let slots = &mut wave.heads[layer * nkv..(layer + 1) * nkv];
    if slots
        .iter()
        .all(|h| h.index.pending_update(cfg, n).is_none())
    {
        return Ok(());
    }
    let appended: Vec<_> = slots
        .par_iter_mut()
        .enumerate()
        .map(|(h, head)| {
            let Some(range) = head.index.pending_update(cfg, n) else {
                return Ok(None);
            };
            let (kf, vf) = head_f32(kv, layer, h, range.end);
            let view = KvView::new(&kf, &vf, dims).map_err(index_err)?;
            let before = head.index.n_clusters();
            head.index
                .append_segment(&view, range, cfg)
                .map_err(index_err)?;
            head.refresh();
            Ok(Some(gather(
                kv,
                layer,
                h,
                &head.index,
                before..head.index.n_clusters(),
            )))
        })
        .collect::<Result<_, BackendError>>()?;
    for (h, runs) in appended.into_iter().enumerate() {
        if let Some((k, v, sizes)) = runs {
            let key = HeadKey {
                layer: layer as u32,
                kv_head: h as u32,
            };
            wave.store.append(key, &k, &v, &sizes).map_err(index_err)?;
        }
    }
    Ok(())
}

/// The mean values of an index's clusters (`value_sum / size`) as int8 codes, `[clusters,
/// head_dim]`, with one scale per cluster: mean = code * scale.
#[derive(Clone, Copy)]
struct MeanCodes<'a> {
    codes: &'a [i8],
    scales: &'a [f32],
}

/// Folds the estimation clusters `ids` into `st`: `logits` is `[group, ids.len()]`, the logits
/// of each cluster's `|C_i|` copies of its centroid (`q . c_i * scale + ln |C_i|` per query
/// head), and `means` the index's mean values. Each cluster's mean is read once for the whole
/// group.
#[inline(never)]
fn estimate(st: &mut GroupState, logits: &[f32], means: MeanCodes<'_>, ids: &[u32]) {
    let group = st.m.len();
    let (hd, e) = (st.acc.len() / group.max(1), ids.len());
    if e == 0 {
        return;
    }
    assert!(
        ids.iter()
            .all(|&c| (c as usize) < means.scales.len()
                && (c as usize + 1) * hd <= means.codes.len()),
        "estimation cluster outside the index"
    );
    let mut w = vec![0f32; group * e];
    for g in 0..group {
        let lg = &logits[g * e..(g + 1) * e];
        let tmax = simd::max_f32(lg);
        let mn = st.m[g].max(tmax);
        if mn == f32::NEG_INFINITY {
            continue;
        }
        let corr = simd::exp_approx(st.m[g] - mn);
        if corr != 1.0 {
            st.acc[g * hd..(g + 1) * hd]
                .iter_mut()
                .for_each(|a| *a *= corr);
        }
        st.l[g] *= corr;
        st.m[g] = mn;
        // w = |C_i| exp(q . c_i * scale - mn): the weight of the cluster's copies, whose mean
        // value stands for their sum over |C_i|.
        let wg = &mut w[g * e..(g + 1) * e];
        st.l[g] += simd::exp_shift_sum(lg, mn, wg);
        // The mean's scale goes into its weight: acc += (w * scale) * code.
        wg.iter_mut()
            .zip(ids)
            .for_each(|(x, &c)| *x *= means.scales[c as usize]);
    }
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8)
        && group <= crate::decode_kernel::MAX_GROUP
        && crate::decode_kernel::has_avx2_f16c()
    {
        macro_rules! dispatch {
            ($($g:literal)*) => {
                match group {
                    $($g => {
                        // SAFETY: AVX2 and FMA were detected; every id's row lies in the codes
                        // (checked above), `w` is `[group, e]` and `acc` is `[group, hd]`.
                        unsafe {
                            estimate_accumulate_avx2::<$g>(&mut st.acc, &w, means.codes, ids, hd)
                        };
                        return;
                    })*
                    _ => {}
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8);
    }
    let mut row = vec![0f32; hd];
    for (i, &id) in ids.iter().enumerate() {
        let mean = &means.codes[id as usize * hd..(id as usize + 1) * hd];
        for (r, &c) in row.iter_mut().zip(mean) {
            *r = f32::from(c);
        }
        for g in 0..group {
            let wgi = w[g * e + i];
            if wgi != 0.0 {
                simd::axpy(&mut st.acc[g * hd..(g + 1) * hd], wgi, &row);
            }
        }
    }
}

/// `acc[g] += sum_i w[g, i] * mean_{ids[i]}` (the rows of `codes`, `[clusters, hd]`) for a
/// whole group: 8 dimensions at a time with the group's accumulators in registers, over blocks
/// of clusters whose means stay in L1, so each mean is converted once per block and no
/// accumulator goes through memory per cluster.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn estimate_accumulate_avx2<const G: usize>(
    acc: &mut [f32],
    w: &[f32],
    codes: &[i8],
    ids: &[u32],
    hd: usize,
) {
    assert!(acc.len() >= G * hd && w.len() >= G * ids.len() && hd.is_multiple_of(8));
    assert!(ids.iter().all(|&c| (c as usize + 1) * hd <= codes.len()));
    use std::arch::x86_64::*;
    const BLOCK: usize = 16;
    const AHEAD: usize = 32;
    let e = ids.len();
    let row = |i: usize| &codes[ids[i] as usize * hd..(ids[i] as usize + 1) * hd];
    // Hints one mean into L2 (a burst of prefetches into L1 would hold its few miss buffers).
    let prefetch = |i: usize| {
        if i < e {
            let mean = row(i);
            for off in (0..hd).step_by(64) {
                // SAFETY: prefetching inside a live slice (off < hd bytes) only warms caches.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T1>(mean.as_ptr().cast::<i8>().add(off));
                }
            }
        }
    };
    for i in 0..AHEAD {
        prefetch(i);
    }
    let mut start = 0;
    while start < e {
        let end = (start + BLOCK).min(e);
        for d in (0..hd).step_by(8) {
            let mut a = [_mm256_setzero_ps(); G];
            for (g, ag) in a.iter_mut().enumerate() {
                // SAFETY: g < group and d + 8 <= hd, inside `acc` ([group, hd]).
                *ag = unsafe { _mm256_loadu_ps(acc.as_ptr().add(g * hd + d)) };
            }
            for i in start..end {
                let mean = row(i);
                // The means are scattered over the index: fetch the next block's, one per
                // mean of this block, during the first pass over it.
                if d == 0 {
                    prefetch(i + AHEAD);
                }
                // SAFETY: d + 8 <= hd <= mean.len().
                let m = unsafe {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        mean.as_ptr().add(d).cast(),
                    )))
                };
                for (g, ag) in a.iter_mut().enumerate() {
                    // SAFETY: g * e + i < group * e <= w.len().
                    let wg = unsafe { _mm256_broadcast_ss(&*w.as_ptr().add(g * e + i)) };
                    *ag = _mm256_fmadd_ps(wg, m, *ag);
                }
            }
            for (g, ag) in a.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(g * hd + d), *ag) };
            }
        }
        start = end;
    }
}

/// Time spent in each phase of the wave decode units since the process started (scoring,
/// zone selection, exact attention, estimation), summed over threads; only counted while
/// [`set_phase_timing`] is on (the attention benchmark turns it on).
static PHASE_NS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static PHASE_TIMING: AtomicBool = AtomicBool::new(false);

/// Turns the per-phase timing of wave decode on or off.
pub fn set_phase_timing(on: bool) {
    PHASE_TIMING.store(on, Ordering::Relaxed);
}

/// Nanoseconds spent so far in scoring, selection, exact attention and estimation.
pub fn phase_nanos() -> [u64; 4] {
    std::array::from_fn(|i| PHASE_NS[i].load(Ordering::Relaxed))
}

/// Adds the time since the last lap to a phase, when timing is on.
struct PhaseClock(Option<Instant>);

impl PhaseClock {
    fn start() -> Self {
        PhaseClock(PHASE_TIMING.load(Ordering::Relaxed).then(Instant::now))
    }

    fn lap(&mut self, phase: usize) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            PHASE_NS[phase].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
}

/// What one (sequence, KV head) decode unit produced.
struct UnitOut {
    seq: usize,
    kv_head: usize,
    out: Vec<f32>,
    stats: WaveStats,
    probe: Vec<FidelitySample>,
    /// The retrieval clusters, best first, for the wave buffer.
    wanted: Vec<Wanted>,
}

/// What [`decode`] returns for one sequence: its index in the batch, its counters, its fidelity
/// samples and, per KV head of the layer, the retrieval clusters (best first) for its wave
/// buffers ([`WaveKv::buffer_step`]).
pub type SeqStep = (
    usize,
    WaveStats,
    Vec<FidelitySample>,
    Vec<(usize, Vec<Wanted>)>,
);

/// Per-cluster scores of a GQA group and the per-head logits (`[group, clusters]`).
/// Per-step buffers of a decode unit, kept per thread: the logits of a long context are large
/// enough that a fresh allocation each step would be mapped and zeroed by the kernel every time.
#[derive(Default)]
struct Scratch {
    logits: Vec<f32>,
    scores: Vec<f32>,
    e: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// Per-cluster scores of a GQA group into `s.scores` and the per-head logits (`[group,
/// clusters]`) into `s.logits`.
#[inline(never)]
fn score(
    head: &WaveHead,
    qs: &[f32],
    group: usize,
    hd: usize,
    scale: f32,
    by_size: bool,
    s: &mut Scratch,
) {
    let n = head.index.n_clusters();
    let sizes = head.index.sizes();
    centroid_logits(head, qs, group, hd, scale, &mut s.logits);
    let (logits, scores, e) = (&s.logits, &mut s.scores, &mut s.e);
    scores.clear();
    scores.resize(n, 0.0);
    // Every element of `e` is written before it is read.
    e.resize(n, 0.0);
    for g in 0..group {
        let lg = &logits[g * n..(g + 1) * n];
        let max = simd::max_f32(lg);
        if max == f32::NEG_INFINITY {
            continue;
        }
        let z = if by_size {
            // Softmax over q.c_i + ln|C_i|: the estimated mass of each cluster.
            for ((ev, &x), &ln) in e.iter_mut().zip(lg).zip(&head.ln_sizes) {
                *ev = x + ln;
            }
            let max = simd::max_f32(e);
            simd::exp_shift_sum_inplace(e, max)
        } else {
            simd::exp_shift_sum(lg, max, e)
        };
        simd::axpy(scores, 1.0 / z, e);
    }
    for (s, &size) in scores.iter_mut().zip(sizes) {
        if size == 0 {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Wave decode attention of the single query row of each sequence in `batch` (whose caches all
/// have a wave index), written into `out` (`[rows, n_heads * head_dim]`).
pub fn decode(
    layer: usize,
    q: &[f32],
    caches: &[&CpuKv],
    batch: &BatchLayout,
    heads: HeadLayout,
    out: &mut [f32],
) -> Result<Vec<SeqStep>, BackendError> {
    let (nq, nkv, hd) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let group = heads.group();
    let scale = 1.0 / (hd as f32).sqrt();
    let units: Vec<(usize, usize)> = (0..batch.seqs.len())
        .flat_map(|s| (0..nkv).map(move |h| (s, h)))
        .collect();
    let results: Vec<UnitOut> = units
        .par_iter()
        .map(|&(si, h)| {
            let s = &batch.seqs[si];
            let kv = caches[si];
            let wave = kv
                .wave
                .as_deref()
                .ok_or_else(|| BackendError::Device("wave decode without an index".into()))?;
            let head = &wave.heads[layer * nkv + h];
            let n_tokens = kv.layer_len(layer);
            let qrow = &q[s.row * nq * hd..(s.row + 1) * nq * hd];
            let qs = &qrow[h * group * hd..(h + 1) * group * hd];
            let mut scratch = SCRATCH.take();
            let mut clock = PhaseClock::start();
            score(
                head,
                qs,
                group,
                hd,
                scale,
                wave.cfg.rank_by_size,
                &mut scratch,
            );
            clock.lap(0);
            let (scores, logits) = (&scratch.scores, &scratch.logits);
            let plan = if wave.cfg.union_ranking {
                plan_step_union(&head.index, &wave.cfg, scores, logits, group, n_tokens)
            } else {
                plan_step(&head.index, &wave.cfg, scores, n_tokens)
            }
            .map_err(index_err)?;
            clock.lap(1);
            let mut st = GroupState::new(group, hd);
            let (keys, values) = kv.head_keys(layer, h);
            let mut stats = WaveStats {
                head_steps: 1,
                context_tokens: n_tokens as u64,
                ..WaveStats::default()
            };
            // The steady zone and every retrieval cluster in one call: the kernel's tiles span
            // the clusters (short runs scattered over the store) and prefetch the next tile.
            for r in &plan.steady {
                stats.steady_tokens += u64::from(r.end - r.start);
            }
            let key = HeadKey {
                layer: layer as u32,
                kv_head: h as u32,
            };
            wave.store
                .with_clusters(key, &plan.retrieval, &mut |clusters| {
                    let mut runs: Vec<(&[f16], &[f16])> =
                        Vec::with_capacity(plan.steady.len() + clusters.len());
                    for r in &plan.steady {
                        let (a, b) = (r.start as usize * hd, r.end as usize * hd);
                        runs.push((&keys[a..b], &values[a..b]));
                    }
                    for run in clusters {
                        stats.exact_tokens += (run.keys.len() / hd) as u64;
                        runs.push((run.keys, run.values));
                    }
                    st.attend_runs(qs, &runs, scale);
                })
                .map_err(index_err)?;
            clock.lap(2);
            stats.exact_tokens += stats.steady_tokens;
            let n = head.index.n_clusters();
            let e = plan.estimation.len();
            // The logits of the cluster's |C_i| copies: q . c_i * scale + ln |C_i|.
            let mut lg = vec![0f32; group * e];
            for g in 0..group {
                let lgg = &logits[g * n..(g + 1) * n];
                for (x, &c) in lg[g * e..(g + 1) * e].iter_mut().zip(&plan.estimation) {
                    *x = lgg[c as usize] + head.ln_sizes[c as usize];
                }
            }
            let means = MeanCodes {
                codes: &head.mean_codes,
                scales: &head.mean_scales,
            };
            estimate(&mut st, &lg, means, &plan.estimation);
            clock.lap(3);
            stats.retrieval_clusters = plan.retrieval.len() as u64;
            stats.estimation_clusters = plan.estimation.len() as u64;
            stats.estimated_tokens = plan
                .estimation
                .iter()
                .map(|&c| u64::from(head.index.sizes()[c as usize]))
                .sum();
            stats.bytes_read = (head.codes.len()
                + n * 4 * 2
                + stats.exact_tokens as usize * hd * 4
                + plan.estimation.len() * (hd + 4)) as u64;
            let mut best: Vec<u32> = plan.retrieval.clone();
            best.sort_by(|&a, &b| {
                scores[b as usize]
                    .total_cmp(&scores[a as usize])
                    .then(a.cmp(&b))
            });
            let wanted: Vec<Wanted> = best
                .iter()
                .map(|&c| Wanted {
                    cluster: c,
                    pages: cluster_pages(head.index.sizes()[c as usize], &wave.cfg),
                    tier: Tier::Host,
                })
                .collect();
            SCRATCH.set(scratch);
            let probe = if wave.probe.is_some() {
                probe_head(kv, layer, h, head, &plan, qs, group, s.start_pos, scale)?
            } else {
                Vec::new()
            };
            Ok(UnitOut {
                seq: si,
                kv_head: h,
                out: {
                    let mut o = vec![0f32; group * hd];
                    st.output(&mut o);
                    o
                },
                stats,
                probe,
                wanted,
            })
        })
        .collect::<Result<_, BackendError>>()?;
    let mut per_seq: Vec<SeqStep> = (0..batch.seqs.len())
        .map(|i| (i, WaveStats::default(), Vec::new(), Vec::new()))
        .collect();
    for u in results {
        let s = &batch.seqs[u.seq];
        let base = s.row * nq * hd + u.kv_head * group * hd;
        out[base..base + group * hd].copy_from_slice(&u.out);
        let acc = &mut per_seq[u.seq];
        acc.1.add_counters(&u.stats);
        acc.2.extend(u.probe);
        acc.3.push((layer * nkv + u.kv_head, u.wanted));
    }
    Ok(per_seq)
}

/// Fidelity of every query head of one unit against exact attention (f64 reference).
#[allow(clippy::too_many_arguments)]
fn probe_head(
    kv: &CpuKv,
    layer: usize,
    h: usize,
    head: &WaveHead,
    plan: &ZonePlan,
    qs: &[f32],
    group: usize,
    position: usize,
    scale: f32,
) -> Result<Vec<FidelitySample>, BackendError> {
    let hd = kv.heads().head_dim;
    let n = kv.layer_len(layer);
    let (kf, vf) = head_f32(kv, layer, h, n);
    let dims = HeadDims {
        key_dim: hd,
        value_dim: hd,
    };
    let view = KvView::new(&kf, &vf, dims).map_err(index_err)?;
    (0..group)
        .map(|g| {
            let f = retrowave_index::fidelity(
                &view,
                &head.index,
                plan,
                &qs[g * hd..(g + 1) * hd],
                scale,
            )
            .map_err(index_err)?;
            Ok(FidelitySample {
                layer,
                kv_head: h,
                q_head: h * group + g,
                position,
                rel_l2: f.rel_l2,
                mass_exact: f.mass_exact,
                mass_all: f.mass_all,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use retrowave_core::SeqRows;

    const HEADS: HeadLayout = HeadLayout {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 32,
    };

    /// Clustered synthetic keys (a few directions plus noise) so that k-means has structure.
    fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let w = HEADS.n_kv_heads * HEADS.head_dim;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut k = vec![0f32; n * w];
        let mut v = vec![0f32; n * w];
        for t in 0..n {
            let dir = (t * 7919) % 11;
            for i in 0..w {
                let base = if i % 11 == dir { 3.0 } else { 0.0 };
                k[t * w + i] = base + rnd();
                v[t * w + i] = rnd() * 2.0;
            }
        }
        (k, v)
    }

    fn one(pos: usize) -> BatchLayout {
        BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: pos,
                n_tokens: 1,
            }],
        }
    }

    fn query(seed: u64) -> Vec<f32> {
        let (q, _) = data(3, seed);
        let mut out = q;
        out.resize(HEADS.n_heads * HEADS.head_dim, 0.0);
        for (i, x) in out.iter_mut().enumerate() {
            *x += ((i * 31) % 7) as f32 * 0.1;
        }
        out
    }

    fn filled(n: usize) -> CpuKv {
        let (k, v) = data(n, 1);
        let mut kv = CpuKv::new(1, HEADS, 1 << 16);
        kv.write(0, 0, &k, &v).unwrap();
        kv
    }

    #[test]
    fn everything_retrieved_equals_dense_attention() {
        let n = 1500;
        let kv = filled(n);
        let cfg = WaveConfig {
            retrieval_fraction: 1.0,
            estimation_fraction: 0.0,
            ..WaveConfig::published()
        };
        let mut wkv = kv.try_clone().unwrap();
        wkv.wave = Some(Box::new(build(&kv, &cfg, None).unwrap()));
        let q = query(5);
        let dense = crate::attention::attend(0, &q, &[&kv], &one(n - 1), HEADS);
        let mut out = vec![0f32; q.len()];
        let stats = decode(0, &q, &[&wkv], &one(n - 1), HEADS, &mut out).unwrap();
        for (a, b) in out.iter().zip(&dense) {
            assert!((a - b).abs() < 2e-4, "{a} vs {b}");
        }
        let s = stats[0].1;
        assert_eq!(s.head_steps, 2);
        assert_eq!(s.exact_tokens, 2 * n as u64);
        assert_eq!(s.estimation_clusters, 0);
    }

    /// `dense_layers` sends decode steps of the first layers to exact attention (through the
    /// backend's dispatch), while the other layers keep attending through the index.
    #[test]
    fn dense_layers_attend_exactly() {
        use retrowave_core::Backend;
        let n = 3000;
        let b = crate::CpuBackend::new();
        let q = query(7);
        let kw = HEADS.n_kv_heads * HEADS.head_dim;
        let (k_new, v_new) = data(1, 99);
        let acts = |data: Vec<f32>, cols: usize| crate::CpuActs {
            data,
            rows: 1,
            cols,
        };
        let batch = BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: n,
                n_tokens: 1,
            }],
        };
        let run = |dense_layers: usize| {
            let mut kv = filled(n);
            let cfg = WaveConfig {
                dense_layers,
                ..WaveConfig::published()
            };
            b.kv_build_index(&mut kv, &cfg).unwrap();
            let before = b.kv_wave_stats(&kv).unwrap().head_steps;
            let out = b
                .attention(
                    0,
                    &acts(q.clone(), q.len()),
                    &acts(k_new[..kw].to_vec(), kw),
                    &acts(v_new[..kw].to_vec(), kw),
                    &mut [&mut kv],
                    &batch,
                    HEADS,
                )
                .unwrap();
            let steps = b.kv_wave_stats(&kv).unwrap().head_steps - before;
            (out.data, steps, kv)
        };
        let (dense_out, dense_steps, kv) = run(1);
        let want = crate::attention::attend(0, &q, &[&kv], &one(n), HEADS);
        assert_eq!(
            dense_out, want,
            "layer 0 is dense: exact attention, bit for bit"
        );
        assert_eq!(dense_steps, 0, "no wave step was taken");
        let (wave_out, wave_steps, _) = run(0);
        assert_eq!(wave_steps, HEADS.n_kv_heads as u64);
        assert_ne!(
            wave_out, want,
            "at published budgets wave attention is approximate"
        );
    }

    #[test]
    fn matches_the_reference_wave_attention_at_published_budgets() {
        let n = 3000;
        let kv = filled(n);
        let cfg = WaveConfig::published();
        let mut wkv = kv.try_clone().unwrap();
        let wave = build(&kv, &cfg, None).unwrap();
        let q = query(9);
        let hd = HEADS.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        // The reference: f64 scoring and attention from the index crate over the same KV.
        let mut want = vec![0f32; q.len()];
        for h in 0..HEADS.n_kv_heads {
            let index = wave.index(0, h, HEADS.n_kv_heads).unwrap();
            let (kf, vf) = head_f32(&kv, 0, h, n);
            let dims = HeadDims {
                key_dim: hd,
                value_dim: hd,
            };
            let view = KvView::new(&kf, &vf, dims).unwrap();
            let group = HEADS.group();
            let qs = &q[h * group * hd..(h + 1) * group * hd];
            // The f64 reference ranking and the f32 one of the kernel pick the same retrieval
            // clusters up to near-ties; the outputs are compared under the kernel's plan.
            let scores = retrowave_index::score_clusters(index, qs, scale).unwrap();
            let reference = retrowave_index::plan_zones(index, &scores, &cfg, n).unwrap();
            let fast_head = WaveHead::new(index.clone());
            let mut scratch = Scratch::default();
            score(&fast_head, qs, group, hd, scale, false, &mut scratch);
            let plan = retrowave_index::plan_zones(index, &scratch.scores, &cfg, n).unwrap();
            let same = plan
                .retrieval
                .iter()
                .filter(|c| reference.retrieval.contains(c))
                .count();
            assert!(
                same + 1 >= plan.retrieval.len(),
                "{plan:?} vs {reference:?}"
            );
            assert!(!plan.retrieval.is_empty() && !plan.estimation.is_empty());
            for g in 0..group {
                let p =
                    retrowave_index::attend(&view, index, &plan, &qs[g * hd..(g + 1) * hd], scale)
                        .unwrap();
                want[(h * group + g) * hd..(h * group + g + 1) * hd].copy_from_slice(&p.out);
            }
        }
        wkv.wave = Some(Box::new(wave));
        let mut out = vec![0f32; q.len()];
        let stats = decode(0, &q, &[&wkv], &one(n - 1), HEADS, &mut out).unwrap();
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        let s = stats[0].1;
        assert!(s.exact_tokens < (n as u64) && s.estimated_tokens > 0);
        assert!(s.bytes_read < (2 * n * hd * 2 * 2) as u64);
    }

    #[test]
    fn the_wave_buffer_serves_a_repeated_selection_and_counts_a_cold_start() {
        let n = 3000;
        let (k, v) = data(n, 5);
        let w = HEADS.n_kv_heads * HEADS.head_dim;
        let mut kv = CpuKv::new(1, HEADS, 4096);
        kv.write(0, 0, &k[..n * w], &v[..n * w]).unwrap();
        kv.wave = Some(Box::new(
            build(&kv, &WaveConfig::retrowave(), None).unwrap(),
        ));
        let step = |kv: &mut CpuKv, q: &[f32]| {
            let mut out = vec![0f32; q.len()];
            let per_seq = decode(0, q, &[&*kv], &one(n - 1), HEADS, &mut out).unwrap();
            let wave = kv.wave.as_deref_mut().unwrap();
            for (_, stats, probe, wanted) in per_seq {
                wave.record(&stats, probe);
                for (head, list) in &wanted {
                    assert!(!list.is_empty() && list.iter().all(|x| x.pages > 0));
                    wave.buffer_step(*head, list);
                }
            }
            wave.stats()
        };
        // The first step finds a cold buffer: every page misses, and all of them are cold.
        let s1 = step(&mut kv, &query(1));
        assert_eq!(s1.cache_hit_pages, 0);
        assert!(s1.cache_miss_pages > 0);
        assert_eq!(s1.cache_cold_pages, s1.cache_miss_pages);
        assert_eq!(s1.warm_hit_ratio(), None);
        // The same query again: the same clusters, all in the buffer.
        let s2 = step(&mut kv, &query(1));
        assert_eq!(s2.cache_hit_pages, s1.cache_miss_pages);
        assert_eq!(s2.cache_miss_pages, s1.cache_miss_pages);
        assert_eq!(s2.warm_hit_ratio(), Some(1.0));
        // Another query: some of its clusters are new.
        let s3 = step(&mut kv, &query(2));
        let r = s3.warm_hit_ratio().unwrap();
        assert!(r < 1.0 && r > 0.0, "{r}");
    }

    /// The exact KV in a tiered store whose host memory holds a small part of it, the rest
    /// spilled to a disk tier in a real file: decode steps pin the clusters they need (reading
    /// those on disk back) and give bit for bit the outputs and counters of the host-memory
    /// store, also across index updates and in a fork; the sequences' records are freed with
    /// them.
    #[test]
    fn a_tiered_store_with_a_disk_tier_decodes_exactly_as_host_memory() {
        let cfg = WaveConfig {
            update_interval: 128,
            clusters_per_update: 8,
            ..WaveConfig::retrowave()
        };
        let (n0, extra) = (6000, 300);
        let (k, v) = data(n0 + extra, 11);
        let w = HEADS.n_kv_heads * HEADS.head_dim;
        let dir = tempfile::tempdir().unwrap();
        // 1.5 MB of records (6000 tokens, 2 KV heads of 32 dims) for 128 KiB of host memory.
        let store = TieredStore::new(retrowave_store::StoreConfig {
            host_capacity_bytes: 128 << 10,
            dirs: vec![dir.path().to_path_buf()],
            queue_depth: 16,
            staging_bytes: 256 << 10,
            ..Default::default()
        })
        .unwrap();
        let seq = |tiered: Option<&TieredStore>| {
            let mut kv = CpuKv::new(1, HEADS, 8192);
            kv.write(0, 0, &k[..n0 * w], &v[..n0 * w]).unwrap();
            kv.wave = Some(Box::new(build(&kv, &cfg, tiered).unwrap()));
            kv
        };
        let (mut host, mut tiered) = (seq(None), seq(Some(&store)));
        let st = store.stats();
        assert!(st.spilled > 0 && st.disk_bytes > st.host_bytes, "{st:?}");
        let step = |kv: &CpuKv, pos: usize, q: &[f32]| {
            let mut out = vec![0f32; q.len()];
            let per_seq = decode(0, q, &[kv], &one(pos), HEADS, &mut out).unwrap();
            (out, per_seq[0].1)
        };
        for t in n0..n0 + extra {
            for kv in [&mut host, &mut tiered] {
                kv.write(0, t, &k[t * w..(t + 1) * w], &v[t * w..(t + 1) * w])
                    .unwrap();
                update(kv, 0).unwrap();
            }
            if t % 50 == 0 {
                let q = query(t as u64);
                let (a, sa) = step(&host, t, &q);
                let (b, sb) = step(&tiered, t, &q);
                assert_eq!(sa, sb, "step at {t}");
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "outputs differ at {t}"
                );
            }
        }
        assert_eq!(tiered.wave.as_ref().unwrap().stats().updates, 2);
        let st = store.stats();
        assert!(st.disk_reads > 0 && st.disk_loads > 0, "{st:?}");
        // A fork reads the same clusters from its own records.
        let fork = tiered.try_clone().unwrap();
        let last = n0 + extra - 1;
        let q = query(77);
        let (a, _) = step(&host, last, &q);
        drop(tiered);
        let (b, _) = step(&fork, last, &q);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        drop(fork);
        assert_eq!(store.stats().clusters, 0);
    }

    /// A tiered store without room for an index (64 KiB of host memory, a 256 KiB disk quota,
    /// 1.5 MB of records): the build fails with the store's own error and leaves no record of
    /// the failed sequence behind; a sequence that fits (clusters of 16, ~84 KB of pages) builds
    /// on the freed disk space and decodes after it.
    #[test]
    fn a_full_tiered_store_fails_the_build_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = TieredStore::new(retrowave_store::StoreConfig {
            host_capacity_bytes: 64 << 10,
            dirs: vec![dir.path().to_path_buf()],
            max_disk_bytes_per_dir: Some(256 << 10),
            queue_depth: 16,
            staging_bytes: 64 << 10,
            ..Default::default()
        })
        .unwrap();
        let cfg = WaveConfig::retrowave();
        let err = build(&filled(6000), &cfg, Some(&store))
            .unwrap_err()
            .to_string();
        assert!(err.contains("full"), "{err}");
        let st = store.stats();
        assert_eq!(
            (st.clusters, st.host_bytes, st.disk_bytes),
            (0, 0, 0),
            "{st:?}"
        );
        // (The default's clusters of one token at 400 tokens would take a page of 8 each.)
        let small = WaveConfig::published();
        let mut kv = filled(400);
        kv.wave = Some(Box::new(build(&kv, &small, Some(&store)).unwrap()));
        assert!(store.stats().spilled > 0);
        let mut host = filled(400);
        host.wave = Some(Box::new(build(&host, &small, None).unwrap()));
        let q = query(3);
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        decode(0, &q, &[&host], &one(399), HEADS, &mut a).unwrap();
        decode(0, &q, &[&kv], &one(399), HEADS, &mut b).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn decode_updates_the_index_and_the_store_stays_in_cluster_order() {
        let cfg = WaveConfig {
            update_interval: 128,
            clusters_per_update: 8,
            ..WaveConfig::published()
        };
        let n0 = 700;
        let (k, v) = data(n0 + 300, 3);
        let w = HEADS.n_kv_heads * HEADS.head_dim;
        let mut kv = CpuKv::new(1, HEADS, 4096);
        kv.write(0, 0, &k[..n0 * w], &v[..n0 * w]).unwrap();
        kv.wave = Some(Box::new(build(&kv, &cfg, None).unwrap()));
        let first_end = kv.wave.as_ref().unwrap().indexed_end();
        assert_eq!(first_end, n0 - cfg.window_tokens);
        for t in n0..n0 + 300 {
            kv.write(0, t, &k[t * w..(t + 1) * w], &v[t * w..(t + 1) * w])
                .unwrap();
            update(&mut kv, 0).unwrap();
        }
        let wave = kv.wave.as_ref().unwrap();
        // Updates fire once window + interval tokens follow the indexed range.
        assert_eq!(wave.stats().updates, 2);
        assert_eq!(wave.indexed_end(), first_end + 2 * 128);
        let hd = HEADS.head_dim;
        for h in 0..HEADS.n_kv_heads {
            let index = wave.index(0, h, HEADS.n_kv_heads).unwrap();
            let (keys, values) = kv.head_keys(0, h);
            let key = HeadKey {
                layer: 0,
                kv_head: h as u32,
            };
            for c in 0..index.n_clusters() {
                let mut run = (Vec::new(), Vec::new());
                wave.store
                    .with_clusters(key, &[c as u32], &mut |r| {
                        run = (r[0].keys.to_vec(), r[0].values.to_vec());
                    })
                    .unwrap();
                let members = index.members(c).unwrap();
                assert_eq!(run.0.len(), members.len() * hd);
                for (i, &t) in members.iter().enumerate() {
                    let t = t as usize;
                    assert_eq!(&run.0[i * hd..(i + 1) * hd], &keys[t * hd..(t + 1) * hd]);
                    assert_eq!(&run.1[i * hd..(i + 1) * hd], &values[t * hd..(t + 1) * hd]);
                }
            }
        }
        // Rewinding into the indexed range drops the index; the exact cache still serves.
        kv.truncate(100);
        assert!(!kv.has_wave());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vnni_logits_equal_the_avx2_int8_ones() {
        if !has_avx512_vnni() || !crate::decode_kernel::has_avx2_f16c() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        // 2000 tokens: a partial last block of clusters and some empty clusters.
        let kv = filled(2000);
        let wave = build(&kv, &WaveConfig::published(), None).unwrap();
        let (hd, group) = (HEADS.head_dim, HEADS.group());
        let q = query(5);
        for h in 0..HEADS.n_kv_heads {
            let head = WaveHead::new(wave.index(0, h, HEADS.n_kv_heads).unwrap().clone());
            assert!(!head.vnni_codes.is_empty());
            let n = head.index.n_clusters();
            let qs = &q[h * group * hd..(h + 1) * group * hd];
            let (qi, qscale) = quantize_queries(qs, group, hd);
            let mut vnni = vec![f32::NAN; group * n];
            let mut avx2 = vec![f32::NAN; group * n];
            // SAFETY: both feature sets were detected above.
            unsafe {
                centroid_logits_vnni::<2>(&head, &qi, &qscale, hd, 0.3, &mut vnni);
                centroid_logits_i8::<2>(&head, &qi, &qscale, hd, 0.3, &mut avx2);
            }
            for c in 0..n {
                if head.index.sizes()[c] == 0 {
                    assert_eq!(vnni[c], f32::NEG_INFINITY);
                    assert_eq!(vnni[n + c], f32::NEG_INFINITY);
                } else {
                    assert_eq!(vnni[c].to_bits(), avx2[c].to_bits(), "cluster {c}");
                    assert_eq!(vnni[n + c].to_bits(), avx2[n + c].to_bits(), "cluster {c}");
                }
            }
        }
    }

    #[test]
    fn int8_centroid_logits_follow_the_exact_ones() {
        let kv = filled(2000);
        let wave = build(&kv, &WaveConfig::published(), None).unwrap();
        let hd = HEADS.head_dim;
        let group = HEADS.group();
        let q = query(4);
        let index = wave.index(0, 1, HEADS.n_kv_heads).unwrap();
        let head = WaveHead::new(index.clone());
        let qs = &q[group * hd..2 * group * hd];
        let mut got = Vec::new();
        centroid_logits(&head, qs, group, hd, 0.5, &mut got);
        let n = index.n_clusters();
        let mut worst = 0f64;
        let mut span = 0f64;
        for c in 0..n {
            let cen = index.centroid(c).unwrap();
            for g in 0..group {
                let want: f64 = qs[g * hd..(g + 1) * hd]
                    .iter()
                    .zip(cen)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
                    * 0.5;
                let x = f64::from(got[g * n + c]);
                if index.sizes()[c] == 0 {
                    assert_eq!(x, f64::NEG_INFINITY);
                    continue;
                }
                worst = worst.max((x - want).abs());
                span = span.max(want.abs());
            }
        }
        assert!(span > 1.0 && worst < 0.01 * span, "worst {worst} of {span}");
    }
}

#[cfg(test)]
mod estimate_bench {
    use super::*;

    /// Estimation-zone throughput on cold caches (Llama-3-8B head shape at 128K: 8192 clusters,
    /// 23% of them estimated): `cargo test --release -p retrowave-cpu --lib
    /// wave::estimate_bench -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark, not a check"]
    fn estimate_cold() {
        let (group, hd, clusters, e, heads, layers) =
            (4usize, 128usize, 8192usize, 1900usize, 8, 6);
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // One allocation for every head's means, 64-byte aligned as the process's allocator
        // (mimalloc) places large blocks; the test harness's allocator would put them 16 bytes
        // into a page, so that every mean spans one cache line more.
        let total = heads * layers * clusters * hd;
        let big: Vec<i8> = (0..total + 64).map(|_| (rnd() >> 56) as i8).collect();
        let off = big.as_ptr().align_offset(64);
        let means: Vec<&[i8]> = big[off..off + total].chunks(clusters * hd).collect();
        let scales = vec![0.01f32; clusters];
        let picks: Vec<Vec<u32>> = (0..heads * layers)
            .map(|_| {
                let mut ids: Vec<u32> = (0..clusters as u32).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, (rnd() % (i as u64 + 1)) as usize);
                }
                let mut ids = ids[..e].to_vec();
                ids.sort_unstable();
                ids
            })
            .collect();
        let logits: Vec<f32> = (0..group * e)
            .map(|i| ((i * 37) % 101) as f32 * 0.03)
            .collect();
        let reps = 40;
        let mut best = f64::INFINITY;
        for _trial in 0..7 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for l in 0..layers {
                    for h in 0..heads {
                        let u = l * heads + h;
                        let m = MeanCodes {
                            codes: means[u],
                            scales: &scales,
                        };
                        let mut st = GroupState::new(group, hd);
                        estimate(&mut st, &logits, m, &picks[u]);
                        std::hint::black_box(&st);
                    }
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / (reps * layers * heads) as f64);
        }
        let dt = best;
        println!(
            "estimate: {:.1} us per head ({e} means, {:.2} GB/s)",
            dt * 1e6,
            (e * hd) as f64 / dt / 1e9
        );
    }
}
