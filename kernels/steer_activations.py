"""Per-token activation steering on the row table: ``steer_activations`` (the edits) and ``steer_gate``.

Design: ``docs/activation-steering.md``. One launch per edited layer over all ``T`` tokens of a step
(prefill chunks and decodes mixed); every token reads its request's row of the per-layer op tables:

- ``x = hidden + residual`` in fp32 (``x = hidden`` without a fused residual);
- the row's ops, in column order until the first kind outside ``{OP_ADD, OP_CAP, OP_ABLATE}`` (``OP_NONE``
  ends the list), each skipped unless its flags hold the token's kind (``FLAG_PROMPT`` / ``FLAG_DECODE``):
  ``add: x + a v``; ``cap: x + (min(max(x·u, a), b) - x·u) u``; ``ablate: x + (a - 1)(x·u) u`` with
  ``u = v / |v|`` (``v = bank[slot]`` raw, normalised on the fly); with ``FLAG_GATED``:
  ``x <- x + gate[t] (op(x) - x)``;
- output ``x' - residual`` (or ``x'``) cast to ``hidden.dtype``. Tokens of row 0, and tokens that every
  op of their row skips, get ``hidden`` copied **bitwise** (no round trip through fp32), in every
  implementation.

The math has one home, ``value_steer.core.activation`` (``add`` / ``projection_cap`` / ``ablate`` and
their per-row forms ``*_rows``, which the reference here composes).

Every op is ``x <- x + c v``, with ``c`` a scalar per (token, op): ``a`` (times the gate) for ``add``, and
from the dot ``x·v`` and ``|v|`` for cap/ablate. The Triton kernel (grid ``(T,)``, BLOCK_H chunks) keeps
the ``[M]`` coefficients in registers instead of a row of fp32 ``x``: for each op that needs a dot, one
pass over H recomputes ``x = x0 + sum_{k<j} c_k v_k`` chunk by chunk and accumulates ``x·v_j`` and
``v_j·v_j``; a final pass writes ``x0 + sum_k c_k v_k (- residual)``. So one dot op costs two passes
over H, ``n`` dot ops ``n + 1`` passes, an add-only row one pass, a passthrough token one native copy. The
C++ CPU op keeps ``x`` in an fp32 scratch row and updates it op by op. The implementations agree to
fp32 rounding (different summation orders), not bitwise, on edited tokens.

Exact identities (fp32 arithmetic, no residual): ``add`` with scale 0, ``ablate`` with scale 1 and
``cap(-inf, +inf)`` compute ``x + 0 · v``, which equals ``x`` (only a ``-0.0`` may become ``+0.0``), and the
cast back is exact, so they return ``hidden``'s values in every dtype. With a fused residual an edited
token returns ``(hidden + residual) - residual`` rounded in fp32, which need not equal ``hidden``.

``steer_gate`` writes ``gate_out[t] = sigmoid(sharpness * (x·probe - threshold))`` (``x`` as above, probe
``bank[gate_slot[row]]`` not normalised) for tokens whose row has a gate (``gate_slot >= 0``, row != 0)
and leaves every other entry as it is: the gate tables are per layer (``gate_slot`` is ``-1`` except at a row's
own gate layer), so a row gated at an earlier layer keeps its gate through the later layers' calls. Only
gated ops read ``gate``.

Inputs are persistent device buffers and nothing syncs with the host (CUDA-graph safe): the per-token
buffers are ``[T_max]`` and only their first ``T = hidden.shape[0]`` entries are read. Slots must lie in
``[0, S)`` for every op that applies (the C++ op checks, the Triton kernel does not).
"""

from __future__ import annotations

import torch

from value_steer import _ext
from value_steer.core.activation import (
    FLAG_DECODE,
    FLAG_GATED,
    FLAG_PROMPT,
    OP_ABLATE,
    OP_ADD,
    OP_CAP,
    OP_NONE,
    ablate_rows,
    add_rows,
    gate_rows,
    projection_cap_rows,
)
from value_steer.kernels._triton_utils import HAS_TRITON, next_power_of_2, require_triton, tl, triton

__all__ = [
    "FLAG_DECODE",
    "FLAG_GATED",
    "FLAG_PROMPT",
    "OP_ABLATE",
    "OP_ADD",
    "OP_CAP",
    "OP_NONE",
    "check_steer_activations_args",
    "check_steer_gate_args",
    "steer_activations",
    "steer_activations_reference",
    "steer_activations_triton",
    "steer_gate",
    "steer_gate_reference",
    "steer_gate_triton",
]

_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_len(name: str, buf: torch.Tensor, t: int | torch.SymInt) -> None:
    """``buf.shape[0] >= T`` without a guard on a symbolic ``T`` (torch.compile)."""
    n = buf.shape[0]
    if isinstance(n, torch.SymInt) or isinstance(t, torch.SymInt):
        torch._check(n >= t, lambda: f"{name} must hold at least T={t} entries, got {n}")
    elif n < t:
        raise ValueError(f"{name} must hold at least T={t} entries, got {n}")


def _check_1d(name: str, buf: torch.Tensor, dtype: torch.dtype) -> None:
    if buf.dim() != 1 or buf.dtype != dtype:
        raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {list(buf.shape)} {buf.dtype}")


def _check_common(
    hidden: torch.Tensor, residual: torch.Tensor, token_row: torch.Tensor, bank: torch.Tensor
) -> tuple[int, int, int, bool]:
    """Shared checks; returns ``(T, H, S, has_residual)``."""
    if hidden.dim() != 2 or hidden.dtype not in _HIDDEN_DTYPES:
        raise ValueError(f"hidden must be [T, H] fp32/bf16/fp16, got {list(hidden.shape)} {hidden.dtype}")
    t, h = hidden.shape
    if residual.dim() == 2 and residual.shape[0] == t and residual.shape[1] == h:
        if residual.dtype != hidden.dtype or residual.device != hidden.device:
            raise ValueError(f"residual must match hidden's dtype/device, got {residual.dtype} on {residual.device}")
        has_res = True
    elif residual.numel() == 0:
        has_res = False
    else:
        raise ValueError(f"residual must be [T, H]={[t, h]} or a 0-element tensor, got {list(residual.shape)}")
    _check_1d("token_row", token_row, torch.int32)
    _check_len("token_row", token_row, t)
    if bank.dim() != 2 or bank.shape[1] != h or bank.dtype != torch.float32:
        raise ValueError(f"bank must be [S, H={h}] fp32, got {list(bank.shape)} {bank.dtype}")
    for name, buf in (("token_row", token_row), ("bank", bank)):
        if buf.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device}, got {buf.device}")
    return t, h, bank.shape[0], has_res


def check_steer_activations_args(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    token_decode: torch.Tensor,
    gate: torch.Tensor,
    bank: torch.Tensor,
    op_kind: torch.Tensor,
    op_slot: torch.Tensor,
    op_a: torch.Tensor,
    op_b: torch.Tensor,
    op_flags: torch.Tensor,
) -> tuple[int, int, int, int, int, bool]:
    """Validate shapes/dtypes shared by every implementation; returns ``(T, H, R, M, S, has_residual)``."""
    t, h, s, has_res = _check_common(hidden, residual, token_row, bank)
    _check_1d("token_decode", token_decode, torch.int8)
    _check_len("token_decode", token_decode, t)
    _check_1d("gate", gate, torch.float32)
    _check_len("gate", gate, t)
    if op_kind.dim() != 2 or op_kind.dtype != torch.int32:
        raise ValueError(f"op_kind must be [R, M] int32, got {list(op_kind.shape)} {op_kind.dtype}")
    r, m = op_kind.shape
    for name, tab, dt in (("op_slot", op_slot, torch.int32), ("op_a", op_a, torch.float32),
                          ("op_b", op_b, torch.float32), ("op_flags", op_flags, torch.int32)):  # fmt: skip
        if tab.dim() != 2 or tab.shape[0] != r or tab.shape[1] != m or tab.dtype != dt:
            raise ValueError(f"{name} must be [R, M]={[r, m]} {dt}, got {list(tab.shape)} {tab.dtype}")
    for name, buf in (("token_decode", token_decode), ("gate", gate), ("op_kind", op_kind), ("op_slot", op_slot),
                      ("op_a", op_a), ("op_b", op_b), ("op_flags", op_flags)):  # fmt: skip
        if buf.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device}, got {buf.device}")
    return t, h, r, m, s, has_res


def check_steer_gate_args(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    bank: torch.Tensor,
    gate_slot: torch.Tensor,
    gate_threshold: torch.Tensor,
    gate_sharpness: torch.Tensor,
    gate_out: torch.Tensor,
) -> tuple[int, int, int, int, bool]:
    """Validate shapes/dtypes shared by every implementation; returns ``(T, H, R, S, has_residual)``."""
    t, h, s, has_res = _check_common(hidden, residual, token_row, bank)
    _check_1d("gate_slot", gate_slot, torch.int32)
    r = gate_slot.shape[0]
    for name, buf in (("gate_threshold", gate_threshold), ("gate_sharpness", gate_sharpness)):
        _check_1d(name, buf, torch.float32)
        if buf.shape[0] != r:
            raise ValueError(f"{name} must be [R={r}] (like gate_slot), got {list(buf.shape)}")
    _check_1d("gate_out", gate_out, torch.float32)
    _check_len("gate_out", gate_out, t)
    for name, buf in (("gate_slot", gate_slot), ("gate_threshold", gate_threshold),
                      ("gate_sharpness", gate_sharpness), ("gate_out", gate_out)):  # fmt: skip
        if buf.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device}, got {buf.device}")
    return t, h, r, s, has_res


def _stream(hidden: torch.Tensor, residual: torch.Tensor, has_res: bool) -> torch.Tensor:
    """The residual stream ``x`` in fp32."""
    return hidden.float() + residual.float() if has_res else hidden.float()


# --------------------------------------------------------------------------------------------------
# Torch references (vectorised over tokens; one step per op column, no host synchronisation)
# --------------------------------------------------------------------------------------------------


def steer_activations_reference(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    token_decode: torch.Tensor,
    gate: torch.Tensor,
    bank: torch.Tensor,
    op_kind: torch.Tensor,
    op_slot: torch.Tensor,
    op_a: torch.Tensor,
    op_b: torch.Tensor,
    op_flags: torch.Tensor,
) -> torch.Tensor:
    """Torch composite of ``value_steer.core.activation``'s per-row formulas (the semantics).

    Same arguments and result as ``steer_activations``. Column ``j`` of every token's row is applied to all
    tokens at once (``add_rows`` / ``projection_cap_rows`` / ``ablate_rows``, selected per token), then
    gated, then kept only where the op applies; edited tokens are cast back, the others are ``hidden``.
    """
    t, h, _, m, s, has_res = check_steer_activations_args(
        hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags
    )
    out = hidden.new_empty((t, h))
    if t == 0 or m == 0 or s == 0:
        return out.copy_(hidden)
    rows = token_row[:t].long()
    want = torch.where(token_decode[:t] != 0, FLAG_DECODE, FLAG_PROMPT).unsqueeze(-1)
    kind = op_kind[rows]
    flags = op_flags[rows]
    known = (kind == OP_ADD) | (kind == OP_CAP) | (kind == OP_ABLATE)
    live = known.int().cumprod(dim=1).bool()  # kind 0 (or any unknown kind) ends the list
    applies = live & ((flags & want) != 0) & (rows != 0).unsqueeze(-1)
    gated = (flags & FLAG_GATED) != 0
    g = gate[:t].unsqueeze(-1)
    x = _stream(hidden, residual, has_res)
    for j in range(m):
        ap = applies[:, j]
        v = bank[torch.where(ap, op_slot[rows, j].long(), 0)]
        a, b, k = op_a[rows, j], op_b[rows, j], kind[:, j].unsqueeze(-1)
        new = torch.where(k == OP_CAP, projection_cap_rows(x, v, a, b), ablate_rows(x, v, a))
        new = torch.where(k == OP_ADD, add_rows(x, v, a), new)
        new = torch.where(gated[:, j].unsqueeze(-1), x + g * (new - x), new)
        x = torch.where(ap.unsqueeze(-1), new, x)
    y = (x - residual.float() if has_res else x).to(hidden.dtype)
    return out.copy_(torch.where(applies.any(dim=1).unsqueeze(-1), y, hidden))


def steer_gate_reference(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    bank: torch.Tensor,
    gate_slot: torch.Tensor,
    gate_threshold: torch.Tensor,
    gate_sharpness: torch.Tensor,
    gate_out: torch.Tensor,
) -> None:
    """Torch composite of ``value_steer.core.activation.gate_rows``; writes ``gate_out[:T]`` in place."""
    t, _, _, s, has_res = check_steer_gate_args(
        hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out
    )
    if t == 0:
        return
    rows = token_row[:t].long()
    slot = gate_slot[rows].long()
    has = (slot >= 0) & (rows != 0)
    if s == 0:
        return
    probe = bank[torch.where(has, slot, 0)]
    g = gate_rows(_stream(hidden, residual, has_res), probe, gate_threshold[rows], gate_sharpness[rows])
    gate_out[:t].copy_(torch.where(has, g, gate_out[:t]))


# --------------------------------------------------------------------------------------------------
# Triton kernels: grid (T,), BLOCK_H chunks
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _pick(vec, mm, j):
        """Element ``j`` of a small register vector (a masked sum: exact, one non-zero term)."""
        return tl.sum(tl.where(mm == j, vec, 0), axis=0)

    @triton.jit
    def _stream_chunk(hidden_ptr, residual_ptr, t, hh, hm, stride_ht, stride_hh, stride_rt, stride_rh,
                      HAS_RES: tl.constexpr):  # fmt: skip
        x = tl.load(hidden_ptr + t * stride_ht + hh * stride_hh, mask=hm, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(residual_ptr + t * stride_rt + hh * stride_rh, mask=hm, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _steer_activations_kernel(
        hidden_ptr,
        residual_ptr,
        out_ptr,
        row_ptr,
        decode_ptr,
        gate_ptr,
        bank_ptr,
        kind_ptr,
        slot_ptr,
        a_ptr,
        b_ptr,
        flags_ptr,
        H,
        M,
        stride_ht,
        stride_hh,
        stride_rt,
        stride_rh,
        stride_ot,
        stride_bs,
        stride_bh,
        stride_kr,
        stride_km,
        stride_sr,
        stride_sm,
        stride_ar,
        stride_am,
        stride_br,
        stride_bm,
        stride_fr,
        stride_fm,
        HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_H: tl.constexpr,
        OP_ADD_: tl.constexpr,
        OP_CAP_: tl.constexpr,
        OP_ABLATE_: tl.constexpr,
        FLAG_PROMPT_: tl.constexpr,
        FLAG_DECODE_: tl.constexpr,
        FLAG_GATED_: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        row = tl.load(row_ptr + t).to(tl.int64)
        want = tl.where(tl.load(decode_ptr + t) != 0, FLAG_DECODE_, FLAG_PROMPT_)

        # The row's op list: columns before the first unknown kind (OP_NONE ends it) whose flags hold
        # the token's kind. Row 0 reads nothing.
        mm = tl.arange(0, BLOCK_M)
        in_m = mm < tl.where(row != 0, M, 0)
        kinds = tl.load(kind_ptr + row * stride_kr + mm * stride_km, mask=in_m, other=0)
        flags = tl.load(flags_ptr + row * stride_fr + mm * stride_fm, mask=in_m, other=0)
        known = (kinds == OP_ADD_) | (kinds == OP_CAP_) | (kinds == OP_ABLATE_)
        end = tl.min(tl.where(known, BLOCK_M, mm), axis=0)
        use = (mm < end) & ((flags & want) != 0)
        n_use = tl.sum(use.to(tl.int32), axis=0)

        if n_use == 0:
            # Passthrough: a native-dtype copy (bitwise, NaN payloads and -0.0 included).
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                hm = hh < H
                tl.store(out_ptr + t * stride_ot + hh, tl.load(hidden_ptr + t * stride_ht + hh * stride_hh, mask=hm),
                         mask=hm)  # fmt: skip
        else:
            slots = tl.load(slot_ptr + row * stride_sr + mm * stride_sm, mask=use, other=0).to(tl.int64)
            a = tl.load(a_ptr + row * stride_ar + mm * stride_am, mask=use, other=0.0)
            b = tl.load(b_ptr + row * stride_br + mm * stride_bm, mask=use, other=0.0)
            g = tl.load(gate_ptr + t)
            gmul = tl.where((flags & FLAG_GATED_) != 0, g, 1.0)
            use_kinds = tl.where(use, kinds, 0)
            # x <- x + c_j v_j for every applied op; add's coefficient is known up front.
            coefs = tl.where(use & (kinds == OP_ADD_), a * gmul, 0.0)
            vrows = bank_ptr + slots[:, None] * stride_bs

            # One dot pass per cap/ablate op, on x = x0 + sum_{k<j} c_k v_k (recomputed per chunk).
            for j in range(0, M):
                kj = _pick(use_kinds, mm, j)
                if (kj == OP_CAP_) | (kj == OP_ABLATE_):
                    prior = use & (mm < j)
                    vj_ptr = bank_ptr + _pick(slots, mm, j) * stride_bs
                    acc_xv = tl.zeros([BLOCK_H], dtype=tl.float32)
                    acc_vv = tl.zeros([BLOCK_H], dtype=tl.float32)
                    for h0 in range(0, H, BLOCK_H):
                        hh = h0 + tl.arange(0, BLOCK_H)
                        hm = hh < H
                        x = _stream_chunk(hidden_ptr, residual_ptr, t, hh, hm, stride_ht, stride_hh, stride_rt,
                                          stride_rh, HAS_RES)  # fmt: skip
                        vp = tl.load(vrows + hh[None, :] * stride_bh, mask=prior[:, None] & hm[None, :], other=0.0)
                        x += tl.sum(coefs[:, None] * vp, axis=0)
                        vj = tl.load(vj_ptr + hh * stride_bh, mask=hm, other=0.0)
                        acc_xv += x * vj
                        acc_vv += vj * vj
                    nrm = tl.sqrt(tl.sum(acc_vv, axis=0))
                    p = tl.sum(acc_xv, axis=0) / nrm  # x·u
                    aj = _pick(a, mm, j)
                    c_cap = (tl.minimum(tl.maximum(p, aj), _pick(b, mm, j)) - p) / nrm
                    c_ablate = (aj - 1.0) * p / nrm
                    c = tl.where(kj == OP_CAP_, c_cap, c_ablate) * _pick(gmul, mm, j)
                    coefs = tl.where(mm == j, c, coefs)

            # Final pass: x0 + sum_k c_k v_k, minus the residual, cast.
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                hm = hh < H
                x = tl.load(hidden_ptr + t * stride_ht + hh * stride_hh, mask=hm, other=0.0).to(tl.float32)
                if HAS_RES:
                    res = tl.load(residual_ptr + t * stride_rt + hh * stride_rh, mask=hm, other=0.0).to(tl.float32)
                    x += res
                v = tl.load(vrows + hh[None, :] * stride_bh, mask=use[:, None] & hm[None, :], other=0.0)
                x += tl.sum(coefs[:, None] * v, axis=0)
                if HAS_RES:
                    x -= res
                tl.store(out_ptr + t * stride_ot + hh, x.to(out_ptr.dtype.element_ty), mask=hm)

    @triton.jit
    def _steer_gate_kernel(
        hidden_ptr,
        residual_ptr,
        row_ptr,
        bank_ptr,
        gslot_ptr,
        gthr_ptr,
        gsharp_ptr,
        out_ptr,
        H,
        stride_ht,
        stride_hh,
        stride_rt,
        stride_rh,
        stride_bs,
        stride_bh,
        stride_gs,
        stride_gt,
        stride_gp,
        stride_o,
        HAS_RES: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        row = tl.load(row_ptr + t).to(tl.int64)
        slot = tl.load(gslot_ptr + row * stride_gs).to(tl.int64)
        if (row != 0) & (slot >= 0):
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                hm = hh < H
                x = _stream_chunk(hidden_ptr, residual_ptr, t, hh, hm, stride_ht, stride_hh, stride_rt, stride_rh,
                                  HAS_RES)  # fmt: skip
                acc += x * tl.load(bank_ptr + slot * stride_bs + hh * stride_bh, mask=hm, other=0.0)
            z = tl.load(gsharp_ptr + row * stride_gp) * (tl.sum(acc, axis=0) - tl.load(gthr_ptr + row * stride_gt))
            tl.store(out_ptr + t * stride_o, 1.0 / (1.0 + tl.exp(-z)))


def _block_h(h: int, block_m: int, block_h: int | None) -> int:
    if block_h is not None:
        return next_power_of_2(block_h)
    # The [BLOCK_M, BLOCK_H] tile of op vectors stays at <= 4096 fp32 registers per program.
    return min(next_power_of_2(h), max(64, 4096 // block_m))


def steer_activations_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    token_decode: torch.Tensor,
    gate: torch.Tensor,
    bank: torch.Tensor,
    op_kind: torch.Tensor,
    op_slot: torch.Tensor,
    op_a: torch.Tensor,
    op_b: torch.Tensor,
    op_flags: torch.Tensor,
    *,
    block_h: int | None = None,
) -> torch.Tensor:
    """Triton launcher (one launch, grid ``(T,)``); same contract as ``steer_activations``.

    ``block_h`` overrides the chunk width (rounded up to a power of two; tests use it to force chunking).
    """
    require_triton()
    t, h, _, m, _, has_res = check_steer_activations_args(
        hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags
    )
    out = torch.empty((t, h), dtype=hidden.dtype, device=hidden.device)
    if t == 0 or h == 0:
        return out
    res = residual if has_res else hidden  # dummy pointer without a residual
    block_m = next_power_of_2(m)
    _steer_activations_kernel[(t,)](
        hidden, res, out, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags,
        h, m,
        hidden.stride(0), hidden.stride(1), res.stride(0), res.stride(1), out.stride(0),
        bank.stride(0), bank.stride(1),
        op_kind.stride(0), op_kind.stride(1), op_slot.stride(0), op_slot.stride(1), op_a.stride(0), op_a.stride(1),
        op_b.stride(0), op_b.stride(1), op_flags.stride(0), op_flags.stride(1),
        HAS_RES=has_res, BLOCK_M=block_m, BLOCK_H=_block_h(h, block_m, block_h),
        OP_ADD_=OP_ADD, OP_CAP_=OP_CAP, OP_ABLATE_=OP_ABLATE,
        FLAG_PROMPT_=FLAG_PROMPT, FLAG_DECODE_=FLAG_DECODE, FLAG_GATED_=FLAG_GATED,
        num_warps=4,
    )  # fmt: skip
    return out


def steer_gate_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    bank: torch.Tensor,
    gate_slot: torch.Tensor,
    gate_threshold: torch.Tensor,
    gate_sharpness: torch.Tensor,
    gate_out: torch.Tensor,
    *,
    block_h: int | None = None,
) -> None:
    """Triton launcher (one launch, grid ``(T,)``, one pass over H); same contract as ``steer_gate``."""
    require_triton()
    t, h, _, _, has_res = check_steer_gate_args(
        hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out
    )
    if t == 0:
        return
    res = residual if has_res else hidden
    _steer_gate_kernel[(t,)](
        hidden, res, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out,
        h,
        hidden.stride(0), hidden.stride(1), res.stride(0), res.stride(1), bank.stride(0), bank.stride(1),
        gate_slot.stride(0), gate_threshold.stride(0), gate_sharpness.stride(0), gate_out.stride(0),
        HAS_RES=has_res, BLOCK_H=next_power_of_2(block_h) if block_h else min(next_power_of_2(h), 1024),
        num_warps=4,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Custom ops: CUDA = the Triton launchers; CPU = value_steer._C when built, else the references; fake = shapes
# --------------------------------------------------------------------------------------------------


# Registered through the low-level ``torch.library.Library`` API rather than ``torch.library.custom_op``: these
# two ops run at every decoder layer of every step (steering on or not), and custom_op's Python wrapper costs
# 2-5x the kernel itself at decode sizes (measured: ~30 / ~45 us per call against ~13 / ~7 us here, T=64,
# H=576). The C++ kernels validate their inputs (TORCH_CHECK), so the CPU path skips the Python checks; the
# reference path (no extension) and the fakes keep them.
_LIB = torch.library.Library("value_steer", "FRAGMENT")  # inference-only ops: no autograd formula
_LIB.define(
    "steer_activations(Tensor hidden, Tensor residual, Tensor token_row, Tensor token_decode, Tensor gate, "
    "Tensor bank, Tensor op_kind, Tensor op_slot, Tensor op_a, Tensor op_b, Tensor op_flags) -> Tensor"
)
_LIB.define(
    "steer_gate(Tensor hidden, Tensor residual, Tensor token_row, Tensor bank, Tensor gate_slot, "
    "Tensor gate_threshold, Tensor gate_sharpness, Tensor(a!) gate_out) -> ()"
)


def _steer_activations_cpu(hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b,
                           op_flags):
    args = (hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags)
    ext = _ext.extension()
    if ext is not None:
        return ext.steer_activations(*args)
    check_steer_activations_args(*args)
    return steer_activations_reference(*args)


def _steer_gate_cpu(hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out):
    args = (hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out)
    ext = _ext.extension()
    if ext is not None:
        ext.steer_gate(*args)
        return
    check_steer_gate_args(*args)
    steer_gate_reference(*args)


def _steer_activations_cuda(hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b,
                            op_flags):
    return steer_activations_triton(
        hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags
    )


def _steer_gate_cuda(hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out):
    steer_gate_triton(hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out)


_LIB.impl("steer_activations", _steer_activations_cpu, "CPU")
_LIB.impl("steer_activations", _steer_activations_cuda, "CUDA")
_LIB.impl("steer_gate", _steer_gate_cpu, "CPU")
_LIB.impl("steer_gate", _steer_gate_cuda, "CUDA")


@torch.library.register_fake("value_steer::steer_activations", lib=_LIB)
def _(hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags):
    t, h, _, _, _, _ = check_steer_activations_args(
        hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags
    )
    return hidden.new_empty((t, h))


@torch.library.register_fake("value_steer::steer_gate", lib=_LIB)
def _(hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out):
    check_steer_gate_args(hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out)


def steer_activations(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    token_decode: torch.Tensor,
    gate: torch.Tensor,
    bank: torch.Tensor,
    op_kind: torch.Tensor,
    op_slot: torch.Tensor,
    op_a: torch.Tensor,
    op_b: torch.Tensor,
    op_flags: torch.Tensor,
) -> torch.Tensor:
    """Apply every token's steering ops at one layer (``torch.ops.value_steer.steer_activations``).

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16, the layer output (the full residual stream when ``residual`` has
            no elements).
        residual: ``[T, H]``, ``hidden``'s dtype, vLLM's fused residual; or a 0-element tensor (e.g.
            ``hidden.new_empty(0)``) for none. With one, the ops edit ``x = hidden + residual`` (fp32).
        token_row: ``[T_max]`` int32, the steering row of each token (row 0 = untouched); ``[:T]`` is read.
        token_decode: ``[T_max]`` int8, 1 for a decode token, 0 for a prompt token; ``[:T]`` is read.
        gate: ``[T_max]`` fp32, the gate value of each token (1 where the row has no gate); ``[:T]`` is read.
        bank: ``[S, H]`` fp32 raw vectors (cap/ablate normalise on the fly).
        op_kind: ``[R, M]`` int32 per row and column: ``OP_NONE`` (0, ends the row's list; so does any
            unknown kind), ``OP_ADD`` (1), ``OP_CAP`` (2), ``OP_ABLATE`` (3).
        op_slot: ``[R, M]`` int32, the bank slot of the op's vector (in ``[0, S)`` where the op applies).
        op_a: ``[R, M]`` fp32, add/ablate: the scale; cap: the lower bound (``-inf`` for none).
        op_b: ``[R, M]`` fp32, cap: the upper bound (``+inf`` for none); unused otherwise.
        op_flags: ``[R, M]`` int32 bits: ``FLAG_PROMPT`` (1) edits prompt tokens, ``FLAG_DECODE`` (2) decode
            tokens, ``FLAG_GATED`` (4) gates the op: ``x <- x + gate * (op(x) - x)``.
    Returns:
        ``[T, H]`` new tensor, ``hidden``'s dtype: ``x' - residual`` (or ``x'``) for tokens edited by at least
        one op, ``hidden`` bitwise for the others (row 0, or every op skipping the token's kind). Ops apply
        in column order: ``add: x + a v``; ``cap: x + (min(max(x·u, a), b) - x·u) u``;
        ``ablate: x + (a - 1)(x·u) u``, ``u = v / |v|`` (``value_steer.core.activation``).
    """
    return torch.ops.value_steer.steer_activations(
        hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags
    )


def steer_gate(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_row: torch.Tensor,
    bank: torch.Tensor,
    gate_slot: torch.Tensor,
    gate_threshold: torch.Tensor,
    gate_sharpness: torch.Tensor,
    gate_out: torch.Tensor,
) -> None:
    """Per-token steering gate at the gate layer, in place (``torch.ops.value_steer.steer_gate``).

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16, the layer output before the layer's own edits.
        residual: ``[T, H]`` (``hidden``'s dtype) fused residual, or a 0-element tensor for none.
        token_row: ``[T_max]`` int32 steering row per token; ``[:T]`` is read.
        bank: ``[S, H]`` fp32 vector bank (the probe is used as stored, not normalised).
        gate_slot: ``[R]`` int32 bank slot of the row's probe, ``-1`` for no gate.
        gate_threshold: ``[R]`` fp32; gate_sharpness: ``[R]`` fp32.
        gate_out: ``[T_max]`` fp32, written in place.
    Returns:
        None. ``gate_out[t] = sigmoid(sharpness * (x·probe - threshold))`` with ``x = hidden + residual``
        (fp32) for ``t < T`` whose row (not 0) has a gate at this layer; every other entry is left as it is
        (a row gated at an earlier layer keeps its gate).
    """
    torch.ops.value_steer.steer_gate(
        hidden, residual, token_row, bank, gate_slot, gate_threshold, gate_sharpness, gate_out
    )
