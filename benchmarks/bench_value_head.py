"""Benchmark: fused value head vs the torch composite (``python benchmarks/bench_value_head.py``).

GPU goal (issue): at H=4096 and M <= 64 the op reads its weights at >= 80% of HBM bandwidth and is
>= 1.5x the torch composite. Bytes counted: both weight matrices + biases + x + the fp32 h1 scratch
(written and read back) + partials/output; weights dominate for M <= 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import Row, bench_pair, device, peak_bandwidth, print_rows, quick

from value_steer.core.value_head import ValueHead, value_head_reference
from value_steer.kernels import prepare_value_head_weights, value_head


def torch_composite(x, w0, b0, w2, b2, w4, b4):
    """The unfused torch MLP in the weights' dtype (fp32 weights: exactly ``value_head_reference``)."""
    if w0.dtype == torch.float32:
        return value_head_reference(x, w0, b0, w2, b2, w4, b4)
    xh = x.to(w0.dtype)
    h1 = torch.tanh(F.linear(xh, w0, b0.to(w0.dtype)))
    h2 = torch.relu(F.linear(h1, w2, b2.to(w0.dtype)))
    return torch.sigmoid(h2.float() @ w4.reshape(-1) + b4.reshape(()))


def run(dev: torch.device | None = None) -> list[Row]:
    dev = dev or device()
    gpu = dev.type == "cuda"
    cases = [(4096, 1), (4096, 16), (4096, 64)] if gpu else [(4096, 1), (4096, 16), (576, 64)]
    if gpu and not quick():
        cases += [(4096, 256), (576, 64)]
    rows = []
    torch.manual_seed(0)
    heads = {}
    for h, m in cases:
        if h not in heads:
            heads[h] = ValueHead(h).to(dev)
        for w_dtype in (torch.float32, torch.bfloat16):
            w = prepare_value_head_weights(heads[h], w_dtype)
            x = torch.randn(m, h, device=dev, dtype=torch.bfloat16)
            ours, ref = bench_pair(lambda x=x, w=w: value_head(x, *w), lambda x=x, w=w: torch_composite(x, *w), dev)
            es = w[0].element_size()
            nbytes = 2 * h * h * es + 3 * h * 4 + 4 + m * h * x.element_size() + 2 * m * h * 4 + m * 4
            target = ""
            tsp = tpk = None
            if h == 4096 and m <= 64:
                target, tsp, tpk = ">=80% HBM BW, >=1.5x", 1.5, 80.0
            rows.append(
                Row("value_head", f"M={m} H={h}", f"w={str(w_dtype)[6:]} x=bf16", ours, ref, nbytes, target, tsp, tpk)
            )
    return rows


if __name__ == "__main__":
    d = device()
    bw, how = peak_bandwidth(d)
    print(f"# value_head on {d} — peak BW {how}")
    print_rows(run(d), bw)
