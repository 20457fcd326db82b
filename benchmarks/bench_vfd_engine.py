"""Base vs value-filtered decoding inside vLLM (CPU build), side by side in one run: eager-K, two-phase, auto.

``python benchmarks/bench_vfd_engine.py [--model DIR] [--rs 1 8 32 64] [--ks 4 8] [--thresholds T ...]
[--schedules eager two_phase auto] [--qhead Q.safetensors] [--write-results]``

With ``--qhead`` (default: the committed Q-head when there is one) token-mode VFD is measured too: an engine with
``{"vfd": {"mode": "token", "qhead_path": Q}}``, its steered and unsteered batches interleaved the same way (no K:
one matmul scores every token).

Engines on the same model, one after the other in this process: stock vLLM (``CPUWorker``), then
``ValueSteerWorker`` with ``{"vfd": {"num_candidates": max(ks), "schedule": S}}`` for each schedule S (K and
the threshold per request via ``num_candidates`` / ``threshold``).
A decode step's time is measured by differencing: the same batch is generated with ``--t-short`` and
``--t-long`` new tokens (``ignore_eos``), and ``t_step = (t_long - t_short) / (t_long - t_short tokens)``,
which cancels prefill, the first VFD token's extra forward and engine overheads per request.

Reported per (schedule, threshold, R, K):
  VFD/base       t_unsteered(R) / t_vfd: steered against unsteered tokens/s, R requests decoding together.
                 Both are measured on the same engine, interleaved (repeat by repeat), the unsteered batch
                 sending ``value_steer: false`` (the plugin idle, as for any unsteered request): the ratio
                 does not drift with the machine's load between separate engines.
  E              t_base(R*K) / t_vfd: the VFD step against a base step over R*K rows (eager computes that many)
  interv.        interventions per scored token (the committed token is not the natural sample)
  2nd fwd        share of steered steps that ran a second forward (two-phase: some natural sample unsafe)

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


def _time_gen(llm, prompts, n_tokens: int, extra_args: dict | None, per_request: list[dict] | None = None) -> float:
    from vllm import SamplingParams

    # No per-request seed: vLLM 0.32's CPU runner crashes rewinding a seeded generator when a prefill is
    # chunked ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync), which R*K = 256
    # prompts do. The engine seed still fixes the draws.
    def params(extra: dict | None) -> SamplingParams:
        return SamplingParams(max_tokens=n_tokens, min_tokens=n_tokens, ignore_eos=True, temperature=0.8,
                              top_p=0.95, extra_args=extra)

    sp = [params(per_request[i % len(per_request)]) for i in range(len(prompts))] if per_request else params(
        extra_args)
    t0 = time.perf_counter()
    outs = llm.chat(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == n_tokens for o in outs)
    return dt


def step_time(llm, n_rows: int, t_short: int, t_long: int, extra_args: dict | None, repeats: int,
              per_request: list[dict] | None = None) -> float:
    """Seconds per decode step with ``n_rows`` requests in the batch (min over ``repeats``); ``per_request``: the
    requests' extra args, cycled (instead of ``extra_args`` for all)."""
    prompts = _prompts(n_rows)
    _time_gen(llm, prompts[:1], 2, extra_args, per_request)  # warm caches for this batch shape's code paths
    best = float("inf")
    for _ in range(repeats):
        short = _time_gen(llm, prompts, t_short, extra_args, per_request)
        long = _time_gen(llm, prompts, t_long, extra_args, per_request)
        best = min(best, (long - short) / (t_long - t_short))
    return best


def _counters(llm) -> dict[str, float]:
    """The runner's VFD counters plus the steering totals (to difference around a measurement)."""
    runner = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state()["counters"])[0]
    totals = llm.collective_rpc("value_steer_stats")[0]["counters"]
    return {**runner, "tokens_scored": totals["tokens_scored"], "interventions": totals["interventions"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--head", default=None)
    ap.add_argument("--rs", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--thresholds", type=float, nargs="+", default=None,
                    help="per-request thresholds (default: the head's served VFD threshold, and 0.5)")
    ap.add_argument("--schedules", nargs="*", default=["eager", "two_phase", "auto"],
                    help="exact VFD schedules to measure (none: token mode only)")
    ap.add_argument("--t-short", type=int, default=4)
    ap.add_argument("--t-long", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=32, help="the CPU backend needs a multiple of 32")
    ap.add_argument("--qhead", default=None, help="a Q-head: also measure token mode (default: the committed one)")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from value_steer.core.checkpoint import load_value_head
    from value_steer.offline.assets import default_head_path, default_qhead_path
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
    if args.thresholds is None:
        point = load_value_head(head).meta.get("vfd_operating_point") or {}
        served = float(point.get("threshold", load_value_head(head).threshold or 0.5))
        args.thresholds = sorted({served, 0.5}, reverse=True)

    kmax = max(args.ks)
    base_rows = sorted({r for r in args.rs} | {r * k for r in args.rs for k in args.ks})
    t_base: dict[int, float] = {}
    if not args.schedules:
        base_rows = []  # stock vLLM is measured for exact VFD's E column only
    llm = _llm(model, max(base_rows), args.block_size, None) if base_rows else None
    for n in base_rows:
        t_base[n] = step_time(llm, n, args.t_short, args.t_long, None, args.repeats)
        print(f"base   rows={n:4d}  step {t_base[n] * 1e3:8.1f} ms", flush=True)
    del llm
    gc.collect()

    rows_out = []
    for schedule in args.schedules:
        cfg = {"vfd": {"value_head_path": head, "num_candidates": kmax, "schedule": schedule}}
        llm = _llm(model, max(args.rs), args.block_size, cfg)
        for thr in args.thresholds:
            for r in args.rs:
                for k in args.ks:
                    before = _counters(llm)
                    tv, tu = float("inf"), float("inf")
                    for _ in range(args.repeats):
                        tv = min(tv, step_time(llm, r, args.t_short, args.t_long,
                                               {"num_candidates": k, "threshold": thr}, 1))
                        tu = min(tu, step_time(llm, r, args.t_short, args.t_long, {"value_steer": False}, 1))
                    d = {key: _counters(llm)[key] - before[key] for key in before}
                    steps = d["eager_steps"] + d["two_phase_steps"]
                    cell = {"schedule": schedule, "threshold": thr, "r": r, "k": k, "t_vfd": tv, "t_unsteered": tu,
                            "interv": d["interventions"] / max(d["tokens_scored"], 1),
                            "second": d["second_forwards"] / max(steps, 1),
                            "two_phase_share": d["two_phase_steps"] / max(steps, 1)}
                    rows_out.append(cell)
                    print(f"vfd {schedule:9s} t={thr:.2f} R={r:3d} K={k}  step {tv * 1e3:8.1f} ms  "
                          f"ratio {tu / tv:.2f}  interv {cell['interv']:.3f}  2nd {cell['second']:.2f}",
                          flush=True)
        del llm
        gc.collect()

    qhead = args.qhead or str(default_qhead_path())
    token_rows = []
    if os.path.isfile(qhead):
        from value_steer.core.qhead import load_qhead

        thresholds = sorted({load_qhead(qhead).threshold, *args.thresholds}, reverse=True)
        llm = _llm(model, max(args.rs), args.block_size, {"vfd": {"mode": "token", "qhead_path": qhead}})
        for thr in thresholds:
            for r in args.rs:
                before = llm.collective_rpc("value_steer_stats")[0]["counters"]
                tv, tu = float("inf"), float("inf")
                for _ in range(args.repeats):
                    tv = min(tv, step_time(llm, r, args.t_short, args.t_long, {"threshold": thr}, 1))
                    tu = min(tu, step_time(llm, r, args.t_short, args.t_long, {"value_steer": False}, 1))
                after = llm.collective_rpc("value_steer_stats")[0]["counters"]
                changed = (after["interventions"] - before["interventions"]) / max(
                    after["tokens_scored"] - before["tokens_scored"], 1)
                token_rows.append({"threshold": thr, "r": r, "t_token": tv, "t_unsteered": tu, "changed": changed})
                print(f"token t={thr:.2f} R={r:3d}  step {tv * 1e3:8.1f} ms  ratio {tu / tv:.2f}  "
                      f"changed {changed:.3f}", flush=True)
        del llm
        gc.collect()

    lines = [
        f"model {os.path.basename(model.rstrip('/'))} fp32, vLLM CPU, {os.cpu_count()} cores, block size "
        f"{args.block_size}, t_step by differencing {args.t_short}->{args.t_long} tokens, min of {args.repeats}; "
        "temperature 0.8, top-p 0.95; the committed head",
    ]
    if rows_out:
        lines += [
            "",
            "| schedule | threshold | R | K | unsteered ms (R rows) | VFD ms | VFD/unsteered tok/s | E | interv. | "
            "2nd fwd | two-phase steps |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for c in rows_out:
        tb, tv, tbk = c["t_unsteered"], c["t_vfd"], t_base[c["r"] * c["k"]]
        lines.append(f"| {c['schedule']} | {c['threshold']:.2f} | {c['r']} | {c['k']} | {tb * 1e3:.1f} | "
                     f"{tv * 1e3:.1f} | {tb / tv:.2f} | {tbk / tv:.2f} | {c['interv']:.3f} | {c['second']:.2f} | "
                     f"{c['two_phase_share']:.2f} |")
    if rows_out:
        lines += ["", "Stock vLLM (no plugin), one engine measured first: "
                  + ", ".join(f"{n} rows {t_base[n] * 1e3:.1f} ms" for n in base_rows) + ".",
                  "", "E = t_base(R*K rows) / t_vfd (stock vLLM for the R*K rows). It can exceed 1 even for eager: "
                  "the base step over R*K rows also runs lm_head and the sampler on every row, a VFD step on its R "
                  "winners only. Two-phase forwards R rows plus the alternatives of the unsafe rows, so its E is well "
                  "above 1 by construction."]
    if token_rows:
        lines += ["", f"Token-mode VFD (Q-head `{os.path.basename(qhead)}`; no candidate rows: one low-rank matmul "
                  "over the vocabulary edits each step's logits), steered and unsteered batches interleaved on one "
                  "engine:", "",
                  "| threshold | R | unsteered ms | token ms | token/unsteered tok/s | distributions changed |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for c in token_rows:
            lines.append(f"| {c['threshold']:.2f} | {c['r']} | {c['t_unsteered'] * 1e3:.1f} | "
                         f"{c['t_token'] * 1e3:.1f} | {c['t_unsteered'] / c['t_token']:.2f} | {c['changed']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write_results:
        from run_all import git_commit, write_section

        # Token mode alone (no --schedules) is its own section: it leaves the exact VFD measurements as they are.
        title = ("vLLM engine: base vs VFD, eager-K vs two-phase vs auto (CPU)" if rows_out else
                 "vLLM engine: token-mode VFD vs unsteered (CPU)")
        cmd = " ".join(["python benchmarks/bench_vfd_engine.py", *(sys.argv[1:] if argv is None else argv)])
        body = f"## {title}\n\n{datetime.date.today()} · commit {git_commit()} · `{cmd}`\n\n{table}\n"
        write_section("vfd-engine-cpu" if rows_out else "vfd-engine-token-cpu", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
