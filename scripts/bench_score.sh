#!/usr/bin/env bash
# The `score` stage on long sequences against the official per-example PyTorch scorer, side by
# side on the same models and rows: 199 UltraFeedback pairs tokenized with stories260K's 512-token
# vocabulary and no truncation (max_len 4096: about 1,100 tokens per prompt + response, up to
# 4,096), stories260K as the oracle and a one-step SFT copy of it as the reference.
#
# Each repetition runs sepo's score stage cold (both models' log-probs computed, nothing cached)
# and then scripts/bench_score.py on the exported models and the token ids sepo scored; prints
# response tokens/s of both, their ratio and the load average, then the medians. Both sides count
# the same tokens: every response token (EOS included) of every pair, scored by both models.
#
# Usage: scripts/bench_score.sh [VENV]   (VENV: torch 2.9.0 + transformers; default .venv)
# Env: REPS (default 3), PAIRS (default 199), THREADS (PyTorch threads, default 2; sepo uses all
# cores, or RAYON_NUM_THREADS), KEEP=1 keeps the work folder, SEPO=path runs that binary (default:
# the dev-profile build, built first).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${1:-.venv}"
REPS="${REPS:-3}"
PAIRS="${PAIRS:-199}"
THREADS="${THREADS:-2}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no python at $PY (give a venv with torch and transformers)" >&2; exit 2; }

if [ -z "${SEPO:-}" ]; then
  cargo build -q
  SEPO="${CARGO_TARGET_DIR:-$ROOT/target}/debug/sepo"
fi
WORK="$(mktemp -d)"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
P="$WORK/p.yaml"
cat > "$P" <<EOF
name: bench-score
cache: ./cache
device: flex
seed: 42
stages:
  pairs:  {kind: ingest, format: ultrafeedback, path: $ROOT/data/ultrafeedback/h4_train_prefs_500.jsonl, limit: $PAIRS}
  tok:    {kind: tokenizer, path: $ROOT/models/stories260K/tokenizer.json}
  tokens: {kind: tokenize, inputs: {data: pairs, tokenizer: tok}, template: none, max_len: 4096}
  oracle: {kind: model, inputs: {tokenizer: tok}, from: $ROOT/models/stories260K}
  ref:    {kind: train, objective: sft, inputs: {model: oracle, data: tokens}, lr: 1e-3, batch_size: 16, data_fraction: 0.02, warmup_ratio: 0}
  scores: {kind: score, inputs: {oracle: oracle, reference: ref, data: tokens}}
EOF

echo "building the inputs (ingest, tokenize, the one-step SFT reference) ..." >&2
"$SEPO" run "$P" --quiet --stage ref 2>/dev/null || "$SEPO" run "$P" --quiet 2>/dev/null
"$SEPO" export "$P" oracle "$WORK/hf_oracle" --quiet >/dev/null 2>&1
"$SEPO" export "$P" ref "$WORK/hf_ref" --quiet >/dev/null 2>&1
"$SEPO" show "$P" tokens --json --rows 1000000 --quiet > "$WORK/rows.json" 2>/dev/null
"$PY" - "$WORK/rows.json" >&2 <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["head"]
lens = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
print(f"{len(rows)} pairs, {len(lens)} sequences: mean {sum(lens) / len(lens):.0f} tokens, max {max(lens)}")
PY

OUT="$WORK/results.jsonl"
for rep in $(seq 1 "$REPS"); do
  # Cold: drop the cached log-probs and scores (this work folder's own store).
  rm -rf "$WORK/cache/logprobs" "$WORK/cache/score"
  load="$(cut -d' ' -f1 /proc/loadavg)"
  "$SEPO" run "$P" --quiet --stage scores 2>/dev/null || "$SEPO" run "$P" --quiet 2>/dev/null
  dir="$("$SEPO" show "$P" scores --path --quiet 2>/dev/null)"
  [ "$rep" = 1 ] && "$SEPO" show "$P" scores --json --rows 1000000 --quiet > "$WORK/scores.json" 2>/dev/null
  torch="$("$PY" scripts/bench_score.py "$WORK/hf_oracle" "$WORK/hf_ref" "$WORK/rows.json" \
    --threads "$THREADS" $([ "$rep" = 1 ] && echo --scores "$WORK/scores.json") 2>/dev/null | tail -1)"
  "$PY" - "$dir/manifest.json" "$WORK/rows.json" "$torch" "$load" "$rep" >> "$OUT" <<'PY'
import json, sys
manifest, rows, torch, load, rep = sys.argv[1:]
m = json.load(open(manifest))
tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in json.load(open(rows))["head"])
t = json.loads(torch)
assert t["response_tokens"] == tokens, (t["response_tokens"], tokens)
sepo = tokens / m["wall_time_s"]
print(json.dumps({"rep": int(rep), "load_before": float(load), "response_tokens": tokens,
                  "sepo_score_s": round(m["wall_time_s"], 2), "sepo_tokens_per_s": round(sepo),
                  "torch_s": t["seconds"], "torch_tokens_per_s": round(t["tokens_per_s"]),
                  "torch_threads": t["threads"], "ratio": round(sepo / t["tokens_per_s"], 2),
                  **({"max_abs_diff": t["max_abs_diff_vs_sepo"]} if "max_abs_diff_vs_sepo" in t else {})}))
PY
  tail -1 "$OUT"
done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"\n| | response tokens/s (median of {len(rows)}) |\n|---|---|")
print(f"| sepo `score` stage (flex, all cores) | {med('sepo_tokens_per_s'):.0f} |")
print(f"| PyTorch per example ({rows[0]['torch_threads']} threads) | {med('torch_tokens_per_s'):.0f} |")
print(f"| ratio (median of per-run ratios) | {med('ratio'):.2f} |")
if "max_abs_diff" in rows[0]:
    print(f"\nlargest |token score difference| sepo vs PyTorch: {rows[0]['max_abs_diff']:.2e}")
PY
