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
``value-steer eval`` reports the base rate of the run it makes (its ``base`` rows).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources

import numpy as np

from value_steer.offline.tasks import SPLITS

NEGATIVE_THRESHOLD = -0.05
SPLIT_SALT = "value_steer/sentiment/v1"
SPLIT_FRACTIONS = {"train": 0.6, "calibration": 0.2, "test": 0.2}
PROMPTS_RESOURCE = ("data", "prompts", "sentiment.json")


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
