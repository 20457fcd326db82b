"""Benchmark: ``steer_activations`` / ``steer_gate`` (one launch over all tokens) vs a per-request torch loop.

The baseline is what a layer hook without the op does: for every steered request, slice its token span,
form ``hidden + residual`` in fp32, apply the request's ops one by one with torch (add / projection cap /
ablate, the ``value_steer.core.activation`` formulas, no host-side validation) and write ``x' - residual``
back; the gate baseline computes each gated request's sigmoid the same way. A quarter of the requests are
unsteered (row 0), half of the steered ones gated. Bytes counted: steer_activations reads hidden + residual
once and writes the output once (bf16); steer_gate reads hidden + residual of the gated tokens. The bank
rows are a few KB and stay in cache.
"""

from __future__ import annotations

import torch
from _common import Row, bench_pair, device, peak_bandwidth, print_rows

from value_steer.core.activation import FLAG_DECODE, FLAG_PROMPT, OP_ABLATE, OP_ADD, OP_CAP
from value_steer.kernels import steer_activations, steer_gate

ALL = FLAG_PROMPT | FLAG_DECODE
# The op lists cycled over the steered requests: one add; add + cap; cap + ablate.
ROW_OPS = (
    [(OP_ADD, 0, 4.0, 0.0)],
    [(OP_ADD, 1, 2.0, 0.0), (OP_CAP, 2, -1.0, 1.0)],
    [(OP_CAP, 3, -0.5, 0.5), (OP_ABLATE, 0, 0.0, 0.0)],
)


def make_inputs(t: int, h: int, n_req: int, dev: torch.device, dtype: torch.dtype = torch.bfloat16):
    """Requests own contiguous token spans; request ``i`` has row ``i + 1`` or row 0 (every fourth)."""
    g = torch.Generator().manual_seed(0)
    r, m, s = n_req + 1, 4, 8
    hidden = torch.randn(t, h, generator=g).to(dtype)
    residual = torch.randn(t, h, generator=g).to(dtype)
    bank = torch.randn(s, h, generator=g)
    kind = torch.zeros(r, m, dtype=torch.int32)
    slot = torch.zeros(r, m, dtype=torch.int32)
    a, b = torch.zeros(r, m), torch.zeros(r, m)
    flags = torch.zeros(r, m, dtype=torch.int32)
    gate_slot = torch.full((r,), -1, dtype=torch.int32)
    token_row = torch.zeros(t, dtype=torch.int32)
    bounds = torch.linspace(0, t, n_req + 1).long().tolist()
    requests = []
    for i in range(n_req):
        row = 0 if i % 4 == 3 else i + 1
        start, end = bounds[i], bounds[i + 1]
        token_row[start:end] = row
        row_ops = [] if row == 0 else [(k, (sl + i) % s, av, bv) for k, sl, av, bv in ROW_OPS[i % len(ROW_OPS)]]
        for j, (k, sl, av, bv) in enumerate(row_ops):
            kind[row, j], slot[row, j], a[row, j], b[row, j], flags[row, j] = k, sl, av, bv, ALL
        if row and i % 2 == 0:
            gate_slot[row] = i % s
        requests.append((row, start, end, row_ops))
    token_decode = torch.ones(t, dtype=torch.int8)
    gate = torch.ones(t)
    tensors = [hidden, residual, token_row, token_decode, gate, bank, kind, slot, a, b, flags]
    gate_tabs = [gate_slot, torch.zeros(r), torch.full((r,), 4.0), torch.empty(t)]
    return [x.to(dev) for x in tensors], [x.to(dev) for x in gate_tabs], requests


def loop_baseline(hidden, residual, bank, requests) -> torch.Tensor:
    out = hidden.clone()
    for row, start, end, row_ops in requests:
        if row == 0 or not row_ops:
            continue
        res = residual[start:end].float()
        x = hidden[start:end].float() + res
        for kind, sl, av, bv in row_ops:
            v = bank[sl]
            if kind == OP_ADD:
                x = x + av * v
                continue
            u = v / v.norm()
            p = x @ u
            if kind == OP_CAP:
                x = x + (p.clamp(av, bv) - p).unsqueeze(-1) * u
            else:
                x = x + ((av - 1.0) * p).unsqueeze(-1) * u
        out[start:end] = (x - res).to(hidden.dtype)
    return out


def gate_loop_baseline(hidden, residual, bank, gate_slot_host, requests, gate_out) -> None:
    gate_out.fill_(1.0)
    for row, start, end, _ in requests:
        sl = gate_slot_host[row]
        if row == 0 or sl < 0:
            continue
        x = hidden[start:end].float() + residual[start:end].float()
        gate_out[start:end] = torch.sigmoid(4.0 * (x @ bank[sl]))


def run(dev: torch.device | None = None) -> list[Row]:
    dev = dev or device()
    rows = []
    for t, h, n_req in [(256, 4096, 256), (2048, 4096, 16), (4096, 4096, 64)]:
        args, gate_tabs, requests = make_inputs(t, h, n_req, dev)
        hidden, residual, token_row, bank = args[0], args[1], args[2], args[5]
        ours, ref = bench_pair(
            lambda args=args: steer_activations(*args),
            lambda args=args, requests=requests: loop_baseline(args[0], args[1], args[5], requests),
            dev,
        )
        # Same results (bf16 rounding apart) before timing anything.
        torch.testing.assert_close(steer_activations(*args), loop_baseline(hidden, residual, bank, requests),
                                   atol=5e-2, rtol=2e-2)  # fmt: skip
        nbytes = 3 * t * h * hidden.element_size()
        shape = f"T={t} H={h} reqs={n_req}"
        rows.append(Row("steer_activations", shape, "bf16 + residual", ours, ref, nbytes))
        gate_slot_host = gate_tabs[0].tolist()
        ours, ref = bench_pair(
            lambda h_=hidden, r_=residual, tr=token_row, bk=bank, gt=gate_tabs: steer_gate(h_, r_, tr, bk, *gt),
            lambda h_=hidden, r_=residual, bk=bank, gs=gate_slot_host, rq=requests, gt=gate_tabs: gate_loop_baseline(
                h_, r_, bk, gs, rq, gt[-1]
            ),
            dev,
        )
        gated_tokens = sum(end - start for row, start, end, _ in requests if row and gate_slot_host[row] >= 0)
        gate_bytes = 2 * gated_tokens * h * hidden.element_size()
        rows.append(Row("steer_gate", shape, "bf16 + residual", ours, ref, gate_bytes))
    return rows


if __name__ == "__main__":
    d = device()
    bw, how = peak_bandwidth(d)
    print(f"# steer_activations / steer_gate on {d} — peak BW {how}")
    print_rows(run(d), bw)
