#!/usr/bin/env bash
# Prepares model files for the GPU machine, which has no network: each model is cut into pieces
# under the device tool's 64 MiB limit with room for the working tree, one git-ignored folder per piece (.x00, .x01, ...), so that
# each device call can carry one folder (`carry: [".xNN"]`) and copy its piece to /root/models
# while the machine stays warm; the last call joins the pieces (`cat NAME.?? > NAME.gguf`) and checks
# `sha256sum` against ../shared/docs/models.md. Also stages the haystack essays in .xdata.
# usage: bench/device/stage_models.sh [MODEL ...]   (default: the three registry models)
set -euo pipefail
cd "$(dirname "$0")/../.."
models=${*:-smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b}
home=${RETROWAVE_HOME:-$HOME/.cache/retrowave}
rm -rf .x[0-9][0-9] .xdata
i=0
for m in $models; do
  f="$home/models/$m.gguf"
  [ -f "$f" ] || { echo "missing $f (run: retrowave fetch $m)" >&2; exit 1; }
  tmp=$(mktemp -d)
  split -b 50m -d -a 2 "$f" "$tmp/$m."
  for p in "$tmp"/*; do
    d=$(printf ".x%02d" "$i"); mkdir -p "$d"; mv "$p" "$d/"; i=$((i + 1))
  done
  rmdir "$tmp"
done
mkdir -p .xdata && cp -r "$home/data" .xdata/
echo "$i pieces in .x00 .. $(printf '.x%02d' $((i - 1))); essays in .xdata"
