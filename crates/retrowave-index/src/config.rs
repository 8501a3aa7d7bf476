//! Every parameter of the wave index, with the published defaults and validation.

use crate::select;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A configuration value that makes no sense.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    /// A count that must be at least one.
    #[error("wave config: `{field}` must be at least 1, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A budget fraction outside `[0, 1]` or not a number.
    #[error("wave config: `{field}` must be a fraction between 0 and 1, got {value}")]
    Fraction {
        /// The field.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// Retrieval and estimation budgets that together exceed all clusters.
    #[error(
        "wave config: `retrieval_fraction` ({retrieval}) plus `estimation_fraction` ({estimation}) exceeds 1"
    )]
    FractionSum {
        /// The retrieval fraction.
        retrieval: f64,
        /// The estimation fraction.
        estimation: f64,
    },
    /// A segment shorter than one average cluster.
    #[error(
        "wave config: `segment_tokens` ({segment}) must be at least `avg_cluster_size` ({avg_cluster_size})"
    )]
    SegmentTooShort {
        /// The segment length.
        segment: usize,
        /// The average cluster size.
        avg_cluster_size: usize,
    },
    /// More clusters per update than tokens per update.
    #[error(
        "wave config: `clusters_per_update` ({clusters}) must not exceed `update_interval` ({interval})"
    )]
    TooManyUpdateClusters {
        /// Clusters per update.
        clusters: usize,
        /// Tokens per update.
        interval: usize,
    },
}

/// The parameters of the wave index and wave buffer. Defaults are the published ones
/// ([`WaveConfig::published`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WaveConfig {
    /// Attention-sink tokens at the start of the sequence, kept in the steady zone [4].
    pub sink_tokens: usize,
    /// Most recent tokens kept in the steady zone as the local window [64].
    pub window_tokens: usize,
    /// Tokens per k-means segment of the prefill index build [8192].
    pub segment_tokens: usize,
    /// Average tokens per cluster: a segment of `n` tokens gets `n / avg_cluster_size` clusters [16].
    pub avg_cluster_size: usize,
    /// Spherical k-means iterations per segment [9].
    pub kmeans_iterations: usize,
    /// Share of the prefill clusters attended exactly (retrieval zone) [0.018].
    pub retrieval_fraction: f64,
    /// Share of the prefill clusters approximated from their summaries (estimation zone) [0.232].
    pub estimation_fraction: f64,
    /// Generated tokens that gather in the steady zone before they are clustered into the index [1024].
    pub update_interval: usize,
    /// Clusters made from the tokens of one index update [64].
    pub clusters_per_update: usize,
    /// Key/value vectors per page of the cluster-ordered KV layout [8].
    pub page_size: usize,
    /// Retrieval clusters added to the budget per index update [1].
    pub retrieval_growth: usize,
    /// Estimation clusters added to the budget per index update [15].
    pub estimation_growth: usize,
    /// Capacity of the GPU cluster cache, in multiples of the retrieval budget [3].
    pub cache_ratio: usize,
    /// Least clusters the execution buffer holds [32].
    pub exec_buffer_min_clusters: usize,
    /// Execution buffer size in multiples of the retrieval budget [4].
    pub exec_buffer_ratio: usize,
    /// Rank clusters by their estimated attention mass `|C_i| exp(q . c_i)` rather than by
    /// `exp(q . c_i)` alone (published: off).
    pub rank_by_size: bool,
    /// Least retrieval clusters of a step, whatever the fraction gives (published: 0).
    pub min_retrieval_clusters: usize,
    /// Least tokens of the retrieval zone of a step, whatever the fraction gives, as clusters
    /// of the prefill index's mean size ([`WaveConfig::min_retrieval`]; published: 0). A floor
    /// in tokens rather than clusters keeps the exact part of a short context whole when
    /// [`WaveConfig::min_index_clusters`] makes its clusters smaller.
    pub min_retrieval_tokens: usize,
    /// Least tokens of the estimation zone of a step, whatever `estimation_fraction` gives, as
    /// clusters of the prefill index's mean size ([`WaveConfig::min_estimation`]; published: 0).
    /// A short context then skips no cluster: there, skipping saves little and the clusters it
    /// drops carry a larger share of the attention.
    pub min_estimation_tokens: usize,
    /// Least clusters of the prefill index: a context shorter than `min_index_clusters *
    /// avg_cluster_size` indexed tokens gets proportionally smaller clusters, so that its
    /// centroids resolve about as many distinct keys as a long context's ([`WaveConfig::clusters_for_segment`];
    /// published: 0). Scoring reads every centroid each step, so this costs only where the
    /// index is small.
    pub min_index_clusters: usize,
    /// Fill the retrieval budget (fixed or adaptive, as the summed scores give it) with the
    /// union of each query head's own best clusters by centroid logit (each head's best `k`, `k`
    /// as large as the budget allows; [`crate::select::union_retrieval`]) instead of the best by
    /// the group's summed softmax, under which a head whose softmax sits on one cluster loses its
    /// other clusters; the estimation zone still follows the summed score
    /// ([`crate::plan_step_union`]; published: off).
    pub union_ranking: bool,
    /// Adaptive retrieval: beyond the fixed budget, keep adding clusters (best first) until they
    /// hold this share of the clusters' estimated attention mass, up to
    /// `max_retrieval_fraction` of the clusters (published: 0, off).
    pub retrieval_mass: f64,
    /// Cap of the adaptive retrieval budget, as a share of the prefill clusters (published: 0).
    pub max_retrieval_fraction: f64,
    /// The first layers attend densely (exactly over every token) instead of through the index:
    /// their attention is spread over the context, where zones cover it worst (published: 0).
    pub dense_layers: usize,
    /// GPU backends: after the index build, move the indexed tokens' K and V to pinned host
    /// memory in cluster order and serve the retrieval clusters from a GPU block cache (the wave
    /// buffer, `cache_ratio` times the retrieval budget in pages of `page_size` tokens; misses
    /// are copied in over PCIe). Only the steady zone and the index stay in GPU memory, so far
    /// more sequences fit a step. The CPU backend's KV is in host memory already (ignored there).
    pub host_kv: bool,
}

impl Default for WaveConfig {
    fn default() -> Self {
        Self::retrowave()
    }
}

/// The cluster budgets of one decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Clusters in the retrieval zone.
    pub retrieval: usize,
    /// Clusters in the estimation zone.
    pub estimation: usize,
}

impl WaveConfig {
    /// The defaults of the published method (RetroInfer).
    pub const fn published() -> Self {
        Self {
            sink_tokens: 4,
            window_tokens: 64,
            segment_tokens: 8192,
            avg_cluster_size: 16,
            kmeans_iterations: 9,
            retrieval_fraction: 0.018,
            estimation_fraction: 0.232,
            update_interval: 1024,
            clusters_per_update: 64,
            page_size: 8,
            retrieval_growth: 1,
            estimation_growth: 15,
            cache_ratio: 3,
            exec_buffer_min_clusters: 32,
            exec_buffer_ratio: 4,
            rank_by_size: false,
            min_retrieval_clusters: 0,
            min_retrieval_tokens: 0,
            min_estimation_tokens: 0,
            min_index_clusters: 0,
            union_ranking: false,
            retrieval_mass: 0.0,
            max_retrieval_fraction: 0.0,
            dense_layers: 0,
            host_kv: false,
        }
    }

    /// retrowave's defaults: the published parameters with
    /// - a retrieval zone of at least 2048 tokens (128 clusters of 16: what contexts up to 64K
    ///   need; below the published 1.8% from 128K on, so free there) that grows (up to 2.5% of
    ///   the clusters) until it covers 90% of the clusters' estimated attention mass,
    /// - filled by the union of each query head's best clusters,
    /// - and at least 1024 clusters in the index, so contexts under 16K tokens get clusters of
    ///   fewer than 16 tokens,
    /// - with an estimation zone of at least 8192 tokens, so that contexts up to about 10K tokens
    ///   skip no cluster (from 64K on the published 23.2% is more).
    ///
    /// The README's accuracy section has the measurements behind the values: at a 64-cluster
    /// floor the answers of SmolLM2 and Qwen2.5-Coder left full attention's about twice as often
    /// at 4K-32K; the union ranking gained 3.2 +- 0.55 points on SmolLM2 multi-value at 4K, and
    /// clusters of 4 tokens there another 1.3 (740 cases: -1.2 -> +0.1 against full attention);
    /// estimating every cluster at 8K gained 0.30 +- 0.14 (1090 cases).
    pub const fn retrowave() -> Self {
        let mut c = Self::published();
        c.min_retrieval_tokens = 2048;
        c.min_estimation_tokens = 8192;
        c.min_index_clusters = 1024;
        c.union_ranking = true;
        c.retrieval_mass = 0.9;
        c.max_retrieval_fraction = 0.025;
        c
    }

    /// A named preset: `retrowave` (the default) or `published`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "retrowave" | "default" => Some(Self::retrowave()),
            "published" | "retroinfer" => Some(Self::published()),
            _ => None,
        }
    }

    /// Checks that every value makes sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("segment_tokens", self.segment_tokens),
            ("avg_cluster_size", self.avg_cluster_size),
            ("update_interval", self.update_interval),
            ("clusters_per_update", self.clusters_per_update),
            ("page_size", self.page_size),
            ("cache_ratio", self.cache_ratio),
            ("exec_buffer_ratio", self.exec_buffer_ratio),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        for (field, value) in [
            ("retrieval_fraction", self.retrieval_fraction),
            ("estimation_fraction", self.estimation_fraction),
            ("retrieval_mass", self.retrieval_mass),
            ("max_retrieval_fraction", self.max_retrieval_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::Fraction { field, value });
            }
        }
        if self.retrieval_fraction + self.estimation_fraction > 1.0 + 1e-12 {
            return Err(ConfigError::FractionSum {
                retrieval: self.retrieval_fraction,
                estimation: self.estimation_fraction,
            });
        }
        if self.segment_tokens < self.avg_cluster_size {
            return Err(ConfigError::SegmentTooShort {
                segment: self.segment_tokens,
                avg_cluster_size: self.avg_cluster_size,
            });
        }
        if self.clusters_per_update > self.update_interval {
            return Err(ConfigError::TooManyUpdateClusters {
                clusters: self.clusters_per_update,
                interval: self.update_interval,
            });
        }
        Ok(())
    }

    /// Clusters for a segment of `len` of the `indexed` tokens of a prefill build: `len /
    /// avg_cluster_size`, or the segment's share of `min_index_clusters` where that is more (at
    /// most one a token), at least one for a non-empty segment.
    pub fn clusters_for_segment(&self, len: usize, indexed: usize) -> usize {
        if len == 0 {
            return 0;
        }
        let by_size = len / self.avg_cluster_size.max(1);
        let by_count = if indexed == 0 {
            0
        } else {
            len.saturating_mul(self.min_index_clusters)
                .div_ceil(indexed)
        };
        by_size.max(by_count).min(len).max(1)
    }

    /// Least retrieval clusters of a step for a prefill index of `base_clusters` clusters over
    /// `base_tokens` tokens: `min_retrieval_clusters`, or `min_retrieval_tokens` in clusters of
    /// the index's mean size (rounded to the nearest) where that is more.
    pub fn min_retrieval(&self, base_clusters: usize, base_tokens: usize) -> usize {
        self.min_retrieval_clusters.max(clusters_of_tokens(
            self.min_retrieval_tokens,
            base_clusters,
            base_tokens,
        ))
    }

    /// Least estimation clusters of a step for a prefill index of `base_clusters` clusters over
    /// `base_tokens` tokens: `min_estimation_tokens` in clusters of the index's mean size
    /// (rounded to the nearest).
    pub fn min_estimation(&self, base_clusters: usize, base_tokens: usize) -> usize {
        clusters_of_tokens(self.min_estimation_tokens, base_clusters, base_tokens)
    }

    /// The budgets after an index built with `base_clusters` clusters and `updates` index updates:
    /// each fraction of `base_clusters` rounded up, plus the growth per update.
    pub fn budgets(&self, base_clusters: usize, updates: usize) -> Budgets {
        let share = |fraction: f64| {
            // The small slack keeps 0.3 * 10 from rounding up to 4.
            let raw = (fraction * base_clusters as f64 - 1e-9).ceil();
            if raw > 0.0 { raw as usize } else { 0 }
        };
        Budgets {
            retrieval: share(self.retrieval_fraction)
                .saturating_add(updates.saturating_mul(self.retrieval_growth)),
            estimation: share(self.estimation_fraction)
                .saturating_add(updates.saturating_mul(self.estimation_growth)),
        }
    }

    /// The budgets of one decode step given the clusters' `scores` (higher = more attention;
    /// `-inf` for empty clusters): the fixed budgets of [`WaveConfig::budgets`], at least
    /// [`WaveConfig::min_retrieval`] retrieval clusters (the prefill index made `base_clusters`
    /// clusters of `base_tokens` tokens), and with `retrieval_mass > 0` as many more (best
    /// first) as it takes to cover that share of the total score, up to the cap.
    pub fn step_budgets(
        &self,
        base_clusters: usize,
        base_tokens: usize,
        updates: usize,
        scores: &[f32],
    ) -> Budgets {
        let mut b = self.fixed_step_budgets(base_clusters, base_tokens, updates);
        if let Some(cap) = self.adaptive_cap(base_clusters, base_tokens, updates) {
            let live: Vec<f32> = scores
                .iter()
                .copied()
                .filter(|s| s.is_finite() && *s > 0.0)
                .collect();
            let (_, total) = live_total(scores);
            let cap = cap.min(live.len());
            if cap > 0 && total > 0.0 {
                // The top `cap` scores: those above the cap-th largest, then enough equal to it.
                let keys: Vec<u32> = live.iter().map(|&s| select::order_key(s)).collect();
                let mut top = top_values(&live, &keys, cap);
                b.retrieval = b.retrieval.max(self.covering(&mut top, total));
            }
        }
        b
    }

    /// The budgets of a step before the adaptive growth: the fixed ones, with at least
    /// [`WaveConfig::min_retrieval`] retrieval and [`WaveConfig::min_estimation`] estimation
    /// clusters.
    pub fn fixed_step_budgets(
        &self,
        base_clusters: usize,
        base_tokens: usize,
        updates: usize,
    ) -> Budgets {
        let mut b = self.budgets(base_clusters, updates);
        b.retrieval = b
            .retrieval
            .max(self.min_retrieval(base_clusters, base_tokens));
        b.estimation = b
            .estimation
            .max(self.min_estimation(base_clusters, base_tokens));
        b
    }

    /// Most retrieval clusters the adaptive budget may reach (at least the fixed budget), or
    /// `None` when the budget does not adapt.
    pub fn adaptive_cap(
        &self,
        base_clusters: usize,
        base_tokens: usize,
        updates: usize,
    ) -> Option<usize> {
        (self.retrieval_mass > 0.0).then(|| {
            let capped = WaveConfig {
                retrieval_fraction: self.max_retrieval_fraction,
                ..self.clone()
            };
            capped.budgets(base_clusters, updates).retrieval.max(
                self.fixed_step_budgets(base_clusters, base_tokens, updates)
                    .retrieval,
            )
        })
    }

    /// How many of the scores `top` (sorted here, best first) it takes to reach
    /// `retrieval_mass` of `total`; all of them if they do not.
    pub(crate) fn covering(&self, top: &mut [f32], total: f64) -> usize {
        top.sort_unstable_by(|a, b| b.total_cmp(a));
        let goal = self.retrieval_mass * total;
        let mut acc = 0.0;
        for (i, &s) in top.iter().enumerate() {
            acc += f64::from(s);
            if acc >= goal {
                return i + 1;
            }
        }
        top.len()
    }

    /// Clusters the GPU cluster cache holds for a retrieval budget of `retrieval` clusters.
    pub fn cache_clusters(&self, retrieval: usize) -> usize {
        self.cache_ratio.saturating_mul(retrieval)
    }

    /// The tokens an index update clusters once `n_tokens` tokens exist after an indexed range
    /// that ends at `indexed_end`: `None` until `window_tokens + update_interval` tokens follow
    /// it (or with `update_interval` 0), then every token after it except the last
    /// `window_tokens`. The rule of every backend's updates.
    pub fn pending_update(
        &self,
        indexed_end: usize,
        n_tokens: usize,
    ) -> Option<std::ops::Range<usize>> {
        let tail = n_tokens.checked_sub(indexed_end)?;
        if self.update_interval == 0
            || tail < self.window_tokens.saturating_add(self.update_interval)
        {
            return None;
        }
        Some(indexed_end..n_tokens - self.window_tokens)
    }

    /// Page slots of the wave buffer of one head whose index has `n_clusters` clusters over
    /// `indexed_tokens` tokens and a step budget of `retrieval` clusters: room for
    /// [`Self::cache_clusters`] clusters (of at least [`Self::min_retrieval`]) of the average
    /// size, in pages of `page_size` tokens.
    pub fn cache_pages(&self, retrieval: usize, n_clusters: usize, indexed_tokens: usize) -> usize {
        let r = retrieval.max(self.min_retrieval(n_clusters, indexed_tokens));
        let avg = indexed_tokens as f64 / n_clusters.max(1) as f64;
        let pages = (avg / self.page_size.max(1) as f64).ceil().max(1.0) as usize;
        self.cache_clusters(r).saturating_mul(pages)
    }

    /// Clusters the execution buffer holds for a retrieval budget of `retrieval` clusters.
    pub fn exec_buffer_clusters(&self, retrieval: usize) -> usize {
        self.exec_buffer_min_clusters
            .max(self.exec_buffer_ratio.saturating_mul(retrieval))
    }
}

/// `tokens` in clusters of the mean size of an index of `clusters` clusters over `indexed`
/// tokens, rounded to the nearest (0 for an empty index).
fn clusters_of_tokens(tokens: usize, clusters: usize, indexed: usize) -> usize {
    if indexed == 0 {
        return 0;
    }
    let (t, c, n) = (tokens as u128, clusters as u128, indexed as u128);
    usize::try_from((t * c + n / 2) / n).unwrap_or(usize::MAX)
}

/// How many `scores` are live (finite and positive) and their sum, in f64 over four
/// interleaved partial sums (one long chain of dependent adds was the slowest part of a step's
/// planning).
pub(crate) fn live_total(scores: &[f32]) -> (usize, f64) {
    let mut acc = LiveTotal::new(scores.len());
    for (c, &s) in scores.iter().enumerate() {
        acc.add(c, s);
    }
    acc.finish()
}

/// The running count and sum of [`live_total`], one score at a time (for passes that do other
/// work per score): score `c` of `n` goes to lane `c % 4`, the last `n % 4` to lane 0, so the
/// total is bit for bit the same whoever sums.
pub(crate) struct LiveTotal {
    sums: [f64; 4],
    count: usize,
    whole: usize,
}

impl LiveTotal {
    /// For `n` scores.
    pub(crate) fn new(n: usize) -> Self {
        LiveTotal {
            sums: [0.0; 4],
            count: 0,
            whole: n - n % 4,
        }
    }

    /// Adds score number `c`.
    #[inline]
    pub(crate) fn add(&mut self, c: usize, s: f32) {
        let live = s.is_finite() && s > 0.0;
        self.count += usize::from(live);
        self.sums[if c < self.whole { c & 3 } else { 0 }] += if live { f64::from(s) } else { 0.0 };
    }

    /// The live count and total.
    pub(crate) fn finish(&self) -> (usize, f64) {
        let s = &self.sums;
        (self.count, (s[0] + s[1]) + (s[2] + s[3]))
    }
}

/// The `k` largest of `values` (whose [`select::order_key`]s are `keys`), in no order.
pub(crate) fn top_values(values: &[f32], keys: &[u32], k: usize) -> Vec<f32> {
    let Some((t, above)) = select::kth_largest(keys, k) else {
        return values.to_vec();
    };
    let mut ties = k - above;
    let mut top = Vec::with_capacity(k);
    for (&v, &key) in values.iter().zip(keys) {
        if key > t {
            top.push(v);
        } else if key == t && ties > 0 {
            ties -= 1;
            top.push(v);
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_defaults() {
        let c = WaveConfig::published();
        // The default differs from the published parameters only in the retrieval budget, in
        // how it is filled (the union of the heads' best clusters) and in the clusters of short
        // contexts.
        assert_eq!(
            WaveConfig {
                min_retrieval_tokens: 0,
                min_estimation_tokens: 0,
                min_index_clusters: 0,
                retrieval_mass: 0.0,
                max_retrieval_fraction: 0.0,
                union_ranking: false,
                ..WaveConfig::default()
            },
            c
        );
        assert_eq!((c.sink_tokens, c.window_tokens), (4, 64));
        assert_eq!((c.segment_tokens, c.avg_cluster_size), (8192, 16));
        assert_eq!(c.kmeans_iterations, 9);
        assert_eq!(
            (c.retrieval_fraction, c.estimation_fraction),
            (0.018, 0.232)
        );
        assert_eq!((c.update_interval, c.clusters_per_update), (1024, 64));
        assert_eq!(c.page_size, 8);
        assert_eq!((c.retrieval_growth, c.estimation_growth), (1, 15));
        assert_eq!(c.cache_ratio, 3);
        assert_eq!(c.validate(), Ok(()));
        // 8K tokens of prefill: 512 clusters, 10 retrieved (9.2 rounded up), 119 estimated.
        let b = c.budgets(512, 0);
        assert_eq!((b.retrieval, b.estimation), (10, 119));
        let b = c.budgets(512, 2);
        assert_eq!((b.retrieval, b.estimation), (12, 149));
        assert_eq!(c.exec_buffer_clusters(2), 32);
        assert_eq!(c.exec_buffer_clusters(10), 40);
        assert_eq!(c.cache_clusters(10), 30);
        assert_eq!(c.clusters_for_segment(8192, 131_000), 512);
        assert_eq!(c.clusters_for_segment(5, 5), 1);
        assert_eq!(c.clusters_for_segment(0, 0), 0);
    }

    #[test]
    fn short_contexts_get_smaller_clusters_and_keep_their_exact_tokens() {
        let c = WaveConfig::retrowave();
        // From 16K indexed tokens on, clusters of 16.
        assert_eq!(c.clusters_for_segment(8192, 16_384), 512);
        assert_eq!(c.clusters_for_segment(8192, 131_000), 512);
        // Below, each segment takes its share of the 1024 clusters: 4K tokens, clusters of 4.
        assert_eq!(c.clusters_for_segment(4028, 4028), 1024);
        assert_eq!(c.clusters_for_segment(8192, 12_000), 700);
        assert_eq!(c.clusters_for_segment(3808, 12_000), 325);
        // Never more clusters than tokens.
        assert_eq!(c.clusters_for_segment(300, 300), 300);
        assert_eq!(
            WaveConfig::published().clusters_for_segment(4028, 4028),
            251
        );
        // The retrieval floor is 2048 tokens at the index's mean cluster size.
        assert_eq!(c.min_retrieval(1024, 4028), 521);
        assert_eq!(c.min_retrieval(8188, 131_004), 128);
        assert_eq!(c.min_retrieval(0, 0), 0);
        let clusters = WaveConfig {
            min_retrieval_clusters: 600,
            ..c.clone()
        };
        assert_eq!(clusters.min_retrieval(1024, 4028), 600);
        assert_eq!(WaveConfig::published().min_retrieval(1024, 4028), 0);
        // The estimation floor is 8192 tokens: every cluster of an 8K index (clusters of 8),
        // half of a 16K one, 25% of a 32K one; from 64K on the published fraction is more.
        assert_eq!(c.min_estimation(1024, 8124), 1033);
        assert_eq!(c.min_estimation(1024, 16_316), 514);
        assert_eq!(c.fixed_step_budgets(2043, 32_700, 0).estimation, 512);
        assert_eq!(c.fixed_step_budgets(8188, 131_004, 0).estimation, 1900);
        assert_eq!(WaveConfig::published().min_estimation(1024, 8124), 0);
    }

    #[test]
    fn wave_buffers_hold_cache_ratio_times_the_budget_in_pages() {
        let c = WaveConfig::retrowave();
        // 128K: 148 retrieval clusters of 16 tokens on average, pages of 8: 3 x 148 x 2.
        assert_eq!(c.cache_pages(148, 8188, 8188 * 16), 888);
        // The 2048-token minimum counts (102 clusters of 20 tokens); clusters of 17-24 tokens
        // take 3 pages.
        assert_eq!(c.cache_pages(10, 100, 2000), 3 * 102 * 3);
        // The published config has no minimum.
        assert_eq!(WaveConfig::published().cache_pages(0, 100, 1600), 0);
    }

    #[test]
    fn updates_wait_for_a_window_and_an_interval() {
        let c = WaveConfig::published(); // window 64, interval 1024
        assert_eq!(c.pending_update(1000, 1000 + 64 + 1023), None);
        assert_eq!(c.pending_update(1000, 1000 + 64 + 1024), Some(1000..2024));
        assert_eq!(c.pending_update(1000, 999), None);
        let never = WaveConfig {
            update_interval: 0,
            ..c
        };
        assert_eq!(never.pending_update(0, 1 << 20), None);
    }

    #[test]
    fn budgets_round_exactly() {
        let c = WaveConfig {
            retrieval_fraction: 0.3,
            estimation_fraction: 0.7,
            ..WaveConfig::published()
        };
        let b = c.budgets(10, 0);
        assert_eq!((b.retrieval, b.estimation), (3, 7));
        let all = WaveConfig {
            retrieval_fraction: 1.0,
            estimation_fraction: 0.0,
            ..WaveConfig::published()
        };
        assert_eq!(all.budgets(37, 0).retrieval, 37);
        assert_eq!(all.budgets(0, 0).retrieval, 0);
    }

    #[test]
    fn validation_rejects_nonsense() {
        let ok = WaveConfig::published();
        let cases = [
            WaveConfig {
                segment_tokens: 0,
                ..ok.clone()
            },
            WaveConfig {
                avg_cluster_size: 0,
                ..ok.clone()
            },
            WaveConfig {
                page_size: 0,
                ..ok.clone()
            },
            WaveConfig {
                update_interval: 0,
                ..ok.clone()
            },
            WaveConfig {
                retrieval_fraction: -0.1,
                ..ok.clone()
            },
            WaveConfig {
                estimation_fraction: f64::NAN,
                ..ok.clone()
            },
            WaveConfig {
                retrieval_fraction: 0.6,
                estimation_fraction: 0.6,
                ..ok.clone()
            },
            WaveConfig {
                segment_tokens: 8,
                ..ok.clone()
            },
            WaveConfig {
                clusters_per_update: 2048,
                ..ok.clone()
            },
        ];
        for bad in cases {
            assert!(bad.validate().is_err(), "{bad:?} was accepted");
        }
        let err = WaveConfig {
            page_size: 0,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("page_size"), "{err}");
        // Zero sink, window and iterations are legitimate choices.
        let lean = WaveConfig {
            sink_tokens: 0,
            window_tokens: 0,
            kmeans_iterations: 0,
            ..ok
        };
        assert_eq!(lean.validate(), Ok(()));
    }

    #[test]
    fn step_budgets_take_the_minimum_and_grow_to_the_covered_mass() {
        let published = WaveConfig::published();
        let scores = vec![1.0f32; 1000];
        // Published: fixed fractions whatever the scores.
        assert_eq!(
            published.step_budgets(1000, 16_000, 0, &scores),
            published.budgets(1000, 0)
        );
        let rw = WaveConfig::retrowave();
        assert_eq!(WaveConfig::default(), rw);
        assert_eq!(WaveConfig::preset("published"), Some(published.clone()));
        assert_eq!(WaveConfig::preset("nope"), None);
        // Few clusters: the minimum applies (2048 tokens in clusters of 16).
        assert_eq!(rw.step_budgets(300, 4800, 0, &[1.0; 300]).retrieval, 128);
        // ... in clusters of 4: 512.
        assert_eq!(rw.step_budgets(1000, 4000, 0, &scores).retrieval, 512);
        // Flat scores: 90% of the mass needs 900 clusters, capped at 2.5% = 25.
        assert_eq!(rw.step_budgets(1000, 16_000, 0, &scores).retrieval, 128);
        // ... and with more clusters the cap is above the minimum: 2.5% of 8192 = 205.
        assert_eq!(
            rw.step_budgets(8192, 131_072, 0, &vec![1.0; 8192])
                .retrieval,
            205
        );
        let cfg = WaveConfig {
            min_retrieval_tokens: 0,
            ..rw.clone()
        };
        assert_eq!(cfg.step_budgets(1000, 16_000, 0, &scores).retrieval, 25);
        // Concentrated scores: three clusters hold 90%, so the fixed 18 stay.
        let mut peaked = vec![0.001f32; 1000];
        peaked[..3].copy_from_slice(&[100.0, 100.0, 100.0]);
        assert_eq!(cfg.step_budgets(1000, 16_000, 0, &peaked).retrieval, 18);
        // Mass spread over the top 21: the budget covers them (beyond the fixed 18).
        let mut spread = vec![0.0f32; 1000];
        spread[..21].iter_mut().for_each(|s| *s = 1.0);
        spread[21] = f32::NEG_INFINITY;
        let b = WaveConfig {
            retrieval_mass: 1.0,
            ..cfg.clone()
        }
        .step_budgets(1000, 16_000, 0, &spread);
        assert_eq!(b.retrieval, 21);
        assert_eq!(
            b.estimation,
            cfg.fixed_step_budgets(1000, 16_000, 0).estimation
        );
        let bad = WaveConfig {
            retrieval_mass: 1.5,
            ..rw
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Fraction {
                field: "retrieval_mass",
                ..
            })
        ));
    }
}
