//! Segmented spherical k-means with mean-centring.
//!
//! The keys of the clustered tokens are centred on their mean. Each segment is clustered on its
//! own: centroids start at evenly spaced tokens of the segment, tokens go to the centroid of
//! largest inner product with the L2-normalised centroids, and each of the iterations recomputes
//! the centroids as the (normalised) sums of their members. A final pass assigns every token to
//! the best of all centroids of all segments and summarises each cluster: the unnormalised mean
//! of its (uncentred) keys, its size, the sum of its values and its members.
//! Everything is deterministic: ties go to the lowest cluster id.

use std::ops::Range;

use crate::config::WaveConfig;
use crate::index::IndexError;
use crate::kv::{KvView, dot};

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
/// with `cfg.clusters_for_segment(len)` clusters.
pub fn segments(range: Range<usize>, cfg: &WaveConfig) -> Vec<Segment> {
    let step = cfg.segment_tokens.max(1);
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = range.end.min(start.saturating_add(step));
        out.push(Segment {
            tokens: start..end,
            clusters: cfg.clusters_for_segment(end - start),
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
    for s in segments {
        kv.check_range(s.tokens.start, s.tokens.end)?;
        if s.tokens.is_empty() || s.clusters == 0 || s.tokens.start < previous_end {
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
    let mut assignment = Vec::with_capacity(tokens.len());
    for row in centred.chunks_exact(d) {
        assignment.push(best(row, &directions, d));
    }
    let mut sizes = vec![0u32; total_clusters];
    let mut key_sums = vec![0f64; total_clusters * d];
    let mut value_sums = vec![0f64; total_clusters * dv];
    for (&t, &c) in tokens.iter().zip(&assignment) {
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
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0usize; k];
    for _ in 0..iterations {
        sums.fill(0.0);
        counts.fill(0);
        for row in rows.chunks_exact(d) {
            let c = best(row, &centroids, d);
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

/// The centroid of `centroids` (`[k, d]`, `k >= 1`) of largest inner product with `row`; ties go
/// to the lowest id.
fn best(row: &[f32], centroids: &[f32], d: usize) -> usize {
    let mut best_id = 0;
    let mut best_val = f64::NEG_INFINITY;
    for (j, c) in centroids.chunks_exact(d).enumerate() {
        let v = dot(row, c);
        if v > best_val {
            best_val = v;
            best_id = j;
        }
    }
    best_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::HeadDims;

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
