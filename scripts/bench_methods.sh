#!/usr/bin/env bash
# Which method wins at this scale: pipelines/seeds.yaml (pipelines/ultrafeedback.yaml over seeds
# 1, 2, 3, every train stage and evaluate) built, then `sepo compare` as a Markdown table of
# mean ± std over the seeds per method. Not part of CI: about 15 minutes on 2 cores.
#   scripts/bench_methods.sh            # uses the repo's cache/ (shared with the main job)
#   SEPO="cargo run --release --" scripts/bench_methods.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEPO="${SEPO:-cargo run -q --}"
start=$SECONDS
$SEPO run pipelines/seeds.yaml --quiet
echo "built in $(( SECONDS - start )) s on $(nproc) cores, $(date -u +%Y-%m-%d)" >&2
$SEPO compare pipelines/seeds.yaml --format md
