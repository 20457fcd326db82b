"""value_head: architecture, key names, math against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from value_steer.core.value_head import (
    STATE_DICT_KEYS,
    ValueHead,
    expected_shapes,
    value_head_logit_reference,
    value_head_reference,
)


def _np_weights(h: int, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "0.weight": rng.normal(scale=scale, size=(h, h)),
        "0.bias": rng.normal(scale=scale, size=h),
        "2.weight": rng.normal(size=(h, h)) / np.sqrt(h),
        "2.bias": rng.normal(size=h) * 0.1,
        "4.weight": rng.normal(size=(1, h)) / np.sqrt(h),
        "4.bias": rng.normal(size=1),
    }


def _np_logit(x: np.ndarray, w: dict[str, np.ndarray], act1=np.tanh) -> np.ndarray:
    x = x.astype(np.float64)
    h1 = act1(x @ w["0.weight"].T + w["0.bias"])
    h2 = np.maximum(h1 @ w["2.weight"].T + w["2.bias"], 0.0)
    return (h2 @ w["4.weight"].T + w["4.bias"]).reshape(-1)


def _head_from(w: dict[str, np.ndarray]) -> ValueHead:
    head = ValueHead(w["0.weight"].shape[0])
    head.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in w.items()})
    return head


def _torch_weights(w: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(w[k], dtype=torch.float32) for k in STATE_DICT_KEYS)


def test_state_dict_keys_and_shapes() -> None:
    head = ValueHead(7)
    sd = head.state_dict()
    assert tuple(sd) == STATE_DICT_KEYS == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(7)
    assert expected_shapes(3) == {
        "0.weight": (3, 3),
        "0.bias": (3,),
        "2.weight": (3, 3),
        "2.bias": (3,),
        "4.weight": (1, 3),
        "4.bias": (1,),
    }
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert isinstance(head[1], torch.nn.Tanh) and isinstance(head[3], torch.nn.ReLU)


@pytest.mark.parametrize("bad", [0, -3, 2.0, "8"])
def test_invalid_hidden_size(bad: object) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        ValueHead(bad)  # type: ignore[arg-type]


def test_reference_matches_numpy_and_needs_tanh() -> None:
    h = 16
    w = _np_weights(h, seed=1, scale=1.5)  # large pre-activations: tanh saturates, so it matters
    x = np.random.default_rng(2).normal(size=(40, h))
    expected = _np_logit(x, w)
    got = value_head_logit_reference(torch.tensor(x, dtype=torch.float32), *_torch_weights(w))
    assert got.dtype == torch.float32 and got.shape == (40,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    # An implementation without the tanh (relu-only, or identity first activation) must be detectably wrong.
    relu_only = _np_logit(x, w, act1=lambda a: np.maximum(a, 0.0))
    identity = _np_logit(x, w, act1=lambda a: a)
    assert np.abs(relu_only - expected).max() > 0.1
    assert np.abs(identity - expected).max() > 0.1
    # sigmoid polarity: p = sigmoid(+logit), not sigmoid(-logit)
    p = value_head_reference(torch.tensor(x, dtype=torch.float32), *_torch_weights(w)).numpy()
    np.testing.assert_allclose(p, 1.0 / (1.0 + np.exp(-expected)), rtol=1e-5, atol=1e-6)


def test_sigmoid_polarity_with_large_bias() -> None:
    w = _np_weights(4, seed=3)
    w["4.bias"] = np.array([20.0])
    w["4.weight"] = np.zeros((1, 4))
    head = _head_from(w)
    x = torch.randn(5, 4)
    assert torch.all(head.p(x) > 0.999)
    assert torch.all(head.logit(x) == 20.0)
    w["4.bias"] = np.array([-20.0])
    assert torch.all(_head_from(w).p(x) < 0.001)


def test_module_matches_reference_and_numpy() -> None:
    h = 12
    w = _np_weights(h, seed=4)
    head = _head_from(w)
    x = np.random.default_rng(5).normal(size=(2, 3, h))
    z = head(torch.tensor(x, dtype=torch.float32))
    assert z.shape == (2, 3) and z.dtype == torch.float32
    np.testing.assert_allclose(z.detach().numpy().reshape(-1), _np_logit(x.reshape(-1, h), w), rtol=1e-4, atol=1e-5)
    assert torch.equal(head.logit(torch.tensor(x, dtype=torch.float32)), z)
    p = head.p(torch.tensor(x, dtype=torch.float32))
    assert torch.allclose(p, torch.sigmoid(z))
    assert bool(((p > 0) & (p < 1)).all())
    # the module's weights() are in kernel order
    assert [t.shape for t in head.weights()] == [torch.Size(s) for s in expected_shapes(h).values()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_input_is_cast_to_fp32(dtype: torch.dtype) -> None:
    h = 8
    w = _np_weights(h, seed=6)
    head = _head_from(w)
    x = torch.randn(10, h).to(dtype)
    z = head.logit(x)
    assert z.dtype == torch.float32
    # exactly the fp32 computation on the upcast input (not a computation in the low precision)
    assert torch.equal(z, head.logit(x.float()))
    np.testing.assert_allclose(z.detach().numpy(), _np_logit(x.float().numpy(), w), rtol=1e-4, atol=1e-5)
    assert head.p(x).dtype == torch.float32


def test_reference_accepts_flat_w4_and_low_precision_weights() -> None:
    h = 6
    w = _np_weights(h, seed=7)
    x = torch.randn(3, h)
    ws = list(_torch_weights(w))
    base = value_head_logit_reference(x, *ws)
    ws_flat = list(ws)
    ws_flat[4] = ws[4].reshape(-1)
    assert torch.equal(value_head_logit_reference(x, *ws_flat), base)
    half = [t.half() for t in ws]
    out = value_head_logit_reference(x, *half)
    assert out.dtype == torch.float32
    assert torch.equal(out, value_head_logit_reference(x, *[t.float() for t in half]))


def test_hidden_size_mismatch_raises() -> None:
    head = ValueHead(8)
    with pytest.raises(ValueError, match="hidden size 8"):
        head.logit(torch.randn(2, 9))
