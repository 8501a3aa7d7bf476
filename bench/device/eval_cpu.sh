# Runs `retrowave eval` on the CPU cores of a GPU machine (16 there against 2 here), SmolLM2-135M
# at 4K: joins the staged model pieces (bench/device/stage_models.sh), installs the essays, and
# writes the records to $OUT/eval.jsonl. TASKS and CASES choose the cases, T bounds the run (s).
# usage (through the device tool, carrying .carry, .xdata and a piece): TASKS=multi-value CASES=40 bash bench/device/eval_cpu.sh
set -e
H=/root/rwhome; mkdir -p $H/models $H/data
cp .x01/* /root/models/ 2>/dev/null || true
[ -f $H/models/smollm2-135m.gguf ] || cat /root/models/smollm2-135m.?? > $H/models/smollm2-135m.gguf
cp -r .xdata/data/* $H/data/; cp .xdata/models/.smollm2* $H/models/
sha256sum $H/models/smollm2-135m.gguf
export RETROWAVE_HOME=$H RETROWAVE_THREADS=16
BIN=.carry/retrowave
timeout ${T:-540} $BIN eval --model smollm2-135m --tasks ${TASKS} --lengths 4096 --cases ${CASES} --seed 7 --attention full,wave,wave=bench/wave-configs/all.toml --out $OUT/eval.jsonl 2>&1 | tail -8 || true
