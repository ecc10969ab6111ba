#!/usr/bin/env bash
# The paper's comparison on one GPU: N processes over one shared model, MPS off/on, with
# transformers' generate (batch 20, the paper's setting) and with Splitwiser's engine. Each
# configuration is its own `jobs.run` process (an MPS daemon lives as long as its clients).
# Plain prompts, as jobs.bench gives OPT (the offline stand-in tokenizer has a chat template).
# Prints one markdown row per configuration as it finishes.
#   bash bench/paper_sweep.sh WORK_DIR TOKENIZER_DIR [REQUESTS]
set -uo pipefail
work=${1:?work dir}; tokenizer=${2:?tokenizer dir}; requests=${3:-400}
mkdir -p "$work"
python3 data/make_radiology.py --rows "$requests" --out "$work/data.csv" >/dev/null
echo "| run | generated tokens/s | generate s | latency p50 ms | latency p99 ms | run wall s | mps | IPC warnings |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
run() {  # name, overrides...
  local name=$1; shift
  if python3 -m jobs.run model=opt125m model.weights=random model.tokenizer="$tokenizer" data.path="$work/data.csv" \
      prompt.style=plain engine.ignore_eos=true engine.max_new_tokens=64 output.progress=false output.dir="$work/$name" "$@" \
      >"$work/$name.log" 2>&1; then
    python3 - "$work/$name" "$(grep -c 'shared CUDA tensors released' "$work/$name.log")" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.compute as pc, pyarrow.parquet as pq
out = Path(sys.argv[1])
run = json.loads((out / "manifest.json").read_text())["runs"][-1]
timing = pq.read_table(out / "timing.parquet")
latency = pc.subtract(timing["finish_ms"], pc.min(timing["prefill_start_ms"]))  # from the first prefill
p50, p99 = (round(pc.quantile(latency, q=q)[0].as_py()) for q in (0.5, 0.99))
print(f"| {out.name} | {run['generated_tokens_per_s']:,.0f} | {run['stages']['generate_s']} | {p50} | {p99} | "
      f"{run['wall_s']} | {run['mps']} | {sys.argv[2]} |")
PY
  else
    echo "| $name | failed: $(tail -1 "$work/$name.log") |"
  fi
}
for procs in 1 2 4 8; do
  for mps in off on; do
    run "generate-b20-p$procs-mps$mps" engine.kind=generate engine.batch_size=20 procs=$procs mode=colocated mps=$mps
  done
done
run "continuous-single" mode=single
run "continuous-p2-mpsoff" procs=2 mode=colocated mps=off
run "continuous-p2-mpson" procs=2 mode=colocated mps=on
run "continuous-p4-mpson" procs=4 mode=colocated mps=on
