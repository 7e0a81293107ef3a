"""The benchmark's onnxruntime rows: a backbone exported to ONNX with dynamic batch, height and
width, run by an ``onnxruntime.InferenceSession`` on the CPU with a stated thread count.

Export failures are returned as a message, not raised: the eager rows stand on their own, and
the results file says why the onnxruntime rows are missing.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

EXPORTER = 'dynamo'


def available() -> bool:
    """Whether onnxruntime (and the exporter's onnx / onnxscript) can be imported."""
    return all(importlib.util.find_spec(name) is not None
               for name in ('onnxruntime', 'onnx', 'onnxscript'))


def version() -> Optional[str]:
    if importlib.util.find_spec('onnxruntime') is None:
        return None
    import onnxruntime
    return onnxruntime.__version__


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, and of its cause (where the exporter wraps the real
    failure in a generic one)."""
    parts = []
    while error is not None and len(parts) < 2:
        text = re.sub(r'\x1b\[[0-9;]*m', '', str(error)).strip()  # the exporter colours text
        line = text.splitlines()[0].removesuffix(' Next steps:') if text else ''
        parts.append(f'{type(error).__name__}: {line[:240]}' if line else type(error).__name__)
        error = error.__cause__
    return '; caused by '.join(parts)


def export(module: nn.Module, example: Tensor, path: str) -> Optional[str]:
    """Export ``module`` (eval mode, one image batch in) to ``path`` with dynamic batch, height
    and width. Returns ``None`` on success, else a one-line reason.

    The exporter's progress messages are kept off the benchmark's output."""
    from swin_dense.deploy import export_onnx

    was_training = module.training
    module.eval()
    chatter = io.StringIO()
    exporter_log = logging.getLogger('torch.onnx')
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            export_onnx(module, example, path, dynamic=True,
                        exporter=EXPORTER)
    except Exception as error:  # any exporter failure leaves the eager rows intact
        return f'export of {type(module).__name__} to ONNX failed ({_first_line(error)})'
    finally:
        exporter_log.setLevel(level)
        module.train(was_training)
    return None


def session(path: str, threads: int, spinning: bool = True):
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads (one inter-op
    thread: the graph is one chain).

    ``spinning=False`` stops its threads from busy-waiting after each run (onnxruntime's
    default is to spin): a session that shares its process with the eager models must not take
    their cores while they are timed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def runner(sess, x: Tensor) -> Callable[[], list]:
    """A no-argument call that runs ``sess`` on ``x`` (converted once, outside the timing)."""
    feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}

    def run():
        return sess.run(None, feed)
    return run


def max_abs_diff(sess, module: nn.Module, x: Tensor) -> float:
    """Largest difference between the session's outputs and ``module``'s eager outputs."""
    got = runner(sess, x)()
    with torch.no_grad():
        module.eval()
        want = module(x)
    want = tuple(want) if isinstance(want, (tuple, list)) else (want,)
    if len(got) != len(want):
        raise ValueError(f'the ONNX model has {len(got)} outputs, the eager model {len(want)}')
    return max((torch.from_numpy(a).double() - b.double()).abs().max().item()
               for a, b in zip(got, want))
