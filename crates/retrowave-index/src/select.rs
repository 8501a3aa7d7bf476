//! Rank selection without sorting everything: the k-th largest of a set of scores by a radix
//! histogram over their bits (O(n), a few microseconds for the 8192 clusters of a 128K-token
//! head), used to split the clusters into zones.

/// An unsigned key with the order of [`f32::total_cmp`]: `order_key(a) < order_key(b)` exactly
/// when `a.total_cmp(&b)` is `Less` (negative NaNs first, then -inf, ..., +inf, positive NaNs).
#[inline]
pub fn order_key(x: f32) -> u32 {
    let bits = x.to_bits();
    // Negative numbers: flip every bit (larger magnitude sorts lower); others: flip the sign.
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Top key bits of the candidate histograms of the planners ([`hist_bucket`]): for positive
/// scores the sign, the exponent and 3 mantissa bits (buckets an eighth of an octave wide).
pub(crate) const HIST_BITS: u32 = 12;

/// The bucket of `key` in a candidate histogram of `1 << HIST_BITS` buckets.
#[inline]
pub(crate) fn hist_bucket(key: u32) -> usize {
    (key >> (32 - HIST_BITS)) as usize
}

/// The smallest key of the highest buckets of `hist` (counts by [`hist_bucket`]) that together
/// hold at least `want` keys, 0 when that takes every bucket: the best `want` keys are all at
/// least this, so the exact selection need only look at those.
pub(crate) fn candidate_floor(hist: &[u32], want: usize) -> u32 {
    let mut b = hist.len() - 1;
    let mut seen = hist[b] as usize;
    while seen < want && b > 0 {
        b -= 1;
        seen += hist[b] as usize;
    }
    (b as u32) << (32 - HIST_BITS)
}

/// The `k`-th largest of `keys` (1-based: `k = 1` is the maximum) and how many keys are
/// strictly larger than it. `None` when `k` is 0 or larger than `keys.len()`.
///
/// One histogram pass over the 11 highest bits in which the keys differ (scores of one head sit
/// in a narrow range of exponents, so fixed top bits would put them all in a few buckets), then
/// a sort of the keys of the one bucket that holds the answer, or when that bucket holds more
/// than 256 keys, the same again over its keys.
pub fn kth_largest(keys: &[u32], k: usize) -> Option<(u32, usize)> {
    if k == 0 || k > keys.len() {
        return None;
    }
    let (lo, hi) = keys
        .iter()
        .fold((u32::MAX, 0u32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    if lo == hi {
        return Some((hi, 0));
    }
    // Bits above `top` are equal in every key; the bucket is the 11 bits below it.
    let top = 32 - (lo ^ hi).leading_zeros();
    let shift = top.saturating_sub(11);
    let mask = (1u32 << (top - shift)) - 1;
    // Two interleaved histograms, so that runs of keys in one bucket do not chain their
    // increments through memory.
    let mut hist = [[0u32; 1 << 11]; 2];
    let mut pairs = keys.chunks_exact(2);
    for p in &mut pairs {
        hist[0][((p[0] >> shift) & mask) as usize] += 1;
        hist[1][((p[1] >> shift) & mask) as usize] += 1;
    }
    for &x in pairs.remainder() {
        hist[0][((x >> shift) & mask) as usize] += 1;
    }
    let mut rest = k;
    let mut above = 0;
    let mut b = mask as usize;
    loop {
        let c = (hist[0][b] + hist[1][b]) as usize;
        if c >= rest || b == 0 {
            break;
        }
        rest -= c;
        above += c;
        b -= 1;
    }
    let mut bucket: Vec<u32> = keys
        .iter()
        .copied()
        .filter(|&x| ((x >> shift) & mask) as usize == b)
        .collect();
    // A crowded bucket (keys of a narrow range, such as one head's logits, fill a few) gets
    // another histogram pass over its lower bits instead of a sort.
    if bucket.len() > 256 {
        let (key, more) = kth_largest(&bucket, rest)?;
        return Some((key, above + more));
    }
    bucket.sort_unstable_by(|a, b| b.cmp(a));
    let key = bucket[rest - 1];
    Some((key, above + bucket.iter().take_while(|&&x| x > key).count()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn special(x: u8) -> f32 {
        match x {
            0 => f32::NEG_INFINITY,
            1 => f32::INFINITY,
            2 => f32::NAN,
            3 => -f32::NAN,
            4 => -0.0,
            5 => 0.0,
            6 => -1.5,
            7 => f32::MIN_POSITIVE,
            x => f32::from(x) * 0.37 - 20.0,
        }
    }

    proptest::proptest! {
        #[test]
        fn order_key_follows_total_cmp(a in 0u8..80, b in 0u8..80, x in proptest::num::f32::ANY, y in proptest::num::f32::ANY) {
            for (p, q) in [(special(a), special(b)), (x, y), (special(a), y)] {
                proptest::prop_assert_eq!(order_key(p).cmp(&order_key(q)), p.total_cmp(&q));
            }
        }

        #[test]
        fn kth_largest_equals_sorting(
            raw in proptest::collection::vec(proptest::num::u32::ANY, 1..300),
            ties in proptest::collection::vec(0u8..40, 0..300),
            k_share in 0.0f64..=1.0,
        ) {
            // Random keys and many repeated ones.
            let keys: Vec<u32> = raw.iter().copied().chain(ties.iter().map(|&t| order_key(special(t)))).collect();
            let k = ((keys.len() as f64 * k_share) as usize).clamp(1, keys.len());
            let mut sorted = keys.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let want = sorted[k - 1];
            let above = sorted.iter().filter(|&&x| x > want).count();
            proptest::prop_assert_eq!(kth_largest(&keys, k), Some((want, above)));
        }
    }

    /// Keys crowded into a few buckets (logits of one head: a narrow range of exponents) go
    /// through the further passes; the answer is still the sort's.
    #[test]
    fn crowded_buckets_equal_sorting() {
        let mut x = 99u64;
        let keys: Vec<u32> = (0..20000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = 1.0 + (x >> 40) as f32 / (1u64 << 24) as f32;
                order_key(if i % 5 == 0 { 1.5 } else { v })
            })
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        for k in [1, 100, 4000, 4001, 12345, 20000] {
            let want = sorted[k - 1];
            let above = sorted.iter().filter(|&&y| y > want).count();
            assert_eq!(kth_largest(&keys, k), Some((want, above)), "k {k}");
        }
    }

    #[test]
    fn out_of_range_ranks() {
        assert_eq!(kth_largest(&[1, 2, 3], 0), None);
        assert_eq!(kth_largest(&[1, 2, 3], 4), None);
        assert_eq!(kth_largest(&[], 1), None);
        assert_eq!(kth_largest(&[7, 7, 7], 3), Some((7, 0)));
        assert_eq!(kth_largest(&[u32::MAX, 0], 2), Some((0, 1)));
    }
}
#[cfg(test)]
mod timing {
    #[test]
    #[ignore = "timing"]
    fn time_kth() {
        let mut x = 12345u64;
        let scores: Vec<f32> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 0.001
            })
            .collect();
        let t = std::time::Instant::now();
        let mut s = 0;
        for i in 0..1000 {
            let keys: Vec<u32> = scores.iter().map(|&v| super::order_key(v)).collect();
            s += super::kth_largest(&keys, 205 + i % 3).unwrap().1;
        }
        println!("kth: {:.1} us ({s})", t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        for i in 0..1000 {
            let mut keys: Vec<u32> = scores.iter().map(|&v| super::order_key(v)).collect();
            keys.select_nth_unstable(205 + i % 3);
            s += keys[3] as usize;
        }
        println!(
            "select_nth: {:.1} us ({s})",
            t.elapsed().as_secs_f64() * 1e3
        );
    }

    /// The union ranking's cost for one 128K-token unit (8192 clusters, a group of 4).
    #[test]
    #[ignore = "timing"]
    fn time_union() {
        let (n, g) = (8192usize, 4usize);
        let mut x = 777u64;
        let logits: Vec<f32> = (0..n * g)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        let live: Vec<u32> = (0..n as u32).collect();
        let t = std::time::Instant::now();
        let mut s = 0;
        for i in 0..200 {
            s += super::union_retrieval(&live, &logits, g, 147 + i % 3)[5] as usize;
        }
        println!(
            "union: {:.1} us ({s})",
            t.elapsed().as_secs_f64() * 1e6 / 200.0
        );
    }
}

/// The retrieval clusters of the union ranking ([`crate::WaveConfig::union_ranking`]): the
/// union of each query head's own best `k` clusters by centroid logit, `k` as large as `r`
/// allows. Each head ranks the `live` clusters (ascending ids) by its logit (`logits` is
/// `[group][n]`; a cluster's rank is how many live clusters have a larger logit, so ties share
/// a rank); a cluster's union key is its best rank times `group` plus that head; the `r`
/// clusters of smallest key are chosen (ties to the lowest id), in ascending id order. Fewer than
/// `r` live clusters are all chosen. O(group x n): two passes a head over its logits, then work
/// on its few candidates only.
pub fn union_retrieval(live: &[u32], logits: &[f32], group: usize, r: usize) -> Vec<u32> {
    let want = r.min(live.len());
    if group == 0 || want == 0 {
        return Vec::new();
    }
    assert_eq!(logits.len() % group, 0, "logits must be [group][n]");
    let n = logits.len() / group;
    let mut best = vec![u32::MAX; live.len()];
    let mut keys = vec![0u32; live.len()];
    let mut cand: Vec<(u32, u32)> = Vec::new();
    let mut ckeys: Vec<u32> = Vec::new();
    let mut above: Vec<u32> = Vec::with_capacity(want);
    for g in 0..group {
        let lg = &logits[g * n..(g + 1) * n];
        // One pass: the keys and a histogram of their top bits, which bounds the candidates
        // among which the exact selection runs.
        let mut hist = [0u32; 1 << HIST_BITS];
        for (k, &c) in keys.iter_mut().zip(live) {
            *k = order_key(lg[c as usize]);
            hist[hist_bucket(*k)] += 1;
        }
        let floor = candidate_floor(&hist, want);
        cand.clear();
        cand.extend(
            keys.iter()
                .enumerate()
                .filter(|(_, k)| **k >= floor)
                .map(|(i, &k)| (k, i as u32)),
        );
        ckeys.clear();
        ckeys.extend(cand.iter().map(|x| x.0));
        let (t, _) = kth_largest(&ckeys, want).expect("the candidates hold the best `want`");
        above.clear();
        above.extend(ckeys.iter().copied().filter(|&k| k > t));
        above.sort_unstable_by(|a, b| b.cmp(a));
        for &(k, i) in &cand {
            if k >= t {
                let rank = above.partition_point(|&x| x > k) as u32;
                let b = &mut best[i as usize];
                *b = (*b).min(rank * group as u32 + g as u32);
            }
        }
    }
    // The `want` smallest union keys, ties to the lowest id, among the clusters in some head's
    // best `want` (head 0 alone has `want` of them).
    let mut cand: Vec<(u32, u32)> = best
        .iter()
        .zip(live)
        .filter(|(b, _)| **b != u32::MAX)
        .map(|(&b, &c)| (b, c))
        .collect();
    if want < cand.len() {
        cand.select_nth_unstable(want - 1);
        cand.truncate(want);
    }
    let mut out: Vec<u32> = cand.into_iter().map(|(_, c)| c).collect();
    out.sort_unstable();
    out
}

/// [`union_retrieval`] over the `live` clusters as a ranking: the chosen clusters' `scores` are
/// raised to `+inf`, above every summed softmax, so that they are the first `r` of any ranking
/// by `scores` (ties by id); the other scores are left as they are.
pub fn union_boost(scores: &mut [f32], live: &[u32], logits: &[f32], group: usize, r: usize) {
    for c in union_retrieval(live, logits, group, r) {
        scores[c as usize] = f32::INFINITY;
    }
}

#[cfg(test)]
mod union_tests {
    use super::*;

    /// The union of each head's best `k`, `k` as large as `r` allows: one head's concentrated
    /// softmax cannot crowd another head's best clusters out, ties in a head share a rank, the
    /// last level goes by head then id, and empty clusters are never chosen.
    #[test]
    fn union_takes_each_heads_best_k() {
        // 6 clusters, 2 heads; cluster 5 empty. Head 0 prefers 0 > 1 > 2, head 1 prefers 3 > 4.
        let logits = [
            9.0, 8.0, 7.0, 0.0, -1.0, 50.0, // head 0
            0.0, 0.0, -5.0, 3.0, 2.0, 60.0, // head 1
        ];
        // Summed softmax: head 0's mass sits on 0 and 1; 3 and 4 score low.
        let base = [1.2f32, 0.5, 0.1, 0.15, 0.05, f32::NEG_INFINITY];
        let live = [0u32, 1, 2, 3, 4];
        // Keys: rank x 2 + head. Head 0: 0 -> 0, 1 -> 2, 2 -> 4; head 1: 3 -> 1, 4 -> 3.
        assert_eq!(union_retrieval(&live, &logits, 2, 1), vec![0]);
        assert_eq!(union_retrieval(&live, &logits, 2, 2), vec![0, 3]);
        assert_eq!(union_retrieval(&live, &logits, 2, 3), vec![0, 1, 3]);
        assert_eq!(union_retrieval(&live, &logits, 2, 4), vec![0, 1, 3, 4]);
        let mut s = base;
        union_boost(&mut s, &live, &logits, 2, 3);
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        assert_eq!(&order[..3], &[0, 1, 3]);
        assert_eq!(&order[3..], &[2, 4, 5]);
        assert_eq!(s[5], f32::NEG_INFINITY);
        assert_eq!((s[2], s[4]), (base[2], base[4]));
        // More wanted than live: every live cluster is chosen, the empty one is not.
        let mut s = base;
        union_boost(&mut s, &live, &logits, 2, 10);
        assert!(s[..5].iter().all(|&x| x > 4.0));
        assert_eq!(s[5], f32::NEG_INFINITY);
        // Heads that agree: the union of the best k is each head's best k.
        let same = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let all = [0u32, 1, 2, 3, 4, 5];
        assert_eq!(union_retrieval(&all, &same, 2, 4), vec![0, 1, 2, 3]);
        // Ties within a head share a rank: 0 and 1 both have head 0's rank 0 (key 0) and come
        // before head 1's best, 3 (key 1); cluster 2 has head 0's rank 2 (key 4), after head
        // 1's second, 4 (key 3). Equal keys go to the lowest id.
        let tied = [7.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0];
        assert_eq!(union_retrieval(&all, &tied, 2, 1), vec![0]);
        assert_eq!(union_retrieval(&all, &tied, 2, 3), vec![0, 1, 3]);
        assert_eq!(union_retrieval(&all, &tied, 2, 4), vec![0, 1, 3, 4]);
        assert_eq!(union_retrieval(&all, &tied, 2, 5), vec![0, 1, 2, 3, 4]);
    }
}
