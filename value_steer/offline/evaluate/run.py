"""Running an :class:`~value_steer.offline.evaluate.plan.EvalPlan` through vLLM: one engine in VFD mode
(base rows opt out with ``value_steer=false``), a second one for abstention, and the value trajectories
of the example prompts from a capture."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from value_steer.offline.evaluate.plan import MAX_NUM_SEQS, EvalPlan
from value_steer.offline.evaluate.stats import Response, choose_threshold, condition_metrics


@dataclass
class Condition:
    """One row of the report: a decoding mode on a split, and what it measured."""

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


def _engine(model: str, config: dict[str, Any], seed: int) -> Any:
    from value_steer.offline.engines import offline_llm

    # Block size 32 (the CPU backend's smallest) keeps VFD's K * max_num_seqs scratch blocks small.
    return offline_llm(model, config, kv_use="eval", max_model_len=512, max_num_seqs=MAX_NUM_SEQS, block_size=32,
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
                          "capture": {"dir": str(cap_dir)}}, plan.seed)
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
    del llm  # one engine at a time: the VFD engine's KV cache is freed before the abstention engine starts

    abstain_t = float(ckpt.threshold)
    llm = _engine(model, {"abstain": {"value_head_path": head_path}}, plan.seed)
    record(Condition(f"abstain t={abstain_t:.3g}", "test", "abstain", None, abstain_t), splits["test"], llm, {})
    del llm

    head = ckpt.head.eval()
    trajectories = {name: _trajectories(cap_dir, head, ids) for name, ids in ex_ids.items()}
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
