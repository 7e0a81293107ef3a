"""Writing a checkpoint of any layout as a file in ours, atomically, and the command line."""
from __future__ import annotations

import importlib.util

import sys
from pathlib import Path

import pytest
import torch

from swin_dense.checkpoint import (convert_checkpoint, detect_format, load_pretrained,
                                   read_checkpoint)
from swin_reference import (assert_close, features, image, official,  # noqa: F401
                            official_to_timm, reference, small_model)
from tool_runs import tool_env


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_convert_checkpoint_roundtrip(tmp_path, official, image, reference, suffix):
    src = tmp_path / 'official.pth'
    torch.save({'model': official}, src)
    dst = tmp_path / f'native{suffix}'
    report = convert_checkpoint(src, dst)  # architecture inferred from the file
    assert report.format == 'official' and dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    assert detect_format(read_checkpoint(dst)) == 'native'
    assert_close(features(small_model(dst), image), reference)
    again = load_pretrained(small_model(), dst)
    assert again.format == 'native' and len(again.expected_missing) == 8


def test_cli(tmp_path, official, capsys):
    import subprocess
    src = tmp_path / 'timm.pth'
    torch.save(official_to_timm(official), src)
    dst = tmp_path / 'out' / 'w12.pth'
    tool = Path(__file__).resolve().parents[2] / 'tools' / 'convert_checkpoint.py'
    run = subprocess.run([sys.executable, str(tool), str(src), str(dst), '--window-size', '12'],
                         capture_output=True, text=True, cwd=str(tmp_path), env=tool_env())
    assert run.returncode == 0, run.stderr
    assert 'format: timm' in run.stdout and 'window 7 -> 12' in run.stdout
    sd = read_checkpoint(dst)['state_dict']
    assert sd['stages.0.blocks.0.attn.w_msa.relative_position_bias_table'].shape == (529, 1)
    spec = importlib.util.spec_from_file_location('convert_checkpoint_tool', tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / 'none.pth'), str(dst)]) == 1
    assert 'none.pth' in capsys.readouterr().err
