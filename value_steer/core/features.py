"""The captured-feature format: shards of hidden states plus labels (no backbone, no vLLM).

Feature directory format (``value_steer.features/v1``; written by the capture tool, or by
:func:`write_feature_shard` / :func:`write_labels`)::

    <dir>/shard-00000.safetensors   hidden   [N, H]  float16 / bfloat16 / float32
                                    seq_id   [N]     int64   (which sequence each token belongs to)
                                    position [N]     int64   (the token's position in its sequence)
    <dir>/shard-00001.safetensors   ...
    <dir>/labels.json               {"<seq_id>": 0 | 1, ...}
      or <dir>/labels.safetensors   seq_id [S] int64, label [S] int64

Labels: **0 = safe / desirable, 1 = undesirable** (the head's ``p`` is P(undesirable)). A sequence may
be spread over several shards; its tokens are ordered by ``position`` (which must be unique within the
sequence, gaps allowed). Every sequence with tokens needs a label; labels of sequences without tokens
are ignored. Exactly one of ``labels.json`` / ``labels.safetensors`` must exist.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

# The capture writer's index: one JSON line per captured sequence, {"seq_id": int, "request_id": str}.
CAPTURE_INDEX = "requests.jsonl"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.safetensors$")
LABELS_JSON = "labels.json"
LABELS_SAFETENSORS = "labels.safetensors"
SHARD_KEYS = ("hidden", "seq_id", "position")
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FeatureFormatError(ValueError):
    """A feature directory does not follow the ``value_steer.features/v1`` format."""


# --------------------------------------------------------------------------------------------------
# Feature storage


def shard_name(index: int) -> str:
    """``shard-XXXXX.safetensors`` (zero-padded to 5 digits)."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:05d}.safetensors"


def write_feature_shard(
    directory: str | os.PathLike[str],
    index: int,
    hidden: torch.Tensor,
    seq_id: torch.Tensor,
    position: torch.Tensor,
) -> str:
    """Write one feature shard; returns its path.

    Args:
        hidden: ``[N, H]`` float16/bfloat16/float32 features.
        seq_id, position: ``[N]`` integer (stored as int64).
    """
    if hidden.dim() != 2 or hidden.dtype not in FEATURE_DTYPES:
        raise ValueError(f"hidden must be [N, H] float16/bfloat16/float32, got {list(hidden.shape)} {hidden.dtype}")
    n = hidden.shape[0]
    for name, t in (("seq_id", seq_id), ("position", position)):
        if t.dim() != 1 or t.shape[0] != n or t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape [{n}], got {list(t.shape)} {t.dtype}")
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, shard_name(index))
    save_file(
        {
            "hidden": hidden.detach().cpu().contiguous(),
            "seq_id": seq_id.detach().cpu().to(torch.int64).contiguous(),
            "position": position.detach().cpu().to(torch.int64).contiguous(),
        },
        path,
        metadata={"format": "value_steer.features/v1"},
    )
    return path


def write_labels(directory: str | os.PathLike[str], labels: Mapping[int, int]) -> str:
    """Write ``labels.json`` (``{"<seq_id>": 0|1}``); returns its path."""
    out = {}
    for sid, lab in labels.items():
        if int(lab) not in (0, 1):
            raise ValueError(f"label of sequence {sid} must be 0 or 1, got {lab!r}")
        out[str(int(sid))] = int(lab)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LABELS_JSON)
    Path(path).write_text(json.dumps(out, sort_keys=True), encoding="utf-8")
    return path


def _read_labels(directory: str) -> dict[int, int]:
    jpath = os.path.join(directory, LABELS_JSON)
    spath = os.path.join(directory, LABELS_SAFETENSORS)
    has_j, has_s = os.path.isfile(jpath), os.path.isfile(spath)
    if has_j and has_s:
        raise FeatureFormatError(f"{directory}: both {LABELS_JSON} and {LABELS_SAFETENSORS} exist; keep one")
    if not has_j and not has_s:
        raise FeatureFormatError(f"{directory}: no {LABELS_JSON} or {LABELS_SAFETENSORS}")
    out: dict[int, int] = {}
    if has_j:
        try:
            raw = json.loads(Path(jpath).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FeatureFormatError(f"{jpath}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise FeatureFormatError(f"{jpath}: must be a JSON object {{seq_id: label}}")
        for key, lab in raw.items():
            try:
                sid = int(key)
            except ValueError as exc:
                raise FeatureFormatError(f"{jpath}: key {key!r} is not an integer seq_id") from exc
            if isinstance(lab, bool) or lab not in (0, 1):
                raise FeatureFormatError(f"{jpath}: label of seq_id {key} must be 0 or 1, got {lab!r}")
            out[sid] = int(lab)
        return out
    from safetensors.torch import load_file

    t = load_file(spath)
    if set(t) != {"seq_id", "label"}:
        raise FeatureFormatError(f"{spath}: expected exactly tensors ['label', 'seq_id'], got {sorted(t)}")
    sid_t, lab_t = t["seq_id"], t["label"]
    if sid_t.dim() != 1 or lab_t.shape != sid_t.shape or sid_t.is_floating_point() or lab_t.is_floating_point():
        raise FeatureFormatError(f"{spath}: seq_id and label must be 1-D integer tensors of equal length")
    if not ((lab_t == 0) | (lab_t == 1)).all():
        raise FeatureFormatError(f"{spath}: labels must be 0 or 1")
    if torch.unique(sid_t).numel() != sid_t.numel():
        raise FeatureFormatError(f"{spath}: duplicate seq_id")
    return dict(zip(sid_t.tolist(), lab_t.tolist()))


class FeatureDataset:
    """Per-sequence token features, grouped by ``seq_id`` and ordered by ``position``.

    Attributes:
        hidden: ``[N_tokens, H]`` features in their storage dtype, sequence-contiguous.
        offsets: ``[S + 1]`` int64; sequence ``i`` owns rows ``offsets[i]:offsets[i+1]``.
        seq_ids: ``[S]`` int64 sequence ids (ascending for datasets built by :meth:`from_arrays`).
        labels: ``[S]`` int64 in {0, 1}.
    """

    def __init__(self, hidden: torch.Tensor, offsets: torch.Tensor, seq_ids: torch.Tensor, labels: torch.Tensor):
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [N, H], got {list(hidden.shape)}")
        s = seq_ids.shape[0]
        if offsets.shape != (s + 1,) or labels.shape != (s,):
            raise ValueError("offsets must be [S+1] and labels [S] for S = len(seq_ids)")
        if s and (int(offsets[0]) != 0 or int(offsets[-1]) != hidden.shape[0] or bool((offsets.diff() < 1).any())):
            raise ValueError("offsets must start at 0, end at N and give every sequence >= 1 token")
        self.hidden = hidden
        self.offsets = offsets.to(torch.int64)
        self.seq_ids = seq_ids.to(torch.int64)
        self.labels = labels.to(torch.int64)

    @classmethod
    def from_arrays(
        cls, hidden: torch.Tensor, seq_id: torch.Tensor, position: torch.Tensor, labels: Mapping[int, int]
    ) -> FeatureDataset:
        """Group flat token rows into sequences.

        Args:
            hidden: ``[N, H]`` float features; seq_id, position: ``[N]`` integers;
            labels: seq_id -> 0/1 (every seq_id present in ``seq_id`` must have one).
        """
        if hidden.dim() != 2 or not hidden.is_floating_point():
            raise FeatureFormatError(f"hidden must be a float [N, H] tensor, got {list(hidden.shape)} {hidden.dtype}")
        n = hidden.shape[0]
        if seq_id.shape != (n,) or position.shape != (n,):
            raise FeatureFormatError(
                f"seq_id and position must be [{n}], got {list(seq_id.shape)}, {list(position.shape)}"
            )
        if n == 0:
            raise FeatureFormatError("no feature rows")
        if not torch.isfinite(hidden).all():
            raise FeatureFormatError("hidden contains non-finite (NaN/inf) values")
        sid = seq_id.cpu().numpy().astype(np.int64)
        pos = position.cpu().numpy().astype(np.int64)
        order = np.lexsort((pos, sid))
        sid_sorted, pos_sorted = sid[order], pos[order]
        dup = (sid_sorted[1:] == sid_sorted[:-1]) & (pos_sorted[1:] == pos_sorted[:-1])
        if dup.any():
            i = int(np.argmax(dup))
            raise FeatureFormatError(f"duplicate token: seq_id {sid_sorted[i]} position {pos_sorted[i]}")
        uniq, starts, counts = np.unique(sid_sorted, return_index=True, return_counts=True)
        missing = [int(u) for u in uniq if int(u) not in labels]
        if missing:
            raise FeatureFormatError(f"{len(missing)} sequence(s) have no label, e.g. seq_id {missing[:5]}")
        lab = np.array([int(labels[int(u)]) for u in uniq], dtype=np.int64)
        if not np.isin(lab, (0, 1)).all():
            raise FeatureFormatError("labels must be 0 or 1")
        offsets = np.concatenate([starts, [n]]).astype(np.int64)
        del counts
        return cls(
            hidden=hidden[torch.from_numpy(order)].contiguous(),
            offsets=torch.from_numpy(offsets),
            seq_ids=torch.from_numpy(uniq.astype(np.int64)),
            labels=torch.from_numpy(lab),
        )

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> FeatureDataset:
        """Load a ``value_steer.features/v1`` directory (all shards into memory).

        Shards with different float dtypes are promoted to float32; otherwise the storage dtype is kept.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"feature directory not found: {directory}")
        names = sorted(n for n in os.listdir(directory) if SHARD_PATTERN.match(n))
        if not names:
            raise FeatureFormatError(f"{directory}: no shard-XXXXX.safetensors files")
        hs, sids, poss = [], [], []
        width = None
        for name in names:
            path = os.path.join(directory, name)
            try:
                t = load_file(path)
            except (SafetensorError, OSError) as exc:
                raise FeatureFormatError(f"{path}: unreadable safetensors ({exc})") from exc
            missing = [k for k in SHARD_KEYS if k not in t]
            if missing:
                raise FeatureFormatError(f"{path}: missing tensor(s) {missing}; required {list(SHARD_KEYS)}")
            h, sid, pos = t["hidden"], t["seq_id"], t["position"]
            if h.dim() != 2 or h.dtype not in FEATURE_DTYPES:
                raise FeatureFormatError(
                    f"{path}: hidden must be [N, H] float16/bfloat16/float32, got {list(h.shape)} {h.dtype}"
                )
            if width is None:
                width = h.shape[1]
            elif h.shape[1] != width:
                raise FeatureFormatError(f"{path}: hidden size {h.shape[1]} differs from earlier shards ({width})")
            for key, v in (("seq_id", sid), ("position", pos)):
                if v.dtype != torch.int64 or v.shape != (h.shape[0],):
                    raise FeatureFormatError(
                        f"{path}: {key} must be int64 [{h.shape[0]}], got {v.dtype} {list(v.shape)}"
                    )
            hs.append(h)
            sids.append(sid)
            poss.append(pos)
        dtypes = {h.dtype for h in hs}
        if len(dtypes) > 1:
            hs = [h.float() for h in hs]
        labels = _read_labels(directory)
        return cls.from_arrays(torch.cat(hs), torch.cat(sids), torch.cat(poss), labels)

    # -- accessors ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.seq_ids.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """``[S]`` int64 tokens per sequence."""
        return self.offsets.diff()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(hidden [T_i, H] storage dtype, label)`` of sequence ``i`` (tokens in position order)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.hidden[a:b], int(self.labels[i])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> FeatureDataset:
        """A new dataset with the sequences at ``indices`` (in that order)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        lengths = self.lengths[idx]
        rows = [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx.tolist()]
        gather = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        return FeatureDataset(self.hidden[gather], offsets, self.seq_ids[idx], self.labels[idx])

    def split_by_sequence(self, seed: int = 0, val_frac: float = 0.2) -> tuple[FeatureDataset, FeatureDataset]:
        """Split into ``(train, val)`` by whole sequences, stratified by label, reproducibly from ``seed``.

        Each label class contributes ``round(val_frac * n_class)`` sequences to validation; both parts are
        guaranteed non-empty. No sequence is in both.
        """
        if not 0.0 < val_frac < 1.0:
            raise ValueError(f"val_frac must be in (0, 1), got {val_frac!r}")
        s = len(self)
        if s < 2:
            raise ValueError(f"need at least 2 sequences to split, got {s}")
        rng = np.random.default_rng(seed)
        labels = self.labels.numpy()
        val: list[int] = []
        train: list[int] = []
        for cls_ in (0, 1):
            members = np.flatnonzero(labels == cls_)
            members = members[rng.permutation(members.size)]
            k = round(val_frac * members.size)
            val.extend(members[:k].tolist())
            train.extend(members[k:].tolist())
        if not val:
            val.append(train.pop())
        if not train:
            train.append(val.pop())
        return self.subset(sorted(train)), self.subset(sorted(val))

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Pad the sequences at ``indices`` into one batch.

        Returns:
            ``x [B, T, H]`` fp32 (zeros at padding), ``mask [B, T]`` bool (True on real tokens, a prefix of
            each row), ``labels [B]`` fp32.
        """
        idx = list(indices)
        lens = [int(self.offsets[i + 1] - self.offsets[i]) for i in idx]
        t_max = max(lens) if lens else 0
        x = torch.zeros(len(idx), t_max, self.hidden_size, dtype=torch.float32)
        mask = torch.zeros(len(idx), t_max, dtype=torch.bool)
        for b, (i, n) in enumerate(zip(idx, lens)):
            a = int(self.offsets[i])
            x[b, :n] = self.hidden[a : a + n].float()
            mask[b, :n] = True
        y = self.labels[idx].float()
        return x.to(device), mask.to(device), y.to(device)


def read_capture_index(directory: str | os.PathLike[str], client_id: Callable[[str], str]) -> dict[str, int]:
    """``{client request id: seq_id}`` from a capture's ``requests.jsonl``.

    ``client_id`` maps the engine's internal request id to the client's (the vLLM adapter's
    ``client_request_id``: the engine appends a suffix to client ids).
    """
    out: dict[str, int] = {}
    with open(os.path.join(directory, CAPTURE_INDEX), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out[client_id(rec["request_id"])] = int(rec["seq_id"])
    return out
