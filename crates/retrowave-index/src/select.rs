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

/// The `k`-th largest of `keys` (1-based: `k = 1` is the maximum) and how many keys are
/// strictly larger than it. `None` when `k` is 0 or larger than `keys.len()`.
///
/// One histogram pass over the 11 highest bits in which the keys differ (scores of one head sit
/// in a narrow range of exponents, so fixed top bits would put them all in a few buckets), then
/// a sort of the keys of the one bucket that holds the answer.
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
}

/// The round-robin union ranking of [`crate::WaveConfig::union_ranking`]: raises above every
/// other score (by more than the `group` a summed softmax can reach) the `r` clusters that the
/// query heads choose in turn, each its next best by its own logit (`logits` is `[group][n]`,
/// ties to the lowest id), so that they are the first `r` of any ranking by `scores`, in the
/// order chosen. Empty clusters (`scores` of `-inf`) are never chosen; fewer than `r` live
/// clusters are all chosen. The other scores are left as they are.
pub fn union_boost(scores: &mut [f32], logits: &[f32], group: usize, r: usize) {
    let n = scores.len();
    if group == 0 || n == 0 || r == 0 {
        return;
    }
    assert_eq!(logits.len(), group * n, "logits must be [group][n]");
    let live: Vec<u32> = (0..n as u32)
        .filter(|&c| scores[c as usize] != f32::NEG_INFINITY)
        .collect();
    let want = r.min(live.len());
    // Each head's best `want` live clusters, best first.
    let orders: Vec<Vec<u32>> = (0..group)
        .map(|g| {
            let lg = &logits[g * n..(g + 1) * n];
            let better =
                |a: &u32, b: &u32| lg[*b as usize].total_cmp(&lg[*a as usize]).then(a.cmp(b));
            let mut ids = live.clone();
            if want < ids.len() {
                ids.select_nth_unstable_by(want - 1, better);
                ids.truncate(want);
            }
            ids.sort_unstable_by(better);
            ids
        })
        .collect();
    let mut chosen = vec![false; n];
    let mut picked = 0usize;
    let top = group as f32 + 1.0;
    'rounds: for i in 0..want {
        for order in &orders {
            let c = order[i] as usize;
            if !chosen[c] {
                chosen[c] = true;
                scores[c] += top + (want - picked) as f32;
                picked += 1;
                if picked == want {
                    break 'rounds;
                }
            }
        }
    }
}

#[cfg(test)]
mod union_tests {
    use super::*;

    /// The clusters come out of the union in round-robin order, one head's concentrated softmax
    /// cannot crowd another head's best clusters out, and empty clusters are never chosen.
    #[test]
    fn union_boost_takes_each_heads_best_in_turn() {
        // 6 clusters, 2 heads; cluster 5 empty. Head 0 prefers 0 > 1 > 2, head 1 prefers 3 > 4.
        let logits = [
            9.0, 8.0, 7.0, 0.0, -1.0, 50.0, // head 0
            0.0, 0.0, -5.0, 3.0, 2.0, 60.0, // head 1
        ];
        // Summed softmax: head 0's mass sits on 0 and 1; 3 and 4 score low.
        let base = [1.2f32, 0.5, 0.1, 0.15, 0.05, f32::NEG_INFINITY];
        let mut s = base;
        union_boost(&mut s, &logits, 2, 3);
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        // Round robin: head 0's 0, head 1's 3, head 0's 1; then the rest by the summed score.
        assert_eq!(order, vec![0, 3, 1, 2, 4, 5]);
        assert_eq!(s[5], f32::NEG_INFINITY);
        assert_eq!((s[2], s[4]), (base[2], base[4]));
        // More wanted than live: every live cluster is chosen, the empty one is not.
        let mut s = base;
        union_boost(&mut s, &logits, 2, 10);
        assert!(s[..5].iter().all(|&x| x > 3.0));
        assert_eq!(s[5], f32::NEG_INFINITY);
        // A head whose best clusters another head already took moves on to its next ones.
        let same = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let mut s = [0.1f32; 6];
        union_boost(&mut s, &same, 2, 4);
        let chosen: Vec<usize> = (0..6).filter(|&c| s[c] > 3.0).collect();
        assert_eq!(chosen, vec![0, 1, 2, 3]);
    }
}
