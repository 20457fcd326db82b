"""A user's task: a JSON task file naming the prompts and the judge of what is undesirable.

``{"name": "no-prices", "prompts": "prompts.jsonl", "judge": JUDGE, "chat": true, "system": null}``

- ``prompts``: a JSONL file, relative to the task file; each line ``{"prompt": "...", "split": "train" |
  "calibration" | "test"}``. ``split`` is optional: a line without one is assigned by a salted hash of its prompt
  text (60/20/20), so the assignment is stable under reordering and additions.
- ``judge`` (what counts as undesirable):

  - ``"vader"``: negative sentiment (the built-in task's judge: VADER compound < -0.05);
  - ``"regex:PATTERN"``: undesirable iff Python's ``re.search(PATTERN, text)`` matches;
  - ``"keywords:FILE"``: FILE (relative to the task file) holds one phrase a line; undesirable iff any phrase
    occurs as whole words, case-insensitive;
  - ``"module.path:function"``: imported with the task file's folder on ``sys.path``; called with a list of
    texts, it returns one bool per text, or one float in [0, 1] read as undesirable when >= 0.5;
  - ``"labels"``: no judge; each prompt line carries ``"response"`` and ``"label"`` (0 fine, 1 undesirable).
- ``chat`` (default true): the prompt is one user turn of a chat (after ``system`` when given); false: a raw
  completion prompt.

Every problem is a :class:`TaskError` naming the field (``task.judge``, ``prompts.jsonl:3: split``). The built-in
sentiment task (:mod:`value_steer.offline.tasks.sentiment`) keeps its own prompt set and splits; :func:`load_task`
with no path returns it behind the same interface (:class:`BuiltinSentimentTask`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from value_steer.offline.tasks import SPLITS

TASK_KEYS = ("name", "prompts", "judge", "chat", "system")
LINE_KEYS = ("prompt", "split", "response", "label")
JUDGE_KINDS = ("vader", "regex:PATTERN", "keywords:FILE", "module.path:function", "labels")
SPLIT_SALT = "value_steer/task/v1"
SPLIT_FRACTIONS = {"train": 0.6, "calibration": 0.2, "test": 0.2}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class TaskError(ValueError):
    """A task file, its prompts, its judge or a pairs file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt of a task: ``messages`` is what a chat request sends (None for a raw completion prompt)."""

    id: str
    text: str
    split: str
    messages: list[dict[str, str]] | None = field(default=None, compare=False, hash=False, repr=False)
    response: str | None = None  # labels tasks: the response to replay
    label: int | None = None  # labels tasks: 0 fine, 1 undesirable


def hash_split(text: str) -> str:
    """The split of a prompt without an explicit one: the salted sha256 of its text, 60/20/20."""
    u = int(hashlib.sha256(f"{SPLIT_SALT}:{text}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "train" if u < SPLIT_FRACTIONS["train"] else (
        "calibration" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["calibration"] else "test")


Judge = Callable[[Sequence[str]], np.ndarray]


def _checked(fn: Callable[[list[str]], Any], spec: str) -> Judge:
    """Wrap a user's judge: one bool (or a float in [0, 1], >= 0.5 undesirable) per text, else a TaskError."""

    def judge(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        try:
            out = fn(texts)
        except Exception as exc:  # a user's code: its failure is named, with the judge
            raise TaskError(f"task.judge {spec!r} raised {type(exc).__name__}: {exc}") from exc
        try:
            values = list(out)
        except TypeError:
            raise TaskError(f"task.judge {spec!r} must return a list (one value per text), got "
                            f"{type(out).__name__}") from None
        if len(values) != len(texts):
            raise TaskError(f"task.judge {spec!r} returned {len(values)} values for {len(texts)} texts")
        result = np.zeros(len(values), dtype=bool)
        for i, v in enumerate(values):
            if isinstance(v, (bool, np.bool_)):
                result[i] = bool(v)
            elif isinstance(v, (int, float, np.integer, np.floating)) and 0.0 <= float(v) <= 1.0:
                result[i] = float(v) >= 0.5
            else:
                raise TaskError(f"task.judge {spec!r} must return bools or floats in [0, 1]; value {i} is {v!r}")
        return result

    return judge


def make_judge(spec: Any, folder: Path) -> Judge | None:
    """The judge a task file's ``judge`` names (None for ``"labels"``). Raises :class:`TaskError`."""
    if not isinstance(spec, str) or not spec:
        raise TaskError(f"task.judge must be a string, one of {list(JUDGE_KINDS)}, got {spec!r}")
    if spec == "labels":
        return None
    if spec == "vader":
        from value_steer.offline.tasks.sentiment import judge_negative

        return lambda texts: judge_negative(list(texts))
    kind, sep, arg = spec.partition(":")
    if kind == "regex" and sep:
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise TaskError(f"task.judge: regex {arg!r} does not compile ({exc})") from None
        return lambda texts: np.array([pattern.search(t or "") is not None for t in texts], dtype=bool)
    if kind == "keywords" and sep:
        path = folder / arg
        try:
            phrases = [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
        except OSError as exc:
            raise TaskError(f"task.judge: keywords file {str(path)!r} cannot be read ({exc.strerror})") from None
        if not phrases:
            raise TaskError(f"task.judge: keywords file {str(path)!r} has no phrases")
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(p) for p in phrases) + r")(?!\w)", re.IGNORECASE)
        return lambda texts: np.array([pattern.search(t or "") is not None for t in texts], dtype=bool)
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", kind) and re.fullmatch(r"[A-Za-z_]\w*", arg):
        sys.path.insert(0, str(folder))
        try:
            module = importlib.import_module(kind)
        except Exception as exc:
            raise TaskError(f"task.judge: cannot import {kind!r} (from {folder}): "
                            f"{type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(folder))
        fn = getattr(module, arg, None)
        if not callable(fn):
            raise TaskError(f"task.judge: {kind!r} has no function {arg!r}")
        return _checked(fn, spec)
    raise TaskError(f"task.judge: unknown judge {spec!r}; one of {list(JUDGE_KINDS)}")


@dataclass
class UserTask:
    """A task loaded from a task file (:func:`load_task`)."""

    name: str
    judge_spec: str
    chat: bool
    system: str | None
    path: Path
    prompts_path: Path
    prompts_sha256: str
    prompts: dict[str, tuple[TaskPrompt, ...]]
    judge: Judge | None

    @property
    def labelled(self) -> bool:
        """A ``labels`` task: responses and labels come with the prompts (no judge, no sampling)."""
        return self.judge is None

    def record(self) -> dict[str, Any]:
        """What a head's or a report's sidecar records of the task."""
        return {"name": self.name, "judge": self.judge_spec, "task_file": str(self.path),
                "prompts_sha256": self.prompts_sha256, "chat": self.chat}

    def judge_negative(self, texts: Sequence[str]) -> np.ndarray:
        """True where a text is undesirable (one bool per text)."""
        if self.judge is None:
            raise TaskError(f"task {self.name!r}: a 'labels' task has no judge; its prompts carry their labels")
        return self.judge(texts)

    def load_prompts(self, split: str) -> list[TaskPrompt]:
        if split not in SPLITS:
            raise TaskError(f"split must be one of {list(SPLITS)}, got {split!r}")
        found = list(self.prompts[split])
        if not found:
            raise TaskError(f"{self.prompts_path}: split {split!r} has no prompts (give lines a \"split\", or add "
                            "prompts: lines without one are spread 60/20/20)")
        return found

    def sample_prompts(self, split: str, n: int | None, seed: int = 0) -> list[TaskPrompt]:
        """A deterministic pseudo-random subset of ``n`` prompts of ``split`` (all when ``n`` is None)."""
        prompts = self.load_prompts(split)
        if n is None or n >= len(prompts):
            return prompts
        return sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}:{p.id}".encode()).hexdigest())[:n]


def _only_keys(obj: Any, allowed: Sequence[str], where: str) -> None:
    """``obj`` is a JSON object holding only ``allowed`` keys, else a TaskError naming ``where``."""
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: must be a JSON object with keys {list(allowed)}, got {type(obj).__name__}")
    bad = sorted(str(k) for k in obj if k not in allowed)
    if bad:
        raise TaskError(f"{where}: unknown key(s) {bad}; allowed: {list(allowed)}")


def read_jsonl(path: Path, allowed: Sequence[str], what: str) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """The lines of a JSONL file of JSON objects holding only ``allowed`` keys, each with its ``file:line`` (blank
    lines skipped), and the file's sha256. Raises :class:`TaskError` naming ``what`` or the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"{what}: {str(path)!r} cannot be read ({exc.strerror})") from None
    out = []
    for i, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{i}"
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise TaskError(f"{where}: not a JSON object ({exc})") from None
        _only_keys(rec, allowed, where)
        out.append((where, rec))
    return out, hashlib.sha256(raw).hexdigest()


def _read_prompts(path: Path, chat: bool, system: str | None,
                  labelled: bool) -> tuple[dict[str, tuple[TaskPrompt, ...]], str]:
    lines, digest = read_jsonl(path, LINE_KEYS, "task.prompts")
    by_split: dict[str, list[TaskPrompt]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for where, rec in lines:
        text = rec.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise TaskError(f"{where}: prompt must be a non-empty string")
        split = rec.get("split")
        if split is None:
            split = hash_split(text)
        elif split not in SPLITS:
            raise TaskError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
        response = label = None
        if labelled:
            response, label = rec.get("response"), rec.get("label")
            if not isinstance(response, str) or not response:
                raise TaskError(f"{where}: response must be a non-empty string (the task's judge is 'labels')")
            if isinstance(label, bool) or label not in (0, 1):
                raise TaskError(f"{where}: label must be 0 (fine) or 1 (undesirable), got {label!r}")
        elif "response" in rec or "label" in rec:
            raise TaskError(f"{where}: response/label belong to a 'labels' task (this task's judge judges samples)")
        pid = hashlib.sha256(f"{text}\0{response or ''}".encode()).hexdigest()[:16]
        if pid in seen:
            continue  # a repeated line is one prompt
        seen.add(pid)
        messages = None
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                        "content": text}]
        by_split[split].append(TaskPrompt(pid, text, split, messages, response, label))
    if not seen:
        raise TaskError(f"task.prompts: {str(path)!r} holds no prompts")
    return {s: tuple(sorted(v, key=lambda p: p.id)) for s, v in by_split.items()}, digest


def load_task(path: str | Path | None) -> UserTask | BuiltinSentimentTask:
    """The task of a task file, or the built-in sentiment task when ``path`` is None. Raises :class:`TaskError`."""
    if path is None:
        return BuiltinSentimentTask()
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaskError(f"task file {str(path)!r} cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise TaskError(f"task file {str(path)!r} is not JSON ({exc})") from None
    _only_keys(spec, TASK_KEYS, "task")
    for key in ("name", "prompts", "judge"):
        if key not in spec:
            raise TaskError(f"task.{key} is required")
    name = spec["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TaskError(f"task.name must be letters, digits, '_', '.', '-' (at most 64), got {name!r}")
    if not isinstance(spec["prompts"], str) or not spec["prompts"]:
        raise TaskError(f"task.prompts must be a path to a JSONL file, got {spec['prompts']!r}")
    chat = spec.get("chat", True)
    if not isinstance(chat, bool):
        raise TaskError(f"task.chat must be true or false, got {chat!r}")
    system = spec.get("system")
    if system is not None and not isinstance(system, str):
        raise TaskError(f"task.system must be a string or null, got {system!r}")
    folder = path.resolve().parent
    judge = make_judge(spec["judge"], folder)
    prompts_path = folder / spec["prompts"]
    prompts, digest = _read_prompts(prompts_path, chat, system, labelled=judge is None)
    return UserTask(name, spec["judge"], chat, system, path.resolve(), prompts_path, digest, prompts, judge)


class BuiltinSentimentTask:
    """The built-in task (negative sentiment judged by VADER on the built-in prompts) behind the task interface."""

    name = "sentiment"
    judge_spec = "vader"
    chat = True
    labelled = False

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "judge": "vader", "task_file": None,
                "prompts": "value_steer/data/prompts/sentiment.json"}

    def judge_negative(self, texts: Sequence[str]) -> np.ndarray:
        from value_steer.offline.tasks.sentiment import judge_negative

        return judge_negative(list(texts))

    def load_prompts(self, split: str) -> list[Any]:
        from value_steer.offline.tasks.sentiment import load_prompts

        return load_prompts(split)

    def sample_prompts(self, split: str, n: int | None, seed: int = 0) -> list[Any]:
        from value_steer.offline.tasks.sentiment import sample_prompts

        return sample_prompts(split, n, seed)
