"""``value-steer train-qhead`` on the tiny model (issue 24): candidates from exact VFD's step records paired with the
captured states, a Q-head that fits them, its report, and a token-mode engine serving it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TINY_HIDDEN, TINY_VOCAB, make_llm, write_random_head
from value_steer.offline.qhead_training import CandidateData, qhead_report, train_qhead


def test_train_qhead_fits_planted_values():
    """A value that depends on the candidate token and the state: the Q-head learns it (AUROC near 1)."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2000, 8, generator=g)
    tokens = torch.randint(0, 20, (2000, 4), generator=g)
    values = torch.sigmoid(3.0 * (tokens < 5).float() - 1.5 + states[:, :1])  # tokens 0-4 are the bad ones
    data = CandidateData(states, tokens, values)
    head, history = train_qhead(data, 20, rank=4, epochs=30, lr=3e-2, batch=256, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    r = qhead_report(head, data, threshold=0.5, sign=1.0)
    assert r["auroc"] > 0.95 and r["spearman"] > 0.9 and r["calibration_error"] < 0.05


@pytest.mark.vllm
@pytest.mark.slow
def test_train_qhead_command_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    from vllm import SamplingParams

    from value_steer.core.qhead import load_qhead
    from value_steer.offline.cli import main

    monkeypatch.setenv("VALUE_STEER_DATA_DIR", str(tmp_path / "data"))
    head = write_random_head(tmp_path / "head.safetensors", TINY_HIDDEN, seed=0)
    out = tmp_path / "q.safetensors"
    assert main(["train-qhead", "--head", head, "--model", str(tiny_model_dir), "--n-train", "12", "--n-cal", "6",
                 "--num-candidates", "4", "--max-tokens", "8", "--rank", "4", "--epochs", "3", "--out", str(out)]) == 0
    ck = load_qhead(out, hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB)
    assert ck.threshold == 0.5 and ck.direction == "above"
    data = ck.training["data"]
    assert data["train_steps"] >= 12 * 6 and data["num_candidates"] == 4  # 7 steps a response, the first left out
    for split in ("train", "held_out"):
        assert set(ck.training["report"][split]) >= {"auroc", "spearman", "calibration_error", "n_tokens"}
        assert np.isfinite(ck.training["report"][split]["spearman"])
    assert ck.command.startswith("value-steer train-qhead --head ")
    llm = make_llm(tiny_model_dir, {"vfd": {"mode": "token", "qhead_path": str(out)}})
    o = llm.generate(["hello there"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    stats = llm.collective_rpc("value_steer_stats", args=(o.request_id,))[0]["stats"]
    assert stats["mode"] == "token" and stats["num_scored"] == 4
