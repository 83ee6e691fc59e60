#!/usr/bin/env bash
# Weights at disk speed: how long a `model` stage from `config:` and a one-step `train` stage
# spend on their weights (init, save, load, hash, fsync), against Python writing, hashing and
# reading back a safetensors file of the same tensors. Not part of CI.
#
# Usage: scripts/bench_weights.sh [VENV]
#   VENV: a venv with torch and safetensors (default ~/.cache/sepo-ci/venv-torch-2.9.0).
#   REPS=3 (repetitions, medians printed), CKPT=1 (also a two-step train with a checkpoint,
#   interrupted after step 1 and resumed: checkpoint save and load), SEPO=path (default: the
#   dev-profile build, $CARGO_TARGET_DIR or target, built first unless SEPO is given),
#   DROP=1 (before each sepo run and each Python run, write back and drop the page cache: needs
#   root. On the 2-core VM of the README's figures, a large write soon after other large
#   writes often crawls, for sepo and Python alike, so without it the repetitions after the
#   first measure that VM more than the program).
# The model: Llama, hidden 768, 12 layers, 12 heads, MLP 3072, the Llama-2 vocabulary (32000):
# 162.4M parameters, a 650 MB model.safetensors. Prints one line per run, then the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${1:-$HOME/.cache/sepo-ci/venv-torch-2.9.0}"
REPS="${REPS:-3}"
CKPT="${CKPT:-0}"
DROP="${DROP:-0}"
if [ -z "${SEPO:-}" ]; then
  cargo build -q
  SEPO="${CARGO_TARGET_DIR:-$ROOT/target}/debug/sepo"
fi
WORK="$(mktemp -d /tmp/sepo-bench-weights.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cat >"$WORK/p.yaml" <<EOF
name: bench-weights
seed: 1
device: cpu
stages:
  pairs: {kind: ingest, format: ultrafeedback, path: $ROOT/data/ultrafeedback/h4_train_prefs_500.jsonl, limit: 8}
  tok: {kind: tokenizer, path: $ROOT/data/tokenizers/llama2/tokenizer.json}
  tokens: {kind: tokenize, inputs: {data: pairs, tokenizer: tok}, template: none, max_len: 16}
  base: {kind: model, inputs: {tokenizer: tok}, config: {architecture: llama, hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}}
  sft: {kind: train, objective: sft, inputs: {model: base, data: tokens}, lr: 1e-4, epochs: 1, batch_size: 1, data_fraction: 0.125}
  ckpt: {kind: train, objective: sft, inputs: {model: base, data: tokens}, lr: 1e-4, epochs: 1, batch_size: 1, data_fraction: 0.25, checkpoint_every: 1}
EOF
echo "machine: $(nproc) cores, $(uptime | sed 's/.*load/load/')"
echo "sepo: $SEPO"
RES="$WORK/results"
: >"$RES"
# The seconds a line `  done   STAGE (...) in Xs` reports, and the training seconds of
# `STAGE: N steps, T tokens in Xs`.
stage_s() { sed -n "s/^  done   $1 (.*) in \([0-9.]*\)s$/\1/p" "$2" | tail -1; }
train_s() { sed -n "s/^ *$1: [0-9]* steps, .* in \([0-9.]*\)s .*/\1/p" "$2" | tail -1; }
settle() {
  if [ "$DROP" = 1 ]; then
    sync
    echo 1 >/proc/sys/vm/drop_caches || { echo "DROP=1: cannot drop the page cache (root?)" >&2; exit 2; }
  fi
}
for rep in $(seq "$REPS"); do
  settle
  C="$WORK/cache"
  rm -rf "$C"
  "$SEPO" run "$WORK/p.yaml" --cache "$C" --stage tokens -q
  "$SEPO" run "$WORK/p.yaml" --cache "$C" --stage sft -j 1 2>"$WORK/log" ||
    { tail -3 "$WORK/log"; exit 1; }
  model=$(stage_s base "$WORK/log")
  train=$(stage_s sft "$WORK/log")
  steps=$(train_s sft "$WORK/log")
  t0=$(date +%s.%N)
  # Re-hashes every artifact built (the two model files: 1.3 GB), whatever it prints about
  # the stage not built.
  "$SEPO" verify "$WORK/p.yaml" --cache "$C" -q >/dev/null 2>&1 || true
  verify=$(echo "$(date +%s.%N) - $t0" | bc)
  line="sepo model $model train $train training $steps outside $(echo "$train - $steps" | bc) verify $verify"
  if [ "$CKPT" = 1 ]; then
    # Dies (abort) right after the checkpoint of step 1; the subshell keeps bash's notice quiet.
    (SEPO_TEST_HOOK=abort-after-checkpoint:1 "$SEPO" run "$WORK/p.yaml" --cache "$C" --stage ckpt \
      -j 1 >"$WORK/log1" 2>&1 || true) 2>/dev/null
    "$SEPO" run "$WORK/p.yaml" --cache "$C" --stage ckpt -j 1 2>"$WORK/log2" ||
      { tail -3 "$WORK/log2"; exit 1; }
    line="$line ckpt_resumed $(stage_s ckpt "$WORK/log2") ckpt_training $(train_s ckpt "$WORK/log2")"
  fi
  echo "$line (load $(cut -d' ' -f1 /proc/loadavg))" | tee -a "$RES"
  rm -rf "$C"
  if [ -x "$VENV/bin/python" ]; then
    settle
    "$VENV/bin/python" scripts/bench_weights.py "$WORK/py" 768 12 12 3072 32000 1 | tee -a "$RES"
  fi
done
python3 - "$RES" <<'PY'
import statistics, sys
rows = {"sepo": [], "py": []}
for line in open(sys.argv[1]):
    w = line.split()
    if w[0] in rows and len(w) > 2 and w[1] != "params":
        rows[w[0]].append({w[i]: float(w[i + 1]) for i in range(1, len(w) - 1, 2)
                           if w[i + 1].replace(".", "", 1).isdigit()})
med = lambda rs, k: statistics.median(r[k] for r in rs) if rs and all(k in r for r in rs) else None
s, p = rows["sepo"], rows["py"]
print(f"\nmedians over {len(s)} run(s):")
for k in ["model", "train", "training", "outside", "verify", "ckpt_resumed", "ckpt_training"]:
    if med(s, k) is not None:
        print(f"  sepo {k:14s} {med(s, k):7.2f} s")
for k in ["write", "fsync", "hash", "read", "copy", "total"]:
    if med(p, k) is not None:
        print(f"  py   {k:14s} {med(p, k):7.2f} s")
if s and p:
    base = med(p, "write") + med(p, "hash") + med(p, "read")
    print(f"  python write + hash + read (no fsync): {base:.2f} s; with fsync: {base + med(p, 'fsync'):.2f} s")
    print(f"  model stage / that: {med(s, 'model') / base:.1f}x;"
          f" train outside training / that: {med(s, 'outside') / base:.1f}x")
PY
