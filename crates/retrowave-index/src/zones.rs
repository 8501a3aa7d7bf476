//! Cluster scoring for a GQA group and the split of the context into zones.

use std::ops::Range;

use crate::config::{Budgets, WaveConfig};
use crate::index::{ClusterIndex, IndexError};
use crate::kv::{ShapeError, dot};
use crate::select;

/// Scores every cluster of `index` for the query heads of one GQA group, `queries` being
/// `[heads, key_dim]`: for each head a softmax over the non-empty clusters of
/// `q . c_i * scale`, summed over the heads. Empty clusters score `-inf` (no mass).
pub fn score_clusters(
    index: &ClusterIndex,
    queries: &[f32],
    scale: f32,
) -> Result<Vec<f32>, IndexError> {
    score_clusters_with(index, queries, scale, false)
}

/// [`score_clusters`] under `cfg`: with `rank_by_size` the softmax is over
/// `q . c_i * scale + ln |C_i|`, the estimated attention mass of each cluster.
pub fn score_clusters_cfg(
    index: &ClusterIndex,
    queries: &[f32],
    scale: f32,
    cfg: &WaveConfig,
) -> Result<Vec<f32>, IndexError> {
    score_clusters_with(index, queries, scale, cfg.rank_by_size)
}

fn score_clusters_with(
    index: &ClusterIndex,
    queries: &[f32],
    scale: f32,
    by_size: bool,
) -> Result<Vec<f32>, IndexError> {
    let d = index.dims().key_dim;
    if queries.is_empty() || !queries.len().is_multiple_of(d) {
        return Err(IndexError::QueriesLen {
            len: queries.len(),
            key_dim: d,
        });
    }
    let n = index.n_clusters();
    let sizes = index.sizes();
    let mut total = vec![0f64; n];
    let mut logits = vec![f64::NEG_INFINITY; n];
    for q in queries.chunks_exact(d) {
        let mut max = f64::NEG_INFINITY;
        for (c, (logit, centroid)) in logits
            .iter_mut()
            .zip(index.centroids().chunks_exact(d))
            .enumerate()
        {
            if sizes[c] > 0 {
                *logit = dot(q, centroid) * f64::from(scale);
                if by_size {
                    *logit += f64::from(sizes[c]).ln();
                }
                max = max.max(*logit);
            }
        }
        if max == f64::NEG_INFINITY {
            continue;
        }
        let mut z = 0.0;
        for (c, logit) in logits.iter_mut().enumerate() {
            if sizes[c] > 0 {
                *logit = (*logit - max).exp();
                z += *logit;
            }
        }
        for (c, (t, &w)) in total.iter_mut().zip(&logits).enumerate() {
            if sizes[c] > 0 {
                *t += w / z;
            }
        }
    }
    Ok(total
        .iter()
        .zip(sizes)
        .map(|(&t, &s)| if s > 0 { t as f32 } else { f32::NEG_INFINITY })
        .collect())
}

/// The zone of a token in one decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Zone {
    /// Sinks, window and tokens not yet indexed: attended exactly.
    Steady,
    /// In a retrieval cluster: attended exactly.
    Retrieval,
    /// In an estimation cluster: approximated from the cluster summary.
    Estimation,
    /// In none of the above.
    Skipped,
}

/// The zones of one decode step for one (sequence, KV head).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZonePlan {
    /// Token ranges of the steady zone, ascending.
    pub steady: Vec<Range<u32>>,
    /// Retrieval clusters, in ascending id order (the store's order).
    pub retrieval: Vec<u32>,
    /// Estimation clusters, in ascending id order.
    pub estimation: Vec<u32>,
}

/// Plans the zones of a decode step over `n_tokens` tokens with the budgets of `cfg`
/// ([`ClusterIndex::budgets`]).
pub fn plan_zones(
    index: &ClusterIndex,
    scores: &[f32],
    cfg: &WaveConfig,
    n_tokens: usize,
) -> Result<ZonePlan, IndexError> {
    cfg.validate()?;
    plan_zones_with_budgets(index, scores, index.step_budgets(cfg, scores), n_tokens)
}

/// Plans the zones with explicit budgets: the steady zone is every token outside the indexed
/// range; the non-empty clusters ranked by score (descending, ties to the lower id) give the
/// first `budgets.retrieval` retrieval clusters and the next `budgets.estimation` estimation
/// clusters; each zone lists its clusters in ascending id order.
pub fn plan_zones_with_budgets(
    index: &ClusterIndex,
    scores: &[f32],
    budgets: Budgets,
    n_tokens: usize,
) -> Result<ZonePlan, IndexError> {
    check_scores(index, scores)?;
    let ranked: Vec<u32> = (0..index.n_clusters())
        .filter(|&c| index.sizes()[c] > 0)
        .map(to_u32)
        .collect::<Result<_, _>>()?;
    plan_from_ranked(index, scores, budgets, n_tokens, ranked.len(), ranked)
}

/// One score per cluster of `index`, or the error that says otherwise.
fn check_scores(index: &ClusterIndex, scores: &[f32]) -> Result<(), IndexError> {
    if scores.len() != index.n_clusters() {
        return Err(IndexError::ScoresLen {
            got: scores.len(),
            clusters: index.n_clusters(),
        });
    }
    Ok(())
}

/// A token or cluster count as a u32 id, or the error that says it does not fit.
fn to_u32(x: usize) -> Result<u32, ShapeError> {
    u32::try_from(x).map_err(|_| ShapeError::TooManyTokens {
        n_tokens: x,
        max: u32::MAX as usize,
    })
}

/// The plan with `budgets` from `candidates` (ascending ids that hold the top clusters up to
/// the budgets) out of `n_live` non-empty clusters.
fn plan_from_ranked(
    index: &ClusterIndex,
    scores: &[f32],
    budgets: Budgets,
    n_tokens: usize,
    n_live: usize,
    mut candidates: Vec<u32>,
) -> Result<ZonePlan, IndexError> {
    let indexed = index.indexed_range();
    if n_tokens < indexed.end {
        return Err(IndexError::SequenceTooShort {
            indexed_end: indexed.end,
            n_tokens,
        });
    }
    let mut steady = Vec::new();
    if indexed.start > 0 {
        steady.push(0..to_u32(indexed.start)?);
    }
    if n_tokens > indexed.end {
        steady.push(to_u32(indexed.end)?..to_u32(n_tokens)?);
    }
    let r = budgets.retrieval.min(n_live);
    let e = budgets.estimation.min(n_live - r);
    select_zones(&mut candidates, scores, r, r + e);
    Ok(ZonePlan {
        steady,
        retrieval: candidates[..r].to_vec(),
        estimation: candidates[r..r + e].to_vec(),
    })
}

/// The plan of one decode step under `cfg` with the union ranking
/// ([`WaveConfig::union_ranking`]): the budgets from the summed `scores` as [`plan_step`] has
/// them; the retrieval zone the union of each query head's own best clusters by centroid `logits`
/// (`[group][clusters]`, see [`select::union_retrieval`]); the estimation zone the next clusters
/// by summed score. The same plan as [`plan_step_union_reference`], with less work.
pub fn plan_step_union(
    index: &ClusterIndex,
    cfg: &WaveConfig,
    scores: &[f32],
    logits: &[f32],
    group: usize,
    n_tokens: usize,
) -> Result<ZonePlan, IndexError> {
    check_logits(index, logits, group)?;
    plan_step_inner(index, cfg, scores, n_tokens, Some((logits, group)))
}

/// [`plan_step_union`] the plain way: the budgets of [`ClusterIndex::step_budgets`], the
/// union's clusters (over the non-empty clusters) raised above all others by score, then
/// [`plan_zones_with_budgets`].
pub fn plan_step_union_reference(
    index: &ClusterIndex,
    cfg: &WaveConfig,
    scores: &[f32],
    logits: &[f32],
    group: usize,
    n_tokens: usize,
) -> Result<ZonePlan, IndexError> {
    check_scores(index, scores)?;
    check_logits(index, logits, group)?;
    let budgets = index.step_budgets(cfg, scores);
    let live: Vec<u32> = (0..index.n_clusters())
        .filter(|&c| index.sizes()[c] > 0)
        .map(to_u32)
        .collect::<Result<_, _>>()?;
    let mut ranked = scores.to_vec();
    select::union_boost(&mut ranked, &live, logits, group, budgets.retrieval);
    plan_zones_with_budgets(index, &ranked, budgets, n_tokens)
}

/// `group` rows of one logit per cluster of `index`, or the error that says otherwise.
fn check_logits(index: &ClusterIndex, logits: &[f32], group: usize) -> Result<(), IndexError> {
    if group == 0 || logits.len() != group * index.n_clusters() {
        return Err(IndexError::LogitsLen {
            got: logits.len(),
            heads: group,
            clusters: index.n_clusters(),
        });
    }
    Ok(())
}

/// The plan of one decode step under `cfg`: the same plan as
/// `plan_zones_with_budgets(index, scores, index.step_budgets(cfg, scores), n_tokens)`, found
/// with less work. The clusters that could be in any zone (the top `cap + estimation` by score,
/// `cap` the most retrieval clusters the adaptive budget may reach) are picked by one radix
/// selection over all clusters; the adaptive budget and the split into zones then look at those
/// candidates only.
pub fn plan_step(
    index: &ClusterIndex,
    cfg: &WaveConfig,
    scores: &[f32],
    n_tokens: usize,
) -> Result<ZonePlan, IndexError> {
    plan_step_inner(index, cfg, scores, n_tokens, None)
}

/// [`plan_step`], or with `union` (`logits`, `group`) [`plan_step_union`].
fn plan_step_inner(
    index: &ClusterIndex,
    cfg: &WaveConfig,
    scores: &[f32],
    n_tokens: usize,
    union: Option<(&[f32], usize)>,
) -> Result<ZonePlan, IndexError> {
    check_scores(index, scores)?;
    let (base, tokens, updates) = (index.base_clusters(), index.base_tokens(), index.updates());
    let fixed = cfg.fixed_step_budgets(base, tokens, updates);
    let cap = cfg.adaptive_cap(base, tokens, updates);
    // One pass over every cluster: the non-empty ones (in id order) with their keys, compacted
    // without branches; the live count and total; whether any score is unusual; and a histogram
    // of the keys' top bits (for live scores: the exponent and 3 mantissa bits), which bounds
    // the candidates before the exact selection over far fewer keys.
    let n = scores.len();
    let mut ids = vec![0u32; n];
    let mut keys = vec![0u32; n];
    let mut hist = vec![0u32; 1 << select::HIST_BITS];
    let mut w = 0;
    // Summed as `config::live_total` sums, so the total and the adaptive budget are bit for bit
    // the reference's.
    let mut live_total = crate::config::LiveTotal::new(n);
    let mut unusual = u32::try_from(n).is_err();
    for (c, (&s, &size)) in scores.iter().zip(index.sizes()).enumerate() {
        let k = select::order_key(s);
        ids[w] = c as u32;
        keys[w] = k;
        let filled = size > 0;
        w += usize::from(filled);
        hist[select::hist_bucket(k)] += u32::from(filled);
        live_total.add(c, s);
        // Scores that rank above every finite one (NaN, +inf) or live scores on empty clusters:
        // the candidates might not hold the top live scores; take the general path.
        unusual |= s.is_nan() || s == f32::INFINITY || (!filled && s > 0.0);
    }
    let (live, total) = live_total.finish();
    if unusual {
        return match union {
            Some((logits, group)) => {
                plan_step_union_reference(index, cfg, scores, logits, group, n_tokens)
            }
            None => {
                let budgets = index.step_budgets(cfg, scores);
                plan_zones_with_budgets(index, scores, budgets, n_tokens)
            }
        };
    }
    ids.truncate(w);
    keys.truncate(w);
    let n_live = ids.len();
    // The union ranking looks at every live cluster, not only the summed score's candidates.
    let live_ids = union.map(|_| ids.clone());
    let most = cap
        .unwrap_or(0)
        .max(fixed.retrieval)
        .saturating_add(fixed.estimation);
    let m_max = most.min(ids.len());
    // The candidates, in id order (ties at the threshold: the lowest ids, as the ranking has it).
    if m_max < ids.len() {
        // Every key of the top `m_max` is at least `low`: keep only those, then select exactly
        // among them.
        let low = select::candidate_floor(&hist, m_max);
        if low > 0 {
            let mut w = 0;
            for i in 0..ids.len() {
                let k = keys[i];
                ids[w] = ids[i];
                keys[w] = k;
                w += usize::from(k >= low);
            }
            ids.truncate(w);
            keys.truncate(w);
        }
        let (t, above) = select::kth_largest(&keys, m_max).unwrap_or((u32::MAX, 0));
        let mut ties = m_max - above;
        let mut w = 0;
        for i in 0..ids.len() {
            let k = keys[i];
            let tie = k == t && ties > 0;
            ties -= usize::from(tie);
            ids[w] = ids[i];
            keys[w] = k;
            w += usize::from(k > t || tie);
        }
        ids.truncate(w);
        keys.truncate(w);
    }
    let mut budgets = fixed;
    if let Some(cap) = cap {
        // Live scores rank above every other score here (no NaN or +inf), so the top `cap`
        // live scores are the top `cap` candidates.
        let cap = cap.min(live);
        if cap > 0 && total > 0.0 {
            let values: Vec<f32> = ids.iter().map(|&c| scores[c as usize]).collect();
            let mut top = crate::config::top_values(&values, &keys, cap);
            budgets.retrieval = budgets.retrieval.max(cfg.covering(&mut top, total));
        }
    }
    let (Some((logits, group)), Some(live_ids)) = (union, live_ids) else {
        return plan_from_ranked(index, scores, budgets, n_tokens, n_live, ids);
    };
    // The retrieval zone from the heads' own logits; the estimation zone the best of the
    // candidates left by summed score (the candidates hold the top `r + e` summed scores, so at
    // least `e` of them are not retrieved).
    let retrieval = select::union_retrieval(&live_ids, logits, group, budgets.retrieval);
    // Both lists ascend: the candidates not retrieved, by one merge.
    let mut chosen = retrieval.iter().copied().peekable();
    let rest: Vec<u32> = ids
        .into_iter()
        .filter(|&c| {
            while chosen.next_if(|&x| x < c).is_some() {}
            chosen.peek() != Some(&c)
        })
        .collect();
    let mut plan = plan_from_ranked(
        index,
        scores,
        Budgets {
            retrieval: 0,
            estimation: budgets.estimation.min(n_live - retrieval.len()),
        },
        n_tokens,
        n_live,
        rest,
    )?;
    plan.retrieval = retrieval;
    Ok(plan)
}

/// Puts the top `r` of `ids` (by score descending, then id ascending: a total order, since ids
/// are distinct) in `ids[..r]` and the next `m - r` in `ids[r..m]`, each part in ascending id
/// order (the order of the store and of the mean values, so the kernels walk memory forwards);
/// the rest is left in unspecified order. `ids` must be ascending. The r-th and m-th scores are
/// found by radix selection and the parts filled in one pass in id order: O(n), no sort.
fn select_zones(ids: &mut [u32], scores: &[f32], r: usize, m: usize) {
    debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must be ascending");
    let m = m.min(ids.len());
    let r = r.min(m);
    if m == 0 {
        return;
    }
    let keys: Vec<u32> = ids
        .iter()
        .map(|&c| select::order_key(scores[c as usize]))
        .collect();
    // Threshold keys and how many of the keys equal to them are still to be taken (the ones of
    // the lowest ids, since ties rank by ascending id).
    let (tm, above_m) = select::kth_largest(&keys, m).unwrap_or((u32::MAX, m));
    let (tr, above_r) = select::kth_largest(&keys, r).unwrap_or((u32::MAX, r));
    let (mut tie_m, mut tie_r) = (m - above_m, r - above_r);
    let take = |key: u32, t: u32, tie: &mut usize| {
        key > t
            || (key == t && *tie > 0 && {
                *tie -= 1;
                true
            })
    };
    let mut retrieval = Vec::with_capacity(r);
    let mut estimation = Vec::with_capacity(m - r);
    for (&c, &key) in ids.iter().zip(&keys) {
        if take(key, tm, &mut tie_m) {
            if take(key, tr, &mut tie_r) {
                retrieval.push(c);
            } else {
                estimation.push(c);
            }
        }
    }
    ids[..r].copy_from_slice(&retrieval);
    ids[r..m].copy_from_slice(&estimation);
}

impl ZonePlan {
    /// Tokens attended exactly: the steady zone, then the members of each retrieval cluster.
    pub fn exact_tokens(&self, index: &ClusterIndex) -> Result<Vec<u32>, IndexError> {
        let mut out: Vec<u32> = self.steady.iter().flat_map(|r| r.clone()).collect();
        for &c in &self.retrieval {
            let c = index.check_cluster(c)?;
            out.extend_from_slice(index.members(c).unwrap_or_default());
        }
        Ok(out)
    }

    /// The zone of every token `0..n_tokens`. A token named twice keeps its first zone in the
    /// order steady, retrieval, estimation.
    pub fn token_zones(
        &self,
        index: &ClusterIndex,
        n_tokens: usize,
    ) -> Result<Vec<Zone>, IndexError> {
        let mut zones = vec![Zone::Skipped; n_tokens];
        let mut mark = |t: usize, zone: Zone| -> Result<(), IndexError> {
            match zones.get_mut(t) {
                Some(z) if *z == Zone::Skipped => {
                    *z = zone;
                    Ok(())
                }
                Some(_) => Ok(()),
                None => Err(IndexError::Shape(ShapeError::TokenOutOfRange {
                    start: t,
                    end: t + 1,
                    n_tokens,
                })),
            }
        };
        for r in &self.steady {
            for t in r.clone() {
                mark(t as usize, Zone::Steady)?;
            }
        }
        for (clusters, zone) in [
            (&self.retrieval, Zone::Retrieval),
            (&self.estimation, Zone::Estimation),
        ] {
            for &c in clusters {
                let c = index.check_cluster(c)?;
                for &t in index.members(c).unwrap_or_default() {
                    mark(t as usize, zone)?;
                }
            }
        }
        Ok(zones)
    }
}

#[cfg(test)]
// Plans hold vectors of token ranges, often of one range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::kv::{HeadDims, KvView};

    /// Keys (1,0), (1,0), (0,1), each initialising its own cluster (average size 1, no sinks or
    /// window): the two identical keys tie and go to cluster 0, leaving cluster 1 empty.
    fn tiny() -> (ClusterIndex, WaveConfig) {
        let keys = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let values = [1.0, 2.0, 3.0];
        let dims = HeadDims {
            key_dim: 2,
            value_dim: 1,
        };
        let cfg = WaveConfig {
            sink_tokens: 0,
            window_tokens: 0,
            avg_cluster_size: 1,
            segment_tokens: 3,
            ..WaveConfig::published()
        };
        let kv = KvView::new(&keys, &values, dims).unwrap();
        (ClusterIndex::build(&kv, &cfg).unwrap(), cfg)
    }

    #[test]
    fn scores_are_summed_softmaxes_with_empty_clusters_masked() {
        let (index, cfg) = tiny();
        assert_eq!(index.sizes(), &[2, 0, 1]);
        assert_eq!(index.centroid(0), Some(&[1.0f32, 0.0][..]));
        assert_eq!(index.value_sum(0), Some(&[3.0f32][..]));
        assert_eq!(index.members(2), Some(&[2u32][..]));
        let queries = [2.0, 0.0, 0.0, 1.0];
        let scores = score_clusters(&index, &queries, 0.5).unwrap();
        let e = 1f64.exp();
        let h = 0.5f64.exp();
        let want0 = e / (e + 1.0) + 1.0 / (1.0 + h);
        let want2 = 1.0 / (e + 1.0) + h / (1.0 + h);
        assert!((f64::from(scores[0]) - want0).abs() < 1e-6, "{scores:?}");
        assert_eq!(scores[1], f32::NEG_INFINITY);
        assert!((f64::from(scores[2]) - want2).abs() < 1e-6, "{scores:?}");

        // Cluster 0 ranks first; the empty cluster is never chosen, whatever the budget.
        let budgets = Budgets {
            retrieval: 1,
            estimation: 5,
        };
        let plan = plan_zones_with_budgets(&index, &scores, budgets, 5).unwrap();
        assert_eq!(plan.steady, vec![3..5]);
        assert_eq!(plan.retrieval, vec![0]);
        assert_eq!(plan.estimation, vec![2]);
        assert_eq!(plan.exact_tokens(&index).unwrap(), vec![3, 4, 0, 1]);
        let plan = plan_zones(&index, &scores, &cfg, 3).unwrap();
        // Published budgets of 3 clusters: ceil(0.054) = 1 retrieved, ceil(0.696) = 1 estimated.
        assert_eq!((plan.retrieval.len(), plan.estimation.len()), (1, 1));
        assert_eq!(
            plan.token_zones(&index, 3).unwrap(),
            vec![Zone::Retrieval, Zone::Retrieval, Zone::Estimation]
        );
    }

    proptest::proptest! {
        /// The selection gives exactly the entries of a full sort (score descending, then id
        /// ascending) at ranks `..r` and `r..m`, each part in ascending id order, with many ties,
        /// infinities and NaNs of both signs among the scores.
        #[test]
        fn selection_equals_full_sort(
            raw in proptest::collection::vec(0u8..12, 0..200),
            m_share in 0.0f64..=1.0,
            r_share in 0.0f64..=1.0,
        ) {
            let scores: Vec<f32> = raw
                .iter()
                .map(|&x| match x {
                    8 => f32::NEG_INFINITY,
                    9 => f32::INFINITY,
                    10 => f32::NAN,
                    11 => -f32::NAN,
                    x => f32::from(x) * 0.25,
                })
                .collect();
            let n = scores.len();
            // Ids as the planner passes them: ascending, here with some left out.
            let ids: Vec<u32> = (0..n as u32).filter(|&c| raw[c as usize] != 3).collect();
            let m = ((ids.len() as f64 * m_share) as usize).min(ids.len());
            let r = ((m as f64 * r_share) as usize).min(m);
            let mut want = ids.clone();
            want.sort_by(|&a, &b| {
                scores[b as usize]
                    .total_cmp(&scores[a as usize])
                    .then(a.cmp(&b))
            });
            let (mut want_r, mut want_e) = (want[..r].to_vec(), want[r..m].to_vec());
            want_r.sort_unstable();
            want_e.sort_unstable();
            let mut got = ids;
            select_zones(&mut got, &scores, r, m);
            proptest::prop_assert_eq!(&got[..r], &want_r[..]);
            proptest::prop_assert_eq!(&got[r..m], &want_e[..]);
        }

        /// The fused step planner gives the plan of step_budgets + plan_zones_with_budgets,
        /// adaptive budgets or not, with ties, zeros, negative scores and the odd NaN or +inf.
        #[test]
        fn plan_step_equals_budgets_then_plan(
            raw in proptest::collection::vec(0u8..40, 40),
            mass in 0.0f64..=1.0,
            cap in 0.0f64..0.6,
            min_r in 0usize..6,
            retrieval in 0.0f64..0.3,
            estimation in 0.0f64..0.5,
        ) {
            let (index, _) = random_index();
            let n = index.n_clusters();
            let scores: Vec<f32> = (0..n)
                .map(|c| match raw[c % 40] {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => -1.0,
                    3 | 4 => 0.0,
                    _ if index.sizes()[c] == 0 => f32::NEG_INFINITY,
                    x => f32::from(x % 7) * 0.125 + 0.01,
                })
                .collect();
            let cfg = WaveConfig {
                retrieval_fraction: retrieval,
                estimation_fraction: estimation,
                min_retrieval_clusters: min_r,
                retrieval_mass: if mass < 0.2 { 0.0 } else { mass },
                max_retrieval_fraction: cap,
                ..WaveConfig::published()
            };
            let want = plan_zones_with_budgets(&index, &scores, index.step_budgets(&cfg, &scores), 130).unwrap();
            let got = plan_step(&index, &cfg, &scores, 130).unwrap();
            proptest::prop_assert_eq!(got, want);
            // The same without the odd scores (the fast path).
            let tame: Vec<f32> = scores.iter().zip(index.sizes()).map(|(&x, &size)| {
                if size == 0 { f32::NEG_INFINITY } else if x.is_nan() || x == f32::INFINITY { 0.5 } else { x }
            }).collect();
            let want = plan_zones_with_budgets(&index, &tame, index.step_budgets(&cfg, &tame), 130).unwrap();
            let got = plan_step(&index, &cfg, &tame, 130).unwrap();
            proptest::prop_assert_eq!(got, want);
        }

        /// The whole planner against the full-sort reference, on an index with empty clusters.
        #[test]
        fn plan_equals_full_sort_reference(
            raw in proptest::collection::vec(0u8..6, 40),
            retrieval in 0usize..45,
            estimation in 0usize..45,
        ) {
            let (index, _) = random_index();
            let n = index.n_clusters();
            let scores: Vec<f32> = (0..n)
                .map(|c| if index.sizes()[c] == 0 { f32::NEG_INFINITY } else { f32::from(raw[c % 40]) })
                .collect();
            let budgets = Budgets { retrieval, estimation };
            let got = plan_zones_with_budgets(&index, &scores, budgets, 130).unwrap();
            let mut ranked: Vec<u32> = (0..n as u32).filter(|&c| index.sizes()[c as usize] > 0).collect();
            ranked.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
            let r = retrieval.min(ranked.len());
            let e = estimation.min(ranked.len() - r);
            let (mut want_r, mut want_e) = (ranked[..r].to_vec(), ranked[r..r + e].to_vec());
            want_r.sort_unstable();
            want_e.sort_unstable();
            proptest::prop_assert_eq!(&got.retrieval, &want_r);
            proptest::prop_assert_eq!(&got.estimation, &want_e);
            proptest::prop_assert_eq!(got.steady, vec![0..2, 112..130]);
        }
    }

    /// An index of 120 tokens (2 sinks, 8 window tokens: indexed 2..112) in clusters of about 3,
    /// some empty.
    fn random_index() -> (ClusterIndex, WaveConfig) {
        let dims = HeadDims {
            key_dim: 2,
            value_dim: 1,
        };
        // Coarse keys: many duplicates, so some initial centroids end up empty.
        let keys: Vec<f32> = (0..240)
            .map(|i| ((i * 37 % 7) as f32 - 3.0) / 3.0)
            .collect();
        let values: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let cfg = WaveConfig {
            sink_tokens: 2,
            window_tokens: 8,
            avg_cluster_size: 3,
            segment_tokens: 60,
            ..WaveConfig::published()
        };
        let kv = KvView::new(&keys, &values, dims).unwrap();
        let index = ClusterIndex::build(&kv, &cfg).unwrap();
        assert!(index.sizes().contains(&0));
        assert!(index.n_clusters() <= 40);
        (index, cfg)
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (index, cfg) = tiny();
        assert!(matches!(
            score_clusters(&index, &[1.0, 2.0, 3.0], 1.0),
            Err(IndexError::QueriesLen { len: 3, key_dim: 2 })
        ));
        assert!(score_clusters(&index, &[], 1.0).is_err());
        assert!(matches!(
            plan_zones(&index, &[0.0; 2], &cfg, 3),
            Err(IndexError::ScoresLen { .. })
        ));
        assert!(matches!(
            plan_zones(&index, &[0.0; 3], &cfg, 2),
            Err(IndexError::SequenceTooShort { .. })
        ));
        let bad = ZonePlan {
            retrieval: vec![7],
            ..ZonePlan::default()
        };
        assert!(matches!(
            bad.exact_tokens(&index),
            Err(IndexError::UnknownCluster { cluster: 7, .. })
        ));
        assert!(bad.token_zones(&index, 3).is_err());
        let beyond = ZonePlan {
            steady: vec![0..9],
            ..ZonePlan::default()
        };
        assert!(beyond.token_zones(&index, 3).is_err());
    }

    /// The union retrieval by brute force: each head's competition rank of every live cluster by
    /// counting, the union key `rank * group + head`, then a sort by (key, id).
    fn union_brute(live: &[usize], logits: &[f32], group: usize, r: usize) -> Vec<usize> {
        let n = logits.len() / group;
        let mut keyed: Vec<(usize, usize)> = live
            .iter()
            .map(|&c| {
                let key = (0..group)
                    .map(|g| {
                        let lg = &logits[g * n..(g + 1) * n];
                        let rank = live
                            .iter()
                            .filter(|&&o| lg[o].total_cmp(&lg[c]).is_gt())
                            .count();
                        rank * group + g
                    })
                    .min()
                    .unwrap();
                (key, c)
            })
            .collect();
        keyed.sort_unstable();
        let mut out: Vec<usize> = keyed.iter().take(r).map(|&(_, c)| c).collect();
        out.sort_unstable();
        out
    }

    /// At the sizes where each head's candidates come from a sample (thousands of clusters
    /// against a budget of a few percent), the union is the brute force's: with ties (logits on
    /// a grid of 1/16), empty clusters or none, and a NaN logit (that head goes back to the
    /// histogram; a NaN ranks above every number, as `total_cmp` has it).
    #[test]
    fn union_retrieval_at_scale_is_the_brute_force() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for (n, group, r, all_live, nan) in [
            (3000, 3, 100, false, false),
            (2048, 4, 128, true, false),
            (5000, 2, 205, false, true),
            (1500, 7, 40, true, false),
            (8192, 4, 205, true, false),
        ] {
            let mut logits: Vec<f32> = (0..group * n)
                .map(|_| {
                    let u: f64 = (0..4).map(|_| next()).sum::<f64>() - 2.0;
                    ((u * 3.0 * 16.0).round() / 16.0) as f32
                })
                .collect();
            let live: Vec<usize> = (0..n).filter(|c| all_live || c % 37 != 5).collect();
            if nan {
                logits[n + live[live.len() / 2]] = f32::NAN;
            }
            let ids: Vec<u32> = live.iter().map(|&c| c as u32).collect();
            let got: Vec<usize> = crate::select::union_retrieval(&ids, &logits, group, r)
                .into_iter()
                .map(|c| c as usize)
                .collect();
            assert_eq!(
                got,
                union_brute(&live, &logits, group, r),
                "n {n} group {group} r {r}"
            );
        }
    }

    /// The union planner fills the budget of the summed scores (fixed or adaptive) with the
    /// union of the heads' own best clusters; the estimation zone takes the next by summed score.
    #[test]
    fn plan_step_union_takes_each_heads_best() {
        let (index, _) = random_index();
        let n = index.n_clusters();
        let live: Vec<usize> = (0..n).filter(|&c| index.sizes()[c] > 0).collect();
        // Head 0's softmax sits on the first four live clusters; head 1 prefers the last live
        // cluster, gently (its summed score stays below those four's).
        let last = *live.last().unwrap();
        let logits: Vec<f32> = (0..2 * n)
            .map(|i| {
                let c = i % n;
                match (i < n, live.iter().position(|&x| x == c)) {
                    (true, Some(k)) if k < 4 => 10.0 - 0.2 * k as f32,
                    (false, _) if c == last => 0.5,
                    _ => 0.0,
                }
            })
            .collect();
        let mut scores = vec![f32::NEG_INFINITY; n];
        for g in 0..2 {
            let lg = &logits[g * n..(g + 1) * n];
            let m = live
                .iter()
                .map(|&c| lg[c])
                .fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = live.iter().map(|&c| (lg[c] - m).exp()).sum();
            for &c in &live {
                let p = (lg[c] - m).exp() / z;
                scores[c] = if g == 0 { p } else { scores[c] + p };
            }
        }
        assert!(live.len() >= 6, "{live:?}");
        for (mass, min_r) in [(0.0, 4usize), (0.7, 2)] {
            let cfg = WaveConfig {
                min_retrieval_clusters: min_r,
                retrieval_fraction: 0.0,
                estimation_fraction: 0.2,
                retrieval_mass: mass,
                max_retrieval_fraction: 0.5,
                ..WaveConfig::published()
            };
            let budgets = index.step_budgets(&cfg, &scores);
            let r = budgets.retrieval;
            assert_eq!(r, 4, "mass {mass}");
            // Head 0's two best (keys 0, 2), head 1's best (key 1), then the lowest id of head
            // 1's tied second rank (key 3): live[2].
            let want_r = vec![live[0], live[1], live[2], last];
            assert_eq!(union_brute(&live, &logits, 2, r), want_r);
            let mut rest: Vec<usize> = live
                .iter()
                .copied()
                .filter(|c| !want_r.contains(c))
                .collect();
            rest.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut want_e: Vec<usize> = rest[..budgets.estimation.min(rest.len())].to_vec();
            want_e.sort_unstable();
            let plan = plan_step_union(&index, &cfg, &scores, &logits, 2, 130).unwrap();
            let got_r: Vec<usize> = plan.retrieval.iter().map(|&c| c as usize).collect();
            let got_e: Vec<usize> = plan.estimation.iter().map(|&c| c as usize).collect();
            assert_eq!(got_r, want_r, "mass {mass}");
            assert_eq!(got_e, want_e, "mass {mass}");
            let reference =
                plan_step_union_reference(&index, &cfg, &scores, &logits, 2, 130).unwrap();
            assert_eq!(plan, reference);
            // Without the union, the summed score keeps head 0's four clusters.
            let plain = plan_step(&index, &cfg, &scores, 130).unwrap();
            assert_ne!(plain.retrieval, plan.retrieval, "{live:?} {scores:?}");
        }
        // Logits of the wrong length are an error.
        assert!(
            plan_step_union(
                &index,
                &WaveConfig::published(),
                &scores,
                &logits[1..],
                2,
                130
            )
            .is_err()
        );
    }

    proptest::proptest! {
        /// The fused union planner gives the reference's plan (union boost, then the plain
        /// planner), and its retrieval zone is the brute-force union, with tied logits, fixed or
        /// adaptive budgets and groups of 1 to 4 heads.
        #[test]
        fn plan_step_union_equals_reference(
            raw in proptest::collection::vec(0u8..40, 40),
            lraw in proptest::collection::vec(0u8..9, 160),
            group in 1usize..5,
            mass in 0.0f64..=1.0,
            min_r in 0usize..40,
            estimation in 0.0f64..0.5,
        ) {
            let (index, _) = random_index();
            let n = index.n_clusters();
            let scores: Vec<f32> = (0..n)
                .map(|c| match (index.sizes()[c], raw[c % 40]) {
                    // Empty clusters: -inf as scoring gives them, or a zero (never chosen either).
                    (0, x) if x % 2 == 0 => f32::NEG_INFINITY,
                    (0, _) => 0.0,
                    (_, x) => f32::from(x % 9) * 0.1,
                })
                .collect();
            let logits: Vec<f32> = (0..group * n).map(|i| f32::from(lraw[i % 160]) - 4.0).collect();
            let cfg = WaveConfig {
                retrieval_fraction: 0.0,
                estimation_fraction: estimation,
                min_retrieval_clusters: min_r,
                retrieval_mass: if mass < 0.2 { 0.0 } else { mass },
                max_retrieval_fraction: 0.5,
                ..WaveConfig::published()
            };
            let want = plan_step_union_reference(&index, &cfg, &scores, &logits, group, 130).unwrap();
            let got = plan_step_union(&index, &cfg, &scores, &logits, group, 130).unwrap();
            proptest::prop_assert_eq!(&got, &want);
            let live: Vec<usize> = (0..n).filter(|&c| index.sizes()[c] > 0).collect();
            let r = index.step_budgets(&cfg, &scores).retrieval;
            let brute: Vec<u32> = union_brute(&live, &logits, group, r).iter().map(|&c| c as u32).collect();
            proptest::prop_assert_eq!(&got.retrieval, &brute);
        }
    }
}
