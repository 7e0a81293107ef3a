"""Leaving eager PyTorch: models built from configs for export and FLOP counting, ONNX export
with dynamic sizes and its check in onnxruntime. Used by ``tools/export.py`` and
``tools/get_flops.py``; imports mmengine and the toolkits, never the backbone's internals."""
from .flops import model_complexity
from .model import ExportGraph, build_model, example_input, load_config
from .onnx import EXPORTERS, OutputCheck, compare_onnx, export_onnx, graph_report

__all__ = ['EXPORTERS', 'ExportGraph', 'OutputCheck', 'build_model', 'compare_onnx',
           'example_input', 'export_onnx', 'graph_report', 'load_config', 'model_complexity']
