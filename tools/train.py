#!/usr/bin/env python
"""Train a detector (mmdet) or segmentor (mmseg) config; the toolkit follows default_scope.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--auto-scale-lr]
                                 [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

Same options as mmdet 3.3.0's tools/train.py. Works from any working directory (relative paths
in the config, such as data_root and work_dirs, are relative to the working directory).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from swin_dense import launch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector or a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='If specify checkpoint path, resume from it, while if not specify, try to auto '
        'resume from the latest checkpoint in the work directory.')
    launch.add_launch_arguments(parser)
    return launch.parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    launch.train(args.config, work_dir=args.work_dir, amp=args.amp,
                 auto_scale_lr=args.auto_scale_lr, resume=args.resume,
                 cfg_options=args.cfg_options, launcher=args.launcher)


if __name__ == '__main__':
    sys.exit(launch.run_tool(main))
