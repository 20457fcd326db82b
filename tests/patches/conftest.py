"""Real-vLLM fixtures: a tiny random Llama with an offline tokenizer, planted value heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from value_steer.offline.assets import apply_vllm_cpu_env
from value_steer.offline.compat import write_constant_head

apply_vllm_cpu_env("test")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")

TINY_HIDDEN = 64

__all__ = ["TINY_HIDDEN", "make_llm", "write_constant_head", "write_random_head"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from value_steer.offline.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=TINY_HIDDEN, num_heads=2,
                           num_kv_heads=1, num_layers=2, seed=0)


def write_random_head(path: Path, hidden_size: int, seed: int = 0, threshold: float | None = 0.5) -> str:
    """A head with random weights (values vary with the hidden state)."""
    from value_steer.core.checkpoint import save_value_head
    from value_steer.core.value_head import ValueHead

    torch.manual_seed(seed)
    head = ValueHead(hidden_size)
    with torch.no_grad():
        head[4].weight.mul_(20.0)
    save_value_head(str(path), head, threshold=threshold, meta={"planted": f"random seed {seed}"})
    return str(path)


def make_llm(model_dir: Path, additional_config: dict | None, **kw):
    from value_steer.offline.engines import offline_llm

    return offline_llm(str(model_dir), additional_config, **{"max_model_len": 256, "max_num_seqs": 16, **kw})
