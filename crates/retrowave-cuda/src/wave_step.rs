//! Wave attention inside the CUDA backend's decode step.
//!
//! After prefill, [`CudaBackend::build_wave`] clusters every (layer, KV head) of a sequence on the
//! GPU ([`crate::wave_build`]) into a [`DevWave`] kept beside the sequence's [`DevKv`]. A decode
//! step whose caches have an index then runs, per layer, instead of dense flash-decoding:
//! cluster scoring and zone selection ([`CudaBackend::wave_select_dev`]), the estimation zone
//! ([`CudaBackend::wave_estimate`]), the exact part's token lists ([`CudaBackend::wave_tokens`]:
//! the steady zone and the members of the retrieval clusters) and flash-decoding over those lists
//! merged with the estimate ([`CudaBackend::wave_exact_attention`]).
//!
//! In this first version the exact KV stays where the dense cache keeps it, in GPU memory, in
//! position order: the retrieval clusters are read through their member lists (every cluster
//! "hits"). The tiered store and the GPU block cache (KV off the GPU) come next; the kernels
//! already read through lists of positions, which is the seam.
//!
//! The per-step units (one per layer, decode row and KV head) are built on the host and uploaded
//! only when they change: at index builds and when the batch changes, not from step to step
//! (each sequence's length is read from the step's tables). A signature per decode row, checked
//! at every layer, tells; captured decode steps replay the units from a fixed address.

use std::time::Instant;

use cudarc::driver::{CudaSlice, DeviceRepr, sys};
use half::bf16;
use retrowave_core::WaveConfig;

use crate::CudaError;
use crate::backend::{CudaBackend, DevKv, StepTables, dp};
use crate::wave::WaveUnit;
use crate::wave_build::{BuildSegment, BuildUnit};

/// The wave index of one sequence on the GPU: every (layer, KV head) unit clustered alike.
pub struct DevWave {
    /// Clusters per unit (the same for every unit; 0 for a prefill too short to index).
    pub n_clusters: usize,
    /// Clusters of the prefill build (the budgets' shares apply to these; updates append more).
    pub base_clusters: usize,
    /// Tokens of the prefill build (with `base_clusters`, the mean cluster size that converts
    /// the token floor of the retrieval budget to clusters).
    pub base_tokens: usize,
    /// Units: layers x KV heads, unit `l * n_kv + h`.
    pub n_units: usize,
    /// `bf16 [units][n_clusters][hd]`: mean keys.
    pub centroids: CudaSlice<bf16>,
    /// `f32 [units][n_clusters]`: `ln |C_i|` (`-inf` for empty clusters).
    pub ln_sizes: CudaSlice<f32>,
    /// `bf16 [units][n_clusters][hd]`: mean values.
    pub means: CudaSlice<bf16>,
    /// `i32 [units][n_clusters + 1]`: CSR offsets into `members`.
    pub offsets: CudaSlice<i32>,
    /// `i32 [units][indexed tokens]`: token positions, cluster after cluster.
    pub members: CudaSlice<i32>,
    /// Steady zone: the first `sink` tokens and everything from `indexed_end` on.
    pub sink: usize,
    pub indexed_end: usize,
    /// Largest cluster of any unit (bounds the exact part's token lists).
    pub max_cluster_size: usize,
    /// Index updates made so far (they grow the budgets).
    pub updates: usize,
    pub cfg: WaveConfig,
    /// Wall time of the build.
    pub build_seconds: f64,
    /// (layer, KV head) attentions run through the index.
    pub head_steps: u64,
    /// Context tokens those attentions covered (what dense attention would have read).
    pub context_tokens: u64,
    /// The indexed tokens' K and V in host memory with the GPU's wave buffers in front
    /// ([`WaveConfig::host_kv`]; see [`crate::wave_tier`]).
    pub tier: Option<crate::wave_tier::DevTier>,
}

impl DevWave {
    /// Tokens covered by the index (per unit).
    pub fn indexed_tokens(&self) -> usize {
        self.indexed_end.saturating_sub(self.sink)
    }

    /// The budgets a step asks for, as `WaveConfig::step_budgets` computes them on the CPU:
    /// retrieval clusters (the configured share, at least `WaveConfig::min_retrieval`), estimation
    /// clusters, and for the adaptive budget the most retrieval clusters it may grow to and the
    /// share of the scores it must cover (0: fixed). All within the clusters there are.
    pub fn budgets(&self) -> StepBudgets {
        StepBudgets::of(
            &self.cfg,
            self.base_clusters,
            self.base_tokens,
            self.updates,
            self.n_clusters,
        )
    }

    /// Most retrieval-zone tokens a step can gather for one unit.
    fn retrieval_bound(&self) -> usize {
        (self.budgets().retrieval_cap * self.max_cluster_size).min(self.indexed_tokens())
    }
}

/// What the build of an index over `n` tokens clusters, as the CPU's `ClusterIndex::build`: the
/// first `sink_tokens` and the last `window_tokens` stay in the steady zone, the rest is cut into
/// segments of `segment_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildPlan {
    /// Start of the indexed range (the sink's end).
    pub sink: usize,
    /// End of the indexed range.
    pub end: usize,
    pub segments: Vec<BuildSegment>,
}

impl BuildPlan {
    pub fn of(cfg: &WaveConfig, n: usize) -> Self {
        let sink = cfg.sink_tokens.min(n);
        let end = n.saturating_sub(cfg.window_tokens).max(sink);
        let segments = retrowave_index::segments(sink..end, cfg)
            .into_iter()
            .map(|s| BuildSegment {
                start: s.tokens.start,
                end: s.tokens.end,
                clusters: s.clusters,
            })
            .collect();
        BuildPlan {
            sink,
            end,
            segments,
        }
    }

    /// Clusters of the build.
    pub fn clusters(&self) -> usize {
        self.segments.iter().map(|s| s.clusters).sum()
    }
}

/// The wave configs the GPU backend cannot run, as errors that say why.
pub(crate) fn check_gpu_config(cfg: &WaveConfig) -> Result<(), CudaError> {
    cfg.validate()
        .map_err(|e| CudaError::Unsupported(format!("wave config: {e}")))?;
    if cfg.host_kv && cfg.dense_layers > 0 {
        return Err(CudaError::Unsupported(
            "wave config: host_kv with dense_layers > 0 (dense layers read every token from GPU \
             memory)"
                .into(),
        ));
    }
    Ok(())
}

/// The budgets of a wave step for one sequence (see [`DevWave::budgets`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepBudgets {
    pub retrieval: usize,
    pub estimation: usize,
    /// Most retrieval clusters the adaptive budget may reach (`retrieval` when fixed).
    pub retrieval_cap: usize,
    /// Share of the scores the adaptive retrieval zone covers (0: fixed budget).
    pub retrieval_mass: f64,
}

impl StepBudgets {
    /// The budgets of an index of `k` clusters after `updates` updates under `cfg` (see
    /// [`DevWave::budgets`]): `base` of them from the prefill's `base_tokens` tokens, which the
    /// shares apply to.
    pub fn of(cfg: &WaveConfig, base: usize, base_tokens: usize, updates: usize, k: usize) -> Self {
        let fixed = cfg.fixed_step_budgets(base, base_tokens, updates);
        let retrieval = fixed.retrieval.min(k);
        let estimation = fixed.estimation.min(k - retrieval);
        // The CPU's cap, bounded by what the GPU's sort takes (never below the fixed budget).
        let (cap, mass) = match cfg.adaptive_cap(base, base_tokens, updates) {
            Some(cap) => (
                cap.min(crate::wave::SEL_TOP).max(retrieval).min(k),
                cfg.retrieval_mass,
            ),
            None => (retrieval, 0.0),
        };
        StepBudgets {
            retrieval,
            estimation,
            retrieval_cap: cap,
            retrieval_mass: mass,
        }
    }
}

/// The uploaded units of the current wave step and the shapes their kernels run with.
pub struct WaveStepUnits {
    /// What the units were built from, one entry per decode row, and the model's shape
    /// (layers, KV heads, head dim).
    sig: Vec<RowSig>,
    shape: (usize, usize, usize),
    dev: CudaSlice<WaveUnit>,
    /// Units per layer (decode rows x KV heads).
    pub per_layer: usize,
    pub max_clusters: usize,
    pub max_ids: usize,
    pub list_cap: usize,
    /// Whether some unit reads through a host tier (the step copies its misses in).
    pub tiers: bool,
    /// Whether some unit uses the union ranking (the selection sizes its scratch for it).
    pub union: bool,
}

impl WaveStepUnits {
    /// Device address of `layer`'s units.
    pub fn layer_ptr(&self, layer: usize) -> sys::CUdeviceptr {
        dp(&self.dev) + (layer * self.per_layer * std::mem::size_of::<WaveUnit>()) as u64
    }

    /// What a captured step depends on: the units' address and the kernels' shapes.
    pub fn graph_key(&self) -> (u64, usize, usize, usize) {
        (
            dp(&self.dev),
            self.max_clusters,
            self.max_ids,
            self.list_cap,
        )
    }
}

/// The host side of a step's tables that the wave units are built from.
pub struct HostStep<'a> {
    pub descs: &'a [crate::backend::SeqDesc],
    pub row_seq: &'a [i32],
    pub decode_rows: &'a [i32],
}

impl<'a> HostStep<'a> {
    pub fn of(t: &'a StepTables) -> Self {
        Self {
            descs: &t.descs,
            row_seq: &t.row_seq,
            decode_rows: &t.decode_rows,
        }
    }
}

/// Everything the units of one decode row depend on (see `wave_step_shape`).
#[derive(Debug, Clone, PartialEq)]
struct RowSig {
    row: i32,
    index: Option<IndexSig>,
}

/// The index side of a [`RowSig`]: its arrays' addresses, shape and budgets.
#[derive(Debug, Clone, PartialEq)]
struct IndexSig {
    /// centroids, ln sizes, means, offsets, members, host tier table (0: none).
    arrays: [u64; 6],
    n_clusters: usize,
    sink: usize,
    indexed_end: usize,
    dense_layers: usize,
    rank_by_size: bool,
    union_ranking: bool,
    budgets: StepBudgets,
}

/// Rounds the token-list capacity up so that it changes rarely (a new capacity is a new graph).
const LIST_CAP_STEP: usize = 1024;

impl CudaBackend {
    /// Builds the wave index of `kv` (all its cached tokens) on the GPU, as the CPU index does:
    /// the first `sink_tokens` and the last `window_tokens` stay in the steady zone, the rest is
    /// clustered in segments of `segment_tokens`.
    pub fn build_wave(&self, kv: &DevKv, cfg: &WaveConfig) -> Result<DevWave, CudaError> {
        check_gpu_config(cfg)?;
        let t0 = Instant::now();
        let BuildPlan {
            sink: start,
            end,
            segments: segs,
        } = BuildPlan::of(cfg, kv.len);
        let (hd, n_kv) = (kv.head_dim, kv.n_kv);
        let n_units = kv.n_layers * n_kv;
        let elem = std::mem::size_of::<bf16>() as u64;
        let units: Vec<BuildUnit> = (0..n_units)
            .map(|u| {
                let off = (u * kv.cap * hd) as u64 * elem;
                BuildUnit {
                    keys: dp(&kv.k) + off,
                    values: dp(&kv.v) + off,
                }
            })
            .collect();
        if segs.is_empty() {
            return Ok(DevWave {
                n_clusters: 0,
                base_clusters: 0,
                base_tokens: 0,
                n_units,
                centroids: self.alloc(1)?,
                ln_sizes: self.alloc(1)?,
                means: self.alloc(1)?,
                offsets: self.upload(&vec![0i32; n_units])?,
                members: self.alloc(1)?,
                sink: start,
                indexed_end: start,
                max_cluster_size: 0,
                updates: 0,
                cfg: cfg.clone(),
                build_seconds: t0.elapsed().as_secs_f64(),
                head_steps: 0,
                context_tokens: 0,
                tier: None,
            });
        }
        let c = self.wave_build(&units, &segs, cfg.kmeans_iterations, hd)?;
        let tier = if cfg.host_kv {
            let b = StepBudgets::of(cfg, c.n_clusters, end - start, 0, c.n_clusters);
            Some(self.build_tier(&units, &c, cfg, b.retrieval)?)
        } else {
            None
        };
        let sizes = self.download(&c.sizes, c.sizes.len())?;
        let max_cluster_size = sizes.iter().copied().max().unwrap_or(0).max(0) as usize;
        self.synchronize()?;
        Ok(DevWave {
            n_clusters: c.n_clusters,
            base_clusters: c.n_clusters,
            base_tokens: end - start,
            n_units,
            centroids: c.centroids,
            ln_sizes: c.ln_sizes,
            means: c.means,
            offsets: c.offsets,
            members: c.members,
            sink: start,
            indexed_end: end,
            max_cluster_size,
            updates: 0,
            cfg: cfg.clone(),
            build_seconds: t0.elapsed().as_secs_f64(),
            head_steps: 0,
            context_tokens: 0,
            tier,
        })
    }

    /// The tokens an index update must cluster before a decode step that leaves `n_after`
    /// tokens cached, as `ClusterIndex::pending_update` decides on the CPU: none until
    /// `window_tokens + update_interval` tokens follow the indexed range, then all of them but
    /// the last `window_tokens`.
    pub fn update_range(w: &DevWave, n_after: usize) -> Option<std::ops::Range<usize>> {
        w.cfg.pending_update(w.indexed_end, n_after)
    }

    /// Runs the index updates due before the decode step `batch` (for every layer and head of a
    /// sequence at once). Called before the step's tables and units are made, outside any
    /// graph capture: the updated index is a new signature, so the next step captures a new
    /// graph and replays it until the next update.
    pub fn wave_updates(
        &self,
        caches: &mut [&mut DevKv],
        batch: &retrowave_core::BatchLayout,
    ) -> Result<(), CudaError> {
        for (s, kv) in batch.seqs.iter().zip(caches.iter_mut()) {
            if s.n_tokens != 1 {
                continue;
            }
            let range = kv
                .wave
                .as_deref()
                .and_then(|w| Self::update_range(w, s.start_pos + 1));
            if let Some(range) = range {
                self.update_wave(kv, range)?;
            }
        }
        Ok(())
    }

    /// Clusters `range` (which starts at the end of the indexed range) of every unit as one
    /// segment of `clusters_per_update` clusters (fewer for fewer tokens) and appends them, as
    /// `ClusterIndex::append_segment` does on the CPU. The tokens stay in the GPU cache (with a
    /// host tier they are read from there, outside the wave buffers).
    fn update_wave(&self, kv: &mut DevKv, range: std::ops::Range<usize>) -> Result<(), CudaError> {
        let (cap, hd, units, shift) = (kv.cap, kv.head_dim, kv.n_layers * kv.n_kv, kv.hole.1);
        let Some(w) = kv.wave.as_deref_mut() else {
            return Ok(());
        };
        let clusters = w.cfg.clusters_per_update.clamp(1, range.len());
        let row = hd * 2;
        // Position p of a unit is at slot p - shift (past the host tier's hole).
        let units_b: Vec<BuildUnit> = (0..units)
            .map(|u| {
                let base = ((u * cap) as u64).wrapping_sub(shift as u64) * row as u64;
                BuildUnit {
                    keys: dp(&kv.k).wrapping_add(base),
                    values: dp(&kv.v).wrapping_add(base),
                }
            })
            .collect();
        let seg = BuildSegment {
            start: range.start,
            end: range.end,
            clusters,
        };
        let c = self.wave_build(&units_b, &[seg], w.cfg.kmeans_iterations, hd)?;
        let (k0, it0) = (w.n_clusters, w.indexed_tokens());
        let (k1, n_new) = (k0 + clusters, range.len());
        // Old and new rows side by side, per unit: `old_n` then `new_n` elements a unit.
        let centroids = join_rows::<bf16>(
            self,
            units,
            dp(&w.centroids),
            dp(&c.centroids),
            k0 * hd,
            clusters * hd,
        )?;
        let means = join_rows::<bf16>(
            self,
            units,
            dp(&w.means),
            dp(&c.means),
            k0 * hd,
            clusters * hd,
        )?;
        let ln_sizes =
            join_rows::<f32>(self, units, dp(&w.ln_sizes), dp(&c.ln_sizes), k0, clusters)?;
        let members = join_rows::<i32>(self, units, dp(&w.members), dp(&c.members), it0, n_new)?;
        // The new clusters' offsets continue after the old members.
        let new_offs = self.download(&c.offsets, units * (clusters + 1))?;
        let shifted: Vec<i32> = new_offs
            .chunks_exact(clusters + 1)
            .flat_map(|o| o[1..].iter().map(|&x| x + it0 as i32))
            .collect();
        let tail = self.upload(&shifted)?;
        let offsets = join_rows::<i32>(self, units, dp(&w.offsets), dp(&tail), k0 + 1, clusters)?;
        let sizes = self.download(&c.sizes, c.sizes.len())?;
        let biggest = sizes.iter().copied().max().unwrap_or(0).max(0) as usize;
        w.centroids = centroids;
        w.means = means;
        w.ln_sizes = ln_sizes;
        w.members = members;
        w.offsets = offsets;
        w.n_clusters = k1;
        w.indexed_end = range.end;
        w.max_cluster_size = w.max_cluster_size.max(biggest);
        w.updates += 1;
        self.synchronize()
    }

    /// A device copy of an index (forked sequences get their own, so that no two sequences of a
    /// batch share index memory).
    pub fn clone_wave(&self, w: &DevWave) -> Result<DevWave, CudaError> {
        let tier = match w.tier.as_ref() {
            Some(t) => Some(self.clone_tier(t, w.n_clusters)?),
            None => None,
        };
        Ok(DevWave {
            tier,
            centroids: self.dup(&w.centroids)?,
            ln_sizes: self.dup(&w.ln_sizes)?,
            means: self.dup(&w.means)?,
            offsets: self.dup(&w.offsets)?,
            members: self.dup(&w.members)?,
            cfg: w.cfg.clone(),
            ..*w
        })
    }

    fn dup<T: DeviceRepr>(&self, s: &CudaSlice<T>) -> Result<CudaSlice<T>, CudaError> {
        let mut d = self.alloc::<T>(s.len())?;
        self.stream()
            .memcpy_dtod(s, &mut d)
            .map_err(CudaError::driver("cuMemcpyDtoDAsync(wave index)"))?;
        Ok(d)
    }

    /// What a step's units depend on, one entry per decode row (cheap to compute and compare
    /// at every layer), and the shapes of the step's kernels: the largest index, the most
    /// selected clusters, and the token-list capacity (which also follows the rows' lengths).
    fn wave_step_shape(
        tab: &HostStep<'_>,
        caches: &[&DevKv],
    ) -> (Vec<RowSig>, usize, usize, usize) {
        let (mut max_clusters, mut max_ids, mut list_cap) = (0usize, 0usize, 0usize);
        let sig = tab
            .decode_rows
            .iter()
            .map(|&row| {
                let si = tab.row_seq.get(row as usize).copied().unwrap_or(0) as usize;
                let n_tokens = tab
                    .descs
                    .get(si)
                    .map_or(0, |d| (d.start_pos + (row - d.row) + 1).max(0) as usize);
                let Some(w) = caches.get(si).and_then(|kv| kv.wave.as_deref()) else {
                    list_cap = list_cap.max(n_tokens);
                    return RowSig { row, index: None };
                };
                let budgets = w.budgets();
                max_clusters = max_clusters.max(w.n_clusters);
                max_ids = max_ids.max(budgets.retrieval_cap + budgets.estimation);
                let steady = w.sink + n_tokens.saturating_sub(w.indexed_end);
                list_cap = list_cap.max(steady + w.retrieval_bound());
                if w.cfg.dense_layers > 0 {
                    list_cap = list_cap.max(n_tokens);
                }
                RowSig {
                    row,
                    index: Some(IndexSig {
                        arrays: [
                            dp(&w.centroids),
                            dp(&w.ln_sizes),
                            dp(&w.means),
                            dp(&w.offsets),
                            dp(&w.members),
                            w.tier.as_ref().map_or(0, |t| dp(&t.table)),
                        ],
                        n_clusters: w.n_clusters,
                        sink: w.sink,
                        indexed_end: w.indexed_end,
                        dense_layers: w.cfg.dense_layers,
                        rank_by_size: w.cfg.rank_by_size,
                        union_ranking: w.cfg.union_ranking,
                        budgets,
                    }),
                }
            })
            .collect();
        let list_cap = (list_cap + 1).next_multiple_of(LIST_CAP_STEP);
        (sig, max_clusters, max_ids.max(1), list_cap)
    }

    /// The units of a wave step, layer-major (`[layers][decode rows][n_kv]`, decode rows in the
    /// order of the step), from the rows' signatures. Rows without an index (and an index's
    /// dense layers) attend to all their tokens through the same path (an empty index:
    /// everything is steady zone).
    fn wave_units_host(sig: &[RowSig], n_layers: usize, n_kv: usize, hd: usize) -> Vec<WaveUnit> {
        let rows = sig.len();
        let mut units = vec![WaveUnit::default(); n_layers * rows * n_kv];
        for (i, r) in sig.iter().enumerate() {
            for l in 0..n_layers {
                for h in 0..n_kv {
                    let slot = &mut units[(l * rows + i) * n_kv + h];
                    slot.q_row = r.row;
                    let Some(x) = r.index.as_ref().filter(|x| l >= x.dense_layers) else {
                        continue;
                    };
                    let (u, k) = (l * n_kv + h, x.n_clusters);
                    let it = x.indexed_end.saturating_sub(x.sink);
                    let [cent, lns, means, offs, mem, tier] = x.arrays;
                    *slot = WaveUnit {
                        centroids: cent + (u * k * hd * 2) as u64,
                        ln_sizes: lns + (u * k * 4) as u64,
                        means: means + (u * k * hd * 2) as u64,
                        n_clusters: k as i32,
                        q_row: r.row,
                        retrieval: x.budgets.retrieval as i32,
                        estimation: x.budgets.estimation as i32,
                        offsets: offs + (u * (k + 1) * 4) as u64,
                        members: mem + (u * it * 4) as u64,
                        sink: x.sink as i32,
                        indexed_end: x.indexed_end as i32,
                        retrieval_cap: x.budgets.retrieval_cap as i32,
                        retrieval_mass: x.budgets.retrieval_mass as f32,
                        rank_by_size: i32::from(x.rank_by_size),
                        union_ranking: i32::from(x.union_ranking),
                        tier: if tier == 0 {
                            0
                        } else {
                            tier + (u * std::mem::size_of::<crate::wave_tier::WaveTier>()) as u64
                        },
                    };
                }
            }
        }
        units
    }

    /// The wave units of this step on the device, uploaded only when the rows' signatures or the
    /// list capacity changed (at index builds, batch changes, and every `LIST_CAP_STEP` tokens),
    /// so every layer of a step and the steps that follow reuse them: the steady zone's length
    /// comes from the step's tables.
    pub fn wave_step_units(
        &self,
        t: &HostStep<'_>,
        caches: &[&DevKv],
    ) -> Result<std::sync::Arc<WaveStepUnits>, CudaError> {
        let mut slot = self.wave_units_slot()?;
        let (sig, max_clusters, max_ids, list_cap) = Self::wave_step_shape(t, caches);
        let shape = caches
            .first()
            .map_or((1, 1, 128), |c| (c.n_layers, c.n_kv, c.head_dim));
        // The shape too: a new cache may reuse a freed one's addresses with another model's.
        if let Some(s) = slot.as_ref()
            && s.sig == sig
            && s.shape == shape
            && s.list_cap == list_cap
        {
            return Ok(s.clone());
        }
        let (n_layers, n_kv, hd) = shape;
        let tiers = sig
            .iter()
            .any(|r| r.index.as_ref().is_some_and(|x| x.arrays[5] != 0));
        let union = sig
            .iter()
            .any(|r| r.index.as_ref().is_some_and(|x| x.union_ranking));
        for x in sig
            .iter()
            .filter_map(|r| r.index.as_ref())
            .filter(|x| x.union_ranking)
        {
            crate::wave::check_union_budget(x.budgets.retrieval, x.n_clusters)?;
        }
        let host = Self::wave_units_host(&sig, n_layers, n_kv, hd);
        let dev = self.upload(&host)?;
        let s = std::sync::Arc::new(WaveStepUnits {
            sig,
            shape,
            dev,
            per_layer: t.decode_rows.len() * n_kv,
            max_clusters,
            max_ids,
            list_cap,
            tiers,
            union,
        });
        *slot = Some(s.clone());
        Ok(s)
    }

    /// One layer of a wave decode step over the decode rows of `t`: scoring and zones,
    /// estimation, token lists, exact attention merged with the estimate, into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn wave_decode_layer(
        &self,
        t: &StepTables,
        ws: &WaveStepUnits,
        layer: usize,
        q: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
    ) -> Result<(), CudaError> {
        let sel = self.wave_select_dev(
            ws.layer_ptr(layer),
            ws.per_layer,
            ws.max_clusters,
            q,
            n_heads,
            n_kv,
            hd,
            ws.max_ids,
            ws.union,
        )?;
        // The token lists (and the tiers' cache policy) on the side stream, beside the
        // estimation: both read only the selection, and each alone leaves most of the GPU idle.
        let toks = self.wave_tokens_on(t, &sel, ws.list_cap, true)?;
        let est = self.wave_estimate(&sel)?;
        self.join_side()?;
        if ws.tiers {
            self.wave_cache_fill(ws.layer_ptr(layer), ws.per_layer, hd)?;
        }
        self.wave_exact_attention(t, layer, q, out, &toks, &est, n_heads, n_kv, hd)
    }
}

/// A new device array of `units` rows, each a row of `old` (`old_n` elements, rows `old_n`
/// apart) followed by the same unit's row of `new` (`new_n` elements): an index's per-unit arrays
/// after an update appended clusters.
fn join_rows<T: cudarc::driver::DeviceRepr>(
    b: &CudaBackend,
    units: usize,
    old: u64,
    new: u64,
    old_n: usize,
    new_n: usize,
) -> Result<CudaSlice<T>, CudaError> {
    let sz = std::mem::size_of::<T>();
    let (ow, nw) = (old_n * sz, new_n * sz);
    let dst = b.alloc::<T>(units * (old_n + new_n))?;
    b.copy_rows(old, ow, dp(&dst), ow + nw, ow, units)?;
    b.copy_rows(new, nw, dp(&dst) + ow as u64, ow + nw, nw, units)?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_budgets_follow_the_config() {
        let cfg = WaveConfig::retrowave();
        // 128K tokens: 1.8% of 8188 clusters, growing up to 2.5%.
        let b = StepBudgets::of(&cfg, 8188, 8188 * 16, 0, 8188);
        assert_eq!(
            (b.retrieval, b.estimation, b.retrieval_cap),
            (148, 1900, 205)
        );
        assert!((b.retrieval_mass - 0.9).abs() < 1e-12);
        // 32K: the 2048-token minimum (128 clusters) is above the 2.5% cap, so nothing grows.
        let b = StepBudgets::of(&cfg, 2044, 2044 * 16, 0, 2044);
        assert_eq!((b.retrieval, b.retrieval_cap), (128, 128));
        // 4K: clusters of 4 tokens, so 2048 tokens are 512 of them; the 8192-token estimation
        // floor takes all the others.
        let b = StepBudgets::of(&cfg, 1024, 4096, 0, 1024);
        assert_eq!(
            (b.retrieval, b.estimation, b.retrieval_cap),
            (512, 512, 512)
        );
        // Fewer clusters than the minimum: everything, nothing left to estimate.
        let b = StepBudgets::of(&cfg, 40, 640, 0, 40);
        assert_eq!((b.retrieval, b.estimation, b.retrieval_cap), (40, 0, 40));
        // The GPU's sort bounds the adaptive cap (3.2M tokens: 1.8% is 3600, 2.5% would be 5000).
        let b = StepBudgets::of(&cfg, 200_000, 3_200_000, 0, 200_000);
        assert_eq!((b.retrieval, b.retrieval_cap), (3600, crate::wave::SEL_TOP));
        // Fixed budgets (the published config) never grow.
        let b = StepBudgets::of(&WaveConfig::published(), 8188, 8188 * 16, 0, 8188);
        assert_eq!(
            (b.retrieval, b.retrieval_cap, b.retrieval_mass),
            (148, 148, 0.0)
        );
        // Updates grow both budgets.
        let b = StepBudgets::of(&cfg, 8188, 8188 * 16, 2, 8188 + 2 * 64);
        assert_eq!((b.retrieval, b.estimation), (150, 1930));
    }
}
