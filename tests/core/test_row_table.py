"""rows.RowTable: buffers, row 0 reserved, validation."""

from __future__ import annotations

import pytest
import torch

from value_steer.core.modes import DIRECTION_SIGN, MODE_ABSTAIN, MODE_OFF, MODE_TOKEN, MODE_VFD, MODES
from value_steer.core.row_table import RowTable


def test_constants() -> None:
    assert MODES == {"off": 0, "abstain": 1, "vfd": 2, "token": 3}
    assert (MODE_OFF, MODE_ABSTAIN, MODE_VFD, MODE_TOKEN) == (0, 1, 2, 3)
    assert DIRECTION_SIGN == {"above": 1.0, "below": -1.0}


def test_empty_table() -> None:
    t = RowTable.empty(4)
    assert t.num_rows == 4
    assert t.threshold.dtype == torch.float32 and t.sign.dtype == torch.float32
    assert t.mode.dtype == torch.int32 and t.num_candidates.dtype == torch.int32
    assert torch.equal(t.mode, torch.zeros(4, dtype=torch.int32))
    assert torch.equal(t.num_candidates, torch.ones(4, dtype=torch.int32))
    assert torch.equal(t.sign, torch.ones(4))
    with pytest.raises(ValueError, match="num_rows"):
        RowTable.empty(0)


def test_set_and_clear_row() -> None:
    t = RowTable.empty(3)
    t.set_row(2, mode=MODE_VFD, threshold=0.25, sign=-1.0, num_candidates=4)
    assert t.mode.tolist() == [0, 0, 2]
    assert t.threshold.tolist() == [0.0, 0.0, 0.25]
    assert t.sign.tolist() == [1.0, 1.0, -1.0]
    assert t.num_candidates.tolist() == [1, 1, 4]
    t.clear_row(2)
    assert t.mode[2] == MODE_OFF and t.num_candidates[2] == 1
    # row 0 stays off through all of it
    assert t.mode[0] == MODE_OFF


@pytest.mark.parametrize("row", [0, 3, -1])
def test_row_out_of_range_or_zero(row: int) -> None:
    t = RowTable.empty(3)
    with pytest.raises(ValueError, match="row"):
        t.set_row(row, mode=MODE_ABSTAIN, threshold=0.5, sign=1.0, num_candidates=1)
    assert t.mode.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": 4}, "mode"),
        ({"mode": -1}, "mode"),
        ({"sign": 0.0}, "sign"),
        ({"sign": 2.0}, "sign"),
        ({"num_candidates": 0}, "num_candidates"),
    ],
)
def test_invalid_values_raise(kwargs: dict, field: str) -> None:
    t = RowTable.empty(2)
    args = {"mode": MODE_VFD, "threshold": 0.5, "sign": 1.0, "num_candidates": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        t.set_row(1, **args)
    # nothing was written
    assert t.mode[1] == MODE_OFF and t.num_candidates[1] == 1 and t.threshold[1] == 0.0
