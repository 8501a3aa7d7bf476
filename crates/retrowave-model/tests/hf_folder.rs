//! SmolLM2 exported from GGUF to a Hugging Face folder and read back: the configuration, every
//! layer-0 Q/K row against the GGUF row it came from (the llama Q/K permutation undone), the other
//! weights row for row, and attention scores under interleaved RoPE (GGUF layout) against NeoX
//! RoPE (Hugging Face layout).

use std::path::PathBuf;

use retrowave_core::{TensorType, WeightView};
use retrowave_model::arch::{
    ArchError, ModelConfig, ModelSource, RopeStyle, WeightSource, open_model,
};
use retrowave_model::gguf::{GgufFile, dequantize_row};
use retrowave_model::hf::{ExportDtype, export_hf_folder};

fn model_path(name: &str) -> PathBuf {
    retrowave_model::registry::ensure_model(name)
        .unwrap_or_else(|e| panic!("cannot get model {name}: {e}"))
}

fn row(w: &WeightView<'_>, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.cols];
    dequantize_row(w.dtype, w.row(r).unwrap(), &mut out).unwrap();
    out
}

/// What an F16 export stores for a value.
fn f16_round(xs: &[f32]) -> Vec<f32> {
    xs.iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect()
}

/// `w[rows] @ x` in f64.
fn project(w: &WeightView<'_>, rows: std::ops::Range<usize>, x: &[f64], round: bool) -> Vec<f64> {
    rows.map(|r| {
        let wr = row(w, r);
        let wr = if round { f16_round(&wr) } else { wr };
        wr.iter().zip(x).map(|(&a, &b)| f64::from(a) * b).sum()
    })
    .collect()
}

fn rope(v: &mut [f64], pos: f64, theta: f64, interleaved: bool) {
    let d = v.len();
    for i in 0..d / 2 {
        let angle = pos * theta.powf(-2.0 * i as f64 / d as f64);
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + d / 2)
        };
        let (x0, x1) = (v[a], v[b]);
        v[a] = x0 * angle.cos() - x1 * angle.sin();
        v[b] = x0 * angle.sin() + x1 * angle.cos();
    }
}

#[test]
fn smollm2_exports_to_a_hugging_face_folder_and_reads_back() {
    let g = GgufFile::open(&model_path("smollm2-135m")).unwrap();
    let gcfg = ModelConfig::from_gguf(&g).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = r#"{"version": "1.0", "model": {"type": "BPE"}}"#;
    export_hf_folder(&g, dir.path(), ExportDtype::F16, Some(tokenizer)).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap(),
        tokenizer
    );

    let src = open_model(dir.path()).unwrap();
    assert!(matches!(src, ModelSource::HfFolder(_)));
    let hcfg = src.config().unwrap();
    assert_eq!(
        hcfg,
        ModelConfig {
            rope_style: RopeStyle::NeoX,
            ..gcfg.clone()
        }
    );

    // The file itself, read with the safetensors crate: Hugging Face names, shapes and dtypes.
    let file = std::fs::File::open(dir.path().join("model.safetensors")).unwrap();
    let mmap = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let st = safetensors::SafeTensors::deserialize(&mmap).unwrap();
    assert_eq!(st.len(), g.tensors().len());
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(
        (q.dtype(), q.shape()),
        (safetensors::Dtype::F16, &[576usize, 576][..])
    );
    let k = st.tensor("model.layers.7.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape(), &[192, 576]);
    let e = st.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(e.shape(), &[49152, 576]);
    let n = st.tensor("model.norm.weight").unwrap();
    assert_eq!(
        (n.dtype(), n.shape()),
        (safetensors::Dtype::F32, &[576usize][..])
    );
    assert!(
        st.tensor("lm_head.weight").is_err(),
        "tied embeddings: no lm_head"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);

    // Q and K rows: GGUF row (head h, 2j + i) holds Hugging Face row (head h, i * hd/2 + j).
    let hd = gcfg.head_dim;
    for (name, heads) in [
        ("blk.0.attn_q.weight", gcfg.n_heads),
        ("blk.0.attn_k.weight", gcfg.n_kv_heads),
        ("blk.29.attn_k.weight", gcfg.n_kv_heads),
    ] {
        let gw = g.weight(name).unwrap();
        let hw = src.weight(name).unwrap();
        assert_eq!(
            (hw.rows, hw.cols, hw.dtype),
            (heads * hd, gw.cols, TensorType::F16)
        );
        let mut moved = 0;
        for r in 0..gw.rows {
            let (h, within) = (r / hd, r % hd);
            let (j, i) = (within / 2, within % 2);
            let hf_r = h * hd + i * (hd / 2) + j;
            moved += usize::from(hf_r != r);
            assert_eq!(
                f16_round(&row(&gw, r)),
                row(&hw, hf_r),
                "{name} GGUF row {r} -> HF row {hf_r}"
            );
        }
        assert!(
            moved > gw.rows / 2,
            "{name}: the permutation moves most rows"
        );
    }

    // Everything else is stored in the same row order.
    for (name, rows) in [
        ("blk.0.attn_v.weight", vec![0, 1, 100, 191]),
        ("blk.0.attn_output.weight", vec![0, 575]),
        ("blk.3.ffn_gate.weight", vec![5, 1535]),
        ("blk.29.ffn_down.weight", vec![0, 575]),
        ("token_embd.weight", vec![0, 1, 12345, 49151]),
    ] {
        let (gw, hw) = (g.weight(name).unwrap(), src.weight(name).unwrap());
        assert_eq!((gw.rows, gw.cols), (hw.rows, hw.cols), "{name}");
        for r in rows {
            assert_eq!(f16_round(&row(&gw, r)), row(&hw, r), "{name} row {r}");
        }
    }
    for name in [
        "output_norm.weight",
        "blk.0.attn_norm.weight",
        "blk.17.ffn_norm.weight",
    ] {
        let (gw, hw) = (g.weight(name).unwrap(), src.weight(name).unwrap());
        assert_eq!(hw.dtype, TensorType::F32);
        assert_eq!(row(&gw, 0), row(&hw, 0), "{name} is exact");
    }

    // The point of the permutation: q.k attention scores with interleaved RoPE on GGUF rows equal
    // those with NeoX RoPE on Hugging Face rows, for every head pair of layer 0.
    let embd = g.weight("token_embd.weight").unwrap();
    let x: Vec<f64> = row(&embd, 9690).iter().map(|&v| f64::from(v)).collect();
    let y: Vec<f64> = row(&embd, 28).iter().map(|&v| f64::from(v)).collect();
    let theta = f64::from(gcfg.rope_theta);
    let (gq, gk) = (
        g.weight("blk.0.attn_q.weight").unwrap(),
        g.weight("blk.0.attn_k.weight").unwrap(),
    );
    let (hq, hk) = (
        src.weight("blk.0.attn_q.weight").unwrap(),
        src.weight("blk.0.attn_k.weight").unwrap(),
    );
    for h in 0..gcfg.n_heads {
        let kvh = h / gcfg.gqa_group();
        let (qr, kr) = (h * hd..(h + 1) * hd, kvh * hd..(kvh + 1) * hd);
        let (mut q1, mut k1) = (
            project(&gq, qr.clone(), &x, true),
            project(&gk, kr.clone(), &y, true),
        );
        let (mut q2, mut k2) = (project(&hq, qr, &x, false), project(&hk, kr, &y, false));
        rope(&mut q1, 37.0, theta, true);
        rope(&mut k1, 5.0, theta, true);
        rope(&mut q2, 37.0, theta, false);
        rope(&mut k2, 5.0, theta, false);
        let s1: f64 = q1.iter().zip(&k1).map(|(a, b)| a * b).sum();
        let s2: f64 = q2.iter().zip(&k2).map(|(a, b)| a * b).sum();
        let scale: f64 =
            q1.iter().map(|a| a.abs()).sum::<f64>() * k1.iter().map(|a| a.abs()).sum::<f64>();
        assert!(
            (s1 - s2).abs() <= 1e-9 * scale,
            "head {h}: score {s1} (GGUF) vs {s2} (HF)"
        );
    }

    // A config that disagrees with the weights is refused, naming the tensor in both namings.
    let cfg_path = dir.path().join("config.json");
    let mut bad = config.clone();
    bad["intermediate_size"] = serde_json::json!(1024);
    std::fs::write(&cfg_path, bad.to_string()).unwrap();
    let e = open_model(dir.path()).unwrap_err();
    assert!(
        matches!(&e, ArchError::TensorShape { name, .. } if name == "model.layers.0.mlp.gate_proj.weight (blk.0.ffn_gate.weight)"),
        "{e}"
    );
}
