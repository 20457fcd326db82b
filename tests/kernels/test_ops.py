"""Custom-op registration: ``torch.library.opcheck`` per op (C++ and reference CPU impls), import hygiene,
and (GPU) one steering step captured in a CUDA graph."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.core.modes import MODE_ABSTAIN, MODE_VFD
from value_steer.core.row_table import RowTable
from value_steer.core.value_head import ValueHead
from value_steer.kernels.value_head import prepare_value_head_weights
from value_steer.kernels.write_kv import kv_pointer_table
from value_steer.patches.vllm_0_32.kv_layout import kv_views_cpu, kv_views_fa


@pytest.fixture(params=["ext", "reference"])
def cpu_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once through the C++ extension and once through the torch-reference fallback."""
    if request.param == "ext" and not value_steer.has_extension():
        pytest.skip("value_steer._C not built")
    if request.param == "reference":
        monkeypatch.setattr(value_steer._ext, "extension", lambda: None)
    return request.param


def _table() -> RowTable:
    table = RowTable.empty(4)
    table.set_row(1, mode=MODE_VFD, threshold=0.5, sign=1.0, num_candidates=3)
    table.set_row(2, mode=MODE_ABSTAIN, threshold=0.5, sign=-1.0, num_candidates=1)
    return table


def _opcheck(op, args) -> None:
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_value_head(cpu_impl: str) -> None:
    head = ValueHead(64)
    w = [t.detach() for t in head.weights()]
    _opcheck(torch.ops.value_steer.value_head.default, (torch.randn(5, 64), *w))
    wb = prepare_value_head_weights(head, torch.bfloat16)
    _opcheck(torch.ops.value_steer.value_head.default, (torch.randn(3, 64, dtype=torch.bfloat16), *wb))


@pytest.mark.parametrize("hidden_dtype", [None, torch.bfloat16])
def test_opcheck_score_and_select(cpu_impl: str, hidden_dtype) -> None:
    t = _table()
    r, k = 6, 4
    hidden = None if hidden_dtype is None else torch.randn(r * k, 32).to(hidden_dtype)
    row_idx = torch.tensor([0, 1, 2, 1, 3, 2], dtype=torch.int32)
    args = (
        torch.rand(r, k), torch.randint(0, 100, (r, k)), torch.randn(r, k), row_idx,
        t.threshold, t.sign, t.mode, t.num_candidates, hidden,
    )  # fmt: skip
    _opcheck(torch.ops.value_steer.score_and_select.default, args)


def test_opcheck_write_kv(cpu_impl: str) -> None:
    raw = torch.zeros(4, 2, 16, 2 * 32, dtype=torch.bfloat16)
    kc, vc = kv_views_fa(raw)
    key = torch.randn(5, 2, 32, dtype=torch.bfloat16)
    _opcheck(torch.ops.value_steer.write_kv.default, (key, key + 1, kc, vc, torch.tensor([3, -1, 7, 20, 63])))


def test_opcheck_copy_kv_slots(cpu_impl: str) -> None:
    caches = [*kv_views_fa(torch.randn(4, 2, 16, 64)), *kv_views_cpu(torch.randn(4, 2, 16, 64), "vec")]
    _opcheck(
        torch.ops.value_steer.copy_kv_slots.default, (caches, torch.tensor([1, 2, -1]), torch.tensor([10, 11, 12]))
    )


def test_ops_in_torch_compile_graph_capture() -> None:
    """The fake impls let the ops trace (no graph breaks) under make_fx / FakeTensor."""
    from torch.fx.experimental.proxy_tensor import make_fx

    head = ValueHead(32)
    w = [t.detach() for t in head.weights()]
    t = _table()

    def step(x, tokens, logprobs, row_idx, thr, sign, mode, ncand, w0, b0, w2, b2, w4, b4):
        values = ops.value_head(x, w0, b0, w2, b2, w4, b4).view(-1, 2)
        return ops.score_and_select(values, tokens, logprobs, row_idx, thr, sign, mode, ncand)

    row_idx = torch.tensor([0, 1, 2, 1], dtype=torch.int32)
    args = (
        torch.randn(8, 32), torch.randint(0, 9, (4, 2)), torch.randn(4, 2), row_idx,
        t.threshold, t.sign, t.mode, t.num_candidates, *w,
    )  # fmt: skip
    gm = make_fx(step, tracing_mode="fake")(*args)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "value_steer.value_head.default" in targets and "value_steer.score_and_select.default" in targets


def test_kernels_import_without_triton_or_vllm() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, value_steer.kernels as K\n"
        "from value_steer.kernels import _triton_utils\n"
        "assert not _triton_utils.HAS_TRITON\n"
        "assert 'vllm' not in sys.modules\n"
        "from value_steer.core.value_head import ValueHead\n"
        "h = ValueHead(16); x = torch.randn(3, 16)\n"
        "torch.testing.assert_close(K.value_head(x, *h.weights()), h.p(x), rtol=0, atol=1e-5)\n"
        "try:\n    K.value_head_triton(x, *h.weights())\nexcept RuntimeError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise AssertionError('expected RuntimeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- CUDA graph capture (GPU only)


@pytest.mark.gpu
def test_cuda_graph_steering_step_matches_eager() -> None:
    dev = torch.device("cuda")
    h, r, k, layers, nb, bs, kvh, d = 576, 4, 4, 32, 32, 16, 2, 64
    torch.manual_seed(0)
    head = ValueHead(h).to(dev)
    w = prepare_value_head_weights(head, torch.float32)
    table = RowTable.empty(8, device=dev)
    raw = torch.randn(layers, nb, bs, kvh, 2 * d, device=dev, dtype=torch.bfloat16)
    caches = [t for i in range(layers) for t in kv_views_fa(raw[i].permute(0, 2, 1, 3), d)]

    hidden = torch.zeros(r * k, h, device=dev)
    tokens = torch.zeros(r, k, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(r, k, device=dev)
    row_idx = torch.zeros(r, dtype=torch.int32, device=dev)
    cand_slots = torch.zeros(r, k, dtype=torch.int64, device=dev)
    commit_slots = torch.zeros(r, dtype=torch.int64, device=dev)

    def step():
        values = ops.value_head(hidden, *w).view(r, k)
        out = ops.score_and_select(
            values, tokens, logprobs, row_idx, table.threshold, table.sign, table.mode, table.num_candidates, hidden
        )
        src = cand_slots.gather(1, out[0].unsqueeze(1)).squeeze(1)
        ops.copy_kv_slots(caches, src, commit_slots)
        return (values, *out)

    def load_inputs(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        hidden.copy_(torch.randn(r * k, h, generator=g))
        tokens.copy_(torch.randint(0, 1000, (r, k), generator=g))
        logprobs.copy_(-torch.rand(r, k, generator=g))
        row_idx.copy_(torch.tensor([0, 1, 2, 3], dtype=torch.int32))
        perm = torch.randperm(nb * bs, generator=g)
        cand_slots.copy_(perm[: r * k].view(r, k))
        commit_slots.copy_(perm[r * k : r * k + r])
        host = RowTable.empty(8)
        host.set_row(1, mode=MODE_VFD, threshold=float(torch.rand((), generator=g)), sign=1.0, num_candidates=4)
        host.set_row(2, mode=MODE_ABSTAIN, threshold=float(torch.rand((), generator=g)), sign=-1.0, num_candidates=1)
        host.set_row(3, mode=MODE_VFD, threshold=float(torch.rand((), generator=g)), sign=-1.0, num_candidates=2)
        for name in ("threshold", "sign", "mode", "num_candidates"):
            getattr(table, name).copy_(getattr(host, name))

    load_inputs(0)
    kv_pointer_table(caches)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels, builds the pointer table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for seed in (1, 2, 3):
        load_inputs(seed)
        before = raw.clone()
        graph.replay()
        torch.cuda.synchronize()
        graph_out = [t.clone() for t in static_out]
        graph_raw = raw.clone()
        raw.copy_(before)
        eager_out = step()
        torch.cuda.synchronize()
        for a, b in zip(graph_out, eager_out):
            assert torch.equal(a, b)
        assert torch.equal(graph_raw, raw)


def _steer_args(dtype: torch.dtype, fused: bool) -> tuple:
    """A small steer_activations call: rows 0..2 (row 0 off), every op kind, prompt/decode filters, a gated op,
    per-token buffers longer than T."""
    g = torch.Generator().manual_seed(0)
    t, h = 6, 32
    hidden = torch.randn(t, h, generator=g).to(dtype)
    residual = torch.randn(t, h, generator=g).to(dtype) if fused else torch.empty(0, dtype=dtype)
    token_row = torch.tensor([0, 1, 2, 1, 2, 0, 9, 9], dtype=torch.int32)
    token_decode = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.int8)
    gate = torch.rand(8, generator=g)
    bank = torch.randn(3, h, generator=g)
    op_kind = torch.tensor([[0, 0, 0], [1, 2, 0], [3, 1, 2]], dtype=torch.int32)
    op_slot = torch.tensor([[0, 0, 0], [0, 1, 0], [2, 1, 0]], dtype=torch.int32)
    op_a = torch.tensor([[0.0, 0.0, 0.0], [2.0, -0.5, 0.0], [0.0, 1.0, -float("inf")]])
    op_b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.3]])
    op_flags = torch.tensor([[0, 0, 0], [3, 1, 0], [7, 2, 3]], dtype=torch.int32)
    return hidden, residual, token_row, token_decode, gate, bank, op_kind, op_slot, op_a, op_b, op_flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["no_residual", "fused_residual"])
def test_opcheck_steer_activations(cpu_impl: str, dtype: torch.dtype, fused: bool) -> None:
    _opcheck(torch.ops.value_steer.steer_activations.default, _steer_args(dtype, fused))


@pytest.mark.parametrize("fused", [False, True], ids=["no_residual", "fused_residual"])
def test_opcheck_steer_gate(cpu_impl: str, fused: bool) -> None:
    hidden, residual, token_row, _, _, bank, *_ = _steer_args(torch.bfloat16, fused)
    gate_slot = torch.tensor([-1, 2, -1], dtype=torch.int32)
    args = (hidden, residual, token_row, bank, gate_slot, torch.tensor([0.0, 0.1, 0.0]), torch.full((3,), 5.0),
            torch.zeros(8))  # fmt: skip
    _opcheck(torch.ops.value_steer.steer_gate.default, args)


def test_steer_ops_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, value_steer.kernels as K\n"
        "x = torch.randn(3, 8); row = torch.tensor([0, 1, 1], dtype=torch.int32)\n"
        "tabs = [torch.tensor([[0], [1]], dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),\n"
        "        torch.tensor([[0.0], [2.0]]), torch.zeros(2, 1), torch.tensor([[0], [3]], dtype=torch.int32)]\n"
        "args = (x, x.new_empty(0), row, torch.zeros(3, dtype=torch.int8), torch.ones(3), torch.ones(1, 8), *tabs)\n"
        "out = K.steer_activations(*args)\n"
        "assert torch.equal(out[0], x[0]) and torch.allclose(out[1:], x[1:] + 2.0)\n"
        "try:\n    K.steer_activations_triton(*args)\nexcept RuntimeError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise AssertionError('expected RuntimeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
