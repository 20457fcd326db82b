"""Shared test helpers (engines, planted heads, servers). Imported as ``tests.helpers``; not a conftest."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

from value_steer.offline.compat import write_constant_head

TINY_HIDDEN = 64

__all__ = ["TINY_HIDDEN", "make_llm", "wait_healthy", "write_constant_head", "write_random_head"]


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
    """An offline engine on the tiny model with value_steer's worker (``offline_llm`` defaults)."""
    from value_steer.offline.engines import offline_llm

    return offline_llm(str(model_dir), additional_config, **{"max_model_len": 256, "max_num_seqs": 16, **kw})


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 300) -> None:
    """Poll ``url/health`` until 200; raise with the server log's tail if it exits or times out."""
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
