"""score_and_select: Triton launcher (interpreter on CPU), C++ op and custom op vs the steering composite."""

from __future__ import annotations

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core.modes import MODE_ABSTAIN, MODE_OFF, MODE_VFD
from value_steer.core.row_table import RowTable
from value_steer.kernels.score_and_select import score_and_select_reference, score_and_select_triton

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")
NAN = float("nan")


def _cpp(*args):
    return value_steer.require_extension().score_and_select(*args)


IMPLS = [
    pytest.param(score_and_select_triton, id="triton"),
    pytest.param(_cpp, id="cpp", marks=needs_ext),
    pytest.param(ops.score_and_select, id="op"),
]


def _table(k: int, seed: int = 0) -> RowTable:
    """Rows 1..12 mix VFD/ABSTAIN/OFF, both directions, several K; row 0 stays off."""
    g = torch.Generator().manual_seed(seed)
    table = RowTable.empty(13)
    modes = [MODE_VFD, MODE_VFD, MODE_ABSTAIN, MODE_OFF]
    for row in range(1, 13):
        table.set_row(
            row,
            mode=modes[row % 4],
            threshold=float(torch.rand((), generator=g)),
            sign=1.0 if row % 3 else -1.0,
            num_candidates=1 + (row * 5) % (k + 2),  # includes values above K (clamped)
        )
    return table


def _batch(r: int, k: int, h: int, hidden_dtype: torch.dtype | None, table: RowTable, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(r, k, generator=g)
    values[torch.rand(r, k, generator=g) < 0.15] = NAN
    # Exact ties with the row's threshold, the +-inf corner and duplicate values (argmin ties).
    row_idx = torch.randint(0, table.num_rows, (r,), generator=g, dtype=torch.int32)
    tie = torch.rand(r, k, generator=g) < 0.1
    values = torch.where(tie, table.threshold[row_idx.long()].unsqueeze(-1).expand(r, k), values)
    if r > 3 and k > 1:
        values[3, -1] = float("inf")
        values[2, 1:] = values[2, 1]
    tokens = torch.randint(0, 50_000, (r, k), generator=g)
    logprobs = -torch.rand(r, k, generator=g) * 5
    hidden = None if hidden_dtype is None else torch.randn(r * k, h, generator=g).to(hidden_dtype)
    return values, tokens, logprobs, row_idx, hidden


def _args(values, tokens, logprobs, row_idx, hidden, table: RowTable):
    return (values, tokens, logprobs, row_idx, table.threshold, table.sign, table.mode, table.num_candidates, hidden)


def _on(impl, device: torch.device) -> torch.device:
    """Triton launchers run on `device` (CUDA natively, else the CPU interpreter); the C++ op and the
    custom op's CPU dispatch run on CPU (the CUDA dispatch is covered by the gpu tests)."""
    return device if impl is score_and_select_triton else torch.device("cpu")


def _to(args, dev: torch.device):
    return tuple(None if a is None else a.to(dev) for a in args)


def _assert_same(out, ref) -> None:
    names = ("winner_col", "winner_token", "winner_value", "winner_logprob", "intervened", "force_eos", "hidden")
    assert len(out) == len(ref) == 7
    for name, a, b in zip(names, out, ref):
        a, b = a.cpu(), b.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


SHAPES = [(1, 1), (7, 4), (64, 8), (257, 4), (257, 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("r", "k"), SHAPES)
def test_matches_reference(impl, r: int, k: int, device: torch.device) -> None:
    table = _table(k)
    batch = _batch(r, k, 0, None, table)
    args = _args(*batch, table)
    _assert_same(impl(*_to(args, _on(impl, device))), score_and_select_reference(*args))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("h", "dtype"), [(64, torch.float32), (576, torch.bfloat16), (576, torch.float16)])
def test_hidden_gather(impl, h: int, dtype: torch.dtype, device: torch.device) -> None:
    table = _table(8)
    batch = _batch(33, 8, h, dtype, table)
    args = _args(*batch, table)
    out = [t.cpu() for t in impl(*_to(args, _on(impl, device)))]
    _assert_same(out, score_and_select_reference(*args))
    winner = out[0]
    hidden = batch[-1]
    assert torch.equal(out[6], hidden[torch.arange(33) * 8 + winner])


@needs_ext
def test_cpp_hidden_4096_and_strided_inputs() -> None:
    table = _table(4)
    values, tokens, logprobs, row_idx, _ = _batch(64, 4, 0, None, table)
    hidden = torch.randn(64 * 4, 2 * 4096)[:, ::2]  # non-unit hidden stride
    values_t = values.t().contiguous().t()  # column-major values
    args = _args(values_t, tokens, logprobs, row_idx, hidden, table)
    _assert_same(_cpp(*args), score_and_select_reference(*args))


def test_triton_strided_inputs(device: torch.device) -> None:
    table = _table(4)
    values, tokens, logprobs, row_idx, _ = _batch(16, 4, 0, None, table)
    values, tokens, logprobs, row_idx = _to((values, tokens, logprobs, row_idx.long()), device)
    hidden = torch.randn(16 * 4, 128, device=device)[:, ::2]
    table = RowTable(*_to(tuple(getattr(table, c) for c in RowTable.COLUMNS), device))
    args = _args(values.t().contiguous().t(), tokens, logprobs, row_idx, hidden, table)
    _assert_same(score_and_select_triton(*args), score_and_select_reference(*args))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_off(impl, device: torch.device) -> None:
    table = _table(4)
    values, tokens, logprobs, _, hidden = _batch(9, 4, 32, torch.float32, table)
    values[:] = 0.99  # would cross every threshold
    row_idx = torch.zeros(9, dtype=torch.int32)
    args = _to(_args(values, tokens, logprobs, row_idx, hidden, table), _on(impl, device))
    col, tok, val, lp, interv, eos, hid = (t.cpu() for t in impl(*args))
    assert torch.equal(col, torch.zeros(9, dtype=torch.int64))
    assert torch.equal(tok, tokens[:, 0]) and torch.equal(val, values[:, 0]) and torch.equal(lp, logprobs[:, 0])
    assert not interv.any() and not eos.any()
    assert torch.equal(hid, hidden[torch.arange(9) * 4])


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_equal_threshold_rules(impl, device: torch.device) -> None:
    table = RowTable.empty(5)
    table.set_row(1, mode=MODE_VFD, threshold=0.5, sign=1.0, num_candidates=4)
    table.set_row(2, mode=MODE_ABSTAIN, threshold=0.5, sign=1.0, num_candidates=1)
    table.set_row(3, mode=MODE_VFD, threshold=0.5, sign=-1.0, num_candidates=4)
    table.set_row(4, mode=MODE_ABSTAIN, threshold=0.5, sign=-1.0, num_candidates=1)
    values = torch.tensor(
        [
            [NAN, NAN, NAN, NAN],  # VFD, nothing finite -> column 0, no intervention
            [0.9, NAN, 0.2, 0.1],  # VFD: NaN skipped, first safe is column 2
            [0.5, 0.5, 0.7, NAN],  # VFD: equal to threshold crosses; safest = first 0.5 -> column 0
            [0.9, 0.5, 0.8, 0.6],  # VFD: none safe; safest = column 1 (equal counts as crossing)
            [NAN, 0.1, 0.1, 0.1],  # ABSTAIN: NaN never forces EOS
            [0.5, 0.0, 0.0, 0.0],  # ABSTAIN: equal to threshold forces EOS
            [0.4, 0.0, 0.0, 0.0],  # ABSTAIN: safe
            [0.1, 0.6, 0.5, 0.7],  # VFD below: 0.1 crosses, first safe (> 0.5) is column 1
            [0.5, 0.2, 0.3, 0.1],  # ABSTAIN below: equal forces EOS
            [NAN, 0.2, 0.3, 0.1],  # ABSTAIN below: NaN, no EOS
        ]
    )
    row_idx = torch.tensor([1, 1, 1, 1, 2, 2, 2, 3, 4, 4], dtype=torch.int32)
    r = values.shape[0]
    tokens = torch.arange(r * 4).reshape(r, 4)
    logprobs = torch.zeros(r, 4)
    args = _args(values, tokens, logprobs, row_idx, None, table)
    out = [t.cpu() for t in impl(*_to(args, _on(impl, device)))]
    _assert_same(out, score_and_select_reference(*args))
    assert out[0].tolist() == [0, 2, 0, 1, 0, 0, 0, 1, 0, 0]
    assert out[4].tolist() == [False, True, False, True, False, False, False, True, False, False]
    assert out[5].tolist() == [False, False, False, False, False, True, False, False, True, False]
    assert out[6].shape == (r, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl, device: torch.device) -> None:
    table = _table(4)
    for hidden in (None, torch.empty(0, 16, dtype=torch.bfloat16)):
        args = _args(torch.empty(0, 4), torch.empty(0, 4, dtype=torch.int64), torch.empty(0, 4),
                     torch.empty(0, dtype=torch.int32), hidden, table)  # fmt: skip
        out = impl(*_to(args, _on(impl, device)))
        assert all(t.shape[0] == 0 for t in out)
        assert out[6].shape == ((0, 16) if hidden is not None else (0, 0))


def test_bad_args_raise() -> None:
    table = _table(4)
    values, tokens, logprobs, row_idx, _ = _batch(4, 4, 0, None, table)
    with pytest.raises(ValueError):
        score_and_select_triton(*_args(values.double(), tokens, logprobs, row_idx, None, table))
    with pytest.raises(ValueError):
        score_and_select_triton(*_args(values, tokens, logprobs, row_idx, torch.randn(5, 8), table))


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize(("r", "k"), [*SHAPES, (1024, 8)])
def test_gpu_matches_reference(r: int, k: int) -> None:
    table = _table(k)
    batch = _batch(r, k, 4096, torch.bfloat16, table)
    cuda_table = RowTable(*(getattr(table, c).cuda() for c in RowTable.COLUMNS))
    args_cpu = _args(*batch, table)
    args_gpu = _args(*(t.cuda() for t in batch), cuda_table)
    out = ops.score_and_select(*args_gpu)
    _assert_same([t.cpu() for t in out], score_and_select_reference(*args_cpu))
