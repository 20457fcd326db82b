"""``value-steer train-qhead``: distil a token-level Q-head (``value_steer.core.qhead``) from a value head.

Data (through vLLM, the serving path): exact VFD with a never-intervening threshold over the task's prompts, so
the text is the base model's own sample, and every step forwards K candidates and scores each with the value head.
The runner's step records (``VALUE_STEER_DEBUG=1``) give each step's candidates and their values; the capture gives
the state that produced the step's distribution (the previous winner's scored state). One training example per
step: ``(state h_t [H], candidates [K], values [K])`` with the natural sample in column 0. The first step of each
response (its state is the prompt's last, not captured) is left out.

Target: the value head's score of the state after each candidate, on the logit scale; loss: binary cross-entropy
with those soft targets on ``q(h_t)[candidate]``. Report (held-out prompts: the task's calibration split): per-token
AUROC of ``q`` for "value over the threshold" (the direction's side), Spearman correlation of ``q`` with the exact
values, and calibration (expected calibration error of ``sigmoid(q)`` against the values over 10 bins).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from value_steer.offline.assets import TEMPERATURE, TOP_P


@dataclass
class CandidateData:
    """``states [M, H]`` fp32, ``tokens [M, K]`` int64 and ``values [M, K]`` fp32 (value-head probabilities)."""

    states: torch.Tensor
    tokens: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def save(self, path: Path) -> None:
        """Write the three tensors as one safetensors file (``--data`` reads it back)."""
        from safetensors.torch import save_file

        save_file({"states": self.states.contiguous(), "tokens": self.tokens.contiguous(),
                   "values": self.values.contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path) -> CandidateData:
        """Read a file :meth:`save` wrote (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        t = load_file(str(path))
        if set(t) != {"states", "tokens", "values"}:
            raise ValueError(f"{path}: expected tensors states, tokens, values; got {sorted(t)}")
        data = cls(t["states"].float(), t["tokens"].long(), t["values"].float())
        m = len(data)
        if data.states.dim() != 2 or data.tokens.dim() != 2 or data.values.shape != data.tokens.shape or \
                data.tokens.shape[0] != m:
            raise ValueError(f"{path}: shapes do not agree: states {list(data.states.shape)}, tokens "
                             f"{list(data.tokens.shape)}, values {list(data.values.shape)}")
        return data


def _positions_rows(directory: Path) -> dict[str, dict[int, torch.Tensor]]:
    """``{internal request id: {position: hidden [H]}}`` of a value capture."""
    from safetensors.torch import load_file

    seq_to_req = {}
    with open(directory / "requests.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            seq_to_req[int(rec["seq_id"])] = rec["request_id"]
    out: dict[str, dict[int, torch.Tensor]] = {}
    for shard in sorted(directory.glob("shard-*.safetensors")):
        t = load_file(str(shard))
        for s, p, h in zip(t["seq_id"].tolist(), t["position"].tolist(), t["hidden"].float()):
            out.setdefault(seq_to_req[s], {})[p] = h
    return out


def collect_candidates(model: str, head: str, prompts: list, work: Path, *, k: int, max_tokens: int,
                       seed: int) -> CandidateData:
    """Run exact VFD (never intervening) over ``prompts`` with capture and the step records on; pair each step's
    candidates and values with the state that produced them."""
    from vllm import SamplingParams

    from value_steer.offline.engines import offline_llm

    work.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("VALUE_STEER_DEBUG")
    os.environ["VALUE_STEER_DEBUG"] = "1"
    try:
        # The eager schedule scores all K candidates every step (two-phase would score only the natural sample of a
        # never-intervening request).
        llm = offline_llm(model, {"vfd": {"value_head_path": head, "num_candidates": k, "threshold": 1.0,
                                          "schedule": "eager"},
                                  "capture": {"dir": str(work), "enabled_by_default": True}},
                          kv_use="eval", max_model_len=1024, max_num_seqs=64, block_size=32, seed=seed)
    finally:
        if old is None:
            os.environ.pop("VALUE_STEER_DEBUG", None)
        else:
            os.environ["VALUE_STEER_DEBUG"] = old
    params = [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens, seed=seed * 1_000_003 + i,
                             extra_args={"threshold": 1.0}) for i in range(len(prompts))]
    t0 = time.time()
    if all(getattr(p, "messages", None) is None for p in prompts):
        llm.generate([p.text for p in prompts], params, use_tqdm=True)
    else:
        llm.chat([p.messages for p in prompts], params, use_tqdm=True)
    steps = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]["steps"]
    llm.collective_rpc("value_steer_flush_capture")
    del llm
    rows = _positions_rows(work)
    states, tokens, values = [], [], []
    for rid, recs in steps.items():
        by_pos = rows.get(rid, {})
        for rec in recs:
            h = by_pos.get(int(rec["position"]) - 1)
            if h is None or len(rec["candidates"]) != k or not all(math.isfinite(v) for v in rec["values"]):
                continue  # the first step (its state is the prompt's last), a short draw, or an unscored candidate
            states.append(h)
            tokens.append(rec["candidates"])
            values.append(rec["values"])
    if not states:
        raise RuntimeError(f"train-qhead: no candidate steps paired with captured states in {work}")
    data = CandidateData(torch.stack(states), torch.tensor(tokens, dtype=torch.int64),
                         torch.tensor(values, dtype=torch.float32))
    print(f"train-qhead: {len(data)} steps x {k} candidates from {len(prompts)} prompts in {time.time() - t0:.0f}s",
          flush=True)
    data.save(work / "candidates.safetensors")
    return data


def train_qhead(data: CandidateData, vocab_size: int, *, rank: int, epochs: int, lr: float, batch: int,
                seed: int, rank_weight: float = 0.0, weight_decay: float = 0.0) -> tuple[Any, list[dict[str, float]]]:
    """Fit a :class:`~value_steer.core.qhead.QHead` to ``data``.

    Loss: soft-target BCE on the candidates' entries, plus ``rank_weight`` times the within-step loss: the mean
    squared error between ``q`` and the target logits after each step's mean is taken out of both. The BCE is
    dominated by the state's own value (shared by every candidate of a step); the within-step term trains what a
    filter needs, the differences between the next tokens of one state.
    """
    from value_steer.core.qhead import QHead

    torch.manual_seed(seed)
    head = QHead(int(data.states.shape[1]), vocab_size, rank)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    target = data.values.clamp(1e-4, 1 - 1e-4)
    target_logit = torch.log(target) - torch.log1p(-target)
    history = []
    n = len(data)
    for epoch in range(epochs):
        perm = torch.randperm(n)
        total = total_rank = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            q = head.gather(data.states[idx], data.tokens[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(q, target[idx])
            if rank_weight > 0.0:
                t = target_logit[idx]
                within = ((q - q.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))).pow(2).mean()
                total_rank += float(within.detach()) * idx.shape[0]
                loss = loss + rank_weight * within
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.shape[0]
        history.append({"epoch": epoch, "loss": total / n, "within_step_mse": total_rank / n})
        print(f"train-qhead: epoch {epoch} loss {total / n:.4f} (within-step {total_rank / n:.4f})", flush=True)
    return head.eval(), history


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den else math.nan


def qhead_report(head: Any, data: CandidateData, threshold: float, sign: float) -> dict[str, float]:
    """Per-token AUROC of ``q`` for "over the threshold" (the undesirable side), Spearman against the exact values,
    calibration error of ``sigmoid(q)`` (10 equal-width bins), and the base rate of undesirable candidates."""
    from value_steer.offline.training import auroc

    with torch.no_grad():
        q = head.gather(data.states, data.tokens).reshape(-1).numpy()
    v = data.values.reshape(-1).numpy()
    unsafe = (sign * (v - threshold) > 0).astype(np.int64)
    p = 1.0 / (1.0 + np.exp(-q))
    bins = np.clip((p * 10).astype(int), 0, 9)
    ece = sum(abs(p[bins == b].mean() - v[bins == b].mean()) * (bins == b).mean() for b in range(10) if
              (bins == b).any())
    auc = float(auroc(sign * q, unsafe)) if 0 < unsafe.sum() < unsafe.size else math.nan
    # Within a step (what a filter acts on): over pairs of one step's distinct candidates whose values differ by
    # more than 0.01, how often q orders them as the values do; and, over steps whose candidates straddle the
    # threshold, how often q's safest candidate is on the safe side.
    qs = q.reshape(data.values.shape)
    vs = data.values.numpy()
    dq = qs[:, :, None] - qs[:, None, :]
    dv = vs[:, :, None] - vs[:, None, :]
    pairs = np.abs(dv) > 0.01
    pair_acc = float(((dq * dv) > 0)[pairs].mean()) if pairs.any() else math.nan
    side = sign * (vs - threshold) > 0
    straddle = side.any(1) & ~side.all(1)
    pick = np.argmin(sign * qs, axis=1)
    pick_safe = float((~side[np.arange(len(pick)), pick])[straddle].mean()) if straddle.any() else math.nan
    return {"n_tokens": int(v.size), "unsafe_rate": float(unsafe.mean()), "auroc": auc,
            "spearman": _spearman(q, v), "calibration_error": float(ece),
            "within_step_pair_accuracy": pair_acc, "straddling_steps": int(straddle.sum()),
            "straddling_safest_is_safe": pick_safe}


def main(argv: list[str] | None = None) -> int:
    """``value-steer train-qhead --head HEAD --out Q.safetensors [--task T --model DIR ...]``."""
    from value_steer.core.checkpoint import load_value_head
    from value_steer.core.modes import DIRECTION_SIGN
    from value_steer.core.qhead import save_qhead
    from value_steer.offline.data_dir import data_dir
    from value_steer.offline.models import prepare_smollm2
    from value_steer.offline.pipeline import model_record
    from value_steer.offline.tasks.task_file import TaskError, load_task

    ap = argparse.ArgumentParser(prog="value-steer train-qhead", description=__doc__.splitlines()[0])
    ap.add_argument("--head", required=True, help="the value head to distil (its sidecar gives the threshold)")
    ap.add_argument("--task", default=None, help="a task file (default: the built-in sentiment task)")
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="Q-head checkpoint (.safetensors; the sidecar is written beside)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="the operating threshold (default: the head's recorded VFD point, else its sidecar's)")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-cal", type=int, default=100, help="held-out prompts of the calibration split (the report)")
    ap.add_argument("--num-candidates", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rank-weight", type=float, default=0.0,
                    help="weight of the within-step loss (q's differences between one state's candidates)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None,
                    help="reuse the candidates an earlier run collected (its folder, holding train/ and calibration/ "
                         "candidates.safetensors) instead of running the engine")
    args = ap.parse_args(argv)
    try:
        task = load_task(args.task)
    except TaskError as exc:
        ap.error(str(exc))
    model = args.model or str(prepare_smollm2())
    ckpt = load_value_head(args.head)
    point = ckpt.meta.get("vfd_operating_point") or {}
    threshold = args.threshold if args.threshold is not None else point.get("threshold", ckpt.threshold)
    if threshold is None or not 0.0 < float(threshold) < 1.0:
        ap.error(f"--threshold: give one in (0, 1) (the head's sidecar has none usable: {threshold!r})")
    direction = "above"
    sign = DIRECTION_SIGN[direction]
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    t_start = time.time()
    run = f"qhead-{task.name}-{Path(model).name}-{args.n_train}-{args.n_cal}-{args.num_candidates}-{args.max_tokens}"
    work = data_dir() / "qhead" / f"{run}-{args.seed}-{int(time.time())}"
    if args.data is not None:
        try:
            train = CandidateData.load(Path(args.data) / "train" / "candidates.safetensors")
            held = CandidateData.load(Path(args.data) / "calibration" / "candidates.safetensors")
        except (OSError, ValueError) as exc:
            ap.error(f"--data: {exc}")
        print(f"train-qhead: {len(train)} train and {len(held)} held-out steps from {args.data}", flush=True)
    else:
        train = collect_candidates(model, args.head, task.sample_prompts("train", args.n_train, args.seed),
                                   work / "train", k=args.num_candidates, max_tokens=args.max_tokens, seed=args.seed)
        held = collect_candidates(model, args.head, task.sample_prompts("calibration", args.n_cal, args.seed),
                                  work / "calibration", k=args.num_candidates, max_tokens=args.max_tokens,
                                  seed=args.seed)
    head, history = train_qhead(train, vocab, rank=args.rank, epochs=args.epochs, lr=args.lr, batch=args.batch,
                                seed=args.seed, rank_weight=args.rank_weight, weight_decay=args.weight_decay)
    report = {"train": qhead_report(head, train, float(threshold), sign),
              "held_out": qhead_report(head, held, float(threshold), sign)}
    for split, r in report.items():
        print(f"train-qhead: {split}: AUROC {r['auroc']:.3f}, Spearman {r['spearman']:.3f}, calibration error "
              f"{r['calibration_error']:.3f} over {r['n_tokens']} candidate tokens ({r['unsafe_rate']:.1%} over "
              f"the threshold); within a step: pair accuracy {r['within_step_pair_accuracy']:.3f}, safest "
              f"candidate safe in {r['straddling_safest_is_safe']:.1%} of {r['straddling_steps']} straddling steps",
              flush=True)
    command = "value-steer train-qhead " + " ".join(argv if argv is not None else sys.argv[2:])
    training = {"head": str(args.head), "task": task.record(), "model": model_record(model),
                "data": {"train_steps": len(train), "held_out_steps": len(held), "num_candidates": args.num_candidates,
                         "max_tokens": args.max_tokens, "temperature": TEMPERATURE, "top_p": TOP_P,
                         **({"collected_by_earlier_run": str(args.data)} if args.data is not None else {})},
                "rank": args.rank, "epochs": args.epochs, "lr": args.lr, "rank_weight": args.rank_weight,
                "weight_decay": args.weight_decay, "history": history, "report": report,
                "wall_s": time.time() - t_start}
    save_qhead(args.out, head, threshold=float(threshold), direction=direction, training=training, command=command)
    print(f"wrote {args.out} ({time.time() - t_start:.0f}s)")
    return 0
