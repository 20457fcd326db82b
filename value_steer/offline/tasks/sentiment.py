"""Default task: an output is undesirable when its sentiment is negative.

Judge: VADER (``vaderSentiment``, lexicon + rules, no model download); a text is negative iff its
compound score is below :data:`NEGATIVE_THRESHOLD` (-0.05, VADER's own convention).

Prompts: ``value_steer/data/prompts/sentiment.json`` holds templates (``{topic}`` placeholders; kind
``negative`` = complaints, bad experiences, failures, disappointments, frustrated reviews, pessimistic
forecasts; kind ``neutral`` = open-ended) and topics (noun phrases). Every template x topic pair is one
prompt, a single user turn.

Splits are **held out by topic**: each topic is ranked by the sha256 of a salted topic id, and the first
60% of topics go to ``train``, the next 20% to ``calibration``, the rest to ``test``; all templates of a
topic land in that topic's split. So a (template, topic) pair is never in two splits, test topics are
never seen in training or calibration, and every split holds every template (the same template mix).
The assignment depends only on the topic strings and :data:`SPLIT_SALT`, not on list order.

Calibration: the 30 negative-leaning / 10 neutral template mix was chosen on *train* topics; measured once
on the test split (SmolLM2-135M-Instruct, vLLM CPU, T=0.8, top_p=0.95, 96 tokens, 300 prompts x 1 sample,
seed 0): 49.0% negative (147/300, 95% Wilson CI [43.4%, 54.6%]); negative templates 62.9%, neutral 10.1%.

``python -m value_steer.offline.tasks.sentiment stats`` prints the split sizes;
``python -m value_steer.offline.tasks.sentiment measure --model DIR`` measures a model's base negative rate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources

import numpy as np

from value_steer.offline.tasks import SPLITS

NAME = "sentiment"
NEGATIVE_THRESHOLD = -0.05
SPLIT_SALT = "value_steer/sentiment/v1"
SPLIT_FRACTIONS = {"train": 0.6, "calibration": 0.2, "test": 0.2}
PROMPTS_RESOURCE = ("data", "prompts", "sentiment.json")

# Base decoding the prompt mix was calibrated for (SmolLM2-135M-Instruct).
BASE_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 96}


# ---------------------------------------------------------------------------------------------------------
# Judge


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _as_list(texts: str | Iterable[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def compound(texts: str | Iterable[str]) -> np.ndarray:
    """VADER compound scores in [-1, 1] (float64 array, one per text; a str counts as one text)."""
    analyzer = _analyzer()
    return np.array([analyzer.polarity_scores(t or "")["compound"] for t in _as_list(texts)], dtype=np.float64)


def judge_negative(texts: str | Iterable[str]) -> np.ndarray:
    """True where a text is undesirable (negative): VADER compound < -0.05. Bool array, one per text."""
    return compound(texts) < NEGATIVE_THRESHOLD


# ---------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``template_id`` filled with ``topic``; ``messages`` is the chat (one user turn)."""

    id: str
    text: str
    template_id: str
    topic: str
    messages: list[dict[str, str]] = field(compare=False, hash=False, repr=False)
    template_kind: str = ""
    topic_id: str = ""
    split: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@functools.lru_cache(maxsize=1)
def prompt_spec() -> dict:
    """The stored templates and topics (validated)."""
    path = resources.files("value_steer").joinpath(*PROMPTS_RESOURCE)
    spec = json.loads(path.read_text(encoding="utf-8"))
    ids = [t["id"] for t in spec["templates"]]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate template ids in sentiment.json")
    for t in spec["templates"]:
        if t["text"].count("{topic}") != 1 or t["kind"] not in ("negative", "neutral"):
            raise ValueError(f"bad template {t}")
    slugs = [_slug(t) for t in spec["topics"]]
    if len(set(slugs)) != len(slugs):
        raise ValueError("duplicate topic ids in sentiment.json")
    return spec


def _rank_key(topic_id: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{topic_id}".encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def topic_splits() -> dict[str, tuple[str, ...]]:
    """split -> topics (strings) in that split; a partition of all topics by salted hash rank."""
    topics = sorted(prompt_spec()["topics"], key=lambda t: _rank_key(_slug(t)))
    n = len(topics)
    n_train = round(SPLIT_FRACTIONS["train"] * n)
    n_cal = round(SPLIT_FRACTIONS["calibration"] * n)
    return {
        "train": tuple(topics[:n_train]),
        "calibration": tuple(topics[n_train : n_train + n_cal]),
        "test": tuple(topics[n_train + n_cal :]),
    }


@functools.lru_cache(maxsize=len(SPLITS))
def _prompts(split: str) -> tuple[Prompt, ...]:
    spec = prompt_spec()
    out = []
    for topic in topic_splits()[split]:
        topic_id = _slug(topic)
        for tpl in spec["templates"]:
            text = tpl["text"].replace("{topic}", topic)
            text = text[0].upper() + text[1:]
            out.append(
                Prompt(
                    id=f"{tpl['id']}/{topic_id}",
                    text=text,
                    template_id=tpl["id"],
                    topic=topic,
                    messages=[{"role": "user", "content": text}],
                    template_kind=tpl["kind"],
                    topic_id=topic_id,
                    split=split,
                )
            )
    out.sort(key=lambda p: p.id)
    return tuple(out)


def load_prompts(split: str) -> list[Prompt]:
    """All prompts of ``split`` (train / calibration / test), sorted by id. Deterministic."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [replace(p, messages=[dict(m) for m in p.messages]) for p in _prompts(split)]


def sample_prompts(split: str, n: int | None, seed: int = 0) -> list[Prompt]:
    """A deterministic pseudo-random subset of ``n`` prompts of ``split`` (all when ``n`` is None)."""
    prompts = load_prompts(split)
    if n is None or n >= len(prompts):
        return prompts
    order = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}:{p.id}".encode()).hexdigest())
    return order[:n]


# ---------------------------------------------------------------------------------------------------------
# Measuring a model's base rate


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(negative: Sequence[bool] | np.ndarray) -> dict:
    neg = np.asarray(negative, dtype=bool)
    k, n = int(neg.sum()), int(neg.size)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "negative": k, "rate": k / n if n else float("nan"), "ci95": (lo, hi)}


def measure_base_rate(
    model: str,
    split: str = "test",
    n: int | None = 200,
    *,
    samples: int = 1,
    seed: int = 0,
    temperature: float = BASE_SAMPLING["temperature"],
    top_p: float = BASE_SAMPLING["top_p"],
    max_tokens: int = BASE_SAMPLING["max_tokens"],
    max_model_len: int = 1024,
) -> dict:
    """Sample ``samples`` completions for ``n`` prompts of ``split`` with vLLM (CPU, in-process) and judge them.

    Returns :func:`summarize` over all samples plus per-template-kind rates and the outputs.
    """
    from value_steer.offline.engines import offline_llm

    prompts = sample_prompts(split, n, seed=seed)
    llm = offline_llm(model, steering=False, max_model_len=max_model_len, seed=seed)
    from vllm import SamplingParams

    sp = SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    results = llm.chat([p.messages for p in prompts], sp, use_tqdm=False)
    texts, kinds, ids = [], [], []
    for p, r in zip(prompts, results, strict=True):
        for o in r.outputs:
            texts.append(o.text)
            kinds.append(p.template_kind)
            ids.append(p.id)
    neg = judge_negative(texts)
    report = summarize(neg)
    kinds_arr = np.array(kinds)
    report["by_kind"] = {k: summarize(neg[kinds_arr == k]) for k in sorted(set(kinds))}
    report["outputs"] = [{"id": i, "text": t, "negative": bool(x)} for i, t, x in zip(ids, texts, neg)]
    report["settings"] = {
        "model": model,
        "split": split,
        "prompts": len(prompts),
        "samples": samples,
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="sentiment task: prompt stats and base-rate measurement")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stats", help="prompt counts per split")
    m = sub.add_parser("measure", help="base negative rate of a model (vLLM, CPU)")
    m.add_argument("--model", default=None, help="HF folder (default: prepared SmolLM2)")
    m.add_argument("--split", default="test", choices=SPLITS)
    m.add_argument("--n", type=int, default=200)
    m.add_argument("--samples", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-tokens", type=int, default=BASE_SAMPLING["max_tokens"])
    m.add_argument("--out", default=None, help="write the full report (with outputs) as JSON here")
    args = ap.parse_args(argv)

    if args.cmd == "stats":
        for split in SPLITS:
            ps = load_prompts(split)
            print(f"{split:12s} prompts={len(ps):5d} topics={len(topic_splits()[split]):4d}")
        return 0

    model = args.model
    if model is None:
        from value_steer.offline.models import prepare_smollm2

        model = str(prepare_smollm2())
    rep = measure_base_rate(model, args.split, args.n, samples=args.samples, seed=args.seed, max_tokens=args.max_tokens)
    lo, hi = rep["ci95"]
    print(f"negative rate {rep['rate']:.3f} (k={rep['negative']}, n={rep['n']}, 95% Wilson CI [{lo:.3f}, {hi:.3f}])")
    for kind, r in rep["by_kind"].items():
        print(f"  {kind:9s} {r['rate']:.3f} (n={r['n']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
