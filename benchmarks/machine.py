"""What a benchmark figure depends on besides the code: the CPU (model, vector extensions,
cores, caches), the GPU and its driver, and how torch was built.

Read from the OS (``/proc/cpuinfo``, ``/sys/devices/system/cpu``, ``nvidia-smi``) and from torch;
anything the OS does not say is left out or ``None`` rather than guessed.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

#: The CPU flags that decide how fast torch's kernels run (GEMM, elementwise, bf16/int8 paths),
#: in the order they are printed.
VECTOR_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx_vnni', 'avx512f', 'avx512dq',
                'avx512bw', 'avx512vl', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile',
                'amx_bf16', 'amx_int8', 'amx_fp16', 'asimd', 'sve', 'sve2')
CACHE_ROOT = Path('/sys/devices/system/cpu/cpu0/cache')


def read_cpuinfo(text: Optional[str] = None) -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (``model name``, ``flags``, ...)."""
    if text is None:
        try:
            text = Path('/proc/cpuinfo').read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    return fields


def physical_cores(text: Optional[str] = None) -> Optional[int]:
    """Distinct (package, core) pairs in ``/proc/cpuinfo``; ``None`` where it does not say."""
    if text is None:
        try:
            text = Path('/proc/cpuinfo').read_text()
        except OSError:
            return None
    pairs = set()
    for block in re.split(r'\n\s*\n', text):
        fields = dict(line.partition(':')[::2] for line in block.splitlines())
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if 'core id' in fields:
            pairs.add((fields.get('physical id'), fields['core id']))
    return len(pairs) or None


def cache_sizes_kib(root: Path = CACHE_ROOT) -> dict[str, int]:
    """Cache sizes seen by CPU 0, in KiB: ``{"L1d": 48, "L1i": 32, "L2": 1024, "L3": 32768}``.

    L1 and L2 are usually per core, L3 shared by several cores (the size is that of the one
    instance CPU 0 uses)."""
    sizes: dict[str, int] = {}
    for index in sorted(root.glob('index*')):
        try:
            level = (index / 'level').read_text().strip()
            kind = (index / 'type').read_text().strip()
            size = (index / 'size').read_text().strip()
        except OSError:
            continue
        name = f'L{level}' + {'Data': 'd', 'Instruction': 'i'}.get(kind, '')
        match = re.fullmatch(r'(\d+)([KMG]?)', size)
        if match:
            sizes[name] = int(match.group(1)) * {'': 1, 'K': 1, 'M': 1024,
                                                 'G': 1024 ** 2}[match.group(2)]
    return sizes


def _size_text(kib: int) -> str:
    return f'{kib // 1024} MiB' if kib >= 1024 and kib % 1024 == 0 else f'{kib} KiB'


def gpu_driver() -> Optional[str]:
    """The NVIDIA driver version (``nvidia-smi``), or ``None`` where it cannot be asked."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def torch_build() -> dict:
    """How this torch was built: BLAS, oneDNN and MKL versions, the CPU kernels it dispatches
    to on this machine (``get_cpu_capability``), CUDA."""
    config = torch.__config__.show()

    def find(pattern: str) -> Optional[str]:
        match = re.search(pattern, config)
        return match.group(1) if match else None

    capability = getattr(torch.backends.cpu, 'get_cpu_capability', lambda: None)()
    return dict(
        blas=find(r'BLAS_INFO=(\w+)'),
        mkl=find(r'Math Kernel Library Version ([\w.]+)') if torch.backends.mkl.is_available()
        else None,
        onednn=find(r'MKL-DNN (v[\w.]+)') if torch.backends.mkldnn.is_available() else None,
        cpu_capability=capability,
        cuda=torch.version.cuda,
    )


def describe_cpu(model: str, cores: Optional[int], flags: list[str],
                 caches: dict[str, int]) -> str:
    """One line: model, cores, vector extensions, caches."""
    parts = [model]
    if cores:
        parts.append(f'{cores} cores')
    if flags:
        parts.append(' '.join(flags))
    if caches:
        parts.append(', '.join(f'{name} {_size_text(kib)}' for name, kib in caches.items()
                               if name != 'L1i'))
    return '; '.join(parts)


def machine_record(device: str = 'cpu', label: Optional[str] = None) -> dict:
    """The ``machine`` object of a results file (see docs/performance.md, "Results as data")."""
    info = read_cpuinfo()
    model = (info.get('model name') or info.get('Model') or info.get('cpu model')
             or os.uname().machine)
    family = info.get('cpu family')
    if family is not None:
        model += f' (family {family}, model {info.get("model", "?")})'
    present = set((info.get('flags') or info.get('Features') or '').split())
    flags = [flag for flag in VECTOR_FLAGS if flag in present]
    cores = physical_cores() or os.cpu_count()
    caches = cache_sizes_kib()
    record = dict(
        label=label or 'CPU', cpu=describe_cpu(model, cores, flags, caches), cpu_model=model,
        cpu_flags=flags, cores=cores, logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        caches_kib=caches, gpu=None, gpu_driver=None)
    if device == 'cuda':
        name = torch.cuda.get_device_name()
        record.update(gpu=name, gpu_driver=gpu_driver(),
                      label=label or _gpu_label(name))
    return record


def _gpu_label(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``: the product name without the vendor."""
    words = [w for w in name.replace('NVIDIA', '').split() if w.upper() not in ('GEFORCE',
                                                                                 'TESLA')]
    return words[0] if words else 'GPU'


def header_lines(machine: dict, build: dict, threads: int) -> list[str]:
    """The machine as the benchmark prints it above its table."""
    lines = [f'# CPU: {machine["cpu"]}']
    if machine.get('gpu'):
        lines.append(f'# GPU: {machine["gpu"]}, driver {machine.get("gpu_driver") or "unknown"}'
                     f', CUDA {build.get("cuda")}')
    lines.append(f'# torch {torch.__version__}: BLAS {build.get("blas")}, MKL {build.get("mkl")}, '
                 f'oneDNN {build.get("onednn")}, CPU kernels {build.get("cpu_capability")}; '
                 f'{threads} threads')
    return lines
