#!/usr/bin/env python3
"""Plots decode tokens/s against context length, dense (full) and wave attention, each at its best
batch, from the `gpu-decode-best` records of `retrowave bench decode`.

usage: python3 bench/plot_decode.py [RESULTS.jsonl] [OUT.svg] [--host-tier FILE,FILE...]
(default bench/results/gpu-h200-decode.jsonl -> bench/plots/decode-tokens-vs-context-h200.svg;
needs matplotlib). For a context measured more than once, the latest record counts. The wave
records of the `--host-tier` files (runs with `host_kv = true`) are drawn as a third series.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

args = [a for a in sys.argv[1:]]
host_files = []
if "--host-tier" in args:
    i = args.index("--host-tier")
    host_files = args[i + 1].split(",")
    del args[i : i + 2]
src = args[0] if len(args) > 0 else "bench/results/gpu-h200-decode.jsonl"
dst = args[1] if len(args) > 1 else "bench/plots/decode-tokens-vs-context-h200.svg"
best = {}
cards = set()


def read_best(path, rename=None):
    for line in open(path):
        r = json.loads(line)
        if r.get("bench") != "gpu-decode-best":
            continue
        mode = r["attention"]
        if rename is not None:
            if mode not in rename:
                continue
            mode = rename[mode]
        best[(mode, r["context"])] = (r["tokens_per_s"], r["batch"])
        cards.add(r["device"])


read_best(src)
for f in host_files:
    read_best(f, {"wave": "wave-host"})
fig, ax = plt.subplots(figsize=(7, 4.2))
for mode, label, style in [
    ("full", "dense (full attention)", "o-"),
    ("wave", "wave", "s-"),
    ("wave-host", "wave, KV in host memory (synthetic queries: ~7% buffer hits)", "^--"),
]:
    pts = sorted((c, v) for (m, c), v in best.items() if m == mode)
    if not pts:
        continue
    xs = [c for c, _ in pts]
    ys = [v[0] for _, v in pts]
    ax.plot(xs, ys, style, label=label)
    for c, (t, b) in pts:
        ax.annotate(f"b{b}", (c, t), textcoords="offset points", xytext=(4, 4), fontsize=7)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context (tokens)")
ax.set_ylabel("decode tokens/s (best batch, bN)")
ax.set_title(f"random-weight Llama-3-8B decode, {', '.join(sorted(cards))}", fontsize=9)
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(dst)
print(f"wrote {dst}")
for (m, c), (t, b) in sorted(best.items(), key=lambda x: (x[0][1], x[0][0])):
    print(f"{m:>4} {c:>7}: {t:8.1f} tok/s at batch {b}")
