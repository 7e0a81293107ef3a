"""Export a module to ONNX with dynamic batch, height and width, and check the file in
onnxruntime against PyTorch.

Both of torch's exporters are supported: ``dynamo`` (``torch.export`` underneath, the default of
current torch) and ``torchscript`` (tracing). The backbone's plain path, which every non-eager
client takes, computes paddings, shift masks and crops from the symbolic sizes, so one file
serves every input size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

EXPORTERS = ('dynamo', 'torchscript')
#: Relative error (Frobenius, per output) under which onnxruntime agrees with PyTorch.
DEFAULT_RTOL = 1e-4


def export_onnx(module: nn.Module, example: Tensor, path: str, *, dynamic: bool = True,
                exporter: str = 'dynamo', output_names: Optional[Sequence[str]] = None,
                opset: Optional[int] = None) -> None:
    """Write ``module(example)`` as an ONNX file.

    Args:
        module: in eval mode; takes one image batch ``(B, 3, H, W)``.
        example: the batch the export traces with (with ``dynamic``, its sides should give the
            last stage more than one window per side, e.g. 512: the backbone warns otherwise).
        path: the ``.onnx`` file to write (its folder is created).
        dynamic: batch, height and width are dynamic axes (else the file is for that shape).
        exporter: ``'dynamo'`` or ``'torchscript'``.
        output_names: names of the outputs in order (default ``out0``, ``out1``, ...).
        opset: ONNX opset (default: the exporter's).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    if dynamic and example.shape[0] == 1:
        # torch.export specialises a dimension that is 1 in the example: trace with two images
        example = torch.cat([example, example])
    with torch.no_grad():
        num_outputs = len(_as_tuple(module(example)))
    names = list(output_names or [f'out{i}' for i in range(num_outputs)])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kwargs = dict(input_names=['image'], output_names=names)
    if opset is not None:
        kwargs['opset_version'] = opset
    if exporter == 'dynamo':
        shapes = None
        if dynamic:
            dim = torch.export.Dim
            # positional, so that any forward(x) signature works
            shapes = ({0: dim('batch', min=1), 2: dim('height', min=1),
                       3: dim('width', min=1)},)
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=shapes,
                                    **kwargs)
        program.save(path)
        return
    axes = None
    if dynamic:
        axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
        axes.update({name: {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'}
                     for name in names})
    torch.onnx.export(module, (example,), path, dynamo=False, dynamic_axes=axes, **kwargs)


@dataclass(frozen=True)
class OutputCheck:
    """How one output of the ONNX file compares with PyTorch's."""

    name: str
    shape: tuple
    max_abs: float
    rel: float


def compare_onnx(path: str, module: nn.Module, inputs: Tensor,
                 threads: Optional[int] = None) -> list[OutputCheck]:
    """Run the file in onnxruntime (CPU) and ``module`` in PyTorch on ``inputs``; compare each
    output. A shape mismatch is an error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    with torch.no_grad():
        want = _as_tuple(module(inputs))
    if len(got) != len(want):
        raise ValueError(f'{path} has {len(got)} outputs, the model {len(want)}')
    checks = []
    for meta, a, b in zip(session.get_outputs(), got, want):
        a = torch.from_numpy(a)
        if a.shape != b.shape:
            raise ValueError(f'{path}: output {meta.name} has shape {tuple(a.shape)} in '
                             f'onnxruntime, {tuple(b.shape)} in PyTorch, for input '
                             f'{tuple(inputs.shape)}')
        diff = (a.double() - b.double())
        rel = (diff.norm() / b.double().norm().clamp_min(1e-30)).item()
        checks.append(OutputCheck(meta.name, tuple(b.shape), diff.abs().max().item(), rel))
    return checks


def graph_report(path: str) -> dict:
    """What a deployer checks first: the full ONNX checker, the op domains and control flow.

    Returns ``dict(domains=..., control_flow=[op types], num_nodes=N)``; the checker raises on
    an invalid file."""
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    nodes = list(model.graph.node)
    for function in model.functions:  # the dynamo exporter may leave local functions
        nodes.extend(function.node)
    return dict(domains=sorted({n.domain or 'ai.onnx' for n in nodes}),
                control_flow=sorted({n.op_type for n in nodes if n.op_type in ('If', 'Loop',
                                                                              'Scan')}),
                num_nodes=len(nodes))


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
