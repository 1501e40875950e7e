#!/usr/bin/env bash
# Installs thinkvl with its test extras and runs the test suite offline. The README's test command
# and CI (.ci/run) both call this script, so they cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
