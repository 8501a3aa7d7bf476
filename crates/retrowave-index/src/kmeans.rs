//! Segmented spherical k-means with mean-centring.
//!
//! The keys of the clustered tokens are centred on their mean. Each segment is clustered on its
//! own: centroids start at evenly spaced tokens of the segment, tokens go to the centroid of
//! largest inner product with the L2-normalised centroids, and each of the iterations recomputes
//! the centroids as the (normalised) sums of their members. A final pass assigns every token to
//! the best of all centroids of all segments and summarises each cluster: the unnormalised mean
//! of its (uncentred) keys, its size, the sum of its values and its members.
//! The assignments (the O(tokens x clusters x key_dim) part) are computed in f32 by a blocked,
//! vectorised kernel with a fixed summation order; sums and summaries are accumulated in f64.
//! Everything is deterministic: ties go to the lowest cluster id.

use std::ops::Range;

use crate::config::WaveConfig;
use crate::index::IndexError;
use crate::kv::KvView;

/// One k-means segment: a token range and the number of clusters to make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Tokens of the segment.
    pub tokens: Range<usize>,
    /// Clusters to make (at least one).
    pub clusters: usize,
}

/// The result of clustering: per-cluster summaries and members in CSR form.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Unnormalised mean key of each cluster, `[clusters, key_dim]`; zeros for an empty cluster.
    pub centroids: Vec<f32>,
    /// Tokens per cluster.
    pub sizes: Vec<u32>,
    /// Sum of the values of each cluster's tokens, `[clusters, value_dim]`.
    pub value_sums: Vec<f32>,
    /// Offsets of each cluster's members in `members`, `clusters + 1` entries.
    pub offsets: Vec<usize>,
    /// Token ids, cluster after cluster, ascending within a cluster.
    pub members: Vec<u32>,
}

impl Clustering {
    /// Number of clusters (empty ones included).
    pub fn n_clusters(&self) -> usize {
        self.sizes.len()
    }
}

/// Splits `range` into segments of `cfg.segment_tokens` tokens (the last may be shorter), each
/// with `cfg.clusters_for_segment(len, range.len())` clusters.
pub fn segments(range: Range<usize>, cfg: &WaveConfig) -> Vec<Segment> {
    let step = cfg.segment_tokens.max(1);
    let indexed = range.len();
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = range.end.min(start.saturating_add(step));
        out.push(Segment {
            tokens: start..end,
            clusters: cfg.clusters_for_segment(end - start, indexed),
        });
        start = end;
    }
    out
}

/// Clusters the tokens `range` of `kv` as the index build does: segments of
/// `cfg.segment_tokens`, `cfg.kmeans_iterations` iterations.
pub fn kmeans(
    kv: &KvView<'_>,
    range: Range<usize>,
    cfg: &WaveConfig,
) -> Result<Clustering, IndexError> {
    cfg.validate()?;
    kv.check_range(range.start, range.end)?;
    kmeans_segments(kv, &segments(range, cfg), cfg.kmeans_iterations)
}

/// Clusters the given segments (ascending, non-overlapping, non-empty, inside `kv`) with
/// `iterations` spherical k-means iterations each, then assigns all their tokens globally.
pub fn kmeans_segments(
    kv: &KvView<'_>,
    segments: &[Segment],
    iterations: usize,
) -> Result<Clustering, IndexError> {
    let mut previous_end = 0;
    let mut clusters_so_far = 0usize;
    for s in segments {
        kv.check_range(s.tokens.start, s.tokens.end)?;
        // Cluster ids are 32-bit.
        clusters_so_far = clusters_so_far.saturating_add(s.clusters);
        if s.tokens.is_empty()
            || s.clusters == 0
            || s.tokens.start < previous_end
            || clusters_so_far > u32::MAX as usize
        {
            return Err(IndexError::BadSegment {
                start: s.tokens.start,
                end: s.tokens.end,
                clusters: s.clusters,
            });
        }
        previous_end = s.tokens.end;
    }
    let d = kv.dims().key_dim;
    let dv = kv.dims().value_dim;
    let tokens: Vec<usize> = segments.iter().flat_map(|s| s.tokens.clone()).collect();

    // Mean-centre the keys.
    let mut mean = vec![0f64; d];
    for &t in &tokens {
        for (m, &x) in mean.iter_mut().zip(kv.key_row(t)) {
            *m += f64::from(x);
        }
    }
    let count = tokens.len().max(1) as f64;
    let mean: Vec<f32> = mean.iter().map(|m| (m / count) as f32).collect();
    let mut centred = Vec::with_capacity(tokens.len() * d);
    for &t in &tokens {
        centred.extend(kv.key_row(t).iter().zip(&mean).map(|(&x, &m)| x - m));
    }

    // Spherical k-means per segment.
    let total_clusters: usize = segments.iter().map(|s| s.clusters).sum();
    let mut directions = Vec::with_capacity(total_clusters * d);
    let mut offset = 0;
    for s in segments {
        let len = s.tokens.len();
        let rows = &centred[offset * d..(offset + len) * d];
        directions.extend(spherical(rows, d, s.clusters, iterations));
        offset += len;
    }

    // Final global assignment and per-cluster summaries.
    let mut assignment = vec![0u32; tokens.len()];
    if total_clusters > 0 {
        let mut panels = Panels::default();
        panels.pack(&directions, d);
        assign(&RowTiles::new(&centred, d), &panels, &mut assignment);
    }
    let mut sizes = vec![0u32; total_clusters];
    let mut key_sums = vec![0f64; total_clusters * d];
    let mut value_sums = vec![0f64; total_clusters * dv];
    for (&t, &c) in tokens.iter().zip(&assignment) {
        let c = c as usize;
        sizes[c] += 1;
        for (s, &x) in key_sums[c * d..(c + 1) * d].iter_mut().zip(kv.key_row(t)) {
            *s += f64::from(x);
        }
        for (s, &x) in value_sums[c * dv..(c + 1) * dv]
            .iter_mut()
            .zip(kv.value_row(t))
        {
            *s += f64::from(x);
        }
    }
    let mut centroids = vec![0f32; total_clusters * d];
    for (c, &size) in sizes.iter().enumerate() {
        if size > 0 {
            for (out, &s) in centroids[c * d..(c + 1) * d]
                .iter_mut()
                .zip(&key_sums[c * d..(c + 1) * d])
            {
                *out = (s / f64::from(size)) as f32;
            }
        }
    }
    let mut offsets = Vec::with_capacity(total_clusters + 1);
    offsets.push(0);
    for &size in &sizes {
        let last = offsets.last().copied().unwrap_or(0);
        offsets.push(last + size as usize);
    }
    let mut cursor = offsets[..total_clusters].to_vec();
    let mut members = vec![0u32; tokens.len()];
    for (&t, &c) in tokens.iter().zip(&assignment) {
        let c = c as usize;
        // Token ids fit in u32: KvView refuses longer sequences.
        members[cursor[c]] = t as u32;
        cursor[c] += 1;
    }
    Ok(Clustering {
        centroids,
        sizes,
        value_sums: value_sums.iter().map(|&s| s as f32).collect(),
        offsets,
        members,
    })
}

/// Spherical k-means of the centred `rows` (`[len, d]`, `len >= 1`) into `k` normalised
/// directions, `[k, d]`.
fn spherical(rows: &[f32], d: usize, k: usize, iterations: usize) -> Vec<f32> {
    let len = rows.len() / d;
    let mut centroids = Vec::with_capacity(k * d);
    for j in 0..k {
        let t = j * len / k;
        centroids.extend_from_slice(&rows[t * d..(t + 1) * d]);
    }
    for c in centroids.chunks_exact_mut(d) {
        normalise(c);
    }
    let tiles = RowTiles::new(rows, d);
    let mut panels = Panels::default();
    let mut assignment = vec![0u32; len];
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0usize; k];
    for _ in 0..iterations {
        panels.pack(&centroids, d);
        assign(&tiles, &panels, &mut assignment);
        sums.fill(0.0);
        counts.fill(0);
        for (row, &c) in rows.chunks_exact(d).zip(&assignment) {
            let c = c as usize;
            counts[c] += 1;
            for (s, &x) in sums[c * d..(c + 1) * d].iter_mut().zip(row) {
                *s += f64::from(x);
            }
        }
        for (j, &n) in counts.iter().enumerate() {
            // An empty cluster keeps its previous direction.
            if n > 0 {
                let c = &mut centroids[j * d..(j + 1) * d];
                for (out, &s) in c.iter_mut().zip(&sums[j * d..(j + 1) * d]) {
                    *out = s as f32;
                }
                normalise(c);
            }
        }
    }
    centroids
}

/// Scales `v` to unit L2 norm; a zero or non-finite norm leaves it unchanged.
fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

// The assignment step: for every row, the centroid of largest inner product (ties to the lowest
// id). It is a matrix product `rows x centroids^T` followed by a row-wise argmax, the hot loop of
// the whole build (O(tokens x clusters x key_dim)), computed in f32 by a register-blocked
// micro-kernel of `TILE_ROWS` rows by `LANES` centroids that LLVM turns into vector FMAs.
//
// Every inner product is summed in the same order, `k = 0, 1, .., d - 1` into one f32
// accumulator starting at zero, whatever the position of its row and centroid in the blocking:
// the result depends only on the row and the centroid, and the build is deterministic.

/// Rows per micro-kernel tile.
const TILE_ROWS: usize = 6;
/// Centroids per micro-kernel tile (a panel): two AVX2 vectors of f32.
const LANES: usize = 16;
/// Target size of a block of panels kept hot in cache while every row tile passes over it.
const BLOCK_FLOATS: usize = 32 * 1024;

/// `a * b + c`, fused where the target has FMA (one rounding), else two roundings. Either way
/// the same for every call in one build.
#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// Rows in tiles of `TILE_ROWS`, each tile transposed to `[d][TILE_ROWS]` so that one step of
/// the kernel reads the `TILE_ROWS` values of one coordinate together. The last tile is padded
/// with zero rows.
struct RowTiles {
    data: Vec<f32>,
    d: usize,
    rows: usize,
}

impl RowTiles {
    fn new(rows: &[f32], d: usize) -> Self {
        let n = rows.len() / d;
        let tiles = n.div_ceil(TILE_ROWS);
        let mut data = vec![0f32; tiles * d * TILE_ROWS];
        for (tile, block) in data.chunks_exact_mut(d * TILE_ROWS).enumerate() {
            for r in 0..TILE_ROWS {
                let i = tile * TILE_ROWS + r;
                if i < n {
                    for (k, &x) in rows[i * d..(i + 1) * d].iter().enumerate() {
                        block[k * TILE_ROWS + r] = x;
                    }
                }
            }
        }
        Self { data, d, rows: n }
    }
}

/// Centroids in panels of `LANES`, each transposed to `[d][LANES]`; the last panel is padded with
/// zero centroids whose scores a bias of `-inf` keeps from ever winning.
#[derive(Default)]
struct Panels {
    data: Vec<f32>,
    bias: Vec<[f32; LANES]>,
    d: usize,
    k: usize,
}

impl Panels {
    /// Packs `centroids` (`[k, d]`), reusing the buffers.
    fn pack(&mut self, centroids: &[f32], d: usize) {
        let k = centroids.len() / d;
        let panels = k.div_ceil(LANES);
        self.d = d;
        self.k = k;
        self.data.clear();
        self.data.resize(panels * d * LANES, 0.0);
        self.bias.clear();
        for (p, panel) in self.data.chunks_exact_mut(d * LANES).enumerate() {
            let mut bias = [0f32; LANES];
            for (l, b) in bias.iter_mut().enumerate() {
                let j = p * LANES + l;
                if j < k {
                    for (kk, &x) in centroids[j * d..(j + 1) * d].iter().enumerate() {
                        panel[kk * LANES + l] = x;
                    }
                } else {
                    *b = f32::NEG_INFINITY;
                }
            }
            self.bias.push(bias);
        }
    }
}

/// The `TILE_ROWS x LANES` inner products of one row tile and one panel (both `[d][..]`).
#[inline(always)]
fn kernel(tile: &[f32], panel: &[f32]) -> [[f32; LANES]; TILE_ROWS] {
    let mut acc = [[0f32; LANES]; TILE_ROWS];
    for (x, c) in tile.chunks_exact(TILE_ROWS).zip(panel.chunks_exact(LANES)) {
        for r in 0..TILE_ROWS {
            for l in 0..LANES {
                acc[r][l] = fmadd(x[r], c[l], acc[r][l]);
            }
        }
    }
    acc
}

/// Folds the scores `acc` (plus `bias`) of the centroids `base..base + LANES` into the running
/// per-lane best scores `val` and their ids `id`: only a strictly larger score replaces.
#[inline(always)]
fn fold(
    acc: &[f32; LANES],
    bias: &[f32; LANES],
    base: u32,
    val: &mut [f32; LANES],
    id: &mut [u32; LANES],
) {
    let mut ids = [0u32; LANES];
    for (l, i) in ids.iter_mut().enumerate() {
        *i = base + l as u32;
    }
    let mut better = [0u32; LANES];
    for l in 0..LANES {
        let v = acc[l] + bias[l];
        better[l] = u32::from(v > val[l]).wrapping_neg();
        val[l] = if v > val[l] { v } else { val[l] };
    }
    for l in 0..LANES {
        id[l] = (ids[l] & better[l]) | (id[l] & !better[l]);
    }
}

/// Writes to `out` (one entry per row) the centroid of largest inner product with each row of
/// `tiles`; ties go to the lowest id. `panels` must hold at least one centroid.
fn assign(tiles: &RowTiles, panels: &Panels, out: &mut [u32]) {
    let d = tiles.d;
    debug_assert_eq!(panels.d, d);
    debug_assert_eq!(out.len(), tiles.rows);
    let n_tiles = tiles.rows.div_ceil(TILE_ROWS);
    let mut best = vec![(f32::NEG_INFINITY, 0u32); n_tiles * TILE_ROWS];
    let panel_floats = d * LANES;
    let block_panels = (BLOCK_FLOATS / panel_floats).max(1);
    let n_panels = panels.bias.len();
    let mut first = 0;
    while first < n_panels {
        let last = n_panels.min(first + block_panels);
        let block = &panels.data[first * panel_floats..last * panel_floats];
        let biases = &panels.bias[first..last];
        for (tile, best) in tiles
            .data
            .chunks_exact(d * TILE_ROWS)
            .zip(best.chunks_exact_mut(TILE_ROWS))
        {
            // Per row and lane, the best score so far and its centroid: lanes scan their
            // centroids in ascending order and only a strictly larger score replaces.
            let mut lane_val = [[f32::NEG_INFINITY; LANES]; TILE_ROWS];
            let mut lane_id = [[0u32; LANES]; TILE_ROWS];
            for (p, (panel, bias)) in block.chunks_exact(panel_floats).zip(biases).enumerate() {
                let acc = kernel(tile, panel);
                let base = ((first + p) * LANES) as u32;
                for ((acc, val), id) in acc.iter().zip(&mut lane_val).zip(&mut lane_id) {
                    fold(acc, bias, base, val, id);
                }
            }
            // Fold the lanes (largest score, then lowest id), then the block into the running
            // best of the row: blocks come in ascending ids, so only a larger score replaces.
            for (r, best) in best.iter_mut().enumerate() {
                let mut v = f32::NEG_INFINITY;
                let mut id = u32::MAX;
                for l in 0..LANES {
                    let (lv, li) = (lane_val[r][l], lane_id[r][l]);
                    if lv > v || (lv == v && li < id) {
                        v = lv;
                        id = li;
                    }
                }
                if v > best.0 {
                    *best = (v, id);
                }
            }
        }
        first = last;
    }
    for (o, b) in out.iter_mut().zip(&best) {
        *o = b.1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{HeadDims, dot};

    /// Four groups of 16 tokens pointing in four different directions (plus small noise), in
    /// token order, clustered as one segment of four clusters.
    #[test]
    fn recovers_separated_groups() {
        let d = 4;
        let dims = HeadDims {
            key_dim: d,
            value_dim: 1,
        };
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for g in 0..4 {
            for i in 0..16 {
                for k in 0..d {
                    let base = if k == g { 5.0 } else { 0.0 };
                    keys.push(base + 0.01 * ((i * 7 + k * 3) % 5) as f32);
                }
                values.push(g as f32);
            }
        }
        let kv = KvView::new(&keys, &values, dims).unwrap();
        let seg = [Segment {
            tokens: 0..64,
            clusters: 4,
        }];
        let c = kmeans_segments(&kv, &seg, 3).unwrap();
        assert_eq!(c.sizes, vec![16; 4]);
        for j in 0..4 {
            let m = &c.members[c.offsets[j]..c.offsets[j + 1]];
            assert!(
                m.iter().all(|&t| t as usize / 16 == j),
                "cluster {j}: {m:?}"
            );
            // Value sum = 16 copies of the group's value.
            assert_eq!(c.value_sums[j], 16.0 * j as f32);
            // Centroid = unnormalised mean of the members' keys.
            assert!((c.centroids[j * d + j] - 5.02).abs() < 0.02);
        }
    }

    /// Uniform floats in [-1, 1) from a fixed seed (xorshift64*).
    fn floats(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn assign_all(rows: &[f32], centroids: &[f32], d: usize) -> Vec<u32> {
        let mut panels = Panels::default();
        panels.pack(centroids, d);
        let mut out = vec![0; rows.len() / d];
        assign(&RowTiles::new(rows, d), &panels, &mut out);
        out
    }

    /// The blocked f32 assignment against a plain f64 argmax: the chosen centroid is the best up
    /// to f32 rounding, exact duplicates go to the lowest id (within a panel, across panels and
    /// across blocks), and a row's result does not depend on its position in the tiling.
    #[test]
    fn blocked_assignment_matches_f64_argmax() {
        for (n, d, k) in [
            (1, 1, 1),
            (7, 3, 5),
            (50, 64, 1100),
            (13, 128, 300),
            (9, 5, 17),
        ] {
            let rows = floats(n * d, 7 + n as u64);
            let mut centroids = floats(k * d, 11 + k as u64);
            // Duplicates of earlier centroids: never chosen.
            for (dup, orig) in [(k - 1, 0), (k / 2, k / 3), (k.saturating_sub(3), 1)] {
                if dup > orig {
                    let src = centroids[orig * d..(orig + 1) * d].to_vec();
                    centroids[dup * d..(dup + 1) * d].copy_from_slice(&src);
                }
            }
            let got = assign_all(&rows, &centroids, d);
            for (i, row) in rows.chunks_exact(d).enumerate() {
                let scores: Vec<f64> = centroids.chunks_exact(d).map(|c| dot(row, c)).collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let c = got[i] as usize;
                assert!(scores[c] >= max - 1e-5, "n {n} d {d} k {k} row {i}");
                let first_equal = centroids
                    .chunks_exact(d)
                    .position(|x| x == &centroids[c * d..(c + 1) * d]);
                assert_eq!(first_equal, Some(c), "duplicate chosen over its original");
            }
            // Dropping the first row shifts every other row to another tile position.
            if n > 1 {
                assert_eq!(assign_all(&rows[d..], &centroids, d), got[1..]);
            }
        }
        // All scores equal (zero rows): the lowest id.
        assert_eq!(assign_all(&[0.0; 12], &floats(40 * 4, 3), 4), vec![0; 3]);
    }

    #[test]
    fn segments_follow_config() {
        let cfg = WaveConfig {
            segment_tokens: 100,
            avg_cluster_size: 16,
            ..WaveConfig::published()
        };
        let s = segments(4..254, &cfg);
        assert_eq!(
            s,
            vec![
                Segment {
                    tokens: 4..104,
                    clusters: 6
                },
                Segment {
                    tokens: 104..204,
                    clusters: 6
                },
                Segment {
                    tokens: 204..254,
                    clusters: 3
                },
            ]
        );
        assert!(segments(5..5, &cfg).is_empty());
    }

    #[test]
    fn rejects_bad_segments() {
        let dims = HeadDims {
            key_dim: 1,
            value_dim: 1,
        };
        let data = [1.0f32; 10];
        let kv = KvView::new(&data, &data, dims).unwrap();
        let bad = |tokens: Range<usize>, clusters| {
            kmeans_segments(&kv, &[Segment { tokens, clusters }], 1).is_err()
        };
        assert!(bad(0..11, 1));
        assert!(bad(3..3, 1));
        assert!(bad(0..5, 0));
        assert!(bad(0..5, u32::MAX as usize + 1));
        let overlapping = [
            Segment {
                tokens: 0..5,
                clusters: 1,
            },
            Segment {
                tokens: 4..8,
                clusters: 1,
            },
        ];
        assert!(kmeans_segments(&kv, &overlapping, 1).is_err());
    }
}
