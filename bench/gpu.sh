#!/usr/bin/env bash
# The GPU table of issue 16 in one command: engine vs a training step (bf16) at 134M/512, 1.26B/512 and
# 1.26B/2048 (bench/persample.py presets), one table at the end. Run from the repository root:
#     bash bench/gpu.sh            # on a CUDA machine (about 5 min on an H100/H200)
#     bash bench/gpu.sh --dry-run  # tiny sizes on CPU: checks the script end to end
# PYTHON picks the interpreter (default python3). Bergson and Opacus are CPU-only in bench/peers.py so far.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [[ "${1:-}" == "--dry-run" ]]; then
  tiny="--device cpu --dtype float32 --hidden 64 --layers 2 --heads 2 --intermediate 128 --vocab 256 --batch 2 --repeats 1"
  runs=("134m/512|--preset 134m $tiny --seq 32" "1.26b/512|--preset 1b $tiny --seq 32" "1.26b/2048|--preset 1b $tiny --seq 64")
else
  runs=("134m/512|--preset 134m" "1.26b/512|--preset 1b" "1.26b/2048|--preset 1b --seq 2048 --batch 2")
fi
for run in "${runs[@]}"; do
  name=${run%%|*}
  # shellcheck disable=SC2086
  timeout 200 "$PY" bench/persample.py ${run#*|} > "$out/${name//\//_}.log"
  tail -n 1 "$out/${name//\//_}.log" > "$out/${name//\//_}.json"
  echo "done $name" >&2
done
"$PY" - "$out" <<'PY'
import json, pathlib, sys
print("| model/seq | engine x step | step s | engine s | max rel err | peak MiB step / engine |")
print("|---|---|---|---|---|---|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    m = r["peak_mem_mb"]
    print(f"| {f.stem.replace('_', '/')} | {r['engine_over_train_step']:.2f} | {r['train_step_s']:.3f} | "
          f"{r['engine_s']:.3f} | {r['max_rel_err']:.1e} | {m['train']:.0f} / {m['engine']:.0f} |")
PY
