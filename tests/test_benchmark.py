"""tools/benchmark.py and its helpers in benchmarks/: the machine record, the padding arithmetic,
the onnxruntime rows, the timing protocol and the results file. No timing is ever asserted."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import machine, onnx_rows, padding, report
from benchmarks.render import SchemaError, validate
from tool_runs import REPO, run_to_end

TOOL = REPO / 'tools' / 'benchmark.py'


def _load_tool():
    spec = importlib.util.spec_from_file_location('benchmark_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_tool()
needs_onnx = pytest.mark.skipif(not onnx_rows.available(),
                                reason='onnxruntime, onnx or onnxscript not installed')


# =====================================================================================
# The machine
# =====================================================================================
def test_the_machine_record_says_what_the_figures_depend_on():
    record = machine.machine_record('cpu')
    for key in ('label', 'cpu', 'cpu_model', 'cpu_flags', 'cores', 'logical_cpus',
                'caches_kib', 'gpu', 'gpu_driver'):
        assert key in record, key
    assert record['cpu'].strip() and record['cpu_model'] in record['cpu']
    assert isinstance(record['cpu_flags'], list)
    assert set(record['cpu_flags']) <= set(machine.VECTOR_FLAGS)
    assert isinstance(record['cores'], int) and record['cores'] >= 1
    assert record['gpu'] is None and record['label'] == 'CPU'
    if machine.CACHE_ROOT.is_dir():
        assert record['caches_kib'] and all(v > 0 for v in record['caches_kib'].values())
    build = machine.torch_build()
    assert set(build) == {'blas', 'mkl', 'onednn', 'cpu_capability', 'cuda'}
    header = '\n'.join(machine.header_lines(record, build, 3))
    assert record['cpu'] in header and '3 threads' in header and torch.__version__ in header


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 avx_vnni

processor\t: 1
physical id\t: 0
core id\t\t: 0

processor\t: 2
physical id\t: 1
core id\t\t: 0

processor\t: 3
physical id\t: 1
core id\t\t: 1
"""


def test_cpuinfo_and_cache_parsing(tmp_path):
    fields = machine.read_cpuinfo(CPUINFO)
    assert fields['model name'] == 'Intel(R) Xeon(R) Platinum 8480+'
    assert 'amx_bf16' in fields['flags'].split()
    assert machine.physical_cores(CPUINFO) == 3  # hyperthreads of one core counted once
    for index, (level, kind, size) in enumerate([('1', 'Data', '48K'), ('1', 'Instruction',
                                                 '32K'), ('2', 'Unified', '2048K'),
                                                ('3', 'Unified', '105M')]):
        folder = tmp_path / f'index{index}'
        folder.mkdir()
        for name, value in (('level', level), ('type', kind), ('size', size)):
            (folder / name).write_text(value + '\n')
    caches = machine.cache_sizes_kib(tmp_path)
    assert caches == {'L1d': 48, 'L1i': 32, 'L2': 2048, 'L3': 105 * 1024}
    text = machine.describe_cpu('Xeon', 4, ['avx2', 'amx_bf16'], caches)
    assert 'avx2 amx_bf16' in text and 'L2 2 MiB' in text and 'L1i' not in text


# =====================================================================================
# Padding arithmetic
# =====================================================================================
#: Narrower than the benchmark's test arch: the arithmetic holds for any width and depth.
FLOP_ARCH = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))


def _mmdet_swin(settings: dict):
    from mmdet.models.backbones import SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(**settings)


def _counted(model, batch: int, h: int, w: int, mode: str):
    """flop_counter's total and its per-module counts for one step."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    x = torch.randn(batch, 3, h, w)
    with counter:
        benchmark.step_fn(model, x, mode, None)()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def _attention_flops_per_stage(per_module: dict, stages: int) -> list[int]:
    out = [0] * stages
    for name, flops in per_module.items():
        match = re.search(r'stages\.(\d+)\.blocks\.\d+\.attn$', name)
        if match:
            out[int(match.group(1))] += flops
    return out


@pytest.mark.parametrize('mode', ['infer', 'train'])
def test_the_flop_arithmetic_equals_flop_counter(mode):
    settings = FLOP_ARCH
    model = _mmdet_swin(settings)
    for batch, h, w in [(1, 224, 224), (2, 200, 328), (1, 64, 96)]:
        total, _ = _counted(model, batch, h, w, mode)
        counted = padding.backbone_flops(batch, h, w, mode, settings['embed_dims'],
                                         settings['depths'])
        assert counted.total == pytest.approx(total, rel=1e-3), (batch, h, w)


def test_swin_t_flops_match_the_published_count():
    # Swin-T at 224: 4.5 GMACs per image (published), 2 FLOPs per MAC; 8 images
    assert 65e9 < padding.backbone_flops(8, 224, 224).total < 80e9
    assert padding.backbone_flops(1, 224, 224).padding == 0  # 56, 28, 14, 7: whole windows


def test_the_padding_share_equals_an_independent_count():
    """flop_counter on the attention modules: their FLOPs per window slot, from a size that
    needs no padding, give what the real tokens alone would cost at a padded size; the rest
    of what they count there is padding."""
    settings = FLOP_ARCH
    model = _mmdet_swin(settings)
    stages = len(settings['depths'])
    _, unpadded = _counted(model, 1, 224, 224, 'infer')
    per_slot = [flops / (h * w) for flops, (h, w, _, _) in
                zip(_attention_flops_per_stage(unpadded, stages), padding.stage_maps(224, 224))]
    for h, w in [(512, 512), (200, 328), (64, 96)]:
        total, padded = _counted(model, 1, h, w, 'infer')
        maps = padding.stage_maps(h, w)
        waste = sum(counted - rate * mh * mw for counted, rate, (mh, mw, _, _) in
                    zip(_attention_flops_per_stage(padded, stages), per_slot, maps))
        share = padding.backbone_flops(1, h, w, 'infer', settings['embed_dims'],
                                       settings['depths']).padding_share
        assert share == pytest.approx(waste / total, rel=0.03), (h, w)
        assert share > 0


def test_the_padded_slots_at_512_are_the_issue_s():
    stages = padding.backbone_flops(1, 512, 512).stages
    assert [(s.height, s.padded_height) for s in stages] == [(128, 133), (64, 70), (32, 35),
                                                            (16, 21)]
    assert [round(s.padded_slots_share, 2) for s in stages] == [0.08, 0.2, 0.2, 0.72]


def test_a_train_step_pads_as_much_as_its_forward():
    infer = padding.backbone_flops(1, 800, 1344, 'infer')
    train = padding.backbone_flops(1, 800, 1344, 'train')
    assert train.padding == 3 * infer.padding
    assert train.padding_share == pytest.approx(infer.padding_share, rel=0.02)
    with pytest.raises(ValueError, match='mode must be one of'):
        padding.backbone_flops(1, 64, 64, 'eval')


# =====================================================================================
# onnxruntime rows
# =====================================================================================
def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.GELU(),
                               torch.nn.Conv2d(8, 16, 2, 2)).eval()


@pytest.fixture(scope='module')
def exported_net(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('onnx') / 'net.onnx')
    net = _small_net()
    assert onnx_rows.export(net, torch.randn(1, 3, 64, 96), path) is None
    return net, path


@needs_onnx
def test_an_exported_model_runs_at_other_sizes_with_the_threads_asked(exported_net):
    net, path = exported_net
    session = onnx_rows.session(path, threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    for shape in [(2, 3, 128, 160), (1, 3, 200, 328)]:
        assert onnx_rows.max_abs_diff(session, net, torch.randn(*shape)) < 1e-4


@needs_onnx
def test_the_onnx_child_times_the_session(exported_net, capsys):
    _, path = exported_net
    benchmark.main(['--time-child', 'onnx', '64x96 b2', 'infer', '--onnx-file', path,
                    '--repeats', '2', '--warmup', '0', '--threads', '1'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out['steps']) == 2 and out['median'] > 0


class _NotExportable(torch.nn.Module):
    def forward(self, image):
        return torch.linalg.svdvals(image)  # ONNX has no singular value decomposition


@needs_onnx
def test_a_failed_export_is_a_message_not_an_error(tmp_path):
    message = onnx_rows.export(_NotExportable(), torch.randn(1, 3, 32, 32),
                               str(tmp_path / 'x.onnx'))
    assert message.startswith('export of _NotExportable to ONNX failed (')
    assert '\n' not in message and '\x1b' not in message


@needs_onnx
def test_prepare_onnx_records_a_failure_and_no_rows(tmp_path):
    results, files = dict(notes=[]), {}
    assert report.prepare_onnx(results, _NotExportable(), str(tmp_path), files) is None
    assert 'onnx' not in files
    assert results['onnxruntime']['error'].startswith('export of _NotExportable')
    assert results['onnxruntime']['threads'] == torch.get_num_threads()
    assert results['notes'] == [f"No onnxruntime rows: {results['onnxruntime']['error']}."]


# =====================================================================================
# Timing protocol (no subprocess: the children's entry points called here)
# =====================================================================================
def test_separate_processes_alternate_and_a_failed_onnx_child_is_skipped(monkeypatch):
    calls = []
    medians = {'mmdet': iter([3.0, 1.0, 2.0]), 'ours': iter([1.0, 1.5, 0.5])}

    def fake_child(child_args, args, env=None):
        impl = child_args[1]
        calls.append(impl)
        if impl == 'onnx':
            raise benchmark.ChildFailed('cmd exited with 1:\nRuntimeError: bad size')
        return json.dumps(dict(median=next(medians[impl]), steps=[]))

    monkeypatch.setattr(benchmark, 'run_child', fake_child)
    args = benchmark.parse_args(['--rounds', '3', '--no-onnx'])
    got, failed = benchmark.time_separate(args, '64x64 b1', 'infer',
                                          ['mmdet', 'ours', 'onnx'], {'weights': 'w', 'onnx': 'o'})
    assert calls == ['mmdet', 'ours', 'onnx', 'mmdet', 'ours', 'mmdet', 'ours']
    assert got == {'mmdet': [3.0, 1.0, 2.0], 'ours': [1.0, 1.5, 0.5]}
    assert failed == {'onnx': 'RuntimeError: bad size'}

    def broken(child_args, args, env=None):
        raise benchmark.ChildFailed('mmdet exited with 1')
    monkeypatch.setattr(benchmark, 'run_child', broken)
    with pytest.raises(benchmark.ChildFailed):
        benchmark.time_separate(args, '64x64 b1', 'infer', ['mmdet', 'ours'], {'weights': 'w'})


@pytest.mark.parametrize('impl', ['mmdet', 'ours'])
def test_a_timing_child_builds_one_backbone_with_the_given_weights(tmp_path, capsys, impl):
    weights = tmp_path / 'w.pt'
    torch.save(benchmark.seeded_weights('test'), weights)
    benchmark.main(['--time-child', impl, '64x64 b1', 'train', '--weights', str(weights),
                    '--arch', 'test', '--repeats', '3', '--warmup', '1', '--threads', '1'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out['steps']) == 3 and out['median'] == sorted(out['steps'])[1]


@pytest.mark.parametrize('argv, message', [
    (['--cases', '512 b1'], "a case is 'HEIGHTxWIDTH bBATCH'"),
    (['--cases', '0x64 b1'], "a case is 'HEIGHTxWIDTH bBATCH'"),
    (['--rounds', '0'], '--rounds must be at least 1'),
    (['--onnx', '--amp', 'bf16'], '--onnx times the CPU execution provider in fp32'),
])
def test_bad_options_are_clear_errors(capsys, argv, message):
    if '--onnx' in argv and not onnx_rows.available():
        message = '--onnx needs onnxruntime'
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_default_results_path_follows_the_naming_of_the_results_folder():
    results = dict(date='2027-01-02', amp=None, commit='abc1234',
                   machine=dict(label='EPYC 9654 (AVX-512)'))
    path = report.default_path(results)
    assert path.parent == REPO / 'benchmarks' / 'results'
    assert path.name == '2027-01-02_epyc-9654-avx-512_fp32_abc1234.json'
    results.update(amp='bf16', machine=dict(label='CPU'))
    assert report.default_path(results).name == '2027-01-02_cpu_bf16_abc1234.json'


# =====================================================================================
# The results file
# =====================================================================================
def _check_file(path: Path, in_process: bool) -> dict:
    data = json.loads(path.read_text())
    validate(data, str(path))  # the schema render.py reads
    assert data['in_process'] == in_process
    assert data['machine']['cpu'] and 'caches_kib' in data['machine']
    assert data['torch_build']['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert data['method'] and data['gemm_gflops'] > 0
    (row,) = [r for r in data['cases'] if r['mode'] == 'infer']
    assert row['max_abs_diff'] < 1e-5  # same weights, same input: the issue's parity bound
    assert row['speedup'] == row['mmdet_s'] / row['ours_s']
    counted = padding.backbone_flops(1, 64, 64, 'infer', benchmark.TEST_ARCH['embed_dims'],
                                     benchmark.TEST_ARCH['depths'])
    assert row['gflop'] == pytest.approx(counted.total / 1e9, rel=1e-3)
    assert row['padding_share'] == pytest.approx(counted.padding_share, abs=1e-3)
    assert row['bound_s'] == pytest.approx(
        counted.needed / 1e9 / data['gemm_gflops'], rel=0.01)
    return data


def test_a_one_process_run_writes_a_valid_results_file(tmp_path):
    out = tmp_path / 'bench.json'
    run_to_end([sys.executable, str(TOOL), '--arch', 'test', '--cases', '64x64 b1',
                '--modes', 'infer', '--repeats', '1', '--warmup', '0', '--no-memory',
                '--no-onnx', '--in-process', '--json', str(out)], cwd=tmp_path, timeout=600)
    data = _check_file(out, in_process=True)
    assert data['rounds'] is None and 'one process' in data['method']
    assert data['command'].startswith('python tools/benchmark.py --arch test')


@pytest.mark.slow
def test_the_headline_run_writes_a_valid_results_file(tmp_path):
    """Separate processes, memory, onnxruntime where it imports (rows, or the reason why not)."""
    out = tmp_path / 'bench.json'
    log = run_to_end([sys.executable, str(TOOL), '--arch', 'test', '--cases', '64x64 b1',
                      '--rounds', '2', '--repeats', '1', '--warmup', '1', '--also-in-process',
                      '--json', str(out)], cwd=tmp_path, timeout=1800)
    data = _check_file(out, in_process=False)
    assert data['rounds'] == 2 and 'separate processes' in data['method']
    for row in data['cases']:
        for impl in ('mmdet', 'ours'):
            low, high = row[f'{impl}_s_range']
            assert low <= row[f'{impl}_s'] <= high
        assert row['ours_mib'] > 0 and row['mmdet_mib'] > 0
        assert row['one_process']['speedup'] > 0
    if onnx_rows.available():
        onnx = data['onnxruntime']
        assert onnx['threads'] == data['threads']
        infer = next(r for r in data['cases'] if r['mode'] == 'infer')
        if onnx['error']:
            assert 'No onnxruntime rows' in log and 'onnx_s' not in infer
        else:
            assert infer['onnx_s'] > 0 and infer['onnx_max_abs_diff'] < 1e-4


# =====================================================================================
# The schema's new fields, as render.py reads them
# =====================================================================================
def _minimal(**case) -> dict:
    row = dict(case='64x64 b1', mode='infer', mmdet_s=0.2, ours_s=0.1, **case)
    return dict(schema=1, date='2027-01-02', commit='abc1234', command='python x',
                machine=dict(cpu='some CPU'), torch='2.13', threads=2, amp=None, cases=[row])


@pytest.mark.parametrize('case, expected', [
    (dict(ours_s_range=[0.11, 0.12]), 'does not hold ours_s'),
    (dict(onnx_s_range=[0.1, 0.2]), "is given without 'onnx_s'"),
    (dict(mmdet_s_range=[0.1]), 'must be [min, max]'),
    (dict(padding_share=1.2), 'padding_share: must be in [0, 1)'),
    (dict(one_process=dict(mmdet_s=0.2, ours_s=0.1, speedup=3.0)), 'disagrees with'),
])
def test_the_new_fields_are_checked(case, expected):
    with pytest.raises(SchemaError, match=re.escape(expected)):
        validate(_minimal(**case), 'file')


def test_the_new_fields_are_rendered():
    render = sys.modules['benchmarks.render']
    data = validate(_minimal(mmdet_s_range=[0.19, 0.25], ours_s_range=[0.1, 0.11], onnx_s=0.15,
                             onnx_s_range=[0.14, 0.16], padding_share=0.08, bound_s=0.05),
                    'file')
    data.update(method='separate processes', torch_build=dict(cpu_capability='AVX2'),
                onnxruntime=dict(version='1.32.0', threads=2, error=None))
    text = render.render_tables([render.Result(Path('x.json'), data)])
    assert '| 200 (190-250) | 100 (100-110) | 2.00x | 150 (140-160) | 8.0% | 50.0 (50%) |' in text
    assert 'Method: separate processes.' in text
    assert 'CPU kernels AVX2' in text and 'onnxruntime 1.32.0 with 2 intra-op threads' in text


# =====================================================================================
# Swin V2 against mmpretrain (benchmarks/v2_peer.py)
# =====================================================================================
from benchmarks import v2_peer  # noqa: E402


def _peer_python():
    """A python where mmpretrain's SwinTransformerV2 imports: $SWIN_DENSE_PEER_PYTHON, the
    environment tools/peer_env.sh builds in .peer-venv, or this one; None where none does."""
    import os
    import subprocess
    candidates = [os.environ.get('SWIN_DENSE_PEER_PYTHON'),
                  str(REPO / '.peer-venv' / 'bin' / 'python'), sys.executable]
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run(
                [python, '-c', 'from mmpretrain.models.backbones import SwinTransformerV2'],
                capture_output=True).returncode == 0:
            return python
    return None


def test_v2_archs_are_choices_of_the_tool_and_map_to_both_models():
    assert set(v2_peer.V2_ARCHS) <= set(benchmark.ARCHS)
    assert v2_peer.base_arch('v2-tiny') == 'tiny'
    with pytest.raises(ValueError, match='v2-tiny'):
        v2_peer.base_arch('tiny')
    peer, ours = v2_peer.peer_kwargs('v2-tiny'), v2_peer.our_kwargs('v2-tiny')
    assert peer['pad_small_map'] is True and peer['drop_path_rate'] == 0
    assert list(peer['window_size']) == list(ours['window_size']) == [16, 16, 16, 8]
    assert tuple(peer['out_indices']) == tuple(ours['out_indices']) == (0, 1, 2, 3)
    assert ours['arch'] == peer['arch'] == 'tiny'
    test_peer = v2_peer.peer_kwargs('v2-test')['arch']
    assert test_peer['embed_dims'] == v2_peer.our_kwargs('v2-test')['embed_dims']


def test_v2_relative_error_and_row_summary():
    a = [torch.ones(1, 2, 3, 3), torch.full((1, 4, 2, 2), 2.0)]
    b = [t.clone() for t in a]
    assert v2_peer.max_relative_error(a, b) == 0
    b[1][0, 0, 0, 0] += 0.5  # |diff| 0.5 over max|peer| 2.5
    assert v2_peer.max_relative_error(a, b) == pytest.approx(0.2)
    with pytest.raises(ValueError, match='shape'):
        v2_peer.max_relative_error(a, [b[0], b[1][:, :2]])
    with pytest.raises(ValueError, match='outputs'):
        v2_peer.max_relative_error(a, b[:1])
    row = v2_peer.summarise({'mmpretrain': [3.0, 1.0, 2.0], 'ours': [1.0, 2.0, 0.5]})
    assert row['mmpretrain_s'] == 2.0 and row['ours_s'] == 1.0 and row['speedup'] == 2.0
    assert row['mmpretrain_s_range'] == [1.0, 3.0] and row['ours_s_range'] == [0.5, 2.0]


def test_v2_results_go_to_their_own_folder_that_render_does_not_read():
    results = dict(date='2027-01-02', arch='v2-tiny', commit='abc1234',
                   machine=dict(label='EPYC 9654 (AVX-512)'))
    path = v2_peer.default_path(results)
    assert path.parent == REPO / 'benchmarks' / 'results' / 'v2'
    assert path.name == '2027-01-02_epyc-9654-avx-512_fp32_v2-tiny_abc1234.json'


def test_v2_randomise_moves_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_parameter('logit_scale', torch.nn.Parameter(torch.zeros(2, 1, 1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v2_peer.randomise_(model)
    for name, value in model.state_dict().items():
        assert not torch.allclose(value, before[name]), name
    assert (model[1].weight - 1).abs().max() < 0.5  # norm weights stay near 1


def test_v2_bad_options_are_clear_errors():
    args = benchmark.parse_args(['--arch', 'v2-test', '--in-process'])
    with pytest.raises(SystemExit, match='separate processes'):
        v2_peer.main(args, [], None)


def test_v2_tiny_runs_end_to_end_where_mmpretrain_imports(tmp_path):
    python = _peer_python()
    if python is None:
        pytest.skip('mmpretrain does not import here (tools/peer_env.sh builds an environment '
                    'where it does, or set SWIN_DENSE_PEER_PYTHON)')
    out = tmp_path / 'v2.json'
    log = run_to_end([python, str(TOOL), '--arch', 'v2-test', '--cases', '40x56 b1',
                      '--rounds', '1', '--repeats', '1', '--warmup', '0', '--no-memory',
                      '--json', str(out)], cwd=tmp_path, timeout=900)
    data = json.loads(out.read_text())
    assert data['arch'] == 'v2-test' and len(data['load_average']) == 3
    assert data['machine']['cpu'] and 'separate processes' in data['method']
    assert {(r['case'], r['mode']) for r in data['cases']} == {('40x56 b1', 'infer'),
                                                                ('40x56 b1', 'train')}
    for row in data['cases']:
        assert row['max_rel_error'] <= 1e-5, log[-2000:]
        assert row['speedup'] == pytest.approx(row['mmpretrain_s'] / row['ours_s'])
