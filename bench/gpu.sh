#!/usr/bin/env bash
# One prepared run for a GPU machine (no network, a PyTorch of its own): throughput of sepo (f32,
# and bf16 mixed precision) and PyTorch (eager f32, eager bf16 autocast) for sft, dpo and sepo on the TinyLlama-1.1B shape and
# real 8 x 512 UltraFeedback batches, peak GPU memory and model FLOPs utilization, then the wall
# time of every stage of bench/scale.yaml. Built beforehand (see README "Speed"): the `sepo`
# binary and the `bench` example with `--features tch`, linked against that machine's libtorch.
#
#   SEPO=target/release/sepo BENCH=target/release/examples/bench bench/gpu.sh [OUT_DIR]
#
# Environment (defaults for one H100/H200; the whole run is meant to finish in under 5 minutes):
#   DEVICE=tch-cuda:0  TORCH_DEVICE=cuda  MODEL=tinyllama  BATCH=8  SEQ=512  REPS=3
#   MODES="sft dpo sepo"  PY=python3  PEAK_TFLOPS (bf16 dense peak of the chip, for MFU; default
#   989 for H100/H200)  SCALE=1 (0 skips the scale pipeline)  SCALE_SET (extra --set for it)
#   PHASES=1: a diagnostic run instead: every training step waits for the GPU after forward,
#   backward, clipping and optimizer, and each phase's mean is printed (sepo: SEPO_STEP_PHASES=1
#   on stderr; PyTorch: `phases_ms` in its JSON). The waits slow both sides a little: take
#   tokens/s from a run without it.
# A CPU dry run of the script itself (what CI-less checks can do here):
#   DEVICE=flex TORCH_DEVICE=cpu MODEL=small BATCH=2 SEQ=128 REPS=1 SCALE_SET='init.config={...}' bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
SEPO="${SEPO:-target/release/sepo}"
BENCH="${BENCH:-target/release/examples/bench}"
PY="${PY:-python3}"
DEVICE="${DEVICE:-tch-cuda:0}"
TORCH_DEVICE="${TORCH_DEVICE:-cuda}"
MODEL="${MODEL:-tinyllama}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-512}"
REPS="${REPS:-3}"
MODES="${MODES-sft dpo sepo}"  # MODES= (empty) runs the scale pipeline alone
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
SCALE="${SCALE:-1}"
PHASES="${PHASES:-0}"
torch_phases=()
if [ "$PHASES" = 1 ]; then export SEPO_STEP_PHASES=1; torch_phases=(--phases); fi
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
CACHE="$OUT/cache"
LOG="$OUT/bench.jsonl"
: >"$LOG"
start=$SECONDS
have_smi=0
command -v nvidia-smi >/dev/null 2>&1 && [[ "$TORCH_DEVICE" == cuda* ]] && have_smi=1

# Peak GPU memory of a command (MB above what was in use before it), by polling nvidia-smi.
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1; }
with_gpu_peak() {
  if [ "$have_smi" = 0 ]; then "$@"; return; fi
  local base peak_file="$OUT/.peak" pid
  base=$(gpu_used); echo "$base" >"$peak_file"
  ( while :; do u=$(gpu_used); [ "$u" -gt "$(cat "$peak_file")" ] && echo "$u" >"$peak_file"; sleep 0.2; done ) &
  pid=$!
  "$@"; local rc=$?
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  echo "{\"gpu_peak_mb_above_idle\": $(( $(cat "$peak_file") - base ))}" >>"$LOG"
  return $rc
}

echo "== real rows: bench/scale.yaml's bench_rows (tokenize only, on the CPU)" >&2
"$SEPO" run bench/scale.yaml --cache "$CACHE" --stage bench_rows --device cpu --quiet || exit 1
DATA="$("$SEPO" show bench/scale.yaml bench_rows --cache "$CACHE" --path)/tokens.parquet"
common=(--model "$MODEL" --batch "$BATCH" --seq "$SEQ" --data "$DATA" --reps "$REPS")

for m in $MODES; do
  echo "== $m: sepo on $DEVICE ($((SECONDS - start)) s)" >&2
  with_gpu_peak "$BENCH" "$m" --device "$DEVICE" "${common[@]}" | tee -a "$LOG"
  echo "== $m: sepo bf16 (mixed precision) on $DEVICE ($((SECONDS - start)) s)" >&2
  with_gpu_peak "$BENCH" "$m" --device "$DEVICE" --precision bf16 "${common[@]}" | tee -a "$LOG"
  echo "== $m: PyTorch eager f32 on $TORCH_DEVICE" >&2
  "$PY" scripts/bench_torch.py "$m" --device "$TORCH_DEVICE" "${common[@]}" "${torch_phases[@]}" | tee -a "$LOG"
  echo "== $m: PyTorch eager bf16 autocast" >&2
  "$PY" scripts/bench_torch.py "$m" --device "$TORCH_DEVICE" --bf16 "${common[@]}" "${torch_phases[@]}" | tee -a "$LOG"
done

if [ "$SCALE" = 1 ]; then
  echo "== scale pipeline bench/scale.yaml on $DEVICE ($((SECONDS - start)) s)" >&2
  set_args=()
  [ -n "${SCALE_SET:-}" ] && set_args=(--set "$SCALE_SET")
  with_gpu_peak "$SEPO" run bench/scale.yaml --cache "$CACHE" --device "$DEVICE" "${set_args[@]}" 2>&1 \
    | grep -E '^  (done|run) ' >&2
  "$SEPO" status bench/scale.yaml --cache "$CACHE" --json "${set_args[@]}" >"$OUT/status.json"
fi

"$PY" - "$LOG" "$OUT" "$PEAK_TFLOPS" "$SCALE" <<'PY'
import json, os, sys
log, out, peak, scale = sys.argv[1], sys.argv[2], float(sys.argv[3]) * 1e12, sys.argv[4] == "1"
rows, gpu = [], None
for line in open(log):
    r = json.loads(line)
    if "gpu_peak_mb_above_idle" in r:
        if rows:
            rows[-1]["peak_gpu_mb"] = r["gpu_peak_mb_above_idle"]
        gpu = r["gpu_peak_mb_above_idle"]
    else:
        rows.append(r)
torch32 = {r["mode"]: r["tokens_per_s"] for r in rows if r["impl"].endswith("eager")}
torch16 = {r["mode"]: r["tokens_per_s"] for r in rows if r["impl"].endswith("bf16 autocast")}
print("\n| impl | device | mode | tokens/s | vs PyTorch f32 | vs PyTorch bf16 | peak GPU MB | MFU (of %.0f TFLOP/s) |" % (peak / 1e12))
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    m = r["mode"]
    f = lambda base: f"{r['tokens_per_s'] / base[m]:.2f}x" if m in base else "-"
    mem = r.get("peak_gpu_mb", "-")
    print(f"| {r['impl']} | {r['device']} | {m} | {r['tokens_per_s']:.0f} | {f(torch32)} | {f(torch16)} | {mem} | {100 * r['model_flops_per_s'] / peak:.1f}% |")
if scale and os.path.exists(os.path.join(out, "status.json")):
    print("\n| stage | kind | wall s |\n|---|---|---|")
    for s in json.load(open(os.path.join(out, "status.json"))):
        try:
            wall = json.load(open(os.path.join(s["path"], "manifest.json"))).get("wall_time_s")
        except OSError:
            wall = None
        print(f"| {s['stage']} | {s['kind']} | {wall if wall is None else round(wall, 1)} |")
    if gpu is not None:
        print(f"\nscale pipeline peak GPU memory: {gpu} MB above idle")
PY
echo "total $((SECONDS - start)) s; JSON lines in $LOG" >&2
