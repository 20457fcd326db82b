"""Activation vectors and a gate probe for SmolLM2, made from activations captured through the serving path.

``value-steer vectors`` (this module's :func:`main`):

1. **capture**: SmolLM2 answers training prompts through vLLM with ``ValueSteerWorker`` and a request
   ``capture_layers`` list, so the residual streams are those the steering ops edit while serving (prompt and
   decode tokens, per layer); VADER judges every response (the project's judge).
2. **directions**: per layer, the difference of means between positive- and negative-judged responses (each
   response's mean decode-token stream first, so long responses do not dominate): ``d_L = mean_pos - mean_neg``.
   Adding ``+c * d_L`` pushes toward positive sentiment.
3. **probes**: per layer, a logistic probe on decode tokens (label: the response is negative), class-balanced,
   trained on 80% of the training responses; its response-level AUROC (max over tokens) on the other 20%.
4. **layer sweep**: on calibration prompts, ``add(L, d_L, c)`` at every swept layer (``c = --sweep-coef``
   times ``|d_L|``): undesirable rate and perplexity under the unsteered model (a prefill rescoring pass). The
   chosen layer has the lowest undesirable rate within ``--max-ppl-increase`` of base perplexity.
5. **gate calibration**: the gate layer is the probe layer with the best validation AUROC at or below the
   chosen add layer; on calibration responses the judge finds fine, the gate threshold is the split-conformal
   threshold (``value_steer.core.calibration``) of the probe's per-response max probability, so the gate opens
   (``g >= 0.5``) on at most a fraction ``tau`` of them.

Writes ``sentiment.safetensors`` (unit ``d_L`` at the chosen layer, ``[H]``) and ``sentiment_probe.safetensors``
(``[H]``), each with a ``.meta.json`` sidecar (layer, how it was made, norms, suggested scales, the gate's
threshold and sharpness, the sweep), into ``--out`` (default: the package's ``data/vectors``, which ``make
serve`` preloads). Nothing here imports vLLM internals: the engine is the public ``vllm.LLM``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from value_steer.offline.assets import TEMPERATURE, TOP_P

DEFAULT_LAYERS = (3, 6, 9, 12, 15, 18, 21, 24, 27)
VECTOR_NAME = "sentiment"
PROBE_NAME = "sentiment_probe"
# The gate's sharpness: g = sigmoid(s * (h . w - threshold)); the probe's own logit scale is s = 1, a sharper
# gate is closer to on/off around the calibrated threshold.
GATE_SHARPNESS = 4.0
# Suggested add coefficients, in units of |d_L| (the difference of means itself is the natural unit).
SCALE_COEFS = (1.0, 2.0, 4.0, 8.0)


@dataclass
class Captured:
    """One split's capture: per response, its decode-token streams per layer and its judge label."""

    request_ids: list[str]
    labels: np.ndarray  # [n] 1 = negative
    texts: list[str]
    streams: dict[int, list[torch.Tensor]]  # layer -> per response [T_i, H] fp32 decode tokens


def _engine(model: str, config: dict[str, Any], seed: int) -> Any:
    from value_steer.offline.engines import offline_llm

    return offline_llm(model, config, kv_use="eval", max_model_len=1024, max_num_seqs=64, block_size=32, seed=seed)


def _sampling(n: int, max_tokens: int, seed: int, extra: dict[str, Any] | None = None, logprobs: bool = False
              ) -> list[Any]:
    from vllm import SamplingParams

    return [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens, seed=seed * 1_000_003 + i,
                           logprobs=0 if logprobs else None, extra_args=extra) for i in range(n)]


def _ask(llm: Any, prompts: list, params: list[Any], use_tqdm: bool) -> list[Any]:
    """Chat prompts through ``llm.chat``; a task's raw completion prompts (``messages`` None) through ``generate``."""
    if all(getattr(p, "messages", None) is None for p in prompts):
        return llm.generate([p.text for p in prompts], params, use_tqdm=use_tqdm)
    return llm.chat([p.messages for p in prompts], params, use_tqdm=use_tqdm)


def _judge(task: Any) -> Any:
    from value_steer.offline.tasks.task_file import load_task

    return (task if task is not None else load_task(None)).judge_negative


def capture_layers(model: str, prompts: list, layers: tuple[int, ...], out_dir: Path, *, max_tokens: int,
                   seed: int, task: Any = None) -> Captured:
    """Generate for ``prompts`` with ``capture_layers`` on and read the decode-token streams back; the task's judge
    (default: the built-in sentiment task's) labels the responses."""
    judge_negative = _judge(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = _engine(model, {"steering": {}, "capture": {"dir": str(out_dir)}}, seed)
    t0 = time.time()
    outs = _ask(llm, prompts, _sampling(len(prompts), max_tokens, seed, {"capture_layers": list(layers)}), True)
    llm.collective_rpc("value_steer_flush_capture")
    print(f"vectors: captured {len(outs)} responses at layers {list(layers)} in {time.time() - t0:.0f}s", flush=True)
    del llm
    rids = [o.request_id for o in outs]
    prompt_len = {o.request_id: len(o.prompt_token_ids) for o in outs}
    texts = [o.outputs[0].text for o in outs]
    labels = judge_negative(texts).astype(np.int64)
    streams = {layer: _read_layer(out_dir / f"layer-{layer:02d}", rids, prompt_len) for layer in layers}
    return Captured(rids, labels, texts, streams)


def _read_layer(directory: Path, request_ids: list[str], prompt_len: dict[str, int]) -> list[torch.Tensor]:
    """Per request (in ``request_ids`` order), its captured rows at positions >= its prompt length, in order."""
    from value_steer.offline.capture_rows import read_layer_rows

    return read_layer_rows(directory, request_ids, {rid: (n, None) for rid, n in prompt_len.items()})


def difference_of_means(streams: list[torch.Tensor], labels: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
    """``d = mean_pos - mean_neg`` over per-response mean streams; returns ``(d [H], facts)``."""
    means = torch.stack([s.mean(dim=0) for s in streams])
    lab = torch.as_tensor(labels, dtype=torch.bool)
    if lab.all() or not lab.any():
        raise ValueError("difference of means needs both negative- and positive-judged responses")
    d = means[~lab].mean(dim=0) - means[lab].mean(dim=0)
    norms = torch.cat(streams).norm(dim=1)
    return d, {"diff_norm": float(d.norm()), "residual_norm": float(norms.mean()),
               "n_positive": int((~lab).sum()), "n_negative": int(lab.sum())}


def train_probe(streams: list[torch.Tensor], labels: np.ndarray, *, seed: int, steps: int = 300,
                weight_decay: float = 1e-3) -> tuple[torch.Tensor, float, float]:
    """A class-balanced logistic probe on decode tokens (token label = its response's label).

    Returns ``(w [H], b, validation AUROC)``: the validation is the last 20% of responses (a fixed split by a
    seeded permutation), scored per response by the max probability over its tokens (the gate's rule).
    """
    from value_steer.offline.training import auroc

    n = len(streams)
    perm = np.random.RandomState(seed).permutation(n)
    n_val = max(1, n // 5)
    val, tr = perm[:n_val], perm[n_val:]
    x = torch.cat([streams[i] for i in tr])
    y = torch.cat([torch.full((streams[i].shape[0],), float(labels[i])) for i in tr])
    mu, sd = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    xs = (x - mu) / sd
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    pos = float(y.mean())
    weight = torch.where(y > 0.5, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, weight=weight)
                + weight_decay * (w * w).sum())
        loss.backward()
        opt.step()
    with torch.no_grad():
        w_raw = w / sd  # the probe on the raw stream: (h - mu) / sd . w + b = h . w_raw + b_raw
        b_raw = float(b - (mu * w_raw).sum())
        scores = [float(torch.sigmoid(streams[i] @ w_raw + b_raw).max()) for i in val]
    val_auc = float(auroc(scores, [int(labels[i]) for i in val])) if len(set(labels[val].tolist())) == 2 else math.nan
    return w_raw.detach(), b_raw, val_auc


def calibrate_gate(w: torch.Tensor, b: float, streams: list[torch.Tensor], labels: np.ndarray, tau: float
                   ) -> dict[str, Any]:
    """Split-conformal gate threshold: on the calibration responses the judge finds fine, the gate (open where
    ``sigmoid(h . w + b) >= q``, i.e. ``h . w >= logit(q) - b``) opens on at most a fraction ``tau`` of them."""
    from value_steer.core.calibration import calibration_record
    from value_steer.offline.training import auroc

    trajs = [torch.sigmoid(s @ w + b).double().numpy() for s in streams]
    record = calibration_record(labels.tolist(), trajs, tau)
    q = min(max(float(record["threshold"]), 1e-12), 1 - 1e-12)
    record["gate_threshold"] = math.log(q) - math.log1p(-q) - b
    record["auroc_max"] = float(auroc([float(t.max()) for t in trajs], labels.tolist()))
    opened = [float(t.max()) >= record["threshold"] for t in trajs]
    safe = labels == 0
    record["open_rate_safe"] = float(np.mean(np.asarray(opened)[safe])) if safe.any() else math.nan
    record["open_rate_undesirable"] = float(np.mean(np.asarray(opened)[~safe])) if (~safe).any() else math.nan
    return record


def layer_sweep(model: str, prompts: list, directions: dict[int, torch.Tensor], *, coef: float, max_tokens: int,
                seed: int, task: Any = None) -> dict[str, Any]:
    """Undesirable rate and perplexity (under the unsteered model) of ``add(L, d_L, coef)`` per layer, and base."""
    from value_steer.core.steering_spec import Steering, add
    from value_steer.offline.evaluate.run import rescore_token_ids
    from value_steer.offline.evaluate.stats import perplexity_of

    judge_negative = _judge(task)
    # The sweep runs the doses it measures (an operator's experiment): the serving guard against hostile doses is off.
    llm = _engine(model, {"steering": {"max_relative_dose": None}}, seed)
    rows: dict[str, Any] = {}
    conditions: list[tuple[str, dict[str, Any] | None]] = [("base", None)]
    conditions += [(str(layer), Steering([add(layer, d.tolist(), coef)]).extra_args())
                   for layer, d in directions.items()]
    for name, extra in conditions:
        t0 = time.time()
        outs = _ask(llm, prompts, _sampling(len(prompts), max_tokens, seed, extra), False)
        neg = judge_negative([o.outputs[0].text for o in outs])
        # Perplexity as value-steer eval defines it, under the unsteered model.
        lps, _, _ = rescore_token_ids(llm, [o.prompt_token_ids for o in outs], [o.outputs[0].token_ids for o in outs])
        rows[name] = {"undesirable": float(np.mean(neg)), "perplexity": perplexity_of(lps),
                      "n": len(outs), "seconds": time.time() - t0}
        print(f"vectors: sweep {name:>4s}: undesirable {rows[name]['undesirable']:.3f} "
              f"ppl {rows[name]['perplexity']:.2f}", flush=True)
    del llm
    return rows


def choose_layer(sweep: dict[str, Any], max_ppl_increase: float) -> int:
    """The swept layer with the lowest undesirable rate within the perplexity budget (else the lowest ppl)."""
    base = sweep["base"]["perplexity"]
    layers = {int(k): v for k, v in sweep.items() if k != "base"}
    ok = [k for k, v in layers.items() if v["perplexity"] <= base * (1 + max_ppl_increase)]
    if ok:
        return min(ok, key=lambda k: (layers[k]["undesirable"], layers[k]["perplexity"]))
    return min(layers, key=lambda k: layers[k]["perplexity"])


def save_vector(out_dir: Path, name: str, vector: torch.Tensor, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    save_file({name: vector.detach().float().contiguous()}, str(path))
    with open(str(path) + ".meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--pairs" or a.startswith("--pairs=") for a in argv):
        from value_steer.offline.pairs import main as pairs_main

        return pairs_main(argv)
    from value_steer.offline.assets import default_vectors_dir
    from value_steer.offline.data_dir import data_dir
    from value_steer.offline.models import prepare_smollm2
    from value_steer.offline.pipeline import model_record
    from value_steer.offline.tasks.task_file import TaskError, load_task

    ap = argparse.ArgumentParser(prog="value-steer vectors", description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=None, help="a task file: its prompts and judge (default: the built-in "
                    "sentiment task); the vectors are named after the task (<name>, <name>_probe)")
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--n-train", type=int, default=600, help="training prompts (directions and probes)")
    ap.add_argument("--n-cal", type=int, default=300, help="calibration prompts (the gate's conformal threshold)")
    ap.add_argument("--n-sweep", type=int, default=64, help="calibration prompts per layer of the sweep")
    ap.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sweep-coef", type=float, default=4.0, help="the sweep's add scale, in units of |d_L|")
    ap.add_argument("--max-ppl-increase", type=float, default=0.10)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: the package's data/vectors, built-in task "
                    "only)")
    args = ap.parse_args(argv)
    t_start = time.time()
    try:
        task = load_task(args.task)
    except TaskError as exc:
        ap.error(str(exc))
    builtin = args.task is None
    if args.out is None:
        if not builtin:
            ap.error("--out is required with --task (the package's data/vectors holds the built-in task's vectors)")
        args.out = str(default_vectors_dir())
    vector_name, probe_name = (VECTOR_NAME, PROBE_NAME) if builtin else (task.name, f"{task.name}_probe")
    sample_prompts = task.sample_prompts
    model = args.model or str(prepare_smollm2())
    layers = tuple(sorted(set(args.layers)))
    run = f"capture-{args.n_train}-{args.n_cal}-{args.max_tokens}-{args.seed}"
    work = data_dir() / "vectors" / (run if builtin else f"{task.name}-{Path(model).name}-{run}")
    command = "value-steer vectors " + " ".join(argv if argv is not None else sys.argv[2:])

    train = capture_layers(model, sample_prompts("train", args.n_train, args.seed), layers, work / "train",
                           max_tokens=args.max_tokens, seed=args.seed, task=task)
    print(f"vectors: train negative rate {train.labels.mean():.3f} (n {len(train.labels)})", flush=True)
    directions, facts, probes = {}, {}, {}
    for layer in layers:
        d, facts[layer] = difference_of_means(train.streams[layer], train.labels)
        directions[layer] = d
        w, b, auc = train_probe(train.streams[layer], train.labels, seed=args.seed)
        probes[layer] = (w, b, auc)
        print(f"vectors: layer {layer:2d}: |d| {facts[layer]['diff_norm']:.2f}, residual norm "
              f"{facts[layer]['residual_norm']:.1f}, probe val AUROC {auc:.3f}", flush=True)

    sweep_prompts = sample_prompts("calibration", args.n_sweep, args.seed + 1)
    sweep = layer_sweep(model, sweep_prompts, {k: v * args.sweep_coef for k, v in directions.items()}, coef=1.0,
                        max_tokens=args.max_tokens, seed=args.seed, task=task)
    layer = choose_layer(sweep, args.max_ppl_increase)
    gate_candidates = [k for k in layers if k <= layer] or [min(layers)]
    gate_layer = max(gate_candidates, key=lambda k: probes[k][2] if not math.isnan(probes[k][2]) else -1.0)
    print(f"vectors: add layer {layer}, gate layer {gate_layer}", flush=True)

    cal = capture_layers(model, sample_prompts("calibration", args.n_cal, args.seed), (gate_layer,),
                         work / "calibration", max_tokens=args.max_tokens, seed=args.seed, task=task)
    w, b, val_auc = probes[gate_layer]
    record = calibrate_gate(w, b, cal.streams[gate_layer], cal.labels, args.tau)
    print(f"vectors: gate threshold {record['gate_threshold']:.3f}; on calibration it opens on "
          f"{record['open_rate_safe']:.3f} of fine and {record['open_rate_undesirable']:.3f} of negative responses "
          f"(AUROC {record['auroc_max']:.3f})", flush=True)

    d = directions[layer]
    unit = d / d.norm()
    f = facts[layer]
    out = Path(args.out)
    how = {"command": command, "model": "SmolLM2-135M-Instruct", "judge": "VADER compound < -0.05",
           "capture": {"split": "train", "n": args.n_train, "max_tokens": args.max_tokens,
                       "temperature": TEMPERATURE, "top_p": TOP_P, "seed": args.seed}}
    if not builtin or args.model is not None:
        how.update(model=model_record(model), judge=task.judge_spec, task=task.record())
    save_vector(out, vector_name, unit, {
        "layer": layer, "how": "difference of means (positive - negative judged responses, per-response mean "
                               "decode-token residual stream), unit norm", **how,
        "diff_norm": f["diff_norm"], "residual_norm": f["residual_norm"],
        "n_positive": f["n_positive"], "n_negative": f["n_negative"],
        "scales": [round(c * f["diff_norm"], 4) for c in SCALE_COEFS], "scale_units": "x |d| " + str(SCALE_COEFS),
        # Clamp the projection on the unit direction from below at its mean over positive-judged responses.
        "cap": {"min": float(_mean_projection(train.streams[layer], train.labels == 0, unit))},
        "sweep": {"coef": args.sweep_coef, "n_prompts": args.n_sweep, "rows": sweep,
                  "max_ppl_increase": args.max_ppl_increase},
        "layers": {str(k): {**facts[k], "probe_val_auroc": probes[k][2]} for k in layers},
    })
    save_vector(out, probe_name, w, {
        "layer": gate_layer, "threshold": record["gate_threshold"], "sharpness": GATE_SHARPNESS,
        "how": "class-balanced logistic probe on decode tokens (token label: the response is negative), raw "
               "residual stream; gate threshold: split-conformal on calibration responses judged fine",
        **how, "bias": b, "probe_val_auroc": val_auc, "calibration": record,
    })
    print(f"vectors: wrote {out / (vector_name + '.safetensors')} and {out / (probe_name + '.safetensors')} "
          f"in {time.time() - t_start:.0f}s", flush=True)
    return 0


def _mean_projection(streams: list[torch.Tensor], mask: np.ndarray, unit: torch.Tensor) -> float:
    sel = [s for s, m in zip(streams, mask) if m]
    return float((torch.cat(sel) @ unit).mean()) if sel else 0.0


if __name__ == "__main__":
    sys.exit(main())
