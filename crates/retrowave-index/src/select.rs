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
    // Few keys: a selection on a copy costs less than clearing the histograms.
    if keys.len() <= 1024 {
        let mut v = keys.to_vec();
        let (_, &mut key, _) = v.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        return Some((key, keys.iter().filter(|&&x| x > key).count()));
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
/// `r` live clusters are all chosen. O(group x n): one pass a head over its logits (after a
/// sample of them), then work on its few candidates only.
pub fn union_retrieval(live: &[u32], logits: &[f32], group: usize, r: usize) -> Vec<u32> {
    let want = r.min(live.len());
    if group == 0 || want == 0 {
        return Vec::new();
    }
    assert_eq!(logits.len() % group, 0, "logits must be [group][n]");
    let n = logits.len() / group;
    let m = live.len();
    let mut best = vec![u32::MAX; m];
    // Scratch: keys and candidates for the histogram path (allocated when a head takes it), and
    // the sampled path's candidates (at most `sampled_most`).
    let mut keys: Vec<u32> = Vec::new();
    // Candidates (key, index into `live`): room for the sampled path's, grown for the
    // histogram's.
    let most = sampled_most(want).min(m);
    let mut ckeys = vec![0u32; most];
    let mut cidx = vec![0u32; most];
    // Each head's ranked candidates as (key << 32 | index), and every index ranked by some head.
    let mut top: Vec<u64> = Vec::with_capacity(want);
    let mut ranked: Vec<u32> = Vec::with_capacity(group * want);
    // The live clusters' logits of one head (the head's row itself when every cluster is live).
    let mut vals = if m == n { Vec::new() } else { vec![0f32; m] };
    for g in 0..group {
        let lg = &logits[g * n..(g + 1) * n];
        let v: &[f32] = if m == n {
            lg
        } else {
            for (x, &c) in vals.iter_mut().zip(live) {
                *x = lg[c as usize];
            }
            &vals
        };
        let w = match sampled_candidates(v, want, &mut ckeys, &mut cidx) {
            Some(w) => w,
            None => {
                keys.resize(m, 0);
                ckeys.resize(m, 0);
                cidx.resize(m, 0);
                histogram_candidates(v, want, &mut keys, &mut ckeys, &mut cidx)
            }
        };
        let (ck, ci) = (&ckeys[..w], &cidx[..w]);
        let (t, _) = kth_largest(ck, want).expect("the candidates hold the best `want`");
        // The candidates at least t (the head's best `want` and ties), sorted by key descending:
        // a cluster's competition rank is the first position of its key.
        top.clear();
        top.extend(
            ck.iter()
                .zip(ci)
                .filter(|(k, _)| **k >= t)
                .map(|(&k, &i)| (u64::from(k) << 32) | u64::from(i)),
        );
        top.sort_unstable_by(|a, b| b.cmp(a));
        let mut rank = 0;
        for (p, &e) in top.iter().enumerate() {
            if p > 0 && (e >> 32) != (top[p - 1] >> 32) {
                rank = p as u32;
            }
            let i = e as u32 as usize;
            if best[i] == u32::MAX {
                ranked.push(i as u32);
            }
            best[i] = best[i].min(rank * group as u32 + g as u32);
        }
    }
    // The `want` smallest union keys, ties to the lowest id, among the clusters in some head's
    // best `want` (head 0 alone has `want` of them).
    let mut cand: Vec<(u32, u32)> = ranked
        .iter()
        .map(|&i| (best[i as usize], live[i as usize]))
        .collect();
    if want < cand.len() {
        cand.select_nth_unstable(want - 1);
        cand.truncate(want);
    }
    let mut out: Vec<u32> = cand.into_iter().map(|(_, c)| c).collect();
    out.sort_unstable();
    out
}

/// Keys and indices (into `v`) of a superset of the `want` largest of `v`, in `ck` / `ci` (room
/// for all of `v`); returns how many. A histogram of the keys' top bits bounds them (two
/// interleaved halves: a head's logits crowd a few buckets, and one histogram would chain its
/// increments through memory). `keys`: scratch of `v.len()`.
fn histogram_candidates(
    v: &[f32],
    want: usize,
    keys: &mut [u32],
    ck: &mut [u32],
    ci: &mut [u32],
) -> usize {
    for (k, &x) in keys.iter_mut().zip(v) {
        *k = order_key(x);
    }
    let keys = &keys[..v.len()];
    let mut hist = [[0u32; 1 << HIST_BITS]; 2];
    let mut pairs = keys.chunks_exact(2);
    for p in &mut pairs {
        hist[0][hist_bucket(p[0])] += 1;
        hist[1][hist_bucket(p[1])] += 1;
    }
    for &k in pairs.remainder() {
        hist[0][hist_bucket(k)] += 1;
    }
    for b in 0..hist[0].len() {
        hist[0][b] += hist[1][b];
    }
    let floor = candidate_floor(&hist[0], want);
    let mut w = 0;
    for (i, &k) in keys.iter().enumerate() {
        ck[w] = k;
        ci[w] = i as u32;
        w += usize::from(k >= floor);
    }
    w
}

/// Most candidates [`sampled_candidates`] takes for `want`.
fn sampled_most(want: usize) -> usize {
    want.saturating_mul(4).saturating_add(512)
}

/// [`histogram_candidates`] from a sample instead, when `v` is large against `want`: every
/// value at least the sample's `k`-th largest, `k` four more than its share of `want` (so that
/// well over `want` pass, rarely fewer; then once more with twice the share and twelve). `None`
/// when the sample misjudges (fewer than `want` pass, or more than [`sampled_most`]) or `v` holds
/// a NaN (the float comparisons would drop it), for the histogram to decide.
fn sampled_candidates(v: &[f32], want: usize, ck: &mut [u32], ci: &mut [u32]) -> Option<usize> {
    let m = v.len();
    if want == 0 || m < 1024 || want.saturating_mul(8) > m {
        return None;
    }
    let mut s: Vec<f32> = v.iter().step_by(m / 256).copied().collect();
    let ns = s.len();
    let share = (ns * want).div_ceil(m);
    // A second try with a wider margin when the first threshold lets fewer than `want` pass.
    for k in [share + 4, 2 * share + 12] {
        let k = k.min(ns);
        s.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let t = s[k - 1];
        if t.is_nan() {
            return None;
        }
        let w = at_least(v, t, ck, ci, sampled_most(want))?;
        if w >= want {
            return Some(w);
        }
    }
    None
}

/// The keys and indices of the values of `v` at least `t` (as floats: both zeros pass a zero
/// threshold) into `ck` / `ci`, and how many; `None` past `most` of them or at a NaN.
fn at_least(v: &[f32], t: f32, ck: &mut [u32], ci: &mut [u32], most: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { at_least_avx2(v, t, ck, ci, most) };
    }
    at_least_scalar(v, 0, t, ck, ci, 0, most)
}

/// [`at_least`] one value at a time over `v`, the values `base ..` of the whole, with `w`
/// candidates already taken.
fn at_least_scalar(
    v: &[f32],
    base: usize,
    t: f32,
    ck: &mut [u32],
    ci: &mut [u32],
    mut w: usize,
    most: usize,
) -> Option<usize> {
    for (j, &x) in v.iter().enumerate() {
        if x.is_nan() || w == most {
            return None;
        }
        if x >= t {
            ck[w] = order_key(x);
            ci[w] = (base + j) as u32;
            w += 1;
        }
    }
    Some(w)
}

/// [`at_least`] eight values at a time: a compare and a mask a step, scalar work only for the
/// (few) values that pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn at_least_avx2(
    v: &[f32],
    t: f32,
    ck: &mut [u32],
    ci: &mut [u32],
    most: usize,
) -> Option<usize> {
    use std::arch::x86_64::*;
    let tv = _mm256_set1_ps(t);
    let mut nan = _mm256_setzero_ps();
    let mut w = 0;
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for (ch, c) in chunks.enumerate() {
        // SAFETY: c holds 8 floats; unaligned load.
        let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        let mut bits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, tv)) as u32;
        while bits != 0 {
            if w == most {
                return None;
            }
            let j = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            ck[w] = order_key(c[j]);
            ci[w] = (ch * 8 + j) as u32;
            w += 1;
        }
    }
    if _mm256_movemask_ps(nan) != 0 {
        return None;
    }
    at_least_scalar(rest, v.len() - rest.len(), t, ck, ci, w, most)
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
