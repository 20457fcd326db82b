"""Fail closed: a request whose steering arguments reach the worker invalid (the API-side validator absent,
or a check only the worker makes) ends at once with no text, its stats name the reason, and
``requests_refused`` counts it. Offline engines with ``RequestArgsValidator`` switched off."""

from __future__ import annotations

import pytest

from tests.helpers import TINY_HIDDEN, make_llm, write_constant_head, write_random_head

pytestmark = pytest.mark.vllm

EOS = 2  # make_tiny_llama's <|im_end|>


@pytest.fixture(scope="module")
def no_validator():
    """The validator lets everything through, as if it were not installed (the engine still lists it)."""
    from value_steer.patches.vllm_0_32.api import RequestArgsValidator

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RequestArgsValidator, "validate_params", classmethod(lambda cls, sp: None))
        yield


@pytest.fixture(scope="module")
def abstain_llm(no_validator, tiny_model_dir, tmp_path_factory):
    head = write_constant_head(tmp_path_factory.mktemp("head") / "h.safetensors", TINY_HIDDEN, 0.0, 0.6)
    return make_llm(tiny_model_dir, {"abstain": {"value_head_path": head}})


@pytest.fixture(scope="module")
def vfd_llm(no_validator, tiny_model_dir, tmp_path_factory):
    head = write_random_head(tmp_path_factory.mktemp("head") / "h.safetensors", TINY_HIDDEN, seed=0)
    return make_llm(tiny_model_dir, {"vfd": {"value_head_path": head, "num_candidates": 4}})


def _run(llm, params: list) -> list:
    outs = llm.generate(["hello world"] * len(params), params, use_tqdm=False)
    return [(o.outputs[0], llm.collective_rpc("value_steer_stats", args=(o.request_id,))[0]["stats"]) for o in outs]


def _refused(llm) -> int:
    return llm.collective_rpc("value_steer_stats")[0]["counters"]["requests_refused"]


BAD = [({"threshold": 3}, "threshold"), ({"threshold": "high"}, "threshold"),
       ({"num_candidates": -2}, "num_candidates"), ({"treshold": 0.3}, "'threshold'")]


def test_refused_params_allow_only_the_end_token():
    from vllm import SamplingParams

    from value_steer.patches.vllm_0_32.api import end_token, refused_sampling_params

    sp = SamplingParams(max_tokens=8, min_tokens=4, logit_bias={2: -100.0}, extra_args={"threshold": 3})
    sp.update_from_generation_config({}, eos_token_id=EOS)
    ended = refused_sampling_params(sp)
    assert ended.allowed_token_ids == [EOS] and ended.min_tokens == 0 and ended.logit_bias is None
    assert sp.allowed_token_ids is None and sp.min_tokens == 4  # the client's (scheduler's) copy is untouched
    # ignore_eos: the scheduler does not stop on EOS, but does on stop_token_ids; without them, an EOS id
    # still yields no text (a special token) while the request runs to max_tokens.
    ignore = SamplingParams(ignore_eos=True, stop_token_ids=[7])
    ignore.update_from_generation_config({}, eos_token_id=EOS)
    assert end_token(ignore) == 7
    ignore = SamplingParams(ignore_eos=True)
    ignore.update_from_generation_config({}, eos_token_id=EOS)
    assert end_token(ignore) == EOS
    assert refused_sampling_params(SamplingParams()) is None  # no EOS known at all


@pytest.mark.slow
def test_invalid_steering_args_end_the_request_with_no_text(abstain_llm):
    from vllm import SamplingParams

    before = _refused(abstain_llm)
    # min_tokens and sampling do not keep a refused request alive: EOS is the only token it can sample.
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=1, min_tokens=4, extra_args=a) for a, _ in BAD]
    params.append(SamplingParams(max_tokens=8, temperature=0.0, extra_args={"value_steer": False}))
    results = _run(abstain_llm, params)
    for (out, stats), (_, field) in zip(results, BAD):
        assert out.text == "" and list(out.token_ids) == [EOS] and out.finish_reason == "stop", out
        assert stats["mode"] == "refused" and stats["num_scored"] == 0
        assert field in stats["error"], stats
    assert "'value_steer', 'threshold', 'num_candidates'" in results[3][1]["error"]  # the allowed keys
    unsteered, stats = results[-1]
    assert len(unsteered.token_ids) == 8 and stats["mode"] == "off" and stats["error"] is None
    assert _refused(abstain_llm) == before + len(BAD)


@pytest.mark.slow
def test_ignore_eos_request_is_still_ended(abstain_llm):
    from vllm import SamplingParams

    # Under ignore_eos the scheduler does not stop on EOS, but it does on the request's stop tokens.
    (out, stats), = _run(abstain_llm, [SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[7],
                                                      extra_args={"threshold": 2})])
    assert out.text == "" and list(out.token_ids) == [7] and out.finish_reason == "stop"
    assert "threshold" in stats["error"]


@pytest.mark.slow
def test_vfd_refuses_what_it_cannot_filter_in_the_worker(vfd_llm):
    from vllm import SamplingParams

    before = _refused(vfd_llm)
    params = [SamplingParams(max_tokens=8, temperature=0.0, logprob_token_ids=[5, 6]),  # worker-side VFD check
              SamplingParams(max_tokens=8, temperature=0.0, extra_args={"num_candidates": 9}),  # K is 4
              SamplingParams(max_tokens=8, temperature=0.0, logprob_token_ids=[5, 6],
                             extra_args={"value_steer": False}),  # unsteered: VFD has nothing to filter
              SamplingParams(max_tokens=8, temperature=0.0, extra_args={"threshold": 1.0})]
    (cannot, s0), (too_many, s1), (off, s2), (steered, s3) = _run(vfd_llm, params)
    assert cannot.text == "" and list(cannot.token_ids) == [EOS] and "logprob_token_ids" in s0["error"]
    assert too_many.text == "" and "num_candidates" in s1["error"]
    assert len(off.token_ids) == 8 and s2["mode"] == "off"
    assert len(steered.token_ids) == 8 and s3["mode"] == "vfd" and s3["num_scored"] == 8
    assert _refused(vfd_llm) == before + 2
