#!/usr/bin/env python3
"""Summarise `retrowave eval` records: mean score per (task, length, attention) over the case
records (all runs in the file), the gap to full attention (also paired case by case, with its
standard error), and per-attention fidelity means.
Teacher-forced records (`--teacher-forced`, whose answers are all the baseline's) are summarised
apart: top-1 agreement and mean KL divergence from the baseline per (task, length, attention).

usage: python3 bench/eval_summary.py bench/results/eval-smollm2-135m.jsonl [...]  (.jsonl.gz too)
"""
import gzip
import json
import statistics
import sys
from collections import defaultdict

for path in sys.argv[1:]:
    opener = gzip.open if path.endswith(".gz") else open
    rows = [json.loads(l) for l in opener(path, "rt") if l.strip()]
    forced = [r for r in rows if r.get("kind") == "case" and r.get("teacher_forced")]
    cases = [r for r in rows if r.get("kind") == "case" and not r.get("teacher_forced")]
    modes = sorted({r["attention"] for r in cases}, key=lambda m: (m != "full", m))
    cells = defaultdict(list)
    for r in cases:
        cells[(r["task"], r["length"], r["attention"])].append(r["score"])
    print(f"## {path}")
    agree = defaultdict(list)
    for r in forced:
        if r.get("mean_kl") is not None and r["attention"] != "full":
            agree[(r["task"], r["length"], r["attention"])].append((r["top1_agreement"], r["mean_kl"]))
    if agree:
        print("| task | length | attention | cases | top-1 agreement % (mean over cases) | KL millinats (mean over cases) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (task, length, m), v in sorted(agree.items()):
            print(f"| {task} | {length} | {m} | {len(v)} | {statistics.mean(a for a, _ in v):.1f} | "
                  f"{1000 * statistics.mean(k for _, k in v):.1f} |")
        print()
    if not cases:
        continue
    print("| task | length | cases | " + " | ".join(modes) + " | " +
          " | ".join(f"{m} - full" for m in modes if m != "full") + " |")
    print("|" + " --- |" * (3 + 2 * len(modes) - 1))
    for task, length in sorted({(t, l) for t, l, _ in cells}):
        means = {m: statistics.mean(cells[(task, length, m)]) for m in modes if cells.get((task, length, m))}
        n = len(cells[(task, length, modes[0])])
        gaps = [f"{means[m] - means['full']:+.1f}" for m in modes if m != "full" and m in means and "full" in means]
        print(f"| {task} | {length} | {n} | " + " | ".join(f"{means.get(m, float('nan')):.1f}" for m in modes)
              + " | " + " | ".join(gaps) + " |")
    # Paired gaps: each case's score in a mode minus full attention's on the same case (same
    # model, task, length and case seed), with the standard error of their mean and how many
    # cases differ at all; the numeric floor (`wave:all`, every cluster exact) shows how many
    # differ from rounding alone.
    paired = defaultdict(dict)
    for r in cases:
        paired[(r["model"], r["task"], r["length"], r["seed"])][r["attention"]] = r["score"]
    gaps = defaultdict(list)
    for (model, task, length, _), d in paired.items():
        for m, x in d.items():
            if m != "full" and "full" in d:
                gaps[(model, task, length, m)].append(x - d["full"])
    if gaps:
        print()
        print("| model | task | length | attention | cases | gap (points) | standard error | cases that differ | of them worse |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for (model, task, length, m), v in sorted(gaps.items()):
            se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
            print(f"| {model} | {task} | {length} | {m} | {len(v)} | {statistics.mean(v):+.2f} | {se:.2f} | "
                  f"{sum(1 for x in v if x != 0)} | {sum(1 for x in v if x < 0)} |")
    shares = defaultdict(list)
    for r in cases:
        if r.get("exact_share") is not None:
            shares[(r["attention"], r["length"])].append((r["exact_share"], r["estimated_share"]))
    for (m, length), v in sorted(shares.items()):
        print(f"{m} @ {length}: exact share {statistics.mean(x for x, _ in v):.3f}, "
              f"estimated share {statistics.mean(y for _, y in v):.3f}")
    fid = defaultdict(list)
    for r in rows:
        if r.get("kind") == "fidelity":
            fid[r["attention"]].append(r)
    for m, v in fid.items():
        worst = min(v, key=lambda r: r["mass_all"])
        print(f"fidelity {m}: rel_l2 {statistics.mean(r['rel_l2'] for r in v):.4f}, "
              f"mass exact {statistics.mean(r['mass_exact'] for r in v):.4f}, "
              f"mass all {statistics.mean(r['mass_all'] for r in v):.4f}, "
              f"worst head layer {worst['layer']} head {worst['q_head']} ({worst['mass_all']:.3f}) "
              f"over {len(v)} head records")
    print()
