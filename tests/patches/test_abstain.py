"""Dynamic abstention inside a real vLLM 0.32 engine (CPU, tiny random Llama)."""

from __future__ import annotations

import pytest

from tests.helpers import TINY_HIDDEN, make_llm, write_constant_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["hello world", "the quick brown fox", "a b c d e"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory):
    # Value is sigmoid(0) = 0.5 for every token: threshold 0.4 always crosses, 0.6 never does.
    head = write_constant_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, 0.0, 0.6)
    engine = make_llm(tiny_model_dir, {"abstain": {"value_head_path": head}})
    yield engine
    del engine


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": 12, **kw})


def _stats(llm, req_id):
    return llm.collective_rpc("value_steer_stats", args=(req_id,))[0]["stats"]


def test_never_crossing_is_base(llm):
    steered = llm.generate(PROMPTS, _sp(extra_args={"threshold": 0.6}))
    off = llm.generate(PROMPTS, _sp(extra_args={"value_steer": False}))
    for s, o in zip(steered, off):
        assert s.outputs[0].token_ids == o.outputs[0].token_ids
        assert len(s.outputs[0].token_ids) == 12


def test_crossing_forces_eos_on_first_decode_step(llm):
    outs = llm.generate(PROMPTS, _sp(extra_args={"threshold": 0.4}))
    for out in outs:
        c = out.outputs[0]
        # Token 1 comes from the prompt's last state (prefill: never scored); the first decode step scores it
        # and forces EOS as token 2.
        assert c.finish_reason == "stop"
        assert len(c.token_ids) == 2
        st = _stats(llm, out.request_id)
        assert st["forced_eos"] and st["num_interventions"] == 1 and st["num_scored"] == 1
        assert st["last_value"] == pytest.approx(0.5)


def test_equal_threshold_crosses(llm):
    out = llm.generate(PROMPTS[:1], _sp(extra_args={"threshold": 0.5}))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 2


def test_ignore_eos_untouched(llm):
    out = llm.generate(PROMPTS[:1], _sp(ignore_eos=True, extra_args={"threshold": 0.4}))[0].outputs[0]
    assert len(out.token_ids) == 12


def test_min_tokens_respected(llm):
    out = llm.generate(PROMPTS[:1], _sp(min_tokens=5, extra_args={"threshold": 0.4}))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert len(out.token_ids) == 6  # five tokens, then the forced EOS


def test_mixed_batch(llm):
    sps = [
        _sp(extra_args={"threshold": 0.4}),
        _sp(extra_args={"value_steer": False}),
        _sp(extra_args={"threshold": 0.6}),
    ]
    outs = llm.generate(PROMPTS, sps)
    lens = [len(o.outputs[0].token_ids) for o in outs]
    assert lens == [2, 12, 12]


def test_bad_request_arg_is_rejected(llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"threshold must be a number in \[0, 1\]"):
        llm.generate(PROMPTS[:1], _sp(extra_args={"threshold": 3.0}))
    # The engine keeps serving.
    assert len(llm.generate(PROMPTS[:1], _sp())[0].outputs[0].token_ids) >= 1


def test_forced_eos_comes_back_with_its_own_logprob(llm):
    """Logprobs of a forced EOS are EOS's (raw) logprob under the model, not the replaced sample's."""
    prompt = PROMPTS[0]
    out = llm.generate([prompt], _sp(logprobs=2, extra_args={"threshold": 0.4}))[0].outputs[0]
    eos = out.token_ids[-1]
    last = out.logprobs[-1]
    assert eos in last
    # Reference: the model's distribution after the same prefix (prompt + the tokens before the EOS),
    # read off prompt logprobs of an unsteered request.
    ids = [*llm.get_tokenizer().encode(prompt), *out.token_ids[:-1]]
    ref = llm.generate([{"prompt_token_ids": [*ids, eos]}],
                       _sp(max_tokens=1, prompt_logprobs=0, extra_args={"value_steer": False}))[0]
    expected = ref.prompt_logprobs[len(ids)][eos]
    assert last[eos].logprob == pytest.approx(expected.logprob, abs=1e-4)
    assert last[eos].rank == expected.rank
