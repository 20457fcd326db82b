"""Training the value head on captured features (no backbone needed).

Features and labels are read in the format of :mod:`value_steer.core.features` (shards of decode-matched
hidden states plus per-sequence labels, 0 = safe, 1 = undesirable).

Loss (per batch of padded sequences): focal loss on the logits with the sequence label broadcast to
every token, averaged over each sequence's tokens and then over sequences, plus
``coh_weight * td_coherence`` (squared change of the logit between consecutive tokens).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from value_steer.core.features import FeatureDataset
from value_steer.core.value_head import ValueHead

# --------------------------------------------------------------------------------------------------
# Loss


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.7, gamma: float = 1.0) -> torch.Tensor:
    """Element-wise binary focal loss on logits (no reduction).

    ``-alpha_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(logit)``, ``p_t = p`` and ``alpha_t = alpha`` for
    label 1 (undesirable, the positive class), ``p_t = 1 - p`` and ``alpha_t = 1 - alpha`` for label 0. At
    ``gamma = 0`` it is the alpha-weighted binary cross-entropy.

    Args:
        logits: ``[...]`` float logits.
        labels: ``[...]`` (broadcastable) 0/1 labels, any dtype.
        alpha: weight of the positive class, in [0, 1].
        gamma: focusing parameter, >= 0.
    Returns:
        ``[...]`` fp32 per-element losses.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not gamma >= 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    z = logits.float()
    y = torch.broadcast_to(labels.to(z.dtype), z.shape)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")  # -log p_t
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    if gamma == 0.0:
        return alpha_t * ce
    one_minus_pt = (-torch.expm1(-ce)).clamp_min(1e-12)  # 1 - p_t, accurate near p_t = 1
    return alpha_t * one_minus_pt.pow(gamma) * ce


def _td_per_sequence(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean squared consecutive-logit difference [B], has_pair [B] bool)``."""
    pair = mask[:, 1:] & mask[:, :-1]
    diff2 = (logits[:, 1:] - logits[:, :-1]).float().pow(2) * pair
    n = pair.sum(dim=1)
    return diff2.sum(dim=1) / n.clamp_min(1), n > 0


def td_coherence(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Temporal coherence penalty on a padded batch.

    For each sequence, the mean over its consecutive valid token pairs of ``(z_{t+1} - z_t)^2``; then the
    mean over the sequences that have at least one pair (0 when none has).

    Args:
        logits: ``[B, T]`` logits ``z``.
        mask: ``[B, T]`` bool, True on real tokens.
    Returns:
        scalar fp32.
    """
    per_seq, has = _td_per_sequence(logits, mask)
    if not bool(has.any()):
        return logits.float().sum() * 0.0
    return per_seq[has].mean()


def _focal_per_sequence(
    logits: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """``[B]`` masked mean over tokens of the focal loss with the sequence label broadcast."""
    fl = focal_loss(logits, labels.unsqueeze(-1), alpha, gamma) * mask
    return fl.sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def sequence_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.7,
    gamma: float = 1.0,
    coh_weight: float = 0.1,
) -> torch.Tensor:
    """Training loss on a padded batch: mean over sequences of the per-sequence mean focal loss, plus
    ``coh_weight * td_coherence``.

    Args:
        logits: ``[B, T]``; mask: ``[B, T]`` bool; labels: ``[B]`` sequence labels (0/1).
    Returns:
        scalar fp32.
    """
    return _focal_per_sequence(logits, mask, labels, alpha, gamma).mean() + coh_weight * td_coherence(logits, mask)


# --------------------------------------------------------------------------------------------------
# Metrics


def auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties given average ranks.

    Args:
        scores: ``[n]`` finite scores (higher = more positive).
        labels: ``[n]`` 0/1 (1 = positive).
    Returns:
        AUROC in [0, 1]; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    pos = y == 1
    n1 = int(pos.sum())
    n0 = int(s.size - n1)
    if n1 == 0 or n0 == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average 1-based ranks over tie groups
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """Outcome of :func:`train_value_head`.

    Attributes:
        head: the trained head with the best-validation-loss weights restored (fp32, ``eval()``, on CPU).
        history: one dict per epoch run: ``epoch`` (0-based), ``train_loss``, ``val_loss``, ``val_auroc``
            (sequence level, score = ``max_t p_t``, the quantity the abstention rule thresholds) and
            ``val_auroc_token`` (every token scored against its sequence's label).
        best_epoch: 0-based index into ``history`` of the restored weights.
        train_seq_ids, val_seq_ids: ``[S]`` int64 sequence ids of the two parts (calibrate on neither
            set's training part).
    """

    head: ValueHead
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    train_seq_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    val_seq_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    order = list(order)
    for i in range(0, len(order), size):
        yield order[i : i + size]


@torch.no_grad()
def _evaluate(
    head: ValueHead,
    data: FeatureDataset,
    *,
    batch_sequences: int,
    alpha: float,
    gamma: float,
    coh_weight: float,
    device: torch.device,
) -> tuple[float, float, float]:
    """``(loss, sequence AUROC of max_t logit, token AUROC)`` over the whole dataset, independent of batching."""
    head.eval()
    focal_sum, n_seq, coh_sum, n_coh = 0.0, 0, 0.0, 0
    seq_scores: list[np.ndarray] = []
    tok_scores: list[np.ndarray] = []
    tok_labels: list[np.ndarray] = []
    for idx in _batches(range(len(data)), batch_sequences):
        x, mask, y = data.batch(idx, device)
        z = head.logit(x)
        focal_sum += float(_focal_per_sequence(z, mask, y, alpha, gamma).sum())
        n_seq += len(idx)
        per, has = _td_per_sequence(z, mask)
        coh_sum += float(per[has].sum())
        n_coh += int(has.sum())
        seq_scores.append(z.masked_fill(~mask, -math.inf).amax(dim=1).cpu().numpy())
        tok_scores.append(z[mask].cpu().numpy())
        tok_labels.append(y.unsqueeze(1).expand_as(mask)[mask].cpu().numpy())
    loss = focal_sum / max(n_seq, 1) + coh_weight * (coh_sum / n_coh if n_coh else 0.0)
    seq_auc = auroc(np.concatenate(seq_scores), data.labels.numpy())
    tok_auc = auroc(np.concatenate(tok_scores), np.concatenate(tok_labels).astype(np.int64))
    return loss, seq_auc, tok_auc


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="value head", unit="epoch")
        except ImportError:  # tqdm is in the "train" extra
            pass

    class _Null:
        def update(self, n: int = 1) -> None: ...
        def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...
        def close(self) -> None: ...

    return _Null()


def train_value_head(
    dataset: FeatureDataset,
    *,
    hidden_size: int | None = None,
    val_dataset: FeatureDataset | None = None,
    val_frac: float = 0.2,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_sequences: int = 32,
    coh_weight: float = 0.1,
    alpha: float = 0.7,
    gamma: float = 1.0,
    patience: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train a fresh :class:`ValueHead` on token features with AdamW and early stopping.

    Args:
        dataset: training sequences; when ``val_dataset`` is None it is split with
            ``dataset.split_by_sequence(seed, val_frac)``.
        hidden_size: expected feature width (checked against the dataset; inferred when None).
        val_dataset: explicit validation sequences.
        epochs: maximum number of epochs (>= 1).
        lr, weight_decay: AdamW settings.
        batch_sequences: sequences per batch (padded per batch).
        coh_weight: weight of :func:`td_coherence`.
        alpha, gamma: :func:`focal_loss` settings (alpha weights the undesirable class).
        patience: stop after this many epochs without a lower validation loss; the best weights are restored.
        seed: makes the run deterministic (initialisation via ``torch.manual_seed`` inside a forked RNG,
            so the caller's global RNG state is untouched; shuffling via a seeded ``torch.Generator``).
        device: where to train.
        progress: show a tqdm bar over epochs.
    """
    if epochs < 1 or batch_sequences < 1 or patience < 0:
        raise ValueError(
            f"need epochs >= 1, batch_sequences >= 1, patience >= 0; got {epochs}, {batch_sequences}, {patience}"
        )
    if hidden_size is not None and hidden_size != dataset.hidden_size:
        raise ValueError(f"hidden_size {hidden_size} does not match the features' hidden size {dataset.hidden_size}")
    if val_dataset is None:
        train_set, val_set = dataset.split_by_sequence(seed=seed, val_frac=val_frac)
    else:
        if val_dataset.hidden_size != dataset.hidden_size:
            raise ValueError(
                f"val_dataset hidden size {val_dataset.hidden_size} != training hidden size {dataset.hidden_size}"
            )
        train_set, val_set = dataset, val_dataset
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("training and validation sets must both be non-empty")
    dev = torch.device(device)
    h = dataset.hidden_size

    with torch.random.fork_rng(devices=[]):  # the head is initialised on CPU, then moved
        torch.manual_seed(seed)
        head = ValueHead(h)
    head.to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    eval_kw = dict(batch_sequences=batch_sequences, alpha=alpha, gamma=gamma, coh_weight=coh_weight, device=dev)

    history: list[dict[str, float]] = []
    best_loss, best_epoch = math.inf, 0
    best_state = copy.deepcopy(head.state_dict())
    bar = _progress(epochs, progress)
    try:
        for epoch in range(epochs):
            head.train()
            order = torch.randperm(len(train_set), generator=gen).tolist()
            total, count = 0.0, 0
            for idx in _batches(order, batch_sequences):
                x, mask, y = train_set.batch(idx, dev)
                loss = sequence_loss(head.logit(x), mask, y, alpha=alpha, gamma=gamma, coh_weight=coh_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            val_loss, val_auc, tok_auc = _evaluate(head, val_set, **eval_kw)  # type: ignore[arg-type]
            history.append(
                {
                    "epoch": float(epoch),
                    "train_loss": total / count,
                    "val_loss": val_loss,
                    "val_auroc": val_auc,
                    "val_auroc_token": tok_auc,
                }
            )
            bar.update(1)
            bar.set_postfix(train=f"{total / count:.4f}", val=f"{val_loss:.4f}", auroc=f"{val_auc:.3f}")
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(head.state_dict())
            elif epoch - best_epoch >= patience:
                break
    finally:
        bar.close()
    head.load_state_dict(best_state)
    head.to("cpu")
    head.eval()
    return TrainResult(
        head=head,
        history=history,
        best_epoch=best_epoch,
        train_seq_ids=train_set.seq_ids.numpy().copy(),
        val_seq_ids=val_set.seq_ids.numpy().copy(),
    )
