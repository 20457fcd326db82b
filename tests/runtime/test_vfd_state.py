"""VFDPipelines: per-row pipeline tables; the vectorised steady layout against the per-row reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from value_steer.core.vfd_math import candidate_block_row, commit_slots, slot_of
from value_steer.runtime.vfd_state import VFDPipelines


def test_open_close_reset_and_steady_mask():
    p = VFDPipelines(num_rows=5, k_max=4, device=torch.device("cpu"))
    p.open(2, [10, 11, 12])
    assert p.k[2] == 3 and p.scratch[2].tolist() == [10, 11, 12, -1]
    rows = np.array([2])
    assert not p.steady_mask(rows, np.array([9]), np.array([5]))[0]
    p.commit(rows, np.array([9]), np.array([1]), np.array([5]))
    assert p.steady_mask(rows, np.array([9]), np.array([5]))[0]
    assert not p.steady_mask(rows, np.array([9]), np.array([6]))[0]  # another token at 9: restart
    assert not p.steady_mask(rows, np.array([10]), np.array([5]))[0]
    p.reset(rows)
    assert not p.steady_mask(rows, np.array([9]), np.array([5]))[0] and p.k[2] == 3
    with pytest.raises(ValueError, match="already has a pipeline"):
        p.open(2, [1])
    assert p.close(2) == [10, 11, 12] and p.k[2] == 0
    with pytest.raises(ValueError, match=r"1\.\.4"):
        p.open(3, [1, 2, 3, 4, 5])


@pytest.mark.parametrize("seed", range(6))
def test_plan_steady_matches_per_row_reference(seed):
    """The vectorised layout equals the per-row functions the pipeline was first written with."""
    rng = np.random.default_rng(seed)
    bs, k_max, n_rows = 4, 4, 9
    p = VFDPipelines(n_rows, k_max, torch.device("cpu"))
    s = 5
    rows = rng.choice(np.arange(1, n_rows), size=s, replace=False)
    batch_idx = rng.permutation(8)[:s]
    table = rng.integers(0, 50, size=(8, 16))
    next_block = 100
    for r in rows:
        k = int(rng.integers(1, k_max + 1))
        p.open(int(r), list(range(next_block, next_block + k)))
        next_block += k
    q = rng.integers(5, 40, size=s)
    p.commit(rows, q - 1, np.array([rng.integers(0, p.k[r]) for r in rows]), rng.integers(0, 9, size=s))
    token_index = rng.permutation(30)[:s]
    lay = p.plan_steady(rows, q, token_index, table, batch_idx, bs, first_extra_row=8, first_extra_token=30)

    src, dst, cand, writes, extra = [], [], np.zeros((s, k_max), dtype=np.int64), [], 0
    for j, r in enumerate(rows):
        k, scr = int(p.k[r]), p.scratch[r, : p.k[r]].tolist()
        c, w = int(q[j]) - 1, int(p.committed_col[r])
        sj, dj = commit_slots(c, scr[w], int(table[batch_idx[j], c // bs]), scr, bs)
        src += sj
        dst += dj
        cand[j, :] = token_index[j]
        writes.append((token_index[j], r, 0, q[j], slot_of(scr[0], int(q[j]), bs)))
        for kk in range(1, k):
            t = 30 + extra
            cand[j, kk] = t
            writes.append((t, r, kk, q[j], slot_of(scr[kk], int(q[j]), bs)))
            real = table[batch_idx[j]].tolist()
            assert candidate_block_row(real, int(q[j]), bs, scr[kk])[-1] == lay.extra_block[extra]
            extra += 1
    assert sorted(zip(src, dst)) == sorted(zip(lay.commit_src.tolist(), lay.commit_dst.tolist()))
    assert np.array_equal(lay.cand_index, cand)
    got = sorted(zip(lay.write_token.tolist(), lay.write_row.tolist(), lay.write_col.tolist(),
                     lay.write_pos.tolist(), lay.write_slot.tolist()))
    assert got == sorted(tuple(int(x) for x in w) for w in writes)
    assert lay.num_extra == extra and lay.extra_rows.tolist() == list(range(8, 8 + extra))
