"""Host synchronisation budget of a steady steered step (the runtime's hot path), measured on ``meta``.

Budgets (documented in ``value_steer.runtime.state``): a steady abstention step makes ONE host->device
copy (the per-request row index, non-blocking from a pinned buffer) and nothing that blocks the host:
no device->host read, no scalar read, no data-dependent shape, no list-to-device construction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from value_steer.core.checkpoint import save_value_head
from value_steer.core.config import parse_additional_config
from value_steer.core.value_head import ValueHead
from value_steer.runtime.state import SteeringState

H = 16
META = torch.device("meta")


@pytest.fixture
def head_path(tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "head.safetensors"
    save_value_head(str(path), ValueHead(H), threshold=0.5)
    return str(path)


def _state(head_path: str, mode: str, device: torch.device, **section) -> SteeringState:
    cfg = parse_additional_config({mode: {"value_head_path": head_path, **section}})
    return SteeringState(cfg, hidden_size=H, max_num_seqs=8, device=device, max_batch_slots=8)


def _admit(state: SteeringState) -> list[str]:
    ids = ["a", "b", "c", "d"]
    state.add_request("a", None, 2, False)
    state.add_request("b", {"value_steer": False}, 2, False)
    state.add_request("c", {"threshold": 0.3}, 2, False, min_tokens=4)
    state.add_request("d", None, 2, False)
    state.update_batch(ids)
    state.flush()
    return ids


def test_steady_abstention_step_budget(head_path, sync_counter):
    state = _state(head_path, "abstain", META)
    _admit(state)
    n = 4
    hidden = torch.empty((n, H), device=META)
    sampled = torch.empty((n, 1), dtype=torch.int32, device=META)
    num_output = np.array([5, 5, 2, 5])
    with sync_counter() as c:
        state.update_batch(["a", "b", "c", "d"])  # steady: unchanged batch
        state.flush()
        rows = np.where(num_output >= state.slot_min_tokens[:n], state.slot_row[:n], 0).astype(np.int32)
        row_idx = state.upload_step_rows(rows)
        state.abstain(hidden, row_idx, sampled, state.slot_eos.device[:n])
    assert c.blocking == 0, c.log
    assert c.counts["list_to_device"] == 0, c.log
    assert c.counts["h2d"] == 1, c.log


def test_lifecycle_step_flushes_once(head_path, sync_counter):
    """Admitting requests stages host writes; the step that follows publishes them in a few bulk copies."""
    state = _state(head_path, "abstain", META)
    _admit(state)
    with sync_counter() as c:
        state.add_request("e", None, 2, False)
        state.finish_request("a")
        state.update_batch(["e", "b", "c", "d"])
        state.flush()
    assert c.blocking == 0, c.log
    # Row table (5 columns) + the stats reset index + the slot EOS table: bulk copies, not per element.
    assert c.counts["h2d"] <= 7, c.log


def test_counter_sees_syncs(sync_counter):
    """The counter is not vacuous: each kind of sync is seen."""
    x = torch.zeros(4, device=META)
    with sync_counter() as c:
        torch.arange(4).to(META)
        torch.tensor([1, 2], device=META)
        with pytest.raises((RuntimeError, NotImplementedError)):
            x.sum().item()
        with pytest.raises(NotImplementedError):
            x[x > 0]
    assert c.counts["h2d"] == 1 and c.counts["list_to_device"] == 1
    assert c.counts["scalar"] == 1 and c.counts["data_dependent"] == 1


def test_abstention_on_cpu_matches_meta_plan(head_path):
    """The same step on CPU computes real values: stats accumulate on the device and read back once."""
    state = _state(head_path, "abstain", torch.device("cpu"), threshold=0.0)
    _admit(state)
    n = 4
    hidden = torch.randn(n, H)
    sampled = torch.full((n, 1), 7, dtype=torch.int32)
    rows = np.where(np.array([5, 5, 2, 5]) >= state.slot_min_tokens[:n], state.slot_row[:n], 0).astype(np.int32)
    _, force = state.abstain(hidden, state.upload_step_rows(rows), sampled, state.slot_eos.device[:n])
    # Threshold 0: every scored row crosses; "b" is off and "c" is under min_tokens.
    assert force.tolist() == [True, False, False, True]
    assert sampled[:, 0].tolist() == [2, 7, 7, 2]
    a, b = state.stats_for("a"), state.stats_for("b")
    assert a["num_scored"] == 1 and a["forced_eos"] and a["num_interventions"] == 1
    assert b["num_scored"] == 0 and b["last_value"] is None
    assert state.counters_dict()["forced_eos"] == 2


def _vfd_setup(head_path: str, device: torch.device, k: int = 4):
    from value_steer.runtime.staging import PackedStaging
    from value_steer.runtime.vfd_state import VFDPipelines

    state = _state(head_path, "vfd", device, num_candidates=k)
    ids = ["a", "b", "c", "d"]
    for rid in ids:
        state.add_request(rid, None, 2, False)
    state.update_batch(ids)
    state.flush()
    pipes = VFDPipelines(state.rows.num_rows, k, device)
    rows = state.slot_row[:4].astype(np.int64)
    for j, r in enumerate(rows):
        pipes.open(int(r), list(range(100 + k * j, 100 + k * (j + 1))))
    pipes.commit(rows, np.full(4, 40), np.zeros(4, dtype=np.int64), np.arange(4))
    return state, pipes, rows, PackedStaging(device)


def test_steady_vfd_step_budget(head_path, sync_counter):
    """A planted steady VFD step (4 requests, K=4, all unseeded random sampling) through the runtime pieces the
    adapter runs: plan the layout, stage it, gather candidates, score and select, draw the next candidates."""
    from value_steer.kernels import copy_kv_slots
    from value_steer.runtime.vfd_step import advance, select_winners

    state, pipes, rows, staging = _vfd_setup(head_path, META)
    vocab, n_tokens = 32, 64
    input_ids = torch.zeros(n_tokens, dtype=torch.int32, device=META)
    kv = [torch.empty((300, 16, 1, 8), device=META) for _ in range(4)]  # K and V views of 2 layers
    block_table = np.arange(8 * 16).reshape(8, 16)
    batch_idx = np.arange(4)
    forward_hidden = torch.empty((n_tokens, H), device=META)
    processed = torch.empty((4, vocab), device=META)
    natural = torch.empty(4, dtype=torch.int64, device=META)
    greedy = np.zeros(4, dtype=bool)
    gen = torch.Generator()
    with sync_counter() as c:
        state.update_batch(["a", "b", "c", "d"])
        state.flush()
        q = np.full(4, 41)
        lay = pipes.plan_steady(rows, q, batch_idx, block_table, batch_idx, 16, 4, 4)
        w_tok, w_row, w_col, src, dst, cand, rows_t = staging.stage(
            [lay.write_token, lay.write_row, lay.write_col, lay.commit_src, lay.commit_dst, lay.cand_index, rows]
        )
        input_ids.index_put_((w_tok,), pipes.pending_tokens[w_row, w_col].to(torch.int32))
        copy_kv_slots(kv, src, dst)
        hidden = forward_hidden.index_select(0, cand)
        tokens = pipes.pending_tokens.index_select(0, rows_t)
        nvalid = pipes.pending_nvalid.index_select(0, rows_t)
        won = select_winners(state, rows_t, tokens, nvalid, hidden)
        advance(pipes, rows, rows_t, q, won, processed, greedy, natural, [(gen, np.arange(4))])
    assert c.counts["d2h"] == 1, c.log  # the winners [2, R], which vLLM's host-side output lists need
    assert c.counts["scalar"] == 0 and c.counts["data_dependent"] == 0, c.log
    assert c.counts["list_to_device"] == 0, c.log
    # The staged indices and the one generator group's rows: two non-blocking copies.
    assert c.counts["h2d"] == 2, c.log
    assert won.col.shape == (4,) and pipes.committed_pos[rows].tolist() == [41] * 4


def test_vfd_step_on_cpu_selects_and_advances(head_path):
    """The same runtime pieces on CPU: real winners come back to the host tables, candidates stay on device."""
    from value_steer.runtime.vfd_step import advance, select_winners

    torch.manual_seed(0)
    state, pipes, rows, _ = _vfd_setup(head_path, torch.device("cpu"))
    rows_t = torch.from_numpy(rows)
    pipes.store_candidates(rows_t, torch.arange(16).view(4, 4), torch.full((4,), 4))
    won = select_winners(state, rows_t, pipes.pending_tokens[rows_t], pipes.pending_nvalid[rows_t],
                         torch.randn(16, H))
    assert ((won.col >= 0) & (won.col < 4)).all()
    assert won.token.tolist() == [4 * j + int(c) for j, c in enumerate(won.col)]
    processed = torch.randn(4, 32)
    natural = torch.tensor([1, 2, 3, 4])
    toks, nv = advance(pipes, rows, rows_t, np.full(4, 41), won, processed, np.zeros(4, dtype=bool), natural,
                       [(torch.Generator().manual_seed(0), np.arange(4))])
    assert toks[:, 0].tolist() == [1, 2, 3, 4] and nv.tolist() == [4] * 4
    assert torch.equal(pipes.pending_tokens[rows_t], toks)
    assert pipes.committed_tok[rows].tolist() == won.token.tolist() and pipes.pending_pos[rows].tolist() == [42] * 4
    assert state.counters_dict()["tokens_scored"] == 4


def _heads_state(tmp_path, device: torch.device) -> tuple[SteeringState, list[ValueHead]]:
    heads = []
    section = {}
    for i, (name, thr) in enumerate((("a", 0.2), ("b", 0.9), ("c", 0.5))):
        torch.manual_seed(10 + i)
        head = ValueHead(H)
        with torch.no_grad():
            head[4].weight.mul_(20.0)
        save_value_head(str(tmp_path / f"{name}.safetensors"), head, threshold=thr)
        heads.append(head.eval())
        section[name] = {"path": str(tmp_path / f"{name}.safetensors")}
    cfg = parse_additional_config({"abstain": {"heads": section, "default_head": "b"}})
    return SteeringState(cfg, hidden_size=H, max_num_seqs=8, device=device, max_batch_slots=8), heads


def test_several_heads_score_each_row_by_its_own_head(tmp_path):
    """Abstention with named heads: each row's value is its request's head's, its threshold that head's sidecar's,
    all in one grouped op; the stats name the head."""
    state, heads = _heads_state(tmp_path, torch.device("cpu"))
    assert state.head_names == ("a", "b", "c") and state.head_thresholds == (0.2, 0.9, 0.5)
    state.add_request("r0", {"head": "c"}, 2, False)
    state.add_request("r1", None, 2, False)  # the default head, b
    state.add_request("r2", {"head": "a"}, 2, False)
    state.add_request("r3", {"head": "c", "threshold": 0.0}, 2, False)
    state.update_batch(["r0", "r1", "r2", "r3"])
    state.flush()
    hidden = torch.randn(4, H)
    sampled = torch.full((4, 1), 7, dtype=torch.int32)
    vals, force = state.abstain(hidden, state.upload_step_rows(state.slot_row[:4].astype(np.int32)), sampled,
                                state.slot_eos.device[:4])
    with torch.no_grad():
        want = torch.stack([heads[h].p(hidden[i:i + 1])[0] for i, h in enumerate((2, 1, 0, 2))])
    torch.testing.assert_close(vals, want, rtol=0, atol=1e-5)
    thresholds = torch.tensor([0.5, 0.9, 0.2, 0.0])
    assert force.tolist() == (vals >= thresholds).tolist()
    assert [state.stats_for(r)["head"] for r in ("r0", "r1", "r2", "r3")] == ["c", "b", "a", "c"]
    assert [state.stats_for(r)["threshold"] for r in ("r0", "r1", "r2", "r3")] == [0.5, 0.9, 0.2, 0.0]


def test_several_heads_keep_the_steady_step_budget(tmp_path, sync_counter):
    """The head column is one more row-table column: a steady step still makes one H2D copy and no read-back."""
    state, _ = _heads_state(tmp_path, META)
    state.add_request("r0", {"head": "c"}, 2, False)
    state.add_request("r1", None, 2, False)
    state.update_batch(["r0", "r1"])
    state.flush()
    hidden = torch.empty((2, H), device=META)
    sampled = torch.empty((2, 1), dtype=torch.int32, device=META)
    with sync_counter() as c:
        state.update_batch(["r0", "r1"])
        state.flush()
        row_idx = state.upload_step_rows(state.slot_row[:2].astype(np.int32))
        state.abstain(hidden, row_idx, sampled, state.slot_eos.device[:2])
    assert c.blocking == 0 and c.counts["list_to_device"] == 0 and c.counts["h2d"] == 1, c.log
