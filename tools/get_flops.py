#!/usr/bin/env python
"""FLOPs and parameters of a detector (mmdet) or segmentor (mmseg) built from a config.

    python tools/get_flops.py CONFIG [--shape H W] [--cfg-options KEY=VALUE ...]

Counted by mmengine's get_model_complexity_info on the model's tensor forward, as the toolkits'
own tools/analysis_tools/get_flops.py do; the table lists each module. The input is padded to the
data preprocessor's size divisor first (the printed input shape says so).
"""
import argparse
import sys

from mmengine.config import DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='FLOPs and parameters of a config\'s model')
    parser.add_argument('config', help='an mmdet or mmseg config')
    parser.add_argument('--shape', type=int, nargs='+', default=[1280, 800],
                        help='input size H W (or one side for a square; default 1280 800)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, KEY=VALUE')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.shape) not in (1, 2):
        raise SystemExit(f'--shape takes H W or one side, got {args.shape}')
    shape = args.shape * 2 if len(args.shape) == 1 else args.shape
    from swin_dense import deploy

    cfg = deploy.load_config(args.config, args.cfg_options)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='no checkpoint given')
        model = deploy.build_model(cfg)
    result = deploy.model_complexity(model, cfg.default_scope, shape)
    line = '=' * 30
    print(result['out_table'])
    print(f'{line}\nInput shape: {result["input_shape"]}\nFlops: {result["flops_str"]}\n'
          f'Params: {result["params_str"]}\n{line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
