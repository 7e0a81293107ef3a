"""All-or-nothing writes of files and folders: the one place the package makes them.

A checkpoint, a converted weights file or a generated dataset is either there whole or not at
all: each is written beside its destination under a temporary name, made durable (fsync), then
renamed onto the destination, which readers never see half-written. Imports nothing from the
package.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

#: Suffix of the temporaries :func:`atomic_write` makes (``.NAME.XXXXXX.tmp``).
TMP_SUFFIX = '.tmp'

PathLike = Union[str, os.PathLike]


def fsync_dir(directory: PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _default_permissions(path: str, mode: int) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; give what a plain open / mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write the file ``path`` all or nothing.

    ``write(tmp)`` fills a temporary file (given by its path) in the same directory, which is
    then fsynced and renamed onto ``path``. On any error, or a crash, ``path`` keeps its previous
    content; the temporary is removed on errors, and by :func:`remove_stale_temporaries` after a
    crash.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=TMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        _default_permissions(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def remove_stale_temporaries(directory: PathLike,
                             match: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Delete the temporaries :func:`atomic_write` left in ``directory`` when a process was
    killed mid-write, for the destination names that ``match(name)`` accepts. Returns the paths
    removed."""
    removed = []
    pattern = os.path.join(glob.escape(os.fspath(directory)), f'.*{TMP_SUFFIX}')
    for tmp in glob.glob(pattern):
        name = os.path.basename(tmp)[1:-len(TMP_SUFFIX)].rsplit('.', 1)[0]  # .NAME.XXXX.tmp
        if not match(name):
            continue
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:  # pragma: no cover - already gone
            pass
    return removed


def atomic_directory(root: PathLike, build: Callable[[Path], None]) -> Path:
    """Build the folder ``root`` all or nothing.

    ``build(tmp)`` fills a temporary sibling folder, which then replaces ``root`` (an existing
    ``root`` is moved aside first and deleted after the swap). Temporaries of earlier builders
    that were killed are removed first; callers that may run concurrently hold a lock.
    """
    root = Path(os.path.abspath(root))
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(f'.{root.name}.tmp-*'):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-', dir=root.parent))
    try:
        build(tmp)
        _default_permissions(str(tmp), 0o777)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-', dir=root.parent))
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root.parent)
    return root
