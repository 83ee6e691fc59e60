#!/usr/bin/env bash
# Runs the throughput benchmark: sepo on flex (and on tch-cpu when the `tch` feature builds),
# and PyTorch eager on the same machine, same model and batch; prints JSON lines then a table.
# Usage: scripts/bench.sh [VENV]   (VENV: a venv with torch 2.9.0 and transformers; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
MODES="forward sft dpo dpo-inline sepo"
REPS="${REPS:-3}"   # measured repetitions after one warm-up
OUT="$(mktemp)"
cargo build -q --example bench
for m in $MODES; do cargo run -q --example bench -- "$m" --device flex --reps "$REPS" | tee -a "$OUT"; done
if [ -x "$VENV/bin/python" ]; then
  TORCH_LIB="$("$VENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  if LIBTORCH_USE_PYTORCH=1 PATH="$VENV/bin:$PATH" cargo build -q --features tch --example bench 2>/dev/null; then
    for m in $MODES; do
      LD_LIBRARY_PATH="$TORCH_LIB" PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1 \
        cargo run -q --features tch --example bench -- "$m" --device tch-cpu --reps "$REPS" | tee -a "$OUT"
    done
  fi
  for m in $MODES; do "$VENV/bin/python" scripts/bench_torch.py "$m" --reps "$REPS" | tee -a "$OUT"; done
fi
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("\n| impl | device | mode | s/step | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['impl']} | {r['device']} | {r['mode']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
PY
