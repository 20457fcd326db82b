"""Activation steering in the worker: the vector bank, the per-layer op tables and the per-token buffers.

No vLLM, no kernels: this module owns the persistent buffers the ``steer_activations`` / ``steer_gate`` ops
read (``docs/activation-steering.md``) and keeps them current with request admissions and removals.

- :class:`VectorBank`: ``[max_vectors, H]`` fp32 device table, one slot per distinct vector *content*
  (sha256 of its fp32 bytes), reference-counted by names and by running requests.
- :class:`ActivationTables`: per decoder layer the ``[R, M]`` op tables, the gate tables, and the per-token
  ``token_row`` / ``token_decode`` / ``gate`` buffers of a step.

Per-layer vector files: a bank entry is ``[H]`` (one vector, used at whatever layer an op names) or
``[num_layers, H]`` (one vector per layer): an op at layer ``L`` naming a per-layer entry uses row ``L``, and
a gate at layer ``Lg`` uses row ``Lg`` as its probe. Each distinct row takes a slot.

Hot-path discipline (``tests/runtime/test_activation.py``): admission and removal write numpy mirrors;
:meth:`ActivationTables.flush` copies what changed once per step, nothing on a steady step; per step,
:meth:`ActivationTables.fill_tokens` makes ONE non-blocking host->device copy; nothing is read back.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from value_steer.core.activation import OP_NONE
from value_steer.core.config import RequestArgError
from value_steer.core.steering_spec import NAME_RE, NAME_RULE, OP_CODES, InlineVector, SteeringSpec, VectorRef


def zero_row_message(name: str, layer: int) -> str:
    return (f"vector {name!r} has no direction at layer {layer} (its row for that layer is zero: it was made for "
            "other layers)")


class VectorBankError(ValueError):
    """A vector-bank operation was refused (unknown name, bad data, full bank, vector in use)."""


class BankFullError(VectorBankError):
    """No free slot: the message names ``max_vectors`` (``steering.max_vectors``)."""


class ReadOnlyVectorError(VectorBankError):
    """A vector loaded from the server's ``steering.vectors`` directory cannot be re-registered or deleted."""


# Contents whose last name went (re-registered or deleted) are kept on the host, newest first, up to this many
# bytes: a request admitted with such a version still runs with it (see ActivationTables.add_request).
RETIRED_KEEP_BYTES = 64 << 20


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned host memory makes the host->device copies truly asynchronous on CUDA.
    return t.pin_memory() if device.type == "cuda" else t


def _row_hash(row: np.ndarray) -> str:
    # Equal to steering_spec.vector_content_hash / InlineVector.content_hash of the same values.
    return hashlib.sha256(np.ascontiguousarray(row, dtype="<f4").tobytes()).hexdigest()


@dataclass
class _Slot:
    index: int
    norm: float
    names: int = 0  # names whose data holds this content
    users: int = 0  # running-request references (acquire/release)


@dataclass(frozen=True)
class VectorInfo:
    """A named bank entry.

    shape: ``(H,)`` or ``(num_layers, H)``. content_hash: for ``[H]``, the sha256 of its fp32 bytes (what
    :func:`~value_steer.core.steering_spec.fingerprint` sees); for ``[num_layers, H]``, a sha256 over the
    shape and all rows. row_hashes / slots / norms: per row (one row for ``[H]``).
    """

    name: str
    content_hash: str
    shape: tuple[int, ...]
    row_hashes: tuple[str, ...]
    slots: tuple[int, ...]
    norms: tuple[float, ...]

    @property
    def per_layer(self) -> bool:
        return len(self.shape) == 2

    def row_hash(self, layer: int) -> str:
        """The content hash of the vector an op at ``layer`` uses."""
        if not self.per_layer:
            return self.row_hashes[0]
        if not 0 <= layer < len(self.row_hashes):
            raise VectorBankError(f"layer {layer} out of range for per-layer vector {self.name!r} {list(self.shape)}")
        return self.row_hashes[layer]


class VectorBank:
    """The steering vectors on the device: ``table [max_vectors, H]`` fp32, slots by content hash.

    A slot lives while a name holds its content or a running request holds it (:meth:`acquire` /
    :meth:`acquire_inline`, :meth:`release`). Writes go to a host mirror; :meth:`flush` copies the span of
    changed slots once (called by :meth:`ActivationTables.flush`). Thread-safe (registry routes may call
    from another thread than the engine step).

    Besides the shared slots, each request row owns ``private_per_row`` private slots after them
    (``table[max_vectors + row * private_per_row + k]``): a request's inline vectors, and a named vector's version
    that is no longer registered, go there, so a request never waits for, or is refused, a shared slot.

    Args:
        max_vectors: shared slots ``S``.
        hidden_size: ``H``.
        num_layers: the model's decoder layers (the row count of a per-layer entry).
        device: where ``table`` lives.
        private_rows, private_per_row: the request rows and private slots per row (``table`` is
            ``[S + private_rows * private_per_row, H]``); 0: no private slots (inline vectors take shared ones).
    """

    def __init__(self, max_vectors: int, hidden_size: int, num_layers: int, device: torch.device | str,
                 private_rows: int = 0, private_per_row: int = 0) -> None:
        if max_vectors < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError("max_vectors, hidden_size and num_layers must be >= 1")
        self.device = torch.device(device)
        self.max_vectors = max_vectors
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.private_rows, self.private_per_row = private_rows, private_per_row
        total = max_vectors + private_rows * private_per_row
        self._host = _pinned(torch.zeros((total, hidden_size), dtype=torch.float32), self.device)
        self._host_np = self._host.numpy()
        self.table = torch.zeros((total, hidden_size), dtype=torch.float32, device=self.device)
        self._free = list(range(max_vectors - 1, -1, -1))  # pop() hands out the lowest slot first
        self._slots: dict[str, _Slot] = {}
        self._names: dict[str, VectorInfo] = {}
        self._readonly: set[str] = set()
        # content hash -> [n_rows, H] fp32 of versions no name holds any more (newest last), bounded in bytes.
        self._retired: OrderedDict[str, np.ndarray] = OrderedDict()
        self._retired_bytes = 0
        self._dirty: list[tuple[int, int]] = []  # [lo, hi) spans written since the last flush
        self._lock = threading.RLock()

    # ---- names ----------------------------------------------------------------------------------------------
    def _as_rows(self, name: str, data: Any) -> tuple[np.ndarray, int]:
        if isinstance(data, torch.Tensor):
            data = data.detach().to(device="cpu", dtype=torch.float32).numpy()
        a = np.array(data, dtype=np.float32)  # a copy: the caller's buffer may change later
        h, n = self.hidden_size, self.num_layers
        if a.shape not in ((h,), (n, h)):
            raise VectorBankError(f"vector {name!r}: shape must be [{h}] or [{n}, {h}] ([H] or [num_layers, H]), "
                                  f"got {list(a.shape)}")
        rows = a.reshape(-1, h)
        if not np.isfinite(rows).all():
            raise VectorBankError(f"vector {name!r}: has NaN or inf entries")
        zero = ~rows.any(axis=1)
        if zero.all():
            raise VectorBankError(f"vector {name!r}: zero vector; a steering vector needs a direction")
        # A per-layer entry may leave layers zero (made for some layers only): an op there is refused (acquire_ref).
        return rows, a.ndim

    def _full(self, what: str, needed: int, free: int) -> BankFullError:
        return BankFullError(
            f"vector bank full: {what} needs {needed} new slot(s), {free} free of max_vectors={self.max_vectors} "
            "(steering.max_vectors in --additional-config); delete unused vectors or raise max_vectors"
        )

    def register(self, name: str, data: Any, readonly: bool = False) -> VectorInfo:
        """Store ``data`` (``[H]`` or ``[num_layers, H]``, list/array/tensor) under ``name``.

        Re-registering a name with new data makes a new vector (new content hash, new fingerprints); the old
        content's slot is freed once no name and no running request holds it (its data is kept on the host for a
        while: :meth:`version_rows`). Same data: a no-op. ``readonly``: the name cannot be re-registered or
        deleted later (the server's preloaded vectors).
        Raises:
            VectorBankError: a bad name or data; :class:`BankFullError` when the slots run out;
                :class:`ReadOnlyVectorError` for a preloaded name.
        """
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise VectorBankError(f"vector name must be {NAME_RULE}, got {name!r}")
        self._check_writable(name)
        rows, ndim = self._as_rows(name, data)
        row_hashes = tuple(_row_hash(r) for r in rows)
        if ndim == 1:
            content, shape = row_hashes[0], (self.hidden_size,)
        else:
            shape = (self.num_layers, self.hidden_size)
            content = hashlib.sha256(f"per-layer:{shape}:".encode() + "".join(row_hashes).encode()).hexdigest()
        distinct = dict.fromkeys(row_hashes)  # ordered, each content once per name
        with self._lock:
            old = self._names.get(name)
            if old is not None and old.content_hash == content:
                return old
            new = [h for h in distinct if h not in self._slots]
            freeable = 0
            if old is not None:
                freeable = sum(1 for h in set(old.row_hashes) if h not in distinct
                               and self._slots[h].names == 1 and self._slots[h].users == 0)
            if len(new) > len(self._free) + freeable:
                raise self._full(f"vector {name!r}", len(new), len(self._free) + freeable)
            # Hold the contents already present before dropping the old name, so shared rows are not freed
            # and re-written.
            for h in distinct:
                if h in self._slots:
                    self._slots[h].names += 1
            if old is not None:
                self._drop_name(old)
            first = {h: i for i, h in reversed(list(enumerate(row_hashes)))}
            for h in new:
                s = self._alloc(h, rows[first[h]])
                s.names = 1
            info = VectorInfo(name, content, shape, row_hashes, tuple(self._slots[h].index for h in row_hashes),
                              tuple(self._slots[h].norm for h in row_hashes))
            self._names[name] = info
            if readonly:
                self._readonly.add(name)
            return info

    def _check_writable(self, name: str) -> None:
        if name in self._readonly:
            raise ReadOnlyVectorError(f"vector {name!r} is loaded from the server's steering.vectors directory and "
                                      "is read-only; register your vector under another name")

    def _alloc(self, h: str, row: np.ndarray) -> _Slot:
        idx = self._free.pop()
        self._write(idx, row)
        s = _Slot(idx, float(np.linalg.norm(row.astype(np.float64))))
        self._slots[h] = s
        return s

    def _write(self, idx: int, row: np.ndarray) -> None:
        self._host_np[idx] = row
        self._dirty.append((idx, idx + 1))
        if len(self._dirty) > 1024:  # registrations on an idle server (no step flushes): one span instead
            self._dirty = [(min(lo for lo, _ in self._dirty), max(hi for _, hi in self._dirty))]

    def _retire(self, info: VectorInfo) -> None:
        """Keep the rows of a version no name holds any more (newest last; oldest dropped past the byte bound)."""
        rows = np.stack([self._host_np[i] for i in info.slots]).copy()
        self._retired.pop(info.content_hash, None)
        self._retired[info.content_hash] = rows
        self._retired_bytes += rows.nbytes
        while self._retired_bytes > RETIRED_KEEP_BYTES and len(self._retired) > 1:
            _, old = self._retired.popitem(last=False)
            self._retired_bytes -= old.nbytes

    def version_rows(self, content_hash: str) -> np.ndarray | None:
        """``[n_rows, H]`` fp32 of a named version by its content hash: a live name's, else a retired one's (a
        copy), else None (never registered here, or dropped from the retired store)."""
        with self._lock:
            for info in self._names.values():
                if info.content_hash == content_hash:
                    return np.stack([self._host_np[i] for i in info.slots])
            rows = self._retired.get(content_hash)
            return None if rows is None else rows.copy()

    def private_slot(self, row: int, k: int) -> int:
        """The index of request row ``row``'s ``k``-th private slot."""
        if not 0 <= row < self.private_rows or not 0 <= k < self.private_per_row:
            raise VectorBankError(f"private slot ({row}, {k}) out of range ({self.private_rows} rows x "
                                  f"{self.private_per_row})")
        return self.max_vectors + row * self.private_per_row + k

    def write_private(self, row: int, k: int, data: np.ndarray) -> int:
        """Write ``data`` (``[H]``) into request row ``row``'s ``k``-th private slot; returns its index."""
        idx = self.private_slot(row, k)
        with self._lock:
            self._write(idx, np.asarray(data, dtype=np.float32))
        return idx

    def _maybe_free(self, h: str) -> None:
        s = self._slots[h]
        if s.names == 0 and s.users == 0:
            del self._slots[h]
            self._free.append(s.index)

    def _drop_name(self, info: VectorInfo) -> None:
        self._retire(info)
        for h in dict.fromkeys(info.row_hashes):
            self._slots[h].names -= 1
            self._maybe_free(h)

    def lookup(self, name: str) -> VectorInfo | None:
        """The named entry, or None."""
        with self._lock:
            return self._names.get(name)

    def resolve(self, name: str) -> bool:
        """Whether ``name`` is registered (the ``resolve`` callable of ``parse_steering_spec``)."""
        with self._lock:
            return name in self._names

    def vector_hash(self, ref: VectorRef) -> str:
        """The content hash a spec's vector stands for (the ``vector_hash`` callable of ``fingerprint``)."""
        if isinstance(ref, InlineVector):
            return ref.content_hash
        info = self.lookup(ref)
        if info is None:
            raise VectorBankError(f"unknown vector {ref!r}")
        return info.content_hash

    def delete(self, name: str) -> int:
        """Remove a name; returns how many running-request references still hold its content.

        The name is gone at once (new requests naming it are refused); the slot is freed now when nothing else
        holds it, else when the last running request using it finishes (running requests keep their vector,
        as they keep an old one when a name is re-registered). Deleting is never refused for use: the worker
        learns that a request finished only with the next scheduled step, so a client that deletes right after
        its last request completed would otherwise race that step.
        """
        with self._lock:
            info = self._names.get(name)
            if info is None:
                raise VectorBankError(f"unknown vector {name!r}")
            self._check_writable(name)
            users = sum(self._slots[h].users for h in dict.fromkeys(info.row_hashes))
            del self._names[name]
            self._drop_name(info)
            return users

    def list(self) -> list[dict[str, Any]]:
        """Every named entry: ``name``, ``hash``, ``shape``, ``norms`` (per row), ``slots``, ``readonly``,
        ``in_use`` (running-request references), sorted by name."""
        with self._lock:
            return [{"name": i.name, "hash": i.content_hash, "shape": list(i.shape), "norms": list(i.norms),
                     "slots": list(i.slots), "readonly": i.name in self._readonly,
                     "in_use": sum(self._slots[h].users for h in dict.fromkeys(i.row_hashes))}
                    for i in sorted(self._names.values(), key=lambda i: i.name)]

    def usage(self) -> dict[str, int]:
        """Slot use: ``max_vectors``, ``slots_used``, ``slots_free``, ``inline_slots`` (held by requests only)."""
        with self._lock:
            return {"max_vectors": self.max_vectors, "slots_used": len(self._slots), "slots_free": len(self._free),
                    "inline_slots": sum(1 for s in self._slots.values() if s.names == 0),
                    "private_slots_per_request": self.private_per_row, "retired_versions": len(self._retired)}

    # ---- running requests -----------------------------------------------------------------------------------
    def acquire(self, content_hash: str) -> int:
        """Hold a stored content for a running request; returns its slot."""
        with self._lock:
            s = self._slots.get(content_hash)
            if s is None:
                raise VectorBankError(f"no vector with content hash {content_hash[:12]}... in the bank")
            s.users += 1
            return s.index

    def acquire_inline(self, vec: InlineVector) -> tuple[str, int]:
        """Hold an inline vector for a running request (a slot for the request's life; shared with equal
        content). Returns ``(content hash, slot)``."""
        if vec.size != self.hidden_size:
            raise VectorBankError(f"inline vector has {vec.size} floats, the model's hidden size is {self.hidden_size}")
        h = vec.content_hash
        with self._lock:
            if h not in self._slots:
                if not self._free:
                    raise self._full("an inline vector", 1, 0)
                self._alloc(h, vec.numpy())
            s = self._slots[h]
            s.users += 1
            return h, s.index

    def acquire_ref(self, ref: VectorRef, layer: int) -> tuple[str, int]:
        """Hold the vector a spec names for ``layer`` (a per-layer entry gives row ``layer``)."""
        if isinstance(ref, InlineVector):
            return self.acquire_inline(ref)
        with self._lock:
            info = self._names.get(ref)
            if info is None:
                raise VectorBankError(f"unknown vector {ref!r} (not registered, or deleted)")
            h = info.row_hash(layer)
            if info.norms[layer if info.per_layer else 0] == 0.0:
                raise VectorBankError(zero_row_message(ref, layer))
            return h, self.acquire(h)

    def release(self, content_hash: str) -> None:
        """Drop one running-request reference; the slot is freed when nothing holds it."""
        with self._lock:
            s = self._slots.get(content_hash)
            if s is None or s.users < 1:
                raise VectorBankError(f"release of a vector not held: {content_hash[:12]}...")
            s.users -= 1
            self._maybe_free(content_hash)

    # ---- start-up and publication ---------------------------------------------------------------------------
    def load_dir(self, path: str) -> list[VectorInfo]:
        """Register every ``*.safetensors`` in ``path`` (sorted): each holds one tensor, ``[H]`` or
        ``[num_layers, H]``; the file stem is its name. Errors name the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        out = []
        for fname in sorted(os.listdir(path)):
            if not fname.endswith(".safetensors"):
                continue
            full = os.path.join(path, fname)
            try:
                tensors = load_file(full)
            except (SafetensorError, OSError) as exc:
                raise VectorBankError(f"{full}: not a readable safetensors file ({exc})") from exc
            if len(tensors) != 1:
                raise VectorBankError(f"{full}: expected exactly one tensor ([H] or [num_layers, H]), "
                                      f"found {len(tensors)}: {sorted(tensors)}")
            try:
                out.append(self.register(fname[: -len(".safetensors")], next(iter(tensors.values())), readonly=True))
            except VectorBankError as exc:
                raise type(exc)(f"{full}: {exc}") from None
        return out

    def flush(self) -> bool:
        """Copy the slots written since the last flush (one non-blocking copy per run of adjacent slots); False if
        none."""
        with self._lock:
            if not self._dirty:
                return False
            spans: list[list[int]] = []
            for lo, hi in sorted(self._dirty):
                if spans and lo <= spans[-1][1]:
                    spans[-1][1] = max(spans[-1][1], hi)
                else:
                    spans.append([lo, hi])
            self._dirty.clear()
            for lo, hi in spans:
                dst = self.table[lo:hi]
                if dst.data_ptr() != self._host.data_ptr() + lo * self._host.stride(0) * self._host.element_size():
                    dst.copy_(self._host[lo:hi], non_blocking=True)
            return True


@dataclass
class _RowRecord:
    layers: tuple[int, ...]
    gate_layer: int | None
    held: list[str] = field(default_factory=list)  # content hashes acquired from the bank
    capture_layers: tuple[int, ...] = ()


_TOKEN_ALIGN = 64  # keeps the int32 region of the packed token buffer aligned
_TOKEN_RING = 4  # host buffers of the per-token index (see ActivationTables.__init__)


class ActivationTables:
    """The tables the steering ops read, for one runner.

    Op tables, one ``[R, M]`` set per decoder layer (stacked ``[num_layers, R, M]``; :meth:`op_tables` gives
    a layer's contiguous views): ``op_kind`` int32 (``OP_NONE`` ends a row's list, else ``OP_CODES``),
    ``op_slot`` int32 (bank slot), ``op_a`` fp32 (add/ablate: scale; cap: min, -inf for none), ``op_b`` fp32
    (cap: max, +inf for none), ``op_flags`` int32 (``FLAG_PROMPT | FLAG_DECODE | FLAG_GATED``). Ops of a
    layer keep the spec's order.

    Gate tables: ``gate_slot`` int32 ``[num_layers, R]`` (-1: the row has no gate *at that layer*; a row
    has at most one gate), ``gate_threshold`` / ``gate_sharpness`` fp32 ``[R]``. The gate slot is per layer
    because requests gate at different layers: ``steer_gate`` at layer ``L`` must write ``gate`` only for
    tokens of rows gated at ``L`` (and leave the others: a row gated at an earlier layer still needs its
    value at the layers above).

    Per-token buffers ``[max_tokens]`` (shared by every layer of a step): ``token_row`` int32 (row 0:
    untouched), ``token_decode`` int8 (1: decode token), filled by :meth:`fill_tokens`; ``gate`` fp32,
    device-only, written by ``steer_gate`` and read only by gated ops (initialised to 1).

    Args:
        bank: the :class:`VectorBank` whose slots the tables index.
        num_rows: ``R`` (``max_num_seqs + 1``; row 0 is off).
        max_ops: ``M`` (``steering.max_ops_per_request``).
        max_tokens: per-token buffer length (``max_num_batched_tokens`` plus any extra tokens the adapter
            forwards).
        device: where the tables live.
        capture: allocate the layer-capture tables: ``capture_flag [num_layers, R]`` int8 (1: the row captures
            that layer) and ``capture_buf [num_layers, max_tokens, H]`` fp32, written by ``capture_stream``.
    """

    OP_COLUMNS = ("op_kind", "op_slot", "op_a", "op_b", "op_flags")

    def __init__(self, bank: VectorBank, num_rows: int, max_ops: int, max_tokens: int,
                 device: torch.device | str, capture: bool = False) -> None:
        if num_rows < 2 or max_ops < 1 or max_tokens < 1:
            raise ValueError("num_rows must be >= 2 (row 0 is off), max_ops and max_tokens >= 1")
        self.bank = bank
        self.device = torch.device(device)
        self.num_rows, self.max_ops, self.max_tokens = num_rows, max_ops, max_tokens
        n_layers = bank.num_layers
        self.num_layers = n_layers
        shape = (n_layers, num_rows, max_ops)
        init = {
            "op_kind": torch.zeros(shape, dtype=torch.int32),
            "op_slot": torch.zeros(shape, dtype=torch.int32),
            "op_a": torch.zeros(shape, dtype=torch.float32),
            "op_b": torch.zeros(shape, dtype=torch.float32),
            "op_flags": torch.zeros(shape, dtype=torch.int32),
            "gate_slot": torch.full((n_layers, num_rows), -1, dtype=torch.int32),
            "gate_threshold": torch.zeros(num_rows, dtype=torch.float32),
            "gate_sharpness": torch.ones(num_rows, dtype=torch.float32),
        }
        if capture:
            init["capture_flag"] = torch.zeros((n_layers, num_rows), dtype=torch.int8)
        self._host_t = {k: _pinned(v, self.device) for k, v in init.items()}
        self.host: dict[str, np.ndarray] = {k: v.numpy() for k, v in self._host_t.items()}
        # Start-up copies (before any step): the device tables start equal to their mirrors.
        self.dev: dict[str, torch.Tensor] = {k: v.to(self.device) for k, v in self._host_t.items()}
        self._op_dirty = [n_layers, 0]  # [lo, hi) of layers whose op tables changed
        self._gate_dirty = [n_layers, 0]  # [lo, hi) of layers whose gate_slot changed
        self._gate_params_dirty = False
        self._capture_dirty = [n_layers, 0]  # [lo, hi) of layers whose capture_flag changed
        self.capture_buf = (torch.zeros((n_layers, max_tokens, bank.hidden_size), dtype=torch.float32,
                                        device=self.device) if capture else None)
        self.capture_use = np.zeros(n_layers, dtype=np.int64)  # live rows capturing each layer
        # Gate telemetry per row, accumulated on the device (no host sync): decode tokens of gated rows seen in
        # the main forward, and how many of them had the gate open (g >= 0.5). Reset when a row is admitted.
        self.gate_tokens = torch.zeros(num_rows, dtype=torch.float64, device=self.device)
        self.gate_open = torch.zeros(num_rows, dtype=torch.float64, device=self.device)
        self._gate_reset: list[int] = []
        self._main_tokens = 0  # tokens of the staged forward that belong to the scheduled requests
        self._capture_tokens: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._rows: dict[int, _RowRecord] = {}
        self.layer_use = np.zeros(n_layers, dtype=np.int64)  # live rows editing each layer
        self.gate_use = np.zeros(n_layers, dtype=np.int64)  # live rows gating at each layer
        # Per-token buffers: token_decode (int8) then token_row (int32) packed in one buffer, so a forward
        # publishes both with one copy of [0, off + 4 T) bytes (the int8 region first: it wastes at most
        # max_tokens bytes, where the other order would copy 4 max_tokens). The host side is a ring: a step
        # may publish up to three times (the main forward, VFD's first-token and second-phase forwards) and
        # a host buffer is refilled only a ring later, after the step's device read has ordered its copy
        # (the PackedStaging argument).
        off = -(-max_tokens // _TOKEN_ALIGN) * _TOKEN_ALIGN
        self._row_off = off
        nbytes = off + 4 * max_tokens
        self._token_hosts = [_pinned(torch.zeros(nbytes, dtype=torch.uint8), self.device)
                             for _ in range(_TOKEN_RING)]
        self._token_ring = 0
        self._token_dev = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        self.token_decode = self._token_dev[:max_tokens].view(torch.int8)
        self.token_row = self._token_dev[off:].view(torch.int32)
        self.gate = torch.ones(max_tokens, dtype=torch.float32, device=self.device)
        self._arange = np.arange(max_tokens, dtype=np.int64)
        self._staged = 0  # tokens staged in the current host buffer
        self._select_host(0)

    def _select_host(self, i: int) -> None:
        self._token_ring = i
        host = self._token_hosts[i].numpy()
        self._host_decode = host[: self.max_tokens].view(np.int8)
        self._host_row = host[self._row_off :].view(np.int32)

    # ---- views the ops read ---------------------------------------------------------------------------------
    def op_tables(self, layer: int) -> tuple[torch.Tensor, ...]:
        """``(op_kind, op_slot, op_a, op_b, op_flags)`` of ``layer``, each ``[R, M]`` contiguous."""
        return tuple(self.dev[c][layer] for c in self.OP_COLUMNS)

    def gate_tables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate_slot [R] int32, gate_threshold [R] fp32, gate_sharpness [R] fp32)`` for ``steer_gate`` at
        ``layer`` (slot -1 for rows not gated at ``layer``)."""
        return self.dev["gate_slot"][layer], self.dev["gate_threshold"], self.dev["gate_sharpness"]

    def capture_tables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(capture_flag [R] int8, capture_buf [max_tokens, H] fp32)`` of ``layer``, or None without capture."""
        if self.capture_buf is None:
            return None
        return self.dev["capture_flag"][layer], self.capture_buf[layer]

    @property
    def active(self) -> bool:
        """Whether any live row has steering (an adapter may skip the per-token fill otherwise)."""
        return bool(self._rows)

    def row_of(self, row: int) -> _RowRecord | None:
        return self._rows.get(row)

    # ---- request lifecycle ----------------------------------------------------------------------------------
    def _check_row(self, row: int) -> None:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 1 <= row < self.num_rows:
            raise ValueError(f"row must be an int in [1, {self.num_rows}), got {row!r}")

    def add_request(self, row: int, spec: SteeringSpec | None, capture_layers: tuple[int, ...] = (),
                    pins: dict[str, str] | None = None) -> None:
        """Write ``spec`` into row ``row`` (host mirrors; :meth:`flush` publishes) and hold its vectors.

        ``pins``: ``{name: content hash}`` of the versions the request was admitted with (the frontend's); a name
        re-registered or deleted since runs with its pinned version, held in the row's private slots when no
        shared slot holds it any more. Inline vectors go to the row's private slots too (when the bank has them),
        so no request is refused for a full bank.

        ``spec`` may be None for a request that only captures (``capture_layers``: decoder layers whose
        residual stream the row's tokens write to ``capture_buf``; needs ``capture=True``).

        Ops at a layer ``>= spec.gate.layer`` are gated and decode-only (derived from the gate here, whatever
        the ops' ``gated`` field says). All-or-nothing: on error nothing is written or held.
        Raises:
            RequestArgError: a vector the bank cannot supply (deleted since validation, full bank), naming the
                spec field; ValueError: a bad row, or more ops at one layer than ``max_ops``.
        """
        self._check_row(row)
        if row in self._rows:
            raise ValueError(f"row {row} already holds a steering spec; remove_request it first")
        if capture_layers:
            if self.capture_buf is None:
                raise ValueError("capture_layers needs tables built with capture=True")
            bad = [c for c in capture_layers if not 0 <= c < self.num_layers]
            if bad:
                raise ValueError(f"capture_layers {bad} out of range [0, {self.num_layers})")
        if spec is None:
            spec = SteeringSpec(ops=(), gate=None)
        per_layer: dict[int, list[int]] = {}
        for i, op in enumerate(spec.ops):
            if not 0 <= op.layer < self.num_layers:
                raise ValueError(f"steering.ops[{i}].layer {op.layer} out of range [0, {self.num_layers})")
            per_layer.setdefault(op.layer, []).append(i)
        for layer, idx in per_layer.items():
            if len(idx) > self.max_ops:
                raise ValueError(f"{len(idx)} ops at layer {layer}, the tables hold max_ops={self.max_ops}")
        g = spec.gate
        if g is not None and not 0 <= g.layer < self.num_layers:
            raise ValueError(f"steering.gate.layer {g.layer} out of range [0, {self.num_layers})")
        held: list[str] = []
        slots: list[int] = []
        private = 0
        bank = self.bank
        try:
            for fld, ref, layer in spec.vector_refs():
                data = None
                try:
                    if isinstance(ref, InlineVector) and bank.private_per_row:
                        data = ref.numpy()
                    elif isinstance(ref, str) and pins is not None and ref in pins:
                        data = self._pinned_row(fld, ref, pins[ref], layer)
                    if data is None:
                        h, s = bank.acquire_ref(ref, layer)
                        held.append(h)
                    else:
                        s = bank.write_private(row, private, data)
                        private += 1
                except VectorBankError as exc:
                    raise RequestArgError(f"{fld}: {exc}") from None
                slots.append(s)
        except Exception:
            for h in held:
                bank.release(h)
            raise
        hm = self.host
        for layer, idx in per_layer.items():
            n = len(idx)
            for j, i in enumerate(idx):
                op = spec.ops[i]
                gated = g is not None and op.layer >= g.layer
                hm["op_kind"][layer, row, j] = OP_CODES[op.op]
                hm["op_slot"][layer, row, j] = slots[i]
                if op.op == "cap":
                    hm["op_a"][layer, row, j] = -np.inf if op.min is None else op.min
                    hm["op_b"][layer, row, j] = np.inf if op.max is None else op.max
                else:
                    hm["op_a"][layer, row, j] = op.scale
                    hm["op_b"][layer, row, j] = 0.0
                hm["op_flags"][layer, row, j] = replace(op, gated=gated).flags
            hm["op_kind"][layer, row, n:] = OP_NONE
            self.layer_use[layer] += 1
            self._mark(self._op_dirty, layer)
        if g is not None:
            self._gate_reset.append(row)
            hm["gate_slot"][g.layer, row] = slots[len(spec.ops)]
            hm["gate_threshold"][row] = g.threshold
            hm["gate_sharpness"][row] = g.sharpness
            self.gate_use[g.layer] += 1
            self._mark(self._gate_dirty, g.layer)
            self._gate_params_dirty = True
        for c in set(capture_layers):
            hm["capture_flag"][c, row] = 1
            self.capture_use[c] += 1
            self._mark(self._capture_dirty, c)
        self._rows[row] = _RowRecord(tuple(per_layer), None if g is None else g.layer, held,
                                     tuple(sorted(set(capture_layers))))

    def _pinned_row(self, fld: str, name: str, content_hash: str, layer: int) -> np.ndarray | None:
        """The ``[H]`` row an op at ``layer`` uses of ``name``'s pinned version: None when the name still holds that
        version (acquire it as usual), else the version's row (for a private slot).

        Raises:
            RequestArgError: the version is no longer kept (re-registered or deleted long ago, under heavy churn).
        """
        info = self.bank.lookup(name)
        if info is not None and info.content_hash == content_hash:
            return None
        rows = self.bank.version_rows(content_hash)
        if rows is None:
            raise RequestArgError(
                f"{fld}: vector {name!r} was re-registered or deleted after this request was admitted, and the "
                "version it was admitted with is no longer kept; send the request again")
        if rows.shape[0] == 1:
            return rows[0]
        if not 0 <= layer < rows.shape[0]:
            raise RequestArgError(f"{fld}: layer {layer} out of range for per-layer vector {name!r}")
        if not rows[layer].any():
            raise RequestArgError(f"{fld}: {zero_row_message(name, layer)}")
        return rows[layer]

    def remove_request(self, row: int) -> None:
        """Clear row ``row`` (staged) and release its vectors. Idempotent."""
        rec = self._rows.pop(row, None)
        if rec is None:
            return
        hm = self.host
        for layer in rec.layers:
            for c in self.OP_COLUMNS:
                hm[c][layer, row, :] = 0
            self.layer_use[layer] -= 1
            self._mark(self._op_dirty, layer)
        if rec.gate_layer is not None:
            hm["gate_slot"][rec.gate_layer, row] = -1
            self.gate_use[rec.gate_layer] -= 1
            self._mark(self._gate_dirty, rec.gate_layer)
        for c in rec.capture_layers:
            hm["capture_flag"][c, row] = 0
            self.capture_use[c] -= 1
            self._mark(self._capture_dirty, c)
        for h in rec.held:
            self.bank.release(h)

    @staticmethod
    def _mark(span: list[int], layer: int) -> None:
        span[0], span[1] = min(span[0], layer), max(span[1], layer + 1)

    def flush(self) -> int:
        """Publish staged writes (the bank's too): per op column, one non-blocking copy of the changed layers'
        span; the gate tables likewise. A steady step copies nothing. Returns the number of copies."""
        copies = int(self.bank.flush())
        spans = [(self.OP_COLUMNS, self._op_dirty), (("gate_slot",), self._gate_dirty),
                 (("capture_flag",), self._capture_dirty)]
        for cols, span in spans:
            lo, hi = span
            if lo >= hi:
                continue
            for c in cols:
                copies += self._copy(c, slice(lo, hi))
            span[0], span[1] = self.num_layers, 0
        if self._gate_params_dirty:
            copies += self._copy("gate_threshold", slice(None)) + self._copy("gate_sharpness", slice(None))
            self._gate_params_dirty = False
        if self._gate_reset:
            idx = torch.tensor(self._gate_reset, dtype=torch.int64).to(self.device, non_blocking=True)
            self.gate_tokens.index_fill_(0, idx, 0.0)
            self.gate_open.index_fill_(0, idx, 0.0)
            self._gate_reset.clear()
            copies += 1
        return copies

    def record_gates(self) -> None:
        """After the main forward: count, per gated row, its decode tokens and those whose gate was open
        (device ops only; the per-token buffers and the gate values the ops used). Call only when
        ``gate_use.any()``."""
        t = self._main_tokens
        if not t:
            return
        rows = self.token_row[:t].long()
        gated = (self.dev["gate_slot"] >= 0).any(dim=0)  # [R] rows with a gate at some layer
        mask = (self.token_decode[:t] != 0) & gated.index_select(0, rows)
        self.gate_tokens.index_add_(0, rows, mask.double())
        self.gate_open.index_add_(0, rows, (mask & (self.gate[:t] >= 0.5)).double())

    def end_forward(self) -> None:
        """Forget the staged forward's bookkeeping (the runner calls it after the step's forward)."""
        self._main_tokens = 0
        self._capture_tokens = None

    def gate_counts(self, row: int) -> torch.Tensor:
        """``[2]`` fp64 device tensor (decode tokens seen, tokens with the gate open) of ``row`` (a copy)."""
        return torch.stack([self.gate_tokens[row], self.gate_open[row]])

    def _copy(self, col: str, sl: slice) -> int:
        dst, src = self.dev[col][sl], self._host_t[col][sl]
        if dst.data_ptr() == src.data_ptr():
            return 0
        dst.copy_(src, non_blocking=True)
        return 1

    # ---- per step ------------------------------------------------------------------------------------------
    def stage_tokens(self, rows: np.ndarray, num_scheduled: np.ndarray, num_computed: np.ndarray,
                     num_prompt: np.ndarray) -> int:
        """Stage ``token_row`` / ``token_decode`` of one forward's scheduled tokens in the next host buffer.

        The forward's tokens are the requests' scheduled tokens back to back, in batch order (the order after
        the runner's batch update). A token is a decode token when its position is at or after the
        request's prompt length (so a prefill chunk is prompt, a decode token is decode, and a resumed
        request's recomputed output counts as decode, as it did when first generated). Nothing is copied:
        :meth:`extend_tokens` may append, :meth:`publish_tokens` copies.

        Args:
            rows: ``[n]`` int steering row per request (0: no steering).
            num_scheduled: ``[n]`` int tokens scheduled this step per request.
            num_computed: ``[n]`` int tokens of the request already computed (the first scheduled position).
            num_prompt: ``[n]`` int prompt length.
        Returns:
            ``T``, the number of tokens staged.
        """
        ns = np.asarray(num_scheduled, dtype=np.int64)
        t = int(ns.sum())
        if t > self.max_tokens:
            raise ValueError(f"{t} scheduled tokens exceed the token buffers ({self.max_tokens})")
        self._select_host((self._token_ring + 1) % _TOKEN_RING)
        self._host_row[:t] = np.repeat(np.asarray(rows, dtype=np.int32), ns)
        starts = np.cumsum(ns) - ns
        # Index (in the step) of each request's first decode token: its first position >= num_prompt.
        first_decode = starts + np.clip(np.asarray(num_prompt, dtype=np.int64) - np.asarray(num_computed), 0, ns)
        self._host_decode[:t] = self._arange[:t] >= np.repeat(first_decode, ns)
        self._staged = t
        self._main_tokens = t
        self._capture_tokens = None
        if self.capture_use.any():
            # Which of this forward's tokens capture: (token index, request index, position), for the runner
            # to read back after the forward (capture steps only).
            flags = self.host["capture_flag"].any(axis=0)
            tok = np.flatnonzero(flags[self._host_row[:t]])
            if tok.size:
                req = np.repeat(np.arange(ns.shape[0]), ns)[tok]
                pos = np.asarray(num_computed, dtype=np.int64)[req] + (tok - starts[req])
                self._capture_tokens = (tok, req, pos)
        return t

    def take_capture_tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The last staged forward's capturing tokens ``(token index [N], request index [N], position [N])``
        (None: none); cleared by the call."""
        out, self._capture_tokens = self._capture_tokens, None
        return out

    def capture_rows_at(self, layer: int, token_rows: np.ndarray) -> np.ndarray:
        """Mask ``[N]``: which of the given tokens' rows capture ``layer`` (host mirror)."""
        return self.host["capture_flag"][layer, token_rows] != 0

    def staged_rows(self, tok: np.ndarray) -> np.ndarray:
        """The staged steering rows of the given token indices of the last forward."""
        return self._host_row[tok].copy()

    def stage_decode_tokens(self, rows: np.ndarray) -> int:
        """Stage a forward made only of decode tokens (VFD's candidate forwards): ``rows [E]`` per token."""
        self._select_host((self._token_ring + 1) % _TOKEN_RING)
        self._staged = 0
        self._capture_tokens = None
        return self.extend_tokens(rows)

    def extend_tokens(self, rows: np.ndarray) -> int:
        """Append decode tokens (VFD's candidate sequences after the scheduled tokens) to the staged forward:
        ``rows [E]`` the steering row of each. Returns the staged token count."""
        e = int(np.asarray(rows).shape[0])
        t = self._staged
        if t + e > self.max_tokens:
            raise ValueError(f"{t + e} tokens exceed the token buffers ({self.max_tokens})")
        self._host_row[t : t + e] = rows
        self._host_decode[t : t + e] = 1
        self._staged = t + e
        return self._staged

    def publish_tokens(self, pad_to: int | None = None) -> int:
        """Copy the staged forward's per-token buffers to the device (ONE non-blocking copy).

        Args:
            pad_to: the forward's padded token count (a CUDA-graph padded batch): ``[T, pad_to)`` get row 0.
        Returns:
            ``T``, the number of tokens staged (the ops read ``[:hidden.shape[0]]``).
        """
        t = self._staged
        tp = t if pad_to is None else max(int(pad_to), t)
        if tp > self.max_tokens:
            raise ValueError(f"{tp} tokens (padded) exceed the token buffers ({self.max_tokens})")
        if tp == 0:
            return 0
        self._host_row[t:tp] = 0
        self._host_decode[t:tp] = 0
        n = self._row_off + 4 * tp
        self._token_dev[:n].copy_(self._token_hosts[self._token_ring][:n], non_blocking=True)
        return t

    def fill_tokens(self, rows: np.ndarray, num_scheduled: np.ndarray, num_computed: np.ndarray,
                    num_prompt: np.ndarray, pad_to: int | None = None) -> int:
        """:meth:`stage_tokens` then :meth:`publish_tokens` (a forward with no appended tokens)."""
        self.stage_tokens(rows, num_scheduled, num_computed, num_prompt)
        return self.publish_tokens(pad_to)
