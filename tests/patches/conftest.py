"""Real-vLLM fixtures: a tiny random Llama with an offline tokenizer, planted value heads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from value_steer.compat import write_constant_head

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")

TINY_HIDDEN = 64

__all__ = ["TINY_HIDDEN", "make_llm", "write_constant_head", "write_random_head"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from value_steer.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=TINY_HIDDEN, num_heads=2,
                           num_kv_heads=1, num_layers=2, seed=0)


def write_random_head(path: Path, hidden_size: int, seed: int = 0, threshold: float | None = 0.5) -> str:
    """A head with random weights (values vary with the hidden state)."""
    from value_steer.checkpoint import save_value_head
    from value_steer.value_head import ValueHead

    torch.manual_seed(seed)
    head = ValueHead(hidden_size)
    with torch.no_grad():
        head[4].weight.mul_(20.0)
    save_value_head(str(path), head, threshold=threshold, meta={"planted": f"random seed {seed}"})
    return str(path)


def make_llm(model_dir: Path, additional_config: dict | None, **kw):
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=16,
        seed=0,
        worker_cls="value_steer.worker.ValueSteerWorker",
        additional_config=additional_config or {},
        logits_processors=["value_steer.patches.vllm_0_32:RequestArgsValidator"],
    )
    args.update(kw)
    return LLM(**args)
