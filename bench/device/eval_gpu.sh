#!/usr/bin/env bash
# Runs `retrowave eval` on the GPU over many cases: P processes share the one GPU (a small
# model's decode step leaves most of it idle), each looping over small suites of its own seeds
# until T seconds have passed; every record lands in $OUT/eval.jsonl. Joins the staged model
# pieces (bench/device/stage_models.sh) and installs the essays first.
# usage (through the device tool, carrying .carry and .xdata once the pieces are in /root/models):
#   MODEL=smollm2-135m SHA=b179... LENGTHS=2048,4096,8000 MODES=full,wave P=6 T=480 \
#   bash bench/device/eval_gpu.sh
set -u
H=/root/rwhome
mkdir -p $H/models $H/data
M=$H/models/$MODEL.gguf
[ -f "$M" ] || cat /root/models/$MODEL.?? > "$M"
sha256sum "$M" | grep -q "$SHA" || { echo "SHA MISMATCH for $M"; exit 1; }
cp -r .xdata/data/* $H/data/
export RETROWAVE_HOME=$H
BIN=.carry/retrowave
P=${P:-6}
end=$((SECONDS + ${T:-480}))
rm -f /tmp/eval-p*.jsonl /tmp/eval-log*.txt
nvidia-smi -L
for p in $(seq 0 $((P - 1))); do
  (
    i=0
    while [ $SECONDS -lt $((end - 20)) ]; do
      seed=$((${SEED0:-1000} + i * P + p))
      timeout $((end - SECONDS)) $BIN eval --device cuda --model "$M" --lengths "$LENGTHS" \
        --tasks "${TASKS:-single-needle,multi-key,multi-value,variable-tracking}" \
        --cases "${CASES:-1}" --seed $seed --attention "$MODES" --out /tmp/eval-p$p.jsonl \
        >>/tmp/eval-log$p.txt 2>&1
      i=$((i + 1))
    done
  ) &
done
wait
cat /tmp/eval-p*.jsonl >"$OUT/eval.jsonl"
wc -l "$OUT/eval.jsonl"
grep -h -iE "error|panic" /tmp/eval-log*.txt | sort | uniq -c | head
tail -n 12 /tmp/eval-log0.txt
