//! The cluster index of one (sequence, KV head): centroids, sizes, value sums, member lists and
//! the token range they cover, with appends for index updates during decode.

use std::ops::Range;

use thiserror::Error;

use crate::config::{Budgets, ConfigError, WaveConfig};
use crate::kmeans::{Clustering, Segment, kmeans, kmeans_segments};
use crate::kv::{HeadDims, KvView, ShapeError};

/// Errors of building, updating and querying a cluster index.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum IndexError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A buffer has the wrong shape.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// A k-means segment that is empty, has no clusters or overlaps the one before it.
    #[error(
        "k-means segment {start}..{end} with {clusters} clusters is invalid: segments must be non-empty, ascending and non-overlapping, with at least one cluster"
    )]
    BadSegment {
        /// First token of the segment.
        start: usize,
        /// One past its last token.
        end: usize,
        /// Clusters asked for.
        clusters: usize,
    },
    /// KV with other head dimensions than the index.
    #[error("the index has head dimensions {index:?}, the KV given has {given:?}")]
    DimsMismatch {
        /// Dimensions of the index.
        index: HeadDims,
        /// Dimensions given.
        given: HeadDims,
    },
    /// An appended segment that does not start where the indexed range ends.
    #[error(
        "an index update must start at token {expected} (the end of the indexed range), got {start}..{end}"
    )]
    NotContiguous {
        /// Where the segment must start.
        expected: usize,
        /// First token given.
        start: usize,
        /// One past the last token given.
        end: usize,
    },
    /// Fewer tokens than the index already covers.
    #[error("the index covers tokens up to {indexed_end}, but the sequence has only {n_tokens}")]
    SequenceTooShort {
        /// End of the indexed range.
        indexed_end: usize,
        /// Tokens given.
        n_tokens: usize,
    },
    /// Scores of the wrong length.
    #[error("got {got} cluster scores for an index of {clusters} clusters")]
    ScoresLen {
        /// Scores given.
        got: usize,
        /// Clusters in the index.
        clusters: usize,
    },
    /// Centroid logits that are not one row per query head of one logit per cluster.
    #[error("got {got} centroid logits for {heads} query heads and {clusters} clusters")]
    LogitsLen {
        /// Logits given.
        got: usize,
        /// Query heads of the group.
        heads: usize,
        /// Clusters in the index.
        clusters: usize,
    },
    /// A query buffer that is empty or not whole rows of the key dimension.
    #[error(
        "queries have {len} floats, expected a non-zero multiple of the head dimension {key_dim}"
    )]
    QueriesLen {
        /// Floats given.
        len: usize,
        /// The key dimension.
        key_dim: usize,
    },
    /// A cluster id that the index does not have.
    #[error("cluster {cluster} does not exist: the index has {clusters} clusters")]
    UnknownCluster {
        /// The id given.
        cluster: u32,
        /// Clusters in the index.
        clusters: usize,
    },
}

/// The wave index of one sequence and KV head.
///
/// Clusters are numbered in creation order: the prefill build first, then each update's clusters
/// appended. Tokens of the indexed range are each in exactly one cluster; tokens outside it (the
/// sinks before it, the window and the recent tokens after it) belong to the steady zone.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterIndex {
    dims: HeadDims,
    centroids: Vec<f32>,
    sizes: Vec<u32>,
    value_sums: Vec<f32>,
    offsets: Vec<usize>,
    members: Vec<u32>,
    indexed: Range<usize>,
    base_clusters: usize,
    base_tokens: usize,
    updates: usize,
}

impl ClusterIndex {
    /// Builds the index after prefill over all tokens of `kv` except the steady zone:
    /// the first `sink_tokens` and the last `window_tokens`. A prefill too short to leave any
    /// token gives an empty index (whose range starts after the sinks).
    pub fn build(kv: &KvView<'_>, cfg: &WaveConfig) -> Result<Self, IndexError> {
        cfg.validate()?;
        let n = kv.n_tokens();
        let start = cfg.sink_tokens.min(n);
        let end = n.saturating_sub(cfg.window_tokens).max(start);
        let clustering = kmeans(kv, start..end, cfg)?;
        let base_clusters = clustering.n_clusters();
        Ok(Self {
            dims: kv.dims(),
            centroids: clustering.centroids,
            sizes: clustering.sizes,
            value_sums: clustering.value_sums,
            offsets: clustering.offsets,
            members: clustering.members,
            indexed: start..end,
            base_clusters,
            base_tokens: end - start,
            updates: 0,
        })
    }

    /// The tokens the next index update should cluster, once `n_tokens` tokens exist: `None` until
    /// `window_tokens + update_interval` tokens follow the indexed range, then every token after
    /// the indexed range except the last `window_tokens`.
    pub fn pending_update(&self, cfg: &WaveConfig, n_tokens: usize) -> Option<Range<usize>> {
        cfg.pending_update(self.indexed.end, n_tokens)
    }

    /// Clusters `range` of `kv` (which must start at the end of the indexed range) as one segment
    /// of `cfg.clusters_per_update` clusters (fewer if the segment has fewer tokens) and appends
    /// them. Existing clusters are unchanged; the new tokens are assigned among the new clusters
    /// only, after centring on their own mean. Counts as one update for the budgets.
    pub fn append_segment(
        &mut self,
        kv: &KvView<'_>,
        range: Range<usize>,
        cfg: &WaveConfig,
    ) -> Result<(), IndexError> {
        cfg.validate()?;
        if kv.dims() != self.dims {
            return Err(IndexError::DimsMismatch {
                index: self.dims,
                given: kv.dims(),
            });
        }
        if range.start != self.indexed.end || range.is_empty() {
            return Err(IndexError::NotContiguous {
                expected: self.indexed.end,
                start: range.start,
                end: range.end,
            });
        }
        kv.check_range(range.start, range.end)?;
        let clusters = cfg.clusters_per_update.clamp(1, range.len());
        let segment = Segment {
            tokens: range.clone(),
            clusters,
        };
        let new = kmeans_segments(kv, &[segment], cfg.kmeans_iterations)?;
        self.extend(new);
        self.indexed.end = range.end;
        self.updates += 1;
        Ok(())
    }

    /// Appends the clusters of `new` after the existing ones.
    fn extend(&mut self, new: Clustering) {
        let base = self.members.len();
        self.centroids.extend(new.centroids);
        self.sizes.extend(new.sizes);
        self.value_sums.extend(new.value_sums);
        self.offsets
            .extend(new.offsets.iter().skip(1).map(|&o| base + o));
        self.members.extend(new.members);
    }

    /// Head dimensions of the indexed KV.
    pub fn dims(&self) -> HeadDims {
        self.dims
    }

    /// Number of clusters, empty ones included.
    pub fn n_clusters(&self) -> usize {
        self.sizes.len()
    }

    /// The indexed tokens: every token in it is in exactly one cluster.
    pub fn indexed_range(&self) -> Range<usize> {
        self.indexed.clone()
    }

    /// Clusters made by the prefill build (the base of the budget fractions).
    pub fn base_clusters(&self) -> usize {
        self.base_clusters
    }

    /// Tokens the prefill build clustered.
    pub fn base_tokens(&self) -> usize {
        self.base_tokens
    }

    /// Index updates appended since the build.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The fixed budgets of a decode step with this index under `cfg`.
    pub fn budgets(&self, cfg: &WaveConfig) -> Budgets {
        cfg.budgets(self.base_clusters, self.updates)
    }

    /// The budgets of a decode step given the cluster scores ([`WaveConfig::step_budgets`]).
    pub fn step_budgets(&self, cfg: &WaveConfig, scores: &[f32]) -> Budgets {
        cfg.step_budgets(self.base_clusters, self.base_tokens, self.updates, scores)
    }

    /// Centroids, `[clusters, key_dim]` (unnormalised means; zeros for empty clusters).
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Tokens per cluster.
    pub fn sizes(&self) -> &[u32] {
        &self.sizes
    }

    /// Value sums, `[clusters, value_dim]`.
    pub fn value_sums(&self) -> &[f32] {
        &self.value_sums
    }

    /// CSR offsets into [`ClusterIndex::all_members`], `clusters + 1` entries.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Members of all clusters, cluster after cluster, ascending within a cluster.
    pub fn all_members(&self) -> &[u32] {
        &self.members
    }

    /// Members of `cluster`, or `None` if there is no such cluster.
    pub fn members(&self, cluster: usize) -> Option<&[u32]> {
        let start = *self.offsets.get(cluster)?;
        let end = *self.offsets.get(cluster + 1)?;
        self.members.get(start..end)
    }

    /// Centroid of `cluster`.
    pub fn centroid(&self, cluster: usize) -> Option<&[f32]> {
        let d = self.dims.key_dim;
        self.centroids.get(cluster * d..(cluster + 1) * d)
    }

    /// Value sum of `cluster`.
    pub fn value_sum(&self, cluster: usize) -> Option<&[f32]> {
        let d = self.dims.value_dim;
        self.value_sums.get(cluster * d..(cluster + 1) * d)
    }

    /// Checks that `cluster` exists.
    pub(crate) fn check_cluster(&self, cluster: u32) -> Result<usize, IndexError> {
        let c = cluster as usize;
        if c >= self.n_clusters() {
            return Err(IndexError::UnknownCluster {
                cluster,
                clusters: self.n_clusters(),
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan_step;

    fn dims() -> HeadDims {
        HeadDims {
            key_dim: 2,
            value_dim: 1,
        }
    }

    fn data(n: usize) -> (Vec<f32>, Vec<f32>) {
        let keys = (0..2 * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let values = (0..n).map(|i| i as f32).collect();
        (keys, values)
    }

    #[test]
    fn short_prefill_gives_an_empty_index() {
        let (keys, values) = data(50);
        let kv = KvView::new(&keys, &values, dims()).unwrap();
        let index = ClusterIndex::build(&kv, &WaveConfig::published()).unwrap();
        assert_eq!(index.n_clusters(), 0);
        assert_eq!(index.indexed_range(), 4..4);
        assert_eq!(index.offsets(), &[0]);
        let b = index.budgets(&WaveConfig::published());
        assert_eq!((b.retrieval, b.estimation), (0, 0));
    }

    /// `n` tokens of 8-dim keys spread over the sphere (a xorshift), values the position.
    fn spread(n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let keys = (0..8 * n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        (keys, (0..n).map(|i| i as f32).collect())
    }

    #[test]
    fn the_default_indexes_short_contexts_finer_and_keeps_2048_exact_tokens() {
        // ... and estimates at least 8192 tokens: at 4K every cluster it does not retrieve.
        let cfg = WaveConfig::default();
        let dims = HeadDims {
            key_dim: 8,
            value_dim: 1,
        };
        for (n, clusters, mean) in [(4096usize, 1024usize, 4.0f64), (32_768, 2043, 16.0)] {
            let (keys, values) = spread(n);
            let kv = KvView::new(&keys, &values, dims).unwrap();
            let index = ClusterIndex::build(&kv, &cfg).unwrap();
            // 4K: 1024 clusters of about 4 tokens; 32K: clusters of 16 as published.
            assert_eq!(index.n_clusters(), clusters, "{n} tokens");
            assert_eq!(index.base_tokens(), n - 68);
            let size = index.base_tokens() as f64 / index.n_clusters() as f64;
            assert!((size - mean).abs() < 0.1, "{n} tokens: clusters of {size}");
            // Flat scores: the retrieval zone is the 2048-token floor, in clusters of the mean
            // size (the adaptive budget's 2.5% cap is below it at both lengths).
            let scores = vec![1.0f32; index.n_clusters()];
            let plan = plan_step(&index, &cfg, &scores, n).unwrap();
            let want = (2048.0 / size).round() as usize;
            assert_eq!(plan.retrieval.len(), want, "{n} tokens");
            let exact: u32 = plan
                .retrieval
                .iter()
                .map(|&c| index.sizes()[c as usize])
                .sum();
            assert!(
                (1900..=2200).contains(&exact),
                "{n} tokens: {exact} exact tokens"
            );
            // 4K: every other cluster; 32K: 8192 tokens in clusters of 16 (512, a little more
            // than the published 23.2%, 474).
            let estimated = if n == 4096 { clusters - want } else { 512 };
            assert_eq!(plan.estimation.len(), estimated, "{n} tokens");
        }
    }

    #[test]
    fn updates_follow_the_interval() {
        let cfg = WaveConfig {
            sink_tokens: 2,
            window_tokens: 4,
            avg_cluster_size: 2,
            segment_tokens: 8,
            update_interval: 10,
            clusters_per_update: 3,
            ..WaveConfig::published()
        };
        let (keys, values) = data(40);
        let kv = KvView::new(&keys[..40], &values[..20], dims()).unwrap();
        let mut index = ClusterIndex::build(&kv, &cfg).unwrap();
        // 20 tokens: indexed 2..16 in segments 2..10 (4 clusters) and 10..16 (3 clusters).
        assert_eq!(index.indexed_range(), 2..16);
        assert_eq!(index.n_clusters(), 7);
        assert_eq!(index.pending_update(&cfg, 29), None);
        assert_eq!(index.pending_update(&cfg, 30), Some(16..26));
        let kv = KvView::new(&keys[..60], &values[..30], dims()).unwrap();
        index.append_segment(&kv, 16..26, &cfg).unwrap();
        assert_eq!(index.indexed_range(), 2..26);
        assert_eq!(index.n_clusters(), 10);
        assert_eq!(index.updates(), 1);
        assert_eq!(index.base_clusters(), 7);
        assert_eq!(index.sizes()[7..].iter().sum::<u32>(), 10);
        // Not contiguous, empty, beyond the KV, or other dimensions: refused, index unchanged.
        let before = index.clone();
        assert!(matches!(
            index.append_segment(&kv, 27..30, &cfg),
            Err(IndexError::NotContiguous { expected: 26, .. })
        ));
        assert!(index.append_segment(&kv, 26..26, &cfg).is_err());
        assert!(matches!(
            index.append_segment(&kv, 26..31, &cfg),
            Err(IndexError::Shape(ShapeError::TokenOutOfRange { .. }))
        ));
        let other = HeadDims {
            key_dim: 1,
            value_dim: 1,
        };
        let kv1 = KvView::new(&values[..30], &values[..30], other).unwrap();
        assert!(matches!(
            index.append_segment(&kv1, 26..28, &cfg),
            Err(IndexError::DimsMismatch { .. })
        ));
        let bad = WaveConfig {
            page_size: 0,
            ..cfg.clone()
        };
        assert!(matches!(
            index.append_segment(&kv, 26..28, &bad),
            Err(IndexError::Config(_))
        ));
        assert_eq!(index, before);
    }
}
