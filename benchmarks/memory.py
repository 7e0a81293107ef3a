"""Peak memory of one step: on the CPU the growth of the process's peak RSS, on CUDA the
growth of ``max_memory_allocated``."""
from __future__ import annotations

import ctypes
from typing import Callable

import torch


def proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def peak_memory_in_this_process(run: Callable[[], object]) -> float:
    """Growth of this process's peak RSS over ``run()``, in MiB.

    Meant for a fresh process started with ``MALLOC_MMAP_THRESHOLD_`` fixed, so that freed
    tensors leave RSS and the figure follows live memory rather than glibc's retained heap."""
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    reset_peak_rss()  # the high-water mark so far includes memory freed after the build
    base = proc_status_kib('VmRSS')
    run()
    return (proc_status_kib('VmHWM') - base) / 1024


def cuda_peak_growth_mib(run: Callable[[], object]) -> float:
    """Growth of ``max_memory_allocated`` over ``run()``, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def cuda_peak_memory_in_process(warm_up: Callable[[], object], run: Callable[[], object]
                                ) -> float:
    """Peak growth of ``max_memory_allocated`` over ``run()`` in this process, in MiB, after
    ``warm_up()`` (a small step of the same model).

    ``max_memory_allocated`` counts live tensors, not the caching allocator's reserve, so the
    cases timed before do not enter it; the warm-up keeps out what a process allocates once
    (the cuBLAS workspace), which a fresh child would count for both models alike.
    """
    warm_up()
    return cuda_peak_growth_mib(run)
