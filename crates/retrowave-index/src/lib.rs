//! The wave index: a pure, exact CPU reference of the sparse decode attention that retrowave
//! implements (see `docs/retroinfer.md`).
//!
//! The crate does no I/O and starts no threads. Every input is a plain `f32` slice with explicit
//! dimensions: keys are `[n_tokens, key_dim]` and values `[n_tokens, value_dim]`, row-major, one KV
//! head of one sequence, wrapped in a [`KvView`]. The pieces, in the order a decode step uses them:
//!
//! - [`WaveConfig`]: every parameter of the method, with the published defaults
//!   ([`WaveConfig::published`]) and validation.
//! - [`kmeans()`]: segmented spherical k-means with mean-centring, producing a [`Clustering`].
//! - [`ClusterIndex`]: centroids, sizes, value sums and member lists of one (sequence, KV head),
//!   with [`ClusterIndex::append_segment`] for index updates during decode.
//! - [`score_clusters`]: per-cluster scores of a GQA group of query heads.
//! - [`plan_zones`]: the [`ZonePlan`] (steady token ranges, retrieval and estimation clusters).
//! - [`exact`], [`estimate`], [`merge`] and [`attend`]: attention [`Partial`]s and their
//!   log-sum-exp merge.
//! - [`fidelity()`]: how close [`attend`] comes to [`dense`] for one query head, and the share of
//!   the softmax mass each zone covers.

pub mod attention;
pub mod config;
pub mod fidelity;
pub mod index;
pub mod kmeans;
pub mod kv;
pub mod select;
pub mod zones;

pub use attention::{
    AttentionError, Partial, attend, dense, estimate, estimate_clusters, exact, merge,
};
pub use config::{Budgets, ConfigError, WaveConfig};
pub use fidelity::{Fidelity, fidelity};
pub use index::{ClusterIndex, IndexError};
pub use kmeans::{Clustering, Segment, kmeans, kmeans_segments, segments};
pub use kv::{HeadDims, KvView, ShapeError};
pub use zones::{
    Zone, ZonePlan, plan_step, plan_step_union, plan_step_union_reference, plan_zones,
    plan_zones_with_budgets, score_clusters, score_clusters_cfg,
};
