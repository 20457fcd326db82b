"""Benchmark: fused score_and_select vs the torch composite of ``vfd_select``/``force_eos``.

GPU goal (issue): >= 3x the torch composite. Bytes counted: values/tokens/logprobs, row_idx, the four
row-table reads per row, the outputs, and the winner-hidden gather (read + write).
"""

from __future__ import annotations

import torch
from _common import Row, bench_pair, device, peak_bandwidth, print_rows

from value_steer.core.modes import MODE_ABSTAIN, MODE_VFD
from value_steer.core.row_table import RowTable
from value_steer.kernels import score_and_select, score_and_select_reference


def make_inputs(r: int, k: int, h: int, dev: torch.device):
    g = torch.Generator().manual_seed(0)
    table = RowTable.empty(64)
    for row in range(1, 64):
        table.set_row(row, mode=(MODE_VFD, MODE_ABSTAIN)[row % 2], threshold=0.5, sign=1.0, num_candidates=k)
    values = torch.rand(r, k, generator=g)
    tokens = torch.randint(0, 50_000, (r, k), generator=g)
    logprobs = -torch.rand(r, k, generator=g)
    row_idx = torch.randint(0, 64, (r,), generator=g, dtype=torch.int32)
    hidden = torch.randn(r * k, h, generator=g).to(torch.bfloat16) if h else None
    tensors = [values, tokens, logprobs, row_idx, table.threshold, table.sign, table.mode, table.num_candidates]
    out = [t.to(dev) for t in tensors]
    out.append(None if hidden is None else hidden.to(dev))
    return out


def run(dev: torch.device | None = None) -> list[Row]:
    dev = dev or device()
    rows = []
    for r, k, h in [(64, 8, 4096), (256, 4, 0), (1024, 8, 0)]:
        args = make_inputs(r, k, h, dev)
        ours, ref = bench_pair(
            lambda args=args: score_and_select(*args), lambda args=args: score_and_select_reference(*args), dev
        )
        nbytes = r * k * (4 + 8 + 4) + r * 4 + r * 16 + r * (8 + 8 + 4 + 4 + 1 + 1) + 2 * r * h * 2
        shape = f"R={r} K={k}" + (f" H={h}" if h else "")
        rows.append(Row("score_and_select", shape, "fp32 (+bf16 hidden)" if h else "fp32", ours, ref, nbytes,
                        ">=3x", 3.0, None))  # fmt: skip
    return rows


if __name__ == "__main__":
    d = device()
    bw, how = peak_bandwidth(d)
    print(f"# score_and_select on {d} — peak BW {how}")
    print_rows(run(d), bw)
