"""training: feature storage, losses, AUROC, and an end-to-end fit on a planted rule."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from value_steer.core.features import FeatureDataset, FeatureFormatError, write_feature_shard, write_labels
from value_steer.core.value_head import ValueHead
from value_steer.offline.training import TrainResult, auroc, focal_loss, sequence_loss, td_coherence, train_value_head


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threading only adds overhead (and on an oversubscribed CI box
    OpenMP spin-waits make each op ~100x slower), so run these tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# synthetic data


def _planted(n_seq: int = 500, h: int = 32, seed: int = 0, strength: float = 3.0):
    """Sequences of 8-20 tokens; ~75% of tokens carry ``strength * m * w`` (m ~ N(0, 1) per sequence),
    the rest are pure noise; label = 1 iff mean_t(h_t · w) > 0. Token rows are shuffled within a sequence
    (positions say the order)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=h)
    w /= np.linalg.norm(w)
    hs, sids, poss, labels = [], [], [], {}
    for s in range(n_seq):
        t = int(rng.integers(8, 21))
        x = rng.normal(size=(t, h))
        x[rng.random(t) < 0.75] += strength * rng.normal() * w
        sid = 10_000 + 7 * s
        labels[sid] = int((x @ w).mean() > 0)
        perm = rng.permutation(t)
        hs.append(x[perm])
        sids.append(np.full(t, sid))
        poss.append(perm * 3 + 5)  # positions need not be contiguous
    return (
        torch.tensor(np.concatenate(hs), dtype=torch.float32),
        torch.tensor(np.concatenate(sids)),
        torch.tensor(np.concatenate(poss)),
        labels,
    )


# --------------------------------------------------------------------------------------------------
# storage


def test_from_arrays_groups_and_orders() -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    seq_id = torch.tensor([5, 3, 5, 3, 5, 9])
    position = torch.tensor([2, 1, 0, 0, 7, 4])
    ds = FeatureDataset.from_arrays(hidden, seq_id, position, {3: 1, 5: 0, 9: 1, 42: 0})
    assert len(ds) == 3 and ds.num_tokens == 6 and ds.hidden_size == 2
    assert ds.seq_ids.tolist() == [3, 5, 9]
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.lengths.tolist() == [2, 3, 1]
    x, y = ds[0]
    assert y == 1 and x.tolist() == [[6.0, 7.0], [2.0, 3.0]]  # seq 3: position 0 (row 3), then 1 (row 1)
    x, y = ds[1]
    assert y == 0 and x[:, 0].tolist() == [4.0, 0.0, 8.0]  # seq 5: positions 0, 2, 7


def test_from_arrays_validation() -> None:
    h = torch.zeros(3, 2)
    with pytest.raises(FeatureFormatError, match="duplicate token: seq_id 1 position 0"):
        FeatureDataset.from_arrays(h, torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0]), {1: 0, 2: 1})
    with pytest.raises(FeatureFormatError, match=r"no label.*2"):
        FeatureDataset.from_arrays(h, torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), {1: 0})
    with pytest.raises(FeatureFormatError, match="0 or 1"):
        FeatureDataset.from_arrays(h, torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), {1: 0, 2: 3})
    bad = h.clone()
    bad[1, 1] = math.nan
    with pytest.raises(FeatureFormatError, match="non-finite"):
        FeatureDataset.from_arrays(bad, torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), {1: 0, 2: 1})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_directory_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    hidden, sid, pos, labels = _planted(n_seq=30, h=8, seed=1)
    hidden = hidden.to(dtype)
    # split the rows over three shards so that sequences straddle shards
    cuts = [0, 100, 250, hidden.shape[0]]
    for i in range(3):
        a, b = cuts[i], cuts[i + 1]
        write_feature_shard(tmp_path, i, hidden[a:b], sid[a:b], pos[a:b])
    write_labels(tmp_path, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "labels.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    ds = FeatureDataset.from_dir(tmp_path)
    ref = FeatureDataset.from_arrays(hidden, sid, pos, labels)
    assert ds.hidden.dtype == dtype
    assert torch.equal(ds.hidden, ref.hidden)
    assert torch.equal(ds.offsets, ref.offsets) and torch.equal(ds.labels, ref.labels)
    assert torch.equal(ds.seq_ids, ref.seq_ids)


def test_directory_labels_safetensors_and_mixed_dtypes(tmp_path: Path) -> None:
    write_feature_shard(tmp_path, 0, torch.ones(2, 4, dtype=torch.float16), torch.tensor([1, 1]), torch.tensor([0, 1]))
    write_feature_shard(tmp_path, 1, torch.ones(1, 4, dtype=torch.bfloat16), torch.tensor([2]), torch.tensor([0]))
    save_file({"seq_id": torch.tensor([1, 2]), "label": torch.tensor([0, 1])}, str(tmp_path / "labels.safetensors"))
    ds = FeatureDataset.from_dir(tmp_path)
    assert ds.hidden.dtype == torch.float32 and ds.labels.tolist() == [0, 1]
    write_labels(tmp_path, {1: 0, 2: 1})
    with pytest.raises(FeatureFormatError, match="both"):
        FeatureDataset.from_dir(tmp_path)


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FeatureDataset.from_dir(tmp_path / "missing")
    with pytest.raises(FeatureFormatError, match="no shard"):
        FeatureDataset.from_dir(tmp_path)
    save_file(
        {"hidden": torch.zeros(2, 4), "seq_id": torch.zeros(2, dtype=torch.int64)},
        str(tmp_path / "shard-00000.safetensors"),
    )
    with pytest.raises(FeatureFormatError, match=r"missing tensor\(s\) \['position'\]"):
        FeatureDataset.from_dir(tmp_path)
    save_file(
        {"hidden": torch.zeros(2, 4), "seq_id": torch.zeros(2, dtype=torch.int32), "position": torch.arange(2)},
        str(tmp_path / "shard-00000.safetensors"),
    )
    with pytest.raises(FeatureFormatError, match="seq_id must be int64"):
        FeatureDataset.from_dir(tmp_path)
    write_feature_shard(tmp_path, 0, torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), torch.arange(2))
    write_feature_shard(tmp_path, 1, torch.zeros(2, 5), torch.ones(2, dtype=torch.int64), torch.arange(2))
    write_labels(tmp_path, {0: 0, 1: 1})
    with pytest.raises(FeatureFormatError, match="hidden size 5"):
        FeatureDataset.from_dir(tmp_path)
    (tmp_path / "shard-00001.safetensors").unlink()
    (tmp_path / "labels.json").write_text(json.dumps({"0": 2}))
    with pytest.raises(FeatureFormatError, match="must be 0 or 1"):
        FeatureDataset.from_dir(tmp_path)
    (tmp_path / "labels.json").unlink()
    with pytest.raises(FeatureFormatError, match="labels"):
        FeatureDataset.from_dir(tmp_path)


def test_split_by_sequence() -> None:
    ds = FeatureDataset.from_arrays(*_planted(n_seq=100, h=4, seed=2))
    train, val = ds.split_by_sequence(seed=3, val_frac=0.25)
    tr, va = set(train.seq_ids.tolist()), set(val.seq_ids.tolist())
    assert not tr & va and tr | va == set(ds.seq_ids.tolist())
    assert 23 <= len(va) <= 27
    # stratified: both classes in validation, in proportion
    assert 0 < int(val.labels.sum()) < len(val)
    assert abs(float(val.labels.float().mean()) - float(ds.labels.float().mean())) < 0.1
    # tokens travel with their sequence
    for part in (train, val):
        for i in range(len(part)):
            j = int((ds.seq_ids == part.seq_ids[i]).nonzero())
            assert torch.equal(part[i][0], ds[j][0]) and part[i][1] == ds[j][1]
    # reproducible and seed-dependent
    again = ds.split_by_sequence(seed=3, val_frac=0.25)[1]
    assert torch.equal(again.seq_ids, val.seq_ids)
    assert not torch.equal(ds.split_by_sequence(seed=4, val_frac=0.25)[1].seq_ids, val.seq_ids)
    with pytest.raises(ValueError, match="val_frac"):
        ds.split_by_sequence(seed=0, val_frac=1.0)


def test_batch_padding() -> None:
    hidden = torch.arange(10, dtype=torch.float16).reshape(5, 2)
    ds = FeatureDataset.from_arrays(hidden, torch.tensor([0, 0, 0, 1, 1]), torch.arange(5), {0: 1, 1: 0})
    x, mask, y = ds.batch([1, 0])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert y.tolist() == [0.0, 1.0]
    assert x[0, 2].tolist() == [0.0, 0.0] and x[0, 0].tolist() == [6.0, 7.0]


# --------------------------------------------------------------------------------------------------
# losses


def test_focal_reduces_to_alpha_weighted_bce_at_gamma_0() -> None:
    z = torch.linspace(-6, 6, 25)
    for label in (0.0, 1.0):
        y = torch.full_like(z, label)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        weight = 0.7 if label == 1.0 else 0.3  # alpha weights the positive (undesirable) class
        assert torch.allclose(focal_loss(z, y, alpha=0.7, gamma=0.0), weight * bce, atol=1e-6)


def test_focal_hand_values_and_polarity() -> None:
    # logit 0 -> p = 0.5: loss = alpha_t * 0.5^gamma * ln 2
    z = torch.zeros(2)
    y = torch.tensor([1.0, 0.0])
    out = focal_loss(z, y, alpha=0.7, gamma=1.0)
    assert torch.allclose(out, torch.tensor([0.7, 0.3]) * 0.5 * math.log(2))
    # logit 2, label 1: p = sigmoid(2); loss = 0.7 (1 - p) (-ln p)
    p = 1 / (1 + math.exp(-2))
    assert focal_loss(torch.tensor([2.0]), torch.tensor([1.0]), 0.7, 2.0).item() == pytest.approx(
        0.7 * (1 - p) ** 2 * -math.log(p), rel=1e-5
    )
    # label 0 with logit 2 is badly wrong: weighted by 1 - alpha and the focal factor p^gamma
    assert focal_loss(torch.tensor([2.0]), torch.tensor([0.0]), 0.7, 1.0).item() == pytest.approx(
        0.3 * p * -math.log(1 - p), rel=1e-5
    )
    # polarity: with alpha > 0.5 a confident mistake on an undesirable sequence costs more
    big_pos = focal_loss(torch.tensor([-3.0]), torch.tensor([1.0]), 0.9, 1.0)
    big_neg = focal_loss(torch.tensor([3.0]), torch.tensor([0.0]), 0.9, 1.0)
    assert float(big_pos) == pytest.approx(9 * float(big_neg), rel=1e-5)


def test_focal_down_weights_easy_examples_and_is_stable() -> None:
    z = torch.tensor([4.0, 50.0, -50.0, 200.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    fl = focal_loss(z, y, 0.5, 2.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert fl[0] < 0.5 * bce[0] * 0.05  # (1 - p)^2 with p = sigmoid(4) is ~3e-4
    assert torch.isfinite(fl).all() and fl[3] > 0
    fl.sum().backward()
    assert torch.isfinite(z.grad).all()
    for gamma in (0.0, 0.5):
        zz = torch.tensor([120.0, -3.0], requires_grad=True)
        focal_loss(zz, torch.tensor([1.0, 0.0]), 0.7, gamma).sum().backward()
        assert torch.isfinite(zz.grad).all()
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(z, y, alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(z, y, gamma=-1.0)


def test_td_coherence_hand_computed() -> None:
    z = torch.tensor([[0.0, 1.0, 3.0, 9.0], [2.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, False, False]])
    # seq 0: diffs 1, 2 -> (1 + 4) / 2 = 2.5 (the pad value 9 is ignored); seq 1: 0, 4, 0 -> 4/3;
    # seq 2: no pairs (excluded)
    assert td_coherence(z, mask).item() == pytest.approx((2.5 + 4 / 3) / 2)
    assert td_coherence(z[2:], mask[2:]).item() == 0.0
    zz = z.clone().requires_grad_(True)
    td_coherence(zz[2:], mask[2:]).backward()
    assert torch.equal(zz.grad, torch.zeros_like(z))


def test_sequence_loss_weights_sequences_equally() -> None:
    # one long and one short sequence: the per-sequence mean makes each count 1/2
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    y = torch.tensor([1.0, 1.0])
    per_tok = focal_loss(z, y.unsqueeze(-1), 0.7, 1.0)
    expected = (per_tok[0].mean() + per_tok[1, :2].mean()) / 2
    assert sequence_loss(z, mask, y, coh_weight=0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sequence_loss(z, mask, y, coh_weight=0.5).item() == pytest.approx(expected.item(), rel=1e-6)  # flat
    z2 = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with_coh = sequence_loss(z2, mask, y, coh_weight=0.5) - sequence_loss(z2, mask, y, coh_weight=0.0)
    assert with_coh.item() == pytest.approx(0.5 * td_coherence(z2, mask).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# auroc


def test_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, size=n)
        y[0], y[1] = 0, 1
        s = rng.normal(size=n) + y * rng.random()
        if trial % 2:
            s = np.round(s, 1)  # heavy ties
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_edge_cases() -> None:
    assert auroc([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    assert auroc([0.3, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auroc([0.1, 0.5, 0.5], [0, 0, 1]) == 0.75
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="finite"):
        auroc([0.1, math.nan], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        auroc([0.1], [0, 1])


# --------------------------------------------------------------------------------------------------
# training


def _small_train(ds: FeatureDataset, **kw) -> TrainResult:
    args = dict(
        hidden_size=ds.hidden_size,
        epochs=12,
        lr=3e-3,
        weight_decay=0.01,
        batch_sequences=32,
        coh_weight=0.1,
        alpha=0.7,
        gamma=1.0,
        patience=3,
        seed=0,
        progress=False,
    )
    args.update(kw)
    return train_value_head(ds, **args)


def test_learns_planted_rule() -> None:
    ds = FeatureDataset.from_arrays(*_planted(n_seq=500, h=32, seed=0))
    assert 0.3 < float(ds.labels.float().mean()) < 0.7
    start = time.perf_counter()
    res = _small_train(ds)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0
    assert isinstance(res.head, ValueHead) and not res.head.training
    best = res.history[res.best_epoch]
    assert best["val_loss"] == min(h["val_loss"] for h in res.history)
    assert best["val_auroc"] >= 0.95
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # the restored weights are the best epoch's: re-evaluating reproduces its validation AUROC
    val = ds.subset([int((ds.seq_ids == s).nonzero()) for s in res.val_seq_ids])
    x, mask, y = val.batch(range(len(val)))
    with torch.no_grad():
        seq_score = res.head.logit(x).masked_fill(~mask, -math.inf).amax(dim=1)
    assert auroc(seq_score.numpy(), y.numpy()) == pytest.approx(best["val_auroc"], abs=1e-9)
    assert not set(res.val_seq_ids.tolist()) & set(res.train_seq_ids.tolist())


def test_training_is_deterministic_and_leaves_global_rng_alone() -> None:
    ds = FeatureDataset.from_arrays(*_planted(n_seq=120, h=16, seed=4))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = _small_train(ds, epochs=3, patience=5)
    after = torch.rand(3)
    assert torch.equal(before, after)  # training did not consume the caller's RNG
    b = _small_train(ds, epochs=3, patience=5)
    for (ka, va), (kb, vb) in zip(a.head.state_dict().items(), b.head.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.history == b.history and a.best_epoch == b.best_epoch
    c = _small_train(ds, epochs=3, patience=5, seed=1)
    assert not torch.equal(a.head[0].weight, c.head[0].weight)


def test_early_stopping_restores_best(monkeypatch: pytest.MonkeyPatch) -> None:
    import value_steer.offline.training as tr

    ds = FeatureDataset.from_arrays(*_planted(n_seq=60, h=8, seed=5))
    losses = iter([0.9, 0.5, 0.6, 0.7, 0.4, 0.3])
    snapshots: list[torch.Tensor] = []
    real = tr._evaluate

    def fake(head, data, **kw):
        snapshots.append(head[4].bias.detach().clone())
        _, a, b = real(head, data, **kw)
        return next(losses), a, b

    monkeypatch.setattr(tr, "_evaluate", fake)
    res = _small_train(ds, epochs=6, patience=2)
    assert [h["val_loss"] for h in res.history] == [0.9, 0.5, 0.6, 0.7]  # stopped 2 epochs after the best
    assert res.best_epoch == 1
    assert torch.equal(res.head[4].bias, snapshots[1])
    assert not torch.equal(res.head[4].bias, snapshots[-1])


def test_explicit_validation_set_and_checks() -> None:
    ds = FeatureDataset.from_arrays(*_planted(n_seq=60, h=8, seed=6))
    train, val = ds.split_by_sequence(seed=9, val_frac=0.3)
    res = _small_train(train, val_dataset=val, epochs=1)
    assert res.val_seq_ids.tolist() == val.seq_ids.tolist()
    assert set(res.history[0]) == {"epoch", "train_loss", "val_loss", "val_auroc", "val_auroc_token"}
    with pytest.raises(ValueError, match="hidden_size 9"):
        _small_train(ds, hidden_size=9)
    with pytest.raises(ValueError, match="epochs"):
        _small_train(ds, epochs=0)


def test_progress_bar_can_be_shown(capsys: pytest.CaptureFixture[str]) -> None:
    ds = FeatureDataset.from_arrays(*_planted(n_seq=30, h=4, seed=8))
    _small_train(ds, epochs=1, progress=True)
    assert "value head" in capsys.readouterr().err
    _small_train(ds, epochs=1, progress=False)
    assert capsys.readouterr().err == ""
