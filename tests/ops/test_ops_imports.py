"""Imports run one way: ops (torch only) <- layers <- backbone; inside ops, each module imports
only the ones before it."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / 'swin_dense'
OPS_ORDER = ['window', 'continuous_bias', 'attention', 'gemm', 'chunked_attention',
             'token_attention', 'cpu_fast', 'cpu_fast_v2']
STDLIB = {'__future__', 'contextlib', 'dataclasses', 'functools', 'math', 'os', 'time', 'typing'}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(absolute top-level packages, package-relative modules) that ``path`` imports, function
    bodies included."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module.split('.')[0])
            elif node.module:
                relative.add(node.module)
            else:
                relative |= {alias.name for alias in node.names}
    return absolute, relative


@pytest.mark.parametrize('name', OPS_ORDER)
def test_ops_import_torch_and_earlier_ops_only(name):
    absolute, relative = imports(PACKAGE / 'ops' / f'{name}.py')
    assert absolute <= STDLIB | {'torch'}, absolute
    assert relative <= set(OPS_ORDER[:OPS_ORDER.index(name)]), relative


#: What each module above ops/ may import from the package (top-level names).
LAYERS_ORDER = {
    'layers': {'ops'},
    'layers_v2': {'ops', 'layers'},
    'pyramid': {'arch', 'layers', 'checkpoint'},
    'backbone': {'arch', 'layers', 'pyramid', 'checkpoint'},
    'backbone_v2': {'arch', 'ops', 'layers', 'layers_v2', 'pyramid', 'checkpoint'},
}


@pytest.mark.parametrize('name', sorted(LAYERS_ORDER))
def test_layers_then_backbones(name):
    """Layers import ops (the V2 layers also the V1 ones), backbones import layers; nothing
    imports a backbone."""
    path = PACKAGE / f'{name}.py'
    if not path.exists():
        pytest.skip(f'{name}.py not written yet')
    absolute, relative = imports(path)
    allowed = STDLIB | {'torch', 'math'}
    if not name.startswith('layers'):  # the backbones are mmengine modules; layers are torch only
        allowed |= {'mmengine', 'warnings', 'difflib', 'inspect'}
    assert absolute <= allowed, absolute
    assert {m.split('.')[0] for m in relative} <= LAYERS_ORDER[name], relative
