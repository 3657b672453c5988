"""Devices and memory: which torch device and autocast dtype a stage runs with, and the peak memory of a block."""

from __future__ import annotations

import functools
import threading

import torch

# CPU flags of native bf16 matrix instructions: with them oneDNN runs a bf16 GEMM ~4× faster than fp32 (measured
# on an EPYC with avx512_bf16: bench/bench_update.py); without them bf16 is emulated and slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices natively (``NATIVE_BF16_FLAGS`` in its flags)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for plain fp32). ``dtype="auto"``: bf16 autocast on CUDA and on a CPU
    with native bf16 matmuls (``cpu_native_bf16``), fp32 elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("update device 'cuda' requested but torch sees no CUDA device")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" or cpu_native_bf16() else "float32"
    return torch.device(device), (torch.bfloat16 if dtype == "bfloat16" else None)


class PeakMemory:
    """Peak memory (MB) over a block: CUDA max_memory_allocated, or on CPU the process's peak RSS sampled
    every 10 ms (the process's lifetime maximum, ru_maxrss, would include whatever ran before)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())
