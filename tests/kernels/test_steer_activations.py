"""steer_activations / steer_gate: every implementation (torch reference, C++ ext, Triton (interpreter on CPU),
the custom op) against an independent per-token loop over ``value_steer.core.activation``'s functions."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core import activation as act
from value_steer.core.activation import FLAG_DECODE, FLAG_GATED, FLAG_PROMPT, OP_ABLATE, OP_ADD, OP_CAP, OP_NONE
from value_steer.kernels.steer_activations import (
    steer_activations_reference,
    steer_activations_triton,
    steer_gate_reference,
    steer_gate_triton,
)

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")
INF = math.inf
ALL = FLAG_PROMPT | FLAG_DECODE
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}  # (atol, rtol)


def _cpp(*args):
    return value_steer.require_extension().steer_activations(*args)


def _cpp_gate(*args):
    value_steer.require_extension().steer_gate(*args)


# block_h=32 forces several BLOCK_H chunks (and a ragged last one) at the test widths.
_triton = functools.partial(steer_activations_triton, block_h=32)
_triton_gate = functools.partial(steer_gate_triton, block_h=32)

IMPLS = [
    pytest.param(steer_activations_reference, id="reference"),
    pytest.param(_triton, id="triton"),
    pytest.param(_cpp, id="cpp", marks=needs_ext),
    pytest.param(ops.steer_activations, id="op"),
]
GATE_IMPLS = [
    pytest.param(steer_gate_reference, id="reference"),
    pytest.param(_triton_gate, id="triton"),
    pytest.param(_cpp_gate, id="cpp", marks=needs_ext),
    pytest.param(ops.steer_gate, id="op"),
]


def _on(impl, device: torch.device) -> torch.device:
    """Triton launchers run on ``device`` (CUDA natively, else the CPU interpreter); the others on CPU."""
    return device if impl in (_triton, _triton_gate) else torch.device("cpu")


def _to(args, dev: torch.device) -> tuple:
    return tuple(a.to(dev) for a in args)


class Tables:
    """Per-layer op tables ``[R, M]`` written row by row: ``set(row, [(kind, slot, a, b, flags), ...])``."""

    def __init__(self, r: int, m: int) -> None:
        self.kind = torch.zeros(r, m, dtype=torch.int32)
        self.slot = torch.zeros(r, m, dtype=torch.int32)
        self.a = torch.zeros(r, m)
        self.b = torch.zeros(r, m)
        self.flags = torch.zeros(r, m, dtype=torch.int32)

    def set(self, row: int, row_ops: list[tuple[int, int, float, float, int]]) -> Tables:
        for j, (kind, slot, a, b, flags) in enumerate(row_ops):
            self.kind[row, j], self.slot[row, j], self.a[row, j], self.b[row, j], self.flags[row, j] = (
                kind, slot, a, b, flags)  # fmt: skip
        return self

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.kind, self.slot, self.a, self.b, self.flags


def _mixed_tables(s: int) -> Tables:
    """Rows 1..7 cover every kind, token filter, gating, list ends; row 0 carries ops that must be ignored."""
    tab = Tables(8, 4)
    tab.set(0, [(OP_ADD, 0, 5.0, 0.0, ALL)])  # row 0 is untouched whatever its table says
    tab.set(1, [(OP_ADD, 1, 2.0, 0.0, ALL), (OP_CAP, 2, -0.5, 0.5, FLAG_PROMPT),
                (OP_ABLATE, 3, 0.25, 0.0, FLAG_DECODE | FLAG_GATED)])  # fmt: skip
    tab.set(2, [(OP_ABLATE, 4 % s, 0.0, 0.0, ALL), (OP_ADD, 0, -1.5, 0.0, FLAG_DECODE | FLAG_GATED),
                (OP_NONE, 0, 0.0, 0.0, 0), (OP_ADD, 1, 9.0, 0.0, ALL)])  # fmt: skip  # after NONE: ignored
    tab.set(3, [(OP_CAP, 1, -0.3, INF, ALL), (OP_CAP, 2, -INF, 0.2, ALL | FLAG_GATED), (OP_ADD, 3, 0.5, 0.0, ALL),
                (OP_CAP, 1, -INF, INF, ALL)])  # fmt: skip
    tab.set(4, [(OP_ADD, 2, 3.0, 0.0, FLAG_DECODE), (OP_ABLATE, 1, 2.0, 0.0, FLAG_DECODE)])  # prompt: passthrough
    tab.set(5, [])  # an empty list: passthrough
    tab.set(6, [(OP_ADD, 3, 1.0, 0.0, ALL), (7, 0, 0.0, 0.0, ALL), (OP_ADD, 0, 4.0, 0.0, ALL)])  # unknown kind ends it
    tab.set(7, [(OP_CAP, 0, 0.1, 0.1, ALL | FLAG_GATED), (OP_ABLATE, 0, -1.0, 0.0, ALL)])
    return tab


def _batch(t: int, h: int, dtype: torch.dtype, fused: bool, tab: Tables, t_max: int | None = None, seed: int = 0):
    """The argument tuple of ``steer_activations``; buffers are ``[T_max]`` with garbage past ``T``."""
    g = torch.Generator().manual_seed(seed)
    t_max = t_max or t + 11
    num_rows = tab.kind.shape[0]
    s = 5
    hidden = (torch.randn(t, h, generator=g) * 2).to(dtype)
    residual = (torch.randn(t, h, generator=g) * 2).to(dtype) if fused else torch.empty(0, dtype=dtype)
    token_row = torch.full((t_max,), 10**6, dtype=torch.int32)  # past T: out of range, must not be read
    token_row[:t] = torch.randint(0, num_rows, (t,), generator=g, dtype=torch.int32)
    token_decode = torch.full((t_max,), 7, dtype=torch.int8)
    token_decode[:t] = (torch.rand(t, generator=g) < 0.5).to(torch.int8)
    gate = torch.full((t_max,), float("nan"))
    gate[:t] = torch.rand(t, generator=g)
    if t > 4:  # fixed passthrough tokens carrying NaN / -0.0 / inf (must come back bitwise)
        token_row[0], token_row[1], token_decode[1] = 0, 4, 0
        hidden[0, :3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
        hidden[1, :2] = torch.tensor([-0.0, float("-inf")]).to(dtype)
    bank = torch.randn(s, h, generator=g)
    return (hidden, residual, token_row, token_decode, gate, bank, *tab.tensors())


def loop_activations(hidden, residual, token_row, token_decode, gate, bank, kind, slot, a, b, flags):
    """Independent semantics: per token, per op, ``value_steer.core.activation``'s single-vector functions."""
    fused = residual.numel() > 0
    out = hidden.clone()
    edited = torch.zeros(hidden.shape[0], dtype=torch.bool)
    for i in range(hidden.shape[0]):
        row = int(token_row[i])
        if row == 0:
            continue
        want = FLAG_DECODE if int(token_decode[i]) else FLAG_PROMPT
        x = hidden[i].float() + residual[i].float() if fused else hidden[i].float()
        for j in range(kind.shape[1]):
            k, f = int(kind[row, j]), int(flags[row, j])
            if k not in (OP_ADD, OP_CAP, OP_ABLATE):
                break
            if not f & want:
                continue
            edited[i] = True
            v = bank[int(slot[row, j])]
            if k == OP_ADD:
                y = act.add(x, v, float(a[row, j]))
            elif k == OP_ABLATE:
                y = act.ablate(x, v, float(a[row, j]))
            else:
                lo, hi = float(a[row, j]), float(b[row, j])
                lo, hi = (None if lo == -INF else lo), (None if hi == INF else hi)
                y = x if lo is None and hi is None else act.projection_cap(x, v, lo, hi)
            if f & FLAG_GATED:
                y = x + float(gate[i]) * (y - x)
            x = y
        if edited[i]:
            out[i] = (x - residual[i].float() if fused else x).to(hidden.dtype)
    return out, edited


def loop_gate(hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, t_max: int,
              before: torch.Tensor | None = None):
    """Tokens of rows gated at this layer get the gate; every other entry keeps ``before``."""
    fused = residual.numel() > 0
    out = torch.ones(hidden.shape[0]) if before is None else before[: hidden.shape[0]].clone()
    for i in range(hidden.shape[0]):
        row = int(token_row[i])
        slot = int(gate_slot[row])
        if row == 0 or slot < 0:
            continue
        x = hidden[i].float() + residual[i].float() if fused else hidden[i].float()
        z = float(gate_sharpness[row]) * (float(x @ bank[slot]) - float(gate_threshold[row]))
        out[i] = 1.0 / (1.0 + math.exp(-z)) if z > -80 else 0.0
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _assert_matches_loop(out: torch.Tensor, args: tuple) -> None:
    hidden = args[0]
    ref, edited = loop_activations(*args)
    out = out.cpu()
    assert out.shape == hidden.shape and out.dtype == hidden.dtype and out.is_contiguous()
    atol, rtol = TOL[hidden.dtype]
    torch.testing.assert_close(out[edited].float(), ref[edited].float(), atol=atol, rtol=rtol)
    assert torch.equal(_bits(out[~edited]), _bits(hidden[~edited])), "untouched tokens must be bitwise copies"


# ---------------------------------------------------------------- steer_activations


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["no_residual", "fused_residual"])
def test_matches_loop(impl, dtype: torch.dtype, fused: bool, device: torch.device) -> None:
    args = _batch(37, 72, dtype, fused, _mixed_tables(5))
    _, edited = loop_activations(*args)
    assert 5 < int(edited.sum()) < 37  # a real mix of edited and untouched tokens
    _assert_matches_loop(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_chunk_and_wide_rows(impl, device: torch.device) -> None:
    """H below one chunk and H = 576 (several default-width chunks)."""
    for h in (8, 576):
        args = _batch(9, h, torch.float32, True, _mixed_tables(5), seed=h)
        _assert_matches_loop(impl(*_to(args, _on(impl, device))), args)


@pytest.mark.parametrize("impl", IMPLS)
def test_prompt_decode_filters(impl, device: torch.device) -> None:
    h = 40
    tab = Tables(3, 2)
    tab.set(1, [(OP_ADD, 0, 1.0, 0.0, FLAG_PROMPT), (OP_ADD, 1, 1.0, 0.0, FLAG_DECODE)])
    tab.set(2, [(OP_ADD, 0, 1.0, 0.0, FLAG_DECODE)])
    hidden = torch.randn(6, h)
    bank = torch.randn(2, h)
    token_row = torch.tensor([1, 1, 2, 2, 0, 0], dtype=torch.int32)
    token_decode = torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.int8)
    args = (hidden, torch.empty(0), token_row, token_decode, torch.ones(6), bank, *tab.tensors())
    out = impl(*_to(args, _on(impl, device))).cpu()
    torch.testing.assert_close(out[0], hidden[0] + bank[0], rtol=0, atol=1e-6)  # prompt: the prompt op only
    torch.testing.assert_close(out[1], hidden[1] + bank[1], rtol=0, atol=1e-6)  # decode: the decode op only
    assert torch.equal(_bits(out[2]), _bits(hidden[2]))  # decode-only row, prompt token: untouched
    torch.testing.assert_close(out[3], hidden[3] + bank[0], rtol=0, atol=1e-6)
    assert torch.equal(_bits(out[4:]), _bits(hidden[4:]))


@pytest.mark.parametrize("impl", IMPLS)
def test_gated_ops(impl, device: torch.device) -> None:
    """``x + g (op(x) - x)``: g = 0 leaves x, g = 1 is the plain op, g = 0.5 half way; ungated ops ignore g."""
    h = 48
    tab = Tables(3, 2)
    tab.set(1, [(OP_ABLATE, 0, 0.0, 0.0, ALL | FLAG_GATED), (OP_ADD, 1, 2.0, 0.0, ALL | FLAG_GATED)])
    tab.set(2, [(OP_ABLATE, 0, 0.0, 0.0, ALL), (OP_ADD, 1, 2.0, 0.0, ALL)])
    hidden = torch.randn(1, h).expand(5, h).contiguous()
    bank = torch.randn(2, h)
    token_row = torch.tensor([1, 1, 1, 2, 2], dtype=torch.int32)
    gate = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.5])
    args = (hidden, torch.empty(0), token_row, torch.ones(5, dtype=torch.int8), gate, bank, *tab.tensors())
    out = impl(*_to(args, _on(impl, device))).cpu()
    assert torch.equal(out[0], hidden[0])  # gate 0: x + 0 * (op(x) - x), exact
    torch.testing.assert_close(out[1], out[3], rtol=1e-5, atol=1e-5)  # gate 1 == ungated
    assert torch.equal(out[3], out[4])  # ungated ops do not read the gate
    # Half way at each op: ablate keeps half the component, then half the add.
    u = bank[0] / bank[0].norm()
    x = hidden[0] - 0.5 * (hidden[0] @ u) * u
    torch.testing.assert_close(out[2], x + 0.5 * 2.0 * bank[1], rtol=1e-5, atol=1e-5)
    _assert_matches_loop(out, args)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_residual_edits_the_sum(impl, device: torch.device) -> None:
    """With a residual the ops see ``hidden + residual``; ``out + residual`` is the edited stream."""
    args = _batch(37, 72, torch.float32, True, _mixed_tables(5))
    hidden, residual = args[0], args[1]
    out = impl(*_to(args, _on(impl, device))).cpu()
    summed = (hidden + residual, torch.empty(0), *args[2:])
    out_sum = impl(*_to(summed, _on(impl, device))).cpu()
    torch.testing.assert_close(out + residual, out_sum, rtol=1e-5, atol=1e-5, equal_nan=True)
    # Ablation to 0 removes the component of the SUM (not of hidden alone).
    tab = Tables(2, 1).set(1, [(OP_ABLATE, 2, 0.0, 0.0, ALL)])
    ones = torch.ones(37, dtype=torch.int32)
    one_args = (hidden, residual, ones, args[3], args[4], args[5], *tab.tensors())
    out = impl(*_to(one_args, _on(impl, device))).cpu()
    u = args[5][2] / args[5][2].norm()
    proj = ((out + residual) @ u)[2:]  # tokens 0 and 1 carry the planted NaN / inf
    assert proj.abs().max() < 1e-4
    assert (out @ u)[2:].abs().max() > 0.1


@pytest.mark.parametrize("impl", IMPLS)
def test_ops_apply_in_order(impl, device: torch.device) -> None:
    h = 64
    bank = torch.randn(1, h)
    norm = float(bank[0].norm())
    u = bank[0] / norm
    tab = Tables(4, 2)
    tab.set(1, [(OP_ABLATE, 0, 0.0, 0.0, ALL), (OP_ADD, 0, 2.0, 0.0, ALL)])  # remove, then add 2v
    tab.set(2, [(OP_ADD, 0, 2.0, 0.0, ALL), (OP_ABLATE, 0, 0.0, 0.0, ALL)])  # add, then remove
    tab.set(3, [(OP_ADD, 0, 2.0, 0.0, ALL), (OP_CAP, 0, -0.5, 0.5, ALL)])  # add, then cap into [-0.5, 0.5]
    hidden = torch.randn(3, h) * 3
    token_row = torch.tensor([1, 2, 3], dtype=torch.int32)
    args = (hidden, torch.empty(0), token_row, torch.zeros(3, dtype=torch.int8), torch.ones(3), bank, *tab.tensors())
    out = impl(*_to(args, _on(impl, device))).cpu()
    proj = out @ u
    capped = max(-0.5, min(0.5, float(hidden[2] @ u) + 2 * norm))
    torch.testing.assert_close(proj, torch.tensor([2 * norm, 0.0, capped]), rtol=1e-5, atol=1e-4)
    _assert_matches_loop(out, args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_ops_are_exact(impl, dtype: torch.dtype, device: torch.device) -> None:
    """add(0), ablate(1) and cap(-inf, +inf) compute ``x + 0 v`` in fp32: equal to ``x`` (no -0.0 in the input;
    -0.0 + 0.0 would give +0.0), and the cast back is exact, so the output equals ``hidden`` in every dtype.
    (With a fused residual ``(h + r) - r`` rounds in fp32, so the identity is not exact there.)"""
    tab = Tables(3, 3)
    tab.set(1, [(OP_ADD, 0, 0.0, 0.0, ALL), (OP_ABLATE, 1, 1.0, 0.0, ALL), (OP_CAP, 2, -INF, INF, ALL)])
    tab.set(2, [(OP_CAP, 2, -INF, INF, ALL | FLAG_GATED), (OP_ADD, 1, 0.0, 0.0, ALL | FLAG_GATED),
                (OP_ABLATE, 0, 1.0, 0.0, ALL | FLAG_GATED)])  # fmt: skip
    args = list(_batch(23, 72, dtype, False, tab))
    args[0][0, :3] = 0.5  # drop the -0.0 / NaN / inf planted by _batch
    args[0][1, :2] = 0.5
    args[2][:23] = torch.tensor([1, 2] * 11 + [1], dtype=torch.int32)
    out = impl(*_to(args, _on(impl, device))).cpu()
    assert torch.equal(out, args[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["no_residual", "fused_residual"])
def test_untouched_tokens_are_bitwise(impl, dtype: torch.dtype, fused: bool, device: torch.device) -> None:
    """Row 0 and tokens every op skips: NaN payloads, -0.0 and infinities come back bit for bit."""
    tab = _mixed_tables(5)
    args = list(_batch(16, 40, dtype, fused, tab))
    args[2][:16] = torch.tensor([0, 4, 5, 0] * 4, dtype=torch.int32)
    args[3][:16] = 0  # prompt tokens: row 4 only edits decode tokens
    hidden = args[0]
    raw = _bits(hidden)
    raw[:, ::7] = 0x7FC1 if hidden.element_size() == 2 else 0x7FC00123  # NaNs with a payload
    raw[:, 3::7] = -(2 ** (8 * hidden.element_size() - 1))  # -0.0
    out = impl(*_to(args, _on(impl, device))).cpu()
    assert torch.equal(_bits(out), _bits(hidden))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_cases(impl, device: torch.device) -> None:
    tab = _mixed_tables(5)
    for dtype in (torch.float32, torch.bfloat16):
        args = list(_batch(0, 16, dtype, False, tab, t_max=4))
        out = impl(*_to(args, _on(impl, device)))
        assert out.shape == (0, 16) and out.dtype == dtype
    # M = 0 (no op columns) and S = 0 (empty bank): everything passes through.
    args = list(_batch(9, 16, torch.bfloat16, True, tab))
    args[6:] = [torch.empty(8, 0, dtype=x.dtype) for x in tab.tensors()]
    out = impl(*_to(args, _on(impl, device))).cpu()
    assert torch.equal(_bits(out), _bits(args[0]))
    args = list(_batch(9, 16, torch.bfloat16, True, Tables(8, 4)))
    args[5] = torch.empty(0, 16)
    out = impl(*_to(args, _on(impl, device))).cpu()
    assert torch.equal(_bits(out), _bits(args[0]))


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.id != "reference"])
def test_strided_inputs(impl, device: torch.device) -> None:
    """Non-contiguous hidden/residual/bank and per-layer tables sliced out of ``[L, R, M]`` buffers."""
    dev = _on(impl, device)
    tab = _mixed_tables(5)
    args = list(_batch(21, 72, torch.bfloat16, True, tab))
    ref_args = tuple(args)
    wide = torch.zeros(21, 144, dtype=torch.bfloat16)
    wide[:, ::2] = args[0]
    args[0] = wide[:, ::2]
    args[1] = args[1].t().contiguous().t()
    bank = torch.zeros(10, 72)
    bank[::2] = args[5]
    args[5] = bank[::2]
    for i in range(6, 11):  # layer 1 of a [3, R, M] stack
        stack = torch.zeros(3, *args[i].shape, dtype=args[i].dtype)
        stack[1] = args[i]
        args[i] = stack[1].t().contiguous().t()
    _assert_matches_loop(impl(*_to(args, dev)), ref_args)


def test_bad_args_raise() -> None:
    tab = _mixed_tables(5)
    args = _batch(6, 16, torch.float32, True, tab)

    def bad(i: int, value: torch.Tensor) -> tuple:
        return tuple(value if j == i else a for j, a in enumerate(args))

    cases = [
        bad(1, torch.randn(5, 16)),  # residual neither [T, H] nor empty
        bad(1, torch.randn(6, 16, dtype=torch.bfloat16)),  # residual dtype
        bad(2, args[2][:4]),  # token_row shorter than T
        bad(3, args[3].to(torch.int32)),  # token_decode dtype
        bad(4, args[4][:5]),  # gate shorter than T
        bad(5, args[5].to(torch.bfloat16)),  # bank dtype
        bad(5, torch.randn(5, 17)),  # bank width
        bad(7, args[7][:, :3]),  # op_slot shape
        bad(8, args[8].double()),  # op_a dtype
    ]
    for case in cases:
        with pytest.raises(ValueError):
            steer_activations_reference(*case)
        # The registered op: the C++ kernel's own checks (RuntimeError) where it is built, else the reference's.
        with pytest.raises((ValueError, RuntimeError)):
            ops.steer_activations(*case)
        if value_steer.has_extension():
            with pytest.raises(RuntimeError):
                _cpp(*case)
    with pytest.raises(ValueError):
        steer_activations_triton(*bad(0, args[0].double()))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_ungated_add_is_bitwise_the_reference(dtype: torch.dtype) -> None:
    """Ungated adds are the same fp32 operations (``x + a v``, ``- residual``) in the C++ op and the reference, so
    the outputs agree bit for bit: this pins the C++ op's vectorised narrowing (round to nearest even)."""
    tab = Tables(3, 2)
    tab.set(1, [(OP_ADD, 0, 0.3, 0.0, ALL), (OP_ADD, 1, -1.7, 0.0, ALL)])
    tab.set(2, [(OP_ADD, 2, 1e-3, 0.0, ALL)])
    for fused in (False, True):
        args = list(_batch(33, 77, dtype, fused, tab))  # H = 77: vector body and scalar tail
        args[0][:2] = 1.0  # no planted NaN / inf
        args[2][:33] = torch.arange(33, dtype=torch.int32) % 3
        out = _cpp(*args)
        assert torch.equal(_bits(out), _bits(steer_activations_reference(*args)))


@needs_ext
def test_cpp_rejects_out_of_range_rows_and_slots() -> None:
    tab = _mixed_tables(5)
    args = list(_batch(6, 16, torch.float32, False, tab))
    args[2][3] = 8  # R = 8
    with pytest.raises(RuntimeError, match="token_row"):
        _cpp(*args)
    args = list(_batch(6, 16, torch.float32, False, tab))
    args[2][:6] = 1
    args[7] = args[7].clone()
    args[7][1, 0] = 5  # S = 5
    with pytest.raises(RuntimeError, match="op_slot"):
        _cpp(*args)


# ---------------------------------------------------------------- steer_gate


def _gate_batch(t: int, h: int, dtype: torch.dtype, fused: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    residual = torch.randn(t, h, generator=g).to(dtype) if fused else torch.empty(0, dtype=dtype)
    t_max = t + 5
    token_row = torch.full((t_max,), 10**6, dtype=torch.int32)
    token_row[:t] = torch.randint(0, 6, (t,), generator=g, dtype=torch.int32)
    bank = torch.randn(4, h, generator=g) / math.sqrt(h)
    gate_slot = torch.tensor([2, 0, -1, 3, 1, 3], dtype=torch.int32)  # row 0 has a slot: still no gate
    gate_threshold = torch.tensor([0.0, 0.1, 0.0, -0.2, 0.3, 0.0])
    gate_sharpness = torch.tensor([1.0, 10.0, 1.0, 3.0, 0.5, 1000.0])  # row 5 saturates to 0 / 1
    gate_out = torch.full((t_max,), -7.0)
    return hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out


@pytest.mark.parametrize("impl", GATE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["no_residual", "fused_residual"])
def test_gate_matches_loop(impl, dtype: torch.dtype, fused: bool, device: torch.device) -> None:
    args = _gate_batch(29, 72, dtype, fused)
    t, t_max = 29, args[-1].shape[0]
    expected = loop_gate(*args[:-1], t_max=t_max, before=args[-1])
    dev_args = _to(args, _on(impl, device))
    assert impl(*dev_args) is None
    out = dev_args[-1].cpu()
    torch.testing.assert_close(out[:t], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[t:], torch.full((t_max - t,), -7.0))  # past T: untouched
    rows = args[2][:t].long()
    # Rows not gated at this layer (row 0, row 2 with slot -1) keep what they had: a row gated at an earlier
    # layer keeps its gate through later layers.
    keep = (rows == 0) | (rows == 2)
    assert torch.equal(out[:t][keep], torch.full((int(keep.sum()),), -7.0))
    assert 0.0 < float(out[:t][rows == 1].min()) and float(out[:t][rows == 1].max()) < 1.0


@pytest.mark.parametrize("impl", GATE_IMPLS)
def test_gate_empty_and_no_gates(impl, device: torch.device) -> None:
    args = list(_gate_batch(0, 16, torch.float32, False))
    dev_args = _to(args, _on(impl, device))
    impl(*dev_args)
    assert torch.equal(dev_args[-1].cpu(), args[-1])
    args = list(_gate_batch(7, 16, torch.bfloat16, True))
    args[4] = torch.full((6,), -1, dtype=torch.int32)
    dev_args = _to(args, _on(impl, device))
    impl(*dev_args)
    assert torch.equal(dev_args[-1].cpu()[:7], torch.full((7,), -7.0))  # no row gated here: nothing written


@pytest.mark.parametrize("impl", GATE_IMPLS)
def test_gates_of_different_layers_do_not_overwrite_each_other(impl, device: torch.device) -> None:
    """Row 1 is gated at an early layer, row 2 at a later one: the later layer's call leaves row 1's gate."""
    hidden, residual, token_row, bank, _, thr, sharp, gate_out = _to(_gate_batch(12, 32, torch.float32, False),
                                                                    _on(impl, device))
    token_row[:12] = torch.tensor([1, 2] * 6, dtype=torch.int32, device=token_row.device)
    early = torch.tensor([-1, 0, -1, -1, -1, -1], dtype=torch.int32, device=token_row.device)
    late = torch.tensor([-1, -1, 1, -1, -1, -1], dtype=torch.int32, device=token_row.device)
    impl(hidden, residual, token_row, bank, early, thr, sharp, gate_out)
    after_early = gate_out.cpu().clone()
    impl(hidden * 2, residual, token_row, bank, late, thr, sharp, gate_out)  # a later layer's stream
    out = gate_out.cpu()
    assert torch.equal(out[:12:2], after_early[:12:2])  # row 1 keeps its early-layer gate
    assert torch.equal(after_early[1:12:2], torch.full((6,), -7.0))  # row 2 untouched by the early call
    assert not torch.equal(out[1:12:2], after_early[1:12:2])  # and written by its own layer


def test_gate_bad_args_raise() -> None:
    args = _gate_batch(6, 16, torch.float32, False)
    for i, value in ((4, args[4].long()), (5, args[5][:3]), (7, args[7][:4]), (7, args[7].double())):
        case = tuple(value if j == i else a for j, a in enumerate(args))
        # The registered op: the C++ kernel's own checks (RuntimeError) where it is built, else the reference's.
        with pytest.raises((ValueError, RuntimeError)):
            ops.steer_gate(*case)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inside_torch_compile(backend: str) -> None:
    """A layer step (gate, then edits reading the gate) traces through the fake impls without graph breaks,
    with a dynamic token count, and matches eager."""
    tab = _mixed_tables(5)
    gslot = torch.tensor([-1, 0, 1, -1, 2, -1, 3, 0], dtype=torch.int32)
    gthr, gsharp = torch.zeros(8), torch.full((8,), 4.0)

    def step(hidden, residual, token_row, token_decode, gate, bank, kind, slot, a, b, flags):
        ops.steer_gate(hidden, residual, token_row, bank, gslot, gthr, gsharp, gate)
        out = ops.steer_activations(hidden, residual, token_row, token_decode, gate, bank, kind, slot, a, b, flags)
        return out * 2.0

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    for t in (13, 21):
        args = _batch(t, 40, torch.bfloat16, True, tab, t_max=32, seed=t)
        eager_args = tuple(x.clone() for x in args)
        out = compiled(*args)
        expected = step(*eager_args)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(args[4], eager_args[4], rtol=0, atol=0, equal_nan=True)  # gate written in place
        assert not torch.equal(args[4][:t], torch.ones(t))


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["no_residual", "fused_residual"])
@pytest.mark.parametrize("h", [576, 4096])
def test_gpu_matches_loop(dtype: torch.dtype, fused: bool, h: int) -> None:
    args = _batch(300, h, dtype, fused, _mixed_tables(5))
    cuda_args = _to(args, torch.device("cuda"))
    _assert_matches_loop(ops.steer_activations(*cuda_args), args)
    _assert_matches_loop(steer_activations_triton(*cuda_args, block_h=256), args)
    gargs = _gate_batch(300, h, dtype, fused)
    cuda_gargs = _to(gargs, torch.device("cuda"))
    ops.steer_gate(*cuda_gargs)
    torch.testing.assert_close(cuda_gargs[-1].cpu()[:300], loop_gate(*gargs[:-1], t_max=305), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_reads_the_buffers() -> None:
    """Captured once, replayed after the tables and per-token buffers change in place: same as eager."""
    dev = torch.device("cuda")
    tab = _mixed_tables(5)
    args = _to(_batch(64, 1024, torch.bfloat16, True, tab, t_max=128), dev)
    gslot = torch.tensor([-1, 0, 1, -1, 2, -1, 3, 0], dtype=torch.int32, device=dev)
    gthr, gsharp = torch.zeros(8, device=dev), torch.full((8,), 4.0, device=dev)

    def step():
        ops.steer_gate(args[0], args[1], args[2], args[5], gslot, gthr, gsharp, args[4])
        return ops.steer_activations(*args)

    step()  # warm-up (compiles the kernels)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    new = _batch(64, 1024, torch.bfloat16, True, _mixed_tables(5), t_max=128, seed=3)
    for dst, src in zip(args, new):
        dst.copy_(src.to(dev))
    gslot[1] = 4
    graph.replay()
    torch.cuda.synchronize()
    replayed = graph_out.clone()
    assert torch.equal(replayed, step())
