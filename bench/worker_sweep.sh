#!/usr/bin/env bash
# Workers on one GPU: single vs colocated vs split, MPS off/on, procs 1/2/4/8 (Splitwiser's engine),
# and the paper's own comparison, N processes x transformers' generate at batch 20, MPS off/on.
# Each configuration is its own `jobs.run` (an MPS daemon lives as long as its clients). OPT-125m
# random weights, plain prompts, 64 new tokens, EOS ignored. Prints one markdown row per run.
#   bash bench/worker_sweep.sh WORK_DIR TOKENIZER_DIR [REQUESTS] [engine|paper|all]
# generation tok/s: tokens over the span from the first prefill to the last token (what the workers
# do once started); job tok/s: over the job's whole wall time (process starts and imports included).
# GPU MiB: the peak of the device's used memory (nvidia-smi, every 200 ms) during the run.
set -uo pipefail
work=${1:?work dir}; tokenizer=${2:?tokenizer dir}; requests=${3:-1000}; which=${4:-all}
mkdir -p "$work"
python3 data/make_radiology.py --rows "$requests" --out "$work/data.csv" >/dev/null
echo "| run | generation tok/s | job tok/s | p50 ms | p99 ms | generate s | wall s | GPU MiB | mps |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
run() {  # name, overrides...
  local name=$1 sampler; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$work/$name.mem" 2>/dev/null &
  sampler=$!
  if python3 -m jobs.run model=opt125m model.weights=random model.tokenizer="$tokenizer" data.path="$work/data.csv" \
      prompt.style=plain engine.ignore_eos=true engine.max_new_tokens=64 output.progress=false \
      output.dir="$work/$name" "$@" >"$work/$name.log" 2>&1; then
    kill "$sampler"; wait "$sampler" 2>/dev/null
    python3 - "$work/$name" "$(sort -n "$work/$name.mem" | tail -1)" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.compute as pc, pyarrow.parquet as pq
out = Path(sys.argv[1])
run = json.loads((out / "manifest.json").read_text())["runs"][-1]
timing = pq.read_table(out / "timing.parquet")
start = pc.min(timing["prefill_start_ms"]).as_py()
span_s = (pc.max(timing["finish_ms"]).as_py() - start) / 1e3
latency = pc.subtract(timing["finish_ms"], start)  # from the first prefill
p50, p99 = (round(pc.quantile(latency, q=q)[0].as_py()) for q in (0.5, 0.99))
print(f"| {out.name} | {run['generated_tokens'] / span_s:,.0f} | {run['job_tokens_per_s']:,.0f} | {p50} | {p99} | "
      f"{run['stages']['generate_s']} | {run['wall_s']} | {sys.argv[2]} | {run['mps']} |")
PY
  else
    kill "$sampler"; wait "$sampler" 2>/dev/null
    echo "| $name | failed: $(tail -1 "$work/$name.log") |"
  fi
}
if [ "$which" != paper ]; then
  run single mode=single
  for procs in 2 4 8; do
    for mode in colocated split; do
      for mps in off on; do
        run "$mode-p$procs-mps$mps" procs=$procs mode=$mode mps=$mps
      done
    done
  done
fi
if [ "$which" != engine ]; then
  for procs in 1 2 4 8; do
    for mps in off on; do
      [ "$procs" = 1 ] && [ "$mps" = on ] && continue  # MPS is only started for several processes
      run "generate-b20-p$procs-mps$mps" engine.kind=generate engine.batch_size=20 procs=$procs mps=$mps
    done
  done
fi
