"""The evaluation's pure statistics: per-response records, metrics with 95% intervals, the threshold
selection rule, and the alignment of a rescoring pass's prompt logprobs with a response. numpy only; tested
without vLLM."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959964  # the two-sided 95% normal quantile


@dataclass
class Response:
    """One generated response and what the engine reported about it."""

    prompt_id: str
    text: str
    # The unsteered model's raw logprob of each counted token (the rescoring pass): perplexity's input.
    token_logprobs: list[float]
    negative: bool
    num_scored: int = 0
    num_interventions: int = 0
    forced_eos: bool = False
    # What the engine returned while sampling (the steered model's, for activation-steered requests); kept to
    # check the rescoring against on the unsteered rows, where both are the same model's.
    sampled_logprobs: list[float] | None = None
    # Gated activation steering: the request's decode tokens under the gate, and those where it was open.
    gate_tokens: int = 0
    gate_open: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (95% by default; ``(0, 1)`` when ``n <= 0``)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bigrams(text: str) -> list[tuple[str, str]]:
    return list(itertools.pairwise(text.lower().split()))


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of ``texts`` (NaN when there are none)."""
    grams = [g for t in texts for g in bigrams(t)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def perplexity_of(token_logprobs: Sequence[Sequence[float]]) -> float:
    """The project's perplexity: ``exp`` of the mean NLL over all tokens of all responses (each response's
    token logprobs one sequence; NaN when there are none)."""
    lps = [lp for r in token_logprobs for lp in r]
    return math.exp(-sum(lps) / len(lps)) if lps else float("nan")


def perplexity(responses: Sequence[Response]) -> float:
    """:func:`perplexity_of` the counted tokens of ``responses`` (their rescored logprobs)."""
    return perplexity_of([r.token_logprobs for r in responses])


def sampled_perplexity(responses: Sequence[Response]) -> float:
    """:func:`perplexity` of the logprobs the engine returned while sampling (NaN when any is missing)."""
    if any(r.sampled_logprobs is None for r in responses):
        return float("nan")
    return perplexity_of([r.sampled_logprobs or () for r in responses])


def gate_open_rate(responses: Sequence[Response]) -> float:
    """Decode tokens whose gate was open (>= 0.5), over gated decode tokens (NaN when none was gated)."""
    tokens = sum(r.gate_tokens for r in responses)
    return sum(r.gate_open for r in responses) / tokens if tokens else float("nan")


def intervention_rate(responses: Sequence[Response]) -> float:
    """Steered tokens where steering changed the outcome, over scored tokens (NaN when none was scored)."""
    scored = sum(r.num_scored for r in responses)
    return sum(r.num_interventions for r in responses) / scored if scored else float("nan")


def bootstrap_ci(stat: Callable[[list[Response]], float], responses: Sequence[Response], n_boot: int,
                 seed: int) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` over prompt-level resamples."""
    rng = np.random.default_rng(seed)
    n = len(responses)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat([responses[i] for i in idx])
        if math.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))


def jackknife_ci(stat: Callable[[list[Response]], float], responses: Sequence[Response]) -> tuple[float, float]:
    """Normal 95% interval with the leave-one-out (jackknife) standard error. Used for distinct-2, which
    resampling with replacement biases downwards (a duplicated response duplicates its bigrams)."""
    rs = list(responses)
    n = len(rs)
    full = stat(rs)
    if n < 2 or not math.isfinite(full):
        return (float("nan"), float("nan"))
    loo = np.array([stat(rs[:i] + rs[i + 1:]) for i in range(n)], dtype=np.float64)
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    return (full - Z95 * se, full + Z95 * se)


def condition_metrics(responses: Sequence[Response], wall_s: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Every metric of one condition with its 95% interval and sample size."""
    rs = list(responses)
    n = len(rs)
    k = sum(r.negative for r in rs)
    lengths = np.array([r.num_tokens for r in rs], dtype=np.float64)
    sd = float(lengths.std(ddof=1)) if n > 1 else 0.0
    tokens = int(lengths.sum())
    mean_len = float(lengths.mean()) if n else float("nan")
    return {
        "n": n,
        "tokens": tokens,
        "undesirable": {"value": k / n if n else float("nan"), "ci": wilson_interval(k, n), "k": k},
        "perplexity": {"value": perplexity(rs), "ci": bootstrap_ci(perplexity, rs, n_boot, seed)},
        "length": {"value": mean_len, "ci": (mean_len - Z95 * sd / math.sqrt(max(n, 1)),
                                             mean_len + Z95 * sd / math.sqrt(max(n, 1)))},
        "distinct_2": {"value": distinct_2([r.text for r in rs]),
                       "ci": jackknife_ci(lambda x: distinct_2([r.text for r in x]), rs)},
        "intervention": {"value": intervention_rate(rs), "ci": bootstrap_ci(intervention_rate, rs, n_boot, seed),
                         "scored": sum(r.num_scored for r in rs)},
        "gate_open": {"value": gate_open_rate(rs), "ci": bootstrap_ci(gate_open_rate, rs, n_boot, seed)
                      if any(r.gate_tokens for r in rs) else (float("nan"), float("nan")),
                      "tokens": sum(r.gate_tokens for r in rs)},
        "perplexity_sampled": sampled_perplexity(rs),
        "abstained": {"value": sum(r.forced_eos for r in rs) / n if n else float("nan"),
                      "ci": wilson_interval(sum(r.forced_eos for r in rs), n)},
        "tok_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "wall_s": wall_s,
    }


def response_logprobs(prompt_logprobs: Sequence[Any], n_prompt: int, response_ids: Sequence[int]) -> list[float]:
    """The logprob of each response token from a rescoring pass over ``prompt + response`` token ids.

    Args:
        prompt_logprobs: vLLM's ``RequestOutput.prompt_logprobs`` of that pass: one entry per input token
            (``None`` for the first), each mapping token id -> ``Logprob`` (``prompt_logprobs=0`` holds the
            input token itself).
        n_prompt: the original prompt's length (the response starts at that position).
        response_ids: the response tokens that were appended.

    Raises ValueError when the pass does not line up with the response (a length or token mismatch).
    """
    n = len(response_ids)
    if len(prompt_logprobs) != n_prompt + n:
        raise ValueError(f"the rescoring pass has {len(prompt_logprobs)} positions, expected {n_prompt} prompt "
                         f"+ {n} response tokens")
    out = []
    for j, tok in enumerate(response_ids):
        entry = prompt_logprobs[n_prompt + j]
        if entry is None or tok not in entry:
            raise ValueError(f"the rescoring pass has no logprob for response token {j} (id {tok})")
        out.append(float(entry[tok].logprob))
    return out


def choose_threshold(sweep: dict[float, dict[str, Any]], base: dict[str, Any], max_ppl_increase: float) -> float:
    """The threshold with the lowest undesirable rate whose perplexity stays within ``max_ppl_increase`` of
    base (ties: the higher threshold, which intervenes less). Falls back to the lowest-perplexity threshold
    when none qualifies, and says so in the report."""
    limit = base["perplexity"]["value"] * (1.0 + max_ppl_increase)
    ok = [t for t, m in sweep.items() if m["perplexity"]["value"] <= limit]
    if ok:
        return min(ok, key=lambda t: (sweep[t]["undesirable"]["value"], -t))
    return min(sweep, key=lambda t: sweep[t]["perplexity"]["value"])
