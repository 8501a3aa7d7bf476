//! Property tests of the wave index on random keys, values and queries.

use proptest::prelude::*;
use retrowave_index::{
    ClusterIndex, HeadDims, KvView, Partial, WaveConfig, Zone, attend, dense, estimate, exact,
    merge, plan_zones, score_clusters,
};

/// A small deterministic generator (xorshift64*), so one seed gives one data set.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1); with `coarse`, one of -1, -0.5, 0, 0.5 (many ties and duplicates).
    fn float(&mut self, coarse: bool) -> f32 {
        if coarse {
            (self.next() % 4) as f32 * 0.5 - 1.0
        } else {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    fn floats(&mut self, n: usize, coarse: bool) -> Vec<f32> {
        (0..n).map(|_| self.float(coarse)).collect()
    }
}

/// One random case: a sequence of KV, a configuration and query heads of one GQA group.
#[derive(Debug, Clone)]
struct Case {
    dims: HeadDims,
    keys: Vec<f32>,
    values: Vec<f32>,
    queries: Vec<f32>,
    cfg: WaveConfig,
}

impl Case {
    fn n_tokens(&self) -> usize {
        self.keys.len() / self.dims.key_dim
    }

    fn kv(&self) -> KvView<'_> {
        KvView::new(&self.keys, &self.values, self.dims).unwrap()
    }

    /// The KV of the first `n` tokens.
    fn prefix(&self, n: usize) -> KvView<'_> {
        KvView::new(
            &self.keys[..n * self.dims.key_dim],
            &self.values[..n * self.dims.value_dim],
            self.dims,
        )
        .unwrap()
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dims.key_dim as f32).sqrt()
    }

    /// Builds the index on a prefill prefix of `prefill` tokens, then runs the decode-time
    /// updates token by token up to the full sequence.
    fn index(&self, prefill: usize) -> ClusterIndex {
        let mut index = ClusterIndex::build(&self.prefix(prefill), &self.cfg).unwrap();
        for n in prefill + 1..=self.n_tokens() {
            if let Some(range) = index.pending_update(&self.cfg, n) {
                index
                    .append_segment(&self.prefix(n), range, &self.cfg)
                    .unwrap();
                // After an update only the window stays outside the index at the end.
                assert_eq!(n - index.indexed_range().end, self.cfg.window_tokens);
            }
        }
        index
    }
}

fn cases() -> impl Strategy<Value = Case> {
    (
        (1usize..260, 1usize..7, 1usize..5, 1usize..4),
        (0usize..6, 0usize..24, 1usize..9, 0usize..60, 0usize..5),
        (1usize..40, 1usize..12),
        (any::<u64>(), any::<bool>()),
    )
        .prop_map(
            |(
                (n, d, dv, heads),
                (sink, window, avg, extra, iters),
                (interval, cpu),
                (seed, coarse),
            )| {
                let mut rng = Rng::new(seed);
                let cfg = WaveConfig {
                    sink_tokens: sink,
                    window_tokens: window,
                    avg_cluster_size: avg,
                    segment_tokens: avg + extra,
                    kmeans_iterations: iters,
                    update_interval: interval,
                    clusters_per_update: cpu.min(interval),
                    ..WaveConfig::published()
                };
                Case {
                    dims: HeadDims {
                        key_dim: d,
                        value_dim: dv,
                    },
                    keys: rng.floats(n * d, coarse),
                    values: rng.floats(n * dv, false),
                    queries: rng
                        .floats(heads * d, false)
                        .iter()
                        .map(|x| 3.0 * x)
                        .collect(),
                    cfg,
                }
            },
        )
}

/// Every indexed token in exactly one cluster, nothing else in any; sizes, value sums and
/// centroids equal to their definitions over the members.
fn check_invariants(case: &Case, index: &ClusterIndex) -> Result<(), TestCaseError> {
    let kv = case.kv();
    let range = index.indexed_range();
    let (d, dv) = (case.dims.key_dim, case.dims.value_dim);
    let mut seen = vec![0u32; case.n_tokens()];
    prop_assert_eq!(index.offsets().len(), index.n_clusters() + 1);
    prop_assert_eq!(index.centroids().len(), index.n_clusters() * d);
    prop_assert_eq!(index.value_sums().len(), index.n_clusters() * dv);
    for c in 0..index.n_clusters() {
        let members = index.members(c).unwrap();
        prop_assert_eq!(members.len(), index.sizes()[c] as usize);
        prop_assert!(members.windows(2).all(|w| w[0] < w[1]));
        let mut key_sum = vec![0f64; d];
        let mut value_sum = vec![0f64; dv];
        for &t in members {
            let t = t as usize;
            prop_assert!(range.contains(&t), "token {} outside {:?}", t, range);
            seen[t] += 1;
            for (s, &x) in key_sum.iter_mut().zip(kv.key(t).unwrap()) {
                *s += f64::from(x);
            }
            for (s, &x) in value_sum.iter_mut().zip(kv.value(t).unwrap()) {
                *s += f64::from(x);
            }
        }
        for (&got, want) in index.value_sum(c).unwrap().iter().zip(value_sum) {
            prop_assert!((f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()));
        }
        let n = members.len().max(1) as f64;
        for (&got, want) in index.centroid(c).unwrap().iter().zip(key_sum) {
            prop_assert!((f64::from(got) - want / n).abs() <= 1e-5);
        }
    }
    for (t, &count) in seen.iter().enumerate() {
        prop_assert_eq!(count, u32::from(range.contains(&t)), "token {}", t);
    }
    Ok(())
}

fn close(a: &Partial, b: &Partial, tol: f32) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.out.len(), b.out.len());
    for (x, y) in a.out.iter().zip(&b.out) {
        prop_assert!((x - y).abs() <= tol, "{:?} vs {:?}", a, b);
    }
    if a.is_empty() || b.is_empty() {
        prop_assert_eq!(a.is_empty(), b.is_empty());
    } else {
        prop_assert!(
            (a.lse - b.lse).abs() <= tol * (1.0 + a.lse.abs()),
            "{:?} vs {:?}",
            a,
            b
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn build_keeps_invariants(case in cases()) {
        let kv = case.kv();
        let index = ClusterIndex::build(&kv, &case.cfg).unwrap();
        let n = case.n_tokens();
        let start = case.cfg.sink_tokens.min(n);
        prop_assert_eq!(
            index.indexed_range(),
            start..n.saturating_sub(case.cfg.window_tokens).max(start)
        );
        check_invariants(&case, &index)?;
        prop_assert_eq!(&ClusterIndex::build(&kv, &case.cfg).unwrap(), &index);
    }

    #[test]
    fn updates_keep_invariants(case in cases(), prefill_share in 0.0f64..1.0) {
        let n = case.n_tokens();
        let prefill = ((n as f64 * prefill_share) as usize).max(1);
        let built = ClusterIndex::build(&case.prefix(prefill), &case.cfg).unwrap();
        let index = case.index(prefill);
        check_invariants(&case, &index)?;
        // Old clusters are untouched; the updates cover all but the window and recent tokens.
        let c0 = built.n_clusters();
        prop_assert_eq!(&index.sizes()[..c0], built.sizes());
        prop_assert_eq!(&index.centroids()[..built.centroids().len()], built.centroids());
        let tail = n - index.indexed_range().end;
        prop_assert!(tail < case.cfg.window_tokens + case.cfg.update_interval);
        if index.updates() > 0 {
            prop_assert!(tail >= case.cfg.window_tokens);
        }
        prop_assert!(index.pending_update(&case.cfg, n).is_none());
    }

    #[test]
    fn zones_partition_the_context(case in cases(), r in 0.0f64..1.0, e in 0.0f64..1.0) {
        let cfg = WaveConfig {
            retrieval_fraction: r,
            estimation_fraction: e * (1.0 - r),
            ..case.cfg.clone()
        };
        let case = Case { cfg, ..case };
        let n = case.n_tokens();
        let index = case.index(n / 2 + 1);
        let scores = score_clusters(&index, &case.queries, case.scale()).unwrap();
        let plan = plan_zones(&index, &scores, &case.cfg, n).unwrap();
        // Count every token's appearances across the zones: at most one.
        let mut count = vec![0u32; n];
        for range in &plan.steady {
            for t in range.clone() {
                count[t as usize] += 1;
            }
        }
        for &c in plan.retrieval.iter().chain(&plan.estimation) {
            for &t in index.members(c as usize).unwrap() {
                count[t as usize] += 1;
            }
        }
        prop_assert!(count.iter().all(|&c| c <= 1));
        let zones = plan.token_zones(&index, n).unwrap();
        for (t, (&c, &z)) in count.iter().zip(&zones).enumerate() {
            prop_assert_eq!(c == 0, z == Zone::Skipped, "token {}", t);
        }
        // Steady zone = all tokens outside the indexed range.
        let range = index.indexed_range();
        for (t, &z) in zones.iter().enumerate() {
            prop_assert_eq!(z == Zone::Steady, !range.contains(&t), "token {}", t);
        }
        // Budgets honoured and ranking respected; empty clusters never chosen.
        let budgets = index.budgets(&case.cfg);
        let non_empty = index.sizes().iter().filter(|&&s| s > 0).count();
        prop_assert_eq!(plan.retrieval.len(), budgets.retrieval.min(non_empty));
        prop_assert_eq!(
            plan.estimation.len(),
            budgets.estimation.min(non_empty - plan.retrieval.len())
        );
        // Each zone in ascending id order; every retrieval cluster outranks every estimation
        // cluster, which outranks every cluster left out.
        prop_assert!(plan.retrieval.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(plan.estimation.windows(2).all(|w| w[0] < w[1]));
        let min_of = |zone: &[u32]| zone.iter().map(|&c| scores[c as usize]).fold(f32::INFINITY, f32::min);
        let max_of = |zone: &[u32]| zone.iter().map(|&c| scores[c as usize]).fold(f32::NEG_INFINITY, f32::max);
        prop_assert!(min_of(&plan.retrieval) >= max_of(&plan.estimation));
        let chosen: Vec<u32> = plan.retrieval.iter().chain(&plan.estimation).copied().collect();
        let floor = min_of(&chosen);
        prop_assert_eq!(scores.len(), index.n_clusters());
        for (c, (&score, &size)) in scores.iter().zip(index.sizes()).enumerate() {
            if !chosen.contains(&(c as u32)) {
                prop_assert!(score <= floor);
            } else {
                prop_assert!(size > 0);
            }
            if size == 0 {
                prop_assert_eq!(score, f32::NEG_INFINITY);
            } else {
                prop_assert!(score >= 0.0);
            }
        }
        let heads = case.queries.len() / case.dims.key_dim;
        let mass: f32 = scores.iter().filter(|s| s.is_finite()).sum();
        if non_empty > 0 {
            prop_assert!((mass - heads as f32).abs() < 1e-4);
        }
    }

    #[test]
    fn estimation_equals_attention_over_centroid_copies(case in cases(), pick in any::<u64>()) {
        let n = case.n_tokens();
        let index = case.index(n);
        let (d, dv) = (case.dims.key_dim, case.dims.value_dim);
        let mut rng = Rng::new(pick);
        let plan = retrowave_index::ZonePlan {
            steady: Vec::new(),
            retrieval: Vec::new(),
            estimation: (0..index.n_clusters() as u32).filter(|_| rng.next().is_multiple_of(2)).collect(),
        };
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for &c in &plan.estimation {
            let c = c as usize;
            let size = index.sizes()[c];
            for _ in 0..size {
                keys.extend_from_slice(index.centroid(c).unwrap());
                values.extend(index.value_sum(c).unwrap().iter().map(|&v| v / size as f32));
            }
        }
        let copies = KvView::new(&keys, &values, case.dims).unwrap();
        let all: Vec<u32> = (0..copies.n_tokens() as u32).collect();
        prop_assert_eq!(keys.len(), all.len() * d);
        prop_assert_eq!(values.len(), all.len() * dv);
        for q in case.queries.chunks_exact(d) {
            let want = exact(&copies, &all, q, case.scale()).unwrap();
            let got = estimate(&index, &plan, q, case.scale()).unwrap();
            close(&got, &want, 1e-5)?;
        }
    }

    #[test]
    fn full_retrieval_equals_dense(case in cases()) {
        let cfg = WaveConfig {
            retrieval_fraction: 1.0,
            estimation_fraction: 0.0,
            retrieval_growth: case.cfg.clusters_per_update,
            ..case.cfg.clone()
        };
        let case = Case { cfg, ..case };
        let n = case.n_tokens();
        let index = case.index(n / 3 + 1);
        let scores = score_clusters(&index, &case.queries, case.scale()).unwrap();
        let plan = plan_zones(&index, &scores, &case.cfg, n).unwrap();
        prop_assert!(plan.estimation.is_empty());
        let zones = plan.token_zones(&index, n).unwrap();
        prop_assert!(zones.iter().all(|&z| z != Zone::Skipped));
        let kv = case.kv();
        for q in case.queries.chunks_exact(case.dims.key_dim) {
            let wave = attend(&kv, &index, &plan, q, case.scale()).unwrap();
            close(&wave, &dense(&kv, q, case.scale()).unwrap(), 1e-5)?;
        }
    }

    #[test]
    fn merge_is_associative_and_commutative(case in cases(), split in any::<u64>()) {
        let kv = case.kv();
        let mut rng = Rng::new(split);
        let mut parts = [Vec::new(), Vec::new(), Vec::new()];
        for t in 0..case.n_tokens() as u32 {
            parts[(rng.next() % 3) as usize].push(t);
        }
        let q = &case.queries[..case.dims.key_dim];
        let s = case.scale();
        let [a, b, c] = parts.map(|p| exact(&kv, &p, q, s).unwrap());
        let left = merge(&merge(&a, &b).unwrap(), &c).unwrap();
        let right = merge(&a, &merge(&b, &c).unwrap()).unwrap();
        let swapped = merge(&c, &merge(&b, &a).unwrap()).unwrap();
        let whole = dense(&kv, q, s).unwrap();
        close(&left, &right, 1e-5)?;
        close(&left, &swapped, 1e-5)?;
        close(&left, &whole, 1e-5)?;
        close(&merge(&a, &Partial::empty(case.dims.value_dim)).unwrap(), &a, 0.0)?;
    }
}
