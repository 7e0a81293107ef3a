"""Every model-zoo config builds its model and runs one training iteration and one test forward
on the CPU, on a tiny synthetic batch (two images of 64 px; 128 px for DINO, whose 900 queries
are picked from the tokens of all five levels).

What the test changes in each config, and why: the backbone starts from a random
initialisation (no weights file on a fresh install); fixed-size padding (Mask2Former's 1024 px
large-scale-jitter pad, mmseg's 512 px crop pad) is set to the tiny image size; SyncBN becomes
BN as mmengine's runner does it in a non-distributed run; the optimizer wrapper is the plain
fp32 one (mixed precision is the GPU's business; its CPU path is tested with the tools). The
model, its losses, the optimizer and its per-parameter rules are the config's.

After the backward pass every parameter that trains must have a gradient: distributed training
(DDP) stops on parameters that take no part in the loss. Slow (minutes on two cores), so in the
slow suite: ``python -m pytest -m slow tests/e2e/test_zoo_one_iteration.py``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from toolkits import toolkit_models  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs'
IMAGE_SIZE = 64
IMAGE_SIZE_FOR = {'dino/swin_l_coco.py': 128}  # >= 900 tokens over the 5 levels
ZOO = [
    'retinanet/swin_t_coco.py',
    'mask2former/swin_t_coco.py',
    'mask2former/swin_s_coco.py',
    'mask2former/swin_t_coco_panoptic.py',
    'mask2former/swin_l_coco_panoptic.py',
    'mask2former/swin_t_ade20k.py',
    'dino/swin_l_coco.py',
    'upernet/swin_b_ade20k_in22k.py',
    'upernet/swin_b_ade20k_w12_in22k.py',
    'upernet/swin_l_ade20k_in22k.py',
    'upernet/swin_l_ade20k_w12_in22k.py',
    'cascade_mask_rcnn/swin_t_coco_3x.py',
    'cascade_mask_rcnn/swin_s_coco_3x.py',
    'cascade_mask_rcnn/swin_b_coco_3x.py',
    'mask_rcnn/swinv2_t_coco.py',
    'upernet/swinv2_b_ade20k.py',
]


def _small(cfg: Config, size: int) -> None:
    """Random backbone initialisation, and fixed-size padding shrunk to the tiny images."""
    cfg.model.backbone.init_cfg = None
    preprocessor = cfg.model.data_preprocessor
    for augment in preprocessor.get('batch_augments') or []:
        augment['size'] = (size, size)  # mmdet's large-scale jitter pads to 1024 x 1024
    if 'size' in preprocessor:
        preprocessor['size'] = (size, size)  # mmseg pads training crops to 512 x 512


def _detection_batch(size: int, panoptic: bool) -> dict:
    from mmdet.testing import demo_mm_inputs
    # two images of different shapes, 3 and 2 objects with boxes and masks, 10 classes
    return demo_mm_inputs(2, image_shapes=[(3, size, size), (3, size - 8, size)],
                          num_items=[3, 2], num_classes=10, with_mask=True,
                          with_semantic=panoptic)


def _segmentation_batch(size: int, num_classes: int) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        labels = torch.randint(0, num_classes, (1, size, size), generator=generator)
        labels[:, :4] = 255  # an ignored band, as ADE20K's unlabelled pixels
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
              for _ in range(2)]
    return dict(inputs=images, data_samples=samples)


@pytest.mark.parametrize('name', ZOO)
def test_one_training_iteration_and_one_test_forward(name):
    cfg = Config.fromfile(str(CONFIGS / name))  # imports swin_dense (custom_imports)
    import swin_dense
    if not hasattr(swin_dense, cfg.model.backbone.type):
        pytest.skip(f'{cfg.model.backbone.type} is not in swin_dense yet')
    size = IMAGE_SIZE_FOR.get(name, IMAGE_SIZE)
    _small(cfg, size)
    models = toolkit_models(cfg.default_scope)
    torch.manual_seed(0)
    model = models.build(cfg.model)
    model.init_weights()
    model = revert_sync_batchnorm(model)  # what the runner does without distributed training
    assert type(model.backbone).__name__ == cfg.model.backbone.type  # SwinBackbone or SwinV2Backbone
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    optim_wrapper = build_optim_wrapper(
        model, {k: v for k, v in cfg.optim_wrapper.items() if k != 'loss_scale'} |
        {'type': 'OptimWrapper'})

    panoptic = bool(cfg.model.get('test_cfg', {}).get('panoptic_on', False))
    if cfg.default_scope == 'mmdet':
        batch = _detection_batch(size, panoptic)
    else:
        batch = _segmentation_batch(size, cfg.model.decode_head.num_classes)

    # one training iteration: forward, backward, optimizer step
    model.train()
    data = model.data_preprocessor(batch, True)
    assert data['inputs'].shape[-2:] == (size, size)
    loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss) and loss.item() > 0, log_vars
    optim_wrapper.backward(loss)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [], f'parameters without a gradient (DDP would stop): {unused[:10]}'
    probe = model.backbone.get_parameter('stages.0.blocks.0.attn.w_msa.qkv.weight')
    before = probe.detach().clone()
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    assert (probe.detach() - before).abs().max() > 0  # the backbone is being trained

    # one test forward on the same images
    model.eval()
    with torch.no_grad():
        results = model.test_step(batch)
    assert len(results) == 2
    for result, sample in zip(results, batch['data_samples']):
        height, width = sample.ori_shape
        if cfg.default_scope == 'mmseg':
            assert tuple(result.pred_sem_seg.data.shape) == (1, height, width)
            continue
        boxes = result.pred_instances.bboxes
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and torch.isfinite(boxes).all()
        assert len(result.pred_instances.scores) == len(boxes)
        if 'masks' in result.pred_instances:
            assert tuple(result.pred_instances.masks.shape[1:]) == (height, width)
        if panoptic:
            assert tuple(result.pred_panoptic_seg.sem_seg.shape[-2:]) == (height, width)
