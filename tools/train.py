#!/usr/bin/env python
"""Train a detector (mmdet) or segmentor (mmseg) config; the toolkit follows default_scope.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--auto-scale-lr]
                                 [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

Same options as mmdet 3.3.0's tools/train.py, from any working directory, with swin_dense
installed (relative paths in the config, such as data_root and work_dirs, are relative to the
working directory). Every run gets crash-safe checkpoints and exact resume: the config's
CheckpointHook becomes AtomicCheckpointHook and ResumeRandomStateHook joins custom_hooks.
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
