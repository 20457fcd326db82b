"""Decode-matched capture: the exact hidden state the value head scores, per generated token.

The worker calls :meth:`CaptureWriter.add` with the rows it scored this step (the hidden state that
produced the step's logits, i.e. the state after the token at ``position``). Rows are buffered and
written as feature shards (``value_steer.core.features`` format) plus ``requests.jsonl`` mapping each
sequence id to the vLLM request id, so ``value-steer train`` reads them directly after labelling.
"""

from __future__ import annotations

import json
import os
import threading

import torch

from value_steer.core.features import CAPTURE_INDEX, write_feature_shard


class CaptureWriter:
    """Buffers ``(request, position, hidden)`` rows and writes ``shard-XXXXX.safetensors`` files.

    Args:
        directory: output directory (created).
        shard_rows: rows per shard.
        dtype: storage dtype of the hidden states (fp32 keeps them bit-exact).
    """

    def __init__(self, directory: str, shard_rows: int = 8192, dtype: torch.dtype = torch.float32) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.shard_rows = shard_rows
        self.dtype = dtype
        existing = [f for f in os.listdir(directory) if f.startswith("shard-") and f.endswith(".safetensors")]
        self._next_shard = len(existing)
        self._seq_ids: dict[str, int] = {}
        self._index_path = os.path.join(directory, CAPTURE_INDEX)
        self._next_seq = self._count_index()
        self._hidden: list[torch.Tensor] = []
        self._seq: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._rows = 0
        self._lock = threading.Lock()

    def _count_index(self) -> int:
        if not os.path.exists(self._index_path):
            return 0
        with open(self._index_path, encoding="utf-8") as f:
            return sum(1 for _ in f)

    def seq_id(self, req_id: str) -> int:
        sid = self._seq_ids.get(req_id)
        if sid is None:
            sid = self._next_seq
            self._next_seq += 1
            self._seq_ids[req_id] = sid
            with open(self._index_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"seq_id": sid, "request_id": req_id}) + "\n")
        return sid

    def add(self, req_ids: list[str], positions: list[int], hidden: torch.Tensor) -> None:
        """Buffer rows. ``hidden``: ``[n, H]`` (any float dtype; stored as ``self.dtype``)."""
        if not req_ids:
            return
        with self._lock:
            self._hidden.append(hidden.detach().to("cpu", self.dtype))
            self._seq.append(torch.tensor([self.seq_id(r) for r in req_ids], dtype=torch.int64))
            self._pos.append(torch.tensor(positions, dtype=torch.int64))
            self._rows += len(req_ids)
            if self._rows >= self.shard_rows:
                self._flush_locked()

    @property
    def num_shards(self) -> int:
        """Shards written to ``directory`` so far (including ones found there at start)."""
        return self._next_shard

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._rows:
            return
        write_feature_shard(self.directory, self._next_shard, torch.cat(self._hidden), torch.cat(self._seq),
                            torch.cat(self._pos))
        self._next_shard += 1
        self._hidden, self._seq, self._pos, self._rows = [], [], [], 0
