"""The pure parts of value-filtered decoding (``value_steer.core.vfd_math``): no vLLM."""

from __future__ import annotations

import random

import pytest
import torch

from value_steer.core.vfd_math import (
    candidate_block_row,
    candidate_logprobs,
    commit_slots,
    draw_candidates,
    mirror_slots,
    runner_capacity,
    scratch_blocks_needed,
    slot_of,
)
from value_steer.runtime.vfd_state import ScratchAllocator, ScratchExhausted

NEG = float("-inf")


# ---- capacity -----------------------------------------------------------------------------------------


def test_capacity():
    assert scratch_blocks_needed(4, 16) == 4 * 16 + 4
    assert scratch_blocks_needed(4, 16, slack=0) == 64
    assert runner_capacity(16, 64, 4) == (64, 64 + 48)
    assert runner_capacity(16, 64, 1) == (16, 64)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            scratch_blocks_needed(bad, 4)
        with pytest.raises(ValueError):
            runner_capacity(4, 8, bad)
    with pytest.raises(ValueError):
        scratch_blocks_needed(2, 2, slack=-1)


# ---- scratch allocator -----------------------------------------------------------------------------------


def test_scratch_allocator():
    a = ScratchAllocator(100, 5)
    assert (a.capacity, a.num_free, a.num_in_use) == (5, 5, 0)
    x = a.alloc(3)
    assert x == [100, 101, 102] and a.num_free == 2 and all(a.owns(b) for b in x)
    assert not a.owns(99) and not a.owns(105)
    with pytest.raises(ScratchExhausted):
        a.alloc(3)
    a.free(x[:1])
    with pytest.raises(ValueError):
        a.free(x[:1])  # double free
    with pytest.raises(ValueError):
        a.free([7])  # never allocated
    y = a.alloc(3)
    assert sorted(y) == [100, 103, 104]
    a.free(y)
    a.free(x[1:])
    assert a.num_free == 5 and a.num_in_use == 0
    assert a.alloc(0) == []
    with pytest.raises(ValueError):
        a.alloc(-1)


# ---- slot planning -----------------------------------------------------------------------------------------


def test_slot_of_and_block_rows():
    assert slot_of(7, 5, 4) == 7 * 4 + 1
    # Position 5 with block size 4: logical block 1 is the scratch block, block 0 is real.
    assert candidate_block_row([10, 11], 5, 4, 99) == [10, 99]
    # Position 8 starts logical block 2: the scratch block is appended after the two real blocks.
    assert candidate_block_row([10, 11], 8, 4, 99) == [10, 11, 99]
    assert candidate_block_row([], 0, 4, 99) == [99]
    with pytest.raises(ValueError):
        candidate_block_row([10], 9, 4, 99)


def test_commit_slots_mirrors_inside_a_block():
    src, dst = commit_slots(5, winner_block=21, real_block=11, scratch_blocks=[20, 21, 22], block_size=4)
    assert src == [21 * 4 + 1] * 3
    assert dst == [11 * 4 + 1, 20 * 4 + 1, 22 * 4 + 1]


def test_commit_slots_at_block_end_only_commits_real():
    # Position 7 is the last slot of its block: the candidates at 8 start fresh scratch blocks.
    src, dst = commit_slots(7, winner_block=20, real_block=11, scratch_blocks=[20, 21], block_size=4)
    assert (src, dst) == ([20 * 4 + 3], [11 * 4 + 3])


def test_mirror_slots():
    assert mirror_slots(11, [20, 21], 8, 4) == ([], [])
    src, dst = mirror_slots(11, [20, 21], 6, 4)
    assert src == [44, 45, 44, 45]
    assert dst == [80, 81, 84, 85]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prompt_len", [1, 4, 6])
def test_pipeline_simulation_keeps_kv_consistent(seed, prompt_len):
    """Simulated paged KV: every candidate attends exactly the committed prefix, every step.

    KV slots hold ``(position, token)``. The scheduler gives the request a real block when a
    position first needs it. Candidates write their scratch slot; the winner is committed the next
    step. Between steps the pipeline sometimes restarts (first-token path).
    """
    rng = random.Random(seed)
    bs, k = 4, 3
    kv: dict[int, tuple[int, int]] = {}
    real: list[int] = []
    next_block = [1]

    def ensure_real(pos: int) -> None:
        while len(real) <= pos // bs:
            real.append(next_block[0])
            next_block[0] += 1

    def copy(src: list[int], dst: list[int]) -> None:
        vals = [kv.get(s) for s in src]
        for d, v in zip(dst, vals):
            assert v is not None, "copied an unwritten slot"
            kv[d] = v

    committed = [rng.randrange(50) for _ in range(prompt_len)]
    for p, t in enumerate(committed):
        ensure_real(p)
        kv[slot_of(real[p // bs], p, bs)] = (p, t)
    scratch = [1000 + j for j in range(k)]

    def first_token_step(q: int) -> None:
        if q % bs:
            copy(*mirror_slots(real[q // bs], scratch, q, bs))

    q = len(committed)
    first_token_step(q)
    pending = None
    for _ in range(30):
        cands = rng.sample(range(50, 100), k)
        for j, c in enumerate(cands):
            row = candidate_block_row(real, q, bs, scratch[j])
            for p in range(q):  # what this candidate's attention reads
                assert kv.get(slot_of(row[p // bs], p, bs)) == (p, committed[p])
            kv[slot_of(scratch[j], q, bs)] = (q, c)
        w = rng.randrange(k)
        committed.append(cands[w])
        pending = (q, scratch[w])
        # Next step: the scheduler schedules the winner at q (allocating its real block).
        ensure_real(q)
        if rng.random() < 0.15:
            # The pipeline restarts: the scheduler recomputes the winner into its real slot itself.
            kv[slot_of(real[q // bs], q, bs)] = (q, committed[q])
            first_token_step(q + 1)
        else:
            pos, blk = pending
            copy(*commit_slots(pos, blk, real[pos // bs], scratch, bs))
        q += 1
    for p, t in enumerate(committed):
        assert kv[slot_of(real[p // bs], p, bs)] == (p, t)


# ---- candidate draw -------------------------------------------------------------------------------------------


def test_draw_greedy_is_top_k_in_order():
    x = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0], [1.0, 0.0, NEG, NEG, NEG]])
    toks, nv = draw_candidates(x, [True, True], 3)
    assert toks[0].tolist() == [4, 1, 2]
    assert nv.tolist() == [3, 2]
    assert toks[1].tolist() == [0, 1, 0]  # past the support: repeats column 0


def test_draw_greedy_with_first():
    x = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0]])
    toks, nv = draw_candidates(x, [True], 3, first=torch.tensor([2]))
    assert toks[0].tolist() == [2, 4, 1] and nv.tolist() == [3]
    x = torch.tensor([[NEG, 3.0, NEG, NEG, NEG]])
    toks, nv = draw_candidates(x, [True], 3, first=torch.tensor([1]))
    assert toks[0].tolist() == [1, 1, 1] and nv.tolist() == [1]


def test_draw_random_within_support_and_seeded():
    torch.manual_seed(0)
    x = torch.randn(6, 50)
    x[:, 10:] = NEG  # top-k style mask: 10 tokens left
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a, na = draw_candidates(x, [False] * 6, 4, generators=[g1] * 6)
    b, nb = draw_candidates(x, [False] * 6, 4, generators=[g2] * 6)
    assert torch.equal(a, b) and torch.equal(na, nb)
    assert (na == 4).all() and a.max() < 10
    first = torch.full((6,), 3)
    c, nc = draw_candidates(x, [False] * 6, 4, first=first, generators=[g1] * 6)
    assert (c[:, 0] == 3).all() and (nc == 4).all() and c.max() < 10


def test_draw_mixed_greedy_and_random_rows():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    toks, nv = draw_candidates(x, torch.tensor([True, False]), 4,
                               generators=[None, torch.Generator().manual_seed(0)])
    assert toks[0].tolist() == [3, 2, 1, 0]
    assert nv.tolist() == [4, 4] and set(toks[1].tolist()) <= {0, 1, 2, 3}


def test_draw_random_columns_are_independent_exact_samples():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    n = 20000
    x = torch.log(p).unsqueeze(0).expand(n, 4).contiguous()
    toks, nv = draw_candidates(x, [False] * n, 3, generators=[torch.Generator().manual_seed(1)] * n)
    assert (nv == 3).all() and (toks != 3).all()  # zero probability: never drawn
    for col in range(3):
        freq = torch.bincount(toks[:, col], minlength=4).float() / n
        assert torch.allclose(freq, p, atol=0.015), col
    # With replacement: two columns agree with probability sum(p^2).
    same = (toks[:, 0] == toks[:, 1]).float().mean().item()
    assert same == pytest.approx(float((p * p).sum()), abs=0.015)


def test_first_safe_of_random_draws_is_rejection_sampling():
    """VFD's rule over i.i.d. draws commits a sample of p restricted to the safe tokens (when any of the
    K draws is safe), else the safest: token 0 (p=0.5) unsafe, K=4 -> P(0) = 0.5^4, P(1) = (1-P(0))*0.6."""
    p = torch.tensor([0.5, 0.3, 0.2])
    n, k = 40000, 4
    x = torch.log(p).unsqueeze(0).expand(n, 3).contiguous()
    toks, _ = draw_candidates(x, [False] * n, k, generators=[torch.Generator().manual_seed(2)] * n)
    safe = toks != 0
    has_safe = safe.any(dim=1)
    first_safe = safe.float().argmax(dim=1)
    committed = torch.where(has_safe, toks.gather(1, first_safe.unsqueeze(1)).squeeze(1), toks[:, 0])
    freq = torch.bincount(committed, minlength=3).float() / n
    p0 = 0.5**k
    assert torch.allclose(freq, torch.tensor([p0, (1 - p0) * 0.6, (1 - p0) * 0.4]), atol=0.01)


def test_draw_validation():
    with pytest.raises(ValueError):
        draw_candidates(torch.zeros(3), [True], 2)
    with pytest.raises(ValueError):
        draw_candidates(torch.zeros(2, 3), [True], 2)
    with pytest.raises(ValueError):
        draw_candidates(torch.zeros(1, 3), [True], 0)
    with pytest.raises(ValueError):
        draw_candidates(torch.zeros(1, 3), [False], 2, generators=[None, None])
    toks, nv = draw_candidates(torch.zeros(1, 2), [True], 4)
    assert toks.shape == (1, 4) and nv.tolist() == [2]


# ---- logprobs ------------------------------------------------------------------------------------------------


def test_candidate_logprobs_match_vllm_ranks():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.5], [0.0, 0.0, 1.0, -1.0]])
    lp = logits.log_softmax(-1)
    toks = torch.tensor([[2, 1], [0, 1]])
    out = candidate_logprobs(lp, toks, [2, 0])
    assert out[0].ranks == [1, 3] and out[0].top_ids == [2, 0]
    assert out[0].token_logprobs == pytest.approx([lp[0, 2].item(), lp[0, 1].item()])
    assert out[0].top_logprobs == pytest.approx([lp[0, 2].item(), lp[0, 0].item()])
    # Ties: vLLM's rank counts every logprob >= the token's.
    assert out[1].ranks == [3, 3] and out[1].top_ids == []
    with pytest.raises(ValueError):
        candidate_logprobs(lp, torch.tensor([1, 2]), [1])
