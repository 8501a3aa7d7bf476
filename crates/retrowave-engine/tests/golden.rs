//! Correctness against llama.cpp's reference outputs (../shared/golden): teacher-forced along
//! the golden greedy path, our argmax must equal the golden token wherever the golden top-two
//! margin is clear, the golden token must be in our top 2 at near-ties, and our logits of the
//! golden top-5 tokens must agree within a tolerance.
//!
//! Tolerances, justified against the golden README and an independent float32 forward
//! (bench/reference/f32_forward.py, numpy, dequantized weights, no activation quantization):
//! - first generated position: the README's bound for an independent f32 implementation, 0.53 on
//!   SmolLM2 (Q4_1) and 0.19 on Qwen (Q4_K_M). We measure 0.44 and 0.17.
//! - mean over the 24 positions x 4 prompts x golden top-5: the f32 reference is 0.17 from
//!   llama.cpp on SmolLM2; we allow 0.25 (measured 0.18) and 0.1 on Qwen (measured 0.06).
//! - worst single logit: the f32 reference reaches 0.74 on SmolLM2 at later positions. We quantize
//!   activations to 8 bits as llama.cpp does, but our rounding noise is independent of its own (it
//!   also keeps Q in f16 and accumulates V in f16), so the two noises add up at the worst position:
//!   we allow 1.5 (measured 1.34, logits around 20) and 0.3 on Qwen (measured 0.23).
//!   That this is quantization noise and not an error of the forward is checked separately by
//!   `f32_hf_export_matches_f32_reference`: our float path agrees with the f32 reference to 0.01.

mod common;

use serde_json::Value;

/// Clear margin between the golden top two logits (golden README: "say > 0.5").
const CLEAR_MARGIN: f64 = 0.5;

/// (first position max, mean, max) bounds on |ours - golden| over the golden top-5 logits.
fn tolerance(model: &str) -> (f64, f64, f64) {
    match model {
        "smollm2-135m" => (0.53, 0.25, 1.5),
        // recorded run (ignored in CI): measured 0.233 / 0.079 / 0.312; the 1.5B model's larger
        // hidden size gives the 8-bit activation noise a little more room than the 0.5B's
        "qwen2.5-coder-1.5b" => (0.25, 0.1, 0.35),
        _ => (0.19, 0.1, 0.3),
    }
}

struct Report {
    first_max: f64,
    sum_diff: f64,
    n_diff: usize,
    max_diff: f64,
    worst: String,
    positions: usize,
}

fn check_model(name: &str) -> Report {
    let m = common::open(name);
    let golden = common::golden(name);
    let f32_ref = common::f32_reference(name);
    let mut f32_max = 0f64;
    let mut group = common::group(&m, 1);
    let vocab = m.config.vocab_size;
    let mut report = Report {
        first_max: 0.0,
        sum_diff: 0.0,
        n_diff: 0,
        max_diff: 0.0,
        worst: String::new(),
        positions: 0,
    };
    for (p_index, p) in golden["prompts"].as_array().unwrap().iter().enumerate() {
        let pname = p["name"].as_str().unwrap();
        let prompt = common::ids(&p["prompt_ids"]);
        let golden_ids = common::ids(&p["generated_ids"]);
        // our tokenizer gives the same prompt ids
        let ours = m
            .tokenizer
            .encode(p["prompt"].as_str().unwrap(), true, false)
            .unwrap();
        assert_eq!(ours, prompt, "{name}/{pname}: prompt ids differ");
        // teacher-forced: one pass over prompt + golden tokens, logits at every generated position
        let logits = common::teacher_forced(&mut group, &prompt, &golden_ids);
        for (i, step) in p["per_step"].as_array().unwrap().iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let top5: Vec<(usize, f64)> = step["top5"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e: &Value| (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap()))
                .collect();
            let margin = step["margin_top1_top2"].as_f64().unwrap();
            let golden_tok = golden_ids[i] as usize;
            assert_eq!(golden_tok, top5[0].0);
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
            if margin > CLEAR_MARGIN {
                assert_eq!(
                    order[0], golden_tok,
                    "{name}/{pname} step {i}: argmax {} vs golden {golden_tok} (margin {margin})",
                    order[0]
                );
            } else {
                assert!(
                    order[..2].contains(&golden_tok),
                    "{name}/{pname} step {i}: golden {golden_tok} not in our top 2 {:?}",
                    &order[..2]
                );
            }
            if let Some(r) = &f32_ref {
                let st = &r["prompts"][p_index]["per_step"][i];
                for (t, v) in common::ids(&st["golden_top5_ids"])
                    .iter()
                    .zip(st["f32_logits_of_golden_top5"].as_array().unwrap())
                {
                    f32_max = f32_max.max((row[*t as usize] as f64 - v.as_f64().unwrap()).abs());
                }
            }
            for (t, v) in &top5 {
                let d = (row[*t] as f64 - v).abs();
                report.sum_diff += d;
                report.n_diff += 1;
                if i == 0 {
                    report.first_max = report.first_max.max(d);
                }
                if d > report.max_diff {
                    report.max_diff = d;
                    report.worst =
                        format!("{pname} step {i} token {t}: ours {} vs golden {v}", row[*t]);
                }
            }
            report.positions += 1;
        }
    }
    if f32_ref.is_some() {
        eprintln!("{name}: max |ours - f32 reference| on golden top-5 = {f32_max:.3}");
    }
    eprintln!(
        "{name}: {} positions; |logit diff| on golden top-5: first position max {:.3}, mean {:.3}, max {:.3} ({})",
        report.positions,
        report.first_max,
        report.sum_diff / report.n_diff as f64,
        report.max_diff,
        report.worst
    );
    let (first, mean, max) = tolerance(name);
    assert!(
        report.first_max <= first,
        "{name}: first-position logits differ by {:.3}",
        report.first_max
    );
    assert!(
        report.sum_diff / report.n_diff as f64 <= mean,
        "{name}: mean logit difference too large"
    );
    assert!(
        report.max_diff <= max,
        "{name}: logits differ by {:.3} at {}",
        report.max_diff,
        report.worst
    );
    report
}

#[test]
fn smollm2_matches_llama_cpp() {
    let r = check_model("smollm2-135m");
    assert_eq!(r.positions, 4 * 24);
}

/// Qwen2.5-Coder-0.5B (qwen2: NeoX RoPE, QKV bias, Q4_K_M mix). Fetched on first use (491 MB).
#[test]
fn qwen_0_5b_matches_llama_cpp() {
    let r = check_model("qwen2.5-coder-0.5b");
    assert_eq!(r.positions, 4 * 24);
}

/// Qwen2.5-Coder-1.5B: 1.1 GB and slow on 2 cores, so a recorded run rather than CI:
/// `cargo test --release -p retrowave-engine --test golden -- --ignored`.
#[test]
#[ignore]
fn qwen_1_5b_matches_llama_cpp() {
    let r = check_model("qwen2.5-coder-1.5b");
    assert_eq!(r.positions, 4 * 24);
}

/// The whole float path (a Hugging Face folder exported from the GGUF in float32: NeoX RoPE on
/// un-permuted Q/K rows, f32 weights, no activation quantization) against the independent numpy
/// float32 forward in bench/reference: checks the forward itself, apart from quantized matmuls.
#[test]
fn f32_hf_export_matches_f32_reference() {
    let name = "smollm2-135m";
    let reference = common::f32_reference(name).expect("bench/reference/smollm2-135m-f32.json");
    let (_dir, m) = common::smollm2_f32_export();
    let golden = common::golden(name);
    let mut group = common::group(&m, 1);
    let vocab = m.config.vocab_size;
    let mut max = 0f64;
    for (pi, p) in golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .take(3)
    {
        let logits = common::teacher_forced(
            &mut group,
            &common::ids(&p["prompt_ids"]),
            &common::ids(&p["generated_ids"]),
        );
        for (i, st) in reference["prompts"][pi]["per_step"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for (t, v) in common::ids(&st["golden_top5_ids"])
                .iter()
                .zip(st["f32_logits_of_golden_top5"].as_array().unwrap())
            {
                max = max.max((logits[i * vocab + *t as usize] as f64 - v.as_f64().unwrap()).abs());
            }
        }
    }
    eprintln!("{name}: f32 export vs numpy f32 reference: max |logit diff| {max:.4}");
    // f16 KV cache on our side, f32 in the reference: a few hundredths at most
    assert!(max < 0.1, "{max}");
}
