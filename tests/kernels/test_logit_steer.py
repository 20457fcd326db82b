"""logit_steer: every implementation (torch reference, C++ ext, Triton (interpreter on CPU), the custom op) against
an independent per-row loop over single vectors; bitwise passthrough of untouched rows and padded columns; opcheck;
torch.compile; (GPU) native Triton and CUDA-graph replay."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core.logit_steer import LogitSteerGenerator
from value_steer.kernels.logit_steer import (
    logit_steer_reference,
    logit_steer_triton,
    prepare_logit_steer_weights,
)

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 2e-2), torch.float16: (1e-2, 2e-3)}  # (atol, rtol)
MAX_STRENGTH = 2.0


def _cpp(*args):
    return value_steer.require_extension().logit_steer(*args)


# block_h=16 / block_v=64 force several (ragged) chunks over H and V' at the test widths.
_triton = functools.partial(logit_steer_triton, block_h=16, block_v=64)

IMPLS = [
    pytest.param(logit_steer_reference, id="reference"),
    pytest.param(_triton, id="triton"),
    pytest.param(_cpp, id="cpp", marks=needs_ext),
    pytest.param(ops.logit_steer, id="op"),
]


def _on(impl, device: torch.device) -> torch.device:
    """Triton launchers run on ``device`` (CUDA natively, else the CPU interpreter); the others on CPU."""
    return device if impl is _triton else torch.device("cpu")


def _to(args, dev: torch.device) -> tuple:
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def _generator(h: int, v: int, r: int = 3, g: int = 5, seed: int = 0) -> LogitSteerGenerator:
    """A generator with every tensor random (an initialised one has ``W_up = 0`` and steers nothing)."""
    torch.manual_seed(seed)
    gen = LogitSteerGenerator(h, v, r, g, MAX_STRENGTH)
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_()
        # Unit-scale projections at any H, so fp32 rounding stays comparable to the tolerances.
        gen.w_down.mul_(2.0 / math.sqrt(h))
        gen.gate_w1.mul_(2.0 / math.sqrt(h))
    return gen


def _batch(b: int, h: int, vp: int, v: int, dtype: torch.dtype = torch.float32, hidden_dtype: torch.dtype | None = None,
           seed: int = 0, b_max: int | None = None) -> tuple:
    """The argument tuple of ``logit_steer``: 5 table rows (row 3's strength is 0), ``row_idx`` ``[B_max]`` with
    garbage past ``B``; rows 0 and 1 of the batch are row 0 and row 3 (untouched) when ``B > 2``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, h, generator=g).to(hidden_dtype or dtype)
    logits = (torch.randn(b, vp, generator=g) * 3).to(dtype)
    row_strength = torch.tensor([1.0, 0.5, 1.0, 0.0, 3.5])  # row 0's entry must be ignored
    b_max = b_max or b + 6
    row_idx = torch.full((b_max,), 10**6, dtype=torch.int32)  # past B: out of range, must not be read
    row_idx[:b] = torch.randint(0, 5, (b,), generator=g, dtype=torch.int32)
    if b > 2:
        row_idx[0], row_idx[1] = 0, 3
    return (hidden, logits, row_idx, row_strength, *prepare_logit_steer_weights(_generator(h, v, seed=seed)),
            MAX_STRENGTH)


def loop_logit_steer(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2,
                     max_strength):
    """Independent semantics: per row, matrix-vector products on single vectors."""
    out = logits.clone()
    gs = torch.zeros(logits.shape[0])
    edited = torch.zeros(logits.shape[0], dtype=torch.bool)
    v = w_up.shape[0]
    for i in range(logits.shape[0]):
        row = int(row_idx[i])
        s = float(row_strength[row])
        if row == 0 or s == 0.0:
            continue
        x = hidden[i].float()
        z = w_down @ (x + pos)
        gate = float(gate_w2 @ torch.tanh(gate_w1 @ x + gate_b1) + gate_b2[0])
        strength = max_strength / (1.0 + math.exp(-gate))
        out[i, :v] = (logits[i, :v].float() + s * strength * (w_up @ z)).to(logits.dtype)
        gs[i] = strength
        edited[i] = True
    return out, gs, edited


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _assert_matches_loop(result, args) -> None:
    out, gs = (t.cpu() for t in result)
    logits = args[1]
    ref, ref_gs, edited = loop_logit_steer(*args)
    assert out.shape == logits.shape and out.dtype == logits.dtype and out.is_contiguous()
    assert gs.shape == (logits.shape[0],) and gs.dtype == torch.float32
    atol, rtol = TOL[logits.dtype]
    v = args[6].shape[0]
    torch.testing.assert_close(out[edited, :v].float(), ref[edited, :v].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gs, ref_gs, atol=1e-5, rtol=1e-5)
    assert torch.equal(_bits(out[~edited]), _bits(logits[~edited])), "untouched rows must be bitwise copies"
    assert torch.equal(_bits(out[:, v:]), _bits(logits[:, v:])), "padded columns must be bitwise copies"
    assert torch.equal(gs[~edited], torch.zeros(int((~edited).sum())))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["h_fp32", "h_bf16"])
def test_matches_loop(impl, dtype: torch.dtype, hidden_dtype: torch.dtype, device: torch.device) -> None:
    args = _batch(13, 40, 300, 300, dtype, hidden_dtype)
    _, _, edited = loop_logit_steer(*args)
    assert 3 <= int(edited.sum()) < 13  # a real mix of steered and untouched rows
    _assert_matches_loop(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_vocab_columns_pass_through(impl, device: torch.device) -> None:
    """``V < V'`` (the config vocabulary past the generator's): columns ``V..V'-1`` are copied bitwise."""
    args = _batch(9, 24, 333, 250, torch.bfloat16)
    _assert_matches_loop(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_rows(impl, device: torch.device) -> None:
    """H = 576 (several default-width chunks) and a vocabulary past one C++ column chunk."""
    if impl is _triton and device.type == "cpu":
        args = _batch(3, 576, 700, 700, seed=1)  # the interpreter is slow: a narrower vocabulary
    else:
        args = _batch(5, 576, 9000, 8999, seed=1)
    _assert_matches_loop(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_untouched_rows_are_bitwise(impl, dtype: torch.dtype, device: torch.device) -> None:
    """Row 0 (whatever its table entry) and strength-0 rows: NaN payloads, -0.0 and infinities come back bit for
    bit, gate strength 0."""
    args = list(_batch(8, 32, 128, 128, dtype))
    args[2][:8] = torch.tensor([0, 3, 0, 3, 0, 3, 0, 3], dtype=torch.int32)
    logits = args[1]
    raw = _bits(logits)
    raw[:, ::7] = 0x7FC1 if logits.element_size() == 2 else 0x7FC00123  # NaNs with a payload
    raw[:, 3::7] = -(2 ** (8 * logits.element_size() - 1))  # -0.0
    args[1] = raw.view(dtype)
    out, gs = (t.cpu() for t in impl(*_to(args, _on(impl, device))))
    assert torch.equal(_bits(out), _bits(args[1]))
    assert torch.equal(gs, torch.zeros(8))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_logits_stay_masked(impl, device: torch.device) -> None:
    """``-inf`` (a grammar bitmask, bad words) plus a finite steering term stays ``-inf``."""
    args = list(_batch(6, 32, 100, 100))
    args[2][:6] = torch.tensor([1, 2, 4, 1, 2, 4], dtype=torch.int32)
    args[1][:, 10:20] = -math.inf
    out, _ = impl(*_to(args, _on(impl, device)))
    out = out.cpu()
    assert torch.isneginf(out[:, 10:20]).all()
    assert torch.isfinite(out[:, :10]).all() and not torch.equal(out[:, :10], args[1][:, :10])


@pytest.mark.parametrize("impl", IMPLS)
def test_strength_scales_the_added_term(impl, device: torch.device) -> None:
    """``s`` multiplies the added term; the gate strength does not depend on ``s``."""
    args = list(_batch(4, 32, 64, 64))
    args[0] = args[0][:1].expand(4, 32).contiguous()
    args[1] = args[1][:1].expand(4, 64).contiguous()
    args[2][:4] = torch.tensor([1, 2, 4, 2], dtype=torch.int32)  # s = 0.5, 1.0, 3.5, 1.0
    out, gs = (t.cpu() for t in impl(*_to(args, _on(impl, device))))
    delta = out - args[1]
    torch.testing.assert_close(delta[0] * 2, delta[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(delta[2], delta[1] * 3.5, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[1], out[3])
    torch.testing.assert_close(gs, gs[:1].expand(4), rtol=0, atol=1e-6)
    assert 0.0 < float(gs[0]) < MAX_STRENGTH


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.id != "reference"])
def test_strided_inputs(impl, device: torch.device) -> None:
    """Logits as a column slice of a wider buffer (vLLM's vocab slice), non-contiguous hidden, row-major ``w_up``."""
    args = list(_batch(11, 40, 200, 180, torch.bfloat16))
    ref_args = tuple(args)
    wide = torch.zeros(11, 264, dtype=torch.bfloat16)
    wide[:, :200] = args[1]
    args[1] = wide[:, :200]
    hid = torch.zeros(11, 80, dtype=torch.bfloat16)
    hid[:, ::2] = args[0]
    args[0] = hid[:, ::2]
    args[6] = args[6].contiguous()  # row-major [V, R] (prepare_logit_steer_weights stores it column-major)
    _assert_matches_loop(impl(*_to(args, _on(impl, device))), ref_args)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl, device: torch.device) -> None:
    args = _batch(0, 16, 50, 50, b_max=4)
    out, gs = impl(*_to(args, _on(impl, device)))
    assert out.shape == (0, 50) and gs.shape == (0,)


def test_bad_args_raise() -> None:
    args = _batch(6, 16, 50, 40)

    def bad(i: int, value) -> tuple:
        return tuple(value if j == i else a for j, a in enumerate(args))

    cases = [
        bad(0, torch.randn(5, 16)),  # hidden rows != B
        bad(2, args[2][:4]),  # row_idx shorter than B
        bad(2, args[2].long()),  # row_idx dtype
        bad(3, args[3].double()),  # row_strength dtype
        bad(4, torch.randn(3, 17)),  # w_down width
        bad(6, torch.randn(60, 3)),  # w_up: V > V'
        bad(6, torch.randn(40, 4)),  # w_up rank
        bad(8, torch.randn(4)),  # gate_b1 length
        bad(10, torch.randn(2)),  # gate_b2 shape
        bad(5, args[5].bfloat16()),  # pos dtype
    ]
    for case in cases:
        with pytest.raises(ValueError):
            logit_steer_reference(*case)
        with pytest.raises(ValueError):
            ops.logit_steer(*case)
        if value_steer.has_extension():
            with pytest.raises(RuntimeError):
                _cpp(*case)
    with pytest.raises(ValueError):
        logit_steer_triton(*bad(1, args[1].double()))


@needs_ext
def test_cpp_rejects_out_of_range_rows() -> None:
    args = list(_batch(6, 16, 50, 50))
    args[2][3] = 5  # N = 5
    with pytest.raises(RuntimeError, match="row_idx"):
        _cpp(*args)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_is_independent_of_the_thread_count(dtype: torch.dtype) -> None:
    args = _batch(17, 64, 9000, 9000, dtype, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp(*args)
        torch.set_num_threads(2)
        two = _cpp(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(one[0]), _bits(two[0])) and torch.equal(one[1], two[1])


# ---------------------------------------------------------------- registration


@pytest.fixture(params=["ext", "reference"])
def cpu_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Once through the C++ extension, once through the torch-reference fallback."""
    if request.param == "ext" and not value_steer.has_extension():
        pytest.skip("value_steer._C not built")
    if request.param == "reference":
        monkeypatch.setattr(value_steer._ext, "extension", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(cpu_impl: str, dtype: torch.dtype) -> None:
    result = torch.library.opcheck(torch.ops.value_steer.logit_steer.default, _batch(5, 24, 70, 64, dtype))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inside_torch_compile(backend: str) -> None:
    """The sampler-side step traces through the fake impl without graph breaks, with a dynamic batch size."""

    def step(hidden, logits, row_idx, row_strength, *weights):
        out, gs = ops.logit_steer(hidden, logits, row_idx, row_strength, *weights[:-1], weights[-1])
        return out.float().log_softmax(dim=-1), gs.sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    for b in (7, 12):
        args = _batch(b, 32, 90, 90, seed=b, b_max=16)
        out = compiled(*args)
        expected = step(*args)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [576, 4096])
def test_gpu_matches_loop(dtype: torch.dtype, h: int) -> None:
    args = _batch(64, h, 49152, 49152, dtype)
    cuda_args = _to(args, torch.device("cuda"))
    _assert_matches_loop(ops.logit_steer(*cuda_args), args)
    _assert_matches_loop(logit_steer_triton(*cuda_args, block_h=256, block_v=512), args)
    padded = _batch(16, h, 151936, 151665, dtype, seed=2)
    _assert_matches_loop(ops.logit_steer(*_to(padded, torch.device("cuda"))), padded)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_reads_the_buffers() -> None:
    """Captured once, replayed after the inputs and the row tables change in place: same as eager."""
    dev = torch.device("cuda")
    args = list(_to(_batch(32, 1024, 32000, 32000, torch.bfloat16), dev))
    tensors = args[:-1]

    def step():
        return ops.logit_steer(*tensors, args[-1])

    step()  # warm-up (compiles the kernels)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    new = _batch(32, 1024, 32000, 32000, torch.bfloat16, seed=5)
    for dst, src in zip(tensors[:4], new[:4]):
        dst.copy_(src.to(dev))
    tensors[3][2] = 0.0  # a request turned off in place
    graph.replay()
    torch.cuda.synchronize()
    replayed = (graph_out[0].clone(), graph_out[1].clone())
    eager = step()
    assert torch.equal(replayed[0], eager[0]) and torch.equal(replayed[1], eager[1])
