"""Token-mode VFD in a real vLLM 0.32 engine (issue 24): a Q-head's predicted token values edit the step's logits
before vLLM's sampler. One engine (tiny Llama, eager) with token mode, logit steering and activation steering.

Planted Q-heads (``W_up = 0``: ``q(h) = bias``, the same prediction at every state) make the expected edit exact:
the tokens whose bias is over the threshold are removed, the rest keep their logits bitwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import BOOST_TOKEN, TINY_DOSE, TINY_HIDDEN, TINY_VOCAB, make_llm, write_planted_generator
from value_steer.core.qhead import QHead, save_qhead

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["hello world, this is a test", "the quick brown fox jumps over"]


def write_planted_qhead(path, unsafe: dict[int, float], rest: float = -8.0) -> str:
    """``q(h) = bias``: ``rest`` everywhere but ``unsafe`` (token -> logit-scale value)."""
    head = QHead(TINY_HIDDEN, TINY_VOCAB, rank=2)
    with torch.no_grad():
        head.bias.fill_(rest)
        for tok, val in unsafe.items():
            head.bias[tok] = val
    save_qhead(str(path), head, threshold=0.5, direction="above", training={"planted": unsafe})
    return str(path)


@pytest.fixture(scope="module")
def base_tokens(tiny_model_dir):
    """The unsteered greedy tokens of PROMPTS (from a plain engine), to plant the Q-head on."""
    from vllm import SamplingParams

    llm = make_llm(tiny_model_dir, None, steering=False)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    del llm
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def planted(base_tokens):
    """Two tokens each prompt's greedy text uses, planted undesirable (value ~1)."""
    return sorted({base_tokens[0][0], base_tokens[1][1]})


@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory, planted):
    root = tmp_path_factory.mktemp("token-vfd")
    q = write_planted_qhead(root / "q.safetensors", {t: 8.0 for t in planted})
    gen = write_planted_generator(root / "gen.safetensors")
    engine = make_llm(tiny_model_dir, {"vfd": {"mode": "token", "qhead_path": q},
                                       "logit_steering": {"checkpoint": gen},
                                       "steering": {"max_relative_dose": TINY_DOSE}})
    yield engine
    del engine


def _sp(max_tokens: int = 8, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=5, **kw)


def _lps(out) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs]


def _stats(llm, out) -> dict:
    return llm.collective_rpc("value_steer_stats", args=(out.request_id,))[0]["stats"]


def test_planted_tokens_are_masked_and_unsteered_rows_are_bitwise(llm, base_tokens, planted):
    params = [_sp(extra_args={"value_steer": False}), _sp(), _sp(extra_args={"value_steer": False}), _sp()]
    outs = llm.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], params, use_tqdm=False)
    off0, on0, off1, on1 = outs
    assert [list(off0.outputs[0].token_ids), list(off1.outputs[0].token_ids)] == base_tokens
    for on in (on0, on1):
        toks = list(on.outputs[0].token_ids)
        assert not set(toks) & set(planted)
        # Each step: the planted tokens are gone (logprob -inf or out of the top 5), the others keep their logprob
        # up to the renormalisation over the tokens that stay.
        st = _stats(llm, on)
        assert st["mode"] == "token" and st["num_scored"] == 8 and st["beta"] == 0.0
        assert st["num_interventions"] >= 1 and st["mass_removed"] > 0
    assert _stats(llm, off0)["mode"] == "off"
    # The unsteered rows of the mixed batch are the base rows exactly.
    alone = llm.generate([PROMPTS[0]], _sp(extra_args={"value_steer": False}), use_tqdm=False)[0]
    assert _lps(off0) == _lps(alone)


def test_a_threshold_no_token_crosses_is_the_identity(llm):
    base = llm.generate(PROMPTS, _sp(extra_args={"value_steer": False}), use_tqdm=False)
    same = llm.generate(PROMPTS, _sp(extra_args={"threshold": 0.99999}), use_tqdm=False)  # sigmoid(8) < 0.99999
    for b, s in zip(base, same):
        assert s.outputs[0].token_ids == b.outputs[0].token_ids and _lps(s) == _lps(b)
        st = _stats(llm, s)
        assert st["num_scored"] == 8 and st["num_interventions"] == 0 and st["mass_removed"] == 0.0


def test_tilt_moves_the_distribution_without_removing_tokens(llm, planted):
    base = llm.generate(PROMPTS[:1], _sp(extra_args={"value_steer": False}), use_tqdm=False)[0]
    tilted = llm.generate(PROMPTS[:1], _sp(extra_args={"token_beta": 2.0}), use_tqdm=False)[0]
    assert _lps(tilted) != _lps(base)
    st = _stats(llm, tilted)
    assert st["beta"] == 2.0 and st["num_interventions"] == 8 and 0 < st["mass_removed"] < 1


def test_composes_with_logit_and_activation_steering(llm, planted, tmp_path):
    """Logit steering at strength 4 makes BOOST_TOKEN win everywhere; token mode runs after it on the steered
    logits, so a Q-head planting BOOST_TOKEN would remove it. Here the planted tokens stay out of a request that also
    adds an activation vector and logit-steers."""
    v = np.random.RandomState(0).randn(TINY_HIDDEN).astype(np.float32).tolist()
    spec = {"ops": [{"layer": 0, "op": "add", "vector": v, "scale": 2.0}]}
    out = llm.generate(PROMPTS, _sp(extra_args={"logit_steering": 4.0, "steering": spec}), use_tqdm=False)
    for o in out:
        toks = list(o.outputs[0].token_ids)
        assert BOOST_TOKEN in toks and not set(toks) & set(planted)
        st = _stats(llm, o)
        assert st["logit_steering"]["num_steered"] == 8 and st["activation_steering"]["ops"] == 1


@pytest.mark.parametrize(("extra", "message"), [
    ({"token_beta": -1}, r"token_beta must be a number in \[0, 100\]"),
    ({"token_beta": "x"}, "token_beta must be a number"),
    ({"num_candidates": 2}, "exact mode or in token mode with vfd.num_candidates"),
    ({"threshold": 2}, "threshold must be"),
])
def test_bad_request_args_are_refused_naming_the_field(llm, extra, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # the offline engine's form of a 400

    with pytest.raises((ValueError, VLLMValidationError), match=message):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)


def test_fallback_takes_the_safest_predicted_token(tiny_model_dir, tmp_path):
    """Every token predicted undesirable: the step keeps only the token with the safest prediction."""
    q = write_planted_qhead(tmp_path / "q.safetensors", {300: 2.0}, rest=6.0)  # 300: sigmoid(2)=0.88, the safest
    engine = make_llm(tiny_model_dir, {"vfd": {"mode": "token", "qhead_path": q}})
    out = engine.generate(PROMPTS[:1], _sp(6), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == [300] * 6
    st = engine.collective_rpc("value_steer_stats", args=(out.request_id,))[0]["stats"]
    assert st["num_interventions"] == 6 and st["mass_removed"] > 0.99
    del engine
