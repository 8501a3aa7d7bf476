//! Kernel checks against CPU references on fresh random inputs, with every device allocation
//! poisoned (NaN) first so that an element a kernel fails to write fails the check. Run on a GPU
//! by `retrowave bench gpu` and by this crate's tests where a GPU is present.

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use retrowave_core::{
    Backend, BatchLayout, HeadLayout, RopeParams, RopeStyle, RowSampling, SeqRows, TensorType,
    WeightView,
};

use crate::CudaBackend;
use crate::backend::Gemv;

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    /// ‖gpu − ref‖ / ‖ref‖.
    pub rel_l2: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Elements that are NaN or infinite on the GPU.
    pub non_finite: usize,
    pub tolerance: f64,
    pub passed: bool,
}

impl CheckResult {
    /// A check of counts or equality rather than of values: `max_abs` carries how many things
    /// were wrong.
    pub(crate) fn exact(name: impl Into<String>, wrong: f64, passed: bool) -> Self {
        CheckResult {
            name: name.into(),
            rel_l2: 0.0,
            max_abs: wrong,
            non_finite: 0,
            tolerance: 0.0,
            passed,
        }
    }
}

pub(crate) fn compare(name: String, gpu: &[f32], reference: &[f64], tolerance: f64) -> CheckResult {
    let (mut num, mut den, mut max_abs, mut non_finite) = (0f64, 0f64, 0f64, 0usize);
    for (&g, &r) in gpu.iter().zip(reference) {
        if !g.is_finite() {
            non_finite += 1;
            continue;
        }
        let d = g as f64 - r;
        num += d * d;
        den += r * r;
        max_abs = max_abs.max(d.abs());
    }
    let rel_l2 = (num / den.max(1e-300)).sqrt();
    let passed = non_finite == 0 && gpu.len() == reference.len() && rel_l2 <= tolerance;
    CheckResult {
        name,
        rel_l2,
        max_abs,
        non_finite,
        tolerance,
        passed,
    }
}

pub(crate) fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn bf16_round(x: f32) -> f64 {
    bf16::from_f32(x).to_f64()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Runs every check; returns their results (a failure to run is an error).
pub fn run_all(b: &CudaBackend, seed: u64) -> Result<Vec<CheckResult>, String> {
    b.set_poison(true);
    let r = run_inner(b, seed);
    b.set_poison(false);
    r
}

/// Whether the section of checks `name` runs (`RETROWAVE_CHECKS=word` keeps only the sections
/// whose name contains it); names it on stderr when it does, so that a device fault can be placed.
fn section(name: &str) -> bool {
    let keep = std::env::var("RETROWAVE_CHECKS").map_or(true, |f| name.contains(f.as_str()));
    if keep {
        eprintln!("checks: {name}");
    }
    keep
}

fn run_inner(b: &CudaBackend, seed: u64) -> Result<Vec<CheckResult>, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let e = |x: retrowave_core::BackendError| x.to_string();

    // Linear (cuBLAS bf16, f32 accumulation) with bias, odd sizes.
    for &(n, k, m) in &[
        (1usize, 576usize, 1536usize),
        (7, 896, 4864),
        (130, 1536, 256),
    ] {
        let x = rand_vec(&mut rng, n * k, 1.0);
        let w = rand_vec(&mut rng, m * k, 0.1);
        let bias = rand_vec(&mut rng, m, 0.5);
        let wb = bf16_bytes(&w);
        let view = WeightView::new("w", TensorType::BF16, m, k, &wb).map_err(|e| e.to_string())?;
        let dm = b.load_matrix(&view, 0..m, 0..k).map_err(e)?;
        let bb = f32_bytes(&bias);
        let bview = WeightView::new("b", TensorType::F32, 1, m, &bb).map_err(|e| e.to_string())?;
        let dv = b.load_vector(&bview, 0..m).map_err(e)?;
        let xa = b.acts_from_host(&x, n, k);
        let y = b.acts_to_host(&b.linear(&xa, &dm, Some(&dv)));
        let mut r = vec![0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                let mut acc = 0f64;
                for t in 0..k {
                    acc += bf16_round(x[i * k + t]) * bf16_round(w[j * k + t]);
                }
                r[i * m + j] = acc + bias[j] as f64;
            }
        }
        out.push(compare(
            format!("linear {n}x{k} -> {m} + bias"),
            &y,
            &r,
            1e-4,
        ));
    }

    // The skinny GEMM (decode steps of up to 8 rows) against cuBLAS on the same bf16 inputs:
    // one K tile and several (14336 = 7 tiles), a ragged last block of weight rows, K = 8.
    for &(k, m) in &[
        (4096usize, 4096usize),
        (14336, 37),
        (8, 19),
        (2056, 1),
        (2080, 23),
    ] {
        for n in [1usize, 2, 3, 6, 8] {
            let dev = |x: crate::CudaError| x.to_string();
            let x: Vec<bf16> = rand_vec(&mut rng, n * k, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let w: Vec<bf16> = rand_vec(&mut rng, m * k, 0.1)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let (xd, wd) = (b.upload(&x).map_err(dev)?, b.upload(&w).map_err(dev)?);
            let (yg, yc) = (
                b.alloc::<f32>(n * m).map_err(dev)?,
                b.alloc::<f32>(n * m).map_err(dev)?,
            );
            let (p, q) = (crate::backend::dp::<bf16>, crate::backend::dp::<f32>);
            if !b.gemv_fits(p(&xd), p(&wd), n, m, k) {
                return Err(format!("gemv does not take {n}x{k} @ {m}x{k}"));
            }
            b.gemv(Gemv::CudaCores, p(&xd), p(&wd), q(&yg), n, m, k)
                .map_err(dev)?;
            b.gemm_cublas_f32(p(&xd), p(&wd), q(&yc), n, m, k)
                .map_err(dev)?;
            let got = b.download(&yg, n * m).map_err(dev)?;
            let want: Vec<f64> = b
                .download(&yc, n * m)
                .map_err(dev)?
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            out.push(compare(
                format!("gemv {n}x{k} @ {m}x{k} == cuBLAS"),
                &got,
                &want,
                1e-5,
            ));
            if k.is_multiple_of(32) {
                // Poisoned, so that an unwritten output shows.
                let yt = b.upload(&vec![f32::NAN; n * m]).map_err(dev)?;
                b.gemv(Gemv::TensorCores, p(&xd), p(&wd), q(&yt), n, m, k)
                    .map_err(dev)?;
                let got = b.download(&yt, n * m).map_err(dev)?;
                out.push(compare(
                    format!("gemv (tensor cores) {n}x{k} @ {m}x{k} == cuBLAS"),
                    &got,
                    &want,
                    1e-5,
                ));
            }
        }
    }

    // RMSNorm, SwiGLU, residual add, embedding, row selection.
    {
        let (rows, cols) = (5usize, 1536usize);
        let x = rand_vec(&mut rng, rows * cols, 2.0);
        let w = rand_vec(&mut rng, cols, 1.0);
        let wb = f32_bytes(&w);
        let view =
            WeightView::new("n", TensorType::F32, 1, cols, &wb).map_err(|e| e.to_string())?;
        let dv = b.load_vector(&view, 0..cols).map_err(e)?;
        let xa = b.acts_from_host(&x, rows, cols);
        let y = b.acts_to_host(&b.rms_norm(&xa, &dv, 1e-5));
        let mut r = vec![0f64; rows * cols];
        for i in 0..rows {
            let row = &x[i * cols..(i + 1) * cols];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for j in 0..cols {
                r[i * cols + j] = row[j] as f64 * inv * w[j] as f64;
            }
        }
        out.push(compare("rms_norm 5x1536".into(), &y, &r, 1e-6));

        let g = rand_vec(&mut rng, rows * cols, 4.0);
        let u = rand_vec(&mut rng, rows * cols, 4.0);
        let (ga, ua) = (
            b.acts_from_host(&g, rows, cols),
            b.acts_from_host(&u, rows, cols),
        );
        let y = b.acts_to_host(&b.silu_mul(&ga, &ua));
        let r: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64)
            .collect();
        out.push(compare("silu_mul".into(), &y, &r, 1e-6));

        let mut xa = b.acts_from_host(&g, rows, cols);
        b.add_assign(&mut xa, &ua);
        let y = b.acts_to_host(&xa);
        let r: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &c)| a as f64 + c as f64)
            .collect();
        out.push(compare("add_inplace".into(), &y, &r, 1e-7));

        // The fused residual add and norm equals the add, then the norm, bit for bit; so does a
        // GEMM on a norm's bf16 copy against one that casts the same values itself.
        {
            let mut xf = b.acts_from_host(&g, rows, cols);
            let nf = b.add_rms_norm(&mut xf, &ua, &dv, 1e-5);
            let added: Vec<f64> = b.acts_to_host(&xf).iter().map(|&v| v as f64).collect();
            out.push(compare("add_rms_norm: the sum".into(), &y, &added, 0.0));
            let normed = b.acts_to_host(&b.rms_norm(&xa, &dv, 1e-5));
            let nf_host = b.acts_to_host(&nf);
            let r: Vec<f64> = normed.iter().map(|&v| v as f64).collect();
            out.push(compare("add_rms_norm: the norm".into(), &nf_host, &r, 0.0));
            let (m, wq) = (96usize, rand_vec(&mut rng, 96 * cols, 0.05));
            let wqb = bf16_bytes(&wq);
            let view = WeightView::new("wq", TensorType::BF16, m, cols, &wqb)
                .map_err(|e| e.to_string())?;
            let dm = b.load_matrix(&view, 0..m, 0..cols).map_err(e)?;
            // A GEMM on activations with a bf16 copy, against one on the same values uploaded
            // without it (which casts them itself).
            let twin_vs_cast = |acts: &crate::DevActs, what: &str| {
                let twin = b.acts_to_host(&b.linear(acts, &dm, None));
                let host = b.acts_to_host(acts);
                let cast =
                    b.acts_to_host(&b.linear(&b.acts_from_host(&host, rows, cols), &dm, None));
                let r: Vec<f64> = cast.iter().map(|&v| v as f64).collect();
                compare(format!("linear on {what}'s bf16 copy"), &twin, &r, 0.0)
            };
            out.push(twin_vs_cast(&nf, "a norm"));
            out.push(twin_vs_cast(&b.silu_mul(&ga, &ua), "silu_mul"));

            // Column blocks in one launch: aligned (vector path) and odd widths (scalar path).
            for widths in [
                vec![1024usize, 256, 256],
                vec![5, 7, 1500, 24],
                vec![1536],
                vec![100, 200, 300, 400, 500, 36],
            ] {
                let parts = b.split_cols(&ga, &widths);
                let mut c0 = 0;
                for (p, &w) in parts.iter().zip(&widths) {
                    let got = b.acts_to_host(p);
                    let r: Vec<f64> = (0..rows)
                        .flat_map(|i| {
                            g[i * cols + c0..i * cols + c0 + w]
                                .iter()
                                .map(|&v| v as f64)
                        })
                        .collect();
                    out.push(compare(
                        format!("split_cols {widths:?}: block of {w}"),
                        &got,
                        &r,
                        0.0,
                    ));
                    c0 += w;
                }
            }
        }

        let sel = b.acts_to_host(&b.select_rows(&xa, &[4, 0, 2]));
        let r: Vec<f64> = [4usize, 0, 2]
            .iter()
            .flat_map(|&i| r[i * cols..(i + 1) * cols].to_vec())
            .collect();
        out.push(compare("select_rows".into(), &sel, &r, 0.0));

        let (vocab, hidden) = (1000usize, 576usize);
        let table = rand_vec(&mut rng, vocab * hidden, 1.0);
        let tb = bf16_bytes(&table);
        let view = WeightView::new("emb", TensorType::BF16, vocab, hidden, &tb)
            .map_err(|e| e.to_string())?;
        let dm = b.load_matrix(&view, 0..vocab, 0..hidden).map_err(e)?;
        let toks = [999u32, 0, 17, 17, 512];
        let y = b.acts_to_host(&b.embed(&dm, &toks).map_err(e)?);
        let r: Vec<f64> = toks
            .iter()
            .flat_map(|&t| {
                table[t as usize * hidden..(t as usize + 1) * hidden]
                    .iter()
                    .map(|&v| bf16_round(v))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.push(compare("embed_bf16".into(), &y, &r, 0.0));
        let bad = b.embed(&dm, &[1000]);
        out.push(CheckResult {
            name: "embed rejects token 1000 of 1000".into(),
            rel_l2: 0.0,
            max_abs: 0.0,
            non_finite: 0,
            tolerance: 0.0,
            passed: bad.is_err(),
        });
    }

    // RoPE, both pairings, partial rotation.
    for (style, rot) in [
        (RopeStyle::NeoX, 128usize),
        (RopeStyle::Interleaved, 64),
        (RopeStyle::NeoX, 32),
    ] {
        let (rows, nh, hd) = (6usize, 3usize, if rot == 128 { 128 } else { 64 });
        let x = rand_vec(&mut rng, rows * nh * hd, 1.0);
        let pos: Vec<u32> = (0..rows).map(|i| (i * 7919 % 131072) as u32).collect();
        let p = RopeParams {
            style,
            theta: 500000.0,
            dim: rot,
        };
        let mut xa = b.acts_from_host(&x, rows, nh * hd);
        b.rope(&mut xa, &pos, nh, hd, &p);
        let y = b.acts_to_host(&xa);
        let mut r: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (i, &p_i) in pos.iter().enumerate() {
            for h in 0..nh {
                let base = (i * nh + h) * hd;
                for j in 0..rot / 2 {
                    let f = (p.theta as f64).powf(-2.0 * j as f64 / rot as f64);
                    let a = p_i as f64 * f;
                    let (c, s) = (a.cos(), a.sin());
                    let (i0, i1) = match style {
                        RopeStyle::Interleaved => (base + 2 * j, base + 2 * j + 1),
                        RopeStyle::NeoX => (base + j, base + j + rot / 2),
                    };
                    let (x0, x1) = (x[i0] as f64, x[i1] as f64);
                    r[i0] = x0 * c - x1 * s;
                    r[i1] = x0 * s + x1 * c;
                }
            }
        }
        out.push(compare(
            format!("rope {style:?} rot {rot}/{hd}"),
            &y,
            &r,
            1e-6,
        ));
        // Queries and keys in one launch: each exactly as its own `rope`.
        let nkv = 2usize;
        let k = rand_vec(&mut rng, rows * nkv * hd, 1.0);
        let mut ka = b.acts_from_host(&k, rows, nkv * hd);
        b.rope(&mut ka, &pos, nkv, hd, &p);
        let k_alone: Vec<f64> = b.acts_to_host(&ka).iter().map(|&v| v as f64).collect();
        let y_alone: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        let (mut qa, mut ka) = (
            b.acts_from_host(&x, rows, nh * hd),
            b.acts_from_host(&k, rows, nkv * hd),
        );
        b.rope_qk(&mut qa, &mut ka, &pos, nh, nkv, hd, &p);
        let (qy, ky) = (b.acts_to_host(&qa), b.acts_to_host(&ka));
        let name = format!("rope_qk {style:?} rot {rot}/{hd}");
        out.push(compare(format!("{name}: queries"), &qy, &y_alone, 0.0));
        out.push(compare(format!("{name}: keys"), &ky, &k_alone, 0.0));
    }

    // Sampling on the device: greedy, and temperature/top-k/top-p by inverse CDF over the kept
    // tokens in index order, against a sort-based reference.
    {
        let (rows, vocab) = (6usize, 151_936usize);
        let logits = rand_vec(&mut rng, rows * vocab, 8.0);
        let la = b.acts_from_host(&logits, rows, vocab);
        let params: Vec<RowSampling> = (0..rows)
            .map(|i| RowSampling {
                temperature: [0.0, 0.7, 1.0, 1.3, 0.5, 1.0][i],
                top_k: [0, 40, 0, 100, 0, 1000][i],
                top_p: [1.0, 1.0, 0.9, 0.95, 1.0, 0.5][i],
                uniform: rng.random_range(0.0..1.0),
            })
            .collect();
        let got = b.sample_rows(&la, &params).map_err(e)?;
        let want: Vec<u32> = (0..rows)
            .map(|i| reference_sample(&logits[i * vocab..(i + 1) * vocab], &params[i]))
            .collect();
        let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        out.push(CheckResult {
            name: format!("sample_rows {rows}x{vocab}: {got:?} vs {want:?}"),
            rel_l2: 0.0,
            max_abs: (rows - same) as f64,
            non_finite: 0,
            tolerance: 0.0,
            passed: same == rows,
        });
        let greedy = vec![RowSampling::greedy(); rows];
        let got = b.sample_rows(&la, &greedy).map_err(e)?;
        let want: Vec<u32> = (0..rows)
            .map(|i| reference_sample(&logits[i * vocab..(i + 1) * vocab], &greedy[i]))
            .collect();
        out.push(CheckResult {
            name: "argmax_rows 6x151936".into(),
            rel_l2: 0.0,
            max_abs: 0.0,
            non_finite: 0,
            tolerance: 0.0,
            passed: got == want,
        });
    }

    // Weight dequantization on the GPU, bit-exact against the CPU decoders.
    for (name, passed, mismatches) in crate::dequant::check_dequant(b, seed ^ 0xdec0de)? {
        out.push(CheckResult {
            name: format!("{name} (bit-exact vs dequantize_row)"),
            rel_l2: 0.0,
            max_abs: mismatches as f64,
            non_finite: 0,
            tolerance: 0.0,
            passed,
        });
    }

    // Pinned host memory: the store's arena over it, and a round trip through the device.
    {
        let alloc = crate::pinned::PinnedAllocator::new(b.context().clone());
        let arena = retrowave_store::HostArena::new(&alloc, 64 << 20).map_err(|e| e.to_string())?;
        let mut src = crate::PinnedBuffer::new(b.context(), 8 << 20).map_err(|e| e.to_string())?;
        for (i, x) in src.as_mut_slice().iter_mut().enumerate() {
            *x = (i.wrapping_mul(2654435761) >> 13) as u8;
        }
        let dev = b.upload(src.as_slice()).map_err(|e| e.to_string())?;
        let back = b
            .download(&dev, src.as_slice().len())
            .map_err(|e| e.to_string())?;
        out.push(CheckResult {
            name: format!(
                "pinned memory: 8 MiB round trip, {} MiB store arena",
                arena.capacity_bytes() >> 20
            ),
            rel_l2: 0.0,
            max_abs: 0.0,
            non_finite: 0,
            tolerance: 0.0,
            passed: back == src.as_slice() && arena.capacity_bytes() == 64 << 20,
        });
    }

    // Attention: prefill of several sequences (one with a cached prefix), then decode steps of
    // sequences of different lengths, against exact attention over the bf16 cache.
    if section("attention") {
        for &(hd, nh, nkv) in &[(64usize, 9usize, 3usize), (128, 12, 2), (128, 32, 8)] {
            out.extend(check_attention(b, &mut rng, hd, nh, nkv)?);
        }
    }
    // Wave selection: GQA-summed cluster scores against an f64 reference, and the zones from
    // those scores against a full sort (ties by id, empty clusters never chosen).
    // (clusters, retrieval, estimation) per row: a long context, a short one where the budgets
    // exceed the live clusters, and one of a single chunk; then a context too long for the keys
    // to fit in shared memory.
    if section("wave selection") {
        let mut select = |hd, nh, nkv, rows: &[(usize, usize, usize)], adaptive, by_size| {
            check_wave_select(b, &mut rng, hd, nh, nkv, rows, adaptive, by_size, false)
        };
        let rows: &[(usize, usize, usize)] = &[(8192, 205, 1900), (300, 30, 300), (97, 5, 20)];
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 14, 2), (128, 32, 8)] {
            out.extend(select(hd, nh, nkv, rows, &[], false)?);
        }
        let rows: &[(usize, usize, usize)] = &[(41000, 738, 9500), (513, 40, 100)];
        out.extend(select(128, 8, 2, rows, &[], false)?);
        // Ranking by size (`rank_by_size`): the softmax over the logits plus ln |C_i|.
        let rows: &[(usize, usize, usize)] = &[(8192, 205, 1900), (300, 30, 100)];
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 9, 3)] {
            out.extend(select(hd, nh, nkv, rows, &[], true)?);
        }
        // The adaptive retrieval budget: (cap, share of the scores) per row.
        let rows: &[(usize, usize, usize)] = &[(8192, 64, 1900), (300, 5, 100), (97, 2, 20)];
        let adaptive: &[(usize, f32)] = &[(8192, 0.05), (200, 0.3), (60, 0.5)];
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 12, 4)] {
            out.extend(select(hd, nh, nkv, rows, adaptive, false)?);
        }
        out.extend(select(128, 8, 2, rows, adaptive, true)?);
        // The union ranking: each query head's own best clusters (groups of 4 and 7), fixed and
        // adaptive budgets, keys in shared and in global memory.
        let mut union = |hd, nh, nkv, rows: &[(usize, usize, usize)], adaptive| {
            check_wave_select(b, &mut rng, hd, nh, nkv, rows, adaptive, false, true)
        };
        let rows: &[(usize, usize, usize)] = &[(8192, 205, 1900), (300, 30, 100), (97, 5, 20)];
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 14, 2)] {
            out.extend(union(hd, nh, nkv, rows, &[])?);
        }
        out.extend(union(
            128,
            8,
            2,
            &[(41000, 738, 9500), (513, 40, 100)],
            &[],
        )?);
        let rows: &[(usize, usize, usize)] = &[(8192, 64, 1900), (300, 5, 100), (97, 2, 20)];
        out.extend(union(
            128,
            8,
            2,
            rows,
            &[(2000, 0.05), (200, 0.3), (60, 0.5)],
        )?);
    }
    // The wave index build (GPU k-means) against the CPU reference, bit for bit.
    if section("wave build") {
        out.extend(check_wave_build(b, &mut rng)?);
    }
    // Wave decode attention through the backend: token lists, exact part, estimate, merge.
    if section("wave decode") {
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 12, 4)] {
            out.extend(crate::wave_checks::check_wave_decode(
                b, &mut rng, hd, nh, nkv,
            )?);
        }
    }
    // The GPU's wave step against the CPU reference implementation.
    if section("wave cpu") {
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 12, 4)] {
            out.extend(crate::wave_checks::check_wave_cpu(
                b, &mut rng, hd, nh, nkv,
            )?);
        }
    }
    // The host tier: wave buffers run by the store's policy, misses copied in over PCIe.
    if section("wave tier") {
        for &(hd, nh, nkv) in &[(128usize, 8usize, 2usize), (64, 12, 4)] {
            out.extend(crate::wave_checks::check_wave_tier(
                b, &mut rng, hd, nh, nkv,
            )?);
        }
    }
    Ok(out)
}

/// One row of units per entry of `sizes` x KV heads: random bf16 centroids (every 11th a copy
/// of the one before, so scores tie), every 37th cluster empty; `by_size` ranks by the clusters'
/// estimated mass (`rank_by_size`), `union` with the union ranking (`union_ranking`).
#[allow(clippy::too_many_arguments)]
fn check_wave_select(
    b: &CudaBackend,
    rng: &mut StdRng,
    hd: usize,
    nh: usize,
    nkv: usize,
    rows: &[(usize, usize, usize)],
    adaptive: &[(usize, f32)],
    by_size: bool,
    union: bool,
) -> Result<Vec<CheckResult>, String> {
    use crate::wave::{WaveUnit, reference_split};
    let e = |x: crate::CudaError| x.to_string();
    let group = nh / nkv;
    let mut cents: Vec<Vec<f32>> = Vec::new();
    let mut lns: Vec<Vec<f32>> = Vec::new();
    let mut means: Vec<Vec<f32>> = Vec::new();
    let mut keep = Vec::new();
    let mut units = Vec::new();
    for (row, &(n, r, est)) in rows.iter().enumerate() {
        for _ in 0..nkv {
            let mut c = rand_vec(rng, n * hd, 1.0);
            for i in (11..n).step_by(11) {
                let (a, bb) = c.split_at_mut(i * hd);
                bb[..hd].copy_from_slice(&a[(i - 1) * hd..]);
            }
            let c: Vec<f32> = c.iter().map(|&x| bf16_round(x) as f32).collect();
            let ln: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 37 == 36 {
                        f32::NEG_INFINITY
                    } else {
                        ((i % 29) as f32 + 1.0).ln()
                    }
                })
                .collect();
            let cb: Vec<bf16> = c.iter().map(|&x| bf16::from_f32(x)).collect();
            let mv: Vec<f32> = rand_vec(rng, n * hd, 1.5)
                .iter()
                .map(|&x| bf16_round(x) as f32)
                .collect();
            let mb: Vec<bf16> = mv.iter().map(|&x| bf16::from_f32(x)).collect();
            let dc = b.upload(&cb).map_err(e)?;
            let dl = b.upload(&ln).map_err(e)?;
            let dm = b.upload(&mb).map_err(e)?;
            units.push(WaveUnit {
                centroids: crate::backend::dp(&dc),
                ln_sizes: crate::backend::dp(&dl),
                means: crate::backend::dp(&dm),
                n_clusters: n as i32,
                q_row: row as i32,
                retrieval: r as i32,
                estimation: est as i32,
                retrieval_cap: adaptive.get(row).map_or(0, |a| a.0 as i32),
                retrieval_mass: adaptive.get(row).map_or(0.0, |a| a.1),
                rank_by_size: i32::from(by_size),
                union_ranking: i32::from(union),
                ..Default::default()
            });
            keep.push((dc, dl, dm));
            means.push(mv);
            cents.push(c);
            lns.push(ln);
        }
    }
    let q = rand_vec(rng, rows.len() * nh * hd, 2.0);
    let dq = b.upload(&q).map_err(e)?;
    let max_ids = rows
        .iter()
        .enumerate()
        .map(|(i, r)| r.1.max(adaptive.get(i).map_or(0, |a| a.0)) + r.2)
        .max()
        .unwrap_or(1);
    let sel = b
        .wave_select(&units, crate::backend::dp(&dq), nh, nkv, hd, max_ids)
        .map_err(e)?;
    let scores = b
        .download(&sel.scores, units.len() * sel.max_clusters)
        .map_err(e)?;
    let ids = b.download(&sel.ids, units.len() * max_ids).map_err(e)?;
    let counts = b.download(&sel.counts, units.len() * 2).map_err(e)?;
    let est = b.wave_estimate(&sel).map_err(e)?;
    let est_out = b.download(&est.out, units.len() * group * hd).map_err(e)?;
    let est_lse = b.download(&est.lse, units.len() * group).map_err(e)?;
    let logits = b
        .download(&sel.logits, units.len() * group * sel.max_clusters)
        .map_err(e)?;
    let (mut gpu_o, mut ref_o, mut gpu_lse, mut ref_lse) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut gpu_s, mut ref_s) = (Vec::new(), Vec::new());
    let mut mismatched = 0usize;
    // Adaptive units: (reference r, GPU r, cap).
    let mut adaptive_seen: Vec<(usize, usize, usize)> = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        let n = unit.n_clusters as usize;
        let kvh = u % nkv;
        let row = unit.q_row as usize;
        let live: Vec<bool> = lns[u].iter().map(|&l| l != f32::NEG_INFINITY).collect();
        // Reference scores: per query head, the softmax over live clusters of scale * q . c
        // (plus ln |C_i| when ranking by size).
        let mut want = vec![0f64; n];
        for g in 0..group {
            let qg = &q[(row * nh + kvh * group + g) * hd..][..hd];
            let l: Vec<f64> = (0..n)
                .map(|c| {
                    let bias = if by_size && live[c] {
                        f64::from(lns[u][c])
                    } else {
                        0.0
                    };
                    bias + scale
                        * cents[u][c * hd..(c + 1) * hd]
                            .iter()
                            .zip(qg)
                            .map(|(&x, &y)| f64::from(x) * f64::from(y))
                            .sum::<f64>()
                })
                .collect();
            let m = (0..n)
                .filter(|&c| live[c])
                .map(|c| l[c])
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = (0..n).filter(|&c| live[c]).map(|c| (l[c] - m).exp()).sum();
            for c in (0..n).filter(|&c| live[c]) {
                want[c] += (l[c] - m).exp() / z;
            }
        }
        let got = &scores[u * sel.max_clusters..u * sel.max_clusters + n];
        for c in 0..n {
            if live[c] {
                gpu_s.push(got[c]);
                ref_s.push(want[c]);
            } else if got[c] != f32::NEG_INFINITY {
                mismatched += 1;
            }
        }
        // The adaptive budget from the GPU's own scores as the CPU computes it: the best
        // positive scores, in f64 from the top, until they cover the share of their total.
        let mut r_ref = unit.retrieval as usize;
        if unit.retrieval_mass > 0.0 && unit.retrieval_cap > unit.retrieval {
            let mut pos: Vec<f32> = got
                .iter()
                .copied()
                .filter(|x| x.is_finite() && *x > 0.0)
                .collect();
            let total: f64 = pos.iter().map(|&x| f64::from(x)).sum();
            pos.sort_by(|a, b| b.total_cmp(a));
            let cap = (unit.retrieval_cap as usize).min(pos.len());
            let goal = f64::from(unit.retrieval_mass) * total;
            let (mut acc, mut k) = (0f64, cap);
            for (i, &x) in pos[..cap].iter().enumerate() {
                acc += f64::from(x);
                if acc >= goal {
                    k = i + 1;
                    break;
                }
            }
            r_ref = r_ref.max(k);
            adaptive_seen.push((r_ref, counts[2 * u] as usize, cap));
        }
        // The zones from the GPU's own scores (and with the union ranking its own logits),
        // exactly.
        let mut ranked = got.to_vec();
        if union {
            let lg: Vec<f32> = (0..group)
                .flat_map(|g| {
                    let at = (u * group + g) * sel.max_clusters;
                    logits[at..at + n].iter().copied()
                })
                .collect();
            let live_ids: Vec<u32> = (0..n as u32).filter(|&c| live[c as usize]).collect();
            retrowave_index::select::union_boost(&mut ranked, &live_ids, &lg, group, r_ref);
        }
        let (ret, est) = reference_split(&ranked, &live, r_ref, unit.estimation as usize);
        let (nr, ne) = (counts[2 * u] as usize, counts[2 * u + 1] as usize);
        let list = &ids[u * max_ids..];
        if nr != ret.len()
            || ne != est.len()
            || list[..nr] != ret[..]
            || list[nr..nr + ne] != est[..]
        {
            mismatched += 1;
        }
        // The estimation zone from the GPU's own logits and zones: per head, attention to |C_i|
        // copies of each cluster's centroid carrying its mean value.
        let est_ids = &list[nr..nr + ne];
        for g in 0..group {
            let lg = &logits[(u * group + g) * sel.max_clusters..];
            let x: Vec<f64> = est_ids
                .iter()
                .map(|&c| f64::from(lg[c as usize]) + f64::from(lns[u][c as usize]))
                .collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = x.iter().map(|&v| (v - m).exp()).collect();
            let l: f64 = w.iter().sum();
            for d in 0..hd {
                let a: f64 = est_ids
                    .iter()
                    .zip(&w)
                    .map(|(&c, &wc)| wc * f64::from(means[u][c as usize * hd + d]))
                    .sum();
                gpu_o.push(est_out[(u * group + g) * hd + d]);
                ref_o.push(if l > 0.0 { a / l } else { 0.0 });
            }
            gpu_lse.push(est_lse[u * group + g]);
            ref_lse.push(if l > 0.0 {
                m + l.ln()
            } else {
                f64::NEG_INFINITY
            });
        }
    }
    let tag = match (by_size, union) {
        (true, _) => ", ranked by size",
        (false, true) => ", union ranking",
        _ => "",
    };
    let res = compare(
        format!(
            "wave scores hd{hd} {nh}/{nkv} heads, {:?} clusters{tag}",
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ),
        &gpu_s,
        &ref_s,
        1e-4,
    );
    let zones = CheckResult {
        name: format!(
            "wave zones hd{hd} {nh}/{nkv} heads, {} rows{tag} (units with wrong lists)",
            rows.len()
        ),
        rel_l2: mismatched as f64,
        max_abs: mismatched as f64,
        non_finite: 0,
        tolerance: 0.0,
        passed: mismatched == 0,
    };
    let est_o = compare(
        format!(
            "wave estimation hd{hd} {nh}/{nkv} heads, {} rows{tag}: outputs",
            rows.len()
        ),
        &gpu_o,
        &ref_o,
        1e-4,
    );
    let est_l = compare(
        format!(
            "wave estimation hd{hd} {nh}/{nkv} heads, {} rows{tag}: lse",
            rows.len()
        ),
        &gpu_lse,
        &ref_lse,
        1e-5,
    );
    let mut out = vec![res, zones, est_o, est_l];
    if !adaptive.is_empty() {
        // The adaptive budget must have been exercised inside its range (r below the cap).
        let inside = adaptive_seen.iter().filter(|a| a.0 < a.2).count();
        let equal = adaptive_seen.iter().filter(|a| a.0 == a.1).count();
        out.push(CheckResult {
            name: format!(
                "wave adaptive retrieval hd{hd}: {equal}/{} units as the CPU rule, {inside} below the cap",
                adaptive_seen.len()
            ),
            rel_l2: 0.0,
            max_abs: (adaptive_seen.len() - equal) as f64,
            non_finite: 0,
            tolerance: 0.0,
            passed: equal == adaptive_seen.len() && inside > 0,
        });
    }
    Ok(out)
}

fn reference_sample(logits: &[f32], p: &RowSampling) -> u32 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.temperature <= 0.0 {
        return idx[0] as u32;
    }
    let k = if p.top_k == 0 {
        idx.len()
    } else {
        p.top_k.min(idx.len())
    };
    idx.truncate(k);
    let m = logits[idx[0]] as f64;
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / p.temperature as f64).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut keep = idx.len();
    if p.top_p < 1.0 {
        let mut c = 0.0;
        for (j, x) in w.iter().enumerate() {
            c += x / z;
            if c >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
    }
    let mut kept: Vec<(usize, f64)> = idx[..keep]
        .iter()
        .copied()
        .zip(w[..keep].iter().copied())
        .collect();
    kept.sort_by_key(|&(i, _)| i);
    let mass: f64 = kept.iter().map(|&(_, x)| x).sum();
    let mut r = p.uniform as f64 * mass;
    for &(i, x) in &kept {
        r -= x;
        if r < 0.0 {
            return i as u32;
        }
    }
    kept[kept.len() - 1].0 as u32
}

fn reference_attention(
    q: &[f32],
    keys: &[Vec<f64>],
    vals: &[Vec<f64>],
    n_visible: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f64> {
    // keys[h][t * hd + d]; q: [nh * hd] of one row.
    let g = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut o = vec![0f64; nh * hd];
    for h in 0..nh {
        let kh = h / g;
        let s: Vec<f64> = (0..n_visible)
            .map(|t| {
                (0..hd)
                    .map(|d| q[h * hd + d] as f64 * keys[kh][t * hd + d])
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for t in 0..n_visible {
            for d in 0..hd {
                o[h * hd + d] += w[t] / z * vals[kh][t * hd + d];
            }
        }
    }
    o
}

fn check_attention(
    b: &CudaBackend,
    rng: &mut StdRng,
    hd: usize,
    nh: usize,
    nkv: usize,
) -> Result<Vec<CheckResult>, String> {
    let e = |x: retrowave_core::BackendError| x.to_string();
    let heads = HeadLayout {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    };
    let layers = 2usize;
    let layer = 1usize;
    // Sequence lengths: prompt lengths for a first prefill, a second chunk, then decode steps.
    let first = [70usize, 1, 200];
    let second = [0usize, 130, 3];
    let cap = 3000;
    let mut kvs = Vec::new();
    for _ in 0..first.len() {
        kvs.push(b.new_kv(layers, heads, cap).map_err(e)?);
    }
    // Host copies of what each cache holds, per KV head: keys[s][h][t*hd + d] (bf16-rounded).
    let mut hk: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); nkv]; first.len()];
    let mut hv = hk.clone();
    let mut results = Vec::new();
    let mut lens = vec![0usize; first.len()];
    let steps: Vec<Vec<usize>> = vec![
        first.to_vec(),
        second.to_vec(),
        vec![1, 1, 1],
        vec![1, 1, 1],
    ];
    for (si, step) in steps.iter().enumerate() {
        let mut seqs = Vec::new();
        let mut row = 0;
        let mut members = Vec::new();
        for (i, &n) in step.iter().enumerate() {
            if n == 0 {
                continue;
            }
            seqs.push(SeqRows {
                slot: i,
                row,
                start_pos: lens[i],
                n_tokens: n,
            });
            members.push(i);
            row += n;
        }
        let rows = row;
        let batch = BatchLayout { seqs };
        let q = rand_vec(rng, rows * nh * hd, 2.0);
        let k = rand_vec(rng, rows * nkv * hd, 2.0);
        let v = rand_vec(rng, rows * nkv * hd, 1.0);
        let (qa, ka, va) = (
            b.acts_from_host(&q, rows, nh * hd),
            b.acts_from_host(&k, rows, nkv * hd),
            b.acts_from_host(&v, rows, nkv * hd),
        );
        let mut taken: Vec<&mut crate::DevKv> = kvs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| members.contains(i))
            .map(|(_, kv)| kv)
            .collect();
        let y = b
            .attention(layer, &qa, &ka, &va, &mut taken, &batch, heads)
            .map_err(e)?;
        let y = b.acts_to_host(&y);
        b.check().map_err(e)?;
        // Reference: append, then attend causally.
        let mut r = vec![0f64; rows * nh * hd];
        for s in &batch.seqs {
            let i = s.slot;
            for t in 0..s.n_tokens {
                let rr = s.row + t;
                for h in 0..nkv {
                    for d in 0..hd {
                        hk[i][h].push(bf16_round(k[rr * nkv * hd + h * hd + d]));
                        hv[i][h].push(bf16_round(v[rr * nkv * hd + h * hd + d]));
                    }
                }
            }
            for t in 0..s.n_tokens {
                let rr = s.row + t;
                let o = reference_attention(
                    &q[rr * nh * hd..(rr + 1) * nh * hd],
                    &hk[i],
                    &hv[i],
                    s.start_pos + t + 1,
                    nh,
                    nkv,
                    hd,
                );
                r[rr * nh * hd..(rr + 1) * nh * hd].copy_from_slice(&o);
            }
            lens[i] += s.n_tokens;
        }
        let kind = if step.iter().all(|&n| n <= 1) {
            "decode"
        } else {
            "prefill"
        };
        // Prefill rounds P to bf16 before the PV product (tensor cores): bf16-level tolerance.
        let tol = if kind == "decode" { 1e-4 } else { 5e-3 };
        results.push(compare(
            format!("attention {kind} step {si} hd {hd} heads {nh}/{nkv} lens {lens:?}"),
            &y,
            &r,
            tol,
        ));
    }
    // A long decode (several splits) on one sequence: fill synthetically then compare.
    {
        let len = 5000usize;
        let mut kv = b.new_kv(layers, heads, len + 1).map_err(e)?;
        b.kv_fill_synthetic(&mut kv, len, 7).map_err(e)?;
        let host_k = b.download(&kv.k, kv.k.len()).map_err(|x| x.to_string())?;
        let host_v = b.download(&kv.v, kv.v.len()).map_err(|x| x.to_string())?;
        let q = rand_vec(rng, nh * hd, 2.0);
        let k = rand_vec(rng, nkv * hd, 2.0);
        let v = rand_vec(rng, nkv * hd, 1.0);
        let batch = BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: len,
                n_tokens: 1,
            }],
        };
        let (qa, ka, va) = (
            b.acts_from_host(&q, 1, nh * hd),
            b.acts_from_host(&k, 1, nkv * hd),
            b.acts_from_host(&v, 1, nkv * hd),
        );
        let y = b
            .attention(layer, &qa, &ka, &va, &mut [&mut kv], &batch, heads)
            .map_err(e)?;
        let y = b.acts_to_host(&y);
        let cap = len + 1;
        let mut keys = vec![Vec::new(); nkv];
        let mut vals = vec![Vec::new(); nkv];
        for h in 0..nkv {
            let base = (layer * nkv + h) * cap * hd;
            keys[h] = host_k[base..base + len * hd]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            vals[h] = host_v[base..base + len * hd]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            keys[h].extend(k[h * hd..(h + 1) * hd].iter().map(|&x| bf16_round(x)));
            vals[h].extend(v[h * hd..(h + 1) * hd].iter().map(|&x| bf16_round(x)));
        }
        let r = reference_attention(&q, &keys, &vals, len + 1, nh, nkv, hd);
        results.push(compare(
            format!("attention decode 5001 keys hd {hd} heads {nh}/{nkv}"),
            &y,
            &r,
            1e-4,
        ));
    }
    Ok(results)
}

/// One case of [`check_wave_build`].
struct BuildCase {
    hd: usize,
    units: usize,
    /// Tokens of each unit's K/V (segments may start later and leave gaps).
    tokens: usize,
    /// (start, end, clusters) per segment.
    segments: &'static [(usize, usize, usize)],
    iterations: usize,
    /// Keys from a few centres (a quarter of the tokens exact copies of the token before, with
    /// a large common offset): uneven clusters, exact score ties, empty clusters.
    clustered: bool,
    /// Shared memory for the sort's cursors (0: the global-memory path).
    sort_smem: usize,
}

/// The wave index build on the GPU against `retrowave_index::kmeans::kmeans_segments` on the
/// same bf16 keys and values: sizes, offsets and members exactly equal, centroids and value sums
/// bit-identical (at most 1e-6 relative off counts as passing and is reported), the bf16
/// centroids, mean values and ln sizes consistent with them, two builds bit-identical, and the
/// cluster-order gather (keys to device memory, values to host-mapped pinned memory) equal to
/// the source rows by members. Then one timed build of Llama-sized segments (reported, passes
/// unless it fails to run).
fn check_wave_build(b: &CudaBackend, rng: &mut StdRng) -> Result<Vec<CheckResult>, String> {
    use crate::wave_build::{BuildSegment, BuildUnit, WB_SORT_SMEM};
    use retrowave_index::kmeans::{Segment, kmeans_segments};
    use retrowave_index::kv::{HeadDims, KvView};
    let e = |x: crate::CudaError| x.to_string();
    let cases = [
        BuildCase {
            hd: 128,
            units: 3,
            tokens: 3100,
            segments: &[(37, 2437, 300), (2437, 2837, 25), (2837, 3001, 11)],
            iterations: 9,
            clustered: false,
            sort_smem: WB_SORT_SMEM,
        },
        BuildCase {
            hd: 64,
            units: 2,
            tokens: 3000,
            segments: &[(0, 1500, 100), (1600, 2900, 90), (2900, 2950, 4)],
            iterations: 3,
            clustered: false,
            sort_smem: 0,
        },
        BuildCase {
            hd: 128,
            units: 2,
            tokens: 2600,
            segments: &[(0, 2048, 160), (2048, 2500, 40)],
            iterations: 6,
            clustered: true,
            sort_smem: WB_SORT_SMEM,
        },
        BuildCase {
            hd: 64,
            units: 4,
            tokens: 1300,
            segments: &[(10, 1210, 150), (1210, 1300, 90)],
            iterations: 5,
            clustered: true,
            sort_smem: 0,
        },
    ];
    let mut results = Vec::new();
    for case in &cases {
        let hd = case.hd;
        let segs: Vec<BuildSegment> = case
            .segments
            .iter()
            .map(|&(start, end, clusters)| BuildSegment {
                start,
                end,
                clusters,
            })
            .collect();
        let cpu_segs: Vec<Segment> = case
            .segments
            .iter()
            .map(|&(s, t, clusters)| Segment {
                tokens: s..t,
                clusters,
            })
            .collect();
        let label = format!(
            "wave build hd{hd} {} units {:?} x{} iterations{}{}",
            case.units,
            case.segments,
            case.iterations,
            if case.clustered { " clustered" } else { "" },
            if case.sort_smem == 0 {
                " (global cursors)"
            } else {
                ""
            }
        );
        // Host keys and values (bf16), one pair per unit.
        let mut host_k: Vec<Vec<bf16>> = Vec::new();
        let mut host_v: Vec<Vec<bf16>> = Vec::new();
        for _ in 0..case.units {
            let mut k = Vec::with_capacity(case.tokens * hd);
            if case.clustered {
                let centres = rand_vec(rng, 6 * hd, 2.0);
                let offset = rand_vec(rng, hd, 8.0);
                for t in 0..case.tokens {
                    if t > 0 && rng.random_range(0..4) == 0 {
                        let prev = k[(t - 1) * hd..t * hd].to_vec();
                        k.extend(prev);
                        continue;
                    }
                    // Skewed: centre 0 most often.
                    let g = rng.random_range(0..6usize).min(rng.random_range(0..6usize));
                    for d in 0..hd {
                        let noise = 0.05 * rng.random_range(-1i32..=1) as f32;
                        k.push(offset[d] + centres[g * hd + d] + noise);
                    }
                }
            } else {
                let offset = rand_vec(rng, hd, 0.5);
                k = rand_vec(rng, case.tokens * hd, 1.0);
                for (i, x) in k.iter_mut().enumerate() {
                    *x += offset[i % hd];
                }
            }
            host_k.push(k.iter().map(|&x| bf16::from_f32(x)).collect());
            host_v.push(
                rand_vec(rng, case.tokens * hd, 1.5)
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect(),
            );
        }
        let mut keep = Vec::new();
        let mut units = Vec::new();
        for (k, v) in host_k.iter().zip(&host_v) {
            let (dk, dv) = (b.upload(k).map_err(e)?, b.upload(v).map_err(e)?);
            units.push(BuildUnit {
                keys: crate::backend::dp(&dk),
                values: crate::backend::dp(&dv),
            });
            keep.push((dk, dv));
        }
        let build =
            |b: &CudaBackend| -> Result<(BuildOut, crate::wave_build::GpuClustering), String> {
                let c = b
                    .wave_build_with(&units, &segs, case.iterations, hd, case.sort_smem)
                    .map_err(e)?;
                BuildOut::download(b, c)
            };
        let (first, c) = build(b)?;
        let (second, _) = build(b)?;
        let (nu, k, n) = (case.units, c.n_clusters, c.n_tokens);

        // The reference, unit by unit.
        let (mut bad_sizes, mut bad_offsets, mut bad_members) = (0usize, 0usize, 0usize);
        let (mut gpu_sums, mut ref_sums) = (Vec::new(), Vec::new());
        let (mut identical, mut total, mut worst_rel) = (0usize, 0usize, 0f64);
        let mut inconsistent = 0usize;
        let mut empty = 0usize;
        for u in 0..nu {
            let keys: Vec<f32> = host_k[u].iter().map(|x| x.to_f32()).collect();
            let vals: Vec<f32> = host_v[u].iter().map(|x| x.to_f32()).collect();
            let dims = HeadDims {
                key_dim: hd,
                value_dim: hd,
            };
            let kv = KvView::new(&keys, &vals, dims).map_err(|x| x.to_string())?;
            let r = kmeans_segments(&kv, &cpu_segs, case.iterations).map_err(|x| x.to_string())?;
            let sizes = &first.sizes[u * k..(u + 1) * k];
            let offsets = &first.offsets[u * (k + 1)..(u + 1) * (k + 1)];
            let members = &first.members[u * n..(u + 1) * n];
            bad_sizes += sizes
                .iter()
                .zip(&r.sizes)
                .filter(|&(&g, &w)| g as u32 != w)
                .count()
                + k.abs_diff(r.sizes.len());
            bad_offsets += offsets
                .iter()
                .zip(&r.offsets)
                .filter(|&(&g, &w)| g as usize != w)
                .count();
            bad_members += members
                .iter()
                .zip(&r.members)
                .filter(|&(&g, &w)| g as u32 != w)
                .count()
                + n.abs_diff(r.members.len());
            empty += r.sizes.iter().filter(|&&s| s == 0).count();
            let range = u * k * hd..(u + 1) * k * hd;
            for (g, w) in [
                (&first.centroids_f32[range.clone()], &r.centroids),
                (&first.value_sums[range.clone()], &r.value_sums),
            ] {
                for (&x, &y) in g.iter().zip(w.iter()) {
                    total += 1;
                    if x.to_bits() == y.to_bits() {
                        identical += 1;
                    } else {
                        let rel = if x == y {
                            0.0
                        } else {
                            (f64::from(x) - f64::from(y)).abs() / f64::from(y).abs()
                        };
                        worst_rel = worst_rel.max(if rel.is_nan() { f64::INFINITY } else { rel });
                    }
                    gpu_sums.push(x);
                    ref_sums.push(f64::from(y));
                }
            }
            // The bf16 centroids, mean values and ln sizes from the GPU's own f32 results.
            for (c, &size) in sizes.iter().enumerate() {
                let ln = first.ln_sizes[u * k + c];
                let want_ln = (size as f32).ln();
                if !(ln == want_ln || (ln - want_ln).abs() <= 1e-6 * want_ln.abs().max(1.0)) {
                    inconsistent += 1;
                }
                for d in 0..hd {
                    let i = (u * k + c) * hd + d;
                    let mean = if size > 0 {
                        first.value_sums[i] / size as f32
                    } else {
                        0.0
                    };
                    if first.centroids[i].to_bits()
                        != bf16::from_f32(first.centroids_f32[i]).to_bits()
                        || first.means[i].to_bits() != bf16::from_f32(mean).to_bits()
                    {
                        inconsistent += 1;
                    }
                }
            }
        }
        let same = first.bits() == second.bits();
        results.push(CheckResult {
            name: format!(
                "{label}: sizes/offsets/members exact vs kmeans_segments ({bad_sizes}/{bad_offsets}/\
                 {bad_members} differ; {empty} empty clusters of {}), two builds {}",
                nu * k,
                if same { "identical" } else { "DIFFER" }
            ),
            rel_l2: 0.0,
            max_abs: (bad_sizes + bad_offsets + bad_members) as f64,
            non_finite: 0,
            tolerance: 0.0,
            passed: bad_sizes + bad_offsets + bad_members == 0 && same,
        });
        let mut sums = compare(
            format!(
                "{label}: centroids and value sums ({identical}/{total} bit-identical, worst \
                 relative {worst_rel:.1e}; {inconsistent} bf16/mean/ln inconsistent)"
            ),
            &gpu_sums,
            &ref_sums,
            1e-6,
        );
        sums.passed &= worst_rel <= 1e-6 && inconsistent == 0;
        results.push(sums);

        // The cluster-order gather: keys to device memory, values to host-mapped pinned memory.
        let stride = n * hd + 8;
        let dst_k = b.alloc::<bf16>(nu * stride).map_err(e)?;
        let pinned = crate::PinnedBuffer::new(b.context(), nu * stride * 2).map_err(e)?;
        b.wave_gather_cluster_order(
            &units,
            &c,
            crate::backend::dp(&dst_k),
            pinned.as_slice().as_ptr() as u64,
            stride,
        )
        .map_err(e)?;
        b.synchronize().map_err(e)?;
        let got_k = b.download(&dst_k, nu * stride).map_err(e)?;
        let got_v: Vec<u16> = pinned.as_slice()[..nu * stride * 2]
            .chunks_exact(2)
            .map(|p| u16::from_le_bytes([p[0], p[1]]))
            .collect();
        let mut wrong_rows = 0usize;
        for u in 0..nu {
            for p in 0..n {
                let t = first.members[u * n + p] as usize;
                let at = u * stride + p * hd;
                let ok_k =
                    (0..hd).all(|d| got_k[at + d].to_bits() == host_k[u][t * hd + d].to_bits());
                let ok_v = (0..hd).all(|d| got_v[at + d] == host_v[u][t * hd + d].to_bits());
                if !(ok_k && ok_v) {
                    wrong_rows += 1;
                }
            }
        }
        results.push(CheckResult {
            name: format!("{label}: cluster-order gather ({wrong_rows} wrong rows)"),
            rel_l2: 0.0,
            max_abs: wrong_rows as f64,
            non_finite: 0,
            tolerance: 0.0,
            passed: wrong_rows == 0,
        });
        drop(keep);
    }

    // Timing: 32 units of 16384 tokens in two segments of 8192 x 512 clusters, 9 iterations.
    {
        let (nu, tokens, hd, iters) = (32usize, 16384usize, 128usize, 9usize);
        let mut keep = Vec::new();
        let mut units = Vec::new();
        for u in 0..nu {
            let dk = b.alloc::<bf16>(tokens * hd).map_err(e)?;
            let dv = b.alloc::<bf16>(tokens * hd).map_err(e)?;
            let (pk, pv) = (crate::backend::dp(&dk), crate::backend::dp(&dv));
            b.fill_uniform(pk, tokens * hd, 2 * u as u64 + 1, 1.0)
                .map_err(e)?;
            b.fill_uniform(pv, tokens * hd, 2 * u as u64 + 2, 1.0)
                .map_err(e)?;
            units.push(BuildUnit {
                keys: pk,
                values: pv,
            });
            keep.push((dk, dv));
        }
        let segs: Vec<BuildSegment> = (0..2)
            .map(|i| BuildSegment {
                start: i * 8192,
                end: (i + 1) * 8192,
                clusters: 512,
            })
            .collect();
        // A warm-up build (kernel loading, memory pool), then the timed one.
        drop(b.wave_build(&units, &segs, iters, hd).map_err(e)?);
        b.synchronize().map_err(e)?;
        let t = std::time::Instant::now();
        let c = b.wave_build(&units, &segs, iters, hd).map_err(e)?;
        b.synchronize().map_err(e)?;
        let secs = t.elapsed().as_secs_f64();
        // Multiply-adds of the assignments: the iterations over each segment's own centroids,
        // then the final pass over all of them.
        let fma =
            nu as f64 * hd as f64 * (iters as f64 * 2.0 * 8192.0 * 512.0 + tokens as f64 * 1024.0);
        results.push(CheckResult {
            name: format!(
                "wave build timing: {nu} units x {tokens} tokens hd{hd}, 2 x 512 clusters, \
                 {iters} iterations: {:.2} ms ({:.1} TFLOP/s of assignment FMAs)",
                secs * 1e3,
                2.0 * fma / secs / 1e12
            ),
            rel_l2: 0.0,
            max_abs: 0.0,
            non_finite: 0,
            tolerance: 0.0,
            passed: c.n_clusters == 1024,
        });
        drop(keep);
    }
    Ok(results)
}

/// The arrays of one GPU build, downloaded.
struct BuildOut {
    centroids: Vec<bf16>,
    centroids_f32: Vec<f32>,
    ln_sizes: Vec<f32>,
    sizes: Vec<i32>,
    means: Vec<bf16>,
    value_sums: Vec<f32>,
    offsets: Vec<i32>,
    members: Vec<i32>,
}

impl BuildOut {
    fn download(
        b: &CudaBackend,
        c: crate::wave_build::GpuClustering,
    ) -> Result<(Self, crate::wave_build::GpuClustering), String> {
        let e = |x: crate::CudaError| x.to_string();
        let (nu, k, n, hd) = (c.n_units, c.n_clusters, c.n_tokens, c.head_dim);
        let out = BuildOut {
            centroids: b.download(&c.centroids, nu * k * hd).map_err(e)?,
            centroids_f32: b.download(&c.centroids_f32, nu * k * hd).map_err(e)?,
            ln_sizes: b.download(&c.ln_sizes, nu * k).map_err(e)?,
            sizes: b.download(&c.sizes, nu * k).map_err(e)?,
            means: b.download(&c.means, nu * k * hd).map_err(e)?,
            value_sums: b.download(&c.value_sums, nu * k * hd).map_err(e)?,
            offsets: b.download(&c.offsets, nu * (k + 1)).map_err(e)?,
            members: b.download(&c.members, nu * n).map_err(e)?,
        };
        Ok((out, c))
    }

    /// Every array as bits, for the determinism check.
    fn bits(&self) -> Vec<u32> {
        let mut v: Vec<u32> = Vec::new();
        v.extend(self.centroids.iter().map(|x| u32::from(x.to_bits())));
        v.extend(self.centroids_f32.iter().map(|x| x.to_bits()));
        v.extend(self.ln_sizes.iter().map(|x| x.to_bits()));
        v.extend(self.sizes.iter().map(|&x| x as u32));
        v.extend(self.means.iter().map(|x| u32::from(x.to_bits())));
        v.extend(self.value_sums.iter().map(|x| x.to_bits()));
        v.extend(self.offsets.iter().map(|&x| x as u32));
        v.extend(self.members.iter().map(|&x| x as u32));
        v
    }
}
