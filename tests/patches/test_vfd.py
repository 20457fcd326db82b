"""Value-filtered decoding inside a real vLLM 0.32 engine (CPU, tiny random Llama, one engine).

The engine uses block size 32, so sequences cross KV blocks. It uses a 64-token batch budget, so long
prompts are prefilled in chunks alongside steered decodes. Its small KV pool forces preemption in
``test_preemption``, and prefix caching is on. ``VALUE_STEER_DEBUG=1`` makes the runner keep every
VFD step's candidates and values, which ``vfd_debug_state`` returns.
"""

from __future__ import annotations

import math
import os

import pytest

from tests.helpers import TINY_HIDDEN, make_llm, write_random_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 4
PROMPTS = ["hello world", "the quick brown fox", "a b c d e"]
BLOCK = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from value_steer.offline.models import make_tiny_llama

    # A larger init scale than the shared fixture's, so greedy text depends on context (it does not
    # repeat one token), and a wrong KV entry shows up in the tokens.
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-vfd"),
        hidden_size=TINY_HIDDEN,
        num_heads=2,
        num_kv_heads=1,
        num_layers=2,
        seed=0,
        init_std=0.5,
    )


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    return write_random_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, seed=0)




@pytest.fixture(scope="module", params=["eager", "two_phase"])
def schedule(request) -> str:
    """Every VFD test runs with both ways of forwarding the candidates (value_steer.runtime.vfd_schedule)."""
    return request.param


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory, schedule):
    return tmp_path_factory.mktemp(f"capture-{schedule}")


@pytest.fixture(scope="module")
def llm(model_dir, head_path, capture_dir, schedule):
    head = head_path
    old = os.environ.get("VALUE_STEER_DEBUG")
    os.environ["VALUE_STEER_DEBUG"] = "1"
    try:
        engine = make_llm(
            model_dir,
            {"vfd": {"value_head_path": head, "num_candidates": K, "threshold": 0.5, "schedule": schedule},
             "capture": {"dir": str(capture_dir)}},
            block_size=BLOCK,
            max_num_batched_tokens=64,
            enable_prefix_caching=True,
            num_gpu_blocks_override=24,
        )
    finally:
        if old is None:
            os.environ.pop("VALUE_STEER_DEBUG", None)
        else:
            os.environ["VALUE_STEER_DEBUG"] = old
    yield engine
    del engine


def _sp(max_tokens=24, **kw):
    from vllm import SamplingParams

    kw.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=max_tokens, **kw)


def _debug(llm):
    return llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]


def _steps(dbg, request_id):
    """The runner's VFD step records of a request (the runner's ids carry a random suffix)."""
    hits = [v for k, v in dbg["steps"].items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, f"no unique debug record for {request_id}"
    return hits[0]


def _stats(llm, request_id):
    return llm.collective_rpc("value_steer_stats", args=(request_id,))[0]["stats"]


def _flush(llm):
    """One more engine step, so the runner sees the last step's finished ids."""
    llm.generate(["x"], _sp(max_tokens=1, extra_args={"value_steer": False}), use_tqdm=False)


def _prompt_ids(llm, text):
    return llm.get_tokenizer().encode(text)


def _check_filtered(llm, outs):
    """Every output token of a steered request is a VFD winner, scored exactly once."""
    dbg = _debug(llm)
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        steps = _steps(dbg, o.request_id)
        assert [s["winner_token"] for s in steps] == toks
        st = _stats(llm, o.request_id)
        assert st["num_scored"] == len(toks)
        assert st["num_interventions"] == sum(s["winner_col"] != 0 for s in steps)
    return dbg


def test_never_intervening_is_base(llm):
    # Values lie strictly inside (0, 1): threshold 1.0 makes every candidate safe, so column 0 (the
    # natural sample) always wins. 60 tokens cross a 32-token KV block.
    base = llm.generate(PROMPTS, _sp(60, extra_args={"value_steer": False}), use_tqdm=False)
    steered = llm.generate(PROMPTS, _sp(60, extra_args={"threshold": 1.0}), use_tqdm=False)
    for b, s in zip(base, steered):
        assert s.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(s.outputs[0].token_ids) == 60
    dbg = _check_filtered(llm, steered)
    for s in steered:
        assert _stats(llm, s.request_id)["num_interventions"] == 0
    assert dbg["counters"]["steady_rows"] > 0


def test_never_intervening_is_base_when_seeded(llm):
    # Random sampling with a per-request seed: column 0 is the sampler's own draw from the request's
    # generator at every position (the first one included), so a steered request that never intervenes
    # is token for token the unsteered one.
    kw = dict(temperature=0.9, top_p=0.95, seed=7)
    base = llm.generate(PROMPTS, _sp(40, extra_args={"value_steer": False}, **kw), use_tqdm=False)
    steered = llm.generate(PROMPTS, _sp(40, extra_args={"threshold": 1.0}, **kw), use_tqdm=False)
    for b, s in zip(base, steered):
        assert s.outputs[0].token_ids == b.outputs[0].token_ids
    _check_filtered(llm, steered)
    # And the draws are random: another seed gives another text.
    other = llm.generate(PROMPTS[:1], _sp(40, extra_args={"threshold": 1.0}, **{**kw, "seed": 8}), use_tqdm=False)
    assert other[0].outputs[0].token_ids != steered[0].outputs[0].token_ids


def test_always_intervening_commits_argmin(llm):
    # Threshold 0: nothing is safe, so the safest (lowest value) candidate wins every step.
    outs = llm.generate(PROMPTS, _sp(40, extra_args={"threshold": 0.0}), use_tqdm=False)
    dbg = _check_filtered(llm, outs)
    total_interventions = 0
    for o in outs:
        for s in _steps(dbg, o.request_id):
            vals = s["values"]
            assert len(vals) == K and all(math.isfinite(v) for v in vals)
            assert s["winner_col"] == min(range(K), key=lambda k: (vals[k], k))
            assert s["winner_token"] == s["candidates"][s["winner_col"]]
            total_interventions += s["winner_col"] != 0
    assert total_interventions > 0


def test_committed_kv_matches_base(llm):
    """The steered text's KV (commit copies, scratch tails, prefix cache) is what vLLM computes for it.

    Under greedy decoding, candidate 0 of step j+1 is the argmax after the committed prefix. A fresh
    unsteered request whose prompt is that prefix must get the same next token. The check runs twice:
    once isolated by a cache salt, once able to hit the prefix-cache blocks the steered run wrote.
    """
    prompt = "the quick brown fox"
    out = llm.generate([prompt], _sp(70, extra_args={"threshold": 0.0}), use_tqdm=False)[0]
    steps = _steps(_debug(llm), out.request_id)
    committed = list(out.outputs[0].token_ids)
    ids = _prompt_ids(llm, prompt)
    probe = [5, 20, 31, 32, 33, 50, 63, 64, 68]  # around the block boundaries at 32 and 64 (with the prompt)
    for salt in ("vfd-isolated", None):
        prompts = []
        for j in probe:
            p = {"prompt_token_ids": ids + committed[: j + 1]}
            if salt:
                p["cache_salt"] = salt
            prompts.append(p)
        base = llm.generate(prompts, _sp(1, extra_args={"value_steer": False}), use_tqdm=False)
        for j, b in zip(probe, base):
            assert b.outputs[0].token_ids[0] == steps[j + 1]["candidates"][0], (salt, j)


def test_greedy_candidates_are_top_k_distinct(llm):
    prompt = "a b c d e"
    out = llm.generate([prompt], _sp(12, extra_args={"threshold": 0.0}), use_tqdm=False)[0]
    steps = _steps(_debug(llm), out.request_id)
    committed = list(out.outputs[0].token_ids)
    ids = _prompt_ids(llm, prompt)
    # The top-K of each step's distribution, from vLLM's own prompt logprobs of the committed text.
    ref = llm.generate(
        [{"prompt_token_ids": ids + committed}],
        _sp(1, prompt_logprobs=K, extra_args={"value_steer": False}),
        use_tqdm=False,
    )[0]
    for j, s in enumerate(steps):
        c = s["candidates"]
        assert len(c) == K and len(set(c)) == K
        top = ref.prompt_logprobs[len(ids) + j]
        ranked = sorted(top.values(), key=lambda lp: lp.rank)
        top_ids = [t for t, lp in sorted(top.items(), key=lambda kv: kv[1].rank) if lp.rank <= K]
        assert ranked[0].rank == 1
        assert c == top_ids[:K]


def test_random_candidates_follow_processed_distribution(llm):
    # A seeded random request next to a greedy steered one (the batch mixes greedy and random rows).
    prompt = "hello world"
    rand = _sp(16, temperature=1.0, top_k=6, seed=7, extra_args={"threshold": 0.0})
    out, greedy = llm.generate([prompt, "a b c d e"], [rand, _sp(16, extra_args={"threshold": 1.0})], use_tqdm=False)
    base = llm.generate(["a b c d e"], _sp(16, extra_args={"value_steer": False}), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == base.outputs[0].token_ids
    steps = _steps(_debug(llm), out.request_id)
    committed = list(out.outputs[0].token_ids)
    ids = _prompt_ids(llm, prompt)
    ref = llm.generate(
        [{"prompt_token_ids": ids + committed}],
        _sp(1, prompt_logprobs=6, extra_args={"value_steer": False}),
        use_tqdm=False,
    )[0]
    for j, s in enumerate(steps):
        top6 = {t for t, lp in ref.prompt_logprobs[len(ids) + j].items() if lp.rank <= 6}
        assert len(s["candidates"]) == K  # independent draws: repeats are allowed
        assert set(s["candidates"]) <= top6  # top_k=6 masks the rest of the vocabulary
    again = llm.generate([prompt], rand, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids  # seeded requests are reproducible


def test_unsteered_rows_in_mixed_batch_are_base(llm):
    off = _sp(40, extra_args={"value_steer": False})
    on = _sp(40, extra_args={"threshold": 0.0})
    prompts = ["one two three", "hello world", "the quick brown fox", "a b c d e"]
    mixed = llm.generate(prompts, [on, off, on, off], use_tqdm=False)
    base = llm.generate([prompts[1], prompts[3]], off, use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == base[0].outputs[0].token_ids
    assert mixed[3].outputs[0].token_ids == base[1].outputs[0].token_ids
    _check_filtered(llm, [mixed[0], mixed[2]])
    assert _stats(llm, mixed[1].request_id)["num_scored"] == 0


def test_chunked_prefill_mixed_with_steered_decodes(llm):
    # Three steered requests decode while a 200-token prompt is prefilled in chunks of the 64-token
    # budget; then it is steered too. Every steered token must be a scored winner.
    long_prompt = " ".join(f"w{i}" for i in range(60))
    assert len(_prompt_ids(llm, long_prompt)) > 150
    sps = [_sp(30, extra_args={"threshold": 0.0})] * 3 + [_sp(10, extra_args={"threshold": 0.0})]
    before = _debug(llm)["counters"]
    outs = llm.generate([*PROMPTS, long_prompt], sps, use_tqdm=False)
    dbg = _check_filtered(llm, outs)
    # The long request's first token came from a first-token forward while the others were steady.
    assert dbg["counters"]["first_token_forwards"] - before["first_token_forwards"] >= 2
    never = llm.generate([*PROMPTS, long_prompt], [_sp(30, extra_args={"threshold": 1.0})] * 4, use_tqdm=False)
    base = llm.generate([*PROMPTS, long_prompt], _sp(30, extra_args={"value_steer": False}), use_tqdm=False)
    for n, b in zip(never, base):
        assert n.outputs[0].token_ids == b.outputs[0].token_ids


def test_logprobs_are_those_of_the_committed_token(llm):
    prompt = "the quick brown fox"
    out = llm.generate([prompt], _sp(14, logprobs=3, extra_args={"threshold": 0.0}), use_tqdm=False)[0]
    c = out.outputs[0]
    committed = list(c.token_ids)
    assert _stats(llm, out.request_id)["num_interventions"] > 0
    ids = _prompt_ids(llm, prompt)
    ref = llm.generate(
        [{"prompt_token_ids": ids + committed}],
        _sp(1, prompt_logprobs=3, extra_args={"value_steer": False}),
        use_tqdm=False,
    )[0]
    for j, tok in enumerate(committed):
        got = c.logprobs[j]
        want = ref.prompt_logprobs[len(ids) + j]
        assert tok in got
        assert got[tok].logprob == pytest.approx(want[tok].logprob, abs=1e-4)
        assert got[tok].rank == want[tok].rank
        top_got = {t for t, lp in got.items() if lp.rank <= 3}
        top_want = {t for t, lp in want.items() if lp.rank <= 3}
        assert top_got == top_want
    assert c.cumulative_logprob == pytest.approx(
        sum(c.logprobs[j][t].logprob for j, t in enumerate(committed)), abs=1e-3
    )


def test_abort_frees_scratch(llm):
    engine = llm.llm_engine
    engine.add_request("vfd-abort", {"prompt": "hello world"}, _sp(100, extra_args={"threshold": 0.0}))
    engine.add_request("vfd-keep", {"prompt": "a b c"}, _sp(8, extra_args={"threshold": 0.0}))
    for _ in range(5):
        engine.step()
    dbg = _debug(llm)
    assert dbg["scratch_free"] == dbg["scratch_capacity"] - 2 * K
    engine.abort_request(["vfd-abort"])
    while engine.has_unfinished_requests():
        engine.step()
    _flush(llm)
    dbg = _debug(llm)
    assert dbg["scratch_free"] == dbg["scratch_capacity"]
    assert dbg["live"] == []


def test_preemption_restarts_pipeline_without_leaks(llm):
    # 6 requests x ~110 tokens need ~24 blocks of 32 tokens; the pool has 23: the scheduler preempts.
    prompts = [f"request number {i} says" for i in range(6)]
    before = _debug(llm)["counters"]["restarts"]
    steered = llm.generate(prompts, _sp(100, ignore_eos=True, extra_args={"threshold": 1.0}), use_tqdm=False)
    base = llm.generate(prompts, _sp(100, ignore_eos=True, extra_args={"value_steer": False}), use_tqdm=False)
    for s, b in zip(steered, base):
        assert s.outputs[0].token_ids == b.outputs[0].token_ids
    dbg = _check_filtered(llm, steered)
    assert dbg["counters"]["restarts"] > before
    _flush(llm)
    dbg = _debug(llm)
    assert dbg["scratch_free"] == dbg["scratch_capacity"]
    assert dbg["live"] == []


def test_sampling_params_are_honoured(llm):
    # Never intervening, steered requests must reproduce base under penalties, logit bias, min_tokens and
    # per-request K. The EOS bias (id 2) makes EOS the argmax as soon as min_tokens allows it, so
    # min_tokens must be exact (the next distribution is one output index later than vLLM's state).
    prompts = ["hello world", "the quick brown fox", "a b c d e", "one two three"]
    params = [
        dict(min_tokens=5, logit_bias={2: 100.0}),
        dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3),
        dict(),
        dict(bad_words=["a"]),
    ]
    steer = [{"threshold": 1.0}, {"threshold": 1.0}, {"threshold": 0.0, "num_candidates": 1}, {"threshold": 1.0}]
    base = llm.generate(prompts, [_sp(20, extra_args={"value_steer": False}, **p) for p in params], use_tqdm=False)
    steered = llm.generate(prompts, [_sp(20, extra_args=a, **p) for a, p in zip(steer, params)], use_tqdm=False)
    for b, s in zip(base, steered):
        assert s.outputs[0].token_ids == b.outputs[0].token_ids
    assert len(steered[0].outputs[0].token_ids) == 6 and steered[0].outputs[0].token_ids[-1] == 2
    _check_filtered(llm, steered)
    two = llm.generate(prompts[:1], _sp(12, extra_args={"threshold": 0.0, "num_candidates": 2}), use_tqdm=False)
    steps = _steps(_debug(llm), two[0].request_id)
    assert all(len(s["candidates"]) == 2 for s in steps)


def test_unfilterable_requests_are_refused_not_served_unsteered(llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"vfd cannot steer a request with logprob_token_ids"):
        llm.generate(["hello world"], _sp(max_tokens=4, logprob_token_ids=[5, 6]))
    # Opting out serves it (unsteered) and the engine keeps serving steered requests.
    out = llm.generate(["hello world"], _sp(max_tokens=4, logprob_token_ids=[5, 6], extra_args={"value_steer": False}))
    assert len(out[0].outputs[0].token_ids) == 4
    assert len(llm.generate(["hello world"], _sp(max_tokens=4))[0].outputs[0].token_ids) == 4


def test_scratch_kv_is_taken_out_of_the_scheduler_budget(llm):
    from vllm.v1.worker.cpu_worker import CPUWorker

    from value_steer.core.vfd_math import scratch_blocks_needed

    def probe(w):
        runner = w.model_runner
        # Bytes one block id occupies across all layers, read off the allocated KV tensors.
        per_block = sum(kv[0].numel() * kv.element_size() for kv in runner.kv_caches)
        return CPUWorker.determine_available_memory(w), w.determine_available_memory(), per_block, \
            runner._vfd_sched_max_seqs

    budget, planned, per_block, max_seqs = llm.collective_rpc(probe)[0]
    assert budget - planned == scratch_blocks_needed(K, max_seqs) * per_block
    assert planned > 0


def test_capture_records_the_winners_hidden_state(llm, head_path, capture_dir):
    """Decode-matched capture in VFD mode: one row per committed token, the winner's own hidden state."""
    import json

    import torch
    from safetensors.torch import load_file

    from value_steer.core.checkpoint import load_value_head

    prompt = "a b c d e"
    n = 16
    out = llm.generate([prompt], _sp(n, extra_args={"threshold": 0.0, "value_steer_capture": True}),
                       use_tqdm=False)[0]
    assert llm.collective_rpc("value_steer_flush_capture")[0] >= 1
    index = [json.loads(line) for line in (capture_dir / "requests.jsonl").read_text().splitlines()]
    seq = [r["seq_id"] for r in index if r["request_id"].startswith(out.request_id + "-")]
    assert len(seq) == 1, index
    shards = [load_file(str(f)) for f in sorted(capture_dir.glob("shard-*.safetensors"))]
    hidden = torch.cat([t["hidden"] for t in shards])
    sel = torch.cat([t["seq_id"] for t in shards]) == seq[0]
    pos = torch.cat([t["position"] for t in shards])[sel]
    order = torch.argsort(pos)
    prompt_len = len(_prompt_ids(llm, prompt))
    assert pos[order].tolist() == list(range(prompt_len, prompt_len + n))

    steps = _steps(_debug(llm), out.request_id)
    assert len(steps) == n and any(s["winner_col"] != 0 for s in steps)
    head = load_value_head(head_path, hidden_size=TINY_HIDDEN).head.eval()
    with torch.no_grad():
        vals = head.p(hidden[sel][order].float()).tolist()
    for s, v in zip(steps, vals):
        assert v == pytest.approx(s["values"][s["winner_col"]], abs=1e-5)
