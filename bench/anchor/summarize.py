#!/usr/bin/env python3
"""Summarize generate-benchmark JSONL results: retrowave beside the llama.cpp anchor.

Usage: bench/anchor/summarize.py RESULTS.jsonl [MORE.jsonl ...]

Reads records with "bench": "generate" (other lines are ignored; a line that is not JSON is
reported and skipped) and prints, per model and context, the prefill and decode tokens/s of every
engine found (llama.cpp last) and, for each other engine, its ratio to llama.cpp (engine /
llama.cpp; above 1 means faster than llama.cpp). When the same (engine, model, context, metric)
appears several times, the last one read wins (files are appended in run order). Records with a
"tp" (tensor-parallel degree) other than 1 are shown as their own engine, e.g. "retrowave tp2".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ANCHOR = "llama.cpp"
METRICS = {"prefill_tokens_per_s": "prefill", "decode_tokens_per_s": "decode"}


def load(paths: list[Path]) -> dict:
    """{(model, context): {engine: {"prefill": value, "decode": value, "loadavg": ...}}}"""
    table: dict = {}
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"error: cannot read {path}: {exc.strerror}")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                print(f"warning: {path}:{lineno}: not JSON ({exc.msg}), skipped", file=sys.stderr)
                continue
            if not isinstance(rec, dict) or rec.get("bench") != "generate":
                continue
            metric = METRICS.get(rec.get("metric"))
            value = rec.get("value")
            if metric is None or not isinstance(value, (int, float)):
                continue
            key = (str(rec.get("model", "?")), rec.get("context", "?"))
            engine = str(rec.get("engine", "?"))
            tp = rec.get("tp")
            if isinstance(tp, int) and tp != 1:
                engine = f"{engine} tp{tp}"  # tensor-parallel runs get their own columns
            cell = table.setdefault(key, {}).setdefault(engine, {})
            cell[metric] = float(value)
            if "loadavg" in rec:
                cell["loadavg"] = rec["loadavg"]
    return table


def fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def render(table: dict) -> str:
    engines = sorted({e for cells in table.values() for e in cells}, key=lambda e: (e == ANCHOR, e))
    others = [e for e in engines if e != ANCHOR]
    header = ["model", "context"]
    for e in engines:
        header += [f"{e} prefill", f"{e} decode"]
    if ANCHOR in engines:
        for e in others:
            header += [f"prefill {e}/{ANCHOR}", f"decode {e}/{ANCHOR}"]
    rows = []

    def sort_key(k):
        model, ctx = k
        return (model, ctx if isinstance(ctx, int) else 1 << 62, str(ctx))

    for (model, ctx) in sorted(table, key=sort_key):
        cells = table[(model, ctx)]
        row = [model, str(ctx)]
        for e in engines:
            c = cells.get(e, {})
            row += [fmt(c.get("prefill")), fmt(c.get("decode"))]
        if ANCHOR in engines:
            a = cells.get(ANCHOR, {})
            for e in others:
                c = cells.get(e, {})
                row += [ratio(c.get("prefill"), a.get("prefill")),
                        ratio(c.get("decode"), a.get("decode"))]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(tokens/s, median of the runs; ratios are engine / llama.cpp)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    table = load([Path(a) for a in argv])
    if not table:
        print("no generate records found in " + ", ".join(argv), file=sys.stderr)
        return 1
    print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
