"""Reading a config as the toolkits' tools do, and picking its toolkit.

The command-line options both tools share, the config file (with close matches when the path is
wrong), ``--cfg-options``, the launcher and the work dir, the toolkit from ``default_scope``, and
the synthetic demo dataset a config may ask for.
"""
from __future__ import annotations

import argparse
import difflib
import os
import os.path as osp
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .errors import ConfigNotFoundError, UnsupportedToolkitError

if TYPE_CHECKING:
    from mmengine.config import Config

__all__ = ['TOOLKITS', 'add_launch_arguments', 'load_config', 'parse_tool_args',
           'prepare_demo_data', 'registry', 'setup_local_rank', 'setup_toolkit', 'toolkit_of']

TOOLKITS = ('mmdet', 'mmseg')
# The configs shipped beside the package, searched for close matches of a mistyped path (absent
# when the package is installed without its repository).
_SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / 'configs'


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local-rank``, as both upstream tools take them."""
    from mmengine.config import DictAction
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy format '
        'will be merged into config file. If the value to be overwritten is a list, it should be '
        'like key="[a,b]" or key=a,b It also allows nested list/tuple values, e.g. '
        'key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no white '
        'space is allowed.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_tool_args(parser: argparse.ArgumentParser,
                    argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the tool's arguments and export ``LOCAL_RANK`` (:func:`setup_local_rank`)."""
    args = parser.parse_args(argv)
    setup_local_rank(args.local_rank)
    return args


def setup_local_rank(local_rank: int) -> None:
    """As upstream: ``torch.distributed.launch`` passes ``--local-rank``; torchrun sets the env."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)


def _config_candidates(path: str) -> list[str]:
    """Existing config files whose names are close to ``path``'s, for the not-found message."""
    p = Path(path)
    dirs = [p.parent if str(p.parent) else Path('.')]
    for base in (Path.cwd(), _SHIPPED_CONFIGS.parent):
        try:
            rel = p.parent if not p.is_absolute() else p.parent.relative_to(base)
        except ValueError:
            continue
        dirs.append(base / rel)
    names: dict[str, str] = {}
    for d in dirs:
        if d.is_dir():
            for f in d.glob('*.py'):
                names.setdefault(f.name, str(f))
    if not names and _SHIPPED_CONFIGS.is_dir():  # the directory itself is wrong
        for f in _SHIPPED_CONFIGS.rglob('*.py'):
            names.setdefault(f.name, str(f))
    close = difflib.get_close_matches(p.name, list(names), n=3, cutoff=0.5)
    return [names[n] for n in close]


def load_config(path: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                work_dir: Optional[str] = None) -> Config:
    """Read a config as the upstream tools do: ``Config.fromfile``, then ``--cfg-options``,
    ``launcher`` and the work dir (CLI > ``work_dir`` in the config > ``./work_dirs/NAME``)."""
    from mmengine.config import Config

    if not osp.isfile(path):
        close = _config_candidates(path)
        hint = ('; did you mean ' + ' or '.join(close) + '?') if close else ''
        where = '' if osp.isabs(path) else f' (relative to the working directory {os.getcwd()})'
        raise ConfigNotFoundError(f'config file not found: {path}{where}{hint}')
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def toolkit_of(cfg: Config) -> str:
    """``'mmdet'`` or ``'mmseg'`` from the config's ``default_scope``; anything else is an error."""
    scope = cfg.get('default_scope', None)
    if scope not in TOOLKITS:
        raise UnsupportedToolkitError(
            f"config default_scope is {scope!r}; these tools drive {' and '.join(TOOLKITS)} "
            "configs only: set default_scope = 'mmdet' (detection) or 'mmseg' (segmentation), "
            "or inherit from a base config that does (e.g. mmdet::_base_/default_runtime.py)")
    return scope


def setup_toolkit(cfg: Config) -> str:
    """Register the modules of the config's toolkit (picked from ``default_scope``) and this
    package's hooks and optim wrapper; return the toolkit."""
    toolkit = toolkit_of(cfg)
    if toolkit == 'mmdet':
        from mmdet.utils import register_all_modules, setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    from .. import integrations  # noqa: F401 - registers the hooks and the optim wrapper
    # torch >= 2.6 loads weights_only by default; mmengine's own checkpoints (resume, load_from,
    # test) carry HistoryBuffer / numpy metadata: allow-list exactly those types
    from ..checkpoint import register_mmengine_safe_globals
    register_mmengine_safe_globals()
    return toolkit


def registry(toolkit: str, name: str):
    """The toolkit's registry ``name`` (``MODELS``, ``RUNNERS``...)."""
    module = __import__(f'{toolkit}.registry', fromlist=[name])
    return getattr(module, name)


def prepare_demo_data(cfg: Config) -> Optional[Path]:
    """Build the config's ``demo_data = dict(kind=..., root=..., ...)`` dataset when absent
    (safe from several processes); None when the config has none."""
    spec: Any = cfg.get('demo_data', None)
    if not spec:
        return None
    from ..demo_data import ensure_demo_data
    spec = dict(spec)
    kind = spec.pop('kind')
    root = spec.pop('root')
    return ensure_demo_data(kind, root, **spec)
