#!/usr/bin/env bash
# Builds the PEER environment: a separate Python 3.11 virtual environment with the Swin V2
# implementations that swin_dense's V2 fixtures come from (timm, torchvision, mmpretrain).
# It is not the product's environment (tools/setup_env.sh builds that one) and the default test
# suite does not need it: it reads the fixture files tests/fixtures/v2/make_v2_fixtures.py wrote
# with these libraries. Use it to regenerate or re-check those files:
#
#   bash tools/peer_env.sh [DIR]          # default DIR: .peer-venv (git-ignored)
#   DIR/bin/python tests/fixtures/v2/make_v2_fixtures.py [--check]
#
# Versions: requirements/peers.txt (applied with -c to every pip call). A separate environment
# because mmpretrain imports torchvision, and the torchvision that pairs with the product's torch
# 2.13 (0.28) fails at its compiled ops ("operator torchvision::nms does not exist"); torch
# 2.14.1 + torchvision 0.29.1 work. The torch wheel brings CUDA libraries: about 6 GB installed.
# mmpretrain 1.2.0 goes in with --no-deps (its requirements want a compiled mmcv; mmcv-lite is
# enough for its Swin V2 backbone), followed by the small packages its import needs.
# Idempotent: an environment that already passes the final check is left as it is.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.peer-venv}
case "$DIR" in /*) ;; *) DIR=$PWD/$DIR ;; esac
PY=${PYTHON:-python3.11}
CONSTRAINTS=$ROOT/requirements/peers.txt
step() { printf '\n[peer_env] %s\n' "$*"; }
die() { printf '\n[peer_env] FAILED: %s\n' "$*" >&2; exit 1; }

check() {  # imports the three peers, builds each Swin V2 small and runs it on the CPU
  "$DIR/bin/python" -W ignore - <<'PY'
import sys

import torch

try:
    import mmcv
    import mmengine
    import mmpretrain
    import timm
    import torchvision
    from mmpretrain.models.backbones import SwinTransformerV2 as MMPretrainV2
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmV2
    from torchvision.models import swin_transformer as tv
except Exception as error:  # say which import failed and why
    sys.exit(f'[peer_env] import failed: {type(error).__name__}: {error}')

want = dict(torch='2.14.1', torchvision='0.29.1', timm='1.0.31', mmengine='0.10.7',
            mmcv='2.1.0', mmpretrain='1.2.0')
have = dict(torch=torch.__version__, torchvision=torchvision.__version__,
            timm=timm.__version__, mmengine=mmengine.__version__, mmcv=mmcv.__version__,
            mmpretrain=mmpretrain.__version__)
wrong = {k: have[k] for k in want if not have[k].split('+')[0] == want[k]}
if wrong:
    sys.exit(f'[peer_env] versions differ from requirements/peers.txt: {wrong}')

x = torch.randn(1, 3, 64, 96)
small = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
with torch.no_grad():
    timm_model = TimmV2(img_size=64, window_size=4, always_partition=True,
                        strict_img_size=False, num_classes=0, **small).eval()
    timm_out = timm_model.forward_intermediates(x, intermediates_only=True)
    tv_model = tv.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2, 2, 2],
                                  num_heads=[1, 2, 4, 8], window_size=[4, 4], num_classes=10,
                                  block=tv.SwinTransformerBlockV2,
                                  downsample_layer=tv.PatchMergingV2).eval()
    tv_out = tv_model(x)
    mmp = MMPretrainV2(arch=dict(embed_dims=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                 extra_norm_every_n_blocks=0), img_size=64, window_size=4,
                       pad_small_map=True, out_indices=(0, 1, 2, 3))
    mmp.eval()
    mmp_out = mmp(torch.randn(1, 3, 50, 70))
    assert [tuple(t.shape) for t in timm_out] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 32, 4, 6),
                                                  (1, 64, 2, 3)]
    assert tuple(tv_out.shape) == (1, 10)
    assert [tuple(t.shape) for t in mmp_out] == [(1, 8, 13, 18), (1, 16, 7, 9), (1, 32, 4, 5),
                                                 (1, 64, 2, 3)]
    ops = torchvision.ops.nms(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10]]),
                              torch.tensor([0.9, 0.8]), 0.5)
print('[peer_env] ok: ' + ', '.join(f'{k} {v}' for k, v in have.items())
      + '; timm swinv2, torchvision swin v2, mmpretrain SwinTransformerV2 and '
        f'torchvision.ops ({ops.tolist()}) run on the CPU')
PY
}

if [ -x "$DIR/bin/python" ] && check >/dev/null 2>&1; then
  step "$DIR already passes the check: kept"
  check
  exit 0
fi

"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "Python 3.11 is needed (set PYTHON=...); got $("$PY" --version 2>&1)"
if [ ! -x "$DIR/bin/python" ]; then
  step "creating the virtual environment $DIR"
  "$PY" -m venv "$DIR"
fi
PIP=("$DIR/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")

step "torch, torchvision, timm, mmengine, mmcv-lite, safetensors (6 GB: CUDA libraries)"
"${PIP[@]}" torch torchvision timm mmengine mmcv-lite safetensors setuptools
step "mmpretrain without its dependencies, then what its import needs"
"${PIP[@]}" --no-deps mmpretrain
"${PIP[@]}" importlib_metadata lazy-importer mat4py ordered-set click Markdown einops \
  modelindex model-index
"$DIR/bin/python" -m pip check || die "pip check found broken requirements (see above)"

step "checking the peers"
check || die "the peer environment does not work (the error above says which part)"
