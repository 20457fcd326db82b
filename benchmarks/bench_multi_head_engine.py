"""Several value heads in one vLLM engine (CPU build): a batch mixing 4 heads against the same batch on one head.

``python benchmarks/bench_multi_head_engine.py [--model DIR] [--rs 32 64] [--k 4] [--threshold T] [--repeats N]
[--distinct] [--write-results]``

One engine with ``{"vfd": {"heads": {...4 heads...}, "default_head": "sentiment", "num_candidates": K}}``. By
default the heads are the committed head under 4 names (``_heads``), so the ratio is the cost of mixing heads
alone; ``--distinct`` uses the committed head, the no-prices example's and random heads, whose own intervention
rates then change the work too. Per R, interleaved repeat by repeat on that engine: R requests all on
``sentiment``, R requests round-robin over the 4 heads, and R unsteered requests. A decode step's time comes from
differencing two lengths (``bench_vfd_engine.step_time``). Reported: mixed/one-head tok/s (the issue's goal:
>= 0.95) and each against unsteered. Both steered batches run the grouped value-head op (the engine has 4 heads);
one head alone in a batch costs 0.98-0.99x the single-head op (``bench_value_head_grouped.py``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from value_steer.offline.assets import apply_vllm_cpu_env

apply_vllm_cpu_env("bench")


def _heads(model: str, distinct: bool) -> dict[str, str]:
    """4 named heads. Default: the committed head under 4 names (4 copies of its weights, stacked like any 4 heads):
    each request's decisions, and so the engine's work, are the same whichever head scores it, so the ratio is
    the cost of mixing heads alone. ``distinct``: the committed head, the no-prices example's and random heads (their
    intervention rates differ, and so does the work of the steps they steer)."""
    import shutil

    import torch
    from transformers import AutoConfig

    from value_steer.core.checkpoint import save_value_head
    from value_steer.core.value_head import ValueHead
    from value_steer.offline.assets import default_extra_heads, default_head_path

    tmp = tempfile.mkdtemp()
    heads = {"sentiment": str(default_head_path())}
    if not distinct:
        for i in range(1, 4):
            path = os.path.join(tmp, f"sentiment-copy{i}.safetensors")
            shutil.copy(heads["sentiment"], path)
            shutil.copy(heads["sentiment"] + ".meta.json", path + ".meta.json")
            heads[f"copy{i}"] = path
        return heads
    heads.update({n: str(p) for n, p in default_extra_heads().items() if p.is_file()})
    hidden = AutoConfig.from_pretrained(model).hidden_size
    seed = 0
    while len(heads) < 4:
        torch.manual_seed(seed)
        path = os.path.join(tmp, f"random{seed}.safetensors")
        save_value_head(path, ValueHead(hidden), threshold=0.5, meta={"planted": f"random seed {seed} (benchmark)"})
        heads[f"random{seed}"] = path
        seed += 1
    return heads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--rs", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--t-short", type=int, default=4)
    ap.add_argument("--t-long", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--distinct", action="store_true",
                    help="4 different heads (intervention rates differ) instead of 4 copies of the committed head")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)

    from bench_vfd_engine import _llm, step_time

    from value_steer.offline.models import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    heads = _heads(model, args.distinct)
    names = list(heads)
    cfg = {"vfd": {"heads": {n: {"path": p, "threshold": args.threshold} for n, p in heads.items()},
                   "default_head": "sentiment", "num_candidates": args.k, "schedule": "eager"}}
    llm = _llm(model, max(args.rs), args.block_size, cfg)
    rows = []
    for r in args.rs:
        one, mixed, off = float("inf"), float("inf"), float("inf")
        for _ in range(args.repeats):
            one = min(one, step_time(llm, r, args.t_short, args.t_long, {"head": "sentiment"}, 1))
            mixed = min(mixed, step_time(llm, r, args.t_short, args.t_long, None, 1, per_request=[
                {"head": names[i % len(names)]} for i in range(r)]))
            off = min(off, step_time(llm, r, args.t_short, args.t_long, {"value_steer": False}, 1))
        rows.append((r, one, mixed, off))
        print(f"R={r:3d}  one head {one * 1e3:7.1f} ms  {len(names)} heads mixed {mixed * 1e3:7.1f} ms  "
              f"unsteered {off * 1e3:7.1f} ms  mixed/one tok/s {one / mixed:.3f}", flush=True)
    del llm
    gc.collect()
    name = os.path.basename(model.rstrip("/"))
    copies = "" if args.distinct else " (4 copies of the committed head)"
    lines = [f"model {name} fp32, vLLM CPU, {os.cpu_count()} cores, exact VFD K={args.k} (eager schedule) "
             f"t={args.threshold:g}, heads {', '.join(names)}{copies}; t_step by differencing "
             f"{args.t_short}->{args.t_long} tokens, min of {args.repeats} interleaved repeats", "",
             "| R | one head ms | 4 heads mixed ms | unsteered ms | mixed / one-head tok/s | goal >= 0.95 |",
             "|---:|---:|---:|---:|---:|---|"]
    for r, one, mixed, off in rows:
        lines.append(f"| {r} | {one * 1e3:.1f} | {mixed * 1e3:.1f} | {off * 1e3:.1f} | {one / mixed:.3f} | "
                     f"{'met' if one / mixed >= 0.95 else 'missed'} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write_results:
        from run_all import git_commit, write_section

        cmd = " ".join(["python benchmarks/bench_multi_head_engine.py", *(sys.argv[1:] if argv is None else argv)])
        body = (f"## vLLM engine: 4 value heads mixed in a batch vs one head (CPU)\n\n{datetime.date.today()} · commit "
                f"{git_commit()} · `{cmd}`\n\n{table}\n")
        write_section("multi-head-engine-distinct-cpu" if args.distinct else "multi-head-engine-cpu", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
