"""Training the logit-steering generator: pairs, the length-normalised log-likelihoods, the DPO-style loss falling on a
planted preference (synthetic features: fast), determinism, the capture alignment (state at p -> token at p + 1),
the lm_head read, and (engine) ``value-steer train-logit`` end to end on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from value_steer.core.features import CAPTURE_INDEX, write_feature_shard
from value_steer.core.logit_steer import LogitSteerGenerator, load_logit_steer
from value_steer.offline.logit_training import (
    Response,
    dpo_loss,
    load_lm_head,
    load_responses,
    mean_logprobs,
    preference_pairs,
    steered_logprobs,
    train_generator,
)

H, V = 16, 30
GOOD, BAD = list(range(0, 5)), list(range(10, 15))


def test_preference_pairs_are_every_combination_within_a_prompt():
    prompts = [0, 0, 0, 1, 1, 2, 2]
    negative = [False, True, True, False, False, True, False]
    pairs = preference_pairs(prompts, negative)
    assert pairs.tolist() == [[0, 1], [0, 2], [6, 5]]  # prompt 1 has no rejected response: no pair
    assert preference_pairs([0, 1], [False, True]).shape == (0, 2)


def test_mean_logprobs_and_loss():
    torch.manual_seed(0)
    lm_head = torch.randn(V, H)
    hidden, targets = torch.randn(5, H), torch.tensor([1, 2, 3, 4, 5])
    lp = mean_logprobs(None, lm_head, hidden, targets, [2, 3])
    full = (hidden @ lm_head.t()).log_softmax(-1)[torch.arange(5), targets]
    torch.testing.assert_close(lp, torch.stack([full[:2].mean(), full[2:].mean()]))
    gen = LogitSteerGenerator(H, V, 2, 3)  # untrained: W_up = 0, the base exactly
    assert torch.equal(mean_logprobs(gen, lm_head, hidden, targets, [2, 3]), lp)
    loss = dpo_loss(torch.tensor([0.0, -1.0]), torch.tensor([0.0, -3.0]), beta=2.0)
    assert float(loss) == pytest.approx((np.log(2) + np.log1p(np.exp(-4.0))) / 2, rel=1e-6)


def _planted(n_prompts: int = 12, seed: int = 0) -> tuple[list[Response], np.ndarray, torch.Tensor]:
    """Chosen responses say GOOD tokens, rejected ones BAD tokens; the base slightly prefers BAD."""
    g = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(V, H, generator=g) * 0.3
    responses = []
    for p in range(n_prompts):
        for neg in (False, False, True, True):
            hidden = torch.randn(6, H, generator=g)
            pool = BAD if neg else GOOD
            targets = torch.tensor([pool[int(i)] for i in torch.randint(0, 5, (6,), generator=g)])
            responses.append(Response(prompt=p, hidden=hidden, targets=targets, negative=neg))
    with torch.no_grad():
        lm_head[BAD] += 0.2 * torch.randn(H, generator=g)  # a base preference to overcome
    pairs = preference_pairs([r.prompt for r in responses], [r.negative for r in responses])
    return responses, pairs, lm_head


def test_training_reduces_the_loss_on_a_planted_preference():
    responses, pairs, lm_head = _planted()
    res = train_generator(responses, pairs, lm_head, rank=2, gate_hidden=4, epochs=15, lr=3e-2, batch_prompts=3,
                          val_frac=0.25, seed=0, progress=False)
    first, best = res.history[0], res.history[res.best_epoch + 1]
    assert res.n_train_pairs == 36 and res.n_val_pairs == 12  # 9 + 3 prompts x 4 pairs
    assert best["val_loss"] < 0.5 * first["val_loss"]
    assert best["val_accuracy"] == 1.0 and first["val_accuracy"] < 1.0  # held-out prompts, not memorised pairs
    assert res.history[-1]["train_loss"] < res.history[1]["train_loss"]
    assert float(res.generator.w_up[GOOD].detach().mean()) != 0.0 and not res.generator.training


def test_kl_from_the_base():
    torch.manual_seed(0)
    lm_head = torch.randn(V, H)
    hidden, targets = torch.randn(5, H), torch.tensor([1, 2, 3, 4, 5])
    gen = LogitSteerGenerator(H, V, 2, 3)
    assert float(steered_logprobs(gen, lm_head, hidden, targets, [5])[1]) == 0.0  # untrained: the base exactly
    with torch.no_grad():
        gen.w_up.normal_()
    _, kl = steered_logprobs(gen, lm_head, hidden, targets, [5])
    base = (hidden @ lm_head.t()).log_softmax(-1)
    steered = gen(hidden, hidden @ lm_head.t(), 1.0).log_softmax(-1)
    ref = (steered.exp() * (steered - base)).sum(-1).mean()
    torch.testing.assert_close(kl, ref)
    assert float(kl) > 0.0 and kl.requires_grad


def test_kl_weight_keeps_the_generator_closer_to_the_base():
    """The KL term trades preference margin for fluency: a heavy weight leaves a smaller KL from the base."""
    responses, pairs, lm_head = _planted()
    kw = dict(rank=2, gate_hidden=4, epochs=8, lr=3e-2, batch_prompts=3, val_frac=0.25, seed=0, progress=False)
    free = train_generator(responses, pairs, lm_head, **kw)
    tied = train_generator(responses, pairs, lm_head, kl_weight=5.0, **kw)
    kl_free = free.history[free.best_epoch + 1]["val_kl"]
    kl_tied = tied.history[tied.best_epoch + 1]["val_kl"]
    assert 0.0 < kl_tied < 0.5 * kl_free
    assert tied.history[0]["val_kl"] == 0.0 and tied.history[0]["val_loss"] == tied.history[0]["val_dpo"]
    with pytest.raises(ValueError, match="kl_weight"):
        train_generator(responses, pairs, lm_head, kl_weight=-1.0, **kw)


def test_training_is_deterministic():
    responses, pairs, lm_head = _planted(n_prompts=4)
    runs = [train_generator(responses, pairs, lm_head, rank=2, gate_hidden=4, epochs=2, lr=1e-2, batch_prompts=2,
                            seed=3, progress=False) for _ in range(2)]
    for a, b in zip(runs[0].generator.weights(), runs[1].generator.weights()):
        assert torch.equal(a, b)
    assert runs[0].history == runs[1].history


def test_no_pairs_is_an_error():
    responses, _, lm_head = _planted(n_prompts=2)
    with pytest.raises(ValueError, match="no preference pairs"):
        train_generator(responses, np.zeros((0, 2), dtype=np.int64), lm_head, progress=False)


def test_load_responses_aligns_state_p_with_token_p_plus_one(tmp_path):
    cap = tmp_path / "capture"
    # Request "a": prompt of 3 tokens, 4 output tokens -> states at positions 3, 4, 5 (the prompt's last state,
    # position 2, is not captured). Request "b": one output token -> no state.
    hidden = torch.arange(3 * H, dtype=torch.float32).reshape(3, H)
    write_feature_shard(cap, 0, hidden[[2, 0, 1]], torch.tensor([0, 0, 0]), torch.tensor([5, 3, 4]))
    (cap / CAPTURE_INDEX).write_text(json.dumps({"seq_id": 0, "request_id": "a-1f"}) + "\n")
    records = [{"prompt": 0, "request_id": "a", "seq_id": 0, "prompt_ids": [7, 8, 9], "token_ids": [10, 11, 12, 13],
                "text": ""},
               {"prompt": 0, "request_id": "b", "seq_id": None, "prompt_ids": [7], "token_ids": [5], "text": ""}]
    out = load_responses(tmp_path, records, [False, True])
    assert len(out) == 1
    assert out[0].targets.tolist() == [11, 12, 13] and torch.equal(out[0].hidden, hidden)


def test_load_lm_head_tied_and_untied(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from value_steer.offline.models import make_tiny_llama

    tied = load_lm_head(tiny_model_dir)
    assert torch.equal(tied, load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"])
    untied_dir = make_tiny_llama(tmp_path / "untied", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=1,
                                 tie_word_embeddings=False)
    untied = load_lm_head(untied_dir)
    assert torch.equal(untied, load_file(str(untied_dir / "model.safetensors"))["lm_head.weight"])


@pytest.mark.vllm
@pytest.mark.slow
def test_train_logit_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """``value-steer train-logit``'s stages on the tiny model: sampling with capture, a judge, training, the checkpoint
    with its reproduce command; the checkpoint fits the model it was trained on."""
    pytest.importorskip("vllm")
    from value_steer.offline.cli import build_parser
    from value_steer.offline.logit_training import run

    out = tmp_path / "gen.safetensors"
    argv = ["train-logit", "--model", str(tiny_model_dir), "--n-prompts", "6", "--samples-per-prompt", "4",
            "--max-tokens", "16", "--rank", "2", "--gate-hidden", "4", "--epochs", "2", "--batch-prompts", "2",
            "--work", str(tmp_path / "work"), "--out", str(out)]
    args = build_parser().parse_args(argv)

    def judge(texts):  # a deterministic stand-in for VADER on the tiny model's random text: every prompt gets both
        return np.array([i % 2 == 1 for i in range(len(texts))])

    res = run(args, judge=judge, engine_kwargs={"max_model_len": 256, "max_num_seqs": 16, "kv_use": "test"})
    ckpt = load_logit_steer(out, hidden_size=64, vocab_size=512)
    assert ckpt.generator.rank == 2 and ckpt.training["data"]["pairs"] == 6 * 4
    assert ckpt.command.startswith("value-steer train-logit --model ") and "--n-prompts 6" in ckpt.command
    assert ckpt.training["runtime_s"]["total"] > 0 and len(res.history) == 3
    samples = json.loads((tmp_path / "work" / "samples.json").read_text())
    assert len(samples) == 24 and len({tuple(s["token_ids"]) for s in samples}) > 20  # distinct seeds per sample
    # A second run reuses the samples (no engine) and trains the same generator.
    args.out = str(tmp_path / "again.safetensors")
    run(args, judge=judge)
    again = load_logit_steer(args.out)
    for a, b in zip(ckpt.generator.weights(), again.generator.weights()):
        assert torch.equal(a, b)
