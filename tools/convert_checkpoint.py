#!/usr/bin/env python
"""Convert a Swin Transformer checkpoint of any supported layout to swin_dense's native layout.

    python tools/convert_checkpoint.py SRC DST [--arch tiny|small|base|large] [--window-size N]
                                       [--prefix P] [--trust-pickle]

Supported sources: microsoft/Swin-Transformer (classification, 1K or 22K head), the official
detection / segmentation repos, mmdet / mmseg / mmpretrain files, timm >= 0.9, torchvision.
Swin V2 sources (official swinv2_*, timm swinv2_*, torchvision swin_v2_*, mmpretrain
SwinTransformerV2, SimMIM) are written in SwinV2Backbone's layout.
DST ending in ``.safetensors`` gets a safetensors file, anything else ``{'state_dict': ...}``.
Without ``--arch`` the shape is taken from SRC; ``--window-size`` resizes the relative-position
tables (e.g. 7 -> 12), or for Swin V2 rebuilds the coordinate tables for the new window (one
value, or one per stage: ``--window-size 16,16,16,8``) keeping the pretrained window of SRC.
Prints what was loaded, converted, resized and left out.

Whole detector / segmentor files (the official repositories' ``mask_rcnn_swin_*``,
``cascade_mask_rcnn_swin_*``, ``upernet_swin_*``, or the mmdet / mmseg model zoos') need no
conversion: tools/test.py, ``load_from``, ``init_detector`` and ``init_model`` convert their
backbone keys while loading. Given such a file, this tool writes its backbone alone.
"""
from __future__ import annotations

import argparse
import sys


def _import_converter():
    """``convert_checkpoint`` of the installed package (importing swin_dense also registers
    SwinBackbone, which the conversion builds through mmengine's registry)."""
    try:
        from swin_dense.checkpoint import convert_checkpoint
    except ImportError as e:
        raise SystemExit(f'error: swin_dense is not importable ({e}); install it with '
                         '`pip install -e .` from the repository root (or bash tools/setup_env.sh)')
    return convert_checkpoint


def _window_size(text: str):
    """``12`` -> 12; ``16,16,16,8`` -> [16, 16, 16, 8] (Swin V2: one window per stage)."""
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an int or ints separated by commas, got '
                                         f'{text!r}') from None
    return values[0] if len(values) == 1 else values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a Swin Transformer checkpoint (official, official detection, mmdet, '
                    'mmseg, mmpretrain, timm, torchvision) to the swin_dense / mmdet layout.')
    parser.add_argument('src', help='source checkpoint (.pth, .pth.tar, .bin, .safetensors)')
    parser.add_argument('dst', help='output file; .safetensors or a torch file')
    parser.add_argument('--arch', choices=['tiny', 'small', 'base', 'large'],
                        help='target variant (default: inferred from SRC)')
    parser.add_argument('--window-size', type=_window_size, default=None,
                        help='target window (default: that of SRC); V1 tables are resized '
                             'bicubically, V2 coordinate tables rebuilt; V2 also takes one per '
                             'stage, e.g. 16,16,16,8')
    parser.add_argument('--prefix', default=None,
                        help="keep only the keys under this prefix (e.g. 'backbone.')")
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow arbitrary pickled objects in SRC (trusted files only)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    convert_checkpoint = _import_converter()
    try:
        report = convert_checkpoint(
            args.src, args.dst, args.arch, window_size=args.window_size, prefix=args.prefix,
            trust_pickle=args.trust_pickle, logger='silent')
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
