"""Benchmark: ``token_filter`` (one fused op per step) vs today's torch path (``python bench_token_filter.py``).

The torch path is what ``value_steer.runtime.token_filter.TokenFilterTables.filter`` ran per step before this op
(kept here, frozen, as :func:`mask_rows`) when no live request tilts: the row-table lookups, ``q = qhead_rows(hidden,
...)`` (a ``[B, V]`` fp32 product) and ``mask_rows`` (the mask, or the K-candidate rule where K >= 1), plus its mass
telemetry (one ``index_add_``). Ours: the
``token_filter`` op (the C++ extension on CPU, the Triton kernels on CUDA) plus the same ``index_add_``.

Shapes: SmolLM2-135M (H 576, V = V' = 49152) with the committed Q-head (``smollm2-135m-sentiment-q``, R 32,
threshold 0.6 "above"), B = 32 and 64 rows, every row in token mode; hidden states ~ N(0, 1) (a few percent of the
vocabulary predicted unsafe per row, no row falls back), fp32 logits ~ N(0, 3^2). Both sides must agree (same
tokens removed, masses to 1e-5) before anything is timed.

Times are medians over interleaved rounds (ours, torch, ours, ...), so background load hits both alike. CPU:
``--threads`` torch threads for both sides (default 1, as ``run_all.py``). Target: ours >= 3x the torch path at
B = 32 with the mask rule. ``run()`` gives ``run_all.py`` its rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
from _common import Row, _time_once, bench_pair, device, device_name, quick

from value_steer.core.modes import MODE_TOKEN
from value_steer.core.qhead import MIN_SAFE_MASS, k_emulation_factors, load_qhead, qhead_rows
from value_steer.kernels import prepare_token_filter_weights, token_filter
from value_steer.runtime.token_filter import TokenFilterTables

QHEAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "value_steer", "data", "qheads",
                     "smollm2-135m-sentiment-q.safetensors")
BATCHES = (32, 64)
TARGET = 3.0


# The runtime's torch path before the fused op (value_steer/runtime/token_filter.py at its introduction).
def mask_rows(logits: torch.Tensor, q: torch.Tensor, threshold: torch.Tensor, sign: torch.Tensor, on: torch.Tensor,
              min_safe_mass: float = MIN_SAFE_MASS, k: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~value_steer.core.qhead.token_filter_rows` without tilt (every ``beta`` 0; the mask, or the K-candidate
    rule where ``k >= 1``), with fewer passes over the ``[B, V]`` rows: ``sigmoid(q) > t`` is compared as
    ``q > logit(t)``, and the masses come from one ``exp(logits - max)`` (no softmax division, no sigmoid). Same
    arguments and results as the reference, up to tokens whose prediction sits on the threshold within float
    rounding."""
    v = q.shape[1]
    lf = logits[:, :v].float()
    t = threshold.float()
    cut = (torch.log(t) - torch.log1p(-t)).unsqueeze(1)  # logit(t); +-inf at t = 1 / 0
    s = sign.float().unsqueeze(1)
    unsafe = torch.where(s > 0, q > cut, q < cut)
    e = (lf - lf.max(dim=-1, keepdim=True).values).exp_()
    total = e.sum(dim=-1)
    unsafe_mass = (e * unsafe).sum(dim=-1) / total
    fallback = (1.0 - unsafe_mass) < min_safe_mass
    # The fallback without a host read: every row's safest column, used where the row falls back.
    safest = (s * q).argmin(dim=-1, keepdim=True)
    keep = torch.arange(v, device=q.device).unsqueeze(0) == safest
    removed = torch.where(fallback.unsqueeze(1), ~keep, unsafe)
    safest_mass = e.gather(1, safest).squeeze(1) / total
    mass = torch.where(fallback, 1.0 - safest_mass, unsafe_mass)
    out = logits.clone()
    if k is None:
        removed = removed & on.unsqueeze(1)
        out[:, :v].masked_fill_(removed, float("-inf"))
        return out, removed.any(dim=-1), torch.where(on, mass, torch.zeros_like(mass))
    use_k = k >= 1
    log_safe, log_unsafe = k_emulation_factors(unsafe_mass, k.clamp_min(1))
    edit = torch.where(unsafe, log_unsafe.unsqueeze(1), log_safe.unsqueeze(1))
    new = torch.where(use_k.unsqueeze(1), lf + edit, lf.masked_fill(removed, float("-inf")))
    out[:, :v] = torch.where(on.unsqueeze(1), new.to(logits.dtype), logits[:, :v])
    mass_k = unsafe_mass - unsafe_mass * torch.exp(log_unsafe)
    mass = torch.where(use_k, mass_k, mass)
    changed = on & torch.where(use_k, mass_k > 0, removed.any(dim=-1))
    return out, changed, torch.where(on, mass, torch.zeros_like(mass))


def make_case(b: int, k: int, dev: torch.device) -> tuple[Callable[[], object], Callable[[], object], dict]:
    """``(ours, torch_path, info)`` for ``b`` rows in token mode with K ``k`` (0: the mask)."""
    ckpt = load_qhead(QHEAD)
    h, v, r = ckpt.head.hidden_size, ckpt.head.vocab_size, ckpt.head.rank
    n = b + 1
    tables = TokenFilterTables(ckpt, n, dev)
    for row in range(1, n):
        tables.stage_row(row, 0.0, k)
    tables.flush()
    g = torch.Generator().manual_seed(b)
    hidden = torch.randn(b, h, generator=g).to(dev)
    logits = (torch.randn(b, v, generator=g) * 3).to(dev)
    row_idx = torch.arange(1, n, dtype=torch.int32, device=dev)
    thr = torch.full((n,), ckpt.threshold, device=dev)
    sign = torch.full((n,), ckpt.sign, device=dev)
    mode = torch.full((n,), MODE_TOKEN, dtype=torch.int32, device=dev)
    mode[0] = 0
    weights = prepare_token_filter_weights(ckpt.head, dev)
    mass = torch.zeros(n, dtype=torch.float64, device=dev)

    def ours():
        out, z, changed, m = token_filter(hidden, logits, row_idx, thr, sign, mode, tables.row_beta, tables.row_k,
                                          *weights)  # fmt: skip
        mass.index_add_(0, row_idx.long(), m.to(torch.float64))
        return out, z, changed, m

    torch_mass = torch.zeros(n, dtype=torch.float64, device=dev)

    def torch_path():
        idx = row_idx.long()
        on = (idx > 0) & (mode.index_select(0, idx) == MODE_TOKEN)
        q = qhead_rows(hidden, *weights)
        kk = tables.row_k.index_select(0, idx) if k else None
        out, changed, m = mask_rows(logits, q, thr.index_select(0, idx), sign.index_select(0, idx), on, k=kk)
        torch_mass.index_add_(0, idx, m.to(torch.float64))
        return out, changed, m

    # Same results before timing anything.
    out, _, changed, m = ours()
    ref_out, ref_changed, ref_mass = torch_path()
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref_out)), "the same tokens removed"
    fin = torch.isfinite(ref_out)
    torch.testing.assert_close(out[fin], ref_out[fin], atol=1e-5, rtol=1e-5)
    assert torch.equal(changed, ref_changed)
    torch.testing.assert_close(m, ref_mass, atol=1e-5, rtol=1e-4)
    info = {"unsafe": float(m.mean()), "h": h, "v": v, "r": r}
    return ours, torch_path, info


def median_times_us(fns: dict[str, Callable[[], object]], dev: torch.device, rounds: int, round_s: float) -> dict:
    """Median microseconds per call of each fn over ``rounds`` interleaved rounds of ~``round_s`` each."""
    iters = {}
    for name, fn in fns.items():
        fn()  # warm-up
        iters[name] = int(max(1, min(1000, round_s / max(_time_once(fn, dev, 1), 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, dev, iters[name]) * 1e6)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def run(dev: torch.device | None = None) -> list[Row]:
    """Rows for ``run_all.py`` (fastest of interleaved rounds, like every other op there)."""
    dev = dev or device()
    rows = []
    for b, k in ((32, 0), (64, 0), (32, 4)):
        ours, ref, info = make_case(b, k, dev)
        t_ours, t_ref = bench_pair(ours, ref, dev)
        nbytes = 2 * b * info["v"] * 4 + info["v"] * info["r"] * 4 + b * info["h"] * 4
        rule = "mask" if k == 0 else f"K={k}"
        rows.append(Row("token_filter", f"B={b} H={info['h']} V={info['v']} R={info['r']} {rule}", "fp32 logits",
                        t_ours, t_ref, nbytes))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU only: torch threads for both sides (default 1)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args()
    dev = device()
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    rounds = 5 if quick() else args.rounds
    print(f"# token_filter on {device_name(dev)}; median of {rounds} interleaved rounds")
    if dev.type == "cpu" and hasattr(os, "getloadavg"):
        print(f"# 1-min load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| B | rule | ours (ms) | torch path (ms) | speedup | mean mass moved | target >= 3x (B=32, mask) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for b in BATCHES:
        for k in (0, 4):
            ours, ref, info = make_case(b, k, dev)
            t = median_times_us({"ours": ours, "torch": ref}, dev, rounds, 0.05)
            speedup = t["torch"] / t["ours"]
            target = ("yes" if speedup >= TARGET else "NO") if (b, k) == (32, 0) else ""
            rule = "mask" if k == 0 else f"K={k}"
            print(f"| {b} | {rule} | {t['ours'] / 1e3:,.2f} | {t['torch'] / 1e3:,.2f} | {speedup:.1f}x | "
                  f"{info['unsafe']:.4f} | {target} |")  # fmt: skip


if __name__ == "__main__":
    main()
