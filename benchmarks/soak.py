"""Bounded, loopback-only soak test of a running value_steer server (``make serve``, or any ``vllm serve`` with
``ValueSteerWorker``): a seeded mix of request kinds at a fixed concurrency, with every outcome classified.

Kinds (those the server cannot serve are skipped, and the summary says why):

- ``vs_completion`` / ``vs_chat``: the server's default steering (VFD / abstention where configured);
- ``unsteered``: ``"vllm_xargs": {"value_steer": false}``;
- ``act_inline`` / ``act_named``: a top-level ``"steering"`` spec with an inline vector / a registered name;
- ``logit``: ``"vllm_xargs": {"value_steer": false, "logit_steering": 0.5}``;
- ``abort``: a streaming request whose connection is closed after the first chunk;
- ``bad_*``: requests that must get a 4xx (a misspelled key, a layer out of range, ``num_candidates: "inf"``,
  a body nested 5000 deep); a 5xx or a 200 is a failure;
- ``churn_named``: steering with ``soak_churn``, a vector a background task registers with new data and
  deletes every ~0.5 s (a 400 naming the unknown vector is expected; an empty 200 or a 5xx is not);
- ``drift_*``: greedy requests run solo first, then mixed into the load; every answer must equal the solo text.

``GET /health`` is polled every few seconds. Failures: a 5xx, a connection error or timeout, a 4xx for a valid
request, a 200 for a bad one, a 200 whose text is empty while its finish reason is not ``length`` (unless the
request's stats say the value head abstained: ``forced_eos``), a finish reason ``error``. The server's RSS
(``--pid`` and its descendants, else every process whose command line names vllm / ``value_steer.offline.cli
serve``, and their descendants) is read before and after. Exit status: 0 clean, 1 any failure or drift, 2 the
soak could not start.

    .venv/bin/python benchmarks/soak.py --requests 2000 --concurrency 48 --json-out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

try:
    import aiohttp
except ImportError:  # pragma: no cover
    sys.exit("soak.py needs aiohttp (a vLLM dependency): run it with the project's .venv/bin/python")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CHURN_NAME = "soak_churn"
STATIC_NAME = "soak_static"
VECTORS = "/v1/steering/vectors"
OUTCOMES = ("ok", "expected_4xx", "failure", "drift", "cancelled")
PROMPTS = (
    "My flight was cancelled and",
    "The best thing about living in a small town is",
    "Write one sentence about the sea.",
    "What do people hate about crowded airports?",
    "The meeting ran long, so",
    "Describe your ideal weekend in a few words.",
    "Once upon a time, in a quiet village,",
    "List three colours:",
)
# How often each kind is drawn (the kinds a server cannot serve are dropped and the rest renormalised).
WEIGHTS = {
    "vs_completion": 14, "vs_chat": 10, "unsteered": 12, "act_inline": 10, "act_named": 8, "logit": 9,
    "abort": 8, "bad_key": 2, "bad_layer": 2, "bad_inf": 2, "bad_nested": 2, "churn_named": 7,
    "drift_unsteered": 3, "drift_act": 3, "drift_logit": 3,
}
DRIFT_KINDS = ("drift_unsteered", "drift_act", "drift_logit")
BAD_KINDS = ("bad_key", "bad_layer", "bad_inf", "bad_nested")
NESTED_DEPTH = 5000


@dataclass
class Result:
    kind: str
    outcome: str
    reason: str = ""
    status: int | None = None
    tokens: int = 0
    latency_s: float = 0.0


@dataclass
class Soak:
    args: argparse.Namespace
    url: str
    model: str = ""
    hidden_size: int = 576
    num_layers: int = 30
    dims_source: str = "defaults"
    named: list[tuple[str, list[float]]] = field(default_factory=list)  # (name, norm per layer)
    drift_vector: list[float] = field(default_factory=list)
    static_registered: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # kind -> why
    solo: dict[str, str] = field(default_factory=dict)  # drift kind -> solo text
    results: list[Result] = field(default_factory=list)
    churn: Counter = field(default_factory=Counter)
    health: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    # ---- HTTP -----------------------------------------------------------------------------------------------
    def headers(self, admin: bool = False) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.args.api_key:
            h["Authorization"] = f"Bearer {self.args.api_key}"
        if admin and self.args.admin_key:
            h["X-Steering-Admin-Key"] = self.args.admin_key
        return h

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, admin: bool = False,
                   timeout: float | None = None) -> tuple[int, Any, str]:
        """``(status, parsed JSON or None, text)``; raises aiohttp / timeout errors to the caller."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        to = aiohttp.ClientTimeout(total=timeout or self.args.request_timeout_s)
        assert self.session is not None
        async with self.session.request(method, self.url + path, data=data, headers=self.headers(admin),
                                        timeout=to) as r:
            text = await r.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            return r.status, parsed, text

    # ---- set-up ---------------------------------------------------------------------------------------------
    async def setup(self) -> None:
        status, body, text = await self.call("GET", "/v1/models", timeout=30)
        if status != 200 or not isinstance(body, dict) or not body.get("data"):
            raise SystemExit(f"soak: GET /v1/models answered {status}: {text[:300]}")
        self.model = self.args.model or body["data"][0]["id"]
        await self.discover_steering()
        await self.run_solo()

    async def discover_steering(self) -> None:
        status, body, text = await self.call("GET", VECTORS, timeout=30)
        if status != 200 or not isinstance(body, dict):
            why = f"GET {VECTORS} answered {status}: {_short(text)}"
            for k in ("act_inline", "act_named", "churn_named", "drift_act"):
                self.skipped[k] = why
            self.notes.append(f"activation steering off ({why})")
            return
        dims = await self.discover_dims(body)
        self.hidden_size, self.num_layers, self.dims_source = dims
        for v in body.get("vectors") or []:
            shape = [int(x) for x in v.get("shape") or []]
            norms = [float(x) for x in v.get("norms") or []]
            if shape and shape[-1] == self.hidden_size and (len(shape) == 1 or shape[0] == self.num_layers):
                norms = norms if len(norms) == (1 if len(shape) == 1 else self.num_layers) else [1.0]
                self.named.append((str(v["name"]), norms))
        self.named = [(n, s) for n, s in self.named if n not in (CHURN_NAME, STATIC_NAME)]
        # The registry: one vector of our own when none is preloaded, and the churn probe.
        probe = {"name": CHURN_NAME, "data": self.vector(random.Random(0))}
        try:
            status, _, text = await self.call("POST", VECTORS, probe, admin=True, timeout=30)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status, text = 0, repr(exc)
        if status == 200:
            await self.call("DELETE", f"{VECTORS}/{CHURN_NAME}", admin=True, timeout=30)
        else:
            self.skipped["churn_named"] = f"registering a vector answered {status}: {_short(text)}"
        if not self.named:
            if status == 200:
                data = self.vector(random.Random(1))
                s2, _, t2 = await self.call("POST", VECTORS, {"name": STATIC_NAME, "data": data}, admin=True,
                                            timeout=30)
                if s2 == 200:
                    self.named.append((STATIC_NAME, [1.0]))
                    self.static_registered = True
                else:
                    self.skipped["act_named"] = f"registering {STATIC_NAME} answered {s2}: {_short(t2)}"
            else:
                self.skipped["act_named"] = "no preloaded vector and the registry refused a registration"

    async def discover_dims(self, listing: dict) -> tuple[int, int, str]:
        """H and the layer count: the registry answer's fields, else the 400s that name them, else the flags."""
        h = listing.get("hidden_size") or (listing.get("usage") or {}).get("hidden_size")
        n = listing.get("num_layers") or (listing.get("usage") or {}).get("num_layers")
        if h and n:
            return int(h), int(n), f"GET {VECTORS}"
        src = []
        if not h:
            # A one-float inline vector at layer 0: the 400 names the model's hidden size.
            _, _, text = await self.call("POST", "/v1/completions", self.completion(
                "x", 1, steering={"ops": [{"layer": 0, "op": "add", "vector": [1.0], "scale": 1.0}]}), timeout=60)
            m = re.search(r"exactly (\d+) floats", text)
            h = int(m.group(1)) if m else self.args.hidden_size
            src.append("H from a 400 message" if m else "H from --hidden-size")
        if not n:
            # A layer out of range with a vector of the right length: the 400 names the layer count.
            op = {"layer": 99999, "op": "add", "vector": [1.0] * int(h), "scale": 1.0}
            _, _, text = await self.call("POST", "/v1/completions", self.completion("x", 1, steering={"ops": [op]}),
                                         timeout=60)
            m = re.search(r"in \[0, (\d+)\)", text)
            n = int(m.group(1)) if m else self.args.num_layers
            src.append("layers from a 400 message" if m else "layers from --num-layers")
        if h != self.args.hidden_size and self.args.hidden_size_given:
            self.notes.append(f"--hidden-size {self.args.hidden_size} overridden by the server's {h}")
        if n != self.args.num_layers and self.args.num_layers_given:
            self.notes.append(f"--num-layers {self.args.num_layers} overridden by the server's {n}")
        return int(h), int(n), ", ".join(src) or f"GET {VECTORS}"

    async def run_solo(self) -> None:
        """The greedy drift references, one at a time before the load (also the logit-steering probe)."""
        self.drift_vector = self.vector(random.Random(99))
        for kind in DRIFT_KINDS:
            if kind in self.skipped:
                continue
            path, body = self.drift_request(kind)
            status, parsed, text = await self.call("POST", path, body, timeout=120)
            if kind == "drift_logit" and status == 400 and "logit_steering" in text:
                why = f"the server refuses logit_steering: {_short(text)}"
                self.skipped["logit"] = self.skipped["drift_logit"] = why
                continue
            if status != 200:
                if kind == "drift_unsteered":
                    raise SystemExit(f"soak: the solo unsteered request answered {status}: {text[:300]}")
                self.skipped[kind] = f"the solo request answered {status}: {_short(text)}"
                self.results.append(Result(kind + "_solo", "failure", f"HTTP {status}: {_short(text)}", status))
                continue
            try:
                self.solo[kind] = _text(parsed)
            except (KeyError, IndexError, TypeError, AttributeError):
                self.skipped[kind] = f"the solo request's answer has no text: {_short(text)}"

    # ---- request bodies -------------------------------------------------------------------------------------
    def vector(self, rng: random.Random) -> list[float]:
        """A random unit vector of H floats (a small edit at any scale this soak uses)."""
        v = [rng.gauss(0.0, 1.0) for _ in range(self.hidden_size)]
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        return [round(x / norm, 6) for x in v]

    def completion(self, prompt: str, max_tokens: int, **extra: Any) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, **extra}

    def chat(self, prompt: str, max_tokens: int, **extra: Any) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                **extra}

    def drift_request(self, kind: str) -> tuple[str, dict]:
        greedy = {"temperature": 0.0, "seed": 1234}
        off = {"vllm_xargs": {"value_steer": False}}
        if kind == "drift_unsteered":
            return "/v1/completions", self.completion(PROMPTS[0], self.args.max_tokens, **greedy, **off)
        if kind == "drift_act":
            op = {"layer": self.num_layers // 2, "op": "add", "vector": self.drift_vector, "scale": 2.0}
            return "/v1/chat/completions", self.chat(PROMPTS[3], self.args.max_tokens, **greedy, **off,
                                                     steering={"ops": [op]})
        assert kind == "drift_logit"
        return "/v1/completions", self.completion(PROMPTS[4], self.args.max_tokens, **greedy,
                                                  vllm_xargs={"value_steer": False, "logit_steering": 0.5})

    def plan(self) -> list[tuple[str, dict]]:
        """The seeded sequence of (kind, parameters) the load issues."""
        rng = random.Random(self.args.seed)
        kinds = [k for k in WEIGHTS if k not in self.skipped]
        weights = [WEIGHTS[k] for k in kinds]
        pool = [self.vector(random.Random(self.args.seed * 1000 + i)) for i in range(self.args.inline_pool)]
        out = []
        for _ in range(self.args.requests):
            kind = rng.choices(kinds, weights)[0]
            out.append((kind, {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(1 << 30),
                               "chat": rng.random() < 0.4, "layer": rng.randrange(self.num_layers),
                               "scale": round(rng.uniform(0.5, 4.0), 3), "vector": rng.choice(pool),
                               "named": rng.choice(self.named) if self.named else None}))
        return out

    def build(self, kind: str, p: dict) -> tuple[str, dict | None, bytes | None]:
        """``(path, body, raw body)`` of one planned request."""
        mt = self.args.max_tokens
        sample = {"temperature": 0.8, "seed": p["seed"]}
        make = self.chat if p["chat"] else self.completion
        path = "/v1/chat/completions" if p["chat"] else "/v1/completions"
        off = {"value_steer": False}
        if kind in DRIFT_KINDS:
            path, body = self.drift_request(kind)
            return path, body, None
        if kind == "vs_completion":
            return "/v1/completions", self.completion(p["prompt"], mt, **sample), None
        if kind == "vs_chat":
            return "/v1/chat/completions", self.chat(p["prompt"], mt, **sample), None
        if kind == "unsteered":
            return path, make(p["prompt"], mt, **sample, vllm_xargs=off), None
        if kind == "act_inline":
            op = {"layer": p["layer"], "op": "add", "vector": p["vector"], "scale": p["scale"]}
            return path, make(p["prompt"], mt, **sample, steering={"ops": [op]}), None
        if kind == "act_named":
            # The scale divided by the vector's norm at the layer: the same edit size as the unit inline
            # vectors (a preloaded vector may be long enough to pass steering.max_relative_dose otherwise).
            name, norms = p["named"]
            norm = norms[p["layer"]] if len(norms) > 1 else norms[0]
            op = {"layer": p["layer"], "op": "add", "vector": name, "scale": round(p["scale"] / (norm or 1.0), 6)}
            return path, make(p["prompt"], mt, **sample, steering={"ops": [op]}), None
        if kind == "churn_named":
            op = {"layer": p["layer"], "op": "add", "vector": CHURN_NAME, "scale": p["scale"]}
            return path, make(p["prompt"], mt, **sample, steering={"ops": [op]}), None
        if kind == "logit":
            return path, make(p["prompt"], mt, **sample, vllm_xargs={**off, "logit_steering": 0.5}), None
        if kind == "abort":
            return path, make(p["prompt"], max(mt, 32), **sample, stream=True), None
        if kind == "bad_key":
            return path, make(p["prompt"], 4, vllm_xargs={"treshold": 0.3}), None
        if kind == "bad_layer":
            op = {"layer": 99999, "op": "add", "vector": [1.0], "scale": 1}
            return path, make(p["prompt"], 4, steering={"ops": [op]}), None
        if kind == "bad_inf":
            return path, make(p["prompt"], 4, vllm_xargs={"num_candidates": "inf"}), None
        if kind == "bad_nested":
            head = json.dumps(make(p["prompt"], 4))[:-1]  # the body without its closing brace
            raw = (head + ', "steering": ' + "[" * NESTED_DEPTH + "]" * NESTED_DEPTH + "}").encode()
            return path, None, raw
        raise AssertionError(kind)

    # ---- one request ----------------------------------------------------------------------------------------
    async def one(self, kind: str, p: dict) -> Result:
        path, body, raw = self.build(kind, p)
        t0 = time.perf_counter()
        try:
            if kind == "abort":
                res = await self.abort(path, body)
            else:
                status, parsed, text = await self.call("POST", path, body, raw=raw)
                res = await self.classify(kind, status, parsed, text)
                if res.outcome == "failure" and kind not in BAD_KINDS:
                    res.reason += f" [{path}, seed {(body or {}).get('seed')}]"
        except asyncio.CancelledError:
            res = Result(kind, "cancelled", "still running at the deadline")
        except asyncio.TimeoutError:
            res = Result(kind, "failure", f"timeout after {self.args.request_timeout_s:.0f}s")
        except aiohttp.ClientError as exc:
            res = Result(kind, "failure", f"connection error: {type(exc).__name__}: {_short(str(exc))}")
        res.latency_s = time.perf_counter() - t0
        return res

    async def abort(self, path: str, body: dict) -> Result:
        assert self.session is not None
        to = aiohttp.ClientTimeout(total=self.args.request_timeout_s)
        r = await self.session.post(self.url + path, data=json.dumps(body).encode(), headers=self.headers(),
                                    timeout=to)
        try:
            if r.status != 200:
                text = await r.text()
                return Result("abort", "failure", f"HTTP {r.status}: {_short(text)}", r.status)
            while True:
                line = await r.content.readline()
                if not line:
                    return Result("abort", "failure", "the stream ended before its first chunk", 200)
                if line.startswith(b"data:"):
                    break
            return Result("abort", "ok", status=200)
        finally:
            r.close()  # drops the connection mid-stream: the server must abort the request

    async def classify(self, kind: str, status: int, parsed: Any, text: str) -> Result:
        if kind in BAD_KINDS:
            if 400 <= status < 500:
                return Result(kind, "expected_4xx", status=status)
            return Result(kind, "failure", f"HTTP {status} for a bad request: {_short(text)}", status)
        if status != 200:
            if kind == "churn_named" and status == 400 and CHURN_NAME in text and "unknown" in text:
                return Result(kind, "expected_4xx", status=status)
            what = "server error" if status >= 500 else "unexpected 4xx"
            return Result(kind, "failure", f"HTTP {status} ({what}): {_short(text)}", status)
        try:
            choice = parsed["choices"][0]
            out, finish = _text(parsed), choice.get("finish_reason")
            tokens = int((parsed.get("usage") or {}).get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, AttributeError):
            return Result(kind, "failure", f"200 without choices: {_short(text)}", status)
        if finish == "error":
            return Result(kind, "failure", f"finish_reason error: {_short(text)}", status, tokens)
        if out == "" and finish != "length":
            stats = await self.request_stats(parsed.get("id"))
            if stats.get("forced_eos") and not stats.get("error"):
                return Result(kind, "ok", "abstained", status, tokens)
            if self.args.allow_natural_eos and stats and stats.get("error") is None:
                return Result(kind, "ok", "natural EOS", status, tokens)
            detail = ", ".join(f"{k}={stats.get(k)!r}" for k in ("mode", "error", "forced_eos", "num_scored",
                                                                   "num_interventions")) if stats else "no stats"
            return Result(kind, "failure", f"empty 200 (finish_reason {finish!r}, {tokens} tokens; {detail})",
                          status, tokens)
        if kind in DRIFT_KINDS and out != self.solo.get(kind):
            return Result(kind, "drift", f"solo {self.solo.get(kind)!r} vs {out!r}", status, tokens)
        return Result(kind, "ok", status=status, tokens=tokens)

    async def request_stats(self, request_id: Any) -> dict:
        if not isinstance(request_id, str):
            return {}
        try:
            status, body, _ = await self.call("GET", f"/v1/value_steer/requests/{request_id}", timeout=10)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return {}
        return (body.get("stats") or {}) if status == 200 and isinstance(body, dict) else {}

    # ---- background tasks -----------------------------------------------------------------------------------
    async def churn_loop(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.args.seed + 7)
        while not stop.is_set():
            for method, path, body in (("POST", VECTORS, {"name": CHURN_NAME, "data": self.vector(rng)}),
                                       ("DELETE", f"{VECTORS}/{CHURN_NAME}", None)):
                try:
                    status, _, text = await self.call(method, path, body, admin=True, timeout=60)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                self.churn[f"{method} {status}"] += 1
                if status != 200:
                    self.results.append(Result(f"churn_{method.lower()}", "failure",
                                               f"HTTP {status}: {_short(text)}", status))
                await _sleep_unless(stop, rng.uniform(0.2, 0.3))

    async def health_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                status, _, text = await self.call("GET", "/health", timeout=30)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, text = 0, f"{type(exc).__name__}: {exc}"
            self.health[status] += 1
            if status != 200:
                self.results.append(Result("health", "failure", f"HTTP {status}: {_short(text)}", status))
            await _sleep_unless(stop, self.args.health_every_s)

    # ---- the load -------------------------------------------------------------------------------------------
    async def load(self, deadline: float) -> tuple[float, bool]:
        """Issue the plan at the concurrency; returns (wall seconds, whether the deadline cut it short)."""
        plan = self.plan()
        sem = asyncio.Semaphore(self.args.concurrency)
        stop = asyncio.Event()
        bg = [asyncio.create_task(self.health_loop(stop))]
        if "churn_named" not in self.skipped:
            bg.append(asyncio.create_task(self.churn_loop(stop)))
        tasks: list[asyncio.Task] = []
        t0 = time.perf_counter()
        cut = False

        async def run(kind: str, p: dict) -> None:
            try:
                self.results.append(await self.one(kind, p))
            finally:
                sem.release()

        for kind, p in plan:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cut = True
                break
            try:
                await asyncio.wait_for(sem.acquire(), timeout=remaining)
            except asyncio.TimeoutError:
                cut = True
                break
            tasks.append(asyncio.create_task(run(kind, p)))
        if tasks:
            # In-flight requests get until the deadline plus a grace (their own timeout bounds them too).
            grace = min(60.0, self.args.request_timeout_s)
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*bg, return_exceptions=True)
        return wall, cut

    async def cleanup(self) -> None:
        for name in ([CHURN_NAME] if "churn_named" not in self.skipped else []) + (
                [STATIC_NAME] if self.static_registered else []):
            try:
                await self.call("DELETE", f"{VECTORS}/{name}", admin=True, timeout=30)  # 404 when already gone
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


def _text(parsed: Any) -> str:
    choice = parsed["choices"][0]
    if "message" in choice:
        return (choice["message"] or {}).get("content") or ""
    return choice.get("text") or ""


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


# ---- server memory ------------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every readable process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def server_pids(pid: int | None) -> list[int]:
    """``pid`` (else every process naming vllm / ``value_steer.offline.cli serve``) and all its descendants."""
    table = _proc_table()
    me = os.getpid()
    ancestors, p = set(), me
    while p in table and p not in ancestors:  # our own shell may name vllm on its command line
        ancestors.add(p)
        p = table[p][0]
    if pid is not None:
        roots = {pid}
    else:
        roots = {p for p, (_, cmd) in table.items()
                 if p not in ancestors and ("vllm" in cmd.lower() or "value_steer.offline.cli serve" in cmd)}
    children = defaultdict(list)
    for p, (ppid, _) in table.items():
        children[ppid].append(p)
    seen, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p in seen or p in ancestors:
            continue
        seen.add(p)
        todo.extend(children.get(p, []))
    return sorted(seen)


def rss_mib(pids: list[int]) -> float:
    total_kb = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total_kb / 1024.0


# ---- report -------------------------------------------------------------------------------------------------
def summarize(s: Soak, wall: float, cut: bool, rss: tuple[float, float], pids: list[int]) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    failures: dict[tuple[str, str], list[str]] = defaultdict(list)
    tokens = 0
    ok_notes: Counter = Counter()
    for r in s.results:
        by_kind[r.kind][r.outcome] += 1
        if r.outcome == "ok" and r.reason:
            ok_notes[f"{r.kind}: {r.reason}"] += 1
        tokens += r.tokens
        if r.outcome in ("failure", "drift"):
            # Group by kind and the reason's first words (its status and kind of trouble).
            why = "drift" if r.outcome == "drift" else re.sub(r"[:(].*", "", r.reason).strip() or r.outcome
            key = (r.kind, why)
            failures[key].append(r.reason)
    n_fail = sum(c["failure"] for c in by_kind.values())
    n_drift = sum(c["drift"] for c in by_kind.values())
    n_drift_req = sum(sum(by_kind[k].values()) for k in DRIFT_KINDS)
    return {
        "url": s.url, "model": s.model, "requests": s.args.requests, "concurrency": s.args.concurrency,
        "max_tokens": s.args.max_tokens, "seed": s.args.seed, "hidden_size": s.hidden_size,
        "num_layers": s.num_layers, "dims_source": s.dims_source, "named_vectors": [n for n, _ in s.named],
        "skipped": s.skipped, "notes": s.notes, "wall_s": round(wall, 2), "deadline_cut": cut,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "issued": sum(1 for r in s.results if r.kind in WEIGHTS),
        "failures": n_fail, "drift": n_drift, "drift_requests": n_drift_req,
        "failure_groups": {f"{k} | {why}": {"count": len(v), "examples": v[:5]} for (k, why), v in failures.items()},
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ok_notes": dict(ok_notes), "health": {str(k): v for k, v in s.health.items()}, "churn": dict(s.churn),
        "solo": s.solo, "rss_mib_before": round(rss[0], 1), "rss_mib_after": round(rss[1], 1), "rss_pids": pids,
        "pass": n_fail == 0 and n_drift == 0,
    }


def print_summary(sm: dict) -> None:
    print(f"\nsoak: {sm['issued']} of {sm['requests']} requests at concurrency {sm['concurrency']} against "
          f"{sm['url']} (model {sm['model']}, max_tokens {sm['max_tokens']}, seed {sm['seed']})"
          + (" -- cut short by --timeout-s" if sm["deadline_cut"] else ""))
    print(f"model facts: H={sm['hidden_size']}, layers={sm['num_layers']} ({sm['dims_source']}); "
          f"named vectors: {sm['named_vectors'] or 'none'}")
    for k, why in sm["skipped"].items():
        print(f"skipped {k}: {why}")
    for n in sm["notes"]:
        print(f"note: {n}")
    print(f"\n{'kind':<16}" + "".join(f"{o:>14}" for o in OUTCOMES))
    for kind, c in sm["by_kind"].items():
        print(f"{kind:<16}" + "".join(f"{c.get(o, 0):>14}" for o in OUTCOMES))
    if sm["ok_notes"]:
        print(f"ok with a note: {sm['ok_notes']}")
    print(f"\nhealth polls: {sm['health']}; registry churn: {sm['churn'] or 'off'}")
    print(f"drift: {sm['drift']} of {sm['drift_requests']} greedy repeats differed from their solo text")
    print(f"tokens: {sm['completion_tokens']} completion tokens in {sm['wall_s']:.1f} s = "
          f"{sm['tokens_per_s']:.1f} tok/s")
    pids = sm["rss_pids"]
    print(f"server RSS: {sm['rss_mib_before']:.1f} MiB before, {sm['rss_mib_after']:.1f} MiB after "
          f"({sm['rss_mib_after'] - sm['rss_mib_before']:+.1f} MiB; {len(pids)} processes: "
          f"{', '.join(map(str, pids[:12]))}{' ...' if len(pids) > 12 else ''})")
    if sm["failure_groups"]:
        print("\nfailures:")
        for key, g in sorted(sm["failure_groups"].items()):
            print(f"  {key}: {g['count']}")
            for ex in g["examples"]:
                print(f"    - {ex}")
    print(f"\nresult: {'PASS' if sm['pass'] else 'FAIL'} ({sm['failures']} failures, {sm['drift']} drift)")


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    ap.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--admin-key", default=None, help="sent as X-Steering-Admin-Key on registry POST/DELETE")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer on every request")
    ap.add_argument("--json-out", default=None, help="write the summary here as JSON")
    ap.add_argument("--hidden-size", type=int, default=None,
                    help="H when the server does not tell it (default 576, SmolLM2-135M)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="decoder layers when the server does not tell them (default 30)")
    ap.add_argument("--pid", type=int, default=None, help="the server's pid for RSS (descendants included)")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="stop issuing requests after this long")
    ap.add_argument("--request-timeout-s", type=float, default=300.0)
    ap.add_argument("--health-every-s", type=float, default=3.0)
    ap.add_argument("--allow-natural-eos", action="store_true",
                    help="count an empty 200 whose stats show no error (the model sampled EOS first) as ok")
    ap.add_argument("--inline-pool", type=int, default=8,
                    help="distinct inline vectors the load draws from (each running one holds a bank slot)")
    args = ap.parse_args(argv)
    args.hidden_size_given = args.hidden_size is not None
    args.num_layers_given = args.num_layers is not None
    args.hidden_size = args.hidden_size or 576
    args.num_layers = args.num_layers or 30
    for name in ("requests", "concurrency", "max_tokens", "inline_pool"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        ap.error(f"--url must be http(s) on 127.0.0.1, localhost or ::1, got {args.url!r}")
    return args


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.timeout_s
    s = Soak(args, args.url.rstrip("/"))
    pids = server_pids(args.pid)
    rss_before = rss_mib(pids)
    conn = aiohttp.TCPConnector(limit=args.concurrency + 8)
    async with aiohttp.ClientSession(connector=conn) as session:
        s.session = session
        try:
            await s.setup()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            print(f"soak: cannot reach {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(f"soak: model {s.model}, H={s.hidden_size}, layers={s.num_layers} ({s.dims_source}); "
              f"solo texts: {json.dumps(s.solo)[:400]}", flush=True)
        try:
            wall, cut = await s.load(deadline)
        finally:
            await s.cleanup()
    await asyncio.sleep(1.0)  # let the server settle the aborted and finished requests before reading RSS
    pids_after = server_pids(args.pid)
    rss_after = rss_mib(pids_after)
    sm = summarize(s, wall, cut, (rss_before, rss_after), sorted(set(pids) | set(pids_after)))
    print_summary(sm)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(sm, f, indent=2)
    return 0 if sm["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
