"""Logit steering together with value-filtered decoding: VFD's candidates are drawn from the steered distribution
(the first-token draw, the sampler's natural sample and the alternatives), a winner's replacement logits are steered
from the winner's hidden state, and unsteered rows' VFD is untouched. Eager and two-phase schedules."""

from __future__ import annotations

import os

import pytest

from tests.helpers import BOOST_TOKEN, TINY_HIDDEN, make_llm, write_planted_generator, write_random_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 4
N = 16
PROMPTS = ["hello world", "the quick brown fox", "a b c d e"]
MILD = 0.018  # the boost competes with the model's own logits (see test_logit_steering.py)


def _sp(strength=None, seed=None, **extra):
    from vllm import SamplingParams

    args = dict(extra)
    if strength is not None:
        args["logit_steering"] = strength
    return SamplingParams(max_tokens=N, temperature=0.9 if seed is not None else 0.0, seed=seed, ignore_eos=True,
                          extra_args=args or None)


def _steps(dbg, request_id):
    hits = [v for k, v in dbg["steps"].items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, f"no unique debug record for {request_id}"
    return hits[0]


def _run(model_dir, head, gen, schedule):
    os.environ["VALUE_STEER_DEBUG"] = "1"
    try:
        llm = make_llm(model_dir, {"vfd": {"value_head_path": head, "num_candidates": K, "threshold": 0.5,
                                           "schedule": schedule}, "logit_steering": {"checkpoint": gen}},
                       block_size=32)
    finally:
        os.environ.pop("VALUE_STEER_DEBUG", None)

    def gen_(params, engine=llm):
        outs = engine.generate(PROMPTS, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.request_id for o in outs]

    try:
        out = {
            "vfd": gen_([_sp()] * 3)[0],
            "mixed": gen_([_sp(), _sp(4.0, seed=5), _sp(MILD)])[0],
            "mild_never": gen_([_sp(MILD, threshold=1.0)] * 3)[0],  # VFD never intervenes
            "mild_only": gen_([_sp(MILD, value_steer=False)] * 3)[0],  # logit steering alone
            "base_only": gen_([_sp(value_steer=False)] * 3)[0],
        }
        out["greedy_strong"], greedy_ids = gen_([_sp(4.0)] * 3)
        out["random_strong"], random_ids = gen_([_sp(4.0, seed=11 + i) for i in range(3)])
        llm.generate(["x"], _sp(value_steer=False), use_tqdm=False)  # the runner sees the finished ids
        out["stats"] = [llm.collective_rpc("value_steer_stats", args=(r,))[0]["stats"] for r in greedy_ids]
        dbg = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]
        out["greedy_steps"] = [_steps(dbg, r) for r in greedy_ids]
        out["random_steps"] = [_steps(dbg, r) for r in random_ids]
    finally:
        del llm
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vfd-logit")
    head = write_random_head(tmp / "head.safetensors", TINY_HIDDEN, seed=1)
    gen = write_planted_generator(tmp / "gen.safetensors")
    return {s: _run(tiny_model_dir, head, gen, s) for s in ("eager", "two_phase")}


@pytest.mark.parametrize("schedule", ["eager", "two_phase"])
def test_candidates_are_drawn_from_the_steered_distribution(runs, schedule):
    r = runs[schedule]
    # Random rows: the boosted token holds all the probability, so every candidate VFD draws (all K columns, from
    # the first token on) is it, and so is every committed token.
    assert r["random_strong"] == [[BOOST_TOKEN] * N] * 3
    for steps in r["random_steps"]:
        assert len(steps) == N and all(s["candidates"] == [BOOST_TOKEN] * K for s in steps)
    # Greedy rows take the top-K distinct tokens: column 0, the natural sample, is the boosted token at every
    # step, including after an intervention (the winner's replacement logits are steered from its own state).
    interventions = 0
    for steps in r["greedy_steps"]:
        assert all(s["candidates"][0] == BOOST_TOKEN for s in steps)
        interventions += sum(s["winner_col"] != 0 for s in steps)
    assert interventions > 0, "the planted head must make VFD intervene for this test to mean anything"


@pytest.mark.parametrize("schedule", ["eager", "two_phase"])
def test_never_intervening_vfd_commits_what_logit_steering_alone_decodes(runs, schedule):
    r = runs[schedule]
    assert r["mild_only"] != r["base_only"], "the mild strength must change the text for this test to mean anything"
    assert r["mild_never"] == r["mild_only"]


@pytest.mark.parametrize("schedule", ["eager", "two_phase"])
def test_unsteered_rows_keep_their_vfd(runs, schedule):
    """A greedy unsteered row beside a random strongly steered row (every candidate boosted) and a mildly steered
    greedy row. (A greedy strongly steered row may commit none of its boosted natural samples: VFD replaces each
    one the head calls unsafe by the next of its top-K distinct candidates.)"""
    r = runs[schedule]
    assert r["mixed"][0] == r["vfd"][0]
    assert r["mixed"][1] == [BOOST_TOKEN] * N


def test_stats_count_the_steered_distributions(runs):
    for r in runs.values():
        for stats in r["stats"]:
            got = stats["logit_steering"]
            # One per committed token, plus the first token's step (it draws from two: the first position's and,
            # after its winner, the next one's).
            assert got["num_steered"] >= N and got["strength"] == 4.0
            assert 0.0 < got["mean_gate_strength"] <= got["max_gate_strength"] <= 2.0
            assert stats["num_scored"] == N


def test_two_phase_commits_what_eager_commits(runs):
    for key in ("mixed", "mild_never", "greedy_strong", "random_strong"):
        assert runs["two_phase"][key] == runs["eager"][key], key
