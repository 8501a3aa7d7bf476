#!/usr/bin/env python3
"""Prints the short table of a device run from its JSON-lines files (retrowave's and PyTorch's)."""
import json, sys
args = sys.argv[1:]
json_out = None
if "--json" in args:
    i = args.index("--json"); json_out = args[i + 1]; del args[i:i + 2]
recs = []
for f in args:
    try:
        recs += [json.loads(l) for l in open(f) if l.strip()]
    except FileNotFoundError:
        pass
sdpa = {(r["context"], r["batch"]): r for r in recs if r.get("bench") == "sdpa-decode-attention"}
sdpf = {r["tokens"]: r for r in recs if r.get("bench") == "sdpa-prefill-attention"}
print("decode attention (32/8 heads, hd 128, bf16): retrowave vs SDPA")
for r in recs:
    if r.get("bench") == "gpu-decode-attention":
        s = sdpa.get((r["context"], r["batch"]))
        su = s["us"] if s else float("nan")
        print(f"  ctx {r['context']:>6} b{r['batch']}: {r['us']:8.1f} us {r['gbs']:6.0f} GB/s ({r['pct_of_copy']:3.0f}% of copy) | SDPA {su:8.1f} us | speedup {su / r['us']:.2f}x")
for r in recs:
    if r.get("bench") == "gpu-prefill-attention":
        s = sdpf.get(r["tokens"])
        print(f"  prefill {r['tokens']:>6}: {r['tflops']:5.0f} TFLOP/s = {r['pct_of_cublas']:3.0f}% of cuBLAS {r['cublas_tflops']:.0f} | SDPA {s['tflops'] if s else float('nan'):5.0f}")
for r in recs:
    if r.get("bench") == "gpu-e2e-decode":
        print(f"  e2e ctx {r['context']:>6} batch {r['batch']:>2}: {r['tokens_per_s']:7.1f} tok/s = {r['pct_of_roofline']:3.0f}% of roofline {r['roofline_tokens_per_s']:.1f}")
    if r.get("bench") == "gpu-parity" and "clear_positions" in r:
        print(f"  parity {r['model']} prompt {r['prompt']}: graph decode equal {r.get('graph_tokens_equal')}, greedy equal {r['greedy_equal_prefix']}/{r['tokens']} (CPU near-tie at {r['first_cpu_near_tie']}), forced argmax {r['forced_argmax_agree_clear']}/{r['clear_positions']}, top-5 |dlogit| vs CPU {r['max_abs_logit_diff_top5_vs_cpu']:.3f}, vs llama.cpp {r['max_abs_logit_diff_top5_vs_llamacpp']:.3f} {'ok' if r['passed'] else 'FAIL'}")
    if r.get("bench") == "gpu-model":
        g = r.get("cuda_graphs", {}).get("replays", 0) > 0
        print(f"  {r['model']} ctx {r['context']}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s ({'CUDA graphs' if g else 'no graphs'}; {r.get('weights', '')})")
fails = [r for r in recs if r.get("bench") == "gpu-kernel-check" and not r["passed"]]
checks = [r for r in recs if r.get("bench") == "gpu-kernel-check"]
print(f"kernel checks: {len(checks) - len(fails)}/{len(checks)} passed" + "".join(f"\n  FAIL {r['check']} rel {r['rel_l2']:.2e} nan {r['non_finite']}" for r in fails))

if json_out:
    # One summary object of the run: every target of the CUDA backend issue next to its value.
    dev = next((r["device"] for r in recs if r.get("bench") == "gpu-ceiling"), None)
    ceil = {r["what"]: r["value"] for r in recs if r.get("bench") == "gpu-ceiling"}
    out = {
        "what": "CUDA backend run summary (issue 5)", "device": dev,
        "commit": next((r["commit"] for r in recs if "commit" in r), None),
        "ceilings": ceil,
        "kernel_checks": {"passed": len(checks) - len(fails), "total": len(checks)},
        "decode_attention": [
            {"context": r["context"], "batch": r["batch"], "us": r["us"], "gbs": r["gbs"],
             "pct_of_copy": r["pct_of_copy"],
             "sdpa_us": sdpa.get((r["context"], r["batch"]), {}).get("us"),
             "speed_vs_sdpa": (sdpa[(r["context"], r["batch"])]["us"] / r["us"]) if (r["context"], r["batch"]) in sdpa else None}
            for r in recs if r.get("bench") == "gpu-decode-attention"],
        "prefill_attention": [
            {"tokens": r["tokens"], "tflops": r["tflops"], "pct_of_cublas": r["pct_of_cublas"],
             "sdpa_tflops": sdpf.get(r["tokens"], {}).get("tflops")}
            for r in recs if r.get("bench") == "gpu-prefill-attention"],
        "e2e_decode": [
            {k: r[k] for k in ("model", "context", "batch", "step_ms", "tokens_per_s", "roofline_tokens_per_s", "pct_of_roofline", "weights", "kv")}
            for r in recs if r.get("bench") == "gpu-e2e-decode"],
        "models": [
            {k: r.get(k) for k in ("model", "context", "prefill_tokens_per_s", "decode_tokens_per_s", "cuda_graphs", "weights")}
            for r in recs if r.get("bench") == "gpu-model"],
        "parity": [
            {k: r.get(k) for k in ("model", "prompt", "passed", "greedy_equal_prefix", "first_cpu_near_tie", "max_abs_logit_diff_top5_vs_cpu", "max_abs_logit_diff_top5_vs_llamacpp", "tolerance_top5", "graph_tokens_equal")}
            for r in recs if r.get("bench") == "gpu-parity" and "clear_positions" in r],
    }
    json.dump(out, open(json_out, "w"), indent=1)
    print("wrote", json_out)
