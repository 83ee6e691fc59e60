#!/usr/bin/env bash
# The paper's selection ablations at toy scale: pipelines/ablations.yaml (top vs random vs reverse
# key tokens, ratio 0.1-0.5, one side only; SePO each time, DPO as the baseline; seeds 1, 2, 3 with
# reference, oracle and judge replicated), then `sepo compare` as a Markdown table of mean ± std
# over the seeds. Not part of CI: about 40 minutes on 2 cores from a cache that already holds
# pipelines/seeds.yaml's stages (scripts/bench_methods.sh), longer from an empty one.
#   scripts/ablations.sh
#   SEPO=target/release/sepo scripts/ablations.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEPO="${SEPO:-cargo run -q --}"
start=$SECONDS
$SEPO run pipelines/ablations.yaml --quiet
echo "built in $(( SECONDS - start )) s on $(nproc) cores, $(date -u +%Y-%m-%d)" >&2
$SEPO compare pipelines/ablations.yaml --format md
