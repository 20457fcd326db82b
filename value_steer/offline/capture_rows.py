"""Reading a ``capture_layers`` capture back: per request, its residual-stream rows of one layer in a position window.

Shared by ``value-steer vectors`` (the judged-sample method: decode tokens) and ``vectors --pairs`` (prefilled
response tokens). The capture format is :mod:`value_steer.core.features`'; request ids map through the adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch


def read_layer_rows(directory: Path, request_ids: list[str],
                    window: dict[str, tuple[int, int | None]]) -> list[torch.Tensor]:
    """Per request (in ``request_ids`` order), its captured rows of one layer at positions ``lo <= p < hi``
    (``window[rid] = (lo, hi)``, ``hi`` None: no end), in position order, ``[T_i, H]`` fp32."""
    from safetensors.torch import load_file

    from value_steer.core.features import read_capture_index
    from value_steer.patches import get_adapter

    index = read_capture_index(directory, get_adapter().client_request_id)
    shards = [load_file(str(p)) for p in sorted(directory.glob("shard-*.safetensors"))]
    hidden = torch.cat([s["hidden"] for s in shards]).float()
    seq = torch.cat([s["seq_id"] for s in shards])
    pos = torch.cat([s["position"] for s in shards])
    order = torch.argsort(seq * (1 << 20) + pos)
    hidden, seq, pos = hidden[order], seq[order], pos[order]
    bounds = torch.searchsorted(seq, torch.arange(int(seq.max()) + 2))
    out = []
    for rid in request_ids:
        s = index[rid]
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        start, end = window[rid]
        p = pos[lo:hi]
        keep = (p >= start) & (p < end) if end is not None else p >= start
        rows = hidden[lo:hi][keep]
        if rows.shape[0] == 0:
            raise RuntimeError(f"{directory}: request {rid} has no captured rows at positions [{start}, {end})")
        out.append(rows)
    return out
