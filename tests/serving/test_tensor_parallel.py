"""Tensor parallel on vLLM CPU: with ``tensor_parallel_size=2`` abstention and VFD give the greedy tokens of
TP=1, and every rank's steering state agrees (each rank runs the steering runner on its own copy of the
logits and hidden states; only rank 0's tokens reach the scheduler, so a rank that picked another winner
would decode from a different history than the one returned)."""

from __future__ import annotations

import gc
import os

import pytest

from tests.helpers import TINY_HIDDEN, make_llm, write_random_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU binds one core per rank")]

PROMPTS = ["hello world", "the cat sat on", "my flight was cancelled and", "once upon a time"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return write_random_head(tmp_path_factory.mktemp("head") / "h.safetensors", TINY_HIDDEN, seed=0)


def _generate(model, config: dict, tp: int, extra_args: dict) -> tuple[list[list[int]], list[list[dict]]]:
    """Greedy tokens per prompt, and per prompt the stats every rank holds."""
    import vllm.envs as envs
    from vllm import SamplingParams

    with pytest.MonkeyPatch.context() as mp:
        if tp > 1:
            # One OpenMP core list per rank ("0|1"); vLLM reads it from its (possibly frozen) env cache.
            mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
            envs.disable_envs_cache()
        llm = make_llm(model, config, tensor_parallel_size=tp, max_num_seqs=8)
        try:
            params = SamplingParams(max_tokens=12, temperature=0.0, extra_args=extra_args)
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            stats = [[r["stats"] for r in llm.collective_rpc("value_steer_stats", args=(o.request_id,))]
                     for o in outs]
        finally:
            del llm
            gc.collect()
            envs.disable_envs_cache()
    return tokens, stats


def _same(a: dict, b: dict) -> bool:
    keys = ("mode", "num_scored", "num_interventions", "forced_eos")
    return all(a[k] == b[k] for k in keys) and (a["last_value"] is None) == (b["last_value"] is None) and (
        a["last_value"] is None or abs(a["last_value"] - b["last_value"]) < 1e-4)


@pytest.mark.parametrize(("section", "extra_args"), [
    # Threshold 0.5 over a random head: some prompts are stopped early, some are not.
    ("abstain", {"threshold": 0.5}),
    # Direction below, threshold 1: nothing is safe, the highest-valued of the top 4 wins, and on this head it
    # is not always the argmax (2-5 replaced tokens per prompt).
    ("vfd", {"threshold": 1.0}),
])
def test_tp2_matches_tp1_and_ranks_agree(tiny_model_dir, head, section, extra_args):
    vfd = {"num_candidates": 4, "direction": "below"} if section == "vfd" else {}
    config = {section: {"value_head_path": head, **vfd}}
    tokens1, stats1 = _generate(tiny_model_dir, config, 1, extra_args)
    tokens2, stats2 = _generate(tiny_model_dir, config, 2, extra_args)
    assert tokens2 == tokens1
    for per_rank, (single,) in zip(stats2, stats1):
        assert len(per_rank) == 2
        assert all(_same(r, per_rank[0]) for r in per_rank), per_rank
        assert _same(per_rank[0], single), (per_rank[0], single)
    # The test is not vacuous: steering acted on some prompt.
    assert any(s[0]["num_interventions"] for s in stats1), stats1
