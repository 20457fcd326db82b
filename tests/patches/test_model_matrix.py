"""The model matrix (issue 23): every section of the plugin on tiny random models of each family vLLM users serve.

One engine per family (eager; compiled for Llama, Qwen3 and Gemma 3), made from transformers' own config and model
classes (``value_steer.offline.models.make_tiny_model``: 2 layers, H=64, real layouts), with VFD, activation
steering, logit steering and capture on. Per family:

- VFD: never-intervening (threshold 1) gives the base tokens; always-intervening (threshold 0) commits the
  argmin-value candidate at every step;
- add 0 / ablate 1 / cap with bounds no stream reaches, and logit steering at strength 0, give base logprobs exactly;
- add, cap and ablate at layer 0 edit the residual stream as the core references say on transformers' model of the
  same folder (forward hooks on the same layer; compared on the streams captured at layers 0 and 1);
- the value head's input (decode capture) is transformers' final normed hidden state;
- logit steering at strength s gives the reference's log-probabilities (transformers' logits, steered by the core
  reference on its final hidden state);
- capture shapes: ``[T, H]`` rows per layer and per scored token.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import TINY_HIDDEN, make_llm, write_planted_generator, write_random_head
from value_steer.offline.models import TINY_FAMILIES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

H = TINY_HIDDEN
K = 4
COMPILED = ("llama", "qwen3", "gemma3")
PROMPTS = ["hello world, this is a test of the model", "the quick brown fox jumps over the lazy dog again"]
# Longer than the Gemma models' 16-token window, so sliding-window layers matter.
LONG = " ".join(f"word{i}" for i in range(30))


@dataclass
class Family:
    name: str
    model_dir: Path
    llm: Any
    capture_dir: Path
    generator: str
    _hf: Any = None

    @property
    def hf(self) -> Any:
        """transformers' model of the same folder (fp32, eval), loaded on first use."""
        if self._hf is None:
            from transformers import AutoModelForCausalLM
            from vllm.config import CompilationConfig, ModelConfig, VllmConfig, set_current_vllm_config
            from vllm.config.compilation import CompilationMode

            # vLLM's Transformers backend (OLMo 2 here) decorates the HF model class for its own compilation; under
            # a config with compilation off the class builds and runs as plain transformers. Eager attention: the
            # implementation transformers documents for Gemma 2's attention-logit soft-capping (SDPA has none).
            config = VllmConfig(model_config=ModelConfig(model=str(self.model_dir), dtype="float32"),
                                compilation_config=CompilationConfig(mode=CompilationMode.NONE))
            with set_current_vllm_config(config):
                self._hf = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        return self._hf


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def fam(request, tmp_path_factory):
    from value_steer.offline.models import make_tiny_model

    name = request.param
    root = tmp_path_factory.mktemp(f"matrix-{name}")
    model_dir = make_tiny_model(name, root / "model", init_std=0.5 if name != "granite" else 0.2)
    head = write_random_head(root / "head.safetensors", H, seed=1)
    gen = write_planted_generator(root / "gen.safetensors")
    capture_dir = root / "capture"
    old = os.environ.get("VALUE_STEER_DEBUG")
    os.environ["VALUE_STEER_DEBUG"] = "1"  # the VFD runner keeps each step's candidates and values
    try:
        llm = make_llm(model_dir, {"vfd": {"value_head_path": head, "num_candidates": K, "threshold": 0.5},
                                   "steering": {"max_relative_dose": None},
                                   "logit_steering": {"checkpoint": gen},
                                   "capture": {"dir": str(capture_dir)}},
                       enforce_eager=name not in COMPILED, block_size=32, enable_prefix_caching=False)
    finally:
        if old is None:
            os.environ.pop("VALUE_STEER_DEBUG", None)
        else:
            os.environ["VALUE_STEER_DEBUG"] = old
    f = Family(name, model_dir, llm, capture_dir, gen)
    yield f
    del f.llm, llm


def _sp(max_tokens: int = 12, **kw: Any) -> Any:
    from vllm import SamplingParams

    kw.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def _off(**extra: Any) -> dict[str, Any]:
    return {"value_steer": False, **extra}


def _rows(directory: Path, request_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [n], hidden [n, H])`` a request wrote under ``directory``, in position order."""
    from safetensors.torch import load_file

    index = [json.loads(line) for line in (directory / "requests.jsonl").read_text().splitlines()]
    seq = [r["seq_id"] for r in index if r["request_id"] == request_id or r["request_id"].startswith(request_id + "-")]
    assert len(seq) == 1, f"{request_id}: {len(seq)} capture entries"
    shards = [load_file(str(p)) for p in sorted(directory.glob("shard-*.safetensors"))]
    sel = torch.cat([t["seq_id"] for t in shards]) == seq[0]
    pos = torch.cat([t["position"] for t in shards])[sel]
    hidden = torch.cat([t["hidden"] for t in shards])[sel]
    order = torch.argsort(pos)
    return pos[order], hidden[order]


def _logprobs(out: Any) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs]


def test_vfd_never_intervening_is_base_and_always_intervening_commits_argmin(fam):
    llm = fam.llm
    prompts = [*PROMPTS, LONG]
    base = llm.generate(prompts, _sp(20, extra_args=_off()), use_tqdm=False)
    never = llm.generate(prompts, _sp(20, extra_args={"threshold": 1.0}), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in never] == [o.outputs[0].token_ids for o in base]
    always = llm.generate(prompts, _sp(20, extra_args={"threshold": 0.0}), use_tqdm=False)
    dbg = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]
    changed = 0
    for o in always:
        steps = [v for k, v in dbg["steps"].items() if k.startswith(o.request_id + "-") or k == o.request_id]
        assert len(steps) == 1
        steps = steps[0]
        assert [s["winner_token"] for s in steps] == list(o.outputs[0].token_ids)
        for s in steps:
            vals = s["values"]
            assert len(vals) == K and all(math.isfinite(v) for v in vals)
            assert s["winner_col"] == min(range(K), key=lambda k: (vals[k], k))
            changed += s["winner_col"] != 0
    assert changed > 0


def test_neutral_ops_and_zero_logit_strength_give_base_logprobs(fam):
    from value_steer.core.steering_spec import Steering, ablate, add, cap

    llm = fam.llm
    v = np.random.RandomState(3).randn(H).astype(np.float32).tolist()
    neutral = Steering([add(0, v, 0.0), ablate(1, v, 1.0), cap(0, v, min=-1e30, max=1e30)]).to_dict()
    outs = llm.generate([PROMPTS[0]] * 3, [_sp(8, logprobs=5, extra_args=_off()),
                                           _sp(8, logprobs=5, extra_args=_off(steering=neutral)),
                                           _sp(8, logprobs=5, extra_args=_off(logit_steering=0.0))], use_tqdm=False)
    base = outs[0]
    for o in outs[1:]:
        assert o.outputs[0].token_ids == base.outputs[0].token_ids
        assert _logprobs(o) == _logprobs(base)
    # And a large add changes them (the op reaches the model).
    big = Steering([add(0, v, 20.0)]).to_dict()
    moved = llm.generate([PROMPTS[0]], _sp(8, logprobs=5, extra_args=_off(steering=big)), use_tqdm=False)[0]
    assert _logprobs(moved) != _logprobs(base)


def _hf_streams(hf: Any, ids: list[int], edit: Any) -> list[torch.Tensor]:
    """transformers' residual stream after each decoder layer ``[T, H]``, with ``edit`` applied to layer 0's output
    (a forward hook on the same layer vLLM wraps)."""
    layers = hf.model.layers
    outs: list[torch.Tensor] = []

    def edit_hook(_m: Any, _i: Any, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        edited = edit(hidden[0]).unsqueeze(0).to(hidden.dtype)
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    def keep_hook(_m: Any, _i: Any, out: Any) -> None:
        outs.append((out[0] if isinstance(out, tuple) else out)[0].detach().float())

    handles = [layers[0].register_forward_hook(edit_hook)]
    handles += [layer.register_forward_hook(keep_hook) for layer in layers]
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.mark.parametrize("op", ["add", "cap", "ablate"])
def test_ops_edit_the_stream_as_transformers_says(fam, op):
    from value_steer.core.activation import ablate as ablate_ref
    from value_steer.core.activation import add as add_ref
    from value_steer.core.activation import projection_cap as cap_ref
    from value_steer.core.steering_spec import Steering, ablate, add, cap

    llm = fam.llm
    prompt = PROMPTS[1]
    ids = llm.get_tokenizer().encode(prompt)
    base_stream = _hf_streams(fam.hf, ids, lambda x: x)[0]
    v = torch.from_numpy(np.random.RandomState(5).randn(H).astype(np.float32))
    u = v / v.norm()
    scale = float(base_stream.norm(dim=-1).median()) / float(v.norm())  # an add as large as the stream
    bound = float((base_stream @ u).median())  # a cap that binds on about half the tokens
    spec, ref = {
        "add": (add(0, v.tolist(), scale), lambda x: add_ref(x, v, scale)),
        "cap": (cap(0, v.tolist(), max=bound), lambda x: cap_ref(x, v, max=bound)),
        "ablate": (ablate(0, v.tolist(), 0.0), lambda x: ablate_ref(x, v, 0.0)),
    }[op]
    out = llm.generate([{"prompt_token_ids": ids}],
                       _sp(1, extra_args=_off(steering=Steering([spec]).to_dict(), capture_layers=[0, 1])),
                       use_tqdm=False)[0]
    llm.collective_rpc("value_steer_flush_capture")
    want = _hf_streams(fam.hf, ids, ref)
    for layer in (0, 1):
        pos, got = _rows(fam.capture_dir / f"layer-{layer:02d}", out.request_id)
        assert got.shape == (len(ids), H) and pos.tolist() == list(range(len(ids)))  # capture shape: [T, H]
        torch.testing.assert_close(got, want[layer], atol=2e-3, rtol=2e-3, msg=f"{op} at layer {layer}")
    assert not torch.allclose(want[0], base_stream, atol=1e-3)  # the op did edit the stream


def test_value_head_input_is_transformers_final_normed_state(fam):
    llm = fam.llm
    n = 8
    out = llm.generate([PROMPTS[0]], _sp(n, extra_args=_off(value_steer_capture=True)), use_tqdm=False)[0]
    llm.collective_rpc("value_steer_flush_capture")
    pos, hidden = _rows(fam.capture_dir, out.request_id)
    p0 = len(out.prompt_token_ids)
    assert pos.tolist() == list(range(p0, p0 + n - 1)) and hidden.shape == (n - 1, H)
    ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
    with torch.no_grad():
        ref = fam.hf.model(torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(hidden, ref[pos], atol=2e-3, rtol=2e-3)


def test_logit_steering_matches_the_reference(fam):
    from value_steer.core.logit_steer import load_logit_steer, logit_steer_row

    llm = fam.llm
    s = 0.05
    out = llm.generate([PROMPTS[0]], _sp(4, logprobs=10, extra_args=_off(logit_steering=s)), use_tqdm=False)[0]
    gen = load_logit_steer(fam.generator, hidden_size=H, vocab_size=512).generator
    ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
    p0 = len(out.prompt_token_ids)
    with torch.no_grad():
        res = fam.hf(torch.tensor([ids]), output_hidden_states=True)
        last = fam.hf.model(torch.tensor([ids])).last_hidden_state[0]
    for j, step in enumerate(_logprobs(out)):
        row = p0 - 1 + j
        steered, _ = logit_steer_row(last[row], res.logits[0, row].float(), s, gen)
        ref = torch.log_softmax(steered.double(), dim=-1)
        assert out.outputs[0].token_ids[j] == int(ref.argmax())
        for tok, lp in step.items():
            assert abs(lp - float(ref[tok])) < 2e-3, (j, tok)
