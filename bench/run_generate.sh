#!/usr/bin/env bash
# Generate benchmark: retrowave and the llama.cpp anchor, measured in one go on this machine, into
# one JSONL file, then a side-by-side table (bench/anchor/summarize.py).
#
# Usage: bench/run_generate.sh [MODEL] [CONTEXTS] [OUT]
#   MODEL     model name as in $RETROWAVE_HOME/models/<name>.gguf   (default smollm2-135m)
#   CONTEXTS  comma-separated prompt lengths in tokens                (default 2048,8192)
#   OUT       JSONL results file, appended to
#             (default bench/results/generate-YYYYMMDD-<short commit>.jsonl)
# The same can be given as environment variables MODEL, CONTEXTS, OUT. Fixed here: 128 greedy
# decode tokens, 3 runs (median), and 2 threads for llama.cpp (THREADS overrides it).
# NICE=-20 runs both engines at that niceness (root only for negative values), each in a session of
# its own whose scheduler autogroup gets the same nice value (with sched_autogroup_enabled=1 a plain
# `nice` only ranks processes within their own session). On a machine shared with builds this keeps
# other work from preempting the benchmark threads, which otherwise distorts the numbers many
# times over (llama.cpp's OpenMP threads spin at barriers).
#
# retrowave runs first (skipped with a message when target/release/retrowave is not built), then
# llama.cpp on the same GGUF file (installed by bench/anchor/install.sh when missing; the first
# install builds it from source, a few minutes). Exits non-zero when either side failed, after
# writing and summarizing whatever was measured.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT="$PWD"

MODEL="${1:-${MODEL:-smollm2-135m}}"
CONTEXTS="${2:-${CONTEXTS:-2048,8192}}"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
OUT="${3:-${OUT:-bench/results/generate-$(date +%Y%m%d)-$COMMIT.jsonl}}"
DECODE_TOKENS=128
RUNS=3
THREADS="${THREADS:-2}"
PYTHON="${PYTHON:-python3}"
BIN="$ROOT/target/release/retrowave"
NICE_CMD=()
if [ -n "${NICE:-}" ]; then
    # setsid: a new session, so a new autogroup; its nice is set before exec'ing the benchmark.
    NICE_CMD=(setsid --wait bash -c 'echo "$0" > /proc/self/autogroup 2>/dev/null; exec nice -n "$0" "$@"' "$NICE")
fi
RETROWAVE_HOME="${RETROWAVE_HOME:-$HOME/.cache/retrowave}"

mkdir -p "$(dirname "$OUT")"
status=0
echo "== generate benchmark: model $MODEL, contexts $CONTEXTS, $DECODE_TOKENS decode tokens, $RUNS runs -> $OUT"
[ -n "${NICE:-}" ] && echo "== both engines run at niceness $NICE"
echo "== load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# (a) retrowave
if [ -x "$BIN" ]; then
    echo "== retrowave"
    if ! "${NICE_CMD[@]}" "$BIN" bench generate --model "$MODEL" --contexts "$CONTEXTS" \
        --decode-tokens "$DECODE_TOKENS" --runs "$RUNS" --out "$OUT"; then
        echo "!! retrowave bench generate failed" >&2
        status=1
    fi
else
    echo "!! $BIN not found: build it with 'cargo build --release' to measure retrowave; skipping it" >&2
    status=1
fi

# The model file: where retrowave keeps it, else the cache layout.
MODEL_PATH=""
if [ -x "$BIN" ]; then
    MODEL_PATH="$("$BIN" fetch --print-path "$MODEL" 2>/dev/null | tail -n 1)" || MODEL_PATH=""
fi
if [ -z "$MODEL_PATH" ] || [ ! -f "$MODEL_PATH" ]; then
    MODEL_PATH="$RETROWAVE_HOME/models/$MODEL.gguf"
fi

# (b) llama.cpp anchor
echo "== llama.cpp anchor on $MODEL_PATH"
if [ ! -f "$MODEL_PATH" ]; then
    echo "!! model file $MODEL_PATH not found; skipping llama.cpp" >&2
    status=1
elif ! PYTHON="$PYTHON" bash bench/anchor/install.sh; then
    echo "!! installing llama-cpp-python failed; skipping llama.cpp" >&2
    status=1
elif ! "${NICE_CMD[@]}" "$PYTHON" bench/anchor/llamacpp_generate.py --model "$MODEL_PATH" --model-name "$MODEL" \
    --contexts "$CONTEXTS" --decode-tokens "$DECODE_TOKENS" --runs "$RUNS" \
    --threads "$THREADS" --out "$OUT"; then
    echo "!! llama.cpp anchor failed" >&2
    status=1
fi

echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
if [ -f "$OUT" ]; then
    "$PYTHON" bench/anchor/summarize.py "$OUT" || status=1
else
    echo "!! no results written to $OUT" >&2
    status=1
fi
exit "$status"
