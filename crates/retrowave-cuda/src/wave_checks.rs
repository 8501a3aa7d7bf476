//! Checks of wave decode attention through the backend's `attention` (run by `bench gpu` on
//! the GPU machine with the other kernel checks).
//!
//! 1. With every cluster in the retrieval zone, wave attention must equal dense attention over
//!    the same cache (the token lists cover every token exactly once).
//! 2. At the default budgets, the output must equal an f64 reference built from the downloaded
//!    cache and index and the GPU's own zone selection (the selection itself is checked against
//!    a sort of its scores by `check_wave_select`): exact attention over the steady zone and the
//!    retrieval clusters' members, the estimation formula over the estimation clusters, merged by
//!    log-sum-exp.
//! 3. With the indexed KV in the host tier ([`crate::wave_tier`]), several decode steps must give
//!    exactly the outputs of the GPU-resident index (same selection, same token order), the
//!    wave buffers must make the decisions of the store's policy
//!    ([`retrowave_store::policy::WaveBufferPolicy`]) on the same selections (hits, admissions,
//!    bypasses, evictions, final residents), and the cache restored from the tier must equal the
//!    original.
//! 4. The GPU's wave step agrees with the CPU reference (`retrowave_index`: the index built from
//!    the same keys, scored in f32, zones planned by `plan_step`, attention by `attend`): the
//!    same clusters in each zone except near-ties (the GPU scores with bf16 centroids), and
//!    outputs within tolerance.

use half::bf16;
use rand::rngs::StdRng;
use retrowave_core::{Backend, BatchLayout, HeadLayout, SeqRows, WaveConfig};

use crate::backend::{CudaBackend, DevKv, dp};
use crate::checks::{CheckResult, compare, rand_vec};
use crate::wave_step::HostStep;

fn to_f64(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// What the wave checks share: the head shape, caches of two layers of which the second is
/// checked, and the default config with segments of 2048 tokens (several segments, the last one
/// short).
struct CheckShape {
    heads: HeadLayout,
    layers: usize,
    layer: usize,
    cfg: WaveConfig,
}

impl CheckShape {
    fn new(hd: usize, nh: usize, nkv: usize) -> Self {
        let mut cfg = WaveConfig::retrowave();
        cfg.segment_tokens = 2048;
        // Clusters of 16 at every context: the checks' contexts are chosen for the cluster
        // counts (and shared-memory layouts) that those give.
        cfg.min_index_clusters = 0;
        CheckShape {
            heads: HeadLayout {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            },
            layers: 2,
            layer: 1,
            cfg,
        }
    }
}

/// The inputs of one decode step of sequences of `lens` tokens, `step` tokens in: the batch and
/// random q (also on the host), k and v activations.
struct StepInputs {
    batch: BatchLayout,
    q: Vec<f32>,
    acts: [crate::DevActs; 3],
}

fn step_inputs(
    b: &CudaBackend,
    rng: &mut StdRng,
    lens: &[usize],
    step: usize,
    heads: HeadLayout,
) -> StepInputs {
    let (rows, nh, nkv, hd) = (lens.len(), heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let batch = BatchLayout {
        seqs: lens
            .iter()
            .enumerate()
            .map(|(i, &len)| SeqRows {
                slot: i,
                row: i,
                start_pos: len + step,
                n_tokens: 1,
            })
            .collect(),
    };
    let q = rand_vec(rng, rows * nh * hd, 2.0);
    let k = rand_vec(rng, rows * nkv * hd, 2.0);
    let v = rand_vec(rng, rows * nkv * hd, 1.0);
    let acts = [
        b.acts_from_host(&q, rows, nh * hd),
        b.acts_from_host(&k, rows, nkv * hd),
        b.acts_from_host(&v, rows, nkv * hd),
    ];
    StepInputs { batch, q, acts }
}

/// `layer`'s attention of the step `x` over the caches `kvs`, on the host.
fn run_step(
    b: &CudaBackend,
    layer: usize,
    x: &StepInputs,
    kvs: &mut [DevKv],
    heads: HeadLayout,
) -> Result<Vec<f32>, String> {
    let e = |x: retrowave_core::BackendError| x.to_string();
    let mut refs: Vec<&mut DevKv> = kvs.iter_mut().collect();
    let [qa, ka, va] = &x.acts;
    let y = b
        .attention(layer, qa, ka, va, &mut refs, &x.batch, heads)
        .map_err(e)?;
    let y = b.acts_to_host(&y);
    b.check().map_err(e)?;
    Ok(y)
}

/// The GPU's zone selection of `layer` for the step `x` over `kvs` (deterministic: what the
/// step itself selected): the selection, its ids and its counts on the host.
fn step_selection(
    b: &CudaBackend,
    kvs: &[DevKv],
    x: &StepInputs,
    layer: usize,
    heads: HeadLayout,
) -> Result<(crate::wave::WaveSelection, Vec<i32>, Vec<i32>), String> {
    let s_ = |x: crate::CudaError| x.to_string();
    let (nh, nkv, hd) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let refs: Vec<&DevKv> = kvs.iter().collect();
    let tables = b.step_tables(&refs, &x.batch, nkv).map_err(s_)?;
    let ws = b
        .wave_step_units(&HostStep::of(&tables), &refs)
        .map_err(s_)?;
    let qd = b.upload(&x.q).map_err(s_)?;
    let sel = b
        .wave_select_dev(
            ws.layer_ptr(layer),
            ws.per_layer,
            ws.max_clusters,
            dp(&qd),
            nh,
            nkv,
            hd,
            ws.max_ids,
            ws.union,
        )
        .map_err(s_)?;
    let ids = b.download(&sel.ids, sel.ids.len()).map_err(s_)?;
    let counts = b.download(&sel.counts, sel.counts.len()).map_err(s_)?;
    Ok((sel, ids, counts))
}

/// Wave decode attention checks for one head shape; `len` tokens of synthetic KV, one decode
/// step on two sequences of different lengths.
pub(crate) fn check_wave_decode(
    b: &CudaBackend,
    rng: &mut StdRng,
    hd: usize,
    nh: usize,
    nkv: usize,
) -> Result<Vec<CheckResult>, String> {
    let e = |x: retrowave_core::BackendError| x.to_string();
    let CheckShape {
        heads,
        layers,
        layer,
        cfg,
    } = CheckShape::new(hd, nh, nkv);
    let lens = [5000usize, 2300];
    let cap = 5200;
    let mut all = cfg.clone();
    all.retrieval_fraction = 1.0;
    all.estimation_fraction = 0.0;

    let mut dense = Vec::new();
    let mut wave = Vec::new();
    let mut full = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let mut kv = b.new_kv(layers, heads, cap).map_err(e)?;
        b.kv_fill_synthetic(&mut kv, len, 77 + i as u64)
            .map_err(e)?;
        let mut w = b.kv_clone(&kv).map_err(e)?;
        b.kv_build_index(&mut w, &cfg).map_err(e)?;
        let mut f = b.kv_clone(&kv).map_err(e)?;
        b.kv_build_index(&mut f, &all).map_err(e)?;
        dense.push(kv);
        wave.push(w);
        full.push(f);
    }
    let rows = lens.len();
    let x = step_inputs(b, rng, &lens, 0, heads);
    let q = &x.q;
    let run = |kvs: &mut Vec<DevKv>| run_step(b, layer, &x, kvs, heads);
    let y_dense = run(&mut dense)?;
    let y_full = run(&mut full)?;
    let y_wave = run(&mut wave)?;
    let mut out = vec![compare(
        format!("wave decode, every cluster retrieved == dense (hd {hd}, {nh}/{nkv} heads)"),
        &y_full,
        &y_dense.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        2e-3,
    )];

    // The GPU's own selection for this step.
    let (sel, ids, counts) = step_selection(b, &wave, &x, layer, heads)?;

    let g = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut reference = vec![0f64; rows * nh * hd];
    let mut exact_tokens = 0usize;
    for (s, kv) in wave.iter().enumerate() {
        let w = kv
            .wave
            .as_deref()
            .ok_or("wave index missing after the step")?;
        let n = lens[s] + 1;
        let kk = to_f64(&b.download(&kv.k, kv.k.len()).map_err(|x| x.to_string())?);
        let vv = to_f64(&b.download(&kv.v, kv.v.len()).map_err(|x| x.to_string())?);
        let kc = w.n_clusters;
        let cent = to_f64(
            &b.download(&w.centroids, w.centroids.len())
                .map_err(|x| x.to_string())?,
        );
        let lns = b
            .download(&w.ln_sizes, w.ln_sizes.len())
            .map_err(|x| x.to_string())?;
        let means = to_f64(
            &b.download(&w.means, w.means.len())
                .map_err(|x| x.to_string())?,
        );
        let offs = b
            .download(&w.offsets, w.offsets.len())
            .map_err(|x| x.to_string())?;
        let mem = b
            .download(&w.members, w.members.len())
            .map_err(|x| x.to_string())?;
        let it = w.indexed_tokens();
        for h in 0..nkv {
            let unit = s * nkv + h; // decode row s, KV head h
            let iu = layer * nkv + h; // index unit (layer, head)
            let (nr, ne) = (counts[2 * unit] as usize, counts[2 * unit + 1] as usize);
            let uid = &ids[unit * sel.max_ids..(unit + 1) * sel.max_ids];
            let mut toks: Vec<usize> = (0..w.sink.min(n)).chain(w.indexed_end..n).collect();
            for &c in &uid[..nr] {
                let c = c as usize;
                let (a, z) = (offs[iu * (kc + 1) + c], offs[iu * (kc + 1) + c + 1]);
                toks.extend(
                    mem[iu * it + a as usize..iu * it + z as usize]
                        .iter()
                        .map(|&t| t as usize),
                );
            }
            exact_tokens += toks.len();
            let base = (layer * nkv + h) * cap * hd;
            for gh in 0..g {
                let head = h * g + gh;
                let qr: Vec<f64> = q[(s * nh + head) * hd..(s * nh + head + 1) * hd]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                // (logit, weight multiplier, value row) of every term.
                let mut terms: Vec<(f64, Vec<f64>)> = Vec::new();
                for &t in &toks {
                    let kr = &kk[base + t * hd..base + (t + 1) * hd];
                    let l = scale * kr.iter().zip(&qr).map(|(a, b)| a * b).sum::<f64>();
                    terms.push((l, vv[base + t * hd..base + (t + 1) * hd].to_vec()));
                }
                for &c in &uid[nr..nr + ne] {
                    let c = c as usize;
                    let cr = &cent[(iu * kc + c) * hd..(iu * kc + c + 1) * hd];
                    let l = scale * cr.iter().zip(&qr).map(|(a, b)| a * b).sum::<f64>()
                        + f64::from(lns[iu * kc + c]);
                    terms.push((
                        l,
                        means[(iu * kc + c) * hd..(iu * kc + c + 1) * hd].to_vec(),
                    ));
                }
                let m = terms.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max);
                let mut den = 0f64;
                let o = &mut reference[(s * nh + head) * hd..(s * nh + head + 1) * hd];
                for (l, val) in &terms {
                    let p = (l - m).exp();
                    den += p;
                    for (x, y) in o.iter_mut().zip(val) {
                        *x += p * y;
                    }
                }
                for x in o.iter_mut() {
                    *x /= den;
                }
            }
        }
    }
    out.push(compare(
        format!(
            "wave decode at default budgets vs f64 reference (hd {hd}, {nh}/{nkv} heads, {} exact tokens a unit)",
            exact_tokens / (rows * nkv).max(1)
        ),
        &y_wave,
        &reference,
        2e-3,
    ));
    // Nothing may have been cut from a token list.
    out.push(no_list_cut(b, "wave token lists: none cut short")?);
    Ok(out)
}

/// Nothing may have been cut from a token list since the backend started (the device counter
/// that `wave_tokens` raises, see `CudaBackend::wave_overflows`).
fn no_list_cut(b: &CudaBackend, what: &str) -> Result<CheckResult, String> {
    let overflows = b.wave_overflows().map_err(|x| x.to_string())?;
    Ok(CheckResult::exact(
        what,
        f64::from(overflows),
        overflows == 0,
    ))
}

/// Host tier checks (see the module docs, 3.) for one head shape: two sequences, a small wave
/// buffer (`cache_ratio` 1, so steps evict and some bypass), `STEPS` decode steps.
pub(crate) fn check_wave_tier(
    b: &CudaBackend,
    rng: &mut StdRng,
    hd: usize,
    nh: usize,
    nkv: usize,
) -> Result<Vec<CheckResult>, String> {
    use retrowave_store::policy::{CacheConfig, Tier, Wanted, WaveBufferPolicy};
    const STEPS: usize = 6;
    let e = |x: retrowave_core::BackendError| x.to_string();
    let s_ = |x: crate::CudaError| x.to_string();
    let CheckShape {
        heads,
        layers,
        layer,
        mut cfg,
    } = CheckShape::new(hd, nh, nkv);
    let lens = [5000usize, 2300];
    let cap = 5200;
    cfg.cache_ratio = 1;
    let mut tiered_cfg = cfg.clone();
    tiered_cfg.host_kv = true;

    let (mut resident, mut tiered, mut originals) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &len) in lens.iter().enumerate() {
        let mut kv = b.new_kv(layers, heads, cap).map_err(e)?;
        b.kv_fill_synthetic(&mut kv, len, 177 + i as u64)
            .map_err(e)?;
        let mut r = b.kv_clone(&kv).map_err(e)?;
        b.kv_build_index(&mut r, &cfg).map_err(e)?;
        let mut t = b.kv_clone(&kv).map_err(e)?;
        b.kv_build_index(&mut t, &tiered_cfg).map_err(e)?;
        if t.hole.1 == 0 || t.wave.as_ref().is_none_or(|w| w.tier.is_none()) {
            return Err("host_kv index build left the cache in GPU memory".into());
        }
        resident.push(r);
        tiered.push(t);
        originals.push(kv);
    }
    let mut out = Vec::new();

    // The cache restored from the tier equals the original, position for position.
    let mut restore_err = 0usize;
    for (t, o) in tiered.iter().zip(&originals) {
        let (k, v) = b.restored_copy(t).map_err(s_)?;
        let units = layers * nkv;
        let full = t.cap + t.hole.1;
        let (kr, vr) = (
            b.download(&k, k.len()).map_err(s_)?,
            b.download(&v, v.len()).map_err(s_)?,
        );
        let (ko, vo) = (
            b.download(&o.k, o.k.len()).map_err(s_)?,
            b.download(&o.v, o.v.len()).map_err(s_)?,
        );
        for u in 0..units {
            for p in 0..o.len {
                let (a, z) = ((u * full + p) * hd, (u * cap + p) * hd);
                if kr[a..a + hd] != ko[z..z + hd] || vr[a..a + hd] != vo[z..z + hd] {
                    restore_err += 1;
                }
            }
        }
    }
    out.push(CheckResult::exact(
        format!("wave tier: cache restored from host == original (hd {hd})"),
        restore_err as f64,
        restore_err == 0,
    ));

    // CPU policies of the checked layer's units (row s, KV head h).
    let tiers: Vec<(usize, usize)> = tiered
        .iter()
        .map(|t| {
            let tr = t.wave.as_ref().and_then(|w| w.tier.as_ref());
            tr.map_or((0, 1), |x| (x.capacity, x.page))
        })
        .collect();
    let mut policies: Vec<WaveBufferPolicy> = (0..lens.len() * nkv)
        .map(|u| {
            WaveBufferPolicy::new(CacheConfig {
                capacity_pages: tiers[u / nkv].0 as u32,
            })
        })
        .collect();
    let mut want = crate::wave_tier::TierCounters::default();
    let (mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64);
    for step in 0..STEPS {
        let x = step_inputs(b, rng, &lens, step, heads);
        let run = |kvs: &mut Vec<DevKv>| run_step(b, layer, &x, kvs, heads);
        let y_res = run(&mut resident)?;
        let y_tier = run(&mut tiered)?;
        for (a, r) in y_tier.iter().zip(&y_res) {
            let d = f64::from(a - r);
            max_abs = max_abs.max(d.abs());
            num += d * d;
            den += f64::from(*r) * f64::from(*r);
        }
        // The step's selection, again (deterministic), and the CPU policy's decisions on it.
        let (sel, ids, counts) = step_selection(b, &tiered, &x, layer, heads)?;
        for (si, t) in tiered.iter().enumerate() {
            let w = t.wave.as_deref().ok_or("index missing")?;
            let kc = w.n_clusters;
            let offs = b.download(&w.offsets, w.offsets.len()).map_err(s_)?;
            let page = tiers[si].1 as i32;
            for h in 0..nkv {
                let unit = si * nkv + h;
                let iu = layer * nkv + h;
                let nr = counts[2 * unit] as usize;
                let wanted: Vec<Wanted> = ids[unit * sel.max_ids..unit * sel.max_ids + nr]
                    .iter()
                    .map(|&c| {
                        let c = c as usize;
                        let size = offs[iu * (kc + 1) + c + 1] - offs[iu * (kc + 1) + c];
                        Wanted {
                            cluster: c as u32,
                            pages: ((size + page - 1) / page) as u32,
                            tier: Tier::Host,
                        }
                    })
                    .collect();
                let plan = policies[unit].plan(&wanted);
                want.hit_pages += plan.hit_pages();
                want.admitted_pages += plan
                    .admissions
                    .iter()
                    .map(|a| a.slots.len() as u64)
                    .sum::<u64>();
                want.bypass_pages += plan.bypass.iter().map(|x| u64::from(x.pages)).sum::<u64>();
                want.evicted_pages += plan
                    .evictions
                    .iter()
                    .map(|x| x.slots.len() as u64)
                    .sum::<u64>();
                if step == 0 {
                    want.cold_pages += plan.miss_pages();
                }
            }
        }
    }
    out.push(CheckResult {
        name: format!("wave tier: {STEPS} steps == GPU-resident index (hd {hd}, {nh}/{nkv} heads)"),
        rel_l2: if den > 0.0 { (num / den).sqrt() } else { 0.0 },
        max_abs,
        non_finite: 0,
        tolerance: 1e-6,
        passed: den > 0.0 && (num / den).sqrt() <= 1e-6,
    });
    let mut got = crate::wave_tier::TierCounters::default();
    let mut resident_diff = 0usize;
    for (si, t) in tiered.iter().enumerate() {
        let w = t.wave.as_deref().ok_or("index missing")?;
        let tr = w.tier.as_ref().ok_or("tier missing")?;
        let c = b.tier_counters(tr).map_err(s_)?;
        got.hit_pages += c.hit_pages;
        got.admitted_pages += c.admitted_pages;
        got.bypass_pages += c.bypass_pages;
        got.evicted_pages += c.evicted_pages;
        got.cold_pages += c.cold_pages;
        for h in 0..nkv {
            let stamps = b
                .tier_stamps(tr, w.n_clusters, layer * nkv + h)
                .map_err(s_)?;
            let pol = &policies[si * nkv + h];
            resident_diff += stamps
                .iter()
                .enumerate()
                .filter(|&(c, &st)| (st != 0) != pol.contains(c as u32))
                .count();
        }
    }
    let same = got == want && resident_diff == 0;
    out.push(CheckResult::exact(
        format!(
            "wave tier: buffers == store policy (hit {} admit {} bypass {} evict {} pages; GPU {}/{}/{}/{}, {} residents differ)",
            want.hit_pages, want.admitted_pages, want.bypass_pages, want.evicted_pages,
            got.hit_pages, got.admitted_pages, got.bypass_pages, got.evicted_pages, resident_diff
        ), resident_diff as f64, same && want.hit_pages > 0 && want.evicted_pages > 0));
    out.push(no_list_cut(b, "wave tier token lists: none cut short")?);
    Ok(out)
}

/// GPU against the CPU reference implementation (module docs, 4.), one sequence, one step.
pub(crate) fn check_wave_cpu(
    b: &CudaBackend,
    rng: &mut StdRng,
    hd: usize,
    nh: usize,
    nkv: usize,
) -> Result<Vec<CheckResult>, String> {
    let mut out = cpu_agreement(b, rng, hd, nh, nkv, 6000, 6000, false)?;
    // A step after an index update (301 tokens clustered into 64 more clusters), with the
    // KV in GPU memory and in the host tier.
    out.extend(cpu_agreement(b, rng, hd, nh, nkv, 5000, 5300, false)?);
    out.extend(cpu_agreement(b, rng, hd, nh, nkv, 5000, 5300, true)?);
    Ok(out)
}

/// One decode step at position `pos` of a sequence indexed at `built` tokens (an update runs
/// first when one is due), GPU against the CPU reference (the index built, and updated, by
/// `retrowave_index` from the same keys).
#[allow(clippy::too_many_arguments)]
fn cpu_agreement(
    b: &CudaBackend,
    rng: &mut StdRng,
    hd: usize,
    nh: usize,
    nkv: usize,
    built: usize,
    pos: usize,
    host_kv: bool,
) -> Result<Vec<CheckResult>, String> {
    use retrowave_index::kv::{HeadDims, KvView};
    use retrowave_index::{ClusterIndex, attend, plan_step, score_clusters};
    let e = |x: retrowave_core::BackendError| x.to_string();
    let s_ = |x: crate::CudaError| x.to_string();
    let CheckShape {
        heads,
        layers,
        layer,
        mut cfg,
    } = CheckShape::new(hd, nh, nkv);
    let len = pos;
    let cap = 6100;
    cfg.update_interval = 256;
    cfg.host_kv = host_kv;
    // The summed-softmax ranking, whose near-ties this check judges by the summed score. The
    // union ranking (the default) ranks by each head's own logits; section `wave selection`
    // checks it against the CPU rule on the GPU's own logits, where ties are exact.
    cfg.union_ranking = false;
    let mut kv = b.new_kv(layers, heads, cap).map_err(e)?;
    // The fill writes every slot; the index covers the first `built` tokens, and the cache
    // holds `pos` when the step comes.
    b.kv_fill_synthetic(&mut kv, built, 303).map_err(e)?;
    b.kv_build_index(&mut kv, &cfg).map_err(e)?;
    kv.len = pos;
    let lens = [len];
    let x = step_inputs(b, rng, &lens, 0, heads);
    let mut kvs = vec![kv];
    {
        let mut refs: Vec<&mut DevKv> = kvs.iter_mut().collect();
        b.wave_updates(&mut refs, &x.batch).map_err(s_)?;
    }
    let updates = kvs[0].wave.as_ref().map_or(0, |w| w.updates);
    let y = run_step(b, layer, &x, &mut kvs, heads)?;
    // The GPU's selection of that step (deterministic: the same again).
    let (sel, ids, counts) = step_selection(b, &kvs, &x, layer, heads)?;
    let kv = &kvs[0];
    // The whole cache (with a host tier: the GPU's part and the arena's, put back together).
    let (kk, vv, cap) = if kv.hole.1 > 0 {
        let (k, v) = b.restored_copy(kv).map_err(s_)?;
        (
            b.download(&k, k.len()).map_err(s_)?,
            b.download(&v, v.len()).map_err(s_)?,
            kv.cap + kv.hole.1,
        )
    } else {
        (
            b.download(&kv.k, kv.k.len()).map_err(s_)?,
            b.download(&kv.v, kv.v.len()).map_err(s_)?,
            cap,
        )
    };
    let g = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = len + 1; // the step's token is cached too
    let unit_of = |h: usize| h; // decode row 0, KV head h
    let dims = HeadDims {
        key_dim: hd,
        value_dim: hd,
    };
    let (mut differ, mut not_near_tie, mut clusters) = (0usize, 0usize, 0usize);
    let mut reference = vec![0f64; nh * hd];
    let mut own_plan = vec![0f64; nh * hd];
    // Where the two sides part, if they do: the clustering, the centroids, the scores.
    let w = kv.wave.as_deref().ok_or("index missing")?;
    let (kc, it) = (w.n_clusters, w.indexed_tokens());
    let g_offs = b.download(&w.offsets, w.offsets.len()).map_err(s_)?;
    let g_mem = b.download(&w.members, w.members.len()).map_err(s_)?;
    let g_cent = b.download(&w.centroids, w.centroids.len()).map_err(s_)?;
    let g_scores = b.download(&sel.scores, sel.scores.len()).map_err(s_)?;
    let (mut cluster_diff, mut cent_rel, mut score_rel) = (0usize, 0f64, 0f64);
    for h in 0..nkv {
        let base = (layer * nkv + h) * cap * hd;
        let keys: Vec<f32> = kk[base..base + n * hd].iter().map(|x| x.to_f32()).collect();
        let values: Vec<f32> = vv[base..base + n * hd].iter().map(|x| x.to_f32()).collect();
        let view = KvView::new(&keys[..built * hd], &values[..built * hd], dims)
            .map_err(|x| x.to_string())?;
        let mut index = ClusterIndex::build(&view, &cfg).map_err(|x| x.to_string())?;
        let all = KvView::new(&keys, &values, dims).map_err(|x| x.to_string())?;
        if let Some(range) = index.pending_update(&cfg, n) {
            index
                .append_segment(&all, range, &cfg)
                .map_err(|x| x.to_string())?;
        }
        if index.updates() != updates {
            return Err(format!(
                "index updates before the step: GPU {updates}, CPU {}",
                index.updates()
            ));
        }
        let qs: Vec<f32> = x.q[h * g * hd..(h + 1) * g * hd].to_vec();
        let scores = score_clusters(&index, &qs, scale).map_err(|x| x.to_string())?;
        let iu = layer * nkv + h;
        if index.n_clusters() != kc {
            cluster_diff += kc.abs_diff(index.n_clusters()).max(1);
        } else {
            let co = index.offsets();
            cluster_diff += (0..=kc)
                .filter(|&c| co[c] as i32 != g_offs[iu * (kc + 1) + c])
                .count();
            cluster_diff += index
                .all_members()
                .iter()
                .zip(&g_mem[iu * it..(iu + 1) * it])
                .filter(|(a, b)| **a as i32 != **b)
                .count();
            let cc = index.centroids();
            for (a, b) in cc.iter().zip(&g_cent[iu * kc * hd..(iu + 1) * kc * hd]) {
                let d = f64::from((a - b.to_f32()).abs()) / f64::from(a.abs()).max(1e-3);
                cent_rel = cent_rel.max(d);
            }
            for (c, &sc) in scores.iter().enumerate() {
                if sc > 0.0 {
                    let gs = g_scores[unit_of(h) * sel.max_clusters + c];
                    score_rel = score_rel.max(f64::from((gs - sc).abs() / sc));
                }
            }
        }
        let plan = plan_step(&index, &cfg, &scores, n).map_err(|x| x.to_string())?;
        // Zones: the clusters in one zone on one side and not on the other.
        let unit = h; // decode row 0
        let (nr, ne) = (counts[2 * unit] as usize, counts[2 * unit + 1] as usize);
        let uid = &ids[unit * sel.max_ids..unit * sel.max_ids + nr + ne];
        let gpu_r: std::collections::BTreeSet<u32> = uid[..nr].iter().map(|&c| c as u32).collect();
        let gpu_e: std::collections::BTreeSet<u32> = uid[nr..].iter().map(|&c| c as u32).collect();
        let cpu_r: std::collections::BTreeSet<u32> = plan.retrieval.iter().copied().collect();
        let cpu_e: std::collections::BTreeSet<u32> = plan.estimation.iter().copied().collect();
        clusters += cpu_r.len() + cpu_e.len();
        // The score at each CPU zone's boundary: a differing cluster must score within 2% of it.
        let min_of = |z: &std::collections::BTreeSet<u32>| {
            z.iter()
                .map(|&c| scores[c as usize])
                .fold(f32::INFINITY, f32::min)
        };
        // A cluster may change zones only at a boundary (the retrieval zone's or the
        // estimation zone's lowest score), by a near-tie there.
        let (tr, te) = (min_of(&cpu_r), min_of(&cpu_e));
        let near = |sc: f32, t: f32| (sc - t).abs() <= 0.02 * t.abs().max(1e-30);
        for (a, bset) in [
            (&gpu_r, &cpu_r),
            (&cpu_r, &gpu_r),
            (&gpu_e, &cpu_e),
            (&cpu_e, &gpu_e),
        ] {
            for c in a.difference(bset) {
                differ += 1;
                let sc = scores[*c as usize];
                if !near(sc, tr) && !near(sc, te) {
                    not_near_tie += 1;
                }
            }
        }
        // The CPU's attention over the GPU's zones (everything but the selection), and over
        // its own (on uniform random values the output is a small average, so one cluster
        // changing zones moves it by percents: reported, not judged).
        let gpu_plan = retrowave_index::ZonePlan {
            steady: plan.steady.clone(),
            retrieval: gpu_r.iter().copied().collect(),
            estimation: gpu_e.iter().copied().collect(),
        };
        for gh in 0..g {
            let head = h * g + gh;
            let qh = &x.q[head * hd..(head + 1) * hd];
            let out = attend(&all, &index, &gpu_plan, qh, scale).map_err(|x| x.to_string())?;
            for (d, &o) in out.out.iter().enumerate() {
                reference[head * hd + d] = f64::from(o);
            }
            let own = attend(&all, &index, &plan, qh, scale).map_err(|x| x.to_string())?;
            for (d, &o) in own.out.iter().enumerate() {
                own_plan[head * hd + d] = f64::from(o);
            }
        }
    }
    let own_rel = {
        let (mut num, mut den) = (0f64, 0f64);
        for (a, r) in y.iter().zip(&own_plan) {
            num += (f64::from(*a) - r).powi(2);
            den += r * r;
        }
        (num / den.max(1e-300)).sqrt()
    };
    let what = match (updates, host_kv) {
        (0, _) => String::new(),
        (u, false) => format!(", after {u} index update"),
        (u, true) => format!(", after {u} index update, host tier"),
    };
    Ok(vec![
        CheckResult::exact(
            format!(
                "wave step == CPU reference zones (hd {hd}, {nh}/{nkv} heads{what}): {differ} of {clusters} zone memberships differ, {not_near_tie} not near-ties (clustering differs at {cluster_diff} places, centroids by {cent_rel:.1e}, scores by {score_rel:.1e})"
            ),
            not_near_tie as f64,
            not_near_tie == 0 && differ * 50 <= clusters.max(1),
        ),
        compare(
            format!(
                "wave step == CPU reference output on the GPU's zones (hd {hd}, {nh}/{nkv} heads{what}; on the CPU's own zones rel {own_rel:.1e})"
            ),
            &y,
            &reference,
            5e-3,
        ),
    ])
}
