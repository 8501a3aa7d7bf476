//! Tensor parallelism on the CPU: two workers on two threads, each with a slice of the heads and
//! of the FFN, joined by the in-process all-reduce, give the same tokens as one worker.

mod common;

use retrowave_cpu::CpuBackend;
use retrowave_engine::{Engine, Event};
use retrowave_model::sampling::SamplingParams;

fn greedy(engine: &mut Engine<CpuBackend>, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let params = SamplingParams {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let ids: Vec<u64> = prompts
        .iter()
        .map(|p| engine.add_request(p.clone(), params.clone()).unwrap())
        .collect();
    let mut out = vec![Vec::new(); prompts.len()];
    while !engine.is_idle() {
        for ev in engine.step().unwrap() {
            if let Event::Token { id, token, .. } = ev {
                let i = ids.iter().position(|x| *x == id).unwrap();
                out[i].push(token);
            }
        }
    }
    out
}

#[test]
fn tp2_gives_the_same_tokens_as_tp1() {
    let m = common::open("smollm2-135m");
    let golden = common::golden("smollm2-135m");
    let prompts: Vec<Vec<u32>> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|p| common::ids(&p["prompt_ids"]))
        .collect();
    let mut e1 = common::engine(&m, 1, 512);
    let mut e2 = common::engine(&m, 2, 512);
    assert_eq!(e2.group().world(), 2);
    // All three prompts in one batch (continuous batching), 16 tokens each.
    let a = greedy(&mut e1, &prompts, 16);
    let b = greedy(&mut e2, &prompts, 16);
    assert_eq!(a, b);
    // and they are the golden tokens where llama.cpp's margins are clear at the start
    for (p, toks) in golden["prompts"].as_array().unwrap().iter().zip(&a) {
        let g = common::ids(&p["generated_ids"]);
        assert_eq!(toks[0], g[0]);
    }
}
