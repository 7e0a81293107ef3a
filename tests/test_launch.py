"""swin_dense.launch and the tools' command lines: what happens before any model is built.

All fast: the missing-data error (in-process and through tools/train.py from another working
directory), a typo'd config path, in_channels mismatches (detection and segmentation layouts),
a missing pretrained file, toolkit dispatch, device adaptation, the tool options, and the
commands the shell launchers run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmdet')
from mmengine.config import Config  # noqa: E402

from swin_dense import launch  # noqa: E402
from swin_dense.launch import (  # noqa: E402
    ChannelMismatchError, ConfigNotFoundError, DataNotFoundError, DeviceError, LaunchError,
    PretrainedNotFoundError, UnsupportedToolkitError)

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / 'tools'
COCO_1X = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco.py')
DEMO = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py')
OFFICIAL_T = ('https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
              'swin_tiny_patch4_window7_224.pth')


def clean_env(**extra):
    """The environment of a fresh shell: this checkout not on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'LOCAL_RANK', 'RANK',
                                                            'WORLD_SIZE')}
    env.update(extra)
    return env


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working directory (no data/, no checkpoints/)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if anything builds a Swin backbone or a Runner."""
    from mmengine.runner import Runner

    from swin_dense.backbone import SwinBackbone

    def refuse(*args, **kwargs):
        raise AssertionError('a model or runner was built before the check')
    monkeypatch.setattr(SwinBackbone, '__init__', refuse)
    monkeypatch.setattr(Runner, 'from_cfg', classmethod(refuse))
    monkeypatch.setattr(Runner, '__init__', refuse)


# ----------------------------------------------------------------------------- missing data
def test_missing_coco_is_a_clear_error_before_any_model_is_built(in_tmp, no_model_built):
    with pytest.raises(DataNotFoundError) as info:
        launch.train(COCO_1X, work_dir=str(in_tmp / 'work'))
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # the paths expected, as given and resolved against the working directory
    for rel in ('data/coco/annotations/instances_train2017.json', 'data/coco/train2017/',
                'data/coco/annotations/instances_val2017.json', 'data/coco/val2017/'):
        assert rel in msg
    assert str(in_tmp / 'data' / 'coco' / 'annotations' / 'instances_train2017.json') in msg
    assert 'val_evaluator.ann_file' in msg
    # the layout, and how to point elsewhere
    assert 'Expected layout of COCO 2017' in msg
    assert '--cfg-options train_dataloader.dataset.data_root=' in msg
    assert 'val_evaluator.ann_file=/path/to/dataset/annotations/instances_val2017.json' in msg
    assert 'ln -s' in msg and 'data_root' in msg


def test_missing_test_data_only_names_what_test_reads(in_tmp, no_model_built):
    (in_tmp / 'ckpt.pth').write_bytes(b'')
    with pytest.raises(DataNotFoundError) as info:
        launch.test(COCO_1X, str(in_tmp / 'ckpt.pth'))
    msg = str(info.value)
    assert 'test_dataloader.dataset' in msg and 'train2017' not in msg.split('Expected')[0]


def test_partly_missing_data_names_only_the_missing_parts(in_tmp):
    root = in_tmp / 'data' / 'coco'
    (root / 'annotations').mkdir(parents=True)
    (root / 'train2017').mkdir()
    (root / 'annotations' / 'instances_train2017.json').write_text('{}')
    cfg = launch.load_config(COCO_1X)
    with pytest.raises(DataNotFoundError) as info:
        launch.check_data(cfg, 'train')
    listed = str(info.value).split('Expected layout')[0]
    assert 'val2017/' in listed and 'instances_val2017.json' in listed
    assert 'train2017/' not in listed and 'instances_train2017.json' not in listed


def test_data_check_passes_on_the_expected_layout(in_tmp):
    root = in_tmp / 'data' / 'coco'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / f'{split}2017').mkdir()
        (root / 'annotations' / f'instances_{split}2017.json').write_text('{}')
    cfg = launch.load_config(COCO_1X)
    launch.check_data(cfg, 'train')
    launch.check_data(cfg, 'test')


def test_ade_layout_is_named_for_segmentation_datasets(in_tmp):
    cfg = Config(dict(default_scope='mmseg', train_dataloader=dict(dataset=dict(
        type='ADE20KDataset', data_root='data/ade/ADEChallengeData2016',
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))))
    with pytest.raises(DataNotFoundError) as info:
        launch.check_data(cfg, 'train')
    msg = str(info.value)
    assert 'data/ade/ADEChallengeData2016/images/training' in msg
    assert 'images/validation/' in msg and 'annotations/training/' in msg


def test_missing_data_through_the_tool_from_another_directory(in_tmp):
    """tools/train.py run from an unrelated directory, without PYTHONPATH: exit status 1, the
    message on stderr, no traceback."""
    proc = subprocess.run([sys.executable, str(TOOLS / 'train.py'), COCO_1X],
                          cwd=in_tmp, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith('error: dataset files not found')
    assert 'Traceback' not in proc.stderr
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
    assert not (in_tmp / 'work_dirs').exists()  # no Runner: it would have made the work dir


# ----------------------------------------------------------------------------- config path
def test_typoed_config_path_names_close_matches(in_tmp):
    with pytest.raises(ConfigNotFoundError) as info:
        launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_1x.py'))
    assert isinstance(info.value, FileNotFoundError)
    assert 'config file not found' in str(info.value)
    assert 'swin_t_coco.py' in str(info.value)


def test_typoed_relative_config_path_through_the_tool(in_tmp):
    proc = subprocess.run([sys.executable, str(TOOLS / 'test.py'), 'configs/mask_rcnn/swin_t_dem.py',
                           'x.pth'], cwd=in_tmp, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert 'config file not found: configs/mask_rcnn/swin_t_dem.py' in proc.stderr
    assert str(in_tmp) in proc.stderr and 'swin_t_demo.py' in proc.stderr


# ----------------------------------------------------------------------------- channels
def test_neck_in_channels_must_match_the_backbone(in_tmp):
    cfg = launch.load_config(COCO_1X, {'model.neck.in_channels': [256, 512, 1024, 2048]})
    launch.setup_toolkit(cfg)
    with pytest.raises(ChannelMismatchError) as info:
        launch.check_channels(cfg)
    msg = str(info.value)
    assert 'model.neck.in_channels = [256, 512, 1024, 2048], expected [96, 192, 384, 768]' in msg
    assert '--cfg-options model.neck.in_channels=[96,192,384,768]' in msg
    launch.check_channels(launch.load_config(COCO_1X))  # the shipped config is consistent


def test_neck_follows_the_backbone_width_and_outputs(in_tmp):
    cfg = launch.load_config(COCO_1X, {'model.backbone.embed_dims': 128,
                                       'model.backbone.num_heads': [4, 8, 16, 32]})
    with pytest.raises(ChannelMismatchError, match=r'expected \[128, 256, 512, 1024\]'):
        launch.check_channels(cfg)
    cfg = launch.load_config(COCO_1X, {'model.backbone.out_indices': (1, 2, 3)})
    with pytest.raises(ChannelMismatchError, match=r'expected \[192, 384, 768\]'):
        launch.check_channels(cfg)


def _seg_cfg(aux_channels=384, decode=(96, 192, 384, 768)):
    return Config(dict(default_scope='mmseg', model=dict(
        type='EncoderDecoder', backbone=dict(type='SwinBackbone', arch='tiny'),
        decode_head=dict(type='UPerHead', in_channels=list(decode), in_index=[0, 1, 2, 3]),
        auxiliary_head=dict(type='FCNHead', in_channels=aux_channels, in_index=2))))


def test_segmentation_heads_must_match_the_outputs_they_select():
    pytest.importorskip('mmseg')
    launch.setup_toolkit(_seg_cfg())
    launch.check_channels(_seg_cfg())
    with pytest.raises(ChannelMismatchError, match=r'model.auxiliary_head.in_channels = 512, '
                                                   r'expected 384'):
        launch.check_channels(_seg_cfg(aux_channels=512))
    with pytest.raises(ChannelMismatchError, match='model.decode_head.in_channels'):
        launch.check_channels(_seg_cfg(decode=(128, 256, 512, 1024)))


# ----------------------------------------------------------------------------- pretrained
def test_missing_pretrained_file_says_where_weights_come_from(in_tmp, no_model_built):
    root = in_tmp / 'data' / 'coco'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / f'{split}2017').mkdir()
        (root / 'annotations' / f'instances_{split}2017.json').write_text('{}')
    with pytest.raises(PretrainedNotFoundError) as info:
        launch.train(COCO_1X, work_dir=str(in_tmp / 'work'))
    msg = str(info.value)
    assert 'checkpoints/swin_tiny_patch4_window7_224.pth' in msg
    assert OFFICIAL_T in msg
    assert 'tools/convert_checkpoint.py' in msg
    assert '--cfg-options model.backbone.init_cfg=None' in msg


def test_pretrained_check_accepts_existing_files_urls_and_none(in_tmp):
    cfg = launch.load_config(COCO_1X)
    (in_tmp / 'checkpoints').mkdir()
    (in_tmp / 'checkpoints' / 'swin_tiny_patch4_window7_224.pth').write_bytes(b'x')
    launch.check_pretrained(cfg)
    launch.check_pretrained(launch.load_config(COCO_1X, {'model.backbone.init_cfg': None}))
    # SwinBackbone never downloads: a URL is named as such, with the local copy to make
    url = launch.load_config(COCO_1X, {'model.backbone.init_cfg.checkpoint': OFFICIAL_T})
    with pytest.raises(PretrainedNotFoundError, match='SwinBackbone never downloads'):
        launch.check_pretrained(url)
    # other modules' URLs (mmdet's own SwinTransformer, torchvision://...) are mmengine's
    launch.check_pretrained(launch.load_config(COCO_1X, {
        'model.backbone.init_cfg.checkpoint': OFFICIAL_T, 'model.backbone.type':
        'SwinTransformer'}))


# ----------------------------------------------------------------------------- toolkit
def test_toolkit_follows_default_scope():
    assert launch.toolkit_of(Config(dict(default_scope='mmdet'))) == 'mmdet'
    assert launch.toolkit_of(Config(dict(default_scope='mmseg'))) == 'mmseg'
    for scope in ('mmpretrain', None):
        with pytest.raises(UnsupportedToolkitError, match="default_scope is"):
            launch.toolkit_of(Config(dict(default_scope=scope)))


def test_demo_data_is_made_before_the_data_check(in_tmp):
    cfg = Config(dict(default_scope='mmdet', demo_data=dict(
        kind='coco', root='data/tiny/', num_train=2, num_val=1, image_size=32)))
    root = launch.prepare_demo_data(cfg)
    assert root == in_tmp / 'data' / 'tiny'
    assert (root / 'annotations' / 'instances_val2017.json').is_file()
    assert launch.prepare_demo_data(Config(dict(default_scope='mmdet'))) is None


# ----------------------------------------------------------------------------- device
def test_cpu_machines_get_gloo_and_no_cudnn_benchmark(monkeypatch):
    monkeypatch.setattr(launch, '_cuda_available', lambda: False)
    cfg = launch.load_config(COCO_1X, {'env_cfg.cudnn_benchmark': True}, launcher='pytorch')
    launch.adapt_to_device(cfg, 'train')
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.env_cfg.cudnn_benchmark is False
    assert cfg.model_wrapper_cfg.device_ids is None  # DDP of a CPU module
    amp = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_3x_amp.py'))
    launch.adapt_to_device(amp, 'test')  # testing an AMP config on CPU leaves it as it is
    assert amp.optim_wrapper.type == 'AmpOptimWrapper'
    launch.adapt_to_device(amp, 'train')  # AmpOptimWrapper asserts a GPU: bf16 autocast on CPU
    assert amp.optim_wrapper.type == 'CPUAmpOptimWrapper'
    assert amp.optim_wrapper.dtype == 'bfloat16'


def test_gpu_machines_keep_the_config(monkeypatch):
    monkeypatch.setattr(launch, '_cuda_available', lambda: True)
    cfg = launch.load_config(COCO_1X, launcher='pytorch')
    launch.adapt_to_device(cfg, 'train')
    assert cfg.env_cfg.dist_cfg.backend == 'nccl' and 'model_wrapper_cfg' not in cfg


# ----------------------------------------------------------------------------- options
def test_train_options_follow_upstream(tmp_path):
    cfg = launch.load_config(COCO_1X)
    assert cfg.work_dir == os.path.join('./work_dirs', 'swin_t_coco')
    assert launch.load_config(COCO_1X, work_dir='w').work_dir == 'w'
    launch.apply_train_options(cfg, 'mmdet', amp=True, auto_scale_lr=True, resume='auto')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.auto_scale_lr.enable is True and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.resume is True and cfg.load_from is None  # --resume alone: the work dir's last
    ckpt = tmp_path / 'epoch_3.pth'
    ckpt.write_bytes(b'')
    launch.apply_train_options(cfg, 'mmdet', resume=str(ckpt))
    assert cfg.resume is True and cfg.load_from == str(ckpt)
    with pytest.raises(FileNotFoundError, match='resume'):
        launch.apply_train_options(cfg, 'mmdet', resume=str(tmp_path / 'nope.pth'))
    no_scale = Config(dict(default_scope='mmseg', optim_wrapper=dict(type='OptimWrapper')))
    with pytest.raises(LaunchError, match='auto_scale_lr'):
        launch.apply_train_options(no_scale, 'mmseg', auto_scale_lr=True)


def test_test_options_follow_upstream(tmp_path):
    ckpt = tmp_path / 'm.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(LaunchError, match='DetTTAModel merges boxes only'):
        launch.apply_test_options(launch.load_config(COCO_1X), 'mmdet', str(ckpt), tta=True)
    cfg = launch.load_config(COCO_1X, {'model.roi_head.mask_head': None})  # Faster R-CNN
    launch.apply_test_options(cfg, 'mmdet', str(ckpt), show_dir='vis', tta=True, out='p.pkl')
    assert cfg.load_from == str(ckpt)
    vis = cfg.default_hooks.visualization
    assert vis.draw is True and vis.test_out_dir == 'vis'
    assert cfg.model.type == 'DetTTAModel' and cfg.model.module.type == 'MaskRCNN'
    assert cfg.test_dataloader.dataset.pipeline[-1].type == 'TestTimeAug'
    with pytest.raises(LaunchError, match='.pkl'):
        launch.apply_test_options(launch.load_config(COCO_1X), 'mmdet', str(ckpt), out='p.json')
    with pytest.raises(FileNotFoundError, match='checkpoint to test'):
        launch.apply_test_options(launch.load_config(COCO_1X), 'mmdet', str(tmp_path / 'x.pth'))

    seg = Config(dict(default_scope='mmseg', model=dict(type='EncoderDecoder'),
                      default_hooks=dict(visualization=dict(type='SegVisualizationHook')),
                      visualizer=dict(type='SegLocalVisualizer'),
                      test_evaluator=dict(type='IoUMetric'),
                      test_dataloader=dict(dataset=dict(pipeline=[])),
                      tta_model=dict(type='SegTTAModel'), tta_pipeline=[dict(type='X')]))
    launch.apply_test_options(seg, 'mmseg', str(ckpt), show_dir='vis', tta=True, out='preds')
    assert seg.default_hooks.visualization.draw is True
    assert seg.default_hooks.visualization.interval == 1
    assert seg.visualizer.save_dir == 'vis'
    assert seg.model.type == 'SegTTAModel' and seg.model.module.type == 'EncoderDecoder'
    assert seg.test_evaluator.output_dir == 'preds' and seg.test_evaluator.keep_results is True


def test_tools_accept_the_upstream_options():
    for tool, expected in (('train.py', ['--work-dir', '--amp', '--resume', '--auto-scale-lr',
                                         '--cfg-options', '--launcher']),
                           ('test.py', ['--work-dir', '--out', '--show', '--show-dir',
                                        '--wait-time', '--cfg-options', '--launcher', '--tta'])):
        proc = subprocess.run([sys.executable, str(TOOLS / tool), '--help'], cwd='/',
                              env=clean_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        for option in expected:
            assert option in proc.stdout, (tool, option)
        assert '{none,pytorch,slurm,mpi}' in proc.stdout


# ----------------------------------------------------------------------------- launchers
@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON that records its arguments and PYTHONPATH instead of starting torchrun."""
    script = tmp_path / 'fake_python'
    script.write_text('#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH"\necho "ARGS $*"\n')
    script.chmod(0o755)
    return str(script)


def test_dist_train_runs_torchrun_from_any_directory(tmp_path, fake_python):
    env = clean_env(PYTHON=fake_python, NNODES='2', NODE_RANK='1', MASTER_ADDR='10.1.2.3',
                    PORT='29511')
    proc = subprocess.run(['bash', str(TOOLS / 'dist_train.sh'), 'cfg.py', '8', '--amp',
                           '--work-dir', 'w'], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f'PYTHONPATH={REPO}'  # the repository root, whatever the directory
    assert out[1] == (f'ARGS -m torch.distributed.run --nnodes=2 --node_rank=1 '
                      f'--master_addr=10.1.2.3 --nproc_per_node=8 --master_port=29511 '
                      f'{TOOLS}/train.py cfg.py --launcher pytorch --amp --work-dir w')


def test_dist_test_defaults(tmp_path, fake_python):
    proc = subprocess.run(['bash', str(TOOLS / 'dist_test.sh'), 'cfg.py', 'm.pth', '2', '--tta'],
                          cwd=tmp_path, env=clean_env(PYTHON=fake_python), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == (
        f'ARGS -m torch.distributed.run --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 '
        f'--nproc_per_node=2 --master_port=29500 {TOOLS}/test.py cfg.py m.pth '
        f'--launcher pytorch --tta')


def test_launchers_print_usage_without_arguments(tmp_path):
    for script in ('dist_train.sh', 'dist_test.sh', 'slurm_train.sh', 'slurm_test.sh'):
        proc = subprocess.run(['bash', str(TOOLS / script)], cwd=tmp_path, env=clean_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and 'usage:' in proc.stderr, script


def test_slurm_train_runs_srun_with_the_tool(tmp_path):
    fake = tmp_path / 'srun'
    fake.write_text('#!/bin/sh\necho "SRUN $*"\n')
    fake.chmod(0o755)
    env = clean_env(PATH=f'{tmp_path}:{os.environ["PATH"]}', GPUS='16')
    proc = subprocess.run(['bash', str(TOOLS / 'slurm_train.sh'), 'part', 'job', 'cfg.py', 'wd',
                           '--amp'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith('SRUN')][0]
    assert '-p part --job-name=job --gres=gpu:8 --ntasks=16 --ntasks-per-node=8' in line
    assert f'{TOOLS}/train.py cfg.py --work-dir=wd --launcher=slurm --amp' in line


@pytest.mark.parametrize('fails', [False, True])
def test_run_tool_closes_the_process_group(tmp_path, fails):
    """The tools close a process group the run started, also when the run ends in a LaunchError."""
    import torch.distributed as dist

    def main(argv):
        dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                                world_size=1)
        if fails:
            raise launch.LaunchError('no data')

    assert not dist.is_initialized()
    assert launch.run_tool(main, []) == (1 if fails else 0)
    assert not dist.is_initialized()


@pytest.mark.parametrize('fails', [False, True])
def test_run_tool_frees_the_run_before_closing_the_process_group(monkeypatch, fails):
    """The Runner, its hooks and DDP sit in reference cycles; DDP's reducer holds the gloo group
    and its threads. They must be gone before the group is closed, not at interpreter teardown
    (SIGABRT there). Automatic collection is off here, so only run_tool's own one counts."""
    import gc
    import weakref

    class Run:  # stands for the Runner: an object in a reference cycle
        pass

    runs = []

    def main(argv):
        run = Run()
        run.self = run
        runs.append(weakref.ref(run))
        if fails:
            raise launch.LaunchError('no data')

    freed = []
    monkeypatch.setattr(launch, '_close_process_group',
                        lambda wait_for_others: freed.append(runs[0]() is None))
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert launch.run_tool(main, []) == (1 if fails else 0)
    finally:
        if enabled:
            gc.enable()
    assert freed == [True]
