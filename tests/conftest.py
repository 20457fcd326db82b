"""Shared test set-up: environment for CPU runs, the ``gpu`` marker."""

from __future__ import annotations

import os
from pathlib import Path

# Before any triton/vllm import: kernels run under the Triton interpreter on CPU-only machines,
# vLLM runs its CPU platform offline.
from value_steer.offline.assets import apply_vllm_cpu_env

apply_vllm_cpu_env("test")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny tensors on a shared 2-core machine: intra-op threads cost far more than they give.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with an offline tokenizer (shared by every engine test of the session)."""
    from value_steer.offline.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64, num_heads=2,
                           num_kv_heads=1, num_layers=2, seed=0)
