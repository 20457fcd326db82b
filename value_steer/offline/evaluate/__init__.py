"""``value-steer eval``: base vs value-filtered decoding vs abstention vs activation steering on held-out
prompts, through vLLM.

One vLLM engine runs ``ValueSteerWorker`` with a VFD section (K = max of ``--ks``), an activation-steering
section (the vectors of ``--vectors``, preloaded by name) and a capture section. Base rows are requests with
``value_steer=false`` and no spec (they decode exactly as stock vLLM), VFD rows set ``threshold`` and
``num_candidates`` per request, activation-only rows send ``value_steer=false`` and a ``steering`` spec, and
VFD + gated add sends both. A second engine runs abstention. The flow keeps the test split untouched by any
choice:

1. calibration split: base and VFD at every (K, threshold) of the sweep;
2. per K, the threshold with the lowest undesirable rate whose perplexity is within
   ``--max-ppl-increase`` of base (on calibration);
3. test split, once per point: base, the whole sweep for the first K (for the plots), the other K at their
   chosen threshold, activation add at each suggested scale, cap, ablate, probe-gated add, the first K's
   chosen point + gated add, abstention at the head's sidecar threshold (``steering`` describes the rows).

Metrics per condition (each with its sample size and a 95% interval):
  undesirable   VADER compound < -0.05 of the response (Wilson interval)
  perplexity    exp(mean NLL) of the response tokens under the *unsteered* model, for every row: each
                response is rescored by an unsteered prefill of prompt + response (prompt logprobs), since an
                activation-steered request's own logprobs are the steered model's; abstention's forced EOS is
                not the model's token and is left out (bootstrap over prompts). The engine's sampled
                logprobs are kept too: on unsteered rows they must agree (the report prints the check)
  length        generated tokens (forced EOS excluded; normal interval)
  distinct-2    distinct word bigrams / bigrams over the condition's responses (jackknife)
  intervention  VFD: tokens whose natural sample was replaced; abstention: EOS forced (over scored tokens);
                gated add: decode tokens whose gate was open; ungated activation ops: 1 (every token edited)
                (bootstrap)
  gate open     gated rows: decode tokens whose gate was >= 0.5 / decode tokens (the worker's count; bootstrap)
  tok/s         generated tokens / wall time of the condition's batch (one measurement, no interval;
                rescoring not included)

Writes ``<out>.md`` (the tables, printed too), ``<out>.json`` (every number) and PNG plots beside it.
``--render-only JSON`` re-renders a finished run's report without generating.

Modules: ``plan`` (what a run does, its runtime estimate), ``stats`` (metrics, intervals, the selection rule,
the rescoring alignment; pure), ``steering`` (the vectors' sidecars and the activation rows' specs; pure),
``run`` (the conditions through vLLM), ``report`` (markdown and JSON), ``plots`` (the PNGs); the CLI is
:func:`main` (``value-steer eval``, also ``python -m value_steer.offline.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from value_steer.offline.evaluate.plan import FULL, QUICK, EvalPlan, estimate_seconds
from value_steer.offline.evaluate.report import moonshot, summary, threshold_transfer, write_report
from value_steer.offline.evaluate.run import run
from value_steer.offline.evaluate.stats import Response, choose_threshold, condition_metrics
from value_steer.offline.evaluate.steering import VECTOR, load_vectors


def main(argv: list[str] | None = None) -> int:
    """``value-steer eval [--quick] [--render-only JSON] ...``: run a plan (or re-render a finished run's
    JSON) and write the report; returns the exit status."""
    from value_steer.offline.assets import default_head_path, default_logit_checkpoint, default_vectors_dir
    from value_steer.offline.models import prepare_smollm2

    ap = argparse.ArgumentParser(prog="value-steer eval", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few prompts and tokens (CI smoke run, minutes)")
    ap.add_argument("--task", default=None, help="a task file (default: the built-in sentiment task)")
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--head", default=None, help="value head (default: the committed SmolLM2 head)")
    ap.add_argument("--out", default="docs/evaluation.md")
    ap.add_argument("--n-cal", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--thresholds", type=float, nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--vectors", default=None, metavar="DIR",
                    help="steering vectors folder (default: the committed sentiment ones; with --task, the folder "
                    "`value-steer vectors` wrote)")
    ap.add_argument("--vector", default=None, metavar="NAME",
                    help="the activation rows' vector in --vectors (default: the task's name; its probe "
                    "NAME_probe, when there is one, makes the gated rows)")
    ap.add_argument("--vector-layer", type=int, default=None, metavar="L",
                    help="which layer of a per-layer vector the rows steer (default: its first)")
    ap.add_argument("--no-activation", action="store_true", help="skip the activation-steering rows")
    ap.add_argument("--gated-scale", type=float, default=None,
                    help="the gated add's scale (default: the largest suggested scale of the vector's sidecar)")
    ap.add_argument("--logit-checkpoint", default=None, metavar="PATH",
                    help="logit-steering generator (default: the committed SmolLM2 one)")
    ap.add_argument("--no-logit", action="store_true", help="skip the logit-steering rows")
    ap.add_argument("--qhead", default=None, metavar="PATH",
                    help="a Q-head (value-steer train-qhead): adds token-mode VFD rows at --token-thresholds")
    ap.add_argument("--token-thresholds", type=float, nargs="+", default=None,
                    help="token mode's mask threshold sweep (default with --qhead and no --token-betas: the VFD "
                    "thresholds)")
    ap.add_argument("--token-betas", type=float, nargs="+", default=None,
                    help="token mode's tilt sweep (logits - beta * q, at the Q-head's threshold)")
    ap.add_argument("--token-k", type=int, default=None, metavar="K",
                    help="token rows use the K-candidate rule with K candidates (exact VFD's commit distribution with "
                    "the Q-head) instead of the mask")
    ap.add_argument("--render-only", default=None, metavar="JSON",
                    help="re-render the report of a finished run from its .json (no generation)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("n_cal", args.n_cal), ("n_test", args.n_test), ("max_tokens", args.max_tokens),
                                    ("seed", args.seed), ("gated_scale", args.gated_scale)) if v is not None}
    if args.no_activation:
        overrides["activation"] = False
    if args.no_logit:
        overrides["logit_strengths"] = ()
    if args.ks is not None:
        overrides["ks"] = tuple(args.ks)
    if args.thresholds is not None:
        overrides["thresholds"] = tuple(args.thresholds)
    if args.qhead is not None:
        if args.token_betas is not None:
            overrides["token_betas"] = tuple(args.token_betas)
        if args.token_k is not None:
            overrides["token_k"] = args.token_k
        if args.token_thresholds is not None or args.token_betas is None:
            overrides["token_thresholds"] = tuple(args.token_thresholds or args.thresholds or plan.thresholds)
    elif args.token_thresholds is not None or args.token_betas is not None or args.token_k is not None:
        ap.error("--token-thresholds / --token-betas / --token-k need --qhead")
    try:
        plan = EvalPlan(**{**asdict(plan), **overrides})
    except ValueError as exc:
        ap.error(str(exc))
    command = "value-steer eval" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    if args.render_only is not None:
        # Re-render a finished run's report from its JSON (same numbers; no generation).
        with open(args.render_only, encoding="utf-8") as f:
            results = json.load(f)
        results.setdefault("command", command.strip())
    else:
        from value_steer.offline.tasks.task_file import TaskError, load_task

        try:
            task = load_task(args.task) if args.task is not None else None
        except TaskError as exc:
            ap.error(str(exc))
        model = args.model or str(prepare_smollm2())
        head = args.head or str(default_head_path())
        if not os.path.isfile(head):
            ap.error(f"--head: value head not found: {head}")
        if args.qhead is not None and not os.path.isfile(args.qhead):
            ap.error(f"--qhead: Q-head not found: {args.qhead} (value-steer train-qhead makes one)")
        vectors = args.vectors or str(default_vectors_dir())
        vector = args.vector or (task.name if task is not None else VECTOR)
        if plan.activation:
            try:
                load_vectors(vectors, vector, args.vector_layer)
            except (OSError, ValueError) as exc:
                ap.error(f"--vectors: {exc}")
        logit = args.logit_checkpoint or str(default_logit_checkpoint())
        if plan.logit_strengths and not os.path.isfile(logit):
            ap.error(f"--logit-checkpoint: not found: {logit} (value-steer train-logit makes one; or --no-logit)")
        results = run(plan, model, head, vectors if plan.activation else None,
                      logit_checkpoint=logit if plan.logit_strengths else None, log=lambda s: print(s, flush=True),
                      task=task, vector=vector, vector_layer=args.vector_layer, qhead=args.qhead)
        results["command"] = command.strip()
    text = write_report(results, Path(args.out), results["command"])
    print(text)
    if args.render_only is None:
        print(f"value-steer eval: finished in {results['wall_s'] / 60:.1f} min", flush=True)
    return 0


__all__ = [
    "FULL",
    "QUICK",
    "EvalPlan",
    "Response",
    "choose_threshold",
    "condition_metrics",
    "estimate_seconds",
    "load_vectors",
    "main",
    "moonshot",
    "run",
    "summary",
    "threshold_transfer",
    "write_report",
]
