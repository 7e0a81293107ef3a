#!/usr/bin/env bash
# One-command set-up of the whole stack for swin_dense, into the active Python environment
# (make a fresh virtual environment first: python3.11 -m venv .venv && . .venv/bin/activate).
#
#   bash tools/setup_env.sh
#
# Every version comes from requirements/constraints.txt (tested together; README, "Set up").
# Installs torch 2.13.0 (a torch that already imports is kept, e.g. a CUDA build), builds mmcv
# 2.1.0 with its compiled ops from source (no wheel exists for current torch; pip keeps the built
# wheel in its cache, so a second environment reuses it), then mmengine, mmdet, mmsegmentation,
# onnx/onnxruntime, pytest and swin_dense itself in editable mode. Idempotent: a step whose result
# already imports is skipped. Ends by importing what the tools and tests import and building a
# SwinBackbone; any failure stops the script with the cause.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
CONSTRAINTS=requirements/constraints.txt
PIP=("$PY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")
has() { "$PY" -c "$1" >/dev/null 2>&1; }
step() { printf '\n[setup] %s\n' "$*"; }
die() { printf '\n[setup] FAILED: %s\n' "$*" >&2; exit 1; }
start=$(date +%s)

"$PY" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' \
  || die "Python >= 3.9 is needed (tested: 3.11); got $("$PY" --version 2>&1)"

if has "import torch"; then
  version=$("$PY" -c 'import torch; print(torch.__version__)')
  step "torch $version already installed: kept"
  case "$version" in 2.13.0*) ;; *) step "note: the pins were tested with torch 2.13.0, not $version";; esac
else
  step "installing torch (pinned)"
  "${PIP[@]}" torch
fi

# mmcv's setup.py imports pkg_resources and the installed torch (hence no build isolation);
# the pinned setuptools still ships pkg_resources (mmengine imports it at run time too).
step "build tools (pinned setuptools, wheel, ninja)"
"${PIP[@]}" setuptools wheel ninja

if has "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'"; then
  step "mmcv 2.1.0 with ops already installed: kept"
else
  step "building mmcv 2.1.0 with its ops against the installed torch (10-25 min on 2 cores, once)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" --no-build-isolation mmcv
fi

step "mmengine, mmdet, mmsegmentation, onnx/onnxruntime, pytest; swin_dense (editable)"
"${PIP[@]}" -r requirements/runtime.txt -r requirements/tests.txt
"${PIP[@]}" --no-build-isolation --no-deps -e .

step "checking what the tools and tests import"
"$PY" - <<'PY' || die "the stack does not work (the error above says which part)"
import importlib
import sys

for name in ('torch', 'mmengine.runner', 'mmcv.ops', 'mmdet.apis', 'mmseg.apis', 'onnx',
             'onnxruntime', 'pytest', 'swin_dense'):
    try:
        importlib.import_module(name)
    except Exception as error:  # report the cause, not only the name
        sys.exit(f'[setup] import {name} failed: {type(error).__name__}: {error}')

import mmcv
import mmdet
import mmengine
import mmseg
import torch

import swin_dense
from swin_dense import SwinBackbone

model = SwinBackbone(arch='tiny').eval()
with torch.no_grad():
    shapes = [tuple(f.shape) for f in model(torch.zeros(1, 3, 64, 96))]
assert shapes == [(1, 96, 16, 24), (1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)], shapes
print(f'[setup] ok: torch {torch.__version__}, mmengine {mmengine.__version__}, '
      f'mmcv {mmcv.__version__} (ops), mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, '
      f'swin_dense {swin_dense.__version__}; SwinBackbone(arch="tiny") -> {shapes}')
PY
echo "[setup] done in $(( $(date +%s) - start )) s"
