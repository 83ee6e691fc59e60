#!/usr/bin/env bash
# Creates (or reuses) a venv with PyTorch 2.9.0 for the `tch` feature and the fixture script.
# Usage: scripts/setup-torch.sh [VENV_DIR]   (default: .venv)
set -euo pipefail
VENV="${1:-.venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.9.0")' 2>/dev/null; then
  echo "reusing $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.9.0
"$VENV/bin/python" -c 'import torch; print("installed torch", torch.__version__)'
