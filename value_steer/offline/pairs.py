"""Steering vectors from contrastive pairs, without any judge: ``value-steer vectors --pairs PAIRS.jsonl``.

Each line of the pairs file is ``{"prompt": optional, "positive": "...", "negative": "..."}``. Every text
(the prompt, then the response) is prefilled through vLLM with value_steer's worker and ``capture_layers``, so the
streams are the residual streams the steering ops edit while serving (``hidden + residual`` after each decoder
layer). Per layer:

- ``mean`` (CAA, the default): the mean over pairs of ``mean(positive response tokens) - mean(negative response
  tokens)`` (each text's tokens averaged first, so long texts do not dominate);
- ``pca`` (repeng's option): the first principal component of the centred paired differences, signed to agree
  with the mean difference and scaled to its norm (so suggested scales stay comparable).

Writes ``<out>/<name>.safetensors``: ``[H]`` for one layer, else ``[num_layers, H]`` with the rows of layers not
asked for left zero (an op at such a layer is refused: the row has no direction), and a ``.meta.json`` sidecar
(layers, per-layer norms, suggested add scales, the method, the pairs file's hash, the model). Public vLLM API only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from value_steer.offline.tasks.task_file import TaskError, read_jsonl

PAIR_KEYS = ("prompt", "positive", "negative")
METHODS = ("mean", "pca")
SCALE_COEFS = (1.0, 2.0, 4.0, 8.0)  # suggested add scales, in units of |d_L|


@dataclass(frozen=True)
class Pair:
    prompt: str | None
    positive: str
    negative: str


def read_pairs(path: str | Path) -> tuple[list[Pair], str]:
    """The pairs of a JSONL file and the file's sha256. Raises :class:`TaskError` naming the line and field."""
    path = Path(path)
    lines, digest = read_jsonl(path, PAIR_KEYS, "pairs")
    pairs = []
    for where, rec in lines:
        for key in ("positive", "negative"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise TaskError(f"{where}: {key} is required (a non-empty string)")
        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise TaskError(f"{where}: prompt must be a string when given")
        pairs.append(Pair(prompt or None, rec["positive"], rec["negative"]))
    if not pairs:
        raise TaskError(f"pairs: {str(path)!r} holds no pairs")
    return pairs, digest


def _token_ids(tokenizer: Any, prompt: str | None, response: str) -> tuple[list[int], int]:
    """``(prompt + response token ids, index of the response's first token)``; the prompt keeps the tokenizer's
    special tokens (BOS), the response is tokenised on its own so its span is exact."""
    head = tokenizer.encode(prompt + "\n" if prompt else "", add_special_tokens=True)
    body = tokenizer.encode(response, add_special_tokens=False)
    if not body:
        raise TaskError(f"pairs: a response tokenises to nothing: {response!r}")
    return head + body, len(head)


def capture_text_means(model: str, texts: list[tuple[str | None, str]], layers: tuple[int, ...],
                       work: Path) -> dict[int, torch.Tensor]:
    """Per layer, ``[n, H]`` fp32: each text's mean residual stream over its response tokens (prefill only)."""
    from vllm import SamplingParams

    from value_steer.offline.capture_rows import read_layer_rows
    from value_steer.offline.engines import offline_llm

    llm = offline_llm(model, {"steering": {}, "capture": {"dir": str(work)}}, kv_use="eval", block_size=32,
                      enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    spans = [_token_ids(tok, p, r) for p, r in texts]
    prompts = [{"prompt_token_ids": ids} for ids, _ in spans]  # vLLM's TokensPrompt
    sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"capture_layers": list(layers)})
    t0 = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    llm.collective_rpc("value_steer_flush_capture")
    print(f"vectors --pairs: prefilled {len(outs)} texts at layers {list(layers)} in {time.time() - t0:.1f}s",
          flush=True)
    del llm
    rids = [o.request_id for o in outs]
    window = {rid: (start, len(ids)) for rid, (ids, start) in zip(rids, spans)}
    return {layer: torch.stack([rows.mean(dim=0) for rows in
                                read_layer_rows(work / f"layer-{layer:02d}", rids, window)]) for layer in layers}


def pair_directions(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """``[H]`` direction from paired means ``pos``, ``neg`` ``[n, H]`` (see the module docstring)."""
    diffs = (pos - neg).double()
    mean = diffs.mean(dim=0)
    if method == "mean":
        return mean.float()
    if diffs.shape[0] < 2:
        raise TaskError("pairs: --method pca needs at least 2 pairs")
    centred = diffs - mean
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    pc = vh[0]
    if torch.dot(pc, mean) < 0:
        pc = -pc
    return (pc * mean.norm()).float()


def make_pair_vectors(model: str, pairs: list[Pair], layers: tuple[int, ...], method: str,
                      work: Path) -> dict[int, torch.Tensor]:
    """Per requested layer the ``[H]`` direction positive - negative."""
    texts = [(p.prompt, p.positive) for p in pairs] + [(p.prompt, p.negative) for p in pairs]
    means = capture_text_means(model, texts, layers, work)
    n = len(pairs)
    return {layer: pair_directions(m[:n], m[n:], method) for layer, m in means.items()}


def write_vector(out_dir: Path, name: str, directions: dict[int, torch.Tensor], num_layers: int,
                 meta: dict[str, Any]) -> Path:
    """``<out_dir>/<name>.safetensors`` (``[H]`` for one layer, else ``[num_layers, H]``, other rows zero) and its
    sidecar."""
    from safetensors.torch import save_file

    layers = sorted(directions)
    if len(layers) == 1:
        tensor = directions[layers[0]].contiguous()
    else:
        tensor = torch.zeros(num_layers, directions[layers[0]].shape[0])
        for layer in layers:
            tensor[layer] = directions[layer]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    save_file({"vector": tensor}, str(path))
    norms = {str(layer): float(directions[layer].norm()) for layer in layers}
    sidecar = {**meta, "layers": layers, "shape": list(tensor.shape), "norms": norms,
               "suggested_add_scales": {str(layer): [c for c in SCALE_COEFS] for layer in layers},
               "scale_unit": "the vector as written (|d_L| per layer): scale c adds c * d_L"}
    (out_dir / f"{name}.safetensors.meta.json").write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    """``value-steer vectors --pairs PAIRS.jsonl --model DIR --layers L... --name NAME --out DIR [--method pca]``."""
    from value_steer.core.steering_spec import NAME_RE, NAME_RULE
    from value_steer.offline.pipeline import model_record

    ap = argparse.ArgumentParser(prog="value-steer vectors --pairs", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True, help="JSONL: {\"prompt\": optional, \"positive\", \"negative\"}")
    ap.add_argument("--model", required=True, help="an HF causal-LM folder vLLM serves")
    ap.add_argument("--layers", type=int, nargs="+", required=True, help="decoder layers to make the vector for")
    ap.add_argument("--name", required=True, help="the vector's name (its file stem; how requests name it)")
    ap.add_argument("--method", choices=METHODS, default="mean")
    ap.add_argument("--out", required=True, help="output folder (a steering.vectors directory)")
    args = ap.parse_args(argv)
    try:
        if not NAME_RE.fullmatch(args.name):
            raise TaskError(f"--name must be a vector name ({NAME_RULE}), got {args.name!r}")
        pairs, digest = read_pairs(args.pairs)
        record = model_record(args.model)
        num_layers = int(json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"])
        layers = tuple(sorted(set(args.layers)))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise TaskError(f"--layers {bad} out of range [0, {num_layers}) (the model's decoder layers)")
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="value-steer-pairs-") as tmp:
            directions = make_pair_vectors(args.model, pairs, layers, args.method, Path(tmp))
    except TaskError as exc:
        print(f"value-steer vectors: {exc}", file=sys.stderr)
        return 2
    meta = {"name": args.name, "made_by": f"value-steer vectors --pairs (method {args.method}: "
            + ("mean of paired differences, CAA" if args.method == "mean" else "first principal component of the "
               "paired differences, repeng") + ")",
            "pairs": {"file": str(args.pairs), "sha256": digest, "n": len(pairs)}, "model": record,
            "command": "value-steer vectors " + " ".join(argv)}
    path = write_vector(Path(args.out), args.name, directions, num_layers, meta)
    print(f"wrote {path} ({len(pairs)} pairs, layers {list(layers)}, "
          + ", ".join(f"|d_{layer}| {float(d.norm()):.3g}" for layer, d in directions.items())
          + f"; {time.time() - t0:.0f}s)")
    return 0
