//! The decode attention kernel: one GQA group of query heads against a run of f16 keys and
//! values, folded into an online-softmax state.
//!
//! [`attend_group`] is the entry point. For a group of `group` query heads `qs` (`[group][hd]`,
//! f32) and `n` cached positions (`keys`, `values`: `[n][hd]` f16, row-major) it updates the
//! state `m` (running max of the scaled scores, `[group]`), `l` (running sum of
//! `exp(score - m)`, `[group]`) and `acc` (running `sum exp(score - m) * v`, `[group][hd]`) so
//! that after any sequence of calls `acc[g] / l[g]` is the softmax-weighted mean of every value
//! seen, exactly as one call over the concatenated runs would give (up to f32 rounding). A fresh
//! state is `m = -inf`, `l = 0`, `acc = 0`.
//!
//! The AVX2 path (`avx2,fma,f16c`, detected once at run time; `head_dim` a multiple of 8)
//! streams keys and values once: keys in tiles of [`TILE`], each key row converted from f16
//! in registers and scored against every query of the group with FMAs (several keys at a time so
//! that enough independent FMA chains hide the latency), the tile's scores scaled, exponentiated
//! with a vector `exp` and the accumulators rescaled only by the change of the running max; then
//! the value tile is accumulated 16 dims at a time with the group's accumulators held in
//! registers. Every sum is in f32. Other head sizes, or CPUs without those features, take a
//! portable scalar path with the same arithmetic.

use std::sync::OnceLock;

use half::f16;

use crate::simd;

/// Keys scored per tile (the scores of a tile live in a stack array).
pub const TILE: usize = 32;
/// Query heads handled by one pass over the keys; larger groups are split into slices of this
/// size (each slice reads the keys again).
pub const MAX_GROUP: usize = 8;

/// Whether the CPU runs the AVX2 + FMA + F16C kernel (checked once).
pub fn has_avx2_f16c() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// An online-softmax state for one GQA group (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupState {
    /// Running max of the scaled scores, `[group]`.
    pub m: Vec<f32>,
    /// Running sum of `exp(score - m)`, `[group]`.
    pub l: Vec<f32>,
    /// Running weighted value sums, `[group][head_dim]`.
    pub acc: Vec<f32>,
}

impl GroupState {
    /// The empty state of `group` heads of `head_dim` dims.
    pub fn new(group: usize, head_dim: usize) -> Self {
        GroupState {
            m: vec![f32::NEG_INFINITY; group],
            l: vec![0.0; group],
            acc: vec![0.0; group * head_dim],
        }
    }

    /// Folds in `keys`/`values` (`[n][head_dim]`) for the queries `qs` (`[group][head_dim]`);
    /// see [`attend_group`].
    pub fn attend(&mut self, qs: &[f32], keys: &[f16], values: &[f16], scale: f32) {
        attend_group(
            qs,
            keys,
            values,
            scale,
            &mut self.m,
            &mut self.l,
            &mut self.acc,
        );
    }

    /// Folds in several runs of positions at once; see [`attend_runs`].
    pub fn attend_runs(&mut self, qs: &[f32], runs: &[(&[f16], &[f16])], scale: f32) {
        attend_runs(qs, runs, scale, &mut self.m, &mut self.l, &mut self.acc);
    }

    /// Writes the attention output `acc / l` (`[group][head_dim]`); zeros for a head that saw
    /// no key.
    pub fn output(&self, out: &mut [f32]) {
        let group = self.l.len().max(1);
        let hd = self.acc.len() / group;
        for ((o, a), &l) in out
            .chunks_exact_mut(hd.max(1))
            .zip(self.acc.chunks_exact(hd.max(1)))
            .zip(&self.l)
        {
            let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
            for (ov, av) in o.iter_mut().zip(a) {
                *ov = av * inv;
            }
        }
    }
}

/// Attends the `group = m.len()` query heads `qs` (`[group][hd]`, `hd = acc.len() / group`) to
/// `n = keys.len() / hd` positions (`keys`, `values`: `[n][hd]`) and folds the result into the
/// online-softmax state `m`, `l`, `acc` (see the [module docs](self)). Scores are
/// `scale * q . k`. Any `n` (0 included) and any group size are accepted; groups of up to
/// [`MAX_GROUP`] heads read the keys once.
///
/// # Panics
/// When the slice lengths disagree (`l.len() != group`, `acc.len()` not a multiple of `group`,
/// `qs.len() != acc.len()`, `keys.len() != values.len()` or not a multiple of `hd`): these are
/// programming errors of the caller.
pub fn attend_group(
    qs: &[f32],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    attend_runs(qs, &[(keys, values)], scale, m, l, acc);
}

/// [`attend_group`] over several runs of positions at once (`runs[i] = (keys, values)`, each
/// `[n_i][hd]`), as one call over their concatenation would attend: the tiles of the kernel span
/// run boundaries, so many short runs (the retrieval clusters of a wave step, scattered over
/// the store) cost what one long run of the same length does.
///
/// # Panics
/// As [`attend_group`], for any run.
pub fn attend_runs(
    qs: &[f32],
    runs: &[(&[f16], &[f16])],
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let mut hd = None;
    for (keys, values) in runs {
        if let Some(h) = check_shapes(qs, keys, values, m, l, acc) {
            hd = Some(h);
        }
    }
    let Some(hd) = hd else {
        return;
    };
    let use_avx = hd % 8 == 0 && has_avx2_f16c();
    let mut gathered = None;
    for (((q, m), l), acc) in qs
        .chunks(MAX_GROUP * hd)
        .zip(m.chunks_mut(MAX_GROUP))
        .zip(l.chunks_mut(MAX_GROUP))
        .zip(acc.chunks_mut(MAX_GROUP * hd))
    {
        if use_avx {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the shapes were checked
            // (`hd` a multiple of 8, every slice `group * hd` or `n * hd` long, group <= 8).
            unsafe {
                if let [(keys, values)] = runs {
                    let rows = Contiguous {
                        k: keys.as_ptr(),
                        v: values.as_ptr(),
                        hd,
                    };
                    avx2::attend(q, &rows, keys.len() / hd, hd, scale, m, l, acc);
                } else {
                    let rows = gathered.get_or_insert_with(|| gather(runs, hd));
                    avx2::attend(q, rows, rows.k.len(), hd, scale, m, l, acc);
                }
            }
        } else {
            for (keys, values) in runs {
                attend_group_portable(q, keys, values, scale, m, l, acc);
            }
        }
    }
}

/// One pointer per key and value row of `runs` (rows of `hd`).
fn gather(runs: &[(&[f16], &[f16])], hd: usize) -> Gathered {
    let n: usize = runs.iter().map(|(k, _)| k.len() / hd).sum();
    let mut g = Gathered {
        k: Vec::with_capacity(n),
        v: Vec::with_capacity(n),
    };
    for (k, v) in runs {
        g.k.extend(k.chunks_exact(hd).map(|r| r.as_ptr()));
        g.v.extend(v.chunks_exact(hd).map(|r| r.as_ptr()));
    }
    g
}

/// Where the kernel finds the key and value rows `0..n` of a call (`head_dim` f16 each).
trait Rows {
    fn key(&self, i: usize) -> *const f16;
    fn value(&self, i: usize) -> *const f16;
}

/// One run: rows at a fixed stride (the dense cache, a single cluster).
struct Contiguous {
    k: *const f16,
    v: *const f16,
    hd: usize,
}

impl Rows for Contiguous {
    #[inline(always)]
    fn key(&self, i: usize) -> *const f16 {
        self.k.wrapping_add(i * self.hd)
    }
    #[inline(always)]
    fn value(&self, i: usize) -> *const f16 {
        self.v.wrapping_add(i * self.hd)
    }
}

/// Many runs: one pointer per row (the retrieval clusters of a wave step).
struct Gathered {
    k: Vec<*const f16>,
    v: Vec<*const f16>,
}

impl Rows for Gathered {
    #[inline(always)]
    fn key(&self, i: usize) -> *const f16 {
        // The kernel asks only for rows below `n = k.len()`.
        self.k.get(i).copied().unwrap_or(std::ptr::null())
    }
    #[inline(always)]
    fn value(&self, i: usize) -> *const f16 {
        self.v.get(i).copied().unwrap_or(std::ptr::null())
    }
}

/// Checks the shapes of an [`attend_group`] call; `None` when there is nothing to do.
fn check_shapes(
    qs: &[f32],
    keys: &[f16],
    values: &[f16],
    m: &[f32],
    l: &[f32],
    acc: &[f32],
) -> Option<usize> {
    let group = m.len();
    assert_eq!(l.len(), group, "attention state: l has the wrong length");
    if group == 0 {
        return None;
    }
    assert_eq!(
        acc.len() % group,
        0,
        "attention state: acc is not [group][hd]"
    );
    let hd = acc.len() / group;
    assert_eq!(qs.len(), acc.len(), "attention queries are not [group][hd]");
    assert_eq!(keys.len(), values.len(), "keys and values differ in length");
    if hd == 0 || keys.is_empty() {
        return None;
    }
    assert_eq!(keys.len() % hd, 0, "keys are not [n][hd]");
    Some(hd)
}

/// The portable scalar version of [`attend_group`] (the fallback; also used to check the AVX2
/// kernel). Same arithmetic: f32 dot products, tiles of [`TILE`] keys, one rescale per tile.
pub fn attend_group_portable(
    qs: &[f32],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let Some(hd) = check_shapes(qs, keys, values, m, l, acc) else {
        return;
    };
    let group = m.len();
    let n = keys.len() / hd;
    let mut t0 = 0;
    while t0 < n {
        let nt = TILE.min(n - t0);
        let kt = &keys[t0 * hd..(t0 + nt) * hd];
        let vt = &values[t0 * hd..(t0 + nt) * hd];
        for g in 0..group {
            let q = &qs[g * hd..(g + 1) * hd];
            let mut sc = [0f32; TILE];
            let mut tmax = f32::NEG_INFINITY;
            for (s, k) in sc.iter_mut().zip(kt.chunks_exact(hd)) {
                let mut dot = 0f32;
                for (qv, kv) in q.iter().zip(k) {
                    dot = qv.mul_add(kv.to_f32(), dot);
                }
                *s = dot * scale;
                tmax = tmax.max(*s);
            }
            let m_new = m[g].max(tmax);
            let corr = simd::exp_approx(m[g] - m_new);
            m[g] = m_new;
            let mut lsum = 0f32;
            for s in sc[..nt].iter_mut() {
                *s = simd::exp_approx(*s - m_new);
                lsum += *s;
            }
            l[g] = l[g] * corr + lsum;
            let a = &mut acc[g * hd..(g + 1) * hd];
            a.iter_mut().for_each(|x| *x *= corr);
            for (&p, v) in sc[..nt].iter().zip(vt.chunks_exact(hd)) {
                for (x, vv) in a.iter_mut().zip(v) {
                    *x = p.mul_add(vv.to_f32(), *x);
                }
            }
        }
        t0 += nt;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    // Register blocks are small const-size arrays indexed by (key, head, chunk): index loops
    // read best and unroll fully.
    #![allow(clippy::needless_range_loop)]
    use super::{MAX_GROUP, Rows, TILE};
    use crate::simd;
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight f16 at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_ph(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 at p.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
    }

    /// Hints the cache lines of one row of `hd` f16 at `p` into L2 (not L1: a prefetch into L1
    /// holds one of its few miss buffers, which capped the loads in flight; into L2 streamed
    /// 12-15% faster on the Zen 4 test machine).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_row(p: *const f16, hd: usize) {
        let mut b = 0;
        while b < hd * 2 {
            // Prefetching never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_byte_add(b) as *const i8);
            b += 64;
        }
    }

    /// Lane `i` of the result is the sum of the lanes of `v[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn reduce8(v: [__m256; 8]) -> __m256 {
        let a = _mm256_hadd_ps(v[0], v[1]);
        let b = _mm256_hadd_ps(v[2], v[3]);
        let c = _mm256_hadd_ps(v[4], v[5]);
        let d = _mm256_hadd_ps(v[6], v[7]);
        // [s0 s1 s2 s3 | s0' s1' s2' s3'] with s = sum of low halves, s' = of high halves
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let lo = _mm256_permute2f128_ps(ab, cd, 0x20);
        let hi = _mm256_permute2f128_ps(ab, cd, 0x31);
        _mm256_add_ps(lo, hi)
    }

    /// Vector [`simd::exp_approx`]: `exp(x)` for 8 lanes, 0 below -87.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp8(x: __m256) -> __m256 {
        crate::simd::avx2::exp8(x)
    }

    /// The `KB * G` dot products of the keys of rows `row0..row0 + KB` of `rows` with the
    /// queries (rows of `hd` f32 at `q`); lane `j * G + g` holds key `j` . query `g`, lanes past
    /// `KB * G` hold 0.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_block<const G: usize, const KB: usize, R: Rows>(
        q: *const f32,
        rows: &R,
        row0: usize,
        hd: usize,
    ) -> __m256 {
        let k: [*const f16; KB] = std::array::from_fn(|j| rows.key(row0 + j));
        let mut acc = [[_mm256_setzero_ps(); G]; KB];
        let mut c = 0;
        while c < hd {
            let mut kv = [_mm256_setzero_ps(); KB];
            for (j, kj) in kv.iter_mut().enumerate() {
                // SAFETY: the caller guarantees KB rows of hd f16; c + 8 <= hd.
                *kj = unsafe { load_ph(k[j].add(c)) };
            }
            for g in 0..G {
                // SAFETY: the caller guarantees G rows of hd f32 at q.
                let qv = unsafe { _mm256_loadu_ps(q.add(g * hd + c)) };
                for j in 0..KB {
                    acc[j][g] = _mm256_fmadd_ps(qv, kv[j], acc[j][g]);
                }
            }
            c += 8;
        }
        let mut v = [_mm256_setzero_ps(); 8];
        for j in 0..KB {
            for g in 0..G {
                v[j * G + g] = acc[j][g];
            }
        }
        reduce8(v)
    }

    /// `acc[g][c..c + 8 CW] = acc[g][c..] * corr[g] + sum_j p[j][g] v[j][c..]` for the values
    /// of the `nt` rows from `row0` of `rows`, with the accumulators in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_pass<const G: usize, const CW: usize, R: Rows>(
        p: &[f32],
        rows: &R,
        row0: usize,
        nt: usize,
        hd: usize,
        c: usize,
        acc: *mut f32,
        corr: &[f32; MAX_GROUP],
    ) {
        let mut a = [[_mm256_setzero_ps(); CW]; G];
        for g in 0..G {
            let cg = _mm256_set1_ps(corr[g]);
            for w in 0..CW {
                // SAFETY: acc is G rows of hd f32; c + 8 CW <= hd.
                a[g][w] =
                    _mm256_mul_ps(unsafe { _mm256_loadu_ps(acc.add(g * hd + c + 8 * w)) }, cg);
            }
        }
        for (j, pj) in p.chunks_exact(G).take(nt).enumerate() {
            let mut vv = [_mm256_setzero_ps(); CW];
            for (w, x) in vv.iter_mut().enumerate() {
                // SAFETY: nt rows of hd f16 from row0; c + 8 CW <= hd.
                *x = unsafe { load_ph(rows.value(row0 + j).add(c + 8 * w)) };
            }
            for g in 0..G {
                let pg = _mm256_set1_ps(pj[g]);
                for w in 0..CW {
                    a[g][w] = _mm256_fmadd_ps(pg, vv[w], a[g][w]);
                }
            }
        }
        for g in 0..G {
            for w in 0..CW {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(acc.add(g * hd + c + 8 * w), a[g][w]) };
            }
        }
    }

    /// [`super::attend_runs`] for a group of `G` heads, scoring `KB` keys per block
    /// (`G * KB <= 8`).
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; `hd % 8 == 0`; `qs`, `acc`: `G * hd`; `m`, `l`: `G`;
    /// `rows` has `n` rows of `hd` keys and values.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_g<const G: usize, const KB: usize, R: Rows>(
        qs: &[f32],
        rows: &R,
        n: usize,
        hd: usize,
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
    ) {
        // Scores of a tile, `[key][g]`, with room for the 8-lane store of the last block.
        let mut sc = [0f32; TILE * MAX_GROUP + 8];
        // The running max of each score's head, same layout.
        let mut mrep = [0f32; TILE * MAX_GROUP + 8];
        let scale_v = _mm256_set1_ps(scale);
        let q = qs.as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let nt = TILE.min(n - t0);
            let mut j = 0;
            while j + KB <= nt {
                // Prefetch this tile's values (summed right after the scores) and the next
                // tile's keys: the hardware prefetcher alone does not run far enough ahead.
                for jj in t0 + j..t0 + j + KB {
                    prefetch_row(rows.value(jj), hd);
                    if jj + TILE < n {
                        prefetch_row(rows.key(jj + TILE), hd);
                    }
                }
                // SAFETY: rows j..j + KB of the tile exist; the store ends at
                // j * G + 8 <= TILE * G + 8.
                unsafe {
                    let s = qk_block::<G, KB, R>(q, rows, t0 + j, hd);
                    _mm256_storeu_ps(sc.as_mut_ptr().add(j * G), _mm256_mul_ps(s, scale_v));
                }
                j += KB;
            }
            while j < nt {
                // SAFETY: as above, one row.
                unsafe {
                    let s = qk_block::<G, 1, R>(q, rows, t0 + j, hd);
                    _mm256_storeu_ps(sc.as_mut_ptr().add(j * G), _mm256_mul_ps(s, scale_v));
                }
                j += 1;
            }
            let ne = nt * G;
            let mut tmax = [f32::NEG_INFINITY; G];
            for row in sc[..ne].chunks_exact(G) {
                for g in 0..G {
                    tmax[g] = tmax[g].max(row[g]);
                }
            }
            let mut corr = [1f32; MAX_GROUP];
            for g in 0..G {
                let m_new = m[g].max(tmax[g]);
                corr[g] = simd::exp_approx(m[g] - m_new);
                m[g] = m_new;
            }
            for row in mrep[..ne].chunks_exact_mut(G) {
                row.copy_from_slice(&m[..G]);
            }
            let mut e = 0;
            while e < ne {
                // SAFETY: e < ne <= TILE * G, so e + 8 <= TILE * MAX_GROUP + 8.
                unsafe {
                    let x = _mm256_sub_ps(
                        _mm256_loadu_ps(sc.as_ptr().add(e)),
                        _mm256_loadu_ps(mrep.as_ptr().add(e)),
                    );
                    _mm256_storeu_ps(sc.as_mut_ptr().add(e), exp8(x));
                }
                e += 8;
            }
            let mut lsum = [0f32; G];
            for row in sc[..ne].chunks_exact(G) {
                for g in 0..G {
                    lsum[g] += row[g];
                }
            }
            for g in 0..G {
                l[g] = l[g] * corr[g] + lsum[g];
            }
            let p = &sc[..ne];
            let a = acc.as_mut_ptr();
            let mut c = 0;
            // Two 8-dim chunks per pass while the accumulators fit in registers.
            if G <= 4 {
                while c + 16 <= hd {
                    // SAFETY: c + 16 <= hd; nt rows from t0; acc is G * hd.
                    unsafe { pv_pass::<G, 2, R>(p, rows, t0, nt, hd, c, a, &corr) };
                    c += 16;
                }
            }
            while c < hd {
                // SAFETY: c + 8 <= hd (hd % 8 == 0).
                unsafe { pv_pass::<G, 1, R>(p, rows, t0, nt, hd, c, a, &corr) };
                c += 8;
            }
            t0 += nt;
        }
    }

    /// Dispatches on the group size (`1..=8`).
    ///
    /// # Safety
    /// As [`attend_g`] with `G = m.len() <= 8`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<R: Rows>(
        qs: &[f32],
        rows: &R,
        n: usize,
        hd: usize,
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match m.len() {
                1 => attend_g::<1, 8, R>(qs, rows, n, hd, scale, m, l, acc),
                2 => attend_g::<2, 4, R>(qs, rows, n, hd, scale, m, l, acc),
                3 => attend_g::<3, 2, R>(qs, rows, n, hd, scale, m, l, acc),
                4 => attend_g::<4, 2, R>(qs, rows, n, hd, scale, m, l, acc),
                5 => attend_g::<5, 1, R>(qs, rows, n, hd, scale, m, l, acc),
                6 => attend_g::<6, 1, R>(qs, rows, n, hd, scale, m, l, acc),
                7 => attend_g::<7, 1, R>(qs, rows, n, hd, scale, m, l, acc),
                8 => attend_g::<8, 1, R>(qs, rows, n, hd, scale, m, l, acc),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-amp, amp].
    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    fn to_f16(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    /// Softmax attention in f64: `[group][hd]` outputs.
    fn reference(qs: &[f32], k: &[f16], v: &[f16], hd: usize, scale: f32) -> Vec<f64> {
        let group = qs.len() / hd;
        let n = k.len() / hd;
        let mut out = vec![0f64; group * hd];
        for g in 0..group {
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    (0..hd)
                        .map(|d| qs[g * hd + d] as f64 * k[j * hd + d].to_f64())
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            for d in 0..hd {
                out[g * hd + d] = (0..n)
                    .map(|j| (s[j] - mx).exp() * v[j * hd + d].to_f64())
                    .sum::<f64>()
                    / z;
            }
        }
        out
    }

    type Kernel = fn(&[f32], &[f16], &[f16], f32, &mut [f32], &mut [f32], &mut [f32]);

    fn check(kernel: Kernel, name: &str, n: usize, group: usize, hd: usize) {
        let scale = 1.0 / (hd as f32).sqrt();
        let qs = values(group * hd, 1 + n as u64, 2.0);
        let k = to_f16(&values(n * hd, 7 + group as u64, 2.0));
        let v = to_f16(&values(n * hd, 11 + hd as u64, 1.0));
        let want = reference(&qs, &k, &v, hd, scale);
        let mut one = GroupState::new(group, hd);
        kernel(&qs, &k, &v, scale, &mut one.m, &mut one.l, &mut one.acc);
        let mut out = vec![0f32; group * hd];
        one.output(&mut out);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 2e-5,
                "{name} n={n} group={group} hd={hd} [{i}]: {a} vs {b}"
            );
        }
        // Two calls (the second starting from a running max) = one call over both runs.
        let cut = n / 3;
        let mut two = GroupState::new(group, hd);
        for (a, b) in [(0, cut), (cut, n)] {
            kernel(
                &qs,
                &k[a * hd..b * hd],
                &v[a * hd..b * hd],
                scale,
                &mut two.m,
                &mut two.l,
                &mut two.acc,
            );
        }
        for (a, b) in two.m.iter().zip(&one.m) {
            assert!((a - b).abs() < 1e-5, "{name} split m: {a} vs {b}");
        }
        for (a, b) in two.l.iter().zip(&one.l) {
            assert!(
                (a - b).abs() < 1e-5 * b.abs().max(1.0),
                "{name} split l: {a} vs {b}"
            );
        }
        two.output(&mut out);
        for (a, b) in out.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() < 2e-5,
                "{name} split n={n} group={group} hd={hd}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn runs_attend_as_their_concatenation() {
        // Many short runs (cluster-sized, some empty, some crossing tile boundaries) give what
        // one call over the concatenated positions gives.
        for &(group, hd) in &[(4usize, 128usize), (1, 64), (3, 8), (8, 64), (4, 12)] {
            let n = 150;
            let scale = 1.0 / (hd as f32).sqrt();
            let qs = values(group * hd, 21 + hd as u64, 2.0);
            let k = to_f16(&values(n * hd, 22, 2.0));
            let v = to_f16(&values(n * hd, 23, 1.0));
            let want = reference(&qs, &k, &v, hd, scale);
            let cuts = [0usize, 5, 5, 21, 37, 38, 70, 101, 133, 150];
            let runs: Vec<(&[f16], &[f16])> = cuts
                .windows(2)
                .map(|w| (&k[w[0] * hd..w[1] * hd], &v[w[0] * hd..w[1] * hd]))
                .collect();
            let mut st = GroupState::new(group, hd);
            st.attend_runs(&qs, &runs, scale);
            let mut out = vec![0f32; group * hd];
            st.output(&mut out);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() < 2e-5,
                    "group={group} hd={hd}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn kernel_matches_f64_reference() {
        for &n in &[1, 3, 16, 33, 100] {
            for &group in &[1, 2, 3, 4, 5, 8, 11] {
                for &hd in &[8, 64, 128] {
                    check(attend_group, "kernel", n, group, hd);
                }
            }
        }
    }

    #[test]
    fn portable_fallback_matches_f64_reference() {
        for &n in &[1, 3, 16, 33, 100] {
            for &group in &[1, 3, 4, 8] {
                for &hd in &[8, 64, 128, 12] {
                    check(attend_group_portable, "portable", n, group, hd);
                }
            }
        }
        // head sizes that are not a multiple of 8 take the portable path
        check(attend_group, "kernel hd 12", 33, 4, 12);
    }

    #[test]
    fn kernel_and_portable_agree_with_large_scores() {
        // Scores far above 88 (the exp clamp) must still give the softmax of their differences.
        let (group, hd, n) = (4, 64, 70);
        let qs = values(group * hd, 3, 4.0);
        let k = to_f16(&values(n * hd, 4, 4.0));
        let v = to_f16(&values(n * hd, 5, 1.0));
        let want = reference(&qs, &k, &v, hd, 1.0);
        for kernel in [attend_group as Kernel, attend_group_portable] {
            let mut st = GroupState::new(group, hd);
            kernel(&qs, &k, &v, 1.0, &mut st.m, &mut st.l, &mut st.acc);
            assert!(st.m.iter().any(|&m| m > 88.0), "{:?}", st.m);
            let mut out = vec![0f32; group * hd];
            st.output(&mut out);
            for (a, b) in out.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-3, "{a} vs {b}");
            }
        }
    }

    /// Single-thread throughput: `cargo test --release -p retrowave-cpu --lib
    /// decode_kernel::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark, not a check"]
    fn throughput() {
        let (group, hd, heads) = (4, 128, 8);
        for n in [512usize, 32768] {
            let k = to_f16(&values(heads * n * hd, 1, 1.0));
            let v = to_f16(&values(heads * n * hd, 2, 1.0));
            let qs = values(group * hd, 3, 1.0);
            let reps = (1 << 23) / (heads * n);
            for threads in [1, 2] {
                let t = std::time::Instant::now();
                std::thread::scope(|s| {
                    for th in 0..threads {
                        let (k, v, qs) = (&k, &v, &qs);
                        s.spawn(move || {
                            for _ in 0..reps {
                                for h in (th..heads).step_by(threads) {
                                    let r = h * n * hd..(h + 1) * n * hd;
                                    let mut st = GroupState::new(group, hd);
                                    st.attend(qs, &k[r.clone()], &v[r], 0.1);
                                    std::hint::black_box(&st);
                                }
                            }
                        });
                    }
                });
                let dt = t.elapsed().as_secs_f64();
                let keys = (reps * heads * n) as f64;
                println!(
                    "n={n} threads={threads}: {:.1} ns/key/thread, {:.2} GB/s",
                    dt / keys * 1e9 * threads as f64,
                    keys * hd as f64 * 4.0 / dt / 1e9
                );
            }
        }
    }

    #[test]
    fn empty_run_leaves_the_state_alone() {
        let mut st = GroupState::new(2, 8);
        attend_group(&[0.5; 16], &[], &[], 1.0, &mut st.m, &mut st.l, &mut st.acc);
        assert_eq!(st, GroupState::new(2, 8));
    }
}
