#!/usr/bin/env python
"""Export a segmentor (image -> per-class logits) or a detector's backbone + neck (image ->
feature maps) from an mmseg / mmdet config to ONNX, and check the file in onnxruntime.

    python tools/export.py CONFIG [CHECKPOINT] --out FILE.onnx [--shape H W] [--dynamic]
                           [--exporter {dynamo,torchscript}] [--opset N]
                           [--verify-shape H W] [--cfg-options KEY=VALUE ...]

The graph takes a float image batch (B, 3, H, W) in the pixel range and channel order the
config's pipeline loads (0-255, BGR) and normalises it as the model's data preprocessor does.
With --dynamic, batch, height and width are dynamic axes. Before reporting success the file is
run in onnxruntime on a second input (another size and batch 2 when dynamic) and compared with
PyTorch; the tool exits 1 if an output differs by more than --rtol (relative, per output).
"""
import argparse
import sys

from mmengine.config import DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an mmdet or mmseg config')
    parser.add_argument('checkpoint', nargs='?', help='trained weights (default: random weights, '
                        'to check the export only)')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--shape', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'),
                        help='input size used to export (default 512 512)')
    parser.add_argument('--dynamic', action='store_true', help='dynamic batch, height, width')
    parser.add_argument('--exporter', choices=['dynamo', 'torchscript'], default='dynamo',
                        help="torch.onnx.export's dynamo=True (default) or the TorchScript one")
    parser.add_argument('--opset', type=int, help='ONNX opset (default: the exporter\'s)')
    parser.add_argument('--verify-shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size of the check (default: --shape + (96, 160) when '
                        '--dynamic, else --shape)')
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help='largest relative difference accepted per output (default 1e-4)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, KEY=VALUE')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from swin_dense import deploy

    cfg = deploy.load_config(args.config, args.cfg_options)
    model = deploy.build_model(cfg, args.checkpoint)
    graph = deploy.ExportGraph(model, cfg.default_scope).eval()
    example = deploy.example_input(args.shape)
    num_outputs = len(graph(example)) if graph.task == 'features' else 1
    deploy.export_onnx(graph, example, args.out, dynamic=args.dynamic, exporter=args.exporter,
                       output_names=graph.output_names(num_outputs), opset=args.opset)
    report = deploy.graph_report(args.out)
    print(f'wrote {args.out}: {report["num_nodes"]} nodes, domains {report["domains"]}, '
          f'control flow {report["control_flow"] or "none"}')

    if args.verify_shape:
        verify = args.verify_shape
    else:
        verify = [args.shape[0] + 96, args.shape[1] + 160] if args.dynamic else args.shape
    inputs = deploy.example_input(verify, batch=2 if args.dynamic else 1, seed=1)
    worst = 0.0
    for check in deploy.compare_onnx(args.out, graph, inputs):
        worst = max(worst, check.rel)
        print(f'  {check.name} {check.shape}: max abs diff {check.max_abs:.3g}, '
              f'relative {check.rel:.3g}')
    if worst > args.rtol:
        print(f'FAILED: onnxruntime differs from PyTorch by {worst:.3g} (relative) at input '
              f'{tuple(inputs.shape)}, above --rtol {args.rtol}', file=sys.stderr)
        return 1
    print(f'ok: onnxruntime equals PyTorch within {args.rtol} at input {tuple(inputs.shape)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
