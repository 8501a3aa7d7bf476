#!/usr/bin/env python3
"""Independent float32 reference forward pass of SmolLM2-135M (llama arch) in numpy.

Loads the GGUF with gguf.GGUFReader, dequantizes every tensor to float32 with
gguf.quants.dequantize, and runs a plain float32 Llama forward (f32 activations,
f32 KV, no activation quantization). For each golden prompt in
/work/shared/golden/smollm2-135m.json it teacher-forces prompt_ids + generated_ids
in one pass and records, at each of the 24 generated positions, the f32 logits of
the golden top-5 ids and our own top-5. Writes smollm2-135m-f32.json next to this
script and prints a summary of |f32 - llama.cpp golden| over the golden top-5 logits.

Usage: python3 bench/reference/f32_forward.py [--model PATH] [--golden PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import dequantize

F32 = np.float32
HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path(os.environ.get("RETROWAVE_HOME", Path.home() / ".cache" / "retrowave")) / "models" / "smollm2-135m.gguf"
DEFAULT_GOLDEN = Path("/work/shared/golden/smollm2-135m.json")
DEFAULT_OUT = HERE / "smollm2-135m-f32.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        sys.exit(f"{key!r} missing from GGUF metadata")
    return f.contents()


class Model:
    def __init__(self, path: Path):
        r = gguf.GGUFReader(str(path))
        arch = field(r, "general.architecture")
        if arch != "llama":
            sys.exit(f"expected llama architecture, got {arch!r}")
        self.n_layer = int(field(r, "llama.block_count"))
        self.n_embd = int(field(r, "llama.embedding_length"))
        self.n_head = int(field(r, "llama.attention.head_count"))
        self.n_head_kv = int(field(r, "llama.attention.head_count_kv"))
        self.eps = F32(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.theta = float(field(r, "llama.rope.freq_base"))
        self.head_dim = self.n_embd // self.n_head
        rope_dim = int(field(r, "llama.rope.dimension_count"))
        assert rope_dim == self.head_dim, (rope_dim, self.head_dim)

        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(F32, copy=False)
            # ggml shape is [ne0 = in, ne1 = out]; numpy layout is (out, in).
            expect = tuple(int(x) for x in reversed(t.shape.tolist()))
            if a.shape != expect:
                a = a.reshape(expect)
            self.w[t.name] = np.ascontiguousarray(a)
        emb = self.w["token_embd.weight"]
        assert emb.shape[1] == self.n_embd, emb.shape
        self.vocab = emb.shape[0]
        # Tied output unless the file carries output.weight.
        self.out_w = self.w.get("output.weight", emb)
        # Sanity on layout: q is (n_embd, n_embd), k is (n_head_kv*head_dim, n_embd), down is (n_embd, n_ff).
        assert self.w["blk.0.attn_q.weight"].shape == (self.n_embd, self.n_embd)
        assert self.w["blk.0.attn_k.weight"].shape == (self.n_head_kv * self.head_dim, self.n_embd)
        assert self.w["blk.0.ffn_down.weight"].shape[0] == self.n_embd

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
        return (x / np.sqrt(ms + self.eps)).astype(F32) * w

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Interleaved (GGML mode 0) RoPE: rotate pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d).

        x: (T, H, D)."""
        d = self.head_dim
        inv = (self.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)).astype(F32)  # (D/2,)
        ang = pos.astype(F32)[:, None] * inv[None, :]  # (T, D/2)
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, ids: list[int]) -> np.ndarray:
        """Final hidden states (after output norm), shape (T, n_embd), float32."""
        T = len(ids)
        H, KV, D = self.n_head, self.n_head_kv, self.head_dim
        group = H // KV
        x = self.w["token_embd.weight"][np.asarray(ids)].astype(F32)
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf, dtype=F32), k=1)
        scale = F32(1.0 / np.sqrt(D))
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rmsnorm(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(T, H, D)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(T, KV, D)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(T, KV, D)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            attn = np.empty((T, H, D), dtype=F32)
            for hh in range(H):
                kvh = hh // group
                s = (q[:, hh, :] @ k[:, kvh, :].T) * scale + mask  # (T, T)
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True, dtype=F32)
                attn[:, hh, :] = s @ v[:, kvh, :]
            x = x + attn.reshape(T, H * D) @ self.w[p + "attn_output.weight"].T
            h = self.rmsnorm(x, self.w[p + "ffn_norm.weight"])
            g = h @ self.w[p + "ffn_gate.weight"].T
            u = h @ self.w[p + "ffn_up.weight"].T
            act = (g / (F32(1.0) + np.exp(-g))) * u  # silu(gate) * up
            x = x + act @ self.w[p + "ffn_down.weight"].T
            assert x.dtype == F32
        return self.rmsnorm(x, self.w["output_norm.weight"])

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.out_w.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    golden = json.loads(args.golden.read_text())
    sha = sha256_of(args.model)
    if sha != golden["model_sha256"]:
        sys.exit(f"{args.model}: sha256 {sha} differs from golden {golden['model_sha256']}")

    t0 = time.time()
    m = Model(args.model)
    print(f"loaded + dequantized {args.model.name} in {time.time() - t0:.1f}s", file=sys.stderr)

    out_prompts = []
    first_diffs: list[float] = []
    all_diffs: list[float] = []
    sanity_fail = []
    argmax_disagree = []  # (prompt, step, golden margin) where f32 argmax != golden token
    for pr in golden["prompts"]:
        t1 = time.time()
        P = len(pr["prompt_ids"])
        gen = pr["generated_ids"]
        ids = pr["prompt_ids"] + gen
        hidden = m.forward(ids)
        # Position P-1+i predicts generated_ids[i].
        lg = m.logits(hidden[P - 1 : P - 1 + len(gen)])
        steps = []
        for i, st in enumerate(pr["per_step"]):
            row = lg[i]
            gids = [int(t) for t, _ in st["top5"]]
            glog = [float(v) for _, v in st["top5"]]
            ours_at_golden = [float(row[t]) for t in gids]
            top = np.argsort(-row, kind="stable")[:5]
            diffs = [abs(a - b) for a, b in zip(ours_at_golden, glog)]
            all_diffs.extend(diffs)
            if i == 0:
                first_diffs.extend(diffs)
                if st["margin_top1_top2"] > 0.5 and int(top[0]) != gen[0]:
                    sanity_fail.append(pr["name"])
            if int(top[0]) != gen[i]:
                argmax_disagree.append((pr["name"], i, st["margin_top1_top2"]))
            steps.append(
                {
                    "golden_top5_ids": gids,
                    "f32_logits_of_golden_top5": [round(v, 5) for v in ours_at_golden],
                    "f32_top5": [[int(t), round(float(row[t]), 5)] for t in top],
                }
            )
        out_prompts.append({"name": pr["name"], "n_prompt_tokens": P, "per_step": steps})
        print(f"{pr['name']}: {len(ids)} tokens in {time.time() - t1:.1f}s", file=sys.stderr)

    result = {
        "model": args.model.name,
        "sha256": sha,
        "produced_by": f"bench/reference/f32_forward.py, numpy {np.__version__}, gguf {version('gguf')}",
        "golden": str(args.golden),
        "method": "dequantize all tensors to f32; f32 activations and KV; interleaved RoPE; teacher-forced prompt_ids + generated_ids in one pass",
        "prompts": out_prompts,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    fd, ad = np.array(first_diffs), np.array(all_diffs)
    print(f"wrote {args.out}")
    print(f"sanity (first-position argmax == golden generated_ids[0] where margin > 0.5): "
          f"{'OK' if not sanity_fail else 'FAIL ' + ', '.join(sanity_fail)}")
    print(f"|f32 - golden| over golden top-5 logits, first position ({fd.size} values): max {fd.max():.4f}, mean {fd.mean():.4f}")
    print(f"|f32 - golden| over golden top-5 logits, all positions ({ad.size} values): max {ad.max():.4f}, mean {ad.mean():.4f}")
    for name, i, marg in argmax_disagree:
        print(f"  f32 argmax differs from golden token: {name} step {i} (golden margin {marg:.4f})")
    if sanity_fail:
        sys.exit(1)


if __name__ == "__main__":
    main()
