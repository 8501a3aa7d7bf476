//! The host tier of a GPU wave index: the indexed tokens' K and V in pinned host memory, in
//! cluster order, with a GPU block cache (the wave buffer) in front of them.
//!
//! With [`WaveConfig::host_kv`], [`CudaBackend::build_wave`] writes every unit's indexed tokens
//! (cluster after cluster, as the index's member lists order them) to a pinned host arena, and
//! [`CudaBackend::move_to_host`] then drops them from the sequence's GPU cache: only the steady
//! zone stays there (the sink and everything from the index's end on; [`DevKv::hole`] tells the
//! kernels where positions moved). A 128K-token Llama-3-8B sequence keeps about 2 GiB in GPU
//! memory (index, wave buffer, steady zone) instead of 16.
//!
//! Each decode step, `wave_tokens` (kernels/wave.cu) runs the store's LRU policy
//! ([`retrowave_store::policy::WaveBufferPolicy`], the same rules, checked against it) over each
//! unit's retrieval clusters on the GPU: hits are read from the buffer, misses are admitted
//! (evicting the least recently used clusters not wanted this step) and copied in from the host
//! arena by `wave_cache_fill` (the kernel's own loads read the pinned memory over PCIe: one
//! launch for every miss of a layer, captured in the step's CUDA graph), and a miss that does not
//! fit is read straight from host memory by the attention kernel (a bypass, counted). No
//! cluster is skipped. The policy runs on the GPU rather than on CPU threads so that a step needs
//! no device-to-host round trip per layer and stays one CUDA graph.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, sys};
use half::bf16;
use retrowave_core::WaveConfig;

use crate::CudaError;
use crate::backend::{CudaBackend, DevKv, dp, ptr_of};
use crate::pinned::PinnedBuffer;
use crate::wave_build::{BuildUnit, GpuClustering};

/// One unit's tier as the kernels read it (`struct WaveTier` in kernels/common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveTier {
    pub host_k: u64,
    pub host_v: u64,
    pub cache_k: u64,
    pub cache_v: u64,
    pub stamp: u64,
    pub slot_owner: u64,
    pub slot_page: u64,
    pub free_list: u64,
    pub jobs: u64,
    pub state: u64,
    pub stats: u64,
    pub capacity: i32,
    pub page: i32,
    /// Clusters whose tokens are in the host arena (those of the build); clusters appended by
    /// index updates keep theirs in the GPU cache.
    pub host_clusters: i32,
}

// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl DeviceRepr for WaveTier {}

/// Counters per unit in `DevTier::stats` (u64): hit, admitted, bypassed, evicted, cold pages.
const STATS: usize = 8;

/// The host tier and wave buffers of one sequence (every layer and KV head).
pub struct DevTier {
    /// bf16 `[units][unit_tokens][hd]`: keys and values in cluster order.
    host_k: PinnedBuffer,
    host_v: PinnedBuffer,
    /// bf16 `[units][capacity * page][hd]`: the wave buffers.
    _cache_k: CudaSlice<bf16>,
    _cache_v: CudaSlice<bf16>,
    /// Policy state (see `struct WaveTier`); the stamps are also read by the checks.
    stamp: CudaSlice<u32>,
    _owner: CudaSlice<i32>,
    _page_of: CudaSlice<i32>,
    _free_list: CudaSlice<i32>,
    _jobs: CudaSlice<i32>,
    _state: CudaSlice<u32>,
    stats: CudaSlice<u64>,
    /// `[units]`: what `WaveUnit::tier` points at.
    pub table: CudaSlice<WaveTier>,
    pub n_units: usize,
    /// The arenas' bytes, charged to this rank's share of the node's host budget.
    _charge: crate::host_budget::HostCharge,
    /// Indexed tokens per unit (rows of the host arena).
    pub unit_tokens: usize,
    pub head_dim: usize,
    /// Page slots per unit and tokens per page.
    pub capacity: usize,
    pub page: usize,
}

/// What the wave buffers of a sequence served, summed over its units and steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounters {
    /// Pages of wanted clusters found in the buffer.
    pub hit_pages: u64,
    /// Pages copied in from the host arena (misses admitted).
    pub admitted_pages: u64,
    /// Pages read straight from the host arena (misses that did not fit).
    pub bypass_pages: u64,
    /// Pages evicted to make room.
    pub evicted_pages: u64,
    /// Misses of each unit's first step (a cold buffer).
    pub cold_pages: u64,
}

impl TierCounters {
    /// Pages that crossed PCIe.
    pub fn miss_pages(&self) -> u64 {
        self.admitted_pages + self.bypass_pages
    }

    /// Share of the wanted pages the buffers served after their first (cold) step.
    pub fn warm_hit_ratio(&self) -> Option<f64> {
        let warm = self.hit_pages + self.miss_pages() - self.cold_pages;
        (warm > 0).then(|| self.hit_pages as f64 / warm as f64)
    }
}

/// `count` elements of `T`, every byte `byte` (0: zeros, 0xFF: -1 for integers).
fn filled<T: DeviceRepr>(
    b: &CudaBackend,
    count: usize,
    byte: u8,
) -> Result<CudaSlice<T>, CudaError> {
    let s = b.alloc::<T>(count)?;
    // SAFETY: the whole allocation, on the backend's stream.
    unsafe {
        cudarc::driver::result::memset_d8_async(
            dp(&s),
            byte,
            count.max(1) * std::mem::size_of::<T>(),
            b.stream().cu_stream(),
        )
    }
    .map_err(CudaError::driver("cuMemsetD8Async"))?;
    Ok(s)
}

/// Page slots per unit and tokens per page of the wave buffers of an index of `n_clusters`
/// clusters over `it` tokens per unit with a step budget of `retrieval` clusters.
fn tier_shape(
    cfg: &WaveConfig,
    retrieval: usize,
    n_clusters: usize,
    it: usize,
) -> Result<(usize, usize), CudaError> {
    if retrieval > crate::wave::SEL_TOP {
        return Err(CudaError::Unsupported(format!(
            "host tier: a retrieval budget of {retrieval} clusters is above the {} the GPU's \
             wave buffer policy takes in one step",
            crate::wave::SEL_TOP
        )));
    }
    let page = cfg.page_size.max(1);
    let capacity = cfg.cache_pages(retrieval, n_clusters, it);
    if capacity >= (1 << 24) || it >= (1 << 29) {
        return Err(CudaError::Unsupported(format!(
            "host tier: {capacity} buffer pages or {it} indexed tokens per head are beyond the \
             token-list encoding"
        )));
    }
    Ok((capacity, page))
}

/// Copies the steady zone of `units` heads between two caches of `row`-byte tokens: the first
/// `sink` tokens, and `tail` tokens from slot `src_tail` of the source (`src_cap` slots a head) to
/// slot `dst_tail` of the destination (`dst_cap` slots a head).
#[allow(clippy::too_many_arguments)]
fn copy_steady(
    b: &CudaBackend,
    (src, src_cap, src_tail): (u64, usize, usize),
    (dst, dst_cap, dst_tail): (u64, usize, usize),
    sink: usize,
    tail: usize,
    units: usize,
    row: usize,
) -> Result<(), CudaError> {
    b.copy_rows(src, src_cap * row, dst, dst_cap * row, sink * row, units)?;
    b.copy_rows(
        src + (src_tail * row) as u64,
        src_cap * row,
        dst + (dst_tail * row) as u64,
        dst_cap * row,
        tail * row,
        units,
    )
}

impl CudaBackend {
    /// The host tier of an index just built from `units` (the sequence's full GPU cache):
    /// every unit's indexed tokens written to pinned host memory in cluster order, and empty
    /// wave buffers of [`WaveConfig::cache_pages`] slots per unit.
    pub(crate) fn build_tier(
        &self,
        units: &[BuildUnit],
        c: &GpuClustering,
        cfg: &WaveConfig,
        retrieval: usize,
    ) -> Result<DevTier, CudaError> {
        let (n_units, it, hd) = (c.n_units, c.n_tokens, c.head_dim);
        let (capacity, page) = tier_shape(cfg, retrieval, c.n_clusters, it)?;
        let (host_k, host_v, charge) = self.tier_arenas(n_units * it * hd * 2)?;
        let (hk, hv) = (
            host_k.as_slice().as_ptr() as u64,
            host_v.as_slice().as_ptr() as u64,
        );
        self.wave_gather_cluster_order(units, c, hk, hv, it * hd)?;
        self.tier_around(
            (host_k, host_v, charge),
            n_units,
            it,
            hd,
            c.n_clusters,
            capacity,
            page,
        )
    }

    /// Pinned K and V arenas of `bytes` each, charged first to this rank's share of the node's
    /// host budget (so that a tier that does not fit is refused before anything is pinned).
    fn tier_arenas(
        &self,
        bytes: usize,
    ) -> Result<(PinnedBuffer, PinnedBuffer, crate::host_budget::HostCharge), CudaError> {
        let (budget, rank) = self.host_budget();
        let charge = budget.reserve(rank, 2 * bytes as u64)?;
        let host_k = PinnedBuffer::new(self.context(), bytes)?;
        let host_v = PinnedBuffer::new(self.context(), bytes)?;
        Ok((host_k, host_v, charge))
    }

    /// A copy of `t` with the same host arena contents and empty wave buffers (a forked
    /// sequence starts cold).
    pub(crate) fn clone_tier(&self, t: &DevTier, n_clusters: usize) -> Result<DevTier, CudaError> {
        // The arena may still be being written by the build's gather.
        self.synchronize()?;
        let (mut host_k, mut host_v, charge) = self.tier_arenas(t.host_k.as_slice().len())?;
        parallel_copy(host_k.as_mut_slice(), t.host_k.as_slice());
        parallel_copy(host_v.as_mut_slice(), t.host_v.as_slice());
        self.tier_around(
            (host_k, host_v, charge),
            t.n_units,
            t.unit_tokens,
            t.head_dim,
            n_clusters,
            t.capacity,
            t.page,
        )
    }

    /// Empty wave buffers and policy state for units of `it` indexed tokens each in the host
    /// arenas `host_k` / `host_v`.
    #[allow(clippy::too_many_arguments)]
    fn tier_around(
        &self,
        (host_k, host_v, charge): (PinnedBuffer, PinnedBuffer, crate::host_budget::HostCharge),
        n_units: usize,
        it: usize,
        hd: usize,
        n_clusters: usize,
        capacity: usize,
        page: usize,
    ) -> Result<DevTier, CudaError> {
        let (hk, hv) = (
            host_k.as_slice().as_ptr() as u64,
            host_v.as_slice().as_ptr() as u64,
        );
        let rows = capacity * page;
        let cache_k = self.alloc::<bf16>(n_units * rows * hd)?;
        let cache_v = self.alloc::<bf16>(n_units * rows * hd)?;
        let stamp = filled::<u32>(self, n_units * n_clusters, 0)?;
        let owner = filled::<i32>(self, n_units * capacity, 0xFF)?;
        let page_of = filled::<i32>(self, n_units * capacity, 0)?;
        let free_list = self.alloc::<i32>(n_units * capacity)?;
        let jobs = self.alloc::<i32>(n_units * capacity * 3)?;
        let state = filled::<u32>(self, n_units * 4, 0)?;
        let stats = filled::<u64>(self, n_units * STATS, 0)?;
        let table: Vec<WaveTier> = (0..n_units)
            .map(|u| WaveTier {
                host_k: hk + (u * it * hd * 2) as u64,
                host_v: hv + (u * it * hd * 2) as u64,
                cache_k: dp(&cache_k) + (u * rows * hd * 2) as u64,
                cache_v: dp(&cache_v) + (u * rows * hd * 2) as u64,
                stamp: dp(&stamp) + (u * n_clusters * 4) as u64,
                slot_owner: dp(&owner) + (u * capacity * 4) as u64,
                slot_page: dp(&page_of) + (u * capacity * 4) as u64,
                free_list: dp(&free_list) + (u * capacity * 4) as u64,
                jobs: dp(&jobs) + (u * capacity * 12) as u64,
                state: dp(&state) + (u * 16) as u64,
                stats: dp(&stats) + (u * STATS * 8) as u64,
                capacity: capacity as i32,
                page: page as i32,
                host_clusters: n_clusters as i32,
            })
            .collect();
        let table = self.upload(&table)?;
        Ok(DevTier {
            host_k,
            host_v,
            _cache_k: cache_k,
            _cache_v: cache_v,
            stamp,
            _owner: owner,
            _page_of: page_of,
            _free_list: free_list,
            _jobs: jobs,
            _state: state,
            stats,
            table,
            n_units,
            _charge: charge,
            unit_tokens: it,
            head_dim: hd,
            capacity,
            page,
        })
    }

    /// The counters of `t`'s wave buffers, summed over its units (waits for the stream).
    pub fn tier_counters(&self, t: &DevTier) -> Result<TierCounters, CudaError> {
        let s = self.download(&t.stats, t.n_units * STATS)?;
        let mut c = TierCounters::default();
        for u in s.chunks_exact(STATS) {
            c.hit_pages += u[0];
            c.admitted_pages += u[1];
            c.bypass_pages += u[2];
            c.evicted_pages += u[3];
            c.cold_pages += u[4];
        }
        Ok(c)
    }

    /// Unit `u`'s cluster stamps (0: not in its wave buffer; waits for the stream).
    pub(crate) fn tier_stamps(
        &self,
        t: &DevTier,
        n_clusters: usize,
        u: usize,
    ) -> Result<Vec<u32>, CudaError> {
        let all = self.download(&t.stamp, t.n_units * n_clusters)?;
        Ok(all[u * n_clusters..(u + 1) * n_clusters].to_vec())
    }

    /// Drops the positions the index's host tier holds from `kv`'s GPU cache: a new cache of
    /// `cap - hole` slots keeps the sink and everything from the index's end on (see
    /// [`DevKv::hole`]). No-op without a host tier or when already done.
    pub fn move_to_host(&self, kv: &mut DevKv) -> Result<(), CudaError> {
        let Some(w) = kv.wave.as_deref() else {
            return Ok(());
        };
        if w.tier.is_none() || kv.hole.1 > 0 {
            return Ok(());
        }
        let (sink, end) = (w.sink, w.indexed_end);
        let hole = end - sink;
        let (units, hd) = (kv.n_layers * kv.n_kv, kv.head_dim);
        let cap = kv.cap - hole;
        let k = self.alloc::<bf16>(units * cap * hd)?;
        let v = self.alloc::<bf16>(units * cap * hd)?;
        let row = hd * 2;
        for (src, dst) in [(dp(&kv.k), dp(&k)), (dp(&kv.v), dp(&v))] {
            copy_steady(
                self,
                (src, kv.cap, end),
                (dst, cap, sink),
                sink,
                // Every slot after the index (not only the cached tokens: a cache's slots are
                // its state, whatever wrote them).
                kv.cap - end,
                units,
                row,
            )?;
        }
        kv.k = k;
        kv.v = v;
        kv.cap = cap;
        kv.hole = (sink, hole);
        Ok(())
    }

    /// Brings the positions of `kv`'s host tier back into a full GPU cache (the inverse of
    /// [`Self::move_to_host`]); the index stays, without its host tier. No-op without a hole.
    pub fn restore_from_host(&self, kv: &mut DevKv) -> Result<(), CudaError> {
        if kv.hole.1 == 0 {
            return Ok(());
        }
        let (k, v) = self.restored_copy(kv)?;
        kv.cap += kv.hole.1;
        kv.k = k;
        kv.v = v;
        kv.hole = (0, 0);
        if let Some(w) = kv.wave.as_deref_mut() {
            w.tier = None;
        }
        Ok(())
    }

    /// A full GPU cache (`cap + hole` slots per unit) with every position of `kv`: its steady
    /// zone from the GPU and the indexed tokens from the host tier, put back at their positions.
    pub(crate) fn restored_copy(
        &self,
        kv: &DevKv,
    ) -> Result<(CudaSlice<bf16>, CudaSlice<bf16>), CudaError> {
        let (sink, hole) = kv.hole;
        let Some(w) = kv.wave.as_deref() else {
            return Err(CudaError::Unsupported(
                "a cache with positions in a host tier has no index to restore them from".into(),
            ));
        };
        let Some(t) = w.tier.as_ref() else {
            return Err(CudaError::Unsupported(
                "a cache with positions in a host tier has lost its tier".into(),
            ));
        };
        let (units, hd) = (kv.n_layers * kv.n_kv, kv.head_dim);
        let full = kv.cap + hole;
        let end = sink + hole;
        let k = self.alloc::<bf16>(units * full * hd)?;
        let v = self.alloc::<bf16>(units * full * hd)?;
        let row = hd * 2;
        for (src, dst) in [(dp(&kv.k), dp(&k)), (dp(&kv.v), dp(&v))] {
            copy_steady(
                self,
                (src, kv.cap, sink),
                (dst, full, end),
                sink,
                kv.cap - sink,
                units,
                row,
            )?;
        }
        let (mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7, mut a8, mut a9) = (
            t.host_k.as_slice().as_ptr() as u64,
            t.host_v.as_slice().as_ptr() as u64,
            dp(&w.members),
            t.unit_tokens as i32,
            w.indexed_tokens() as i32,
            dp(&k),
            dp(&v),
            full as i32,
            hd as i32,
        );
        self.launch(
            "wave_tier_restore",
            LaunchConfig {
                grid_dim: (units as u32, 32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a1),
                ptr_of(&mut a2),
                ptr_of(&mut a3),
                ptr_of(&mut a4),
                ptr_of(&mut a5),
                ptr_of(&mut a6),
                ptr_of(&mut a7),
                ptr_of(&mut a8),
                ptr_of(&mut a9),
            ],
        )?;
        Ok((k, v))
    }

    /// `len` tokens of synthetic K and V (uniform random from `seed`) indexed straight into a
    /// host tier, with room for `room` more tokens: the heads are filled and clustered a group at
    /// a time (as many as a third of the free GPU memory holds), their indexed tokens gathered to
    /// the pinned arena and their steady zones kept, so the whole context never has to fit in
    /// GPU memory (a 1M-token Llama-3-8B sequence is 128 GiB). Replaces `kv`'s cache.
    pub fn synthetic_host_index(
        &self,
        kv: &mut DevKv,
        len: usize,
        room: usize,
        seed: u64,
        cfg: &WaveConfig,
    ) -> Result<(), CudaError> {
        crate::wave_step::check_gpu_config(cfg)?;
        if !cfg.host_kv {
            return Err(CudaError::Unsupported(
                "synthetic host-tier index: needs host_kv".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let (n_layers, n_kv, hd) = (kv.n_layers, kv.n_kv, kv.head_dim);
        let units = n_layers * n_kv;
        let plan = crate::wave_step::BuildPlan::of(cfg, len);
        if plan.segments.is_empty() {
            return Err(CudaError::Unsupported(format!(
                "synthetic host-tier index: {len} tokens leave nothing to index"
            )));
        }
        let (sink, end, k) = (plan.sink, plan.end, plan.clusters());
        let segs = plan.segments;
        let it = end - sink;
        let budgets = crate::wave_step::StepBudgets::of(cfg, k, it, 0, k);
        let (capacity, page) = tier_shape(cfg, budgets.retrieval, k, it)?;
        let cap = len + room - it;
        let row = hd * 2;
        // Drop the old cache first: its memory is what the groups are built in.
        kv.wave = None;
        kv.k = self.alloc::<bf16>(1)?;
        kv.v = self.alloc::<bf16>(1)?;
        self.synchronize()?;
        self.trim_pool()?;
        let ck = self.alloc::<bf16>(units * cap * hd)?;
        let cv = self.alloc::<bf16>(units * cap * hd)?;
        let mut centroids = self.alloc::<bf16>(units * k * hd)?;
        let mut ln_sizes = self.alloc::<f32>(units * k)?;
        let mut means = self.alloc::<bf16>(units * k * hd)?;
        let mut offsets = self.alloc::<i32>(units * (k + 1))?;
        let mut members = self.alloc::<i32>(units * it)?;
        let (host_k, host_v, charge) = self.tier_arenas(units * it * row)?;
        let (hk, hv) = (
            host_k.as_slice().as_ptr() as u64,
            host_v.as_slice().as_ptr() as u64,
        );
        let (free, _) = self
            .context()
            .mem_get_info()
            .map_err(CudaError::driver("cuMemGetInfo"))?;
        let per_unit = 2 * len * row;
        let group = (free / 3 / per_unit.max(1)).clamp(1, units);
        let mut max_size = 0usize;
        let s = self.stream().clone();
        let dtod = |what: &'static str| CudaError::driver(what);
        for u0 in (0..units).step_by(group) {
            let n = group.min(units - u0);
            let kc = self.alloc::<bf16>(n * len * hd)?;
            let vc = self.alloc::<bf16>(n * len * hd)?;
            let gs = seed ^ (u0 as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            self.fill_uniform(dp(&kc), n * len * hd, gs, 2.0)?;
            self.fill_uniform(dp(&vc), n * len * hd, gs ^ 0x5851_f42d_4c95_7f2d, 1.0)?;
            let bu: Vec<BuildUnit> = (0..n)
                .map(|i| BuildUnit {
                    keys: dp(&kc) + (i * len * row) as u64,
                    values: dp(&vc) + (i * len * row) as u64,
                })
                .collect();
            let c = self.wave_build(&bu, &segs, cfg.kmeans_iterations, hd)?;
            self.wave_gather_cluster_order(
                &bu,
                &c,
                hk + (u0 * it * row) as u64,
                hv + (u0 * it * row) as u64,
                it * hd,
            )?;
            s.memcpy_dtod(
                &c.centroids,
                &mut centroids.slice_mut(u0 * k * hd..(u0 + n) * k * hd),
            )
            .map_err(dtod("cuMemcpyDtoDAsync(centroids)"))?;
            s.memcpy_dtod(&c.ln_sizes, &mut ln_sizes.slice_mut(u0 * k..(u0 + n) * k))
                .map_err(dtod("cuMemcpyDtoDAsync(ln sizes)"))?;
            s.memcpy_dtod(
                &c.means,
                &mut means.slice_mut(u0 * k * hd..(u0 + n) * k * hd),
            )
            .map_err(dtod("cuMemcpyDtoDAsync(means)"))?;
            s.memcpy_dtod(
                &c.offsets,
                &mut offsets.slice_mut(u0 * (k + 1)..(u0 + n) * (k + 1)),
            )
            .map_err(dtod("cuMemcpyDtoDAsync(offsets)"))?;
            s.memcpy_dtod(&c.members, &mut members.slice_mut(u0 * it..(u0 + n) * it))
                .map_err(dtod("cuMemcpyDtoDAsync(members)"))?;
            let sizes = self.download(&c.sizes, c.sizes.len())?;
            max_size = max_size.max(sizes.iter().copied().max().unwrap_or(0).max(0) as usize);
            for (src, dst) in [(dp(&kc), dp(&ck)), (dp(&vc), dp(&cv))] {
                let dst = dst + (u0 * cap * row) as u64;
                copy_steady(
                    self,
                    (src, len, end),
                    (dst, cap, sink),
                    sink,
                    len - end,
                    n,
                    row,
                )?;
            }
            self.synchronize()?;
        }
        let tier = self.tier_around((host_k, host_v, charge), units, it, hd, k, capacity, page)?;
        self.synchronize()?;
        kv.k = ck;
        kv.v = cv;
        kv.cap = cap;
        kv.len = len;
        kv.hole = (sink, it);
        kv.wave = Some(Box::new(crate::wave_step::DevWave {
            n_clusters: k,
            base_clusters: k,
            base_tokens: it,
            n_units: units,
            centroids,
            ln_sizes,
            means,
            offsets,
            members,
            sink,
            indexed_end: end,
            max_cluster_size: max_size,
            updates: 0,
            cfg: cfg.clone(),
            build_seconds: t0.elapsed().as_secs_f64(),
            head_steps: 0,
            context_tokens: 0,
            tier: Some(tier),
        }));
        Ok(())
    }

    /// Gathers `n_pages` random pages (K and V, `page` tokens of `hd` bf16 each) of a 1 GiB
    /// pinned host arena into GPU memory three ways: the wave buffers' fill kernel (spread over
    /// `units` units as a decode layer's misses are), one copy-engine copy per page, and one
    /// batched copy-engine call. The fastest way to bring a step's misses in is what the issue
    /// asks to keep; this measures it.
    pub fn pcie_gather_bench(
        &self,
        n_pages: usize,
        units: usize,
        page: usize,
        hd: usize,
    ) -> Result<GatherTimes, CudaError> {
        use crate::timing::{median, time_us};
        let page_bytes = page * hd * 2;
        let arena_pages = (1usize << 30) / page_bytes;
        // (Contents do not matter to the timing; pinning has already touched every page.)
        let host_k = PinnedBuffer::new(self.context(), arena_pages * page_bytes)?;
        let host_v = PinnedBuffer::new(self.context(), arena_pages * page_bytes)?;
        let (hk, hv) = (
            host_k.as_slice().as_ptr() as u64,
            host_v.as_slice().as_ptr() as u64,
        );
        let cache_k = self.alloc::<u8>(n_pages * page_bytes)?;
        let cache_v = self.alloc::<u8>(n_pages * page_bytes)?;
        // Random distinct-enough pages (an LCG), dealt to the units in turn.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let src: Vec<usize> = (0..n_pages)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as usize) % arena_pages
            })
            .collect();
        let per = n_pages.div_ceil(units.max(1));
        let mut jobs = vec![0i32; units * per * 3];
        let mut state = vec![0u32; units * 4];
        for (j, &p) in src.iter().enumerate() {
            let (u, i) = (j / per, j % per);
            jobs[(u * per + i) * 3] = j as i32;
            jobs[(u * per + i) * 3 + 1] = (p * page) as i32;
            jobs[(u * per + i) * 3 + 2] = page as i32;
            state[u * 4 + 2] += 1;
        }
        let d_jobs = self.upload(&jobs)?;
        let d_state = self.upload(&state)?;
        let tiers: Vec<WaveTier> = (0..units)
            .map(|u| WaveTier {
                host_k: hk,
                host_v: hv,
                cache_k: dp(&cache_k),
                cache_v: dp(&cache_v),
                jobs: dp(&d_jobs) + (u * per * 12) as u64,
                state: dp(&d_state) + (u * 16) as u64,
                capacity: n_pages as i32,
                page: page as i32,
                ..WaveTier::default()
            })
            .collect();
        let d_tiers = self.upload(&tiers)?;
        let wu: Vec<crate::wave::WaveUnit> = (0..units)
            .map(|u| crate::wave::WaveUnit {
                tier: dp(&d_tiers) + (u * std::mem::size_of::<WaveTier>()) as u64,
                ..crate::wave::WaveUnit::default()
            })
            .collect();
        let d_units = self.upload(&wu)?;
        let s = self.stream().clone();
        let kernel = time_us(&s, 2, 10, || self.wave_cache_fill(dp(&d_units), units, hd))?;
        let cu = s.cu_stream();
        let memcpy = time_us(&s, 1, 5, || {
            for (j, &p) in src.iter().enumerate() {
                for (h, c) in [(hk, dp(&cache_k)), (hv, dp(&cache_v))] {
                    // SAFETY: both ranges lie inside live allocations; the host side is pinned.
                    unsafe {
                        sys::cuMemcpyHtoDAsync_v2(
                            c + (j * page_bytes) as u64,
                            (h + (p * page_bytes) as u64) as *const std::ffi::c_void,
                            page_bytes,
                            cu,
                        )
                    }
                    .result()
                    .map_err(CudaError::driver("cuMemcpyHtoDAsync"))?;
                }
            }
            Ok(())
        })?;
        let mut dsts: Vec<u64> = Vec::with_capacity(2 * n_pages);
        let mut srcs: Vec<u64> = Vec::with_capacity(2 * n_pages);
        for (j, &p) in src.iter().enumerate() {
            for (h, c) in [(hk, dp(&cache_k)), (hv, dp(&cache_v))] {
                dsts.push(c + (j * page_bytes) as u64);
                srcs.push(h + (p * page_bytes) as u64);
            }
        }
        let mut sizes = vec![page_bytes; dsts.len()];
        let dev = self.info().ordinal as i32;
        let batch = time_us(&s, 1, 5, || {
            // SAFETY: a plain C struct; every field set below.
            let mut attr: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
            attr.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
            attr.srcLocHint.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST;
            attr.dstLocHint.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            attr.dstLocHint.id = dev;
            let mut idx = [0usize];
            // SAFETY: the arrays hold `dsts.len()` entries each and outlive the call; the
            // ranges lie inside live allocations.
            unsafe {
                sys::cuMemcpyBatchAsync_v2(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    dsts.len(),
                    &mut attr,
                    idx.as_mut_ptr(),
                    1,
                    cu,
                )
            }
            .result()
            .map_err(CudaError::driver("cuMemcpyBatchAsync"))
        })?;
        Ok(GatherTimes {
            kernel_us: median(&kernel),
            memcpy_us: median(&memcpy),
            batch_us: median(&batch),
        })
    }

    /// Copies this layer's admitted pages into the wave buffers (`wave_cache_fill`): `units` is
    /// the layer's first unit, `n_units` of them.
    pub fn wave_cache_fill(&self, units: u64, n_units: usize, hd: usize) -> Result<(), CudaError> {
        let (mut a1, mut a2) = (units, hd as i32);
        // Enough loads in flight to cover PCIe's latency however few the units: about four
        // CTAs a multiprocessor over the layer (a unit without misses returns at once).
        let sms = self.info().multiprocessors.max(1) as usize;
        let per_unit = (FILL_CTAS_PER_SM * sms)
            .div_ceil(n_units.max(1))
            .clamp(4, 64) as u32;
        self.launch(
            "wave_cache_fill",
            LaunchConfig {
                grid_dim: (n_units as u32, per_unit, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [ptr_of(&mut a1), ptr_of(&mut a2)],
        )
    }
}

/// CTAs per multiprocessor `wave_cache_fill` aims for over a layer's units.
const FILL_CTAS_PER_SM: usize = 4;

/// Times of one gather of scattered pages from pinned host memory into GPU memory (see
/// [`CudaBackend::pcie_gather_bench`]), microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatherTimes {
    /// `wave_cache_fill` (the GPU's own loads over PCIe).
    pub kernel_us: f64,
    /// One `cuMemcpyHtoDAsync` per page (copy engine).
    pub memcpy_us: f64,
    /// One `cuMemcpyBatchAsync` for all pages (copy engine).
    pub batch_us: f64,
}

/// `dst.copy_from_slice(src)` on all cores (pinned arenas are tens of GiB).
fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    let n = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16);
    let chunk = src.len().div_ceil(n).max(1 << 20);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_tier_has_the_kernel_layout() {
        // Eleven pointers and three ints, as `struct WaveTier` in kernels/common.cuh.
        assert_eq!(std::mem::size_of::<WaveTier>(), 104);
        assert_eq!(std::mem::offset_of!(WaveTier, host_clusters), 96);
        assert_eq!(std::mem::offset_of!(WaveTier, stats), 80);
        assert_eq!(std::mem::offset_of!(WaveTier, capacity), 88);
    }

    #[test]
    fn tier_shapes_follow_the_config_and_refuse_what_the_kernels_cannot_take() {
        let cfg = WaveConfig::retrowave();
        assert_eq!(tier_shape(&cfg, 148, 8188, 8188 * 16).ok(), Some((888, 8)));
        // More retrieval clusters than the policy kernel takes in a step.
        let err = tier_shape(&cfg, crate::wave::SEL_TOP + 1, 1 << 20, 1 << 24).unwrap_err();
        assert!(err.to_string().contains("retrieval budget"), "{err}");
        // A head longer than the token lists can address.
        let err = tier_shape(&cfg, 148, 8188, 1 << 29).unwrap_err();
        assert!(err.to_string().contains("token-list encoding"), "{err}");
    }

    #[test]
    fn counters_say_what_crossed_pcie() {
        let c = TierCounters {
            hit_pages: 90,
            admitted_pages: 25,
            bypass_pages: 5,
            evicted_pages: 3,
            cold_pages: 20,
        };
        assert_eq!(c.miss_pages(), 30);
        assert_eq!(c.warm_hit_ratio(), Some(0.9));
        assert_eq!(TierCounters::default().warm_hit_ratio(), None);
    }
}
