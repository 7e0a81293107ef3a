#!/usr/bin/env bash
# One-command set-up of the whole stack for swin_dense, into the active Python environment.
#
#   bash tools/setup_env.sh
#
# Installs torch (2.13.0, kept as it is when a torch is already importable), mmengine 0.10.7,
# mmcv 2.1.0 built from source with its compiled ops (no wheel exists for current torch; pip keeps
# the built wheel in its cache, so a second environment reuses it), mmdet 3.3.0,
# mmsegmentation 1.2.2, their run-time needs, and swin_dense itself in editable mode.
# Idempotent: a step whose result already imports is skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
PIP=("$PY" -m pip install --disable-pip-version-check)
has() { "$PY" -c "$1" >/dev/null 2>&1; }
step() { printf '\n[setup] %s\n' "$*"; }
start=$(date +%s)

if has "import torch"; then
  step "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: kept"
else
  step "installing torch 2.13.0"
  "${PIP[@]}" "torch==2.13.0"
fi

if has "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'"; then
  step "mmcv 2.1.0 with ops already installed: kept"
else
  # mmcv's setup.py needs pkg_resources (setuptools < 70) and the installed torch (hence no build
  # isolation); ninja compiles in parallel. pip caches the built wheel for the next environment.
  step "building mmcv 2.1.0 with its ops against the installed torch (10-25 min on 2 cores, once)"
  "${PIP[@]}" "setuptools<70" wheel ninja
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" --no-build-isolation "mmcv==2.1.0"
  "$PY" -c "import mmcv.ops" || { echo "[setup] mmcv.ops does not import after the build" >&2; exit 1; }
  # Back to the setuptools that torch declares (>= 77); pkg_resources was only needed to build.
  "${PIP[@]}" "setuptools>=77.0.3"
fi

step "mmengine, mmdet, mmsegmentation and their run-time needs; swin_dense (editable)"
"${PIP[@]}" -r requirements.txt
"${PIP[@]}" --no-build-isolation --no-deps -e .

"$PY" - <<'PY'
import torch, mmengine, mmcv, mmcv.ops, mmdet, mmseg, swin_dense
print(f"[setup] ok: torch {torch.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__} (ops), "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, swin_dense {swin_dense.__version__}")
PY
echo "[setup] done in $(( $(date +%s) - start )) s"
