"""token_filter: the torch reference against ``token_filter_rows`` (the semantics), every implementation (C++ ext,
Triton (interpreter on CPU), the custom op) against the reference on a mixed batch (mask, K-candidate and tilt rows,
rows of another mode, row 0, the fallback, ``u = 0`` and ``u = 1``, ``-inf`` logits, ``V' > V``); bitwise
passthrough of untouched rows and padded columns; opcheck; torch.compile; (GPU) native Triton and CUDA-graph
replay.

Thresholds are placed in the widest gap of each row's predicted values (away from every token's q by far more
than float rounding), so the fast paths' ``q > logit(t)`` and the reference's ``sigmoid(q) > t`` agree."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core.modes import MODE_OFF, MODE_TOKEN, MODE_VFD
from value_steer.core.qhead import MIN_SAFE_MASS, qhead_rows, token_filter_rows
from value_steer.kernels.token_filter import (
    prepare_token_filter_weights,
    token_filter_reference,
    token_filter_triton,
)

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-2, 2e-2), torch.float16: (1e-2, 2e-3)}  # (atol, rtol)


def _cpp(*args):
    return value_steer.require_extension().token_filter(*args)


# block_h=16 / block_v=16 / chunk=64 force several (ragged) blocks per chunk and several chunks per row.
_triton = functools.partial(token_filter_triton, block_h=16, block_v=16, chunk=64)

IMPLS = [
    pytest.param(_triton, id="triton"),
    pytest.param(_cpp, id="cpp", marks=needs_ext),
    pytest.param(ops.token_filter, id="op"),
]
ALL_IMPLS = [pytest.param(token_filter_reference, id="reference"), *IMPLS]


def _on(impl, device: torch.device) -> torch.device:
    """Triton launchers run on ``device`` (CUDA natively, else the CPU interpreter); the others on CPU."""
    return device if impl is _triton else torch.device("cpu")


def _to(args, dev: torch.device) -> tuple:
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


# Batch rows of _batch (B = 14): what each one is.
MASK_UP, MASK_DOWN, K3_UP, K2_DOWN, TILT, TILT_K, OTHER_MODE, FALLBACK, K_U0, K_U1, MASK_U0, OFF, NEAR = range(1, 14)
ROW0 = 0
OFF_ROWS = (ROW0, OTHER_MODE, OFF)
NEG_INF_COLS = slice(10, 20)


def _weights(h: int, v: int, r: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w_down = torch.randn(r, h, generator=g) * (2.0 / math.sqrt(h))
    pos = torch.randn(h, generator=g) * 0.1
    w_up = torch.randn(v, r, generator=g) * 0.5
    bias = torch.randn(v, generator=g) * 0.5
    return prepare_token_filter_weights((w_down, pos, w_up, bias))


def _q64(hidden: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    w_down, pos, w_up, bias = (w.double() for w in weights)
    return (hidden.double() + pos) @ w_down.t() @ w_up.t() + bias


def _mid_cut(q: torch.Tensor) -> float:
    """The middle of the widest gap between the row's sorted q values in their 30-70% range."""
    s = q.sort().values
    lo, hi = int(0.3 * len(s)), max(int(0.7 * len(s)), int(0.3 * len(s)) + 2)
    gaps = s[lo + 1 : hi] - s[lo : hi - 1]
    i = int(gaps.argmax())
    return float(s[lo + i] + s[lo + i + 1]) / 2


def _batch(h: int = 40, vp: int = 333, v: int = 300, r: int = 6, dtype: torch.dtype = torch.float32,
           hidden_dtype: torch.dtype | None = None, seed: int = 0, b_max: int | None = None) -> tuple:
    """The argument tuple of ``token_filter`` for the 14 rows named above (batch row ``b`` uses table row ``b + 1``
    unless it is row 0); ``row_idx`` is ``[B_max]`` with garbage past ``B``."""
    b = 14
    g = torch.Generator().manual_seed(seed + 1)
    weights = _weights(h, v, r, seed)
    hidden = torch.randn(b, h, generator=g).to(hidden_dtype or dtype)
    q = _q64(hidden, weights)
    logits = torch.randn(b, vp, generator=g) * 3
    n = b + 1
    thr = torch.full((n,), 0.5)
    sign = torch.ones(n)
    mode = torch.full((n,), MODE_TOKEN, dtype=torch.int32)  # row 0's entry says token mode: it must be ignored
    beta = torch.zeros(n)
    k = torch.zeros(n, dtype=torch.int32)
    cut = torch.tensor([_mid_cut(q[i]) for i in range(b)], dtype=torch.float64)
    for i, s in ((MASK_DOWN, -1.0), (K2_DOWN, -1.0), (TILT_K, -1.0)):
        sign[i + 1] = s
    for i, kk in ((K3_UP, 3), (K2_DOWN, 2), (TILT_K, 3), (K_U0, 4), (K_U1, 2)):
        k[i + 1] = kk
    beta[TILT + 1], beta[TILT_K + 1] = 0.7, 1.5
    mode[OTHER_MODE + 1], mode[OFF + 1] = MODE_VFD, MODE_OFF
    cut[K_U0] = cut[MASK_U0] = float(q[[K_U0, MASK_U0]].max()) + 1.0  # nothing unsafe
    cut[K_U1] = float(q[K_U1].min()) - 1.0  # everything unsafe
    for i in range(b):
        thr[i + 1] = torch.sigmoid(cut[i]).float()
    # Fallback: the safe tokens hold ~e^-30 of the row; NEAR: ~e^-6 (below 1, above MIN_SAFE_MASS).
    for i, drop in ((FALLBACK, 30.0), (NEAR, 6.0)):
        unsafe = q[i] > cut[i]
        logits[i, :v] = torch.where(unsafe[:v], logits[i, :v], logits[i, :v] - drop)
    for i in (MASK_UP, K3_UP, TILT, NEAR, OTHER_MODE):
        logits[i, NEG_INF_COLS] = -math.inf
    row_idx = torch.full((b_max or b + 5,), 10**6, dtype=torch.int32)  # past B: out of range, must not be read
    row_idx[:b] = torch.arange(1, b + 1, dtype=torch.int32)
    row_idx[ROW0] = 0
    return (hidden, logits.to(dtype), row_idx, thr, sign, mode, beta, k, *weights, MODE_TOKEN, MIN_SAFE_MASS)


def _on_rows(args) -> torch.Tensor:
    b = args[1].shape[0]
    rows = args[2][:b].long()
    return (rows > 0) & (args[5][rows] == args[12])


def _assert_matches_reference(result, args) -> None:
    out, z, changed, mass = (t.cpu() for t in result)
    logits = args[1]
    ref_out, ref_z, ref_changed, ref_mass = token_filter_reference(*args)
    b, vp = logits.shape
    v = args[10].shape[0]
    assert out.shape == (b, vp) and out.dtype == logits.dtype and out.is_contiguous()
    assert z.shape == ref_z.shape and z.dtype == torch.float32
    assert changed.shape == (b,) and changed.dtype == torch.bool
    assert mass.shape == (b,) and mass.dtype == torch.float32
    on = _on_rows(args)
    atol, rtol = TOL[logits.dtype]
    o, ro = out[on, :v].float(), ref_out[on, :v].float()
    assert not torch.isnan(o).any()
    assert torch.equal(torch.isneginf(o), torch.isneginf(ro)), "the same tokens removed"
    fin = torch.isfinite(ro)
    torch.testing.assert_close(o[fin], ro[fin], atol=atol, rtol=rtol)
    torch.testing.assert_close(z, ref_z, atol=1e-5, rtol=1e-5)
    assert torch.equal(changed, ref_changed)
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
    assert torch.equal(_bits(out[~on]), _bits(logits[~on])), "untouched rows must be bitwise copies"
    assert torch.equal(_bits(out[:, v:]), _bits(logits[:, v:])), "padded columns must be bitwise copies"
    assert torch.equal(mass[~on], torch.zeros(int((~on).sum()))) and not changed[~on].any()


# ---------------------------------------------------------------- the reference is the core's semantics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_token_filter_rows(dtype: torch.dtype) -> None:
    args = _batch(dtype=dtype)
    hidden, logits, row_idx, thr, sign, mode, beta, k, w_down, pos, w_up, bias, token_mode, msm = args
    b = logits.shape[0]
    rows = row_idx[:b].long()
    on = (rows > 0) & (mode[rows] == token_mode)
    assert on.tolist() == [i not in OFF_ROWS for i in range(b)]
    q = qhead_rows(hidden, w_down, pos, w_up, bias)
    expected = token_filter_rows(logits, q, thr[rows], sign[rows], beta[rows], on, msm, k=k[rows])
    out, z, changed, mass = token_filter_reference(*args)
    assert torch.equal(_bits(out), _bits(expected[0]))
    assert torch.equal(changed, expected[1]) and torch.equal(mass, expected[2])
    torch.testing.assert_close(z, (hidden.float() + pos) @ w_down.t(), atol=1e-5, rtol=1e-5)
    # The batch exercises what it says it does.
    assert changed.tolist() == [i not in (*OFF_ROWS, K_U0, K_U1, MASK_U0) for i in range(b)]
    assert int(torch.isfinite(out[FALLBACK, : w_up.shape[0]]).sum()) == 1
    assert 0.999 < float(mass[FALLBACK]) < 1.0 + 1e-6 and 0.5 < float(mass[NEAR]) < 0.9999


# ---------------------------------------------------------------- every implementation against the reference


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["h_fp32", "h_bf16"])
def test_matches_reference(impl, dtype: torch.dtype, hidden_dtype: torch.dtype, device: torch.device) -> None:
    args = _batch(dtype=dtype, hidden_dtype=hidden_dtype)
    _assert_matches_reference(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_fallback_and_extreme_rows(impl, device: torch.device) -> None:
    """The fallback keeps only the safest token; ``u = 0`` (mask and K rule) and ``u = 1`` (K rule: every draw
    unsafe, the first is kept) leave the row as it is, unchanged, no mass."""
    args = _batch()
    out, _, changed, mass = (t.cpu() for t in impl(*_to(args, _on(impl, device))))
    logits, v = args[1], args[10].shape[0]
    q = _q64(args[0], args[8:12])
    safest = int((args[4][FALLBACK + 1] * q[FALLBACK]).argmin())
    kept = torch.isfinite(out[FALLBACK, :v]).nonzero().flatten().tolist()
    assert kept == [safest] and out[FALLBACK, safest] == logits[FALLBACK, safest]
    p = torch.softmax(logits[FALLBACK, :v].double(), dim=-1)
    assert bool(changed[FALLBACK]) and math.isclose(float(mass[FALLBACK]), 1 - float(p[safest]), abs_tol=1e-6)
    for i in (K_U0, MASK_U0):
        assert torch.equal(out[i, :v], logits[i, :v]) and not changed[i] and mass[i] == 0
    assert torch.equal(out[K_U1, :v], logits[K_U1, :v]) and not changed[K_U1] and mass[K_U1] == 0
    # Just above the fallback point: a plain mask (the -inf columns stay -inf).
    near_unsafe = q[NEAR, :v] > torch.logit(args[3][NEAR + 1].double())
    cols = torch.ones(v, dtype=torch.bool)
    cols[NEG_INF_COLS] = False
    assert torch.isneginf(out[NEAR, :v][near_unsafe]).all()
    assert not torch.isneginf(out[NEAR, :v][~near_unsafe & cols]).any()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_untouched_rows_are_bitwise(impl, dtype: torch.dtype, device: torch.device) -> None:
    """Row 0 (whose table entry says token mode), rows of another mode and off rows, and every row's columns
    ``V..V'``: NaN payloads, -0.0 and infinities come back bit for bit, unchanged, mass 0."""
    args = list(_batch(dtype=dtype))
    raw = _bits(args[1])
    nan = 0x7FC1 if args[1].element_size() == 2 else 0x7FC00123  # a NaN with a payload
    neg_zero = -(2 ** (8 * args[1].element_size() - 1))
    for i in OFF_ROWS:
        raw[i, ::7] = nan
        raw[i, 3::7] = neg_zero
    raw[:, 300::5] = nan
    raw[:, 301::5] = neg_zero
    args[1] = raw.view(dtype)
    out, _, changed, mass = (t.cpu() for t in impl(*_to(args, _on(impl, device))))
    rows = list(OFF_ROWS)
    assert torch.equal(_bits(out[rows]), _bits(args[1][rows]))
    assert torch.equal(_bits(out[:, 300:]), _bits(args[1][:, 300:]))
    assert not changed[rows].any() and torch.equal(mass[rows], torch.zeros(len(rows)))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_masked_logits_stay_masked(impl, device: torch.device) -> None:
    """``-inf`` logits (a grammar bitmask) stay ``-inf`` under every rule, and nothing is NaN."""
    args = _batch()
    out, _, _, mass = (t.cpu() for t in impl(*_to(args, _on(impl, device))))
    for i in (MASK_UP, K3_UP, TILT, NEAR):
        assert torch.isneginf(out[i, NEG_INF_COLS]).all()
    assert not torch.isnan(out).any() and torch.isfinite(mass).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_rows(impl, device: torch.device) -> None:
    """H = 576, a vocabulary over many C++ tiles with a ragged tail, more on-rows than one micro-kernel group."""
    if impl is _triton and device.type == "cpu":
        args = _batch(h=576, vp=700, v=651, r=8, seed=1)  # the interpreter is slow: a narrower vocabulary
    else:
        args = _batch(h=576, vp=9011, v=9001, r=32, seed=1)
    _assert_matches_reference(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl, device: torch.device) -> None:
    """Logits as a column slice of a wider buffer (vLLM's vocab slice), non-contiguous hidden, row-major ``w_up``,
    strided row tables."""
    args = list(_batch(dtype=torch.bfloat16))
    ref_args = tuple(args)
    wide = torch.zeros(14, 400, dtype=torch.bfloat16)
    wide[:, :333] = args[1]
    args[1] = wide[:, :333]
    hid = torch.zeros(14, 80, dtype=torch.bfloat16)
    hid[:, ::2] = args[0]
    args[0] = hid[:, ::2]
    args[10] = args[10].contiguous()  # row-major [V, R] (prepare_token_filter_weights stores it column-major)
    for j in (3, 4, 6):
        t = torch.zeros(2 * args[j].shape[0], dtype=args[j].dtype)
        t[::2] = args[j]
        args[j] = t[::2]
    _assert_matches_reference(impl(*_to(args, _on(impl, device))), ref_args)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_batch(impl, device: torch.device) -> None:
    args = list(_batch(b_max=20))
    args[0], args[1] = args[0][:0], args[1][:0]
    out, z, changed, mass = impl(*_to(args, _on(impl, device)))
    assert out.shape == (0, 333) and z.shape == (0, 6) and changed.shape == (0,) and mass.shape == (0,)


@needs_ext
def test_z_gives_q_at_the_sampled_token() -> None:
    """The runner reads ``q[tok] = w_up[tok] . z + bias[tok]`` from the op's ``z`` (every row, off rows too)."""
    args = _batch()
    _, z, _, _ = ops.token_filter(*args)
    tok = torch.randint(0, 300, (14,), generator=torch.Generator().manual_seed(0))
    w_up, bias = args[10], args[11]
    q_tok = (w_up[tok] * z).sum(-1) + bias[tok]
    expected = qhead_rows(args[0], *args[8:12]).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(q_tok, expected, atol=1e-5, rtol=1e-5)


def test_bad_args_raise() -> None:
    args = _batch()

    def bad(i: int, value) -> tuple:
        return tuple(value if j == i else a for j, a in enumerate(args))

    cases = [
        ("hidden", bad(0, torch.randn(5, 40))),  # rows != B
        ("logits", bad(1, args[1].double())),
        ("row_idx", bad(2, args[2][:4])),  # shorter than B
        ("row_idx", bad(2, args[2].long())),
        ("row_threshold", bad(3, args[3].double())),
        ("row_sign", bad(4, args[4][:-1])),  # N mismatch
        ("row_mode", bad(5, args[5].long())),
        ("row_beta", bad(6, args[6][:-1])),
        ("row_k", bad(7, args[7].float())),
        ("w_down", bad(8, torch.randn(6, 41))),
        ("pos", bad(9, torch.randn(41))),
        ("w_up", bad(10, torch.randn(400, 6))),  # V > V'
        ("w_up", bad(10, torch.randn(300, 5))),  # rank
        ("bias", bad(11, torch.randn(299))),
        ("pos", bad(9, args[9].bfloat16())),
        ("token_mode", bad(12, 3.0)),
        ("min_safe_mass", bad(13, "x")),
    ]
    for name, case in cases:
        with pytest.raises(ValueError, match=name):
            token_filter_reference(*case)
        with pytest.raises(ValueError, match=name):
            token_filter_triton(*case)
        if name not in ("token_mode", "min_safe_mass"):  # the op's schema takes an int and a float
            with pytest.raises(ValueError, match=name):
                ops.token_filter(*case)
        if value_steer.has_extension() and name not in ("token_mode", "min_safe_mass"):
            with pytest.raises(RuntimeError, match=name):
                _cpp(*case)


@needs_ext
def test_cpp_rejects_out_of_range_rows() -> None:
    args = list(_batch())
    args[2][3] = 15  # N = 15
    with pytest.raises(RuntimeError, match="row_idx"):
        _cpp(*args)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_is_independent_of_the_thread_count(dtype: torch.dtype) -> None:
    args = _batch(h=64, vp=9000, v=9000, r=16, dtype=dtype, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp(*args)
        torch.set_num_threads(2)
        two = _cpp(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(one[0]), _bits(two[0]))
    assert all(torch.equal(a, b) for a, b in zip(one[1:], two[1:]))


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
    result = torch.library.opcheck(torch.ops.value_steer.token_filter.default, _batch(dtype=dtype))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inside_torch_compile(backend: str) -> None:
    """The sampler-side step traces through the fake impl without graph breaks, with a dynamic batch size."""

    def step(hidden, logits, row_idx, *rest):
        out, z, changed, mass = ops.token_filter(hidden, logits, row_idx, *rest)
        return out.float().log_softmax(dim=-1), z.sum(), changed.sum(), mass.sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    for b in (7, 12):
        args = list(_batch(seed=b, b_max=16))
        args[0], args[1] = args[0][:b], args[1][:b]
        out = compiled(*args)
        expected = step(*args)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_reference(dtype: torch.dtype) -> None:
    cuda = torch.device("cuda")
    for args in (_batch(h=576, vp=49152, v=49152, r=32, dtype=dtype),
                 _batch(h=4096, vp=151936, v=151665, r=16, dtype=dtype, seed=2)):  # fmt: skip
        _assert_matches_reference(ops.token_filter(*_to(args, cuda)), args)
        _assert_matches_reference(token_filter_triton(*_to(args, cuda), block_v=64, chunk=512), args)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_reads_the_buffers() -> None:
    """Captured once, replayed after the inputs and the row tables change in place: same as eager."""
    dev = torch.device("cuda")
    args = list(_to(_batch(h=576, vp=49152, v=49152, r=32, dtype=torch.bfloat16), dev))
    tensors = args[:12]

    def step():
        return ops.token_filter(*tensors, *args[12:])

    step()  # warm-up (compiles the kernels)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    new = _batch(h=576, vp=49152, v=49152, r=32, dtype=torch.bfloat16, seed=5)
    for dst, src in zip(tensors[:8], new[:8]):
        dst.copy_(src.to(dev))
    tensors[5][2] = MODE_OFF  # a request turned off in place
    graph.replay()
    torch.cuda.synchronize()
    replayed = tuple(t.clone() for t in graph_out)
    eager = step()
    assert all(torch.equal(a, b) for a, b in zip(replayed, eager))
