"""Activation steering together with value-filtered decoding: VFD's candidates run through the steered model
(the main forward's candidate rows, the first-token forward and two-phase's second forward) and the value
head scores the steered final state."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import TINY_DOSE, TINY_HIDDEN, make_llm, write_random_head
from value_steer.core.steering_spec import Steering, add

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 4
PROMPTS = ["hello world", "the quick brown fox", "a b c d e"]


def _vec(seed: int) -> list[float]:
    return np.random.RandomState(seed).randn(TINY_HIDDEN).astype(np.float32).tolist()


def _sp(spec: Steering | None = None, **extra):
    from vllm import SamplingParams

    args = dict(extra)
    if spec is not None:
        args.update(spec.extra_args())
    seed = args.pop("seed", None)
    return SamplingParams(max_tokens=16, temperature=0.9 if seed is not None else 0.0, seed=seed, ignore_eos=True,
                          extra_args=args or None)


def _run(model_dir, head, schedule):
    os.environ["VALUE_STEER_DEBUG"] = "1"
    try:
        llm = make_llm(model_dir, {"vfd": {"value_head_path": head, "num_candidates": K, "threshold": 0.5,
                                           "schedule": schedule},
                                   "steering": {"max_relative_dose": TINY_DOSE}}, block_size=32)
    finally:
        os.environ.pop("VALUE_STEER_DEBUG", None)
    # A mixed batch: unsteered, a decode-only add, an add at every token at the other layer (a candidate forward
    # that reused another request's row, or took its decode tokens for prompt tokens, would show).
    specs = [None, Steering([add(1, _vec(3), 40.0, tokens="decode")]), Steering([add(0, _vec(4), 30.0)])]
    zero = [None, Steering([add(1, _vec(3), 0.0)]), Steering([add(0, _vec(4), 0.0)])]

    def gen(specs_, engine=llm, **extra):
        seeded = extra.pop("seeded", False)
        params = [_sp(sp, **extra, **({"seed": 7 + i} if seeded else {})) for i, sp in enumerate(specs_)]
        return [list(o.outputs[0].token_ids) for o in engine.generate(PROMPTS, params, use_tqdm=False)]

    try:
        out = {
            "vfd": gen([None] * 3),
            "vfd_zero_steer": gen(zero),
            "vfd_steer": gen(specs),
            "steer_only": gen(specs, value_steer=False),
            "vfd_steer_never": gen(specs, threshold=1.0),
            "vfd_steer_seeded": gen(specs, seeded=True),
        }
        dbg = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]
    finally:
        del llm
    out["interventions"] = sum(s["winner_col"] != 0 for steps in dbg["steps"].values() for s in steps)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    head = write_random_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, seed=1)
    return {s: _run(tiny_model_dir, head, s) for s in ("eager", "two_phase")}


@pytest.mark.parametrize("schedule", ["eager", "two_phase"])
def test_vfd_with_steering(runs, schedule):
    r = runs[schedule]
    assert r["interventions"] > 0, "the planted head must make VFD intervene for this test to mean anything"
    # A zero-scale add is the identity in every forward VFD runs.
    assert r["vfd_zero_steer"] == r["vfd"]
    # Steering changes what VFD commits for the steered rows, and leaves the unsteered row's VFD alone.
    assert r["vfd_steer"][0] == r["vfd"][0]
    assert r["vfd_steer"][1] != r["vfd"][1] and r["vfd_steer"][2] != r["vfd"][2]
    # Never intervening (threshold 1.0), VFD commits the natural sample of the steered model: exactly what
    # steering alone decodes, which needs every candidate forward to be steered.
    assert r["vfd_steer_never"] == r["steer_only"]


def test_two_phase_with_steering_commits_what_eager_commits(runs):
    for key in ("vfd_steer", "vfd_steer_seeded", "vfd_steer_never"):
        assert runs["two_phase"][key] == runs["eager"][key], key
