"""Benchmark: grouped (multi-head) value head vs the single-head op (``python benchmarks/bench_value_head_grouped.py``).

The question: what does a batch mixing 8 value heads cost against the same batch on one head? Per batch
size M (32, 64, 256) at H = 576 (SmolLM2-135M) with fp32 weights, interleaved in one run:

- ``one head``: all rows head 0 through the single-head op ``value_head``;
- ``grouped, 8 heads, round-robin`` / ``random``: ``value_head_grouped`` with row m on head ``m % 8`` /
  a seeded random head;
- ``grouped, 1 head``: ``value_head_grouped`` with one stacked head, all rows head 0 (the op's own
  overhead: the sort, the gather and the scatter are skipped for rows already in head order).

Target: one-head time / grouped-8 time >= 0.9. The grouped op does the same FLOPs; what it adds is weight
traffic (8 heads x 2 x H^2 x 4 B = 21 MB against 2.6 MB at H = 576) and the gather / scatter of rows.

Times are medians over interleaved rounds (each round times every variant back to back), so background
load hits all variants alike. CPU: the C++ extension, ``--threads`` torch threads (default 1, as
``run_all.py``). ``run()`` gives ``run_all.py`` its rows: the grouped op against the torch composite it
replaces (a per-head loop of ``value_head_reference`` over that head's rows).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _common import Row, _time_once, bench_pair, device, device_name, quick

from value_steer.core.value_head import ValueHead, value_head_reference
from value_steer.kernels import (
    prepare_value_head_grouped_weights,
    prepare_value_head_weights,
    value_head,
    value_head_grouped,
)

H = 576
NUM_HEADS = 8
BATCHES = (32, 64, 256)


def _setup(dev: torch.device, h: int = H, nh: int = NUM_HEADS) -> tuple[list[tuple[torch.Tensor, ...]], tuple]:
    torch.manual_seed(0)
    heads = [ValueHead(h).to(dev) for _ in range(nh)]
    return [prepare_value_head_weights(hd, torch.float32) for hd in heads], prepare_value_head_grouped_weights(heads)


def _head_idx(m: int, how: str, nh: int, dev: torch.device) -> torch.Tensor:
    if how == "round-robin":
        return (torch.arange(m, dtype=torch.int32) % nh).to(dev)
    g = torch.Generator().manual_seed(m)
    return torch.randint(0, nh, (m,), generator=g, dtype=torch.int32).to(dev)


def median_times_us(fns: dict[str, Callable[[], object]], dev: torch.device, rounds: int, round_s: float) -> dict:
    """Median microseconds per call of each fn over ``rounds`` interleaved rounds of ~``round_s`` each."""
    iters = {}
    for name, fn in fns.items():
        fn()  # warm-up (compilation, allocator)
        iters[name] = int(max(1, min(1000, round_s / max(_time_once(fn, dev, 1), 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, dev, iters[name]) * 1e6)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def grouped_vs_one_head(dev: torch.device, rounds: int = 15, round_s: float = 0.05) -> list[dict]:
    """One result dict per batch size: median us of each variant and the one-head / grouped-8 ratios."""
    singles, stacked = _setup(dev)
    one_stacked = tuple(t[:1] for t in stacked)  # a 1-head stack: head 0 alone
    out = []
    for m in BATCHES:
        x = torch.randn(m, H, device=dev)
        zeros = torch.zeros(m, dtype=torch.int32, device=dev)
        rr, rnd = _head_idx(m, "round-robin", NUM_HEADS, dev), _head_idx(m, "random", NUM_HEADS, dev)
        fns = {
            "one head (value_head)": lambda x=x: value_head(x, *singles[0]),
            "grouped, 8 heads, round-robin": lambda x=x, i=rr: value_head_grouped(x, i, *stacked),
            "grouped, 8 heads, random": lambda x=x, i=rnd: value_head_grouped(x, i, *stacked),
            "grouped, 1 head": lambda x=x, i=zeros: value_head_grouped(x, i, *one_stacked),
        }
        t = median_times_us(fns, dev, rounds, round_s)
        one = t["one head (value_head)"]
        out.append(
            {
                "m": m,
                "times": t,
                "ratio_rr": one / t["grouped, 8 heads, round-robin"],
                "ratio_random": one / t["grouped, 8 heads, random"],
                "ratio_1": one / t["grouped, 1 head"],
            }
        )
    return out


def format_results(results: list[dict]) -> list[str]:
    lines = [
        "| M | one head (µs) | grouped 8 heads, round-robin (µs) | grouped 8 heads, random (µs) | grouped 1 head (µs) "
        "| one-head / grouped-8 (rr, random) | one-head / grouped-1 | target >= 0.9 |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        t = r["times"]
        met = "yes" if min(r["ratio_rr"], r["ratio_random"]) >= 0.9 else "NO"
        lines.append(
            f"| {r['m']} | {t['one head (value_head)']:,.0f} | {t['grouped, 8 heads, round-robin']:,.0f} | "
            f"{t['grouped, 8 heads, random']:,.0f} | {t['grouped, 1 head']:,.0f} | "
            f"{r['ratio_rr']:.2f}, {r['ratio_random']:.2f} | {r['ratio_1']:.2f} | {met} |"
        )
    return lines


def torch_per_head_loop(x: torch.Tensor, head_idx: torch.Tensor, singles: list[tuple[torch.Tensor, ...]]):
    """The composite the grouped op replaces: each head in use on its own rows (boolean masks, host syncs)."""
    idx = head_idx[: x.shape[0]]
    out = torch.empty(x.shape[0], device=x.device)
    for g, w in enumerate(singles):
        rows = idx == g
        if bool(rows.any()):
            out[rows] = value_head_reference(x[rows], *w)
    return out


def run(dev: torch.device | None = None) -> list[Row]:
    """``run_all.py`` rows: the grouped op (8 heads, random assignment) against the per-head torch loop."""
    dev = dev or device()
    singles, stacked = _setup(dev)
    rows = []
    for m in (64,) if quick() else (64, 256):
        x = torch.randn(m, H, device=dev)
        idx = _head_idx(m, "random", NUM_HEADS, dev)
        ours, ref = bench_pair(
            lambda x=x, i=idx: value_head_grouped(x, i, *stacked),
            lambda x=x, i=idx: torch_per_head_loop(x, i, singles),
            dev,
        )
        nbytes = NUM_HEADS * (2 * H * H * 4 + 3 * H * 4 + 4) + m * H * 4 + 2 * m * H * 4 + m * 8
        rows.append(Row("value_head_grouped", f"M={m} H={H} NH={NUM_HEADS}", "w=float32 x=fp32", ours, ref, nbytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU only: torch threads (default 1, as run_all.py)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median reported)")
    args = parser.parse_args()
    dev = device()
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    results = grouped_vs_one_head(dev, rounds=3 if quick() else args.rounds)
    print(f"# value_head_grouped on {device_name(dev)}: H={H}, fp32 weights, fp32 x, {NUM_HEADS} heads")
    print(f"# median of {3 if quick() else args.rounds} interleaved rounds")
    for line in format_results(results):
        print(line)


if __name__ == "__main__":
    main()
