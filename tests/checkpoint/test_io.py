"""Reading checkpoint files safely: weights-only unpickling that still reads mmengine's own
checkpoints, clear errors for missing, truncated, unsafe files and URLs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from swin_dense import SwinBackbone
from swin_dense.checkpoint import (UnsafeCheckpointError, load_pretrained, read_checkpoint,
                                   register_mmengine_safe_globals)
from swin_reference import (SMALL, assert_close, features, image, official,  # noqa: F401
                            reference, small_model)


def test_truncated_and_missing_file(tmp_path, official):
    path = tmp_path / 'full.pth'
    torch.save({'model': official}, path)
    data = path.read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r'cut\.pth.*truncated'):
        read_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        read_checkpoint(tmp_path / 'nowhere.pth')
    model = SwinBackbone(**SMALL, init_cfg=dict(type='Pretrained',
                                                checkpoint=str(tmp_path / 'nowhere.pth')))
    with pytest.raises(FileNotFoundError):
        model.init_weights()


class Arbitrary:
    """Stands for any class a pickle could instantiate."""

    def __init__(self):
        self.payload = 'not tensor data'


def test_arbitrary_pickle_refused_unless_trusted(tmp_path, official, image, reference):
    path = tmp_path / 'legacy.pth'
    torch.save({'model': official, 'config': Arbitrary()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pretrained(small_model(), path)
    msg = str(info.value)
    assert 'Arbitrary' in msg and 'legacy.pth' in msg and 'trust_pickle=True' in msg
    assert isinstance(info.value, ValueError)
    with pytest.warns(UserWarning, match='arbitrary code'):
        report = load_pretrained(small_model(), path, trust_pickle=True)
    assert report.format == 'official'
    # the opt-in through init_cfg
    model = SwinBackbone(**SMALL, drop_path_rate=0.0,
                         init_cfg=dict(type='Pretrained', checkpoint=str(path), trust_pickle=True))
    with pytest.warns(UserWarning):
        model.init_weights()
    assert_close(features(model.eval(), image), reference)


def test_mmengine_runner_checkpoint_loads_weights_only(tmp_path, image):
    """A real mmengine Runner checkpoint: meta, message_hub (HistoryBuffer), optimizer state."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Detector(BaseModel):
        def __init__(self):
            super().__init__()
            self.backbone = SwinBackbone(**SMALL, drop_path_rate=0.0)
            self.neck = torch.nn.Linear(256, 4)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            out = self.neck(self.backbone(inputs)[-1].mean((2, 3)))
            return dict(loss=out.pow(2).mean()) if mode == 'loss' else out

    class Data(torch.utils.data.Dataset):
        metainfo = dict(classes=('a', 'b'))

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return dict(inputs=torch.randn(3, 32, 32))

    runner = Runner(
        model=Detector(), work_dir=str(tmp_path / 'work'),
        train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2)],
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1), logger=None),
        randomness=dict(seed=0), default_scope=None)
    runner.train()
    path = tmp_path / 'work' / 'epoch_1.pth'
    raw = read_checkpoint(path)  # weights_only, with mmengine's data types allow-listed
    assert {'meta', 'message_hub', 'optimizer', 'param_schedulers'} <= set(raw)
    model = SwinBackbone(**SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    trained = runner.model.backbone.eval()
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    report = load_pretrained(SwinBackbone(**SMALL), path)
    assert report.format == 'native' and not report.missing  # own norms are trained and loaded
    # mmengine's own loader (resume) with torch's weights_only default, once registered
    from mmengine.runner.checkpoint import _load_checkpoint
    saved = torch.serialization.get_safe_globals()
    try:
        register_mmengine_safe_globals()
        assert 'message_hub' in _load_checkpoint(str(path), map_location='cpu')
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_a_url_is_refused_not_downloaded():
    with pytest.raises(ValueError, match='never downloads'):
        read_checkpoint('https://example.invalid/swin_tiny_patch4_window7_224.pth')


def _imported_modules(path: Path, package: str) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')[:len(package.split('.')) - node.level + 1] \
                if node.level else []
            module = '.'.join(base + ([node.module] if node.module else []))
            names += [module] if node.module else [f'{module}.{a.name}' for a in node.names]
    return names


def test_the_package_never_imports_the_model_code():
    """Imports run one way: the backbone uses the checkpoint package, never the reverse (not
    even inside a function body); the package reads the arch table from swin_dense.arch, and
    the Swin V2 coordinate tables from the pure function module swin_dense.ops.continuous_bias
    (which imports nothing above the ops)."""
    package = Path(__file__).resolve().parents[2] / 'swin_dense' / 'checkpoint'
    files = sorted(package.glob('*.py'))
    assert {p.name for p in files} >= {'io.py', 'formats.py', 'load.py', 'convert.py'}
    for path in files:
        for name in _imported_modules(path, 'swin_dense.checkpoint'):
            if name.startswith('swin_dense'):
                assert name.startswith(('swin_dense.checkpoint', 'swin_dense.arch',
                                        'swin_dense.fileio')) \
                    or name == 'swin_dense.ops.continuous_bias', f'{path.name} imports {name}'
    ops = package.parent / 'ops'
    for module in ('continuous_bias', 'window'):
        for name in _imported_modules(ops / f'{module}.py', 'swin_dense.ops'):
            if name.startswith('swin_dense'):
                assert name.startswith('swin_dense.ops.window'), f'ops/{module}.py imports {name}'
