"""benchmarks/render.py: results JSON -> the tables of docs/performance.md and the README summary.

Every test works on a temporary copy of the repository's README.md, docs/performance.md and
benchmarks/results/, never on the files themselves.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RENDER = REPO / 'benchmarks' / 'render.py'


def _load_render():
    spec = importlib.util.spec_from_file_location('benchmarks_render', RENDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while it is executed
    spec.loader.exec_module(module)
    return module


render = _load_render()


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The rendered files and the results, copied to a temporary root."""
    (tmp_path / 'docs').mkdir()
    shutil.copy(REPO / 'README.md', tmp_path / 'README.md')
    shutil.copy(REPO / 'docs' / 'performance.md', tmp_path / 'docs' / 'performance.md')
    shutil.copytree(REPO / 'benchmarks' / 'results', tmp_path / 'benchmarks' / 'results')
    return tmp_path


def _results(root: Path) -> list[Path]:
    return sorted((root / 'benchmarks' / 'results').glob('*.json'))


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def _cpu_fp32(root: Path) -> Path:
    """The newest CPU fp32 results file: the one the README summary shows."""
    shown = render.summary_results(render.load_results(root / 'benchmarks' / 'results'))
    return next(r.path for r in shown if r.device_kind == 'cpu' and r.amp is None)


def test_the_repository_docs_are_up_to_date_with_the_results(repo_copy):
    assert render.main(['--root', str(repo_copy), '--check']) == 0


def test_rendering_is_idempotent(repo_copy):
    assert render.main(['--root', str(repo_copy)]) == 0
    first = {p: p.read_text() for p in (repo_copy / 'README.md', repo_copy / 'docs/performance.md')}
    assert render.main(['--root', str(repo_copy)]) == 0
    assert {p: p.read_text() for p in first} == first
    assert render.main(['--root', str(repo_copy), '--check']) == 0


def test_a_changed_figure_makes_check_fail_until_rendered(repo_copy):
    readme = repo_copy / 'README.md'

    def faster(data):
        data['cases'][0]['ours_s'] = data['cases'][0]['mmdet_s'] / 3
        for derived in ('speedup', 'ours_s_range'):  # both follow from ours_s
            data['cases'][0].pop(derived, None)
    _edit(_cpu_fp32(repo_copy), faster)
    before = readme.read_text()
    assert render.main(['--root', str(repo_copy), '--check']) == 1
    assert readme.read_text() == before  # --check changes nothing
    assert render.main(['--root', str(repo_copy)]) == 0
    assert '| 224x224 b8 | inference | 3.00x' in readme.read_text()
    assert '3.00x' in (repo_copy / 'docs' / 'performance.md').read_text()
    assert render.main(['--root', str(repo_copy), '--check']) == 0


def test_only_the_marked_blocks_change(repo_copy):
    readme = repo_copy / 'README.md'
    _edit(_cpu_fp32(repo_copy), lambda d: d['cases'][0].update(max_abs_diff=1e-3))
    old = readme.read_text()
    render.main(['--root', str(repo_copy)])
    new = readme.read_text()
    begin, end = '<!-- results:summary:begin -->', '<!-- results:summary:end -->'
    assert old.split(begin)[0] == new.split(begin)[0]
    assert old.split(end)[1] == new.split(end)[1]


def test_the_summary_takes_the_newest_run_of_each_kind(repo_copy):
    source = _cpu_fp32(repo_copy)
    newer = source.with_name('2099-01-01_cpu_fp32_newer.json')
    shutil.copy(source, newer)

    def newer_run(data):
        data['date'] = '2099-01-01'
        data['commit'] = 'abcdef0'
        for case in data['cases']:
            case['ours_s'] = case['mmdet_s'] / 2
            for derived in ('speedup', 'ours_s_range'):
                case.pop(derived, None)
    _edit(newer, newer_run)
    render.main(['--root', str(repo_copy)])
    readme = (repo_copy / 'README.md').read_text()
    summary = readme.split('<!-- results:summary:begin -->')[1].split('<!-- results:summary:end')[0]
    assert 'abcdef0' in summary and '2.00x' in summary
    assert '326a78c' not in summary
    # the supplementary runs stay out of the summary, but every run is in performance.md
    assert '224x224 b32' not in summary
    performance = (repo_copy / 'docs' / 'performance.md').read_text()
    assert 'abcdef0' in performance and '326a78c' in performance and '224x224 b32' in performance


@pytest.mark.parametrize('change, expected', [
    (lambda d: d['cases'][1].pop('ours_s'), "cases[1]: lacks the required key 'ours_s'"),
    (lambda d: d['cases'][0].update(mmdet_s='fast'), "cases[0].mmdet_s: must be a number"),
    (lambda d: d['cases'][0].update(mode='eval'), "cases[0].mode: must be one of"),
    (lambda d: d['cases'][0].update(speedup=9.0), 'cases[0].speedup: 9.0 disagrees with'),
    (lambda d: d.pop('commit'), "lacks the required key 'commit'"),
    (lambda d: d.update(date='26.11.2026'), 'date: must be YYYY-MM-DD'),
    (lambda d: d.update(amp='int8'), 'amp: must be null, "fp16" or "bf16"'),
    (lambda d: d.update(schema=2), 'schema: must be 1'),
    (lambda d: d.update(cases=[]), 'cases: must be a non-empty list'),
    (lambda d: d['cases'].append(dict(d['cases'][0])), 'repeats case'),
])
def test_a_schema_error_names_the_file_and_the_field(repo_copy, capsys, change, expected):
    path = _cpu_fp32(repo_copy)
    _edit(path, change)
    readme_before = (repo_copy / 'README.md').read_text()
    assert render.main(['--root', str(repo_copy)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err, err
    assert 'docs/performance.md' in err  # where the schema is described
    assert (repo_copy / 'README.md').read_text() == readme_before  # nothing half-written


def test_invalid_json_names_the_file(repo_copy, capsys):
    path = _cpu_fp32(repo_copy)
    path.write_text(path.read_text()[:-20])
    assert render.main(['--root', str(repo_copy), '--check']) == 2
    err = capsys.readouterr().err
    assert str(path) in err and 'not valid JSON' in err


def test_missing_markers_are_a_clear_error(repo_copy, capsys):
    readme = repo_copy / 'README.md'
    readme.write_text(readme.read_text().replace('<!-- results:summary:end -->', ''))
    assert render.main(['--root', str(repo_copy)]) == 2
    err = capsys.readouterr().err
    assert 'README.md' in err and '<!-- results:summary:end -->' in err


def test_no_results_is_a_clear_error(repo_copy, capsys):
    for path in _results(repo_copy):
        path.unlink()
    assert render.main(['--root', str(repo_copy)]) == 2
    assert 'no results files' in capsys.readouterr().err


def test_the_script_runs_from_the_command_line(repo_copy):
    done = subprocess.run([sys.executable, str(RENDER), '--root', str(repo_copy), '--check'],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _edit(_cpu_fp32(repo_copy), lambda d: d['cases'][0].update(memory_ratio=0.11))
    done = subprocess.run([sys.executable, str(RENDER), '--root', str(repo_copy), '--check'],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert 'out of date' in done.stderr and 'python benchmarks/render.py' in done.stderr


def test_ratios_follow_the_figures_when_not_given():
    data = json.loads(next((REPO / 'benchmarks' / 'results').glob('*_h100_fp32_3b40cae.json'))
                      .read_text())
    for case in data['cases']:
        case.pop('speedup', None)
        case.pop('memory_ratio', None)
    checked = render.validate(data, 'memory')
    first = checked['cases'][0]
    assert first['speedup'] == pytest.approx(first['mmdet_s'] / first['ours_s'])
    assert first['memory_ratio'] == pytest.approx(first['ours_mib'] / first['mmdet_mib'])


# ---------------------------------------------------------------- Swin V2 (results/v2/)

def _v2_file(directory: Path, speedup: float = 2.0) -> Path:
    data = {'date': '2026-12-02', 'commit': 'abc1234', 'command': 'python tools/benchmark.py '
            '--arch v2-tiny', 'machine': {'cpu': 'test CPU'}, 'torch': '2.14.1', 'threads': 2,
            'arch': 'v2-tiny', 'load_average': [0.5, 0.4, 0.3], 'load_average_after': [0.6, 0.4, 0.3],
            'cases': [{'case': '512x512 b1', 'mode': 'infer', 'mmpretrain_s': 0.2, 'ours_s': 0.1,
                       'mmpretrain_s_range': [0.19, 0.21], 'ours_s_range': [0.1, 0.1],
                       'speedup': speedup, 'max_rel_error': 1.1e-6}]}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / '2026-12-02_cpu_fp32_v2-tiny_abc1234.json'
    path.write_text(json.dumps(data))
    return path


def test_v2_results_render_into_their_block(repo_copy):
    v2 = repo_copy / 'benchmarks' / 'results' / 'v2'
    shutil.rmtree(v2, ignore_errors=True)
    _v2_file(v2)
    assert render.main(['--root', str(repo_copy)]) == 0
    text = (repo_copy / 'docs' / 'performance.md').read_text()
    block = text.split('<!-- results:v2:begin -->')[1].split('<!-- results:v2:end -->')[0]
    assert '### Swin V2-T, CPU fp32 (2026-12-02, commit `abc1234`)' in block
    assert '| 512x512 b1 | inference | 200 (190-210) | 100 | 2.00x | 1.1e-06 |' in block
    assert 'load average (1/5/15 min) 0.5/0.4/0.3 before' in block


def test_a_v2_speedup_that_contradicts_its_times_is_an_error(repo_copy, capsys):
    v2 = repo_copy / 'benchmarks' / 'results' / 'v2'
    shutil.rmtree(v2, ignore_errors=True)
    _v2_file(v2, speedup=3.0)
    assert render.main(['--root', str(repo_copy)]) == 2
    assert 'mmpretrain_s / ours_s' in capsys.readouterr().err
