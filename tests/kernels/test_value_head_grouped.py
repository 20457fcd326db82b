"""value_head_grouped: reference vs a per-head loop of ``value_head_reference``; Triton launcher (interpreter on CPU)
vs the reference and vs the single-head launcher; the C++ op bitwise equal to the single-head op row by row; batch
invariance; opcheck; torch.compile; argument errors; (GPU) native Triton and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core.value_head import ValueHead, value_head_reference
from value_steer.kernels.value_head import BLOCK_M, prepare_value_head_weights, value_head_triton
from value_steer.kernels.value_head_grouped import (
    check_value_head_grouped_args,
    prepare_value_head_grouped_weights,
    value_head_grouped_reference,
    value_head_grouped_triton,
)

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")


def _heads(nh: int, h: int, seed: int = 0) -> list[ValueHead]:
    torch.manual_seed(seed)
    heads = [ValueHead(h) for _ in range(nh)]
    with torch.no_grad():  # larger weights than the default init, so tanh/relu are exercised
        for head in heads:
            for p in head.parameters():
                p.mul_(3.0)
    return heads


def _x(m: int, h: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, h, generator=g).to(dtype)


def _head_idx(m: int, used: list[int], pad: int = 0, seed: int = 2) -> torch.Tensor:
    """``[m + pad]`` int32: random heads from ``used`` for the first ``m``, then out-of-range junk (never read)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.tensor(used, dtype=torch.int32)[torch.randint(0, len(used), (m,), generator=g)]
    return torch.cat([pick, torch.full((pad,), 10_000, dtype=torch.int32)])


def _loop(x: torch.Tensor, head_idx: torch.Tensor, heads: list[ValueHead], fn=value_head_reference) -> torch.Tensor:
    """Independent per-row loop: row m through its own head with the single-head ``fn``."""
    rows = [fn(x[i : i + 1], *(w.detach() for w in heads[int(head_idx[i])].weights())) for i in range(x.shape[0])]
    return torch.cat(rows) if rows else torch.empty(0)


# (M, H, NH, heads used): M = 1, M not a multiple of BLOCK_M, one head, eight heads, unused heads.
CASES = [
    (1, 64, 1, [0]),
    (1, 64, 8, [5]),
    (7, 64, 3, [0, 1, 2]),
    (17, 96, 8, list(range(8))),
    (40, 64, 8, [1, 6]),
    (64, 64, 8, list(range(8))),
    (33, 576, 4, [0, 2, 3]),
]


# ---------------------------------------------------------------- weights and reference


def test_prepare_value_head_grouped_weights() -> None:
    heads = _heads(3, 32)
    w = prepare_value_head_grouped_weights(heads)
    assert [tuple(t.shape) for t in w] == [(3, 32, 32), (3, 32), (3, 32, 32), (3, 32), (3, 32), (3,)]
    assert all(t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad for t in w)
    for g, head in enumerate(heads):
        single = prepare_value_head_weights(head, torch.float32)
        for stacked, one in zip(w, single):
            assert torch.equal(stacked[g].reshape(-1), one.reshape(-1))
    wb = prepare_value_head_grouped_weights([h.weights() for h in heads], torch.bfloat16)
    assert [t.dtype for t in wb] == [torch.bfloat16, torch.float32, torch.bfloat16] + [torch.float32] * 3


def test_prepare_rejects_mixed_hidden_sizes() -> None:
    with pytest.raises(ValueError, match="head 2"):
        prepare_value_head_grouped_weights([*_heads(2, 32), ValueHead(48)])
    with pytest.raises(ValueError, match="at least one"):
        prepare_value_head_grouped_weights([])
    with pytest.raises(ValueError, match="head 0"):
        prepare_value_head_grouped_weights([_heads(1, 32)[0].weights()[:4]])
    with pytest.raises(ValueError):
        prepare_value_head_grouped_weights(_heads(2, 32), torch.int8)


@pytest.mark.parametrize(("m", "h", "nh", "used"), CASES)
def test_reference_matches_per_head_loop(m: int, h: int, nh: int, used: list[int]) -> None:
    heads = _heads(nh, h)
    x, idx = _x(m, h), _head_idx(m, used, pad=3)
    p = value_head_grouped_reference(x, idx, *prepare_value_head_grouped_weights(heads))
    torch.testing.assert_close(p, _loop(x, idx, heads), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- Triton launcher
# `device` (tests/conftest.py) is CUDA when present (native Triton) and CPU otherwise (interpreter).


@pytest.mark.parametrize(("m", "h", "nh", "used"), CASES)
def test_triton_matches_reference(m: int, h: int, nh: int, used: list[int], device: torch.device) -> None:
    w = prepare_value_head_grouped_weights([head.to(device) for head in _heads(nh, h)])
    x, idx = _x(m, h).to(device), _head_idx(m, used, pad=5).to(device)  # head_idx longer than M
    p = value_head_grouped_triton(x, idx, *w)
    torch.testing.assert_close(p, value_head_grouped_reference(x, idx, *w), rtol=0, atol=1e-5)


def test_triton_equals_single_head_launcher(device: torch.device) -> None:
    """Same tile loop and tile sizes as ``value_head_triton``: each row bitwise equal to it with its head."""
    heads = [head.to(device) for head in _heads(4, 96)]
    x, idx = _x(37, 96).to(device), _head_idx(37, [0, 1, 3]).to(device)
    p = value_head_grouped_triton(x, idx, *prepare_value_head_grouped_weights(heads))
    assert torch.equal(p, _loop(x, idx, heads, value_head_triton))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_triton_half_weights_and_inputs(w_dtype: torch.dtype, device: torch.device) -> None:
    heads = [head.to(device) for head in _heads(3, 64)]
    x, idx = _x(19, 64, torch.bfloat16).to(device), _head_idx(19, [0, 1, 2]).to(device)
    ref = value_head_grouped_reference(x, idx, *prepare_value_head_grouped_weights(heads))
    p = value_head_grouped_triton(x, idx, *prepare_value_head_grouped_weights(heads, torch.float32))
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-5)
    p = value_head_grouped_triton(x, idx, *prepare_value_head_grouped_weights(heads, w_dtype))
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-2)


def test_triton_strided_input(device: torch.device) -> None:
    w = prepare_value_head_grouped_weights([head.to(device) for head in _heads(2, 64)])
    x = _x(9, 128).to(device)[::2, 32:96]  # non-contiguous rows and an offset
    idx = _head_idx(5, [0, 1]).to(device)
    p = value_head_grouped_triton(x, idx, *w)
    torch.testing.assert_close(p, value_head_grouped_reference(x, idx, *w), rtol=0, atol=1e-5)


def test_triton_batch_invariance(device: torch.device) -> None:
    """A row's value is bitwise the same alone, in sub-batches and in a batch of 64 mixing 8 heads."""
    h = 96  # not a multiple of BLOCK_K: the masked tail is part of every row's reduction
    w = prepare_value_head_grouped_weights([head.to(device) for head in _heads(8, h)])
    x, idx = _x(64, h).to(device), _head_idx(64, list(range(8))).to(device)
    full = value_head_grouped_triton(x, idx, *w)
    for i in (0, 1, 15, 16, 63):
        assert torch.equal(value_head_grouped_triton(x[i : i + 1], idx[i : i + 1], *w), full[i : i + 1])
    assert torch.equal(value_head_grouped_triton(x[20:27], idx[20:27], *w), full[20:27])
    # Other rows' heads do not matter: the same rows with the rest of the batch moved to one head.
    other = idx.clone()
    other[32:] = 0
    assert torch.equal(value_head_grouped_triton(x, other, *w)[:32], full[:32])


def test_triton_tile_table_bound(device: torch.device) -> None:
    """Worst case for the fixed-size tile table: every head one row over a tile, all slots used."""
    nh, h = 3, 32
    m = nh * (BLOCK_M + 1)
    heads = [head.to(device) for head in _heads(nh, h)]
    idx = torch.arange(nh, dtype=torch.int32).repeat_interleave(BLOCK_M + 1).to(device)
    x = _x(m, h).to(device)
    p = value_head_grouped_triton(x, idx, *prepare_value_head_grouped_weights(heads))
    torch.testing.assert_close(p, _loop(x, idx, heads), rtol=0, atol=1e-5)


def test_triton_out_of_range_head_is_nan(device: torch.device) -> None:
    w = prepare_value_head_grouped_weights([head.to(device) for head in _heads(2, 32)])
    x = _x(5, 32).to(device)
    idx = torch.tensor([0, 2, 1, -1, 1], dtype=torch.int32, device=device)
    p = value_head_grouped_triton(x, idx, *w)
    assert torch.isnan(p[[1, 3]]).all()
    good = torch.tensor([0, 2, 4], device=device)
    torch.testing.assert_close(p[good], value_head_grouped_reference(x[good], idx[good], *w), rtol=0, atol=1e-5)


def test_triton_empty_batch(device: torch.device) -> None:
    w = prepare_value_head_grouped_weights([head.to(device) for head in _heads(2, 32)])
    idx = torch.empty(0, dtype=torch.int32, device=device)
    out = value_head_grouped_triton(torch.empty(0, 32, device=device), idx, *w)
    assert out.shape == (0,) and out.dtype == torch.float32


# ---------------------------------------------------------------- C++ op


@needs_ext
@pytest.mark.parametrize(("m", "nh"), [(1, 1), (1, 8), (7, 3), (64, 8), (257, 8), (64, 1)])
@pytest.mark.parametrize("h", [200, 576])
def test_cpp_bitwise_equals_single_head_op(m: int, nh: int, h: int) -> None:
    """Row m bitwise equal to ``value_head(x[m:m+1], <head head_idx[m]>)`` (the single-head C++ op)."""
    heads = _heads(nh, h)
    x, idx = _x(m, h), _head_idx(m, list(range(nh)), pad=4)
    p = value_steer.require_extension().value_head_grouped(x, idx, *prepare_value_head_grouped_weights(heads))
    assert torch.equal(p, _loop(x, idx, heads, ops.value_head))
    torch.testing.assert_close(p, _loop(x, idx, heads), rtol=0, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_cpp_half_weights_and_inputs(w_dtype: torch.dtype) -> None:
    heads = _heads(4, 576)
    x, idx = _x(23, 576, torch.bfloat16), _head_idx(23, [0, 1, 3])
    p = ops.value_head_grouped(x, idx, *prepare_value_head_grouped_weights(heads, w_dtype))
    single = [prepare_value_head_weights(head, w_dtype) for head in heads]
    expected = torch.cat([ops.value_head(x[i : i + 1], *single[int(idx[i])]) for i in range(23)])
    assert torch.equal(p, expected)
    torch.testing.assert_close(p, _loop(x, idx, heads), rtol=0, atol=1e-2)


@needs_ext
def test_cpp_sorted_path_and_strided_input() -> None:
    """Rows already in head order skip the gather; a strided x is read correctly either way."""
    heads = _heads(3, 64)
    w = prepare_value_head_grouped_weights(heads)
    x = _x(19, 128)[::2, 32:96]
    for idx in (torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2], dtype=torch.int32), _head_idx(10, [0, 1, 2])):
        p = ops.value_head_grouped(x, idx, *w)
        assert torch.equal(p, _loop(x, idx, heads, ops.value_head))


@needs_ext
def test_cpp_batch_and_thread_invariance() -> None:
    ext = value_steer.require_extension()
    w = prepare_value_head_grouped_weights(_heads(8, 200))  # H = 200 exercises the 16-lane tail
    x, idx = _x(64, 200), _head_idx(64, list(range(8)))
    full = ext.value_head_grouped(x, idx, *w)
    for i in (0, 3, 17, 63):
        assert torch.equal(ext.value_head_grouped(x[i : i + 1], idx[i : i + 1], *w), full[i : i + 1])
    assert torch.equal(ext.value_head_grouped(x[5:12], idx[5:12], *w), full[5:12])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(ext.value_head_grouped(x, idx, *w), full)
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_cpp_empty_batch() -> None:
    w = prepare_value_head_grouped_weights(_heads(2, 32))
    assert ops.value_head_grouped(torch.empty(0, 32), torch.empty(0, dtype=torch.int32), *w).shape == (0,)


@needs_ext
@pytest.mark.parametrize("bad", [2, -1])
def test_cpp_out_of_range_head_raises(bad: int) -> None:
    w = prepare_value_head_grouped_weights(_heads(2, 32))
    idx = torch.tensor([0, bad, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"head_idx\[1\]"):
        ops.value_head_grouped(_x(3, 32), idx, *w)


# ---------------------------------------------------------------- argument errors


def _bad_cases() -> list[tuple[str, tuple]]:
    w = prepare_value_head_grouped_weights(_heads(3, 32))
    x, idx = _x(4, 32), _head_idx(4, [0, 1, 2])
    w0, b0, w2, b2, w4, b4 = w
    return [
        ("head_idx", (x, idx.long(), *w)),  # wrong dtype
        ("head_idx", (x, idx[:3], *w)),  # shorter than M
        ("b0", (x, idx, w0, b0[:2], w2, b2, w4, b4)),  # NH mismatch
        ("w2", (x, idx, w0, b0, w2[:2], b2, w4, b4)),
        ("b4", (x, idx, w0, b0, w2, b2, w4, b4[:2])),
        ("w4", (x, idx, w0, b0, w2, b2, w4[:, :16], b4)),
        ("w0", (_x(4, 16), idx, *w)),  # H mismatch
        ("w0", (x, idx, w0, b0, w2.half(), b2, w4, b4)),  # w0/w2 dtypes differ
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_args_raise_naming_the_argument(case: int, monkeypatch: pytest.MonkeyPatch) -> None:
    name, args = _bad_cases()[case]
    with pytest.raises(ValueError, match=name):
        check_value_head_grouped_args(*args)
    with pytest.raises(ValueError, match=name):
        value_head_grouped_triton(*args)
    # The registered op: the C++ kernel's own checks (RuntimeError) where it is built, else the Python check.
    with pytest.raises((ValueError, RuntimeError), match=name):
        ops.value_head_grouped(*args)
    monkeypatch.setattr(value_steer._ext, "extension", lambda: None)
    with pytest.raises(ValueError, match=name):
        ops.value_head_grouped(*args)


# ---------------------------------------------------------------- custom op


@pytest.fixture(params=["ext", "reference"])
def cpu_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Once through the C++ extension, once through the torch-reference fallback."""
    if request.param == "ext" and not value_steer.has_extension():
        pytest.skip("value_steer._C not built")
    if request.param == "reference":
        monkeypatch.setattr(value_steer._ext, "extension", lambda: None)
    return request.param


def test_op_cpu_dispatch(cpu_impl: str) -> None:
    heads = _heads(8, 576)
    x, idx = _x(11, 576, torch.bfloat16), _head_idx(11, [0, 3, 7], pad=2)
    p = ops.value_head_grouped(x, idx, *prepare_value_head_grouped_weights(heads))
    torch.testing.assert_close(p, _loop(x, idx, heads), rtol=0, atol=1e-5)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(cpu_impl: str, w_dtype: torch.dtype) -> None:
    w = prepare_value_head_grouped_weights(_heads(3, 64), w_dtype)
    for x in (_x(5, 64), _x(3, 64, torch.bfloat16)):
        idx = _head_idx(x.shape[0], [0, 2], pad=2)
        result = torch.library.opcheck(torch.ops.value_steer.value_head_grouped.default, (x, idx, *w))
        assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inside_torch_compile(backend: str) -> None:
    """A scoring step traces through the fake impl without graph breaks, with a dynamic batch size, and matches
    eager."""
    w = prepare_value_head_grouped_weights(_heads(4, 48))

    def step(x, head_idx, w0, b0, w2, b2, w4, b4):
        p = ops.value_head_grouped(x, head_idx, w0, b0, w2, b2, w4, b4)
        return (p > 0.5).sum(), p * 2.0 - 1.0

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    for m in (7, 12):
        args = (_x(m, 48, seed=m), _head_idx(m, [0, 1, 3], pad=4, seed=m), *w)
        out = compiled(*args)
        expected = step(*args)
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 257])
@pytest.mark.parametrize("h", [576, 4096])
def test_gpu_triton_matches_loop(m: int, h: int) -> None:
    heads = [head.cuda() for head in _heads(8, h)]
    x, idx = _x(m, h, torch.bfloat16).cuda(), _head_idx(m, list(range(8)), pad=3).cuda()
    ref = _loop(x, idx, heads)
    p = ops.value_head_grouped(x, idx, *prepare_value_head_grouped_weights(heads))
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-5)
    wb = prepare_value_head_grouped_weights(heads, torch.bfloat16)
    torch.testing.assert_close(ops.value_head_grouped(x, idx, *wb), ref, rtol=0, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_gpu_batch_invariance(w_dtype: torch.dtype) -> None:
    w = prepare_value_head_grouped_weights([head.cuda() for head in _heads(8, 4096)], w_dtype)
    x, idx = _x(512, 4096, torch.bfloat16).cuda(), _head_idx(512, list(range(8))).cuda()
    full = value_head_grouped_triton(x, idx, *w)
    for i in (0, 1, 63, 64, 511):
        assert torch.equal(value_head_grouped_triton(x[i : i + 1], idx[i : i + 1], *w), full[i : i + 1])
    for n in (7, 64, 100):
        assert torch.equal(value_head_grouped_triton(x[:n], idx[:n], *w), full[:n])


@pytest.mark.gpu
def test_gpu_cuda_graph_matches_eager() -> None:
    """No host sync: the op captures in a CUDA graph and replays with new rows and new head assignments."""
    heads = [head.cuda() for head in _heads(8, 576)]
    w = prepare_value_head_grouped_weights(heads)
    x = torch.zeros(64, 576, device="cuda")
    idx = torch.zeros(80, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.value_head_grouped(x, idx, *w)  # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.value_head_grouped(x, idx, *w)
    for seed in (1, 2, 3):
        x.copy_(_x(64, 576, seed=seed))
        idx.copy_(_head_idx(64, list(range(seed * 2)), pad=16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ops.value_head_grouped(x, idx, *w))
