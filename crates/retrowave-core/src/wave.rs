//! Attention modes, the store seam of the wave index, and the counters backends report.
//!
//! With [`AttentionMode::Wave`], a backend builds a wave index over a sequence's KV after its
//! prefill ([`crate::Backend::kv_build_index`]) and lays the exact KV of the indexed tokens out in
//! cluster order behind a [`ClusterStore`]; decode steps then attend through zone plans
//! (`retrowave-index`). The CPU backend keeps the store in host memory, or, given a tiered store
//! with a disk tier (`retrowave-store`), in its host arena with the coldest clusters spilled to
//! disk; both implement the same trait.

use half::f16;
pub use retrowave_index::WaveConfig;

/// How decode steps attend to the context.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AttentionMode {
    /// Exact attention over every cached token.
    #[default]
    Full,
    /// The wave index: exact over the steady and retrieval zones, estimated over the estimation
    /// zone, the rest skipped.
    Wave(WaveConfig),
}

impl AttentionMode {
    /// `"full"` or `"wave"`.
    pub fn name(&self) -> &'static str {
        match self {
            AttentionMode::Full => "full",
            AttentionMode::Wave(_) => "wave",
        }
    }

    /// Parses `full`, `wave` (retrowave's defaults) or `wave:PRESET` (`wave:published` for the
    /// published parameters).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" | "dense" => Ok(AttentionMode::Full),
            "wave" => Ok(AttentionMode::Wave(WaveConfig::default())),
            other => match other.strip_prefix("wave:").map(WaveConfig::preset) {
                Some(Some(cfg)) => Ok(AttentionMode::Wave(cfg)),
                Some(None) => Err(format!(
                    "unknown wave preset in '{other}': expected wave:retrowave or wave:published"
                )),
                None => Err(format!(
                    "unknown attention mode '{other}': expected full, wave or wave:published"
                )),
            },
        }
    }

    /// A short label: `full`, `wave`, `wave:published` or `wave:custom`.
    pub fn label(&self) -> String {
        match self {
            AttentionMode::Full => "full".into(),
            AttentionMode::Wave(c) if *c == WaveConfig::published() => "wave:published".into(),
            AttentionMode::Wave(c) if *c == WaveConfig::retrowave() => "wave".into(),
            AttentionMode::Wave(_) => "wave:custom".into(),
        }
    }

    /// The wave configuration, if any.
    pub fn wave(&self) -> Option<&WaveConfig> {
        match self {
            AttentionMode::Full => None,
            AttentionMode::Wave(c) => Some(c),
        }
    }
}

/// One (layer, KV head) of a sequence in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadKey {
    pub layer: u32,
    pub kv_head: u32,
}

/// The exact keys and values of one cluster, `[tokens, head_dim]` each.
#[derive(Debug, Clone, Copy)]
pub struct ClusterKv<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
}

/// Errors of a cluster store.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// A cluster that was never stored.
    #[error(
        "cluster {cluster} of layer {layer}, KV head {kv_head} is not in the store ({stored} clusters stored)"
    )]
    UnknownCluster {
        layer: u32,
        kv_head: u32,
        cluster: u32,
        stored: usize,
    },
    /// Buffers whose lengths do not match the cluster sizes.
    #[error(
        "cluster append of {tokens} tokens x {head_dim} dims got {keys} key and {values} value elements"
    )]
    Shape {
        tokens: usize,
        head_dim: usize,
        keys: usize,
        values: usize,
    },
    /// The store is full.
    #[error("the KV store is full: {needed} bytes needed, {capacity} bytes of capacity")]
    Full { needed: usize, capacity: usize },
    /// The tiered store failed (host arena full and no disk room, a disk error, a checksum
    /// mismatch on read): its own message.
    #[error("the tiered KV store failed: {0}")]
    Tiered(String),
}

/// Where the exact KV of indexed tokens lives, in cluster order (pages of one cluster are
/// contiguous). Cluster ids are per head and dense, in the order they were appended, matching the
/// ids of the head's `ClusterIndex`.
pub trait ClusterStore: Send + Sync + std::fmt::Debug {
    /// Appends clusters to a head: `keys` and `values` are `[sum(sizes), head_dim]`, the members of
    /// each cluster in turn.
    fn append(
        &mut self,
        head: HeadKey,
        keys: &[f16],
        values: &[f16],
        sizes: &[u32],
    ) -> Result<(), StoreError>;
    /// Calls `f` once with the exact KV of `clusters` of `head`, in that order, as runs of
    /// contiguous rows: one run a cluster, or several (a paged store hands out one run a page).
    /// The runs stay valid for the call (a tiered store pins them and loads those on disk
    /// first).
    fn with_clusters(
        &self,
        head: HeadKey,
        clusters: &[u32],
        f: &mut dyn FnMut(&[ClusterKv<'_>]),
    ) -> Result<(), StoreError>;
    /// Bytes held.
    fn n_bytes(&self) -> usize;
    /// A copy holding the same clusters (to fork a sequence after a shared prefix).
    fn try_clone(&self) -> Result<Box<dyn ClusterStore>, StoreError>;
}

/// Counters of a sequence's wave attention, summed over its layers and KV heads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WaveStats {
    /// Tokens covered by the index (per head).
    pub indexed_tokens: usize,
    /// Clusters (per head).
    pub clusters: usize,
    /// Index updates made during decode.
    pub updates: usize,
    /// Wall time of the index build after prefill.
    pub build_seconds: f64,
    /// (layer, KV head) decode attentions run through the index.
    pub head_steps: u64,
    /// Tokens attended exactly (steady + retrieval), summed over head steps.
    pub exact_tokens: u64,
    /// Steady-zone tokens, summed over head steps.
    pub steady_tokens: u64,
    /// Retrieval clusters, summed over head steps.
    pub retrieval_clusters: u64,
    /// Estimation clusters, summed over head steps.
    pub estimation_clusters: u64,
    /// Tokens inside the estimation clusters, summed over head steps.
    pub estimated_tokens: u64,
    /// Context tokens, summed over head steps (what dense attention would have read).
    pub context_tokens: u64,
    /// Bytes of KV, centroids and summaries read, summed over head steps.
    pub bytes_read: u64,
    /// The wave buffer (the GPU block cache of retrieval clusters, `cache_ratio` times the
    /// retrieval budget per head, LRU; on the CPU backend a simulation with the store's cache
    /// policy, which measures what a GPU cache would serve on this query stream): pages of the
    /// retrieval clusters found in it, summed over head steps ...
    pub cache_hit_pages: u64,
    /// ... pages that had to be read from the host or disk tier ...
    pub cache_miss_pages: u64,
    /// ... and, of those misses, the pages of each head's first step (a cold buffer).
    pub cache_cold_pages: u64,
    /// Bytes of KV those misses copied from host memory to the GPU (a GPU backend with its KV
    /// in a host tier; 0 where nothing moves, as in the CPU backend's simulation).
    pub host_to_device_bytes: u64,
}

impl WaveStats {
    /// Adds the per-step counters of `other` (head steps, tokens, clusters, bytes); the index
    /// figures and the build time are left as they are.
    pub fn add_counters(&mut self, other: &WaveStats) {
        self.head_steps += other.head_steps;
        self.exact_tokens += other.exact_tokens;
        self.steady_tokens += other.steady_tokens;
        self.retrieval_clusters += other.retrieval_clusters;
        self.estimation_clusters += other.estimation_clusters;
        self.estimated_tokens += other.estimated_tokens;
        self.context_tokens += other.context_tokens;
        self.bytes_read += other.bytes_read;
        self.cache_hit_pages += other.cache_hit_pages;
        self.cache_miss_pages += other.cache_miss_pages;
        self.cache_cold_pages += other.cache_cold_pages;
        self.host_to_device_bytes += other.host_to_device_bytes;
    }

    /// Share of the retrieval clusters' pages the wave buffer served, after each head's first
    /// (cold) step; `None` before any warm step.
    pub fn warm_hit_ratio(&self) -> Option<f64> {
        let warm = self.cache_hit_pages + self.cache_miss_pages - self.cache_cold_pages;
        (warm > 0).then(|| self.cache_hit_pages as f64 / warm as f64)
    }
}

/// Fidelity of wave attention for one query head at one decode step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FidelitySample {
    pub layer: usize,
    pub kv_head: usize,
    /// Query head within this worker.
    pub q_head: usize,
    /// Position of the query.
    pub position: usize,
    /// `|wave - exact| / |exact|` of the attention output.
    pub rel_l2: f64,
    /// Share of the softmax mass on the steady and retrieval zones.
    pub mass_exact: f64,
    /// Share of the softmax mass on all three zones.
    pub mass_all: f64,
}
