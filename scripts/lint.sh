#!/usr/bin/env bash
# ruff and mypy on the packages. mypy reads the installed layout (mlpfuse.stages, ...) through a
# tree of symlinks under build/typecheck/, since it does not follow pyproject's package-dir.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check mlpfuse stages orchestrator cluster examples
T=build/typecheck
rm -rf "$T" && mkdir -p "$T/mlpfuse"
for f in mlpfuse/*; do ln -s "$PWD/$f" "$T/mlpfuse/$(basename "$f")"; done
for d in stages orchestrator cluster examples; do ln -s "$PWD/$d" "$T/mlpfuse/$d"; done
cd "$T" && ../../.venv/bin/mypy -p mlpfuse
