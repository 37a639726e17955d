#!/usr/bin/env bash
# The GPU table of issue 16 in one command: engine vs a training step (bf16) at 134M/512, 1.26B/512 and
# 1.26B/2048 (bench/persample.py presets), and at the same sizes the peers side by side (bench/peers.py:
# gradsift norms of the block Linear layers, Bergson 16x16 per module, Opacus ghost clipping; exactness
# against a naive loop over 2 samples), one table at the end. Run from the repository root:
#     bash bench/gpu.sh            # on a CUDA machine (about 6 min on an H100/H200)
#     bash bench/gpu.sh --dry-run  # tiny sizes on CPU: checks the script end to end
# PYTHON picks the interpreter (default python3). A peer that is not installed (`pip install .[bench]`) is skipped
# and its column stays empty.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # absolute: peers.py runs from bench/
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [[ "${1:-}" == "--dry-run" ]]; then
  tiny="--device cpu --dtype float32 --hidden 64 --layers 2 --heads 2 --intermediate 128 --vocab 256 --batch 2 --repeats 1"
  runs=("134m/512|--preset 134m $tiny --seq 32" "1.26b/512|--preset 1b $tiny --seq 32" "1.26b/2048|--preset 1b $tiny --seq 64")
  peers=("134m/512|tiny-32x2" "1.26b/512|tiny-32x2" "1.26b/2048|tiny-64x2")
  peer_args="--device cpu --dtype float32 --repeats 1"
  limit=900  # a busy CPU: the time limits are the GPU run's
else
  runs=("134m/512|--preset 134m" "1.26b/512|--preset 1b" "1.26b/2048|--preset 1b --seq 2048 --batch 2")
  peers=("134m/512|134m-512x16" "1.26b/512|1b-512x8" "1.26b/2048|1b-2048x2")
  peer_args="--device cuda --dtype bfloat16 --repeats 3"
  limit=150
fi
for run in "${runs[@]}"; do
  name=${run%%|*}
  # shellcheck disable=SC2086
  timeout $((limit + 50)) "$PY" bench/persample.py ${run#*|} > "$out/${name//\//_}.log"
  tail -n 1 "$out/${name//\//_}.log" > "$out/${name//\//_}.json"
  echo "done $name" >&2
done
for run in "${peers[@]}"; do
  name=${run%%|*}
  # shellcheck disable=SC2086
  (cd bench && timeout "$limit" "$PY" peers.py --sizes ${run#*|} $peer_args --naive-samples 2 --skip torch.func) \
    > "$out/${name//\//_}.peers.log" 2>&1
  tail -n 1 "$out/${name//\//_}.peers.log" > "$out/${name//\//_}.peers"
  echo "done peers $name" >&2
done
"$PY" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def x(d, key):
    v = d.get("x_train_step", {}).get(key)
    return "" if v is None else f"{v:.2f}"
print("| model/seq | engine x step | step s | engine s | max rel err | peak MiB step / engine "
      "| gradsift norms (block Linear) x step | Bergson x step | Opacus x step | gradsift / Bergson | peers max rel err |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    m = r["peak_mem_mb"]
    p = json.loads((out / f"{f.stem}.peers").read_text())
    p = next(v for k, v in p.items() if isinstance(v, dict))
    gb = p.get("gradsift_over_bergson")
    print(f"| {f.stem.replace('_', '/')} | {r['engine_over_train_step']:.2f} | {r['train_step_s']:.3f} | "
          f"{r['engine_s']:.3f} | {r['max_rel_err']:.1e} | {m['train']:.0f} / {m['engine']:.0f} "
          f"| {x(p, 'gradsift norms')} | {x(p, 'Bergson, proj 16/module')} | {x(p, 'Opacus ghost clipping')} "
          f"| {'' if gb is None else f'{gb:.2f}'} | {p['max_rel_err']:.1e} |")
PY
