"""value_head: Triton launcher (interpreter on CPU), C++ op and custom op vs ``value_head_reference``."""

from __future__ import annotations

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core.value_head import ValueHead, value_head_reference
from value_steer.kernels.value_head import prepare_value_head_weights, value_head_triton

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")


def _head(h: int, seed: int = 0) -> ValueHead:
    torch.manual_seed(seed)
    head = ValueHead(h)
    with torch.no_grad():  # larger weights than the default init, so tanh/relu are exercised
        for p in head.parameters():
            p.mul_(3.0)
    return head


def _weights(head: ValueHead) -> tuple[torch.Tensor, ...]:
    return tuple(w.detach() for w in head.weights())


def _x(m: int, h: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, h, generator=g).to(dtype)


# ---------------------------------------------------------------- Triton launcher
# `device` (tests/conftest.py) is CUDA when present (native Triton) and CPU otherwise (interpreter).

TRITON_SHAPES = [(1, 64), (7, 64), (64, 64), (257, 64), (1, 576), (7, 576), (64, 576)]


@pytest.mark.parametrize(("m", "h"), TRITON_SHAPES)
def test_triton_fp32_weights_match_reference(m: int, h: int, device: torch.device) -> None:
    w = _weights(_head(h).to(device))
    x = _x(m, h, torch.float32).to(device)
    torch.testing.assert_close(value_head_triton(x, *w), value_head_reference(x, *w), rtol=0, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs(x_dtype: torch.dtype, device: torch.device) -> None:
    w = _weights(_head(64).to(device))
    x = _x(7, 64, x_dtype).to(device)
    torch.testing.assert_close(value_head_triton(x, *w), value_head_reference(x, *w), rtol=0, atol=1e-5)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "h"), [(7, 64), (7, 576)])
def test_triton_half_weights(w_dtype: torch.dtype, m: int, h: int, device: torch.device) -> None:
    head = _head(h).to(device)
    x = _x(m, h, torch.bfloat16).to(device)
    p = value_head_triton(x, *prepare_value_head_weights(head, w_dtype))
    torch.testing.assert_close(p, value_head_reference(x, *_weights(head)), rtol=0, atol=1e-2)


def test_triton_strided_input(device: torch.device) -> None:
    w = _weights(_head(64).to(device))
    big = _x(9, 128, torch.float32).to(device)
    x = big[::2, 32:96]  # non-contiguous rows and an offset
    torch.testing.assert_close(value_head_triton(x, *w), value_head_reference(x, *w), rtol=0, atol=1e-5)


def test_triton_batch_invariance(device: torch.device) -> None:
    """A row's value is bitwise identical alone, in sub-batches and in a batch of 512."""
    h = 96  # not a multiple of BLOCK_K: the masked tail is part of every row's reduction
    w = _weights(_head(h).to(device))
    x = _x(512, h, torch.float32).to(device)
    full = value_head_triton(x, *w)
    for i in (0, 1, 15, 16, 255, 511):
        assert torch.equal(value_head_triton(x[i : i + 1], *w), full[i : i + 1])
    assert torch.equal(value_head_triton(x[100:107], *w), full[100:107])


def test_triton_empty_batch(device: torch.device) -> None:
    w = _weights(_head(64).to(device))
    out = value_head_triton(torch.empty(0, 64, device=device), *w)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_bad_shapes_raise() -> None:
    w = _weights(_head(64))
    with pytest.raises(ValueError):
        value_head_triton(torch.randn(3, 32), *w)
    with pytest.raises(ValueError):
        value_head_triton(torch.randn(3, 64), w[0], w[1], w[2].half(), *w[3:])


def test_prepare_value_head_weights() -> None:
    head = _head(64)
    w = prepare_value_head_weights(head, torch.bfloat16)
    assert [t.dtype for t in w] == [torch.bfloat16, torch.float32, torch.bfloat16] + [torch.float32] * 3
    assert [tuple(t.shape) for t in w] == [(64, 64), (64,), (64, 64), (64,), (64,), (1,)]
    assert all(t.is_contiguous() and not t.requires_grad for t in w)
    assert torch.equal(prepare_value_head_weights(head.weights(), torch.float32)[0], head[0].weight.detach())
    with pytest.raises(ValueError):
        prepare_value_head_weights(head, torch.int8)


# ---------------------------------------------------------------- C++ op

CPP_SHAPES = [(1, 64), (7, 64), (64, 576), (257, 576), (1024, 64), (1, 4096), (7, 4096)]


@needs_ext
@pytest.mark.parametrize(("m", "h"), CPP_SHAPES)
def test_cpp_fp32_weights_match_reference(m: int, h: int) -> None:
    ext = value_steer.require_extension()
    w = _weights(_head(h))
    x = _x(m, h, torch.float32)
    torch.testing.assert_close(ext.value_head(x, *w), value_head_reference(x, *w), rtol=0, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_dtypes(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    ext = value_steer.require_extension()
    head = _head(576)
    x = _x(7, 576, x_dtype)
    p = ext.value_head(x, *prepare_value_head_weights(head, w_dtype))
    atol = 1e-5 if w_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(p, value_head_reference(x, *_weights(head)), rtol=0, atol=atol)


@needs_ext
def test_cpp_batch_and_thread_invariance() -> None:
    ext = value_steer.require_extension()
    h = 200  # exercises the 16-lane tail
    w = _weights(_head(h))
    x = _x(512, h, torch.float32)
    full = ext.value_head(x, *w)
    for i in (0, 3, 17, 100, 511):
        assert torch.equal(ext.value_head(x[i : i + 1], *w), full[i : i + 1])
    assert torch.equal(ext.value_head(x[5:12], *w), full[5:12])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ext.value_head(x, *w), full)
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_cpp_empty_and_strided() -> None:
    ext = value_steer.require_extension()
    w = _weights(_head(64))
    assert ext.value_head(torch.empty(0, 64), *w).shape == (0,)
    x = _x(9, 128, torch.float32)[::2, 32:96]
    torch.testing.assert_close(ext.value_head(x, *w), value_head_reference(x, *w), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- custom op (CPU dispatch)


@pytest.mark.parametrize("use_ext", [True, False])
def test_op_cpu_dispatch(use_ext: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if use_ext and not value_steer.has_extension():
        pytest.skip("value_steer._C not built")
    if not use_ext:
        monkeypatch.setattr(value_steer._ext, "extension", lambda: None)
    head = _head(4096)
    x = _x(1, 4096, torch.bfloat16)
    torch.testing.assert_close(ops.value_head(x, *head.weights()), head.p(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 257, 512])
@pytest.mark.parametrize("h", [576, 4096])
def test_gpu_triton_matches_reference(m: int, h: int) -> None:
    head = _head(h).cuda()
    w = _weights(head)
    x = _x(m, h, torch.bfloat16).cuda()
    ref = value_head_reference(x, *w)
    torch.testing.assert_close(ops.value_head(x, *w), ref, rtol=0, atol=1e-5)
    wb = prepare_value_head_weights(head, torch.bfloat16)
    torch.testing.assert_close(ops.value_head(x, *wb), ref, rtol=0, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_gpu_batch_invariance(w_dtype: torch.dtype) -> None:
    head = _head(4096).cuda()
    w = prepare_value_head_weights(head, w_dtype)
    x = _x(512, 4096, torch.bfloat16).cuda()
    full = value_head_triton(x, *w)
    for i in (0, 1, 63, 64, 511):
        assert torch.equal(value_head_triton(x[i : i + 1], *w), full[i : i + 1])
    for n in (7, 64, 100):
        assert torch.equal(value_head_triton(x[:n], *w), full[:n])
