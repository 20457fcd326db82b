"""value-steer vectors, the pure parts: difference of means, the probe, the gate's conformal threshold, the
layer choice (synthetic streams with a planted sentiment direction)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from value_steer.offline.vectors import calibrate_gate, choose_layer, difference_of_means, train_probe

H = 16


def _planted(n: int, seed: int, shift: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(H)
    direction[0] = 1.0
    labels = (torch.rand(n, generator=g) < 0.5).numpy().astype(np.int64)
    streams = []
    for lab in labels:
        t = int(torch.randint(3, 9, (1,), generator=g))
        x = torch.randn(t, H, generator=g)
        x[:, 0] += -shift if lab else shift  # negative responses sit on the negative side
        streams.append(x)
    return streams, labels, direction


def test_difference_of_means_points_to_positive():
    streams, labels, direction = _planted(200, 0)
    d, facts = difference_of_means(streams, labels)
    assert float(d @ direction) / float(d.norm()) > 0.95
    assert abs(facts["diff_norm"] - 6.0) < 0.6 and facts["n_positive"] + facts["n_negative"] == 200


def test_probe_separates_and_gate_is_conformal():
    streams, labels, direction = _planted(300, 1)
    w, b, auc = train_probe(streams, labels, seed=0, steps=200)
    assert auc > 0.95
    assert float(w @ direction) < 0  # the probe scores negativity
    cal_streams, cal_labels, _ = _planted(300, 2)
    rec = calibrate_gate(w, b, cal_streams, cal_labels, tau=0.1)
    assert rec["open_rate_safe"] <= 0.1 + 1e-9 and rec["open_rate_undesirable"] > 0.8
    # The gate's threshold on h . w matches the probability threshold: sigmoid(h.w + b) >= q <=> h.w >= thr.
    q = rec["threshold"]
    assert math.isclose(rec["gate_threshold"], math.log(q / (1 - q)) - b, rel_tol=1e-9)


def test_choose_layer_respects_the_budget():
    sweep = {"base": {"undesirable": 0.5, "perplexity": 4.0},
             "3": {"undesirable": 0.2, "perplexity": 5.0},  # best cut, over budget
             "6": {"undesirable": 0.3, "perplexity": 4.3},
             "9": {"undesirable": 0.4, "perplexity": 4.1}}
    assert choose_layer(sweep, 0.10) == 6
    assert choose_layer(sweep, 0.01) == 9  # nothing within budget: the lowest perplexity


@pytest.mark.vllm
@pytest.mark.slow
def test_layer_sweep_rescores_under_the_unsteered_model(tiny_model_dir):
    """The sweep's rows through the serving path: an add of scale 0 samples the base's tokens (same seeds), so
    its rescored perplexity equals the base row's exactly; a large add changes the text and so its perplexity
    under the unsteered model."""
    pytest.importorskip("vllm")
    from value_steer.offline.tasks.sentiment import sample_prompts
    from value_steer.offline.vectors import layer_sweep

    prompts = sample_prompts("calibration", 4, 0)
    d = torch.zeros(64)
    d[0] = 1.0
    zero = layer_sweep(str(tiny_model_dir), prompts, {1: d}, coef=0.0, max_tokens=8, seed=0)
    assert set(zero) == {"base", "1"} and zero["base"]["n"] == 4
    assert math.isfinite(zero["base"]["perplexity"]) and zero["base"]["perplexity"] > 1.0
    assert zero["1"]["perplexity"] == zero["base"]["perplexity"]
    big = layer_sweep(str(tiny_model_dir), prompts, {1: d}, coef=500.0, max_tokens=8, seed=0)
    assert big["base"]["perplexity"] == zero["base"]["perplexity"]
    assert big["1"]["perplexity"] != big["base"]["perplexity"]
