#!/usr/bin/env bash
# thinkvl's GPU check: bf16 SFT with packing, a few RL iterations, the log-prob path and an HF
# round trip on small models built from configs; prints throughput, peak memory and any mismatch
# against CPU fp32 (scripts/gpu_check.py). Under 8 minutes on one GPU.
#   bash scripts/gpu_check.sh            # on the first CUDA device
#   bash scripts/gpu_check.sh --cpu      # dry run on the CPU at small sizes (CI runs this)
#   bash scripts/gpu_check.sh --out DIR  # keep the runs
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " == *" --cpu "* ]]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec python scripts/gpu_check.py "$@"
