//! Correctness against llama.cpp's reference outputs (../shared/golden): teacher-forced along
//! the golden greedy path, our argmax must equal the golden token wherever the golden top-two
//! margin is clear, the golden token must be in our top 2 at near-ties, and our logits of the
//! golden top-5 tokens must agree within a tolerance.
//!
//! Tolerances: an independent float32 implementation differed from llama.cpp by up to 0.53
//! (SmolLM2, Q4_1) and 0.19 (Qwen, Q4_K_M) at the first position (golden README); most of that is
//! llama.cpp quantizing activations to 8 bits inside its dot products. We quantize activations
//! the same way (Q8_0 / Q8_1 / Q8_K), so we hold ourselves to a tighter bound at every one of the
//! 24 positions of every prompt: see `tolerance`.

mod common;

use retrowave_core::{BatchLayout, SeqRows};
use serde_json::Value;

/// Clear margin between the golden top two logits (golden README: "say > 0.5").
const CLEAR_MARGIN: f64 = 0.5;

fn tolerance(model: &str) -> f64 {
    match model {
        "smollm2-135m" => 0.35,
        _ => 0.25,
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
    for p in golden["prompts"].as_array().unwrap() {
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
        let tokens: Vec<u32> = prompt.iter().chain(golden_ids.iter()).copied().collect();
        let n = tokens.len();
        group.open_slot(0, n + 1).unwrap();
        let batch = BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: 0,
                n_tokens: n,
            }],
        };
        let rows: Vec<usize> = (prompt.len() - 1..prompt.len() - 1 + golden_ids.len()).collect();
        let logits = group.forward(&tokens, &batch, &rows).unwrap();
        group.close_slot(0);
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
    eprintln!(
        "{name}: {} positions; |logit diff| on golden top-5: first position max {:.3}, mean {:.3}, max {:.3} ({})",
        report.positions,
        report.first_max,
        report.sum_diff / report.n_diff as f64,
        report.max_diff,
        report.worst
    );
    assert!(
        report.max_diff <= tolerance(name),
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
