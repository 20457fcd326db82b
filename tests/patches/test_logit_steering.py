"""Generative logit steering in a real vLLM 0.32 engine (tiny model, CPU): strength 0 is base exactly, a planted
generator changes the tokens where the reference (transformers' hidden states through the core's math) says so,
unsteered rows of a mixed batch stay bitwise base (logprobs compared exactly), the sampler and the logprobs see the
steered distribution, the stats carry the mean / max gate strength, and bad requests and checkpoints are refused
naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import BOOST_TOKEN, TINY_HIDDEN, TINY_VOCAB, make_llm, write_planted_generator

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["hello world", "the quick brown fox", "a b c d e"]
N = 12
# Small enough that the boost (~50 s) competes with the tiny model's own logits: some positions take the boosted
# token, some do not (checked below, so the test cannot pass vacuously).
MILD = 0.018


@pytest.fixture(scope="module")
def gen_path(tmp_path_factory) -> str:
    return write_planted_generator(tmp_path_factory.mktemp("gen") / "gen.safetensors")


@pytest.fixture(scope="module")
def llm(tiny_model_dir, gen_path):
    engine = make_llm(tiny_model_dir, {"logit_steering": {"checkpoint": gen_path}})
    yield engine
    del engine


def _sp(strength=None, **kw):
    from vllm import SamplingParams

    args = {} if strength is None else {"logit_steering": strength}
    kw = {"max_tokens": N, "temperature": 0.0, **kw}
    return SamplingParams(ignore_eos=True, extra_args=args or None, **kw)


def _run(llm, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _logprobs(outs) -> list[list[dict[int, float]]]:
    return [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]


@pytest.fixture(scope="module")
def base(llm):
    return _run(llm, _sp(logprobs=3))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, gen_path):
    """``(prompt ids, output ids, s) -> (steered logits [n, V], gate strength [n])`` at the positions that produced
    each output token, from transformers' final post-norm hidden states and the core's math."""
    from transformers import AutoModelForCausalLM

    from value_steer.core.logit_steer import load_logit_steer, logit_steer_rows

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).eval()
    gen = load_logit_steer(gen_path, hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB).generator

    def ref(prompt_ids: list[int], out_ids: list[int], s: float) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[*prompt_ids, *out_ids]])
        with torch.no_grad():
            res = model(ids, output_hidden_states=True)
            p, n = len(prompt_ids), len(out_ids)
            hidden = res.hidden_states[-1][0, p - 1 : p - 1 + n]
            logits = res.logits[0, p - 1 : p - 1 + n]
            return logit_steer_rows(hidden, logits, torch.full((n,), float(s)), *gen.weights(), gen.max_strength)

    return ref


def _check_against_reference(outs, ref, s: float) -> list[bool]:
    """Every generated token is the argmax of the reference's steered logits (up to fp32 noise between the two
    stacks); returns, per token, whether it is the boosted token."""
    boosted = []
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        steered, _ = ref(list(o.prompt_token_ids), toks, s)
        for i, t in enumerate(toks):
            assert float(steered[i, t]) >= float(steered[i].max()) - 1e-4, (o.prompt, i, t, int(steered[i].argmax()))
            boosted.append(t == BOOST_TOKEN)
    return boosted


def test_strength_zero_is_base(llm, base):
    for off in (0, 0.0, False, "off"):
        outs = _run(llm, _sp(off, logprobs=3))
        assert _tokens(outs) == _tokens(base)
        assert _logprobs(outs) == _logprobs(base)


def test_planted_generator_steers_as_the_reference_says(llm, base, reference):
    strong = _run(llm, _sp(4.0))
    assert all(_check_against_reference(strong, reference, 4.0))  # the boost wins everywhere
    mild = _run(llm, _sp(MILD))
    boosted = _check_against_reference(mild, reference, MILD)
    assert any(boosted) and not all(boosted), "the mild strength must take the boosted token at some positions only"
    assert _tokens(mild) != _tokens(base)
    # Base itself is the reference at s = 0.
    assert not any(_check_against_reference(base, reference, 0.0))


def test_mixed_batch_keeps_unsteered_rows_bitwise(llm, base):
    outs = _run(llm, [_sp(None, logprobs=3), _sp(4.0, logprobs=3), _sp(0, logprobs=3)])
    for i in (0, 2):
        assert _tokens(outs)[i] == _tokens(base)[i]
        assert _logprobs(outs)[i] == _logprobs(base)[i]  # exact: the op copies untouched rows bitwise
    # The steered row's logprobs are those of the steered distribution: the boosted token is (almost) certain.
    steered = outs[1].outputs[0]
    assert list(steered.token_ids) == [BOOST_TOKEN] * N
    assert all(step[BOOST_TOKEN].logprob > -1e-3 for step in steered.logprobs)


def test_random_sampling_draws_from_the_steered_distribution(llm):
    outs = _run(llm, [_sp(4.0, temperature=1.0, seed=s) for s in range(3)])
    assert _tokens(outs) == [[BOOST_TOKEN] * N] * 3
    # With a presence penalty the boosted token still wins: the penalty is applied to the steered logits (it would
    # be the other way round if steering came after the sampler's processing).
    outs = _run(llm, _sp(4.0, presence_penalty=2.0, frequency_penalty=2.0))
    assert _tokens(outs) == [[BOOST_TOKEN] * N] * 3


def test_stats_carry_the_gate_strength(llm, reference):
    outs = _run(llm, [_sp(1.0), _sp(None)], PROMPTS[:2])
    _run(llm, _sp(None, max_tokens=1), PROMPTS[:1])  # one more step, so the runner sees the finished ids
    stats = [llm.collective_rpc("value_steer_stats", args=(o.request_id,))[0]["stats"] for o in outs]
    assert stats[1]["logit_steering"] is None
    got = stats[0]["logit_steering"]
    _, gates = reference(list(outs[0].prompt_token_ids), list(outs[0].outputs[0].token_ids), 1.0)
    assert got["strength"] == 1.0 and got["num_steered"] == N
    assert got["mean_gate_strength"] == pytest.approx(float(gates.mean()), rel=1e-4)
    assert got["max_gate_strength"] == pytest.approx(float(gates.max()), rel=1e-4)
    assert float(gates.min()) < got["mean_gate_strength"] < got["max_gate_strength"] < 2.0


@pytest.mark.parametrize("value", [-1, 4.5, "strong", [1.0]])
def test_bad_request_values_are_refused_naming_the_field(llm, base, value):
    from vllm.exceptions import VLLMValidationError  # the offline engine's form of a 400

    with pytest.raises((ValueError, VLLMValidationError), match=r"logit_steering must be a strength multiplier"):
        _run(llm, _sp(value), PROMPTS[:1])
    assert _tokens(_run(llm, _sp(None, logprobs=3), PROMPTS[:1])) == _tokens(base)[:1]  # the engine keeps serving


def test_request_on_a_server_without_the_section_is_refused(monkeypatch, tmp_path):
    from vllm import SamplingParams

    from value_steer.core.config import RequestArgError
    from value_steer.patches.vllm_0_32.api import CONFIG_ENV, RequestArgsValidator

    monkeypatch.setenv(CONFIG_ENV, json.dumps({"steering": {}}))
    with pytest.raises(RequestArgError, match="logit_steering: this server has no 'logit_steering' section"):
        RequestArgsValidator.validate_params(SamplingParams(extra_args={"logit_steering": 1.0}))
    RequestArgsValidator.validate_params(SamplingParams(extra_args={"logit_steering": False}))  # off: fine


def test_checkpoint_that_does_not_fit_the_model_stops_start_up(tiny_model_dir, tmp_path):
    from value_steer.patches.vllm_0_32.worker import StartupError

    wide = write_planted_generator(tmp_path / "wide.safetensors", hidden_size=TINY_HIDDEN * 2)
    with pytest.raises(StartupError, match=r"logit_steering.checkpoint: .*hidden_size: .*128.*64"):
        make_llm(tiny_model_dir, {"logit_steering": {"checkpoint": wide}})
    other_vocab = write_planted_generator(tmp_path / "vocab.safetensors", vocab_size=TINY_VOCAB + 64)
    with pytest.raises(StartupError, match=r"logit_steering.checkpoint: .*vocab_size: .*576 logit columns.*512"):
        make_llm(tiny_model_dir, {"logit_steering": {"checkpoint": other_vocab}})
