"""Giving memory back to the operating system between stages (CPU).

``trim_heap``: a collection pass (a stage's objects can sit in reference cycles) and glibc's ``malloc_trim``,
which returns freed heap pages. PyTorch's CPU allocator frees through glibc, and glibc keeps what it freed
below its (self-raising) mmap threshold for the process to reuse: after an update the process held ~2 GB it
no longer used (bench/bench_step.py, SmolLM2).

``drop_pages``: tell the kernel the pages behind some tensors' storage hold nothing worth keeping
(``madvise(MADV_DONTNEED)``). Private anonymous pages are then freed at once; the memory stays mapped and
reads back as zeros, which is what a freshly ``torch.zeros``-allocated buffer holds. Only for buffers whose
contents the owner no longer needs (a KV cache whose every block was freed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import mmap
from collections.abc import Iterable

log = logging.getLogger(__name__)

MADV_DONTNEED = 4


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def trim_heap() -> bool:
    """Collect garbage, then return glibc's free heap pages to the system; False where there is no glibc."""
    gc.collect()
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def drop_pages(tensors: Iterable) -> int:
    """Free the whole pages behind each distinct CPU storage of ``tensors``; bytes freed. The storages'
    contents are gone afterwards (they read as zeros)."""
    libc = _libc()
    if libc is None:
        return 0
    page, seen, freed = mmap.PAGESIZE, set(), 0
    for t in tensors:
        if t is None or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in seen or size == 0:
            continue
        seen.add(ptr)
        start, end = -(-ptr // page) * page, (ptr + size) // page * page
        if end <= start:
            continue
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) != 0:
            log.warning("madvise(MADV_DONTNEED) failed (errno %d): pages kept", ctypes.get_errno())
            continue
        freed += end - start
    return freed
