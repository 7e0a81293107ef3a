"""tools/benchmark.py runs end to end: both backbones, the same weights, JSON that adds up."""
import json
import sys

import pytest

from tool_runs import REPO, run_to_end


@pytest.mark.parametrize('protocol', [[], ['--in-process']], ids=['child', 'in-process'])
def test_benchmark_smallest_case_reports_parity_and_ratios(tmp_path, protocol):
    out = tmp_path / 'bench.json'
    run_to_end([sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--cases', '224x224 b8',
                '--modes', 'infer', '--repeats', '1', '--no-memory', '--json', str(out),
                *protocol], cwd=tmp_path, timeout=600)
    result = json.loads(out.read_text())
    (row,) = result['cases']
    assert (row['case'], row['mode']) == ('224x224 b8', 'infer')
    assert result['in_process'] == bool(protocol)
    assert row['max_abs_diff'] < 1e-5  # same weights, same input: the parity bound
    assert row['speedup'] == row['mmdet_s'] / row['ours_s']
    # Swin-T at 224: 4.5 GMACs per image (published), 8 images, 2 FLOPs per MAC
    assert 65 < row['gflop'] < 80
    assert result['gemm_gflops'] > 0 and row['ours_gflops'] > 0
