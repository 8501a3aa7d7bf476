//! Wave attention on the GPU, first step: cluster scoring for GQA groups and the split of the
//! clusters into the retrieval and estimation zones (`kernels/wave.cu`), batched over units (one
//! unit = one decode row and one KV head, each with its own index in device memory).

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, sys};

use crate::CudaError;
use crate::backend::{CudaBackend, StepTables, dp, ptr_of};

/// One (decode row, KV head) of a wave step, as the kernels read it (`WaveUnit` in
/// `kernels/wave.cu`). Units are ordered row-major: unit `u` serves KV head `u % n_kv`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct WaveUnit {
    /// `bf16 [n_clusters][head_dim]` centroids.
    pub centroids: u64,
    /// `f32 [n_clusters]`: `ln |C_i|`, `-inf` for empty clusters (never chosen).
    pub ln_sizes: u64,
    /// `bf16 [n_clusters][head_dim]` mean values (`value_sum / |C_i|`) for the estimation zone.
    pub means: u64,
    pub n_clusters: i32,
    /// Activation row of the unit's query.
    pub q_row: i32,
    /// Clusters wanted in the retrieval zone.
    pub retrieval: i32,
    /// Clusters wanted in the estimation zone.
    pub estimation: i32,
    /// `i32 [n_clusters + 1]`: CSR offsets of the clusters' members (for [`CudaBackend::wave_tokens`]).
    pub offsets: u64,
    /// `i32`: the members (token positions), cluster after cluster.
    pub members: u64,
    /// Steady zone: positions `[0, sink)` and `[indexed_end, n)`, `n` the tokens cached for the
    /// unit's sequence (this step's included, read from the step's sequence table).
    pub sink: i32,
    /// See `sink`.
    pub indexed_end: i32,
    /// Adaptive retrieval: the zone grows from `retrieval` clusters (up to this many) until it
    /// covers `retrieval_mass` of the live scores' total, as `WaveConfig::step_budgets` does on
    /// the CPU; `retrieval_mass` 0 keeps the fixed budget.
    pub retrieval_cap: i32,
    pub retrieval_mass: f32,
    /// 1: rank the clusters by the softmax of `scale * q . c_i + ln |C_i|` (their estimated
    /// attention mass, `WaveConfig::rank_by_size`); 0: of `scale * q . c_i` alone. The logits
    /// the selection leaves stay without `ln |C_i|`.
    pub rank_by_size: i32,
    /// 1: the retrieval zone is the union of each query head's own best clusters by its logit
    /// (`WaveConfig::union_ranking`, `retrowave_index::select::union_retrieval`), the estimation
    /// zone the next by summed score; 0: both by summed score. The selection must be told
    /// (`union` of [`CudaBackend::wave_select_dev`], which then gives it scratch for each
    /// head's ranks), and the retrieval budget be at most [`SEL_TOP`] ([`check_union_budget`]).
    pub union_ranking: i32,
    /// `WaveTier*` of the unit when its indexed KV lives in host memory (see
    /// [`crate::wave_tier`]), or 0.
    pub tier: u64,
}

// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl DeviceRepr for WaveUnit {}

// The kernels' shapes, as `kernels/common.cuh` defines them (a test holds the two together).
/// Clusters per `wave_logits` CTA (`WAVE_CHUNK`).
const WAVE_CHUNK: usize = 256;
/// Largest GQA group the kernels take (`WAVE_MAX_G`).
pub const WAVE_MAX_G: usize = 16;
/// Dynamic shared memory of a `wave_logits` CTA: its chunk's centroids (bf16), their logits and
/// the scaled queries (f32) of a group of `group` heads.
pub(crate) fn wave_logits_smem(hd: usize, group: usize) -> usize {
    WAVE_CHUNK * hd * 2 + group * (WAVE_CHUNK + hd) * 4
}
/// Threads of a `wave_select` CTA (`SEL_THREADS`).
const SEL_THREADS: u32 = 1024;
/// Most clusters the adaptive retrieval budget may grow to on the GPU (`SEL_TOP`: the size of
/// the selection's sort of the best scores; 2.5% of the clusters of a 2.6M-token context).
pub const SEL_TOP: usize = 4096;
/// Threads of a `wave_estimate_partial` CTA (`EST_WARPS` warps).
const EST_THREADS: u32 = 128;
/// Dynamic shared memory `wave_select` may use for a unit's score keys (4 bytes a cluster: up to
/// 40960 clusters, 655K tokens of context at 16 a cluster; longer contexts keep them in global
/// memory).
pub const WAVE_SELECT_SMEM: usize = 160 * 1024;
/// Dynamic shared memory `wave_select` takes besides the keys when some unit has the union
/// ranking: the histograms of its heads' logits (`SEL_TOP` words).
pub const UNION_HIST_SMEM: usize = SEL_TOP * 4;

/// The union ranking's limit on the GPU: its fallback ranks each head's best `retrieval`
/// clusters in a sort of at most [`SEL_TOP`] keys.
pub(crate) fn check_union_budget(retrieval: usize, n_clusters: usize) -> Result<(), CudaError> {
    if retrieval > SEL_TOP {
        return Err(CudaError::Unsupported(format!(
            "the union ranking on the GPU takes retrieval budgets of at most {SEL_TOP} \
             clusters, got {retrieval} ({n_clusters} clusters)"
        )));
    }
    Ok(())
}

/// What [`CudaBackend::wave_select`] leaves on the device.
pub struct WaveSelection {
    /// `i32 [units][max_ids]`: each unit's retrieval clusters (ascending ids), then its
    /// estimation clusters (ascending ids).
    pub ids: CudaSlice<i32>,
    /// `i32 [units][2]`: retrieval and estimation counts.
    pub counts: CudaSlice<i32>,
    /// `f32 [units][max_clusters]`: each cluster's score (the group's summed softmax; `-inf` for
    /// empty clusters).
    pub scores: CudaSlice<f32>,
    /// `f32 [units][group][max_clusters]`: `scale * q_g . c_i` (`-inf` for empty clusters).
    pub logits: CudaSlice<f32>,
    pub max_clusters: usize,
    pub max_ids: usize,
    /// The units, on the device (owned by the selection when it uploaded them).
    pub units: sys::CUdeviceptr,
    _units: Option<CudaSlice<WaveUnit>>,
    pub n_units: usize,
    pub group: usize,
    pub head_dim: usize,
}

/// Estimation-zone clusters per `wave_estimate_partial` CTA (`EST_CHUNK`).
const EST_CHUNK: usize = 64;
/// Threads of a `wave_estimate_merge` CTA.
const MERGE_THREADS: u32 = 256;

/// What [`CudaBackend::wave_estimate`] leaves on the device.
pub struct WaveEstimate {
    /// `f32 [units][group][head_dim]`: each query head's estimate (normalised).
    pub out: CudaSlice<f32>,
    /// `f32 [units][group]`: its log-sum-exp (`-inf` where nothing was estimated), for the merge
    /// with the exact part.
    pub lse: CudaSlice<f32>,
}

impl CudaBackend {
    /// Scores every unit's clusters for its query heads and splits them into the zones (see
    /// `kernels/wave.cu`). `q` is the step's f32 query activation `[rows, n_heads * hd]`; at most
    /// `max_ids` clusters a unit are selected.
    pub fn wave_select(
        &self,
        units: &[WaveUnit],
        q: sys::CUdeviceptr,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        max_ids: usize,
    ) -> Result<WaveSelection, CudaError> {
        if units.is_empty() || n_kv == 0 || !units.len().is_multiple_of(n_kv) {
            return Err(CudaError::Unsupported(format!(
                "wave selection needs whole rows of {n_kv} units, got {}",
                units.len()
            )));
        }
        if let Some(u) = units
            .iter()
            .find(|u| u.n_clusters < 0 || u.retrieval < 0 || u.estimation < 0)
        {
            return Err(CudaError::Unsupported(format!(
                "wave unit with negative sizes: {u:?}"
            )));
        }
        let max_clusters = units
            .iter()
            .map(|u| u.n_clusters as usize)
            .max()
            .unwrap_or(0);
        let union = units.iter().any(|u| u.union_ranking != 0);
        for u in units.iter().filter(|u| u.union_ranking != 0) {
            check_union_budget(u.retrieval as usize, u.n_clusters as usize)?;
        }
        let d_units = self.upload(units)?;
        let mut sel = self.wave_select_dev(
            dp(&d_units),
            units.len(),
            max_clusters,
            q,
            n_heads,
            n_kv,
            hd,
            max_ids,
            union,
        )?;
        sel._units = Some(d_units);
        Ok(sel)
    }

    /// [`CudaBackend::wave_select`] over units already on the device (`n_units` of them at
    /// `units`, none with more than `max_clusters` clusters): what a decode step uses, with
    /// every layer's units uploaded once. `union`: some unit may use the union ranking (the
    /// selection then gets scratch for each query head's ranks).
    #[allow(clippy::too_many_arguments)]
    pub fn wave_select_dev(
        &self,
        units: sys::CUdeviceptr,
        n_units: usize,
        max_clusters: usize,
        q: sys::CUdeviceptr,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        max_ids: usize,
        union: bool,
    ) -> Result<WaveSelection, CudaError> {
        if n_kv == 0 || !n_heads.is_multiple_of(n_kv) || n_heads / n_kv > WAVE_MAX_G {
            return Err(CudaError::Unsupported(format!(
                "wave selection needs query heads a multiple of KV heads and groups of at most \
                 {WAVE_MAX_G} (got {n_heads} query / {n_kv} KV heads)"
            )));
        }
        let name = match hd {
            64 => "wave_logits_hd64",
            128 => "wave_logits_hd128",
            _ => {
                return Err(CudaError::Unsupported(format!(
                    "wave selection supports head_dim 64 and 128, not {hd}"
                )));
            }
        };
        let group = n_heads / n_kv;
        let max_clusters = max_clusters.max(1);
        let max_ids = max_ids.max(1);
        let n_chunks = max_clusters.div_ceil(WAVE_CHUNK);
        // The logits kernel leaves a softmax partial per warp of a chunk (32 clusters).
        let n_parts = n_chunks * (WAVE_CHUNK / 32);
        let logits = self.alloc::<f32>(n_units * group * max_clusters)?;
        let part_max = self.alloc::<f32>(n_units * group * n_parts)?;
        let part_sum = self.alloc::<f32>(n_units * group * n_parts)?;
        let scores = self.alloc::<f32>(n_units * max_clusters)?;
        let keys = self.alloc::<u32>(n_units * max_clusters)?;
        let ids = self.alloc::<i32>(n_units * max_ids)?;
        let counts = self.alloc::<i32>(n_units * 2)?;
        let (mut a_units, mut a_q) = (units, q);
        let (mut nh, mut nk, mut sc, mut mc) = (
            n_heads as i32,
            n_kv as i32,
            1.0f32 / (hd as f32).sqrt(),
            max_clusters as i32,
        );
        let (mut a_l, mut a_pm, mut a_ps) = (dp(&logits), dp(&part_max), dp(&part_sum));
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (n_chunks as u32, n_units as u32, 1),
                block_dim: (WAVE_CHUNK as u32, 1, 1),
                shared_mem_bytes: wave_logits_smem(hd, group) as u32,
            },
            &mut [
                ptr_of(&mut a_units),
                ptr_of(&mut a_q),
                ptr_of(&mut nh),
                ptr_of(&mut nk),
                ptr_of(&mut sc),
                ptr_of(&mut mc),
                ptr_of(&mut a_l),
                ptr_of(&mut a_pm),
                ptr_of(&mut a_ps),
            ],
        )?;
        let (mut nch, mut grp, mut mi) = (n_parts as i32, group as i32, max_ids as i32);
        // The union ranking's scratch: two rows of max_clusters words a unit (wave_select ranks
        // each query head's clusters itself).
        let ranks = if union {
            Some(self.alloc::<u32>(n_units * 2 * max_clusters)?)
        } else {
            None
        };
        // Dynamic shared memory: with the union ranking its histograms first; then the keys
        // when they fit (in_smem 1; with the union ranking the union keys beside them), and with
        // the union ranking also each head's bin of every cluster (u16) when that fits too
        // (in_smem 2).
        let keys_smem = max_clusters * 4 * if union { 2 } else { 1 };
        let bins_smem = if union { max_clusters * group * 2 } else { 0 };
        let mut in_smem: i32 = if union && keys_smem + bins_smem <= WAVE_SELECT_SMEM {
            2
        } else {
            i32::from(keys_smem <= WAVE_SELECT_SMEM)
        };
        let smem = if union { UNION_HIST_SMEM } else { 0 }
            + match in_smem {
                2 => keys_smem + bins_smem,
                1 => keys_smem,
                _ => 0,
            };
        let mut a_ranks = ranks.as_ref().map_or(0, dp);
        let (mut a_s, mut a_k, mut a_i, mut a_c) = (dp(&scores), dp(&keys), dp(&ids), dp(&counts));
        self.launch(
            "wave_select",
            LaunchConfig {
                grid_dim: (n_units as u32, 1, 1),
                block_dim: (SEL_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            },
            &mut [
                ptr_of(&mut a_units),
                ptr_of(&mut a_l),
                ptr_of(&mut a_pm),
                ptr_of(&mut a_ps),
                ptr_of(&mut nch),
                ptr_of(&mut grp),
                ptr_of(&mut mc),
                ptr_of(&mut a_s),
                ptr_of(&mut a_k),
                ptr_of(&mut in_smem),
                ptr_of(&mut a_ranks),
                ptr_of(&mut a_i),
                ptr_of(&mut mi),
                ptr_of(&mut a_c),
            ],
        )?;
        Ok(WaveSelection {
            ids,
            counts,
            scores,
            logits,
            max_clusters,
            max_ids,
            units,
            _units: None,
            n_units,
            group,
            head_dim: hd,
        })
    }

    /// The estimation zone of every unit of a selection: per query head, attention to `|C_i|`
    /// copies of each estimation cluster's centroid carrying its mean value, as an output and its
    /// log-sum-exp (see `kernels/wave.cu`).
    pub fn wave_estimate(&self, sel: &WaveSelection) -> Result<WaveEstimate, CudaError> {
        let (group, hd, n_units) = (sel.group, sel.head_dim, sel.n_units);
        let name = if hd == 64 {
            "wave_estimate_partial_hd64"
        } else {
            "wave_estimate_partial_hd128"
        };
        let n_chunks = sel.max_ids.div_ceil(EST_CHUNK).max(1);
        if n_chunks * 4 > 48 * 1024 {
            return Err(CudaError::Unsupported(format!(
                "wave estimation of up to {} clusters for groups of {group} heads needs more \
                 shared memory than one merge CTA has",
                sel.max_ids
            )));
        }
        let est_m = self.alloc::<f32>(n_units * n_chunks * group)?;
        let est_l = self.alloc::<f32>(n_units * n_chunks * group)?;
        let est_acc = self.alloc::<f32>(n_units * n_chunks * group * hd)?;
        let out = self.alloc::<f32>(n_units * group * hd)?;
        let lse = self.alloc::<f32>(n_units * group)?;
        let (mut a_u, mut a_l, mut a_i, mut a_c) =
            (sel.units, dp(&sel.logits), dp(&sel.ids), dp(&sel.counts));
        let (mut mi, mut mc, mut grp) = (sel.max_ids as i32, sel.max_clusters as i32, group as i32);
        let (mut a_m, mut a_s, mut a_a) = (dp(&est_m), dp(&est_l), dp(&est_acc));
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (n_chunks as u32, n_units as u32, 1),
                block_dim: (EST_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a_u),
                ptr_of(&mut a_l),
                ptr_of(&mut a_i),
                ptr_of(&mut a_c),
                ptr_of(&mut mi),
                ptr_of(&mut mc),
                ptr_of(&mut grp),
                ptr_of(&mut a_m),
                ptr_of(&mut a_s),
                ptr_of(&mut a_a),
            ],
        )?;
        let (mut nch, mut h) = (n_chunks as i32, hd as i32);
        let (mut a_o, mut a_lse) = (dp(&out), dp(&lse));
        self.launch(
            "wave_estimate_merge",
            LaunchConfig {
                grid_dim: (n_units as u32, group as u32, 1),
                block_dim: (MERGE_THREADS, 1, 1),
                shared_mem_bytes: (n_chunks * 4) as u32,
            },
            &mut [
                ptr_of(&mut a_m),
                ptr_of(&mut a_s),
                ptr_of(&mut a_a),
                ptr_of(&mut nch),
                ptr_of(&mut grp),
                ptr_of(&mut h),
                ptr_of(&mut a_o),
                ptr_of(&mut a_lse),
            ],
        )?;
        Ok(WaveEstimate { out, lse })
    }
}

/// CTAs per multiprocessor the exact part of a wave step aims at: 4, or `RETROWAVE_WAVE_EXACT_CTAS`
/// (1 to 16, read once; for measurements).
fn wave_exact_ctas_per_sm() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("RETROWAVE_WAVE_EXACT_CTAS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(4, |n| n.clamp(1, 16))
    })
}

/// What [`CudaBackend::wave_tokens`] leaves on the device.
pub struct WaveTokens {
    /// `i32 [units][list_cap]`: each unit's token positions (steady zone, then its retrieval
    /// clusters' members).
    pub list: CudaSlice<i32>,
    /// `i32 [units]`: the length of each list.
    pub count: CudaSlice<i32>,
    pub list_cap: usize,
    /// The units the lists were made for (the attention reads their host tiers).
    pub units: sys::CUdeviceptr,
}

impl CudaBackend {
    /// The token lists of the exact part of a wave step (see `wave_tokens` in `kernels/wave.cu`):
    /// the steady zone of each unit (positions below its `sink` and from its `indexed_end` to the
    /// sequence's length in `t`) and the members of its retrieval clusters from `sel`. A list
    /// longer than `list_cap` is cut and counted in the backend's overflow counter
    /// ([`CudaBackend::wave_overflows`]).
    pub fn wave_tokens(
        &self,
        t: &StepTables,
        sel: &WaveSelection,
        list_cap: usize,
    ) -> Result<WaveTokens, CudaError> {
        self.wave_tokens_on(t, sel, list_cap, false)
    }

    /// [`CudaBackend::wave_tokens`], on the side stream when `side`: its buffers are allocated
    /// on the main stream, which is then forked; the caller joins it (`join_side`) before
    /// anything reads the lists or the tiers' fill jobs.
    pub(crate) fn wave_tokens_on(
        &self,
        t: &StepTables,
        sel: &WaveSelection,
        list_cap: usize,
        side: bool,
    ) -> Result<WaveTokens, CudaError> {
        let list_cap = list_cap.max(1);
        let list = self.alloc::<i32>(sel.n_units * list_cap)?;
        let count = self.alloc::<i32>(sel.n_units)?;
        let (mut a_u, mut a_s, mut a_r, mut a_i, mut a_c) = (
            sel.units,
            t.descs_ptr(),
            t.row_seq_ptr(),
            dp(&sel.ids),
            dp(&sel.counts),
        );
        let (mut mi, mut a_l, mut a_n, mut lc, mut a_o) = (
            sel.max_ids as i32,
            dp(&list),
            dp(&count),
            list_cap as i32,
            self.wave_overflow_ptr()?,
        );
        let cfg = LaunchConfig {
            grid_dim: (sel.n_units as u32, 1, 1),
            block_dim: (SEL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args: &mut [*mut std::ffi::c_void] = &mut [
            ptr_of(&mut a_u),
            ptr_of(&mut a_s),
            ptr_of(&mut a_r),
            ptr_of(&mut a_i),
            ptr_of(&mut a_c),
            ptr_of(&mut mi),
            ptr_of(&mut a_l),
            ptr_of(&mut a_n),
            ptr_of(&mut lc),
            ptr_of(&mut a_o),
        ];
        if side {
            let stream = self.fork_side()?;
            self.launch_on(stream, "wave_tokens", cfg, args)?;
        } else {
            self.launch("wave_tokens", cfg, args)?;
        }
        Ok(WaveTokens {
            list,
            count,
            list_cap,
            units: sel.units,
        })
    }

    /// Splits a wave attention unit's token list may take: about one CTA per multiprocessor
    /// over the step's units.
    pub fn wave_splits(&self, n_units: usize, list_cap: usize) -> usize {
        let sms = self.info().multiprocessors.max(1) as usize;
        // Enough CTAs to keep every multiprocessor streaming (the lists are gathers of scattered
        // rows: latency-bound unless many are in flight), but splits of at least ~64-128 tokens of
        // a typical list (the capacity is a bound, up to twice a list's length).
        (wave_exact_ctas_per_sm() * sms)
            .div_ceil(n_units.max(1))
            .clamp(1, (list_cap / 128).max(1))
    }

    /// Exact attention of the step's decode rows over their units' token lists, merged by
    /// log-sum-exp with the estimation zone, into `out` (f32 `[rows, n_heads * hd]`). The units
    /// of the selection are the decode rows of `t` in order, each with its `n_kv` KV heads.
    #[allow(clippy::too_many_arguments)]
    pub fn wave_exact_attention(
        &self,
        t: &StepTables,
        layer: usize,
        q: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        toks: &WaveTokens,
        est: &WaveEstimate,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
    ) -> Result<(), CudaError> {
        let n_rows = t.decode_rows.len();
        if n_rows == 0 {
            return Ok(());
        }
        let splits = self.wave_splits(n_rows * n_kv, toks.list_cap);
        let o_part = self.alloc::<f32>(n_rows * n_heads * splits * hd)?;
        let lse_part = self.alloc::<f32>(n_rows * n_heads * splits)?;
        let name = if hd == 64 {
            "attn_wave_fused_hd64"
        } else {
            "attn_wave_fused_hd128"
        };
        let (mut a1, mut a2, mut a3, mut a4) =
            (q, t.descs_ptr(), t.row_seq_ptr(), t.decode_rows_ptr());
        let (mut l, mut n1, mut n2, mut ms, mut sc) = (
            layer as i32,
            n_heads as i32,
            n_kv as i32,
            splits as i32,
            1.0 / (hd as f32).sqrt(),
        );
        let (mut a5, mut a6, mut a7, mut a8) = (dp(&o_part), dp(&lse_part), out, t.counters_ptr());
        let (mut a9, mut a10, mut lc, mut a11, mut a12, mut a13) = (
            dp(&toks.list),
            dp(&toks.count),
            toks.list_cap as i32,
            dp(&est.out),
            dp(&est.lse),
            toks.units,
        );
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (n_kv as u32, n_rows as u32, splits as u32),
                block_dim: (crate::backend::DECODE_THREADS, 1, 1),
                shared_mem_bytes: crate::backend::decode_smem() as u32,
            },
            &mut [
                ptr_of(&mut a1),
                ptr_of(&mut a2),
                ptr_of(&mut a3),
                ptr_of(&mut a4),
                ptr_of(&mut l),
                ptr_of(&mut n1),
                ptr_of(&mut n2),
                ptr_of(&mut ms),
                ptr_of(&mut sc),
                ptr_of(&mut a5),
                ptr_of(&mut a6),
                ptr_of(&mut a7),
                ptr_of(&mut a8),
                ptr_of(&mut a9),
                ptr_of(&mut a10),
                ptr_of(&mut lc),
                ptr_of(&mut a11),
                ptr_of(&mut a12),
                ptr_of(&mut a13),
            ],
        )
    }
}

/// The reference split of one unit's clusters, from its scores: the non-empty clusters ranked by
/// score (descending, by [`f32::total_cmp`]) then id (ascending); the first `r` are the retrieval
/// zone, the next `e` the estimation zone, each returned in ascending id order. `live[c]` says
/// whether cluster `c` is non-empty.
pub fn reference_split(scores: &[f32], live: &[bool], r: usize, e: usize) -> (Vec<i32>, Vec<i32>) {
    let mut ranked: Vec<usize> = (0..scores.len()).filter(|&c| live[c]).collect();
    ranked.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let m = (r + e).min(ranked.len());
    let r = r.min(m);
    let mut ret: Vec<i32> = ranked[..r].iter().map(|&c| c as i32).collect();
    let mut est: Vec<i32> = ranked[r..m].iter().map(|&c| c as i32).collect();
    ret.sort_unstable();
    est.sort_unstable();
    (ret, est)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_split_ranks_by_score_then_id_and_skips_empty_clusters() {
        let scores = [0.5, 0.9, 0.5, f32::NEG_INFINITY, 0.1, 0.5, 0.7];
        let live = [true, true, true, false, true, true, true];
        // Ranked: 1 (0.9), 6 (0.7), 0, 2, 5 (0.5 ties by id), 4 (0.1).
        assert_eq!(
            reference_split(&scores, &live, 2, 2),
            (vec![1, 6], vec![0, 2])
        );
        assert_eq!(
            reference_split(&scores, &live, 3, 10),
            (vec![0, 1, 6], vec![2, 4, 5])
        );
        assert_eq!(reference_split(&scores, &live, 0, 1), (vec![], vec![1]));
    }

    #[test]
    fn shapes_are_the_kernels() {
        use crate::compile::header_define;
        assert_eq!(header_define("WAVE_CHUNK"), Some(WAVE_CHUNK as i64));
        assert_eq!(header_define("WAVE_MAX_G"), Some(WAVE_MAX_G as i64));
        assert_eq!(header_define("SEL_THREADS"), Some(i64::from(SEL_THREADS)));
        assert_eq!(header_define("SEL_TOP"), Some(SEL_TOP as i64));
        assert_eq!(header_define("EST_CHUNK"), Some(EST_CHUNK as i64));
        assert_eq!(
            header_define("EST_WARPS").map(|w| w * 32),
            Some(i64::from(EST_THREADS))
        );
    }

    #[test]
    fn wave_unit_has_the_kernel_layout() {
        // Six pointers and ten ints: 88 bytes, as `WaveUnit` in kernels/common.cuh.
        assert_eq!(std::mem::size_of::<WaveUnit>(), 88);
        assert_eq!(std::mem::offset_of!(WaveUnit, offsets), 40);
        assert_eq!(std::mem::offset_of!(WaveUnit, sink), 56);
        assert_eq!(std::mem::offset_of!(WaveUnit, rank_by_size), 72);
        assert_eq!(std::mem::offset_of!(WaveUnit, union_ranking), 76);
        assert_eq!(std::mem::offset_of!(WaveUnit, tier), 80);
    }
}
