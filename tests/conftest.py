"""What every test module shares.

- Each test module starts with the default scope (mmengine's ``DefaultScope``) it found:
  mmdet's ``init_detector``, mmseg's ``init_model`` and the tools set one for the whole process,
  and a registry lookup in a later module would otherwise resolve in the wrong toolkit.
- Helpers several test files import live beside this file: ``numerics`` (error measures),
  ``tool_runs`` (running the tools in a subprocess, the tiny detector overrides, the losses a
  run logs in ``scalars.json``) and ``swin_peers`` (randomised weights and the peers' models);
  ``pytest.ini`` puts this folder and the repository root on ``sys.path``.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope='module')
def _module_keeps_the_default_scope():
    from mmengine.registry import DefaultScope

    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
