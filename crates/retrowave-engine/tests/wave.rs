//! Wave attention through the engine on SmolLM2 and a real essay prompt.

mod common;

use retrowave_core::{AttentionMode, WaveConfig};
use retrowave_engine::{Engine, Event, Usage};
use retrowave_model::registry;
use retrowave_model::sampling::SamplingParams;

/// The first `n` tokens of the essays.
fn essay_prompt(m: &common::Model, n: usize) -> Vec<u32> {
    let dir = registry::ensure_dataset("paul-graham-essays").unwrap();
    let text = std::fs::read_to_string(dir.join("addiction.txt")).unwrap()
        + "\n\n"
        + &std::fs::read_to_string(dir.join("aord.txt")).unwrap()
        + "\n\n"
        + &std::fs::read_to_string(dir.join("apple.txt")).unwrap();
    let mut ids = m.tokenizer.encode(&text, true, false).unwrap();
    assert!(ids.len() >= n, "essays too short: {}", ids.len());
    ids.truncate(n);
    ids
}

fn run<B: retrowave_core::Backend + 'static>(
    e: &mut Engine<B>,
    prompt: Vec<u32>,
    n: usize,
) -> (Vec<u32>, Usage) {
    let params = SamplingParams {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let id = e.add_request(prompt, params).unwrap();
    let mut tokens = Vec::new();
    loop {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token { id: i, token, .. } if i == id => tokens.push(token),
                Event::Finished { id: i, usage, .. } if i == id => return (tokens, usage),
                _ => {}
            }
        }
    }
}

#[test]
fn wave_decode_builds_the_index_and_everything_retrieved_is_dense() {
    let m = common::open("smollm2-135m");
    let prompt = essay_prompt(&m, 1500);
    let n = 12;
    let (dense, usage) = run(&mut common::engine(&m, 1, 4096), prompt.clone(), n);
    assert!(usage.wave.is_none());

    // All clusters retrieved: wave attention is exact attention in another order.
    let all = WaveConfig {
        retrieval_fraction: 1.0,
        estimation_fraction: 0.0,
        ..WaveConfig::default()
    };
    let mut e = common::engine_with(&m, 1, 4096, AttentionMode::Wave(all));
    let (tokens, usage) = run(&mut e, prompt.clone(), n);
    assert_eq!(tokens, dense);
    let w = usage.wave.expect("wave counters");
    // 30 layers x 3 KV heads per decode step; the first token comes from the prefill.
    assert_eq!(w.head_steps, (n as u64 - 1) * 30 * 3);
    assert_eq!(w.exact_tokens, w.context_tokens);
    assert_eq!(w.indexed_tokens, 1500 - 4 - 64);
    assert!(w.clusters >= (1500 - 68) / 16 && w.build_seconds > 0.0);

    // Sparse budgets attend exactly to a fraction and estimate part of the rest, and the
    // counters add up over two tensor-parallel workers. (The default's 2048-token minimum
    // retrieves every cluster of this short context, and its 8192-token estimation floor would
    // estimate every other; 64 clusters of 16 and the published 23.2%, the default before, do
    // neither.)
    let sparse = WaveConfig {
        min_retrieval_clusters: 64,
        min_retrieval_tokens: 0,
        min_index_clusters: 0,
        min_estimation_tokens: 0,
        ..WaveConfig::default()
    };
    let mut e = common::engine_with(&m, 1, 4096, AttentionMode::Wave(sparse.clone()));
    let (tokens1, usage1) = run(&mut e, prompt.clone(), n);
    let w1 = usage1.wave.unwrap();
    // 89 clusters: the minimum of 64 retrieval clusters is the budget (2.5% would be 3), about
    // three quarters of the context.
    assert_eq!(
        w1.retrieval_clusters,
        sparse.min_retrieval_clusters as u64 * w1.head_steps,
        "{w1:?}"
    );
    assert!(w1.exact_tokens < w1.context_tokens * 4 / 5, "{w1:?}");
    assert!(
        w1.exact_tokens + w1.estimated_tokens < w1.context_tokens,
        "{w1:?}"
    );
    assert!(w1.estimated_tokens > 0 && w1.estimation_clusters > 0);
    assert!(w1.bytes_read < w1.context_tokens * 64 * 2 * 2, "{w1:?}");
    assert_eq!(
        tokens1[0], dense[0],
        "the first token comes from the exact prefill"
    );
    let mut e2 = common::engine_with(&m, 3, 4096, AttentionMode::Wave(sparse));
    let (_, usage3) = run(&mut e2, prompt, n);
    let w3 = usage3.wave.unwrap();
    assert_eq!(w3.head_steps, w1.head_steps);
    assert_eq!(w3.context_tokens, w1.context_tokens);
}
