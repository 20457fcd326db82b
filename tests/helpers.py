"""Shared test helpers (engines, planted heads, servers). Imported as ``tests.helpers``; not a conftest."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

from value_steer.offline.compat import write_constant_head

TINY_HIDDEN = 64

__all__ = ["BOOST_TOKEN", "TINY_DOSE", "TINY_HIDDEN", "TINY_VOCAB", "make_llm", "wait_healthy", "write_constant_head",
           "write_planted_generator", "write_random_head"]

TINY_VOCAB = 512
# steering.max_relative_dose for the tiny random model's engines: its residual stream is tiny (norm ~0.16 per token),
# so the doses these tests use to make a visible change (|scale * v| ~ 300) are ~2000x it; real models' are not.
TINY_DOSE = None
# The token the planted logit generator boosts (not a special token: ids 0-3 are pad, bos, eos, unk).
BOOST_TOKEN = 300


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


def write_planted_generator(path: Path, hidden_size: int = TINY_HIDDEN, vocab_size: int = TINY_VOCAB,
                            token: int = BOOST_TOKEN, seed: int = 0) -> str:
    """A logit-steering generator whose effect a test can predict, rank 2, ``max_strength`` 2:

    - component 0 boosts ``token``: ``z_0 = h_0 + 50`` (``W_down[0] = e_0``, ``pos[0] = 50``), ``W_up[token, 0] = 1``,
      so ``token`` gains ``s * strength(h) * (h_0 + 50)``: about ``50 s`` (``token`` wins everywhere at ``s = 4``,
      only where the model's own logits are close at ``s ~ 0.02`` on the tiny test model);
    - component 1 is a small random direction of ``h`` (so ``v`` depends on the state);
    - the gate varies with ``h`` around ``max_strength / 2``.
    """
    from value_steer.core.logit_steer import LogitSteerGenerator, save_logit_steer

    torch.manual_seed(seed)
    gen = LogitSteerGenerator(hidden_size, vocab_size, rank=2, gate_hidden=4, max_strength=2.0)
    with torch.no_grad():
        gen.w_down.zero_()
        gen.w_down[0, 0] = 1.0
        gen.w_down[1, 1:] = torch.randn(hidden_size - 1) / hidden_size**0.5
        gen.pos.zero_()
        gen.pos[0] = 50.0
        gen.w_up.zero_()
        gen.w_up[token, 0] = 1.0
        gen.w_up[:, 1] = torch.randn(vocab_size) * 0.05
        gen.gate_w1.mul_(2.0)
        gen.gate_w2.copy_(torch.randn(4))
    save_logit_steer(str(path), gen, training={"planted": f"boosts token {token}"})
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
