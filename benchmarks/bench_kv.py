"""Benchmark: ``write_kv`` (scatter by slot) and ``copy_kv_slots`` (all layers, one launch) vs torch.

GPU goal (issue): ``copy_kv_slots`` across 32 layers in one launch >= 5x a per-layer torch loop. Caches
use vLLM's default FlashAttention layout (per layer ``[nb, bs, kvh, 2d]``, K/V split in the last dim);
bytes counted: payload read + written plus the slot indices.
"""

from __future__ import annotations

import torch
from _common import Row, bench_pair, device, peak_bandwidth, print_rows

from value_steer.kernels import (
    copy_kv_slots,
    copy_kv_slots_reference,
    write_kv,
    write_kv_reference,
)
from value_steer.patches.vllm_0_32.kv_layout import kv_views_fa


def fa_caches(layers: int, nb: int, bs: int, kvh: int, d: int, dtype: torch.dtype, dev: torch.device):
    raw = torch.zeros(layers, nb, bs, kvh, 2 * d, dtype=dtype, device=dev)
    return raw, [kv_views_fa(raw[i].permute(0, 2, 1, 3), d) for i in range(layers)]


def run(dev: torch.device | None = None) -> list[Row]:
    dev = dev or device()
    gpu = dev.type == "cuda"
    rows = []
    kvh, d, bs, dtype = 8, 128, 16, torch.bfloat16
    nb = 4096 if gpu else 512
    g = torch.Generator().manual_seed(0)

    # write_kv: one layer, decode-sized and prefill-sized token batches.
    _, views = fa_caches(1, nb, bs, kvh, d, dtype, dev)
    kc, vc = views[0]
    for n in (256, 4096):
        key = torch.randn(n, kvh, d, generator=g).to(dtype).to(dev)
        value = torch.randn(n, kvh, d, generator=g).to(dtype).to(dev)
        slots = torch.randperm(nb * bs, generator=g)[:n].to(dev)
        ours, ref = bench_pair(
            lambda k=key, v=value, s=slots: write_kv(k, v, kc, vc, s),
            lambda k=key, v=value, s=slots: write_kv_reference(k, v, kc, vc, s),
            dev,
        )
        nbytes = 2 * 2 * n * kvh * d * 2 + n * 8
        rows.append(Row("write_kv", f"N={n} kvh={kvh} d={d} bs={bs}", "bf16", ours, ref, nbytes))

    # copy_kv_slots: 32 layers x (K, V) = 64 views, one launch.
    layers = 32
    _, views = fa_caches(layers, nb, bs, kvh, d, dtype, dev)
    caches = [t for kv in views for t in kv]
    for p in (16, 256):
        perm = torch.randperm(nb * bs, generator=g)
        src, dst = perm[:p].to(dev), perm[p : 2 * p].to(dev)
        ours, ref = bench_pair(
            lambda s=src, t=dst: copy_kv_slots(caches, s, t),
            lambda s=src, t=dst: copy_kv_slots_reference(caches, s, t),
            dev,
        )
        nbytes = 2 * len(caches) * p * kvh * d * 2 + p * 16
        rows.append(Row("copy_kv_slots", f"L={layers} P={p} kvh={kvh} d={d}", "bf16", ours, ref, nbytes,
                        ">=5x per-layer loop", 5.0, None))  # fmt: skip
    return rows


if __name__ == "__main__":
    d0 = device()
    bw, how = peak_bandwidth(d0)
    print(f"# write_kv / copy_kv_slots on {d0} — peak BW {how}")
    print_rows(run(d0), bw)
