"""``value-steer eval``: base vs value-filtered decoding vs abstention on held-out prompts, through vLLM.

One vLLM engine runs ``ValueSteerWorker`` in VFD mode (K = max of ``--ks``); base rows are requests with
``value_steer=false`` in the same engine (they decode exactly as stock vLLM), VFD rows set ``threshold``
and ``num_candidates`` per request. A second engine runs abstention. The flow keeps the test split
untouched by any choice:

1. calibration split: base and VFD at every (K, threshold) of the sweep;
2. per K, the threshold with the lowest undesirable rate whose perplexity is within
   ``--max-ppl-increase`` of base (on calibration);
3. test split: base, the whole sweep for the first K (for the plots), the other K at their chosen
   threshold, abstention at the head's sidecar threshold.

Metrics per condition (each with its sample size and a 95% interval):
  undesirable   VADER compound < -0.05 of the response (Wilson interval)
  perplexity    exp(mean NLL) of the response tokens under the unsteered model: vLLM's raw logprob of
                every committed token (VFD returns the committed token's logprob under the model's own
                distribution); abstention's forced EOS is not the model's token and is left out
                (bootstrap over prompts)
  length        generated tokens (forced EOS excluded; normal interval)
  distinct-2    distinct word bigrams / bigrams over the condition's responses (jackknife)
  intervention  steered tokens where steering changed the outcome (VFD: the natural sample was replaced;
                abstention: EOS forced) / scored tokens (bootstrap)
  tok/s         generated tokens / wall time of the condition's batch (one measurement, no interval)

Writes ``<out>.md`` (the tables, printed too), ``<out>.json`` (every number) and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Z95 = 1.959964


# ---------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation runs. Sizes are prompts per split; one response per prompt."""

    n_cal: int
    n_test: int
    max_tokens: int
    ks: tuple[int, ...]
    thresholds: tuple[float, ...]
    max_ppl_increase: float = 0.10
    n_examples: int = 4
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_cal", "n_test", "max_tokens", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.ks or any(k < 1 or k > 64 for k in self.ks):
            raise ValueError(f"ks must be integers in [1, 64], got {self.ks!r}")
        if not self.thresholds or any(not (0.0 <= t <= 1.0) for t in self.thresholds):
            raise ValueError(f"thresholds must be values in [0, 1], got {self.thresholds!r}")
        if not self.max_ppl_increase >= 0:
            raise ValueError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase!r}")


# Sized for about 30 minutes on 2 CPU cores (base ~145 tok/s, VFD K=4 ~55, K=8 ~40).
FULL = EvalPlan(n_cal=80, n_test=160, max_tokens=64, ks=(4, 8), thresholds=(0.5, 0.6, 0.7))
QUICK = EvalPlan(n_cal=8, n_test=8, max_tokens=12, ks=(4,), thresholds=(0.3, 0.5), n_examples=2, n_boot=200)


# ---------------------------------------------------------------------------------------------------------
# Records and metrics (pure; tested without vLLM)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Response:
    """One generated response and what the engine reported about it."""

    prompt_id: str
    text: str
    token_logprobs: list[float]  # the model's raw logprob of each counted token
    negative: bool
    num_scored: int = 0
    num_interventions: int = 0
    forced_eos: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)


def wilson(k: int, n: int) -> tuple[float, float]:
    from value_steer.offline.tasks.sentiment import wilson_interval

    return wilson_interval(k, n)


def bigrams(text: str) -> list[tuple[str, str]]:
    return list(itertools.pairwise(text.lower().split()))


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of ``texts`` (NaN when there are none)."""
    grams = [g for t in texts for g in bigrams(t)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def perplexity(responses: Sequence[Response]) -> float:
    """``exp`` of the mean NLL over all counted tokens of ``responses``."""
    lps = [lp for r in responses for lp in r.token_logprobs]
    return math.exp(-sum(lps) / len(lps)) if lps else float("nan")


def intervention_rate(responses: Sequence[Response]) -> float:
    scored = sum(r.num_scored for r in responses)
    return sum(r.num_interventions for r in responses) / scored if scored else float("nan")


def bootstrap_ci(stat: Callable[[list[Response]], float], responses: Sequence[Response], n_boot: int,
                 seed: int) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` over prompt-level resamples."""
    rng = np.random.default_rng(seed)
    n = len(responses)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat([responses[i] for i in idx])
        if math.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))


def jackknife_ci(stat: Callable[[list[Response]], float], responses: Sequence[Response]) -> tuple[float, float]:
    """Normal 95% interval with the leave-one-out (jackknife) standard error. Used for distinct-2, which
    resampling with replacement biases downwards (a duplicated response duplicates its bigrams)."""
    rs = list(responses)
    n = len(rs)
    full = stat(rs)
    if n < 2 or not math.isfinite(full):
        return (float("nan"), float("nan"))
    loo = np.array([stat(rs[:i] + rs[i + 1:]) for i in range(n)], dtype=np.float64)
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    return (full - Z95 * se, full + Z95 * se)


def condition_metrics(responses: Sequence[Response], wall_s: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Every metric of one condition with its 95% interval and sample size."""
    rs = list(responses)
    n = len(rs)
    k = sum(r.negative for r in rs)
    lengths = np.array([r.num_tokens for r in rs], dtype=np.float64)
    sd = float(lengths.std(ddof=1)) if n > 1 else 0.0
    tokens = int(lengths.sum())
    mean_len = float(lengths.mean()) if n else float("nan")
    return {
        "n": n,
        "tokens": tokens,
        "undesirable": {"value": k / n if n else float("nan"), "ci": wilson(k, n), "k": k},
        "perplexity": {"value": perplexity(rs), "ci": bootstrap_ci(perplexity, rs, n_boot, seed)},
        "length": {"value": mean_len, "ci": (mean_len - Z95 * sd / math.sqrt(max(n, 1)),
                                             mean_len + Z95 * sd / math.sqrt(max(n, 1)))},
        "distinct_2": {"value": distinct_2([r.text for r in rs]),
                       "ci": jackknife_ci(lambda x: distinct_2([r.text for r in x]), rs)},
        "intervention": {"value": intervention_rate(rs), "ci": bootstrap_ci(intervention_rate, rs, n_boot, seed),
                         "scored": sum(r.num_scored for r in rs)},
        "abstained": {"value": sum(r.forced_eos for r in rs) / n if n else float("nan"),
                      "ci": wilson(sum(r.forced_eos for r in rs), n)},
        "tok_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "wall_s": wall_s,
    }


def choose_threshold(sweep: dict[float, dict[str, Any]], base: dict[str, Any], max_ppl_increase: float) -> float:
    """The threshold with the lowest undesirable rate whose perplexity stays within ``max_ppl_increase`` of
    base (ties: the higher threshold, which intervenes less). Falls back to the lowest-perplexity threshold
    when none qualifies, and says so in the report."""
    limit = base["perplexity"]["value"] * (1.0 + max_ppl_increase)
    ok = [t for t, m in sweep.items() if m["perplexity"]["value"] <= limit]
    if ok:
        return min(ok, key=lambda t: (sweep[t]["undesirable"]["value"], -t))
    return min(sweep, key=lambda t: sweep[t]["perplexity"]["value"])


# ---------------------------------------------------------------------------------------------------------
# Running conditions through vLLM
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Condition:
    name: str
    split: str
    mode: str  # "base" | "vfd" | "abstain"
    k: int | None = None
    threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)


def _stats(llm: Any, request_id: str) -> dict[str, Any]:
    st = llm.collective_rpc("value_steer_stats", args=(request_id,))[0]["stats"]
    if st is None:
        raise RuntimeError(f"the worker has no stats for request {request_id}")
    return st


def generate(llm: Any, prompts: list, *, max_tokens: int, extra_args: dict[str, Any], seed: int,
             capture_first: int = 0) -> tuple[list[Response], float, dict[str, str]]:
    """One condition: every prompt once, batched. Returns responses, wall seconds and, for the first
    ``capture_first`` prompts, ``{prompt id: request id}`` of the captured requests."""
    from vllm import SamplingParams

    from value_steer.offline.assets import TEMPERATURE, TOP_P
    from value_steer.offline.tasks.sentiment import judge_negative

    sps = [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens, logprobs=0,
                          seed=seed * 1_000_003 + i,
                          extra_args={**extra_args, "value_steer_capture": i < capture_first})
           for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = llm.chat([p.messages for p in prompts], sps, use_tqdm=False)
    wall = time.perf_counter() - t0
    neg = judge_negative([o.outputs[0].text for o in outs])
    responses, captured = [], {}
    for i, (p, o, bad) in enumerate(zip(prompts, outs, neg)):
        comp = o.outputs[0]
        st = _stats(llm, o.request_id)
        lps = [float(d[t].logprob) for t, d in zip(comp.token_ids, comp.logprobs or []) if t in d]
        if len(lps) != len(comp.token_ids):
            raise RuntimeError(f"request {o.request_id}: the engine returned logprobs for {len(lps)} of its "
                               f"{len(comp.token_ids)} tokens")
        if st["forced_eos"] and lps:
            lps = lps[:-1]  # abstention's EOS is not the model's token
        responses.append(Response(p.id, comp.text, lps, bool(bad), int(st["num_scored"]),
                                  int(st["num_interventions"]), bool(st["forced_eos"])))
        if i < capture_first:
            captured[p.id] = o.request_id
    return responses, wall, captured


def _engine(model: str, config: dict[str, Any], max_num_seqs: int, seed: int) -> Any:
    from value_steer.offline.engines import offline_llm

    # Block size 32 (the CPU backend's smallest) keeps VFD's K * max_num_seqs scratch blocks small.
    return offline_llm(model, config, kv_use="eval", max_model_len=512, max_num_seqs=max_num_seqs, block_size=32,
                       seed=seed)


def _trajectories(capture_dir: Path, head: Any, request_ids: dict[str, str]) -> dict[str, list[float]]:
    """Per prompt id, the head's value of every captured token (decode-matched, in position order)."""
    import torch
    from safetensors.torch import load_file

    from value_steer.core.features import read_capture_index
    from value_steer.patches import get_adapter

    index = read_capture_index(capture_dir, get_adapter().client_request_id)
    shards = [load_file(str(p)) for p in sorted(capture_dir.glob("shard-*.safetensors"))]
    if not shards:
        return {}
    hidden = torch.cat([s["hidden"] for s in shards]).float()
    seq = torch.cat([s["seq_id"] for s in shards])
    pos = torch.cat([s["position"] for s in shards])
    out = {}
    with torch.no_grad():
        for pid, rid in request_ids.items():
            sel = seq == index[rid]
            order = torch.argsort(pos[sel])
            out[pid] = head.p(hidden[sel][order]).tolist()
    return out


def run(plan: EvalPlan, model: str, head_path: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every condition of ``plan``; returns the JSON-ready results."""
    import torch

    from value_steer.core.checkpoint import load_value_head
    from value_steer.offline.tasks.sentiment import sample_prompts

    ckpt = load_value_head(head_path)
    if ckpt.threshold is None:
        raise ValueError(f"{head_path}: the sidecar has no threshold (run value-steer calibrate)")
    splits = {"calibration": sample_prompts("calibration", plan.n_cal, plan.seed),
              "test": sample_prompts("test", plan.n_test, plan.seed)}
    conditions: list[Condition] = []
    t_start = time.perf_counter()

    def record(cond: Condition, prompts: list, llm: Any, extra: dict[str, Any], capture_first: int = 0
               ) -> dict[str, str]:
        resp, wall, captured = generate(llm, prompts, max_tokens=plan.max_tokens, extra_args=extra,
                                        seed=plan.seed, capture_first=capture_first)
        cond.metrics = condition_metrics(resp, wall, plan.n_boot, plan.seed)
        cond.examples = [asdict(r) | {"num_tokens": r.num_tokens} for r in resp[: plan.n_examples]]
        for ex in cond.examples:
            ex.pop("token_logprobs")
        conditions.append(cond)
        m = cond.metrics
        log(f"[{time.perf_counter() - t_start:7.0f}s] {cond.split:11s} {cond.name:18s} undesirable "
            f"{m['undesirable']['value']:.3f} ppl {m['perplexity']['value']:.2f} len {m['length']['value']:.1f} "
            f"interv {m['intervention']['value']:.3f} tok/s {m['tok_per_s']:.1f}")
        return captured

    kmax = max(plan.ks)
    cap_dir = Path(tempfile.mkdtemp(prefix="value-steer-eval-capture-"))
    llm = _engine(model, {"vfd": {"value_head_path": head_path, "num_candidates": kmax},
                          "capture": {"dir": str(cap_dir)}}, 64, plan.seed)
    base_cal = Condition("base", "calibration", "base")
    record(base_cal, splits["calibration"], llm, {"value_steer": False})
    chosen: dict[int, float] = {}
    for k in plan.ks:
        sweep = {}
        for t in plan.thresholds:
            c = Condition(f"vfd K={k} t={t:g}", "calibration", "vfd", k, t)
            record(c, splits["calibration"], llm, {"num_candidates": k, "threshold": t})
            sweep[t] = c.metrics
        chosen[k] = choose_threshold(sweep, base_cal.metrics, plan.max_ppl_increase)
        log(f"chosen on calibration: K={k} threshold {chosen[k]:g}")

    n_ex = plan.n_examples
    ex_ids: dict[str, dict[str, str]] = {}
    ex_ids["base"] = record(Condition("base", "test", "base"), splits["test"], llm, {"value_steer": False}, n_ex)
    for k in plan.ks:
        # The whole sweep for the first K (the plots); the others at their chosen threshold only.
        for t in plan.thresholds if k == plan.ks[0] else (chosen[k],):
            c = Condition(f"vfd K={k} t={t:g}", "test", "vfd", k, t)
            cap = n_ex if (k == plan.ks[0] and t == chosen[k]) else 0
            got = record(c, splits["test"], llm, {"num_candidates": k, "threshold": t}, cap)
            if cap:
                ex_ids[c.name] = got
    llm.collective_rpc("value_steer_flush_capture")
    del llm

    abstain_t = float(ckpt.threshold)
    llm = _engine(model, {"abstain": {"value_head_path": head_path}}, 64, plan.seed)
    record(Condition(f"abstain t={abstain_t:.3g}", "test", "abstain", None, abstain_t), splits["test"], llm, {})
    del llm

    head = ckpt.head.eval()
    trajectories = {name: _trajectories(cap_dir, head, ids) for name, ids in ex_ids.items()}
    del torch
    return {
        "plan": asdict(plan),
        "model": model,
        "head": head_path,
        "head_threshold": abstain_t,
        "head_meta": {k: v for k, v in ckpt.meta.items() if k != "train_history"},
        "chosen_thresholds": {str(k): v for k, v in chosen.items()},
        "conditions": [asdict(c) for c in conditions],
        "trajectories": trajectories,
        "wall_s": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def _fmt(m: dict[str, Any], digits: int = 3) -> str:
    v, (lo, hi) = m["value"], m["ci"]
    if not math.isfinite(v):
        return "—"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _table(conds: list[dict[str, Any]], chosen: dict[str, float]) -> list[str]:
    lines = ["| condition | n | undesirable | perplexity | length (tokens) | distinct-2 | intervention rate "
             "| tok/s |", "|---|---:|---|---|---|---|---|---:|"]
    for c in conds:
        m = c["metrics"]
        name = c["name"]
        if c["mode"] == "vfd" and chosen.get(str(c["k"])) == c["threshold"]:
            name = f"**{name}** (chosen)"
        lines.append(f"| {name} | {m['n']} | {_fmt(m['undesirable'])} | {_fmt(m['perplexity'], 2)} | "
                     f"{_fmt(m['length'], 1)} | {_fmt(m['distinct_2'])} | {_fmt(m['intervention'])} | "
                     f"{m['tok_per_s']:.1f} |")
    return lines


def within_budget(results: dict[str, Any]) -> dict[str, bool]:
    """Per K: whether the chosen threshold met the perplexity budget on calibration (else it is the
    lowest-perplexity fallback of :func:`choose_threshold`)."""
    cal = [c for c in results["conditions"] if c["split"] == "calibration"]
    base = next(c for c in cal if c["mode"] == "base")["metrics"]["perplexity"]["value"]
    limit = base * (1.0 + results["plan"]["max_ppl_increase"])
    out = {}
    for k, t in results["chosen_thresholds"].items():
        m = next(c for c in cal if c["mode"] == "vfd" and str(c["k"]) == k and c["threshold"] == t)["metrics"]
        out[k] = bool(m["perplexity"]["value"] <= limit)
    return out


# The target for VFD on test: at least this relative cut at no more than this perplexity increase.
TARGET_RELATIVE_CUT = 0.5
TARGET_MAX_PPL_INCREASE = 0.10


def effect(m: dict[str, Any], base: dict[str, Any], budget: float) -> dict[str, Any]:
    """One condition's metrics ``m`` against its split's ``base``: relative cut of the undesirable rate,
    perplexity increase, whether it is within the selection ``budget``, and whether it meets the target."""
    b, v = base["undesirable"]["value"], m["undesirable"]["value"]
    cut = (b - v) / b if b > 0 else float("nan")
    inc = m["perplexity"]["value"] / base["perplexity"]["value"] - 1.0
    return {"relative_cut": cut, "perplexity_increase": inc, "within_budget": bool(inc <= budget),
            "meets_target": bool(cut >= TARGET_RELATIVE_CUT and inc <= TARGET_MAX_PPL_INCREASE)}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline: per K, the chosen threshold's relative cut and perplexity change on test."""
    test = [c for c in results["conditions"] if c["split"] == "test"]
    base = next(c for c in test if c["mode"] == "base")["metrics"]
    budget = within_budget(results)
    out = {}
    for k, t in results["chosen_thresholds"].items():
        m = next(c for c in test if c["mode"] == "vfd" and str(c["k"]) == k and c["threshold"] == t)["metrics"]
        e = effect(m, base, results["plan"]["max_ppl_increase"])
        out[k] = {"threshold": t, "base_undesirable": base["undesirable"]["value"],
                  "undesirable": m["undesirable"]["value"], "relative_cut": e["relative_cut"],
                  "perplexity_increase": e["perplexity_increase"], "meets_target": e["meets_target"],
                  "within_budget_on_calibration": budget[k]}
    return out


def threshold_transfer(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For each (K, threshold) run on both splits: relative cut and perplexity change on calibration and on
    test, and whether each split alone meets the target. Shows whether the calibration rule could have
    found a threshold that works on test (the selection, not the head, is then what falls short)."""
    budget = results["plan"]["max_ppl_increase"]
    by_split: dict[str, dict[tuple[Any, Any], dict[str, Any]]] = {}
    base: dict[str, dict[str, Any]] = {}
    for c in results["conditions"]:
        if c["mode"] == "base":
            base[c["split"]] = c["metrics"]
        elif c["mode"] == "vfd":
            by_split.setdefault(c["split"], {})[(str(c["k"]), c["threshold"])] = c["metrics"]
    rows = []
    for key in sorted(set(by_split.get("calibration", {})) & set(by_split.get("test", {}))):
        row: dict[str, Any] = {"k": key[0], "threshold": key[1]}
        for split in ("calibration", "test"):
            row[split] = effect(by_split[split][key], base[split], budget)
        rows.append(row)
    return rows


def write_report(results: dict[str, Any], out: Path, command: str) -> str:
    """Write ``out`` (.md), ``out.with_suffix('.json')`` and the PNGs; returns the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = results["plan"]
    chosen = results["chosen_thresholds"]
    conds = results["conditions"]
    head = summary(results)
    results["summary"] = head
    base_ppl = {c["split"]: c["metrics"]["perplexity"]["value"] for c in conds if c["mode"] == "base"}
    pngs = plot(results, out)
    md = ["# Evaluation: value steering of SmolLM2-135M-Instruct (negative sentiment)\n",
          f"Reproduce: `{command}` ({results['wall_s'] / 60:.1f} min on this machine). Every number below is "
          "printed by that command and stored in "
          f"`{out.with_suffix('.json').name}`.\n",
          f"- Model: `{os.path.basename(str(results['model']).rstrip('/'))}` fp32 through vLLM (CPU), "
          f"sampling temperature 0.8, top-p 0.95, at most {plan['max_tokens']} new tokens, one response per prompt.",
          "- Judge: VADER compound < -0.05 is undesirable. Prompts: held-out topics (calibration "
          f"{plan['n_cal']}, test {plan['n_test']} prompts).",
          f"- Head: `{os.path.basename(results['head'])}`; sidecar (conformal) threshold "
          f"{results['head_threshold']:.4f}, used for abstention.",
          f"- Threshold per K chosen on the calibration split only: lowest undesirable rate with perplexity at "
          f"most {100 * plan['max_ppl_increase']:.0f}% above base; when no threshold meets that budget, the "
          "lowest-perplexity one. Chosen: "
          + ", ".join(f"K={k}: {t:g}" + ("" if head[k]["within_budget_on_calibration"] else
                                         " (no threshold met the budget on calibration)")
                      for k, t in chosen.items()) + ".",
          "- Intervals are 95%: Wilson for rates, bootstrap over prompts for perplexity and intervention rate, "
          "jackknife for distinct-2, normal for length. tok/s is one batched measurement (64 concurrent requests, "
          "2 CPU cores).\n",
          "## Headline (test split)\n",
          "| K | threshold | base undesirable | VFD undesirable | relative cut | perplexity change | target met |",
          "|---:|---:|---:|---:|---:|---:|---|"]
    for k, s in head.items():
        md.append(f"| {k} | {s['threshold']:g} | {s['base_undesirable']:.3f} | {s['undesirable']:.3f} | "
                  f"{100 * s['relative_cut']:.1f}% | {100 * s['perplexity_increase']:+.1f}% | "
                  f"{'yes' if s['meets_target'] else 'no'} |")
    md.append(f"\nTarget: at least a {100 * TARGET_RELATIVE_CUT:.0f}% relative cut at no more than "
              f"+{100 * TARGET_MAX_PPL_INCREASE:.0f}% perplexity.\n")
    transfer = threshold_transfer(results)
    results["threshold_transfer"] = transfer
    if transfer:
        md += ["## Threshold transfer (calibration -> test)\n",
               "Each threshold run on both splits, against its own split's base. The rule sees only the "
               "calibration columns.\n",
               "| K | threshold | cal cut | cal perplexity | test cut | test perplexity | target met on test |",
               "|---:|---:|---:|---:|---:|---:|---|"]
        for r in transfer:
            c, t = r["calibration"], r["test"]
            md.append(f"| {r['k']} | {r['threshold']:g} | {100 * c['relative_cut']:.1f}% | "
                      f"{100 * c['perplexity_increase']:+.1f}% | {100 * t['relative_cut']:.1f}% | "
                      f"{100 * t['perplexity_increase']:+.1f}% | {'yes' if t['meets_target'] else 'no'} |")
        missed = [r for r in transfer if r["test"]["meets_target"] and not r["calibration"]["within_budget"]]
        if missed and not any(s["meets_target"] for s in head.values()):
            many = len(missed) > 1
            names = ", ".join(f"K={r['k']} t={r['threshold']:g}" for r in missed)
            costs = ", ".join(f"{100 * r['calibration']['perplexity_increase']:+.1f}%" for r in missed)
            md.append(f"\nThe target is met on test by {names}, but on calibration "
                      f"{'those thresholds were' if many else 'it was'} over the perplexity budget ({costs}), "
                      f"with calibration base perplexity {base_ppl['calibration']:.2f} against "
                      f"{base_ppl['test']:.2f} on test. The rule, which sees calibration only, could not pick "
                      f"{'them' if many else 'it'}.")
        md.append("")
    for split in ("test", "calibration"):
        md.append(f"## {split.capitalize()} split\n")
        md += _table([c for c in conds if c["split"] == split], chosen)
        md.append("")
    md.append("## Plots\n")
    md += [f"![{name}]({name})" for name in pngs]
    md.append("\n## Examples (test split, first prompts)\n")
    test = [c for c in conds if c["split"] == "test"]
    for i in range(min(plan["n_examples"], len(test[0]["examples"]))):
        md.append(f"**Prompt {test[0]['examples'][i]['prompt_id']}**\n")
        for c in test:
            if c["mode"] == "vfd" and chosen.get(str(c["k"])) != c["threshold"]:
                continue
            ex = c["examples"][i]
            text = ex["text"].replace("\n", " ").strip()
            md.append(f"- {c['name']} ({'negative' if ex['negative'] else 'not negative'}): {text}")
        md.append("")
    text = "\n".join(md) + "\n"
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    return text


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Three PNGs beside ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = out.stem
    names = []
    conds = results["conditions"]
    for metric, label, fname in (("undesirable", "undesirable rate (VADER negative)", "undesirable"),
                                 ("perplexity", "perplexity under the unsteered model", "perplexity")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("test", "-o"), ("calibration", "--s")):
            base = next(c for c in conds if c["split"] == split and c["mode"] == "base")["metrics"][metric]
            ax.axhline(base["value"], color="gray", ls=style[:-1], lw=1, label=f"base ({split})")
            for k in results["plan"]["ks"]:
                pts = sorted((c["threshold"], c["metrics"][metric]) for c in conds
                             if c["split"] == split and c["mode"] == "vfd" and c["k"] == k)
                xs = [p[0] for p in pts]
                ys = [p[1]["value"] for p in pts]
                err = [[y - p[1]["ci"][0] for y, p in zip(ys, pts)], [p[1]["ci"][1] - y for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"VFD K={k} ({split})")
        ax.set_xlabel("threshold on P(undesirable)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{stem}-{fname}.png"
        fig.savefig(out.parent / name, dpi=110)
        plt.close(fig)
        names.append(name)
    traj = results.get("trajectories") or {}
    if traj:
        fig, ax = plt.subplots(figsize=(6, 4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for (cond, per_prompt), ls in zip(sorted(traj.items()), ("-", "--", ":")):
            for i, (pid, vals) in enumerate(sorted(per_prompt.items())):
                ax.plot(range(len(vals)), vals, ls, color=colors[i % len(colors)], lw=1.2,
                        label=f"{cond} · {pid}")
        k0 = str(results["plan"]["ks"][0])
        ax.axhline(results["chosen_thresholds"][k0], color="black", lw=0.8, label="chosen threshold")
        ax.set_xlabel("generated token")
        ax.set_ylabel("value head P(undesirable)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{stem}-trajectories.png"
        fig.savefig(out.parent / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    from value_steer.offline.assets import default_head_path
    from value_steer.offline.models import prepare_smollm2

    ap = argparse.ArgumentParser(prog="value-steer eval", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few prompts and tokens (CI smoke run, minutes)")
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--head", default=None, help="value head (default: the committed SmolLM2 head)")
    ap.add_argument("--out", default="docs/evaluation.md")
    ap.add_argument("--n-cal", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--thresholds", type=float, nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--render-only", default=None, metavar="JSON",
                    help="re-render the report of a finished run from its .json (no generation)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("n_cal", args.n_cal), ("n_test", args.n_test), ("max_tokens", args.max_tokens),
                                    ("seed", args.seed)) if v is not None}
    if args.ks is not None:
        overrides["ks"] = tuple(args.ks)
    if args.thresholds is not None:
        overrides["thresholds"] = tuple(args.thresholds)
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
        command = results.get("command", command)
    else:
        model = args.model or str(prepare_smollm2())
        head = args.head or str(default_head_path())
        if not os.path.isfile(head):
            ap.error(f"--head: value head not found: {head}")
        results = run(plan, model, head, log=lambda s: print(s, flush=True))
        results["command"] = command.strip()
    text = write_report(results, Path(args.out), results["command"])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
