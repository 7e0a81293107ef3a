#!/usr/bin/env python
"""Test (and evaluate) a detector (mmdet) or segmentor (mmseg); the toolkit follows default_scope.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show]
                         [--show-dir DIR] [--wait-time S] [--cfg-options KEY=VALUE ...]
                         [--launcher {none,pytorch,slurm,mpi}] [--tta]

Same options as mmdet 3.3.0's / mmseg 1.2.2's tools/test.py. --out: a .pkl of the predictions
(mmdet) or a directory of predicted label maps (mmseg). --show-dir: painted images, under
WORK_DIR/TIMESTAMP/ when relative (mmdet) or in that directory (mmseg).
"""
import argparse
import sys

try:
    from swin_dense import launch
except ModuleNotFoundError as error:  # the tools use the installed package
    if error.name != 'swin_dense':
        raise
    sys.exit('error: swin_dense is not importable in this Python environment: install it with '
             '`pip install -e .` in the repository (bash tools/setup_env.sh installs the whole '
             'stack), or put the repository on PYTHONPATH')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a detector or a segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir',
                        help='the directory to save the file containing evaluation metrics')
    parser.add_argument('--out', type=str,
                        help='dump predictions to a pickle file for offline evaluation (mmdet), '
                        'or the directory to save predicted label maps in (mmseg)')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir',
                        help='directory where painted images will be saved. If specified, it '
                        'will be automatically saved to the work_dir/timestamp/show_dir')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    launch.add_launch_arguments(parser)
    return launch.parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    launch.test(args.config, args.checkpoint, work_dir=args.work_dir, out=args.out,
                show=args.show, show_dir=args.show_dir, wait_time=args.wait_time,
                cfg_options=args.cfg_options, launcher=args.launcher, tta=args.tta)


if __name__ == '__main__':
    sys.exit(launch.run_tool(main))
