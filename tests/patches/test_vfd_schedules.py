"""Two-phase VFD commits exactly what eager VFD commits: same candidates, same winners, token for token.

Both engines draw the same candidates (same engine seed, same request seeds); eager forwards all K in the
main forward, two-phase forwards the natural sample first and the alternatives only for unsafe rows.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import TINY_HIDDEN, make_llm, write_random_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 4
PROMPTS = ["hello world", "the quick brown fox", "a b c d e", "one two three four", "it was the best of"]


def _run(model_dir, head, schedule):
    from vllm import SamplingParams

    os.environ["VALUE_STEER_DEBUG"] = "1"
    try:
        llm = make_llm(model_dir, {"vfd": {"value_head_path": head, "num_candidates": K, "threshold": 0.5,
                                           "schedule": schedule}}, block_size=32)
    finally:
        os.environ.pop("VALUE_STEER_DEBUG", None)
    try:
        params = [SamplingParams(max_tokens=24, temperature=0.9, seed=10 + i, ignore_eos=True) for i in range(3)]
        params += [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) for _ in range(2)]
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        dbg = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]
    finally:
        del llm
    winners = {}
    for o in outs:
        (steps,) = [v for k, v in dbg["steps"].items() if k.startswith(o.request_id + "-") or k == o.request_id]
        winners[o.prompt] = [(s["candidates"], s["winner_col"]) for s in steps]
    return {o.prompt: list(o.outputs[0].token_ids) for o in outs}, winners, dbg["counters"]


def test_two_phase_commits_what_eager_commits(tiny_model_dir, tmp_path):
    head = write_random_head(tmp_path / "head.safetensors", TINY_HIDDEN, seed=1)
    eager_tokens, eager_winners, eager_counters = _run(tiny_model_dir, head, "eager")
    two_tokens, two_winners, two_counters = _run(tiny_model_dir, head, "two_phase")
    interventions = sum(col != 0 for steps in eager_winners.values() for _, col in steps)
    assert interventions > 0, "the planted head must make VFD intervene for this test to mean anything"
    assert two_tokens == eager_tokens
    assert two_winners == eager_winners
    # Each engine ran the schedule it was pinned to; two-phase ran second forwards only where needed.
    assert eager_counters["eager_steps"] > 0 and eager_counters["two_phase_steps"] == 0
    assert two_counters["two_phase_steps"] > 0 and two_counters["eager_steps"] == 0
    assert 0 < two_counters["second_forwards"] <= two_counters["two_phase_steps"]
