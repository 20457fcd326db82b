"""Shared benchmark plumbing: timing, device description, peak memory bandwidth, result rows.

GPU: times the public ops (``value_steer.kernels.*``, i.e. the Triton launchers behind the custom ops)
with CUDA events over back-to-back eager calls (launch overhead included, no CUDA graph). CPU: times
the same ops, which dispatch to the C++ extension ``value_steer._C`` (never the Triton interpreter),
with ``time.perf_counter``. Ours and the torch baseline (the reference composite each op replaces) are
measured in interleaved rounds and the fastest round of each is reported (see ``bench_pair``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Peak HBM bandwidth by device-name substring (bytes/s), most specific first.
GPU_PEAK_BW: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 / "H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
)


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    ours_us: float
    torch_us: float
    bytes_moved: int
    target: str = ""  # the GPU goal from the issue, as text
    target_speedup: float | None = None  # minimum speedup the goal asks for
    target_pct_peak: float | None = None  # minimum % of peak bandwidth the goal asks for

    @property
    def speedup(self) -> float:
        return self.torch_us / self.ours_us if self.ours_us > 0 else float("nan")

    def gbps(self) -> float:
        return self.bytes_moved / (self.ours_us * 1e-6) / 1e9

    def pct_peak(self, peak_bw: float | None) -> float | None:
        return None if not peak_bw else 100.0 * self.bytes_moved / (self.ours_us * 1e-6) / peak_bw


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU {model} ({n} thread{'s' if n != 1 else ''})"


_CPU_PEAK: float | None = None


def peak_bandwidth(dev: torch.device) -> tuple[float | None, str]:
    """``(bytes/s, how it was obtained)``: a datasheet lookup on GPU, a measured memcpy on CPU."""
    global _CPU_PEAK
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, bw in GPU_PEAK_BW:
            if key in name:
                return bw, f"datasheet peak for {key}: {bw / 1e12:.2f} TB/s"
        return None, f"no datasheet peak known for {name!r}"
    if _CPU_PEAK is None:
        n = 64 * 1024 * 1024  # 256 MiB of fp32, well past the caches
        src = torch.ones(n)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK = 2 * src.numel() * src.element_size() / best  # read + write
    return _CPU_PEAK, f"measured: best of 10 x 256 MiB tensor copy = {_CPU_PEAK / 1e9:.1f} GB/s (read+write)"


def _time_once(fn: Callable[[], object], dev: torch.device, iters: int) -> float:
    """Mean seconds per call over ``iters`` back-to-back calls."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def bench_pair(
    ours: Callable[[], object], ref: Callable[[], object], dev: torch.device, *, budget_s: float = 0.4, rounds: int = 5
) -> tuple[float, float]:
    """Times of one ``ours()`` and one ``ref()`` call in microseconds.

    Both are warmed up, then measured in ``rounds`` interleaved rounds (ours, ref, ours, ref, ...) of
    several calls each, and the fastest round of each is kept: on a shared machine the minimum is the
    most reproducible estimate, and interleaving exposes both sides to the same background load.
    """
    if quick():
        budget_s, rounds = budget_s / 4, 3
    fns = (ours, ref)
    iters = []
    for fn in fns:
        fn()  # warm-up (compilation, allocator)
        one = max(_time_once(fn, dev, 1), 1e-7)
        iters.append(int(max(1, min(1000, budget_s / (2 * rounds) / one))))
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _time_once(fn, dev, iters[i]))
    return best[0] * 1e6, best[1] * 1e6


def quick() -> bool:
    """``VALUE_STEER_BENCH_QUICK=1`` shrinks the timing budget (CI smoke runs)."""
    return os.environ.get("VALUE_STEER_BENCH_QUICK") == "1"


def print_rows(rows: list[Row], peak_bw: float | None) -> None:
    for line in format_table(rows, peak_bw):
        print(line)


def format_table(rows: list[Row], peak_bw: float | None, gpu: bool | None = None) -> list[str]:
    gpu = torch.cuda.is_available() if gpu is None else gpu
    head = "| op | shape | dtype | ours (µs) | torch (µs) | speedup | GB/s | % peak BW | GPU target | met |"
    out = [head, "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        pct = r.pct_peak(peak_bw)
        met = ""
        if gpu and (r.target_speedup is not None or r.target_pct_peak is not None):
            ok = (r.target_speedup is None or r.speedup >= r.target_speedup) and (
                r.target_pct_peak is None or (pct is not None and pct >= r.target_pct_peak)
            )
            met = "yes" if ok else "NO"
        elif r.target:
            met = "n/a (CPU)"
        out.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.ours_us:,.1f} | {r.torch_us:,.1f} | {r.speedup:.2f}x | "
            f"{r.gbps():,.1f} | {'' if pct is None else f'{pct:.1f}%'} | {r.target} | {met} |"
        )
    return out
