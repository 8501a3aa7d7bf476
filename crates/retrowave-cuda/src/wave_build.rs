//! The wave index build on the GPU (`kernels/wave_build.cu`): segmented spherical k-means with
//! mean-centring, batched over units (one unit = one (layer, KV head) of one sequence; all units
//! of a call share the token range and the segments), bit-exact with the CPU reference
//! [`retrowave_index::kmeans::kmeans_segments`] given the same bf16 keys and values.
//!
//! The order of every floating-point operation follows the reference: inner products are one f32
//! accumulator per (token, centroid) summed over the dimensions in order with fused multiply-adds,
//! every f64 sum runs in ascending token order, members are sorted by a stable counting sort, and
//! nothing uses float atomics, so the results are deterministic as well.
//!
//! Memory: besides the outputs (`[units][clusters][hd]` arrays, the largest of which also holds
//! the centroid directions during the iterations), the build keeps `[units][tokens]` cluster ids,
//! `[units][clusters]` counts (plus as many cursors when a unit has too many clusters for the sort's
//! shared memory) and `[units][hd]` means; centred keys are computed on the fly, never stored.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use half::bf16;

use crate::CudaError;
use crate::backend::{CudaBackend, dp, ptr_of};

/// One unit of a build: where its K and V rows live on the device (bf16, token `t` at
/// `base + t * head_dim` elements, 16-byte aligned). `BuildUnit` in `kernels/wave_build.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildUnit {
    /// Device address of the unit's keys (token 0).
    pub keys: u64,
    /// Device address of the unit's values (token 0).
    pub values: u64,
}

// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl DeviceRepr for BuildUnit {}

/// One k-means segment: tokens `start..end` (absolute positions), clustered into `clusters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildSegment {
    /// First token.
    pub start: usize,
    /// One past the last token.
    pub end: usize,
    /// Clusters to make of the segment (at least one, at most its tokens).
    pub clusters: usize,
}

/// The clusters of every unit of a build, on the device. Every unit has `n_clusters` clusters
/// (those of all segments, in segment order) over the same `n_tokens` clustered tokens.
pub struct GpuClustering {
    /// Units built.
    pub n_units: usize,
    /// Clusters per unit (empty ones included).
    pub n_clusters: usize,
    /// Clustered tokens per unit (the tokens of all segments).
    pub n_tokens: usize,
    /// Floats per key and value row.
    pub head_dim: usize,
    /// `bf16 [units][n_clusters][hd]`: unnormalised mean keys (zeros for empty clusters), for
    /// scoring.
    pub centroids: CudaSlice<bf16>,
    /// `f32 [units][n_clusters][hd]`: the same in f32 (equal to the CPU reference's centroids).
    pub centroids_f32: CudaSlice<f32>,
    /// `f32 [units][n_clusters]`: `ln(size)`, `-inf` for empty clusters.
    pub ln_sizes: CudaSlice<f32>,
    /// `i32 [units][n_clusters]`: tokens per cluster.
    pub sizes: CudaSlice<i32>,
    /// `bf16 [units][n_clusters][hd]`: mean values `value_sum / size` (zeros for empty clusters).
    pub means: CudaSlice<bf16>,
    /// `f32 [units][n_clusters][hd]`: sums of the members' values.
    pub value_sums: CudaSlice<f32>,
    /// `i32 [units][n_clusters + 1]`: CSR offsets into the unit's members (0-based in the unit).
    pub offsets: CudaSlice<i32>,
    /// `i32 [units][n_tokens]`: token ids (absolute positions), cluster after cluster, ascending
    /// within each cluster.
    pub members: CudaSlice<i32>,
}

// The kernels' shapes, as `kernels/wave_build.cu` defines them (a test holds the two together).
/// Tokens per assign CTA (`WB_BM`).
const WB_BM: usize = 128;
/// Centroids per tile of the assign kernel (`WB_BN`).
const WB_BN: usize = 128;
/// Dimensions per step of a centroid tile (`WB_BK`).
const WB_BK: usize = 16;
/// Threads of an assign CTA (`WB_THREADS`).
const WB_THREADS: u32 = 256;
/// Threads of an init CTA (`WB_INIT_THREADS`).
const WB_INIT_THREADS: u32 = 128;
/// Threads of a count CTA (`WB_COUNT_THREADS`).
const WB_COUNT_THREADS: u32 = 256;
/// Threads of a scan CTA (`WB_SCAN_THREADS`).
const WB_SCAN_THREADS: u32 = 1024;
/// Clusters per update CTA (`WB_UPD_CLUSTERS`).
const WB_UPD_CLUSTERS: usize = 32;
/// Threads of an update CTA (`WB_UPD_THREADS`).
const WB_UPD_THREADS: u32 = 256;
/// Threads of a summary CTA (`WB_SUM_THREADS`): `WB_SUM_THREADS / hd` clusters each.
const WB_SUM_THREADS: u32 = 256;
/// Rows per gather CTA, a warp each (`WB_GATHER_WARPS`).
const WB_GATHER_WARPS: usize = 8;

/// Dynamic shared memory the stable sort may use for a unit's cursors (4 bytes a cluster: up to
/// 24576 clusters, 393K tokens at 16 a cluster); more clusters keep them in global memory.
pub const WB_SORT_SMEM: usize = 96 * 1024;

/// Dynamic shared memory of an assign CTA: the centred row tile `[hd][WB_BM]` and two
/// `[WB_BK][WB_BN]` buffers of directions, f32.
pub fn assign_smem_bytes(hd: usize) -> usize {
    (hd * WB_BM + 2 * WB_BK * WB_BN) * 4
}

/// A segment as the kernels read it (`WbSeg`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WbSeg {
    start: i32,
    end: i32,
    c_start: i32,
    clusters: i32,
    flat: i32,
}

// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl DeviceRepr for WbSeg {}

/// A row tile of the assign kernel (`WbTile`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WbTile {
    tok: i32,
    rows: i32,
    flat: i32,
    c_start: i32,
    c_count: i32,
}

// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl DeviceRepr for WbTile {}

/// The host side of a build: the segments checked and laid out as the kernels read them, and the
/// row tiles of the two assignment passes.
#[derive(Debug, Clone, PartialEq)]
struct BuildPlan {
    segs: Vec<WbSeg>,
    /// Each segment's tiles against its own centroids (the k-means iterations).
    iter_tiles: Vec<WbTile>,
    /// Each segment's tiles against all centroids (the final assignment).
    final_tiles: Vec<WbTile>,
    n_tokens: usize,
    n_clusters: usize,
}

impl BuildPlan {
    /// Checks the segments (ascending, non-overlapping, non-empty, `1 <= clusters <= tokens`,
    /// positions and counts within `i32`) and the head dimension (64 or 128).
    fn new(segments: &[BuildSegment], hd: usize) -> Result<Self, CudaError> {
        if hd != 64 && hd != 128 {
            return Err(CudaError::Unsupported(format!(
                "the wave index build supports head_dim 64 and 128, not {hd}"
            )));
        }
        if segments.is_empty() {
            return Err(CudaError::Unsupported(
                "the wave index build needs at least one segment".into(),
            ));
        }
        let max = i32::MAX as usize;
        let (mut segs, mut iter_tiles) = (Vec::new(), Vec::new());
        let (mut prev_end, mut flat, mut k) = (0usize, 0usize, 0usize);
        for (i, s) in segments.iter().enumerate() {
            let len = s.end.saturating_sub(s.start);
            if len == 0 || s.start < prev_end || s.clusters == 0 || s.clusters > len {
                return Err(CudaError::Unsupported(format!(
                    "wave index build: segment {i} ({}..{}, {} clusters) is invalid: segments \
                     must be non-empty, ascending and non-overlapping, with 1 to their token \
                     count clusters",
                    s.start, s.end, s.clusters
                )));
            }
            if s.end > max || flat + len > max || k + s.clusters > max {
                return Err(CudaError::Unsupported(format!(
                    "wave index build: segment {i} ({}..{}) takes positions, tokens or clusters \
                     past 2^31 - 1",
                    s.start, s.end
                )));
            }
            let seg = WbSeg {
                start: s.start as i32,
                end: s.end as i32,
                c_start: k as i32,
                clusters: s.clusters as i32,
                flat: flat as i32,
            };
            for r0 in (0..len).step_by(WB_BM) {
                iter_tiles.push(WbTile {
                    tok: (s.start + r0) as i32,
                    rows: (len - r0).min(WB_BM) as i32,
                    flat: (flat + r0) as i32,
                    c_start: seg.c_start,
                    c_count: seg.clusters,
                });
            }
            segs.push(seg);
            prev_end = s.end;
            flat += len;
            k += s.clusters;
        }
        let final_tiles = iter_tiles
            .iter()
            .map(|t| WbTile {
                c_start: 0,
                c_count: k as i32,
                ..*t
            })
            .collect();
        Ok(Self {
            segs,
            iter_tiles,
            final_tiles,
            n_tokens: flat,
            n_clusters: k,
        })
    }

    /// Whether the stable sort keeps a unit's cursors in shared memory (else in global memory).
    fn cursor_in_smem(&self, smem_limit: usize) -> bool {
        self.n_clusters * 4 <= smem_limit
    }

    /// Bytes of device memory the build needs besides its outputs and the small tables: means,
    /// cluster ids, counts and (where the sort's shared memory is too small) cursors.
    fn temp_bytes(&self, n_units: usize, hd: usize, smem_limit: usize) -> usize {
        let cursors = if self.cursor_in_smem(smem_limit) {
            0
        } else {
            self.n_clusters
        };
        n_units * (hd + self.n_tokens + self.n_clusters + cursors) * 4
    }
}

fn check_units(units: &[BuildUnit]) -> Result<(), CudaError> {
    if units.is_empty() || units.len() > 65535 {
        return Err(CudaError::Unsupported(format!(
            "the wave index build takes 1 to 65535 units a call, got {}",
            units.len()
        )));
    }
    if let Some(u) = units.iter().find(|u| {
        u.keys == 0 || u.values == 0 || !u.keys.is_multiple_of(16) || !u.values.is_multiple_of(16)
    }) {
        return Err(CudaError::Unsupported(format!(
            "wave index build unit with a null or not 16-byte aligned K/V address: {u:?}"
        )));
    }
    Ok(())
}

fn grid_x(n: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(n.max(1)).map_err(|_| {
        CudaError::Unsupported(format!("wave index build: {n} {what} exceed a CUDA grid"))
    })
}

impl CudaBackend {
    /// Clusters the tokens of `segments` of every unit with `iterations` spherical k-means
    /// iterations a segment, then assigns each token to the best centroid of all segments and
    /// summarises the clusters, as [`retrowave_index::kmeans::kmeans_segments`] does (bit-exact
    /// given the same bf16 keys and values). The caller guarantees that every unit's K and V rows
    /// exist for all the segments' tokens. Asynchronous: the results are ready when the stream
    /// reaches them.
    pub fn wave_build(
        &self,
        units: &[BuildUnit],
        segments: &[BuildSegment],
        iterations: usize,
        hd: usize,
    ) -> Result<GpuClustering, CudaError> {
        self.wave_build_with(units, segments, iterations, hd, WB_SORT_SMEM)
    }

    /// [`Self::wave_build`] with the stable sort's cursors in shared memory only for units of at
    /// most `sort_smem / 4` clusters (checks force the global-memory path with 0).
    pub(crate) fn wave_build_with(
        &self,
        units: &[BuildUnit],
        segments: &[BuildSegment],
        iterations: usize,
        hd: usize,
        sort_smem: usize,
    ) -> Result<GpuClustering, CudaError> {
        let plan = BuildPlan::new(segments, hd)?;
        check_units(units)?;
        let sort_smem = sort_smem.min(WB_SORT_SMEM);
        let (nu, n, k) = (units.len(), plan.n_tokens, plan.n_clusters);
        let d_units = self.upload(units)?;
        let d_segs = self.upload(&plan.segs)?;
        let d_iter = self.upload(&plan.iter_tiles)?;
        let d_final = self.upload(&plan.final_tiles)?;
        // The directions live in `centroids_f32`, transposed ([u][hd][K]), until the summary
        // overwrites it with the centroids.
        let centroids_f32 = self.alloc::<f32>(nu * k * hd)?;
        let centroids = self.alloc::<bf16>(nu * k * hd)?;
        let ln_sizes = self.alloc::<f32>(nu * k)?;
        let sizes = self.alloc::<i32>(nu * k)?;
        let means = self.alloc::<bf16>(nu * k * hd)?;
        let value_sums = self.alloc::<f32>(nu * k * hd)?;
        let offsets = self.alloc::<i32>(nu * (k + 1))?;
        let members = self.alloc::<i32>(nu * n)?;
        let mean = self.alloc::<f32>(nu * hd)?;
        let assign = self.alloc::<i32>(nu * n)?;
        let counts = self
            .stream()
            .alloc_zeros::<i32>(nu * k)
            .map_err(CudaError::driver("cuMemsetAsync(wave build counts)"))?;
        let in_smem = plan.cursor_in_smem(sort_smem);
        tracing::debug!(
            units = nu,
            tokens = n,
            clusters = k,
            iterations,
            temp_bytes = plan.temp_bytes(nu, hd, sort_smem),
            "wave index build"
        );
        let cursor = self.alloc::<i32>(if in_smem { 1 } else { nu * k })?;

        let s = Scratch {
            units: dp(&d_units),
            segs: dp(&d_segs),
            n_segs: plan.segs.len() as i32,
            hd,
            k,
            n,
            nu,
            mean: dp(&mean),
            dirs: dp(&centroids_f32),
            assign: dp(&assign),
            counts: dp(&counts),
            cursor: dp(&cursor),
            in_smem,
            offsets: dp(&offsets),
            members: dp(&members),
        };
        let assign_name = if hd == 64 {
            "wave_build_assign_hd64"
        } else {
            "wave_build_assign_hd128"
        };
        self.set_max_dynamic_smem(assign_name, assign_smem_bytes(hd))?;
        if in_smem {
            self.set_max_dynamic_smem("wave_build_scatter", WB_SORT_SMEM)?;
        }
        let ny = nu as u32;
        let (mut a_u, mut a_s, mut nseg, mut h, mut nt) =
            (s.units, s.segs, s.n_segs, hd as i32, n as i32);
        let (mut a_mean, mut a_dirs, mut kk) = (s.mean, s.dirs, k as i32);
        self.launch(
            "wave_build_mean",
            LaunchConfig {
                grid_dim: (ny, 1, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a_u),
                ptr_of(&mut a_s),
                ptr_of(&mut nseg),
                ptr_of(&mut h),
                ptr_of(&mut nt),
                ptr_of(&mut a_mean),
            ],
        )?;
        self.launch(
            "wave_build_init",
            LaunchConfig {
                grid_dim: (
                    grid_x(k.div_ceil(WB_INIT_THREADS as usize), "clusters")?,
                    ny,
                    1,
                ),
                block_dim: (WB_INIT_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a_u),
                ptr_of(&mut a_s),
                ptr_of(&mut nseg),
                ptr_of(&mut h),
                ptr_of(&mut kk),
                ptr_of(&mut a_mean),
                ptr_of(&mut a_dirs),
            ],
        )?;
        for _ in 0..iterations {
            self.wb_assign(&s, assign_name, dp(&d_iter), plan.iter_tiles.len())?;
            self.wb_sort(&s)?;
            let (mut a_o, mut a_m) = (s.offsets, s.members);
            self.launch(
                "wave_build_update",
                LaunchConfig {
                    grid_dim: (grid_x(k.div_ceil(WB_UPD_CLUSTERS), "clusters")?, ny, 1),
                    block_dim: (WB_UPD_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &mut [
                    ptr_of(&mut a_u),
                    ptr_of(&mut a_o),
                    ptr_of(&mut a_m),
                    ptr_of(&mut a_mean),
                    ptr_of(&mut h),
                    ptr_of(&mut kk),
                    ptr_of(&mut nt),
                    ptr_of(&mut a_dirs),
                ],
            )?;
        }
        self.wb_assign(&s, assign_name, dp(&d_final), plan.final_tiles.len())?;
        self.wb_sort(&s)?;
        let per = WB_SUM_THREADS as usize / hd;
        let (mut a_o, mut a_m) = (s.offsets, s.members);
        let (mut a_cf, mut a_c, mut a_ln, mut a_sz, mut a_mn, mut a_vs) = (
            dp(&centroids_f32),
            dp(&centroids),
            dp(&ln_sizes),
            dp(&sizes),
            dp(&means),
            dp(&value_sums),
        );
        self.launch(
            "wave_build_summary",
            LaunchConfig {
                grid_dim: (grid_x(k.div_ceil(per), "clusters")?, ny, 1),
                block_dim: (WB_SUM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a_u),
                ptr_of(&mut a_o),
                ptr_of(&mut a_m),
                ptr_of(&mut h),
                ptr_of(&mut kk),
                ptr_of(&mut nt),
                ptr_of(&mut a_cf),
                ptr_of(&mut a_c),
                ptr_of(&mut a_ln),
                ptr_of(&mut a_sz),
                ptr_of(&mut a_mn),
                ptr_of(&mut a_vs),
            ],
        )?;
        // The temporaries drop here, freed in stream order after the kernels that use them.
        Ok(GpuClustering {
            n_units: nu,
            n_clusters: k,
            n_tokens: n,
            head_dim: hd,
            centroids,
            centroids_f32,
            ln_sizes,
            sizes,
            means,
            value_sums,
            offsets,
            members,
        })
    }

    /// One assignment pass: every tile's tokens to their best centroid, into `s.assign`.
    fn wb_assign(
        &self,
        s: &Scratch,
        name: &str,
        tiles: u64,
        n_tiles: usize,
    ) -> Result<(), CudaError> {
        let (mut a_u, mut a_t, mut a_mean, mut a_dirs, mut kk, mut nt, mut a_as) = (
            s.units, tiles, s.mean, s.dirs, s.k as i32, s.n as i32, s.assign,
        );
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (grid_x(n_tiles, "row tiles")?, s.nu as u32, 1),
                block_dim: (WB_THREADS, 1, 1),
                shared_mem_bytes: assign_smem_bytes(s.hd) as u32,
            },
            &mut [
                ptr_of(&mut a_u),
                ptr_of(&mut a_t),
                ptr_of(&mut a_mean),
                ptr_of(&mut a_dirs),
                ptr_of(&mut kk),
                ptr_of(&mut nt),
                ptr_of(&mut a_as),
            ],
        )
    }

    /// The stable counting sort of the tokens by `s.assign`: `s.offsets` and `s.members`.
    fn wb_sort(&self, s: &Scratch) -> Result<(), CudaError> {
        let ny = s.nu as u32;
        let (mut a_as, mut nt, mut kk, mut a_cnt) = (s.assign, s.n as i32, s.k as i32, s.counts);
        self.launch(
            "wave_build_count",
            LaunchConfig {
                grid_dim: (
                    grid_x(s.n.div_ceil(WB_COUNT_THREADS as usize), "tokens")?,
                    ny,
                    1,
                ),
                block_dim: (WB_COUNT_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a_as),
                ptr_of(&mut nt),
                ptr_of(&mut kk),
                ptr_of(&mut a_cnt),
            ],
        )?;
        let mut a_off = s.offsets;
        self.launch(
            "wave_build_scan",
            LaunchConfig {
                grid_dim: (ny, 1, 1),
                block_dim: (WB_SCAN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [ptr_of(&mut a_cnt), ptr_of(&mut kk), ptr_of(&mut a_off)],
        )?;
        let (mut a_s, mut nseg, mut a_cur, mut in_smem, mut a_mem) =
            (s.segs, s.n_segs, s.cursor, i32::from(s.in_smem), s.members);
        self.launch(
            "wave_build_scatter",
            LaunchConfig {
                grid_dim: (ny, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: if s.in_smem { (s.k * 4) as u32 } else { 0 },
            },
            &mut [
                ptr_of(&mut a_s),
                ptr_of(&mut nseg),
                ptr_of(&mut a_as),
                ptr_of(&mut a_off),
                ptr_of(&mut kk),
                ptr_of(&mut nt),
                ptr_of(&mut a_cur),
                ptr_of(&mut in_smem),
                ptr_of(&mut a_mem),
            ],
        )
    }

    /// Writes every unit's K and V rows in cluster order (the order of `c.members`) to `dst_k` and
    /// `dst_v`: bf16 `[n_tokens][hd]` at `dst + unit * dst_unit_stride` elements, for the units
    /// `c` was built from (the same slice). The destinations may be device memory or host-mapped
    /// pinned memory (16-byte aligned; the stride a multiple of 8 elements and at least
    /// `n_tokens * hd`). Asynchronous, like the build.
    pub fn wave_gather_cluster_order(
        &self,
        units: &[BuildUnit],
        c: &GpuClustering,
        dst_k: u64,
        dst_v: u64,
        dst_unit_stride: usize,
    ) -> Result<(), CudaError> {
        check_units(units)?;
        let hd = c.head_dim;
        if units.len() != c.n_units {
            return Err(CudaError::Unsupported(format!(
                "cluster-order gather of {} units from a build of {}",
                units.len(),
                c.n_units
            )));
        }
        if dst_k == 0 || dst_v == 0 || !dst_k.is_multiple_of(16) || !dst_v.is_multiple_of(16) {
            return Err(CudaError::Unsupported(format!(
                "cluster-order gather needs 16-byte aligned destinations, got {dst_k:#x} and \
                 {dst_v:#x}"
            )));
        }
        if !dst_unit_stride.is_multiple_of(8) || dst_unit_stride < c.n_tokens * hd {
            return Err(CudaError::Unsupported(format!(
                "cluster-order gather: a unit stride of {dst_unit_stride} elements is not a \
                 multiple of 8 of at least {} (tokens x head_dim)",
                c.n_tokens * hd
            )));
        }
        let d_units = self.upload(units)?;
        let (mut a_u, mut a_m, mut nt, mut h, mut dk, mut dv, mut st) = (
            dp(&d_units),
            dp(&c.members),
            c.n_tokens as i32,
            hd as i32,
            dst_k,
            dst_v,
            dst_unit_stride as i64,
        );
        self.launch(
            "wave_build_gather",
            LaunchConfig {
                grid_dim: (
                    grid_x(c.n_tokens.div_ceil(WB_GATHER_WARPS), "tokens")?,
                    c.n_units as u32,
                    1,
                ),
                block_dim: (32 * WB_GATHER_WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a_u),
                ptr_of(&mut a_m),
                ptr_of(&mut nt),
                ptr_of(&mut h),
                ptr_of(&mut dk),
                ptr_of(&mut dv),
                ptr_of(&mut st),
            ],
        )
    }
}

/// Device addresses and sizes shared by the launches of one build.
struct Scratch {
    units: u64,
    segs: u64,
    n_segs: i32,
    hd: usize,
    k: usize,
    n: usize,
    nu: usize,
    mean: u64,
    dirs: u64,
    assign: u64,
    counts: u64,
    cursor: u64,
    in_smem: bool,
    offsets: u64,
    members: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: usize, end: usize, clusters: usize) -> BuildSegment {
        BuildSegment {
            start,
            end,
            clusters,
        }
    }

    /// `#define NAME value` of `kernels/wave_build.cu`.
    fn define(name: &str) -> Option<i64> {
        let src = crate::compile::SOURCES
            .iter()
            .find(|(f, _)| *f == "wave_build.cu")?
            .1;
        src.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("#define") && it.next() == Some(name))
                .then(|| it.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
    }

    #[test]
    fn shapes_are_the_kernels() {
        for (name, v) in [
            ("WB_BM", WB_BM as i64),
            ("WB_BN", WB_BN as i64),
            ("WB_BK", WB_BK as i64),
            ("WB_THREADS", i64::from(WB_THREADS)),
            ("WB_INIT_THREADS", i64::from(WB_INIT_THREADS)),
            ("WB_COUNT_THREADS", i64::from(WB_COUNT_THREADS)),
            ("WB_SCAN_THREADS", i64::from(WB_SCAN_THREADS)),
            ("WB_UPD_CLUSTERS", WB_UPD_CLUSTERS as i64),
            ("WB_UPD_THREADS", i64::from(WB_UPD_THREADS)),
            ("WB_SUM_THREADS", i64::from(WB_SUM_THREADS)),
            ("WB_GATHER_WARPS", WB_GATHER_WARPS as i64),
        ] {
            assert_eq!(define(name), Some(v), "{name}");
        }
        // The assign kernel's 16 x 16 threads of 8 x 8 scores cover its tile, and its direction
        // buffers split evenly over the threads; every head dimension fills whole summary CTAs
        // and steps of WB_BK.
        assert_eq!(WB_BM, 128);
        assert_eq!(WB_BN, 128);
        assert_eq!(WB_THREADS, 256);
        assert_eq!((WB_BK * WB_BN) % WB_THREADS as usize, 0);
        for hd in [64, 128] {
            assert_eq!(hd % WB_BK, 0);
            assert_eq!(WB_SUM_THREADS as usize % hd, 0);
            assert!(hd <= define("WB_MAX_HD").unwrap() as usize);
            assert!(hd / 8 * 2 <= 32, "a gather warp copies a K and a V row");
        }
        assert_eq!(assign_smem_bytes(128), 81920);
    }

    #[test]
    fn wave_build_types_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<BuildUnit>(), 16);
        assert_eq!(std::mem::size_of::<WbSeg>(), 20);
        assert_eq!(std::mem::size_of::<WbTile>(), 20);
    }

    #[test]
    fn plan_lays_out_segments_and_tiles() {
        let p =
            BuildPlan::new(&[seg(5, 300, 20), seg(300, 310, 3), seg(400, 529, 9)], 128).unwrap();
        assert_eq!(p.n_tokens, 295 + 10 + 129);
        assert_eq!(p.n_clusters, 32);
        assert_eq!(
            p.segs[2],
            WbSeg {
                start: 400,
                end: 529,
                c_start: 23,
                clusters: 9,
                flat: 305
            }
        );
        // 295 tokens: tiles of 128, 128, 39; 10: one; 129: 128 and 1.
        let rows: Vec<i32> = p.iter_tiles.iter().map(|t| t.rows).collect();
        assert_eq!(rows, vec![128, 128, 39, 10, 128, 1]);
        assert_eq!(
            p.iter_tiles[5],
            WbTile {
                tok: 528,
                rows: 1,
                flat: 433,
                c_start: 23,
                c_count: 9
            }
        );
        // Every token is in exactly one tile of each pass, at its flat index.
        let mut seen = vec![0; p.n_tokens];
        for t in &p.final_tiles {
            assert_eq!((t.c_start, t.c_count), (0, 32));
            for r in 0..t.rows {
                seen[(t.flat + r) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
        assert_eq!(p.final_tiles.len(), p.iter_tiles.len());
    }

    #[test]
    fn plan_rejects_bad_input() {
        let bad = |s: &[BuildSegment], hd| BuildPlan::new(s, hd).unwrap_err().to_string();
        assert!(bad(&[seg(0, 10, 2)], 96).contains("head_dim"));
        assert!(bad(&[], 64).contains("at least one segment"));
        assert!(bad(&[seg(3, 3, 1)], 64).contains("invalid"));
        assert!(bad(&[seg(0, 10, 0)], 64).contains("invalid"));
        assert!(bad(&[seg(0, 10, 11)], 64).contains("invalid"));
        assert!(bad(&[seg(0, 10, 2), seg(9, 20, 2)], 64).contains("invalid"));
        assert!(bad(&[seg(10, 20, 2), seg(0, 5, 2)], 64).contains("invalid"));
        assert!(bad(&[seg(0, 1 << 31, 2)], 64).contains("2^31"));
        assert!(BuildPlan::new(&[seg(0, 10, 10), seg(10, 11, 1)], 64).is_ok());
        let unit = BuildUnit {
            keys: 0x1000,
            values: 0x2000,
        };
        assert!(check_units(&[unit]).is_ok());
        assert!(check_units(&[]).is_err());
        for u in [
            BuildUnit { keys: 0, ..unit },
            BuildUnit {
                values: 0x2008,
                ..unit
            },
        ] {
            assert!(
                check_units(&[u])
                    .unwrap_err()
                    .to_string()
                    .contains("aligned")
            );
        }
    }

    /// Llama-3-8B at 128K tokens (16 segments of 8192 tokens, 512 clusters each, 256 units):
    /// the temporaries stay within a few bytes a token and unit (a centred f32 copy of the keys
    /// would be 512 a token); a unit's cursors fit the sort's shared memory.
    #[test]
    fn temporaries_stay_small() {
        let segs: Vec<BuildSegment> = (0..16)
            .map(|i| seg(i * 8192, (i + 1) * 8192, 512))
            .collect();
        let p = BuildPlan::new(&segs, 128).unwrap();
        assert_eq!((p.n_tokens, p.n_clusters), (131072, 8192));
        assert!(p.cursor_in_smem(WB_SORT_SMEM));
        let per_unit_token = p.temp_bytes(256, 128, WB_SORT_SMEM) as f64 / (256.0 * 131072.0);
        assert!(per_unit_token < 4.5, "{per_unit_token}");
        // Without shared memory for the cursors: one more int a cluster.
        assert_eq!(
            p.temp_bytes(1, 128, 0) - p.temp_bytes(1, 128, WB_SORT_SMEM),
            8192 * 4
        );
    }
}
