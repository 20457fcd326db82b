"""Benchmark: ``logit_steer`` (one fused op over the batch's logit rows) vs a per-request torch loop.

The baseline is what a sampler hook without the op does: for every steered request, take its logit row, compute the
generator from its hidden state with torch (``z = W_down (h + pos)``, the gate MLP, ``W_up z``) and write
``logits + s * strength * v`` back into a copy of the logits. A quarter of the rows are unsteered (row 0). Bytes
counted: the logits read once and written once (fp32), ``W_up`` read once, the hidden states; the rest is a few KB.
Shapes: SmolLM2-135M (H 576, V 49152), Llama-3-8B (H 4096, V 128256) at small and large batches.
"""

from __future__ import annotations

import math

import torch
from _common import Row, bench_pair, device, peak_bandwidth, print_rows

from value_steer.core.logit_steer import LogitSteerGenerator
from value_steer.kernels import logit_steer, prepare_logit_steer_weights

RANK, GATE = 8, 32


def make_inputs(b: int, h: int, v: int, dev: torch.device):
    """``(hidden, logits, row_idx, row_strength, *weights, max_strength)`` and the host list of steered rows."""
    torch.manual_seed(0)
    gen = LogitSteerGenerator(h, v, RANK, GATE, max_strength=2.0)
    with torch.no_grad():
        gen.w_up.normal_(0.0, 1.0 / math.sqrt(RANK))
    hidden = torch.randn(b, h)
    logits = torch.randn(b, v)
    row_idx = torch.tensor([0 if i % 4 == 3 else i + 1 for i in range(b)], dtype=torch.int32)
    row_strength = torch.ones(b + 1)
    row_strength[0] = 0.0
    weights = prepare_logit_steer_weights(gen, dev)
    args = [hidden.to(dev), logits.to(dev), row_idx.to(dev), row_strength.to(dev), *weights, gen.max_strength]
    steered = [(i, float(row_strength[int(r)])) for i, r in enumerate(row_idx.tolist()) if r != 0]
    return args, steered


def loop_baseline(args, steered) -> torch.Tensor:
    hidden, logits, _, _, w_down, pos, w_up, w1, b1, w2, b2, max_strength = args
    out = logits.clone()
    for i, s in steered:
        x = hidden[i]
        z = w_down @ (x + pos)
        strength = max_strength * torch.sigmoid(w2 @ torch.tanh(w1 @ x + b1) + b2[0])
        out[i] = logits[i] + s * strength * (w_up @ z)
    return out


def run(dev: torch.device | None = None) -> list[Row]:
    dev = dev or device()
    rows = []
    shapes = [(16, 576, 49152), (64, 576, 49152), (16, 4096, 128256), (256, 4096, 128256)]
    for b, h, v in shapes:
        args, steered = make_inputs(b, h, v, dev)
        # Same results (fp32 rounding apart) before timing anything.
        torch.testing.assert_close(logit_steer(*args)[0], loop_baseline(args, steered), atol=1e-3, rtol=1e-4)
        ours, ref = bench_pair(lambda a=args: logit_steer(*a), lambda a=args, s=steered: loop_baseline(a, s), dev)
        nbytes = 2 * b * v * 4 + v * RANK * 4 + b * h * 4
        rows.append(Row("logit_steer", f"B={b} H={h} V={v} R={RANK}", "fp32 logits", ours, ref, nbytes))
    return rows


if __name__ == "__main__":
    d = device()
    bw, how = peak_bandwidth(d)
    print(f"# logit_steer on {d} — peak BW {how}")
    print_rows(run(d), bw)
