#!/usr/bin/env python3
"""llama.cpp anchor for retrowave's generate benchmark (prefill + greedy decode throughput).

Measures llama.cpp (through llama-cpp-python 0.3.36, installed by bench/anchor/install.sh) the way
shared/docs/anchors.md describes, so that `retrowave bench generate` can be compared against it on
the same machine in the same run (bench/run_generate.sh runs both).

API: the low-level ctypes bindings (`llama_cpp.llama_decode`, `llama_batch_init`,
`llama_perf_context`, ...), not the high-level `Llama` class: that class adds its own sampling,
caching and batching logic and would hide exactly what is timed.

Prompt (keep identical to what retrowave uses):
  1. the files $RETROWAVE_HOME/data/paul-graham-essays/*.txt ($RETROWAVE_HOME defaults to
     ~/.cache/retrowave), sorted by file name (byte order), each read as UTF-8 bytes with no newline
     translation, concatenated with "\\n\\n" between files (none after the last);
  2. tokenized with llama.cpp's own tokenizer (llama_tokenize, add_special=True,
     parse_special=False; the GGUFs used here set add_bos_token=false, so no BOS is added);
  3. cut to exactly the first N tokens.

For each context N and each of --runs runs (median reported):
  - a fresh llama_context (the model is loaded once; the context is recreated for every run) with
    n_ctx = N + decode_tokens + 16, n_batch 2048, n_ubatch 512, f16 K and V cache, flash attention
    "auto", --threads threads for both prefill and decode;
  - prefill: the N tokens through llama_decode in chunks of n_batch tokens (positions 0..N-1,
    sequence 0, logits requested only for the last token), then llama_synchronize;
  - decode: decode_tokens greedy steps, each one llama_decode of a single token (first the argmax of
    the prefill logits, then the argmax of the previous step) followed by reading its logits;
  - throughput from llama.cpp's own counters (llama_perf_context: n_p_eval / t_p_eval_ms for
    prefill, n_eval / t_eval_ms for decode, counters reset after the context is created), checked
    against the wall clock around the same calls (wall values are recorded too).
Before the first measured run of a model, one short untimed warm-up (64-token prefill and 4 decode
steps on a throwaway context) faults the memory-mapped weights in and starts the thread pool.

Output: one JSON object per line appended to --out, two per context (metric
"prefill_tokens_per_s" and "decode_tokens_per_s"). Besides the fields every engine writes, the
anchor adds "wall_value" (median wall-clock tokens/s), "samples" (the per-run counter values),
"loadavg" (/proc/loadavg 1/5/15-minute averages read right after the runs of that context; this
benchmark's own threads add about --threads to it, so a value near 2 on a 2-core machine means
nothing else was running), "loadavg_before" (read just before those runs), "cpu_share" (process
CPU time / (wall time x threads) during the timed calls; well below 1 means the threads were
preempted by other work), "nice" and "autogroup_nice" (the process niceness and that of its
scheduler autogroup: on a busy shared machine run it at -20 for both, as bench/run_generate.sh does
with NICE=-20, so that other work does not preempt the threads).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import numpy as np
    import llama_cpp
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"error: cannot import {exc.name!r}: run bench/anchor/install.sh first "
        "(installs llama-cpp-python 0.3.36 built from source)"
    )

N_BATCH = 2048
N_UBATCH = 512
CTX_MARGIN = 16
WARMUP_PROMPT = 64
WARMUP_DECODE = 4
ESSAY_SEPARATOR = b"\n\n"

_LOG_LINES: list[str] = []
_VERBOSE = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's log (to find what flash_attn=auto resolved to); echo it with --verbose."""
    line = text.decode("utf-8", errors="replace")
    _LOG_LINES.append(line)
    if _VERBOSE:
        print(line, end="", file=sys.stderr, flush=True)


class AnchorError(Exception):
    """An error with a message meant for the person running the benchmark."""


def retrowave_home() -> Path:
    env = os.environ.get("RETROWAVE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "retrowave"


def essay_bytes(home: Path) -> bytes:
    """The prompt corpus: the essays sorted by file name, joined with a blank line."""
    folder = home / "data" / "paul-graham-essays"
    files = sorted(folder.glob("*.txt"), key=lambda p: os.fsencode(p.name))
    if not files:
        raise AnchorError(f"no essays (*.txt) found in {folder}; set RETROWAVE_HOME or fetch them")
    parts = []
    for path in files:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AnchorError(f"{path} is not valid UTF-8: {exc}") from exc
        parts.append(data)
    return ESSAY_SEPARATOR.join(parts)


def tokenize(vocab, text: bytes) -> list[int]:
    """llama.cpp's tokenizer over the whole text, add_special=True, parse_special=False."""
    capacity = len(text) + 16
    buf = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, capacity, True, False)
    if n < 0:
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, capacity, True, False)
    if n < 0:
        raise AnchorError(f"llama_tokenize failed ({n})")
    return list(buf[:n])


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def autogroup_nice() -> int | None:
    """The nice value of this process's scheduler autogroup (None when autogroups are off)."""
    try:
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
            return None
        # e.g. "/autogroup-6 nice -20"
        return int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Runner:
    """One loaded model; creates a fresh context per run."""

    def __init__(self, model_path: Path, threads: int):
        self.threads = threads
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise AnchorError(f"llama.cpp could not load the model file {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.flash_attn = "unknown"

    def new_context(self, n_ctx: int):
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_UBATCH
        cparams.n_seq_max = 1
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        cparams.type_k = llama_cpp.GGML_TYPE_F16
        cparams.type_v = llama_cpp.GGML_TYPE_F16
        cparams.no_perf = False
        start = len(_LOG_LINES)
        ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise AnchorError(f"llama.cpp could not create a context with n_ctx={n_ctx}")
        for line in _LOG_LINES[start:]:
            if "Flash Attention" in line:
                self.flash_attn = "enabled" if "enabled" in line else "disabled"
        return ctx

    def argmax(self, ctx, index: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, index)
        if not ptr:
            raise AnchorError("llama.cpp returned no logits")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def run_once(self, prompt: list[int], decode_tokens: int) -> dict:
        n = len(prompt)
        ctx = self.new_context(n + decode_tokens + CTX_MARGIN)
        # All batches are filled before the clock starts: one per n_batch chunk of the prompt
        # (logits only for the very last prompt token) and one single-token batch for decoding.
        chunks = []
        for start in range(0, n, N_BATCH):
            chunk = prompt[start:start + N_BATCH]
            b = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            chunks.append(b)
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
        last = chunks[-1]
        last.logits[last.n_tokens - 1] = 1
        step_batch = llama_cpp.llama_batch_init(1, 0, 1)
        step_batch.n_tokens = 1
        step_batch.n_seq_id[0] = 1
        step_batch.seq_id[0][0] = 0
        step_batch.logits[0] = 1
        try:
            llama_cpp.llama_perf_context_reset(ctx)

            # Prefill: the prompt in chunks of n_batch, then wait for the computation to finish.
            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            for k, b in enumerate(chunks):
                rc = llama_cpp.llama_decode(ctx, b)
                if rc != 0:
                    raise AnchorError(
                        f"llama_decode failed on the prompt at token {k * N_BATCH} ({rc})"
                    )
            llama_cpp.llama_synchronize(ctx)
            prefill_wall = time.perf_counter() - t0
            prefill_cpu = cpu_seconds() - cpu0
            token = self.argmax(ctx, -1)

            # Decode: single-token steps, greedy.
            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            generated = []
            for step in range(decode_tokens):
                step_batch.token[0] = token
                step_batch.pos[0] = n + step
                rc = llama_cpp.llama_decode(ctx, step_batch)
                if rc != 0:
                    raise AnchorError(f"llama_decode failed at decode step {step} ({rc})")
                token = self.argmax(ctx, -1)
                generated.append(token)
            decode_wall = time.perf_counter() - t0
            decode_cpu = cpu_seconds() - cpu0

            perf = llama_cpp.llama_perf_context(ctx)
            if perf.n_p_eval != n or perf.n_eval != decode_tokens:
                raise AnchorError(
                    f"llama.cpp counted {perf.n_p_eval} prompt and {perf.n_eval} decode tokens, "
                    f"expected {n} and {decode_tokens}"
                )
            return {
                "prefill": 1e3 * perf.n_p_eval / perf.t_p_eval_ms,
                "decode": 1e3 * perf.n_eval / perf.t_eval_ms,
                "prefill_wall": n / prefill_wall,
                "decode_wall": decode_tokens / decode_wall,
                "prefill_cpu_share": prefill_cpu / (prefill_wall * self.threads),
                "decode_cpu_share": decode_cpu / (decode_wall * self.threads),
                "generated": generated,
            }
        finally:
            for b in chunks:
                llama_cpp.llama_batch_free(b)
            llama_cpp.llama_batch_free(step_batch)
            llama_cpp.llama_free(ctx)

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)


def parse_contexts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--contexts must be comma-separated integers, got {text!r}")
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"--contexts needs integers >= 2, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    global _VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="GGUF model file")
    ap.add_argument("--model-name", required=True, help="name written in the records")
    ap.add_argument("--contexts", default="2048,8192", type=parse_contexts,
                    help="comma-separated prompt lengths in tokens (default 2048,8192)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, type=Path, help="JSONL file to append records to")
    ap.add_argument("--verbose", action="store_true", help="echo llama.cpp's log to stderr")
    ap.add_argument("--dump-tokens", type=Path, metavar="FILE",
                    help="also write the prompt token ids (longest context) as JSON, to check "
                         "that another engine builds the same prompt")
    args = ap.parse_args(argv)
    _VERBOSE = args.verbose
    if args.decode_tokens < 1 or args.runs < 1 or args.threads < 1:
        ap.error("--decode-tokens, --runs and --threads must be >= 1")
    if not args.model.is_file():
        ap.error(f"model file not found: {args.model}")

    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    version = f"llama-cpp-python {llama_cpp.__version__}"
    device = f"{cpu_model_name()}, {args.threads} threads"
    commit = git_commit()

    try:
        corpus = essay_bytes(retrowave_home())
        runner = Runner(args.model, args.threads)
        tokens = tokenize(runner.vocab, corpus)
        longest = max(args.contexts)
        if len(tokens) < longest:
            raise AnchorError(
                f"the essays give only {len(tokens)} tokens with this model, "
                f"fewer than the {longest} asked for"
            )
        print(f"# {version}, {device}, model {args.model_name} ({args.model}), "
              f"corpus {len(corpus)} bytes = {len(tokens)} tokens", file=sys.stderr)

        if args.dump_tokens:
            args.dump_tokens.write_text(json.dumps(
                {"model": args.model_name, "n_tokens": longest, "ids": tokens[:longest]}) + "\n")
        runner.run_once(tokens[:WARMUP_PROMPT], WARMUP_DECODE)  # untimed warm-up
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for n in args.contexts:
            prompt = tokens[:n]
            load_before = loadavg()
            results = []
            for r in range(args.runs):
                res = runner.run_once(prompt, args.decode_tokens)
                results.append(res)
                print(f"  N={n} run {r + 1}/{args.runs}: prefill {res['prefill']:.1f} tok/s "
                      f"(wall {res['prefill_wall']:.1f}, cpu share {res['prefill_cpu_share']:.2f}), "
                      f"decode {res['decode']:.2f} tok/s (wall {res['decode_wall']:.2f}, "
                      f"cpu share {res['decode_cpu_share']:.2f})", file=sys.stderr, flush=True)
            load_after = loadavg()
            if any(r["generated"] != results[0]["generated"] for r in results):
                print(f"  warning: N={n}: greedy outputs differ between runs", file=sys.stderr)
            timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            with args.out.open("a", encoding="utf-8") as out:
                for metric, key in (("prefill_tokens_per_s", "prefill"),
                                    ("decode_tokens_per_s", "decode")):
                    record = {
                        "bench": "generate",
                        "engine": "llama.cpp",
                        "metric": metric,
                        "value": round(statistics.median(r[key] for r in results), 3),
                        "unit": "tokens/s",
                        "device": device,
                        "model": args.model_name,
                        "context": n,
                        "decode_tokens": args.decode_tokens,
                        "runs": args.runs,
                        "commit": commit,
                        "timestamp": timestamp,
                        "version": version,
                        "wall_value": round(statistics.median(r[key + "_wall"] for r in results), 3),
                        "samples": [round(r[key], 3) for r in results],
                        "cpu_share": round(statistics.median(r[key + "_cpu_share"] for r in results), 3),
                        "loadavg": load_after,
                        "loadavg_before": load_before,
                        "flash_attn": runner.flash_attn,
                        "n_batch": N_BATCH,
                        "n_ubatch": N_UBATCH,
                        "kv_type": "f16",
                        "nice": os.nice(0),
                        "autogroup_nice": autogroup_nice(),
                    }
                    out.write(json.dumps(record) + "\n")
            med_p = statistics.median(r["prefill"] for r in results)
            med_d = statistics.median(r["decode"] for r in results)
            print(f"N={n}: prefill {med_p:.1f} tok/s, decode {med_d:.2f} tok/s "
                  f"(median of {args.runs}; loadavg {load_after})", file=sys.stderr, flush=True)
        runner.close()
    except AnchorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
