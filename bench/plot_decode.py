#!/usr/bin/env python3
"""Plots decode tokens/s against context length, dense (full) and wave attention, each at its best
batch, from the `gpu-decode-best` records of `retrowave bench decode`.

usage: python3 bench/plot_decode.py [RESULTS.jsonl] [OUT.svg]
(default bench/results/gpu-h200-decode.jsonl -> bench/plots/decode-tokens-vs-context-h200.svg;
needs matplotlib). For a context measured more than once, the latest record counts.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu-h200-decode.jsonl"
dst = sys.argv[2] if len(sys.argv) > 2 else "bench/plots/decode-tokens-vs-context-h200.svg"
best = {}
cards = set()
for line in open(src):
    r = json.loads(line)
    if r.get("bench") != "gpu-decode-best":
        continue
    best[(r["attention"], r["context"])] = (r["tokens_per_s"], r["batch"])
    cards.add(r["device"])
fig, ax = plt.subplots(figsize=(7, 4.2))
for mode, label, style in [("full", "dense (full attention)", "o-"), ("wave", "wave", "s-")]:
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
