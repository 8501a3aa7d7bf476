#!/usr/bin/env python3
"""Baselines measured beside retrowave on the GPU machine (PyTorch, same card, same run):
decode attention (SDPA with enable_gqa, bf16, Llama-3-8B layer: 32 query / 8 KV heads, head_dim 128)
at 32K and 128K context, batch 1/2/4/8; causal prefill SDPA at 8K and 32K tokens.
Median microseconds from CUDA events; writes JSON lines to --out."""
import argparse, json, torch, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
a = p.parse_args()
dev = torch.device("cuda")
name = torch.cuda.get_device_name(0)
out = open(a.out, "a")

def bench(fn, warm=5, reps=50):
    for _ in range(warm):
        fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    ev[0].record()
    for e in ev[1:]:
        fn(); e.record()
    torch.cuda.synchronize()
    t = sorted(ev[i].elapsed_time(ev[i + 1]) * 1000 for i in range(reps))
    return t[len(t) // 2]

H, KV, D = 32, 8, 128
for ctx in (32768, 131072):
    for b in (1, 2, 4, 8):
        q = torch.randn(b, H, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.rand(b, KV, ctx, D, device=dev, dtype=torch.bfloat16) * 4 - 2
        v = torch.rand(b, KV, ctx, D, device=dev, dtype=torch.bfloat16) * 2 - 1
        us = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        byts = b * ctx * KV * D * 2 * 2
        rec = dict(bench="sdpa-decode-attention", context=ctx, batch=b, heads=H, kv_heads=KV,
                   head_dim=D, us=us, gbs=byts / us / 1e3, torch=torch.__version__, device=name)
        print(json.dumps(rec)); out.write(json.dumps(rec) + "\n")
        del q, k, v
for n in (8192, 32768):
    q = torch.randn(1, H, n, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, KV, n, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, KV, n, D, device=dev, dtype=torch.bfloat16)
    us = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 2, 10)
    fl = 4.0 * n * n / 2 * H * D
    rec = dict(bench="sdpa-prefill-attention", tokens=n, heads=H, kv_heads=KV, head_dim=D, causal=True,
               us=us, tflops=fl / us / 1e6, torch=torch.__version__, device=name)
    print(json.dumps(rec)); out.write(json.dumps(rec) + "\n")
    torch.cuda.empty_cache()
