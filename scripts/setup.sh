#!/usr/bin/env bash
# Create .venv (if missing) with torch and gradsign installed in editable mode, plus the test extras.
# torch: an already installed torch is kept. Otherwise $TORCH_SPEC is installed (default torch==2.13.0;
# for a CPU-only build from PyTorch's own index set
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
pip install -q -e ".[test]"
