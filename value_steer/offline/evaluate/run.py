"""Running an :class:`~value_steer.offline.evaluate.plan.EvalPlan` through vLLM.

Two engines, one at a time:

1. ``{"vfd": ..., "steering": {"vectors": DIR}, "capture": ...}`` serves every row but abstention: base
   (``value_steer: false``, no spec), VFD (``num_candidates`` / ``threshold`` per request), activation-only
   rows (``value_steer: false`` + a ``steering`` spec) and VFD + gated add (a spec with VFD on);
2. ``{"abstain": ...}`` for abstention.

Every condition's responses are then **rescored** in the same engine: one prefill-only request per response
over ``prompt + response`` token ids, unsteered (``value_steer: false``, no spec; ``max_tokens=1,
prompt_logprobs=0``), whose prompt logprobs at the response positions are the unsteered model's raw logprob
of each response token. Perplexity uses those for every row, so it is comparable across methods (an
activation-steered request's own logprobs are the steered model's). vLLM never reads the prefix cache for a
request with prompt logprobs, and the cache is salted per steering spec anyway, so no steered KV leaks in.

Example prompts' value trajectories come from a capture of the sampling requests (base and the chosen VFD
point); gate trajectories from a layer capture of the rescoring requests of the gated rows: every op of a gated
spec sits at or above the gate layer and the gate reads that layer's stream before its edits, which is
therefore the unsteered model's stream on the same tokens (what the rescoring pass computes).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from value_steer.offline.evaluate.plan import MAX_NUM_SEQS, EvalPlan, estimate_seconds
from value_steer.offline.evaluate.stats import Response, choose_threshold, condition_metrics, response_logprobs
from value_steer.offline.evaluate.steering import (
    VECTOR,
    SteeringVectors,
    activation_conditions,
    gate_values,
    gated_add,
    load_vectors,
)


@dataclass
class Condition:
    """One row of the report: a decoding mode on a split, and what it measured.

    ``mode``: ``base`` | ``vfd`` | ``abstain`` | ``add`` | ``cap`` | ``ablate`` | ``gated_add`` |
    ``vfd_gated_add``; ``steering`` is the request's activation spec (None: none); ``rescore_s`` the wall
    time of the rescoring pass (not in tok/s).
    """

    name: str
    split: str
    mode: str
    k: int | None = None
    threshold: float | None = None
    scale: float | None = None
    steering: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    rescore_s: float = 0.0


@dataclass
class Generated:
    """One sampled response before rescoring."""

    prompt_id: str
    request_id: str
    text: str
    prompt_ids: list[int]
    token_ids: list[int]  # the counted tokens (abstention's forced EOS left out)
    sampled_logprobs: list[float]
    negative: bool
    stats: dict[str, Any]


def _stats(llm: Any, request_id: str) -> dict[str, Any]:
    st = llm.collective_rpc("value_steer_stats", args=(request_id,))[0]["stats"]
    if st is None:
        raise RuntimeError(f"the worker has no stats for request {request_id}")
    return st


def generate(llm: Any, prompts: list, *, max_tokens: int, extra_args: dict[str, Any], seed: int,
             capture_first: int = 0, task: Any = None) -> tuple[list[Generated], float]:
    """One condition: every prompt once, batched. Returns the responses and the batch's wall seconds; the
    first ``capture_first`` requests are captured (the value trajectories). ``task``: whose judge labels the
    responses (default: the built-in sentiment task); a prompt whose ``messages`` is None goes as a raw completion."""
    from vllm import SamplingParams

    from value_steer.offline.assets import TEMPERATURE, TOP_P
    from value_steer.offline.tasks.task_file import load_task

    judge_negative = (task if task is not None else load_task(None)).judge_negative

    sps = [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens, logprobs=0,
                          seed=seed * 1_000_003 + i,
                          extra_args={**extra_args, "value_steer_capture": i < capture_first})
           for i in range(len(prompts))]
    t0 = time.perf_counter()
    if all(getattr(p, "messages", None) is None for p in prompts):
        outs = llm.generate([p.text for p in prompts], sps, use_tqdm=False)
    else:
        outs = llm.chat([p.messages for p in prompts], sps, use_tqdm=False)
    wall = time.perf_counter() - t0
    neg = judge_negative([o.outputs[0].text for o in outs])
    got = []
    for p, o, bad in zip(prompts, outs, neg):
        comp = o.outputs[0]
        st = _stats(llm, o.request_id)
        ids = list(comp.token_ids)
        lps = [float(d[t].logprob) for t, d in zip(ids, comp.logprobs or []) if t in d]
        if len(lps) != len(ids):
            raise RuntimeError(f"request {o.request_id}: the engine returned logprobs for {len(lps)} of its "
                               f"{len(ids)} tokens")
        if st["forced_eos"] and ids:
            ids, lps = ids[:-1], lps[:-1]  # abstention's EOS is not the model's token
        got.append(Generated(p.id, o.request_id, comp.text, list(o.prompt_token_ids), ids, lps, bool(bad), st))
    return got, wall


def rescore_token_ids(llm: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                      extra_args: Sequence[dict[str, Any] | None] | None = None
                      ) -> tuple[list[list[float]], list[Any], float]:
    """The unsteered model's raw logprob of every response token (one prefill-only pass over prompt + response).

    Args:
        llm: a vLLM ``LLM`` (its unsteered requests are the reference model).
        prompt_ids, response_ids: per response, the prompt's and the response's token ids.
        extra_args: per response, the pass's ``SamplingParams.extra_args`` (None: none).
    Returns:
        ``(logprobs per response, the pass's RequestOutputs, wall seconds)``.
    """
    from vllm import SamplingParams

    prompts, params = [], []
    for i, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        prompts.append({"prompt_token_ids": list(p_ids) + list(r_ids)})  # vLLM's TokensPrompt (a TypedDict)
        # One throw-away greedy token: the pass is for the prompt logprobs.
        params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                     extra_args=extra_args[i] if extra_args is not None else None))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    lps = [response_logprobs(o.prompt_logprobs or [], len(p_ids), list(r_ids))
           for p_ids, r_ids, o in zip(prompt_ids, response_ids, outs)]
    return lps, outs, wall


def rescore(llm: Any, gens: list[Generated], capture_layer: int | None = None, capture_first: int = 0
            ) -> tuple[list[list[float]], float, dict[str, str]]:
    """The unsteered model's raw logprob of every counted token of ``gens`` (:func:`rescore_token_ids`).

    Returns the logprobs, the wall seconds and, when ``capture_layer`` is set, ``{prompt id: request id}`` of
    the first ``capture_first`` requests, whose residual stream at that layer is captured (gate trajectories).
    """
    extras: list[dict[str, Any] | None] = []
    for i in range(len(gens)):
        extra: dict[str, Any] = {"value_steer": False}
        if capture_layer is not None and i < capture_first:
            extra["capture_layers"] = [capture_layer]
        extras.append(extra)
    lps, outs, wall = rescore_token_ids(llm, [g.prompt_ids for g in gens], [g.token_ids for g in gens], extras)
    captured = {g.prompt_id: o.request_id for g, o in zip(gens[:capture_first], outs)} if capture_layer is not None \
        else {}
    return lps, wall, captured


def to_response(g: Generated, logprobs: list[float], mode: str) -> Response:
    """A :class:`Response` of ``g`` with its rescored ``logprobs``. The intervention counts are VFD's /
    abstention's own (from the worker); an activation-only row counts its gate-open tokens when gated, and
    every token when not (an ungated op edits every token), as does a logit-steering row (every token's
    logits are shifted, by the generator's gate strength)."""
    st = g.stats
    act = st.get("activation_steering") or {}
    gate_tokens = gate_open = 0
    if act.get("gated") and act.get("gate_tokens") is not None:
        gate_tokens = int(act["gate_tokens"])
        gate_open = round(float(act.get("gate_open_rate") or 0.0) * gate_tokens)
    scored, interv = int(st["num_scored"]), int(st["num_interventions"])
    if mode in ("add", "cap", "ablate", "logit"):
        scored = interv = len(g.token_ids)
    elif mode == "gated_add":
        scored, interv = gate_tokens, gate_open
    return Response(g.prompt_id, g.text, logprobs, g.negative, scored, interv, bool(st["forced_eos"]),
                    sampled_logprobs=g.sampled_logprobs, gate_tokens=gate_tokens, gate_open=gate_open)


def _engine(model: str, config: dict[str, Any], seed: int) -> Any:
    from value_steer.offline.engines import offline_llm

    # Block size 32 (the CPU backend's smallest) keeps VFD's K * max_num_seqs scratch blocks small.
    return offline_llm(model, config, kv_use="eval", max_model_len=512, max_num_seqs=MAX_NUM_SEQS, block_size=32,
                       seed=seed)


def _rows(directory: Path, request_ids: dict[str, str]) -> dict[str, Any]:
    """Per prompt id, the captured ``hidden [T, H]`` of its request in position order (T: its positions)."""
    import torch
    from safetensors.torch import load_file

    from value_steer.core.features import read_capture_index
    from value_steer.patches import get_adapter

    if not (directory / "requests.jsonl").is_file():
        return {}
    index = read_capture_index(directory, get_adapter().client_request_id)
    shards = [load_file(str(p)) for p in sorted(directory.glob("shard-*.safetensors"))]
    if not shards:
        return {}
    hidden = torch.cat([s["hidden"] for s in shards]).float()
    seq = torch.cat([s["seq_id"] for s in shards])
    pos = torch.cat([s["position"] for s in shards])
    out = {}
    for pid, rid in request_ids.items():
        if rid not in index:
            continue
        sel = seq == index[rid]
        out[pid] = hidden[sel][torch.argsort(pos[sel])]
    return out


def _trajectories(capture_dir: Path, head: Any, request_ids: dict[str, str]) -> dict[str, list[float]]:
    """Per prompt id, the head's value of every captured token (decode-matched, in position order)."""
    import torch

    with torch.no_grad():
        return {pid: head.p(h).tolist() for pid, h in _rows(capture_dir, request_ids).items()}


def _gate_trajectories(layer_dir: Path, vectors: SteeringVectors, request_ids: dict[str, str],
                       n_prompt: dict[str, int]) -> dict[str, list[float]]:
    """Per prompt id, the gate of each response token's residual stream (the token that token ``j + 1`` is
    sampled from; the last response token is never forwarded while sampling, so it is left out)."""
    from safetensors.torch import load_file

    probe = next(iter(load_file(str(Path(vectors.dir) / f"{vectors.probe}.safetensors")).values()))
    out = {}
    for pid, h in _rows(layer_dir, request_ids).items():
        g = gate_values(h[n_prompt[pid]:-1], probe, vectors.probe_threshold, vectors.probe_sharpness)
        out[pid] = g.tolist()
    return out


def run(plan: EvalPlan, model: str, head_path: str, vectors_dir: str | None = None, *,
        logit_checkpoint: str | None = None, log: Callable[[str], None] = print, task: Any = None,
        vector: str | None = None, vector_layer: int | None = None, qhead: str | None = None) -> dict[str, Any]:
    """Run every condition of ``plan``; returns the JSON-ready results. ``vectors_dir``: the steering vectors
    (needed when ``plan.activation``); ``logit_checkpoint``: the logit-steering generator (needed when
    ``plan.logit_strengths``); ``task``: a :func:`~value_steer.offline.tasks.task_file.load_task` task whose prompts
    and judge the run uses (None: the built-in sentiment task; its results then carry no ``task`` entry);
    ``vector``: the activation rows' vector in ``vectors_dir`` (default: the task's name, ``sentiment`` for the
    built-in task; its probe ``<vector>_probe`` when there is one), ``vector_layer``: which of a pairs vector's
    layers (:func:`~value_steer.offline.evaluate.steering.load_vectors`); ``qhead``: the Q-head of the token-mode
    rows (needed when ``plan.token_thresholds``)."""
    from value_steer.core.checkpoint import load_value_head
    from value_steer.offline.tasks.task_file import load_task

    user_task = task
    task = task if task is not None else load_task(None)
    sample_prompts = task.sample_prompts

    ckpt = load_value_head(head_path)
    if ckpt.threshold is None:
        raise ValueError(f"{head_path}: the sidecar has no threshold (run value-steer calibrate)")
    if plan.activation and vectors_dir is None:
        raise ValueError("plan.activation needs vectors_dir")
    if plan.logit_strengths and logit_checkpoint is None:
        raise ValueError("plan.logit_strengths needs logit_checkpoint")
    if (plan.token_thresholds or plan.token_betas) and qhead is None:
        raise ValueError("plan.token_thresholds / token_betas need qhead")
    if vector is None:
        vector = VECTOR if user_task is None else task.name
    vectors = (load_vectors(vectors_dir, vector, vector_layer) if plan.activation and vectors_dir is not None
               else None)
    act_rows = activation_conditions(vectors, plan.gated_scale) if vectors is not None else []
    est = estimate_seconds(plan, len(vectors.scales) if vectors is not None else 0)
    log(f"estimated wall time on 2 idle cores: {est['total'] / 60:.0f} min (" + ", ".join(
        f"{k} {v / 60:.0f}" for k, v in est.items() if k != "total") + ")")
    splits = {"calibration": sample_prompts("calibration", plan.n_cal, plan.seed),
              "test": sample_prompts("test", plan.n_test, plan.seed)}
    conditions: list[Condition] = []
    t_start = time.perf_counter()
    n_ex = plan.n_examples
    gate_layer = vectors.probe_layer if vectors is not None else None
    gate_ids: dict[str, dict[str, str]] = {}
    prompt_lens: dict[str, int] = {}

    def record(cond: Condition, prompts: list, llm: Any, extra: dict[str, Any], capture_first: int = 0
               ) -> dict[str, str]:
        """Generate, rescore and measure one condition; returns the captured (value) request ids."""
        gens, wall = generate(llm, prompts, max_tokens=plan.max_tokens, extra_args=extra, seed=plan.seed,
                              capture_first=capture_first, task=task)
        gated = bool(cond.steering and "gate" in cond.steering)
        lps, cond.rescore_s, cap_ids = rescore(llm, gens, gate_layer if gated else None, n_ex if gated else 0)
        if cap_ids:
            gate_ids[cond.name] = cap_ids
            prompt_lens.update({g.prompt_id: len(g.prompt_ids) for g in gens[:n_ex]})
        resp = [to_response(g, lp, cond.mode) for g, lp in zip(gens, lps)]
        cond.metrics = condition_metrics(resp, wall, plan.n_boot, plan.seed)
        cond.examples = [{"prompt_id": r.prompt_id, "text": r.text, "negative": r.negative,
                          "num_tokens": r.num_tokens, "num_scored": r.num_scored,
                          "num_interventions": r.num_interventions, "forced_eos": r.forced_eos,
                          "gate_tokens": r.gate_tokens, "gate_open": r.gate_open} for r in resp[:n_ex]]
        conditions.append(cond)
        m = cond.metrics
        log(f"[{time.perf_counter() - t_start:7.0f}s] {cond.split:11s} {cond.name:30s} undesirable "
            f"{m['undesirable']['value']:.3f} ppl {m['perplexity']['value']:.2f} "
            f"(sampled {m['perplexity_sampled']:.2f}) len {m['length']['value']:.1f} "
            f"interv {m['intervention']['value']:.3f} tok/s {m['tok_per_s']:.1f} rescore {cond.rescore_s:.0f}s")
        return {g.prompt_id: g.request_id for g in gens[:capture_first]}

    kmax = max(plan.ks)
    cap_dir = Path(tempfile.mkdtemp(prefix="value-steer-eval-capture-"))
    config: dict[str, Any] = {"vfd": {"value_head_path": head_path, "num_candidates": kmax},
                              "capture": {"dir": str(cap_dir)}}
    if vectors is not None:
        # The rows run the doses they measure: the serving guard against hostile doses is off.
        config["steering"] = {"vectors": vectors.dir, "max_relative_dose": None}
    if plan.logit_strengths:
        config["logit_steering"] = {"checkpoint": logit_checkpoint}
    t0 = time.perf_counter()
    llm = _engine(model, config, plan.seed)
    engine_s = time.perf_counter() - t0
    residual_norm_at_layer = None
    if vectors is not None:
        # The worker's measure of the layer's typical residual norm (what the doses are relative to).
        norms = llm.collective_rpc("value_steer_vectors", args=("hashes",))[0].get("residual_norms")
        residual_norm_at_layer = None if norms is None else float(norms[vectors.layer])
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

    ex_ids: dict[str, dict[str, str]] = {}
    test = splits["test"]
    ex_ids["base"] = record(Condition("base", "test", "base"), test, llm, {"value_steer": False}, n_ex)
    k0 = plan.ks[0]
    for k in plan.ks:
        # The whole sweep for the first K (the plots); the others at their chosen threshold only.
        for t in plan.thresholds if k == k0 else (chosen[k],):
            c = Condition(f"vfd K={k} t={t:g}", "test", "vfd", k, t)
            cap = n_ex if (k == k0 and t == chosen[k]) else 0
            got = record(c, test, llm, {"num_candidates": k, "threshold": t}, cap)
            if cap:
                ex_ids[c.name] = got
    if vectors is not None:
        for row in act_rows:
            record(Condition(row.name, "test", row.mode, scale=row.scale, steering=row.steering), test, llm,
                   {"value_steer": False, "steering": row.steering})
        if vectors.probe is not None:
            g_scale = vectors.gated_scale(plan.gated_scale)
            spec = gated_add(vectors, g_scale).to_dict()
            name = f"vfd K={k0} t={chosen[k0]:g} + gated add s={g_scale:g}"
            record(Condition(name, "test", "vfd_gated_add", k0, chosen[k0], g_scale, spec), test, llm,
                   {"num_candidates": k0, "threshold": chosen[k0], "steering": spec})
    for s in plan.logit_strengths:
        record(Condition(f"logit s={s:g}", "test", "logit", scale=s), test, llm,
               {"value_steer": False, "logit_steering": s})
    llm.collective_rpc("value_steer_flush_capture")
    del llm  # one engine at a time: the VFD engine's KV cache is freed before the abstention engine starts

    chosen_token = chosen_tilt = None
    if plan.token_thresholds or plan.token_betas:
        # Token-mode VFD: its own engine (no candidate rows), the same prompts, seeds and selection rule.
        t0 = time.perf_counter()
        token_sec = {"mode": "token", "qhead_path": qhead, **({"num_candidates": plan.token_k} if plan.token_k else {})}
        llm = _engine(model, {"vfd": token_sec}, plan.seed)
        tk = f" K={plan.token_k}" if plan.token_k else ""
        engine_s += time.perf_counter() - t0
        if plan.token_thresholds:
            sweep = {}
            for t in plan.token_thresholds:
                c = Condition(f"token{tk} t={t:g}", "calibration", "token", None, t)
                record(c, splits["calibration"], llm, {"threshold": t})
                sweep[t] = c.metrics
            chosen_token = choose_threshold(sweep, base_cal.metrics, plan.max_ppl_increase)
            log(f"chosen on calibration: token mode threshold {chosen_token:g}")
        if plan.token_betas:
            # Keyed by -beta: the rule's tie-break (the higher key intervenes less) then prefers the smaller tilt.
            sweep = {}
            for b in plan.token_betas:
                c = Condition(f"token tilt b={b:g}", "calibration", "token_tilt", scale=b)
                record(c, splits["calibration"], llm, {"token_beta": b})
                sweep[-b] = c.metrics
            chosen_tilt = -choose_threshold(sweep, base_cal.metrics, plan.max_ppl_increase)
            log(f"chosen on calibration: token mode tilt beta {chosen_tilt:g}")
        for t in plan.token_thresholds:
            record(Condition(f"token{tk} t={t:g}", "test", "token", None, t), test, llm, {"threshold": t})
        for b in plan.token_betas:
            record(Condition(f"token tilt b={b:g}", "test", "token_tilt", scale=b), test, llm, {"token_beta": b})
        del llm

    abstain_t = float(ckpt.threshold)
    t0 = time.perf_counter()
    llm = _engine(model, {"abstain": {"value_head_path": head_path}}, plan.seed)
    engine_s += time.perf_counter() - t0
    record(Condition(f"abstain t={abstain_t:.3g}", "test", "abstain", None, abstain_t), test, llm, {})
    del llm

    head = ckpt.head.eval()
    trajectories = {name: _trajectories(cap_dir, head, ids) for name, ids in ex_ids.items()}
    gates = {}
    if vectors is not None and vectors.probe is not None:
        layer_dir = cap_dir / f"layer-{vectors.probe_layer:02d}"
        gates = {name: _gate_trajectories(layer_dir, vectors, ids, prompt_lens) for name, ids in gate_ids.items()}
    wall = time.perf_counter() - t_start
    gen_s = sum(c.metrics["wall_s"] for c in conditions)
    rescore_s = sum(c.rescore_s for c in conditions)
    extra: dict[str, Any] = {} if user_task is None else {"task": user_task.record()}
    return {
        **extra,
        "plan": asdict(plan),
        "model": model,
        "head": head_path,
        "head_threshold": abstain_t,
        "head_meta": {k: v for k, v in ckpt.meta.items() if k != "train_history"},
        "vectors": None if vectors is None else {**asdict(vectors), "add_layer": vectors.add_layer,
                                                 "gated_scale": vectors.gated_scale(plan.gated_scale),
                                                 "worker_residual_norm": residual_norm_at_layer},
        "chosen_thresholds": {str(k): v for k, v in chosen.items()},
        **({"qhead": qhead} if qhead is not None and (plan.token_thresholds or plan.token_betas) else {}),
        **({"chosen_token_threshold": chosen_token} if plan.token_thresholds else {}),
        **({"chosen_token_beta": chosen_tilt} if plan.token_betas else {}),
        "conditions": [asdict(c) for c in conditions],
        "trajectories": trajectories,
        "gate_trajectories": gates,
        "estimate_s": est,
        "runtime_s": {"generation": gen_s, "rescoring": rescore_s, "engine_start": engine_s,
                      "other": wall - gen_s - rescore_s - engine_s},
        "wall_s": wall,
    }
