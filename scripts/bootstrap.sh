#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a venv, PyTorch (CPU build where no GPU is
# present), and fl-app with its dev extras. `make run` and `make test` call this
# first; it returns at once when nothing changed since the last install.
#
#   PYTHON=python3.11        interpreter used to create the venv
#   FL_APP_VENV=.venv        where the venv lives
#   FL_APP_TORCH=torch==2.13.0   what to install for torch when none is present
#   FL_APP_TORCH_INDEX=URL   an extra package index for torch (e.g. PyTorch's CPU
#                            wheel index on machines whose default torch is CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${FL_APP_VENV:-.venv}
STAMP="$VENV/.fl-app-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VPY" -c "import fl_app, torch" 2>/dev/null; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" 2>/dev/null; then
  extra=()
  if [ -n "${FL_APP_TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$FL_APP_TORCH_INDEX"); fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=${FL_APP_TORCH:-torch}
    echo "[bootstrap] GPU found: installing $spec"
  else
    spec=${FL_APP_TORCH:-torch==2.13.0}
    echo "[bootstrap] no GPU: installing $spec (CPU build)"
  fi
  "$VPY" -m pip install --quiet "${extra[@]}" "$spec"
fi

echo "[bootstrap] installing fl-app (editable) with dev and synth extras"
"$VPY" -m pip install --quiet -e ".[dev,synth]"
# `fl-app synth` (docs/synthetic-data.md): smartnoise-synth without its declared pins
# (opacus<0.15, pandas<3), which would downgrade Opacus and pandas; the synth extra above
# holds what its MST/AIM path imports. tests/test_synth.py's slow test runs MST.
"$VPY" -m pip install --quiet --no-deps "smartnoise-synth==1.0.8" "smartnoise-sql==1.0.10"
echo "$want" > "$STAMP"
echo "[bootstrap] ready: $VENV"
