"""capture_stream: flagged tokens' residual stream lands in the buffer, others untouched; opcheck; compile."""

from __future__ import annotations

import pytest
import torch

from value_steer.kernels import capture_stream


def _inputs(dtype: torch.dtype = torch.float32, residual: bool = True):
    g = torch.Generator().manual_seed(0)
    t, h = 5, 16
    hidden = torch.randn(t, h, generator=g).to(dtype)
    res = torch.randn(t, h, generator=g).to(dtype) if residual else hidden.new_empty(0)
    token_row = torch.tensor([0, 1, 2, 1, 3, 0, 0], dtype=torch.int32)
    flag = torch.tensor([0, 1, 0, 1], dtype=torch.int8)
    out = torch.full((8, h), 7.0)
    return hidden, res, token_row, flag, out


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flagged_tokens_are_written_others_kept(residual, dtype):
    hidden, res, token_row, flag, out = _inputs(dtype, residual)
    capture_stream(hidden, res, token_row, flag, out)
    x = hidden.float() + (res.float() if residual else 0)
    for t in range(8):
        want = x[t] if t < 5 and flag[int(token_row[t])] else torch.full((16,), 7.0)
        assert torch.equal(out[t], want), t


def test_bad_shapes_are_refused():
    hidden, res, token_row, flag, out = _inputs()
    with pytest.raises(ValueError, match="capture_flag"):
        capture_stream(hidden, res, token_row, flag.int(), out)
    with pytest.raises(ValueError, match="out"):
        capture_stream(hidden, res, token_row, flag, out[:2])


def test_opcheck():
    torch.library.opcheck(torch.ops.value_steer.capture_stream.default, _inputs())


def test_inside_torch_compile():
    hidden, res, token_row, flag, out = _inputs()
    ref = out.clone()
    capture_stream(hidden, res, token_row, flag, ref)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, r, tr, fl, o):
        capture_stream(h, r, tr, fl, o)
        return h * 2

    f(hidden, res, token_row, flag, out)
    assert torch.equal(out, ref)
