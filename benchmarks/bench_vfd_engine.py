"""Base vs value-filtered decoding inside vLLM (CPU build), side by side in one run.

``python benchmarks/bench_vfd_engine.py [--model DIR] [--rs 1 8 32] [--ks 4 8] [--write-results]``

Two engines on the same model, one after the other in this process: stock vLLM (``CPUWorker``) and
``ValueSteerWorker`` with ``{"vfd": {"num_candidates": max(ks)}}`` (K per request via ``num_candidates``).
A decode step's time is measured by differencing: the same batch is generated with ``--t-short`` and
``--t-long`` new tokens (``ignore_eos``), and ``t_step = (t_long - t_short) / (t_long - t_short tokens)``,
which cancels prefill, the first VFD token's extra forward and engine overheads per request.

Reported per (R, K):
  base tok/s     R / t_base(R): R unsteered requests decoding together
  VFD tok/s      R / t_vfd(R, K): R steered requests, K candidates each
  E              t_base(R*K) / t_vfd(R, K): the VFD step against a base step over as many rows as it
                 computes (goal: E >= 0.85, i.e. VFD costs little beyond its candidate rows)

Default model: SmolLM2-135M-Instruct prepared by ``value-steer models prepare`` (fp32), with the committed
head (``value_steer/data/heads``); a random head of the model's hidden size if it is missing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from value_steer.offline.assets import apply_vllm_cpu_env

apply_vllm_cpu_env("bench")


def _prompts(n: int) -> list[list[dict[str, str]]]:
    from value_steer.offline.tasks.sentiment import sample_prompts

    ps = sample_prompts("test", min(n, 1000), seed=0)
    return [ps[i % len(ps)].messages for i in range(n)]


def _llm(model: str, max_num_seqs: int, block_size: int, config: dict | None):
    from value_steer.offline.engines import offline_llm

    return offline_llm(model, config, steering=config is not None, kv_use="bench", max_model_len=512,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs * 8),
                       block_size=block_size, enable_prefix_caching=False)


def _time_gen(llm, prompts, n_tokens: int, extra_args: dict | None) -> float:
    from vllm import SamplingParams

    # No per-request seed: vLLM 0.32's CPU runner crashes rewinding a seeded generator when a prefill is
    # chunked ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync), which R*K = 256
    # prompts do. The engine seed still fixes the draws.
    sp = SamplingParams(max_tokens=n_tokens, min_tokens=n_tokens, ignore_eos=True, temperature=0.8, top_p=0.95,
                        extra_args=extra_args)
    t0 = time.perf_counter()
    outs = llm.chat(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == n_tokens for o in outs)
    return dt


def step_time(llm, n_rows: int, t_short: int, t_long: int, extra_args: dict | None, repeats: int) -> float:
    """Seconds per decode step with ``n_rows`` requests in the batch (min over ``repeats``)."""
    prompts = _prompts(n_rows)
    _time_gen(llm, prompts[:1], 2, extra_args)  # warm caches for this batch shape's code paths
    best = float("inf")
    for _ in range(repeats):
        short = _time_gen(llm, prompts, t_short, extra_args)
        long = _time_gen(llm, prompts, t_long, extra_args)
        best = min(best, (long - short) / (t_long - t_short))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--head", default=None)
    ap.add_argument("--rs", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--t-short", type=int, default=4)
    ap.add_argument("--t-long", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32, help="the CPU backend needs a multiple of 32")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from value_steer.offline.assets import default_head_path
    from value_steer.offline.models import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    head = args.head or str(default_head_path())
    if not os.path.isfile(head):
        from transformers import AutoConfig

        from value_steer.core.checkpoint import save_value_head
        from value_steer.core.value_head import ValueHead

        hidden = AutoConfig.from_pretrained(model).hidden_size
        head = os.path.join(tempfile.mkdtemp(), "random-head.safetensors")
        torch.manual_seed(0)
        save_value_head(head, ValueHead(hidden), threshold=0.5, meta={"planted": "random (benchmark)"})
        print(f"no committed head; using a random head ({hidden})", flush=True)

    kmax = max(args.ks)
    base_rows = sorted({r for r in args.rs} | {r * k for r in args.rs for k in args.ks})
    t_base: dict[int, float] = {}
    llm = _llm(model, max(base_rows), args.block_size, None)
    for n in base_rows:
        t_base[n] = step_time(llm, n, args.t_short, args.t_long, None, args.repeats)
        print(f"base   rows={n:4d}  step {t_base[n] * 1e3:8.1f} ms", flush=True)
    del llm
    gc.collect()

    t_vfd: dict[tuple[int, int], float] = {}
    cfg = {"vfd": {"value_head_path": head, "num_candidates": kmax}}
    llm = _llm(model, max(args.rs), args.block_size, cfg)
    for r in args.rs:
        for k in args.ks:
            t_vfd[(r, k)] = step_time(llm, r, args.t_short, args.t_long, {"num_candidates": k}, args.repeats)
            print(f"vfd    R={r:3d} K={k}  step {t_vfd[(r, k)] * 1e3:8.1f} ms", flush=True)
    counters = llm.collective_rpc(lambda w: dict(w.model_runner._vfd_counters))[0]
    del llm
    gc.collect()

    lines = [
        f"model {os.path.basename(model.rstrip('/'))} fp32, vLLM CPU, {os.cpu_count()} cores, block size "
        f"{args.block_size}, t_step by differencing {args.t_short}->{args.t_long} tokens, min of {args.repeats}",
        "",
        "| R | K | base step ms (R rows) | VFD step ms | base step ms (R*K rows) | base tok/s | VFD tok/s | "
        "VFD/base tok/s | E |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in args.rs:
        for k in args.ks:
            tb, tv, tbk = t_base[r], t_vfd[(r, k)], t_base[r * k]
            lines.append(f"| {r} | {k} | {tb * 1e3:.1f} | {tv * 1e3:.1f} | {tbk * 1e3:.1f} | {r / tb:.1f} | "
                         f"{r / tv:.1f} | {tb / tv:.2f} | {tbk / tv:.2f} |")
    lines += ["", "Why E can exceed 1: the base step over R*K rows also runs lm_head and the sampler "
              "(top-p over the whole vocabulary) on every row, while a VFD step runs them on its R winners only "
              "(plus the rows whose winner is not the natural sample); the R*K candidate rows only run the "
              "backbone and the value head.", "", f"VFD runner counters: {counters}"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write_results:
        from run_all import git_commit, write_section

        body = (f"## vLLM engine: base vs VFD (CPU)\n\n{datetime.date.today()} · commit {git_commit()} · "
                f"`python benchmarks/bench_vfd_engine.py`\n\n{table}\n")
        write_section("vfd-engine-cpu", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
