#!/usr/bin/env bash
# The paper's comparison on one GPU: N processes over one shared model, MPS off/on, with
# transformers' generate (batch 20, the paper's setting) and with Splitwiser's engine. Each
# configuration is its own `jobs.run` process (an MPS daemon lives as long as its clients).
#   bash bench/paper_sweep.sh OUT_DIR TOKENIZER_DIR [REQUESTS]
set -uo pipefail
out=${1:?output dir}; tokenizer=${2:?tokenizer dir}; requests=${3:-400}
mkdir -p "$out"
python3 data/make_radiology.py --rows "$requests" --out "$out/data.csv" >/dev/null
run() {  # name, overrides...
  local name=$1; shift
  python3 -m jobs.run model=opt125m model.weights=random model.tokenizer="$tokenizer" data.path="$out/data.csv" \
    engine.ignore_eos=true engine.max_new_tokens=64 output.progress=false output.dir="$out/$name" "$@" \
    >"$out/$name.log" 2>&1 || echo "$name failed: $(tail -1 "$out/$name.log")"
}
for procs in 1 2 4 8; do
  for mps in off on; do
    run "generate-b20-p$procs-mps$mps" engine.kind=generate engine.batch_size=20 procs=$procs mode=colocated mps=$mps
  done
done
for procs in 1 2 4; do
  for mps in off on; do
    run "continuous-p$procs-mps$mps" procs=$procs mode=colocated mps=$mps
  done
done
run "continuous-single" mode=single
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for manifest in sorted(Path(sys.argv[1]).glob("*/manifest.json")):
    run = json.loads(manifest.read_text())["runs"][-1]
    rows.append((manifest.parent.name, run["generated_tokens_per_s"], run["stages"]["generate_s"], run["wall_s"], run["mps"]))
print("| run | generated tokens/s | generate s | run wall s | mps |\n| --- | --- | --- | --- | --- |")
for row in rows:
    print("| " + " | ".join(map(str, row)) + " |")
PY
