"""Training a logit-steering generator (GenSteer / CALM) on preference pairs from the base model's own samples.

``value-steer train-logit`` (options in ``value_steer.offline.cli``; ``docs/logit-steering.md``), in three stages:

1. **Samples** (:func:`collect_samples`): ``samples_per_prompt`` responses per training prompt from the base model,
   through vLLM with value_steer's decode-matched capture on (``{"capture": {"dir": ...}}``, every request with
   ``value_steer_capture``): the capture writes the final post-norm hidden state of every generated token with its
   request id and position, the very state the served generator will read. Each request has its own seed, so the
   responses of a prompt differ. The state captured at position ``p`` produced the logits of the token at ``p + 1``
   (read from the generation outputs); the first response token comes from the prompt's last state, which the
   capture does not record, so a response contributes its tokens ``1..n-1``.
2. **Pairs** (:func:`preference_pairs`): the project's judge (VADER, ``value_steer.offline.tasks.sentiment``) labels
   each response; for a prompt, every (non-negative, negative) combination of its responses is a (chosen, rejected)
   pair. Prompts with only one kind give none.
3. **Training** (:func:`train_generator`): the base is frozen: its logits are ``hidden @ lm_head^T`` (the ``lm_head``
   read from the HF folder with safetensors: the tied embedding for SmolLM2; no model is loaded), recomputed per batch.
   The generator (``value_steer.core.logit_steer``) steers them at multiplier 1 (the served default) and the loss is
   DPO-style on the length-normalised log-likelihoods, ``-logsigmoid(beta (mean log p_chosen - mean log p_rejected))``,
   plus ``kl_weight`` times the mean per-token KL of the steered next-token distribution from the base's (on every
   position of both responses), which keeps the steered model fluent (perplexity under the base) while it moves.
   AdamW, prompts split into train / validation (``val_frac``), the epoch with the lowest validation loss kept.

Deterministic for a ``--seed`` (per-request sampling seeds, the prompt subset, the initialisation and the batch order).
Writes the checkpoint and its sidecar with the exact command that reproduces it, the data, the loss and the history.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from value_steer.core.logit_steer import LogitSteerGenerator, save_logit_steer
from value_steer.offline.assets import TEMPERATURE, TOP_P

SAMPLES_FILE = "samples.json"


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class Response:
    """One sampled response as training data.

    prompt: index of its prompt; negative: the judge's label.
    hidden: ``[T, H]`` fp32 final post-norm states, each the one that produced the next token's logits.
    targets: ``[T]`` int64, the token each of those logits produced.
    """

    prompt: int
    hidden: torch.Tensor
    targets: torch.Tensor
    negative: bool


def preference_pairs(prompts: Sequence[int], negative: Sequence[bool]) -> np.ndarray:
    """``[P, 2]`` int64 ``(chosen, rejected)`` response indices: per prompt, every (non-negative, negative) pair,
    prompts in order of first appearance, responses in index order."""
    by_prompt: dict[int, tuple[list[int], list[int]]] = {}
    for i, (p, neg) in enumerate(zip(prompts, negative)):
        by_prompt.setdefault(int(p), ([], []))[1 if neg else 0].append(i)
    pairs = [(c, r) for chosen, rejected in by_prompt.values() for c in chosen for r in rejected]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def dpo_loss(lp_chosen: torch.Tensor, lp_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean(-logsigmoid(beta * (lp_chosen - lp_rejected)))`` over ``[P]`` mean log-likelihoods; scalar fp32."""
    return -torch.nn.functional.logsigmoid(beta * (lp_chosen - lp_rejected)).mean()


def steered_logprobs(gen: LogitSteerGenerator | None, lm_head: torch.Tensor, hidden: torch.Tensor,
                     targets: torch.Tensor, lengths: Sequence[int], strength: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response mean log-probability of its tokens under the steered base, and the mean per-token KL of the
    steered next-token distribution from the base's.

    Args:
        gen: the generator (gradients flow into it), or None for the frozen base (the KL is then 0).
        lm_head: ``[V, H]`` fp32, the base's output embedding.
        hidden: ``[T, H]`` fp32, the responses' states concatenated; targets: ``[T]`` int64.
        lengths: tokens per response (sum ``T``).
        strength: the request multiplier ``s`` the generator is trained at.
    Returns:
        ``([n] fp32 mean log-probabilities, scalar fp32 mean over the T positions of KL(p_steered || p_base))``.
    """
    with torch.no_grad():
        base = hidden @ lm_head.t()  # [T, V] frozen
    lsm = (base if gen is None else gen(hidden, base, strength)).log_softmax(dim=-1)
    lp = lsm.gather(1, targets.unsqueeze(1)).squeeze(1)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(list(lengths)))
    sums = torch.zeros(len(lengths), dtype=lp.dtype).index_add(0, seg, lp)
    mean_lp = sums / torch.as_tensor(list(lengths), dtype=lp.dtype)
    if gen is None:
        return mean_lp, torch.zeros((), dtype=lp.dtype)
    with torch.no_grad():
        base_lsm = base.log_softmax(dim=-1)
    kl = (lsm.exp() * (lsm - base_lsm)).sum(dim=-1).mean()
    return mean_lp, kl


def mean_logprobs(gen: LogitSteerGenerator | None, lm_head: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                  lengths: Sequence[int], strength: float = 1.0) -> torch.Tensor:
    """``[n]`` fp32 per-response mean log-probability of its tokens under the steered base (the base when ``gen`` is
    None); :func:`steered_logprobs` without the KL."""
    return steered_logprobs(gen, lm_head, hidden, targets, lengths, strength)[0]


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class LogitTrainResult:
    """The generator with the best validation epoch's weights (``eval()``, CPU), the per-epoch history (train loss,
    validation loss, validation pair accuracy steered and base), the best epoch and the split sizes."""

    generator: LogitSteerGenerator
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    n_train_pairs: int = 0
    n_val_pairs: int = 0


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="batch")
        except ImportError:  # tqdm is in the "train" extra
            pass

    class _Printed:
        """Without tqdm: one line every tenth of the way."""

        def __init__(self) -> None:
            self.n, self.every = 0, max(1, total // 10)

        def update(self, n: int = 1) -> None:
            self.n += n
            if enabled and (self.n % self.every == 0 or self.n == total):
                print(f"{desc}: {self.n}/{total}", flush=True)

        def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...
        def close(self) -> None: ...

    return _Printed()


def _batches(prompt_ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(prompt_ids), size):
        yield list(prompt_ids[i : i + size])


def _pair_batch(responses: Sequence[Response], pairs: np.ndarray, pair_prompt: np.ndarray, prompts: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, list[int], np.ndarray]:
    """The unique responses of ``prompts``' pairs, concatenated, and the pairs re-indexed into them."""
    sel = pairs[np.isin(pair_prompt, prompts)]
    uniq, inv = np.unique(sel.reshape(-1), return_inverse=True)
    hidden = torch.cat([responses[i].hidden for i in uniq.tolist()])
    targets = torch.cat([responses[i].targets for i in uniq.tolist()])
    lengths = [int(responses[i].targets.shape[0]) for i in uniq.tolist()]
    return hidden, targets, lengths, inv.reshape(-1, 2)


@torch.no_grad()
def _evaluate(gen: LogitSteerGenerator, responses: Sequence[Response], pairs: np.ndarray, pair_prompt: np.ndarray,
              prompts: list[int], lm_head: torch.Tensor, beta: float, kl_weight: float, batch_prompts: int
              ) -> dict[str, float]:
    """Over ``prompts``' pairs: the loss (DPO + ``kl_weight`` KL, as trained), the DPO part, the mean per-token KL
    from the base, and the pair accuracy (chosen more likely than rejected), steered and base."""
    total, dpo, kl_sum, n, hits, base_hits = 0.0, 0.0, 0.0, 0, 0, 0
    for group in _batches(prompts, batch_prompts):
        hidden, targets, lengths, idx = _pair_batch(responses, pairs, pair_prompt, group)
        lp, kl = steered_logprobs(gen, lm_head, hidden, targets, lengths)
        lp0 = mean_logprobs(None, lm_head, hidden, targets, lengths)
        c, r = torch.from_numpy(idx[:, 0]), torch.from_numpy(idx[:, 1])
        d = float(dpo_loss(lp[c], lp[r], beta))
        total += (d + kl_weight * float(kl)) * idx.shape[0]
        dpo += d * idx.shape[0]
        kl_sum += float(kl) * idx.shape[0]
        n += idx.shape[0]
        hits += int((lp[c] > lp[r]).sum())
        base_hits += int((lp0[c] > lp0[r]).sum())
    n = max(n, 1)
    return {"loss": total / n, "dpo": dpo / n, "kl": kl_sum / n, "accuracy": hits / n, "base_accuracy": base_hits / n}


def train_generator(
    responses: Sequence[Response],
    pairs: np.ndarray,
    lm_head: torch.Tensor,
    *,
    rank: int = 8,
    gate_hidden: int = 32,
    max_strength: float = 2.0,
    beta: float = 1.0,
    kl_weight: float = 0.0,
    epochs: int = 3,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_prompts: int = 8,
    val_frac: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> LogitTrainResult:
    """Train a fresh generator on preference pairs with the base frozen (module doc, stage 3).

    Args:
        responses: the responses (``hidden [T, H]``, ``targets [T]``, prompt index, label).
        pairs: ``[P, 2]`` ``(chosen, rejected)`` indices into ``responses`` (:func:`preference_pairs`).
        lm_head: ``[V, H]`` fp32 base output embedding.
        rank, gate_hidden, max_strength: the generator's shape and bound.
        beta: the DPO temperature on the mean log-likelihood margin.
        kl_weight: weight of the mean per-token KL(p_steered || p_base) added to the loss: the generator then moves
            the distribution only where it buys preference margin (without it, DPO on mean log-likelihoods can
            push mass onto a few frequent tokens and the steered model repeats itself).
        epochs, lr, weight_decay: AdamW over ``epochs`` passes.
        batch_prompts: prompts per step (all their pairs; each response's logits computed once).
        val_frac: fraction of the prompts (with pairs) held out for validation (none when there are < 2 prompts).
        seed: initialisation (inside a forked RNG: the caller's global state is untouched), split and batch order.
        progress: a bar over the steps.
    """
    if pairs.size == 0:
        raise ValueError("no preference pairs: no prompt has both a chosen (non-negative) and a rejected (negative) "
                         "response; sample more prompts or more responses per prompt")
    if epochs < 1 or batch_prompts < 1 or not beta > 0 or not kl_weight >= 0 or not 0.0 <= val_frac < 1.0:
        raise ValueError(f"need epochs >= 1, batch_prompts >= 1, beta > 0, kl_weight >= 0, 0 <= val_frac < 1; got "
                         f"{epochs}, {batch_prompts}, {beta}, {kl_weight}, {val_frac}")
    lm_head = lm_head.float()
    v, h = lm_head.shape
    pair_prompt = np.asarray([responses[int(c)].prompt for c in pairs[:, 0]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    with_pairs = sorted(set(pair_prompt.tolist()))
    order = [with_pairs[i] for i in rng.permutation(len(with_pairs))]
    n_val = round(val_frac * len(order)) if len(order) >= 2 else 0
    n_val = min(n_val, len(order) - 1)
    val_prompts, train_prompts = sorted(order[:n_val]), sorted(order[n_val:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = LogitSteerGenerator(h, v, rank, gate_hidden, max_strength)
    opt = torch.optim.AdamW(gen.parameters(), lr=lr, weight_decay=weight_decay)
    gen_order = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_prompts) / batch_prompts)
    eval_prompts = val_prompts or train_prompts
    first = _evaluate(gen, responses, pairs, pair_prompt, eval_prompts, lm_head, beta, kl_weight, batch_prompts)

    def record(epoch: float, train_loss: float | None, ev: dict[str, float]) -> dict[str, Any]:
        return {"epoch": epoch, "train_loss": train_loss, "val_loss": ev["loss"], "val_dpo": ev["dpo"],
                "val_kl": ev["kl"], "val_accuracy": ev["accuracy"], "val_base_accuracy": ev["base_accuracy"]}

    # Epoch -1: the untrained generator (the base itself); it has no training loss.
    history: list[dict[str, Any]] = [record(-1.0, None, first)]
    best_loss, best_epoch, best_state = first["loss"], -1, copy.deepcopy(gen.state_dict())
    bar = _progress(epochs * steps_per_epoch, progress, "logit generator")
    try:
        for epoch in range(epochs):
            gen.train()
            perm = torch.randperm(len(train_prompts), generator=gen_order).tolist()
            total, count = 0.0, 0
            for group in _batches([train_prompts[i] for i in perm], batch_prompts):
                hidden, targets, lengths, idx = _pair_batch(responses, pairs, pair_prompt, group)
                lp, kl = steered_logprobs(gen, lm_head, hidden, targets, lengths)
                loss = dpo_loss(lp[torch.from_numpy(idx[:, 0])], lp[torch.from_numpy(idx[:, 1])], beta)
                if kl_weight:
                    loss = loss + kl_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.shape[0]
                count += idx.shape[0]
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            gen.eval()
            ev = _evaluate(gen, responses, pairs, pair_prompt, eval_prompts, lm_head, beta, kl_weight,
                           batch_prompts)
            history.append(record(float(epoch), total / max(count, 1), ev))
            if ev["loss"] < best_loss:
                best_loss, best_epoch, best_state = ev["loss"], epoch, copy.deepcopy(gen.state_dict())
    finally:
        bar.close()
    gen.load_state_dict(best_state)
    gen.eval()
    n_train = int(np.isin(pair_prompt, train_prompts).sum())
    return LogitTrainResult(generator=gen, history=history, best_epoch=best_epoch, n_train_pairs=n_train,
                            n_val_pairs=int(pairs.shape[0]) - n_train)


# --------------------------------------------------------------------------------------------------
# The base model's output embedding (no model load)


def load_lm_head(model_dir: str | os.PathLike[str]) -> torch.Tensor:
    """``[V, H]`` fp32 output embedding of an HF folder, read with safetensors: ``lm_head.weight``, or the input
    embedding ``model.embed_tokens.weight`` when the model ties them (SmolLM2)."""
    from safetensors import safe_open

    folder = Path(model_dir)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    key = "lm_head.weight" if "lm_head.weight" in where else "model.embed_tokens.weight"
    if key not in where:
        raise ValueError(f"{folder}: neither lm_head.weight nor model.embed_tokens.weight in its safetensors")
    if key != "lm_head.weight" and not cfg.get("tie_word_embeddings", True):
        raise ValueError(f"{folder}: no lm_head.weight and the model does not tie its embeddings")
    with safe_open(str(folder / where[key]), framework="pt") as f:
        return f.get_tensor(key).to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------------
# Stage 1: samples through the serving path's capture


def collect_samples(model: str, prompts: Sequence[Any], work: Path, *, samples_per_prompt: int, max_tokens: int,
                    temperature: float = TEMPERATURE, top_p: float = TOP_P, seed: int = 0,
                    engine_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Sample the responses with capture on and record them in ``work/samples.json`` (reused when present).

    Returns one record per response: ``prompt`` (index), ``request_id``, ``seq_id`` (the capture's), ``prompt_ids``,
    ``token_ids``, ``text``.
    """
    path = work / SAMPLES_FILE
    if path.is_file():
        print(f"train-logit: reusing the samples in {work}", flush=True)
        return json.loads(path.read_text(encoding="utf-8"))
    cap = work / "capture"
    if cap.exists() and any(cap.iterdir()):
        raise RuntimeError(f"{cap} holds an unfinished capture (no {SAMPLES_FILE}); remove {work} and run again")
    from vllm import SamplingParams

    from value_steer.core.features import read_capture_index
    from value_steer.offline.engines import offline_llm
    from value_steer.patches import get_adapter

    kwargs = {"kv_use": "eval", "max_model_len": 1024, "max_num_seqs": 64, "seed": seed, **(engine_kwargs or {})}
    llm = offline_llm(model, {"capture": {"dir": str(cap), "enabled_by_default": True}}, **kwargs)
    convs, params, owner = [], [], []
    raw = all(getattr(p, "messages", None) is None for p in prompts)  # a task with "chat": false
    for i, p in enumerate(prompts):
        for j in range(samples_per_prompt):
            convs.append(p.text if raw else p.messages)
            # Distinct, reproducible seeds per (prompt, sample): the samples of a prompt differ.
            params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                         seed=(seed * 1_000_003 + i * samples_per_prompt + j) % (2**31)))
            owner.append(i)
    t0 = time.perf_counter()
    outs = llm.generate(convs, params, use_tqdm=True) if raw else llm.chat(convs, params, use_tqdm=True)
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"train-logit: {len(outs)} responses, {n_tok} tokens in {time.perf_counter() - t0:.0f}s", flush=True)
    llm.collective_rpc("value_steer_flush_capture")
    del llm
    seq_of = read_capture_index(cap, get_adapter().client_request_id)
    records = [{"prompt": owner[k], "request_id": o.request_id, "seq_id": seq_of.get(o.request_id),
                "prompt_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
                "text": o.outputs[0].text} for k, o in enumerate(outs)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return records


def load_responses(work: Path, records: Sequence[dict[str, Any]], negative: Sequence[bool]) -> list[Response]:
    """Pair each record with its captured states: the state at position ``p`` with the token at ``p + 1``."""
    from safetensors.torch import load_file

    cap = work / "capture"
    shards = [load_file(str(f)) for f in sorted(cap.glob("shard-*.safetensors"))]
    if not shards:
        raise RuntimeError(f"{cap}: no captured states")
    hidden = torch.cat([t["hidden"] for t in shards]).float()
    seq = torch.cat([t["seq_id"] for t in shards]).numpy()
    pos = torch.cat([t["position"] for t in shards]).numpy()
    order = np.lexsort((pos, seq))
    seq, pos = seq[order], pos[order]
    hidden = hidden[torch.from_numpy(order)]
    starts = {int(s): int(i) for s, i in zip(*np.unique(seq, return_index=True))}
    counts = dict(zip(*(x.tolist() for x in np.unique(seq, return_counts=True))))
    out = []
    for rec, neg in zip(records, negative):
        sid = rec["seq_id"]
        if sid is None or sid not in starts:
            continue  # a one-token response: its only state is the prompt's, not captured
        a = starts[sid]
        b = a + counts[sid]
        ids = [*rec["prompt_ids"], *rec["token_ids"]]
        p = pos[a:b]
        keep = p + 1 < len(ids)
        sel = np.flatnonzero(keep) + a
        targets = torch.as_tensor([ids[int(q) + 1] for q in pos[sel]], dtype=torch.int64)
        out.append(Response(prompt=int(rec["prompt"]), hidden=hidden[torch.from_numpy(sel)], targets=targets,
                            negative=bool(neg)))
    return out


# --------------------------------------------------------------------------------------------------
# The command


def reproduce_command(args: argparse.Namespace, model_given: bool) -> str:
    """``value-steer train-logit`` with every option spelled out (defaults changing later cannot change it)."""
    parts = ["value-steer", "train-logit"]
    if getattr(args, "task", None) is not None:
        parts += ["--task", args.task]
    if model_given:
        parts += ["--model", args.model]
    for flag in ("split", "n_prompts", "samples_per_prompt", "max_tokens", "temperature", "top_p", "rank",
                 "gate_hidden", "max_strength", "beta", "kl_weight", "epochs", "lr", "weight_decay", "batch_prompts",
                 "val_frac", "seed", "out"):  # fmt: skip
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shlex.join(parts)


def run(args: argparse.Namespace, *, judge: Callable[[list[str]], np.ndarray] | None = None,
        engine_kwargs: dict[str, Any] | None = None) -> LogitTrainResult:
    """``value-steer train-logit``: samples -> judged pairs -> training -> checkpoint + sidecar. Prints the runtime.

    The prompts and the judge are ``args.task``'s (a task file; None: the built-in sentiment task, VADER).
    ``judge(texts) -> negative [n] bool`` overrides the task's judge; ``engine_kwargs`` go to the sampling engine
    (tests: a tiny model's sizes).
    """
    from value_steer.offline.data_dir import data_dir
    from value_steer.offline.tasks.sentiment import compound
    from value_steer.offline.tasks.task_file import load_task

    task_file = getattr(args, "task", None)
    task = load_task(task_file)
    if task.labelled:
        raise ValueError(f"task {task.name!r}: train-logit samples the model and judges the samples; a 'labels' task "
                         "has no judge")
    judge_negative, sample_prompts = task.judge_negative, task.sample_prompts

    t_start = time.perf_counter()
    model_given = args.model is not None
    if model_given:
        model = args.model
    else:
        from value_steer.offline.models import prepare_smollm2

        model = str(prepare_smollm2())
    name = Path(model).name
    prefix = "" if task_file is None else task.name + "-"  # the built-in task keeps its folders
    work = Path(args.work) if args.work else (
        data_dir() / "logit" / f"{prefix}{name}-{args.split}-{args.n_prompts}x{args.samples_per_prompt}-"
        f"{args.max_tokens}-T{args.temperature:g}-p{args.top_p:g}-seed{args.seed}")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    prompts = sample_prompts(args.split, args.n_prompts, args.seed)
    t0 = time.perf_counter()
    records = collect_samples(model, prompts, work, samples_per_prompt=args.samples_per_prompt,
                              max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, engine_kwargs=engine_kwargs)
    t_sample = time.perf_counter() - t0
    texts = [r["text"] for r in records]
    negative = (judge or judge_negative)(texts)
    responses = load_responses(work, records, negative)
    pairs = preference_pairs([r.prompt for r in responses], [r.negative for r in responses])
    n_pos = sum(not r.negative for r in responses)
    print(f"train-logit: {len(responses)} responses ({n_pos} chosen-side, {len(responses) - n_pos} rejected-side), "
          f"{pairs.shape[0]} pairs over {len({responses[int(c)].prompt for c in pairs[:, 0]})} prompts", flush=True)
    lm_head = load_lm_head(model)
    t0 = time.perf_counter()
    result = train_generator(responses, pairs, lm_head, rank=args.rank, gate_hidden=args.gate_hidden,
                             max_strength=args.max_strength, beta=args.beta, kl_weight=args.kl_weight,
                             epochs=args.epochs, lr=args.lr,
                             weight_decay=args.weight_decay, batch_prompts=args.batch_prompts,
                             val_frac=args.val_frac, seed=args.seed)
    t_train = time.perf_counter() - t0
    gen = result.generator
    n_base = int(lm_head.numel())  # the output embedding alone: a lower bound on the base's size
    best = result.history[result.best_epoch + 1]
    training = {
        "base_model": name,
        "method": "GenSteer/CALM-style low-rank logit generator, base frozen; DPO-style loss "
                  "-logsigmoid(beta * (mean log p_chosen - mean log p_rejected)) + kl_weight * mean per-token "
                  "KL(p_steered || p_base), at multiplier 1",
        "judge": ("VADER compound (value_steer.offline.tasks.sentiment): chosen >= -0.05 > rejected"
                  if task_file is None else f"{task.judge_spec} (task {task.name}): chosen judged fine, rejected "
                  "judged undesirable"),
        **({} if task_file is None else {"task": task.record()}),
        "data": {"split": args.split, "prompts": len(prompts), "samples_per_prompt": args.samples_per_prompt,
                 "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                 "responses": len(responses), "chosen_side": n_pos, "pairs": int(pairs.shape[0]),
                 "train_pairs": result.n_train_pairs, "val_pairs": result.n_val_pairs,
                 **({"mean_compound": float(np.mean(compound(texts))) if texts else None} if task_file is None
                    else {"undesirable_rate": float(np.mean(negative)) if texts else None})},
        "hyperparameters": {"beta": args.beta, "kl_weight": args.kl_weight, "epochs": args.epochs, "lr": args.lr,
                            "weight_decay": args.weight_decay, "batch_prompts": args.batch_prompts,
                            "val_frac": args.val_frac, "seed": args.seed},
        "parameters": gen.num_parameters(),
        "lm_head_parameters": n_base,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best": best,
        "runtime_s": {"sampling": round(t_sample, 1), "training": round(t_train, 1),
                      "total": round(time.perf_counter() - t_start, 1)},
    }
    command = reproduce_command(args, model_given)
    save_logit_steer(args.out, gen, training=training, command=command)
    print(f"train-logit: best epoch {result.best_epoch}: validation loss {best['val_loss']:.4f} (DPO "
          f"{best['val_dpo']:.4f}, KL {best['val_kl']:.4f}), pair accuracy {best['val_accuracy']:.3f} "
          f"(base {best['val_base_accuracy']:.3f}); {gen.num_parameters()} parameters",
          flush=True)
    print(f"wrote {args.out} (+ .meta.json) in {time.perf_counter() - t_start:.0f}s (sampling {t_sample:.0f}s, "
          f"training {t_train:.0f}s); reproduce: {command}", flush=True)
    return result
