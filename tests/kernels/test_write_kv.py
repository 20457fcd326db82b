"""write_kv / copy_kv_slots: Triton launchers (interpreter on CPU), C++ ops and custom ops vs the references.

Layouts: vLLM 0.19 FA ``[2, nb, bs, kvh, d]``; vLLM >= 0.26 FA per-layer ``[nb, kvh, bs, 2d]`` logical
views in the LBNHC / LBHNC / BLNHC physical orders; the vLLM 0.32 CPU-attention cache (vec: K
column-major, V row-major per page; amx: packed, 6-D tiled views, C++ only).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import value_steer
import value_steer.kernels as ops
from value_steer.kernels.write_kv import (
    copy_kv_slots_reference,
    copy_kv_slots_triton,
    kv_pointer_table,
    write_kv_reference,
    write_kv_triton,
)
from value_steer.patches.vllm_0_32.kv_layout import kv_views_cpu, kv_views_fa, kv_views_fa_v019, write_kv_fa2

needs_ext = pytest.mark.skipif(not value_steer.has_extension(), reason="value_steer._C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cpp_write(*args) -> None:
    value_steer.require_extension().write_kv(*args)


def _cpp_copy(caches, src, dst) -> None:
    value_steer.require_extension().copy_kv_slots(list(caches), src, dst)


WRITE_IMPLS = [
    pytest.param(write_kv_triton, id="triton"),
    pytest.param(_cpp_write, id="cpp", marks=needs_ext),
    pytest.param(ops.write_kv, id="op"),
]
COPY_IMPLS = [
    pytest.param(copy_kv_slots_triton, id="triton"),
    pytest.param(_cpp_copy, id="cpp", marks=needs_ext),
    pytest.param(ops.copy_kv_slots, id="op"),
]


def _on(impl, device: torch.device) -> torch.device:
    """Triton launchers run on `device` (CUDA natively, else the CPU interpreter); the C++ op and the
    custom op's CPU dispatch run on CPU (the CUDA dispatch is covered by the gpu tests)."""
    return device if impl in (write_kv_triton, copy_kv_slots_triton) else torch.device("cpu")


def make_cache(layout: str, nb: int, bs: int, kvh: int, d: int, dtype: torch.dtype, device="cpu", layers: int = 1):
    """Physical buffer + per-layer (K, V) logical views, filled with random data."""
    g = torch.Generator().manual_seed(123)
    if layout == "fa_v019":
        raw = torch.randn(layers, 2, nb, bs, kvh, d, generator=g).to(dtype).to(device)
        views = [kv_views_fa_v019(raw[i]) for i in range(layers)]
    elif layout == "fa_LBNHC":  # vLLM's default: per layer [nb, bs, kvh, 2d] contiguous
        raw = torch.randn(layers, nb, bs, kvh, 2 * d, generator=g).to(dtype).to(device)
        views = [kv_views_fa(raw[i].permute(0, 2, 1, 3), d) for i in range(layers)]
    elif layout == "fa_LBHNC":
        raw = torch.randn(layers, nb, kvh, bs, 2 * d, generator=g).to(dtype).to(device)
        views = [kv_views_fa(raw[i], d) for i in range(layers)]
    elif layout == "fa_BLNHC":  # layer-interleaved pages: block stride spans all layers
        raw = torch.randn(nb, layers, bs, kvh, 2 * d, generator=g).to(dtype).to(device)
        views = [kv_views_fa(raw[:, i].permute(0, 2, 1, 3), d) for i in range(layers)]
    elif layout in ("cpu_vec", "cpu_amx"):
        raw = torch.randn(layers, nb, kvh, bs, 2 * d, generator=g).to(dtype).to(device)
        views = [kv_views_cpu(raw[i], layout[4:]) for i in range(layers)]
    else:
        raise AssertionError(layout)
    return raw, views


LAYOUTS_4D = ["fa_v019", "fa_LBNHC", "fa_LBHNC", "fa_BLNHC", "cpu_vec"]
# (block_size, kv_heads, head_dim) cycled over layouts x dtypes: every value appears with every layout.
GEOMS = [(16, 1, 64), (32, 8, 128), (64, 3, 64), (16, 4, 80), (32, 2, 64)]
CASES = [
    pytest.param(layout, dtype, *GEOMS[i % len(GEOMS)], id=f"{layout}-{str(dtype)[6:]}-{GEOMS[i % len(GEOMS)]}")
    for i, (layout, dtype) in enumerate(itertools.product(LAYOUTS_4D, DTYPES))
]


def _tokens(n: int, kvh: int, d: int, dtype: torch.dtype, nb: int, bs: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, 3, kvh, d, generator=g).to(dtype)  # key/value as non-contiguous slices, like vLLM
    slots = torch.randperm(nb * bs, generator=g)[:n]
    slots[::5] = -1  # padding tokens are skipped
    return qkv[:, 1], qkv[:, 2], slots


@pytest.mark.parametrize("impl", WRITE_IMPLS)
@pytest.mark.parametrize(("layout", "dtype", "bs", "kvh", "d"), CASES)
def test_write_kv_matches_reference(
    impl, layout: str, dtype: torch.dtype, bs: int, kvh: int, d: int, device: torch.device
) -> None:
    nb, dev = 5, _on(impl, device)
    raw, ((kc, vc),) = make_cache(layout, nb, bs, kvh, d, dtype, dev)
    raw_ref, ((kc_ref, vc_ref),) = make_cache(layout, nb, bs, kvh, d, dtype)
    key, value, slots = _tokens(13, kvh, d, dtype, nb, bs)
    impl(key.to(dev), value.to(dev), kc, vc, slots.to(dev))
    write_kv_reference(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(raw.cpu(), raw_ref)  # whole buffer: right slots written, nothing else touched
    assert not torch.equal(raw_ref, make_cache(layout, nb, bs, kvh, d, dtype)[0])


@pytest.mark.parametrize("impl", WRITE_IMPLS)
def test_write_kv_casts_to_cache_dtype(impl, device: torch.device) -> None:
    dev = _on(impl, device)
    raw, ((kc, vc),) = make_cache("fa_LBNHC", 4, 16, 2, 64, torch.bfloat16, dev)
    raw_ref, ((kc_ref, vc_ref),) = make_cache("fa_LBNHC", 4, 16, 2, 64, torch.bfloat16)
    key, value, slots = _tokens(9, 2, 64, torch.float32, 4, 16)
    impl(key.to(dev), value.to(dev), kc, vc, slots.to(dev))
    write_kv_reference(key, value, kc_ref, vc_ref, slots)
    # The Triton interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest): allow 1 ulp.
    torch.testing.assert_close(raw.cpu().float(), raw_ref.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("impl", WRITE_IMPLS)
def test_write_kv_empty(impl, device: torch.device) -> None:
    dev = _on(impl, device)
    raw, ((kc, vc),) = make_cache("fa_v019", 2, 16, 2, 64, torch.float16, dev)
    before = raw.clone()
    empty = torch.empty(0, 2, 64, dtype=torch.float16, device=dev)
    impl(empty, empty, kc, vc, torch.empty(0, dtype=torch.int64, device=dev))
    assert torch.equal(raw, before)


def test_write_kv_fa2_entry_point() -> None:
    for layout in ("fa_v019", "fa_LBHNC"):
        raw, _ = make_cache(layout, 4, 16, 2, 64, torch.float16)
        raw = raw[0]
        raw_ref = raw.clone()
        key, value, slots = _tokens(7, 2, 64, torch.float16, 4, 16)
        write_kv_fa2(key, value, raw, slots)
        kc, vc = kv_views_fa_v019(raw_ref) if raw.dim() == 5 else kv_views_fa(raw_ref)
        write_kv_reference(key, value, kc, vc, slots)
        assert torch.equal(raw, raw_ref)


def test_write_kv_bad_args_raise() -> None:
    _, ((kc, vc),) = make_cache("fa_v019", 2, 16, 2, 64, torch.float16)
    key, value, slots = _tokens(4, 2, 64, torch.float16, 2, 16)
    with pytest.raises(ValueError):
        write_kv_triton(key, value, kc, vc, slots.int())
    with pytest.raises(ValueError):
        write_kv_triton(key[:, :1], value[:, :1], kc, vc, slots)


# ---------------------------------------------------------------- copy_kv_slots


def _pairs(nb: int, bs: int, p: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(nb * bs, generator=g)
    src, dst = perm[:p].clone(), perm[p : 2 * p].clone()  # disjoint, distinct destinations
    if p > 2:
        src[1] = -1
        dst[2] = -1
    return src, dst


@pytest.mark.parametrize("impl", COPY_IMPLS)
@pytest.mark.parametrize(
    ("layout", "dtype", "layers", "bs", "kvh", "d"),
    [
        ("fa_LBNHC", torch.bfloat16, 32, 16, 8, 128),
        ("fa_BLNHC", torch.float16, 4, 32, 2, 64),
        ("fa_v019", torch.float32, 3, 64, 1, 64),
        ("cpu_vec", torch.bfloat16, 4, 32, 3, 64),  # K and V views have different strides
    ],
)
def test_copy_kv_slots_matches_reference(impl, layout, dtype, layers, bs, kvh, d, device: torch.device) -> None:
    nb, dev = 4, _on(impl, device)
    raw, views = make_cache(layout, nb, bs, kvh, d, dtype, dev, layers=layers)
    raw_ref, views_ref = make_cache(layout, nb, bs, kvh, d, dtype, layers=layers)
    caches = [t for kv in views for t in kv]
    caches_ref = [t for kv in views_ref for t in kv]
    src, dst = _pairs(nb, bs, 6)
    impl(caches, src.to(dev), dst.to(dev))
    copy_kv_slots_reference(caches_ref, src, dst)
    assert torch.equal(raw.cpu(), raw_ref)
    assert not torch.equal(raw_ref, make_cache(layout, nb, bs, kvh, d, dtype, layers=layers)[0])


@pytest.mark.parametrize("impl", COPY_IMPLS)
def test_copy_kv_slots_empty(impl, device: torch.device) -> None:
    dev = _on(impl, device)
    raw, views = make_cache("fa_LBNHC", 2, 16, 2, 64, torch.float16, dev, layers=2)
    before = raw.clone()
    caches = [t for kv in views for t in kv]
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    impl(caches, empty, empty)
    impl([], torch.tensor([1], device=dev), torch.tensor([2], device=dev))
    assert torch.equal(raw, before)


def test_pointer_table_is_cached_and_correct() -> None:
    _, views = make_cache("cpu_vec", 2, 16, 2, 64, torch.float16, layers=2)
    caches = [t for kv in views for t in kv]
    ptrs, strides = kv_pointer_table(caches)
    assert kv_pointer_table(caches)[0] is ptrs
    assert ptrs.tolist() == [c.data_ptr() for c in caches]
    assert strides.tolist() == [list(c.stride()) for c in caches]


# ---------------------------------------------------------------- vLLM CPU layouts (C++ only for AMX)


def _amx_reference_write(raw: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Transcription of vLLM's ``AttentionImpl<ISA::AMX>::reshape_and_cache`` (bf16) index math."""
    _, kvh, bs, d2 = raw.shape
    d = d2 // 2
    flat = raw.view(raw.shape[0], kvh, -1)  # one (block, head) page of 2*bs*d elements
    for n, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        for h in range(kvh):
            page = flat[blk, h]
            group, goff = divmod(off, 16)  # K: 16-token groups of (d/2) packed dim pairs
            for j in range(d // 2):
                base = 2 * (group * 16 * (d // 2) + goff + j * 16)
                page[base] = key[n, h, 2 * j]
                page[base + 1] = key[n, h, 2 * j + 1]
            sub, soff = divmod(off, 2)  # V: token pairs in 16-dim groups
            for i in range(d // 16):
                for j in range(16):
                    page[bs * d + i * bs * 16 + sub * 2 * 16 + soff + j * 2] = value[n, h, i * 16 + j]


@needs_ext
def test_cpp_amx_tiled_views() -> None:
    nb, kvh, bs, d = 3, 2, 32, 64
    raw, ((kc, vc),) = make_cache("cpu_amx", nb, bs, kvh, d, torch.bfloat16)
    assert kc.dim() == 6 and vc.dim() == 6
    raw = raw[0]
    expect = raw.clone()
    key, value, slots = _tokens(11, kvh, d, torch.bfloat16, nb, bs)
    ops.write_kv(key, value, kc, vc, slots)
    _amx_reference_write(expect, key, value, slots)
    assert torch.equal(raw, expect)
    # The 6-D reference path agrees too, and copy_kv_slots moves whole slots in the packed layout.
    raw2, ((kc2, vc2),) = make_cache("cpu_amx", nb, bs, kvh, d, torch.bfloat16)
    write_kv_reference(key, value, kc2, vc2, slots)
    assert torch.equal(raw2[0], raw)
    src, dst = _pairs(nb, bs, 5)
    ops.copy_kv_slots([kc, vc], src, dst)
    copy_kv_slots_reference([kc2, vc2], src, dst)
    assert torch.equal(raw2[0], raw)


def _vllm_cpu_ops():
    try:
        import vllm._custom_ops as vllm_ops

        if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
            return None
        return vllm_ops
    except Exception:  # vLLM missing or not a CPU build
        return None


@pytest.mark.parametrize(("isa", "bs", "d"), [("vec", 32, 64), ("vec16", 16, 64), ("vec16", 16, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_layout_matches_vllm_cpu_attention(isa: str, bs: int, d: int, dtype: torch.dtype) -> None:
    """kv_views_cpu + write_kv writes exactly what vLLM's own CPU reshape_and_cache writes."""
    vllm_ops = _vllm_cpu_ops()
    if vllm_ops is None:
        pytest.skip("vLLM CPU ops not available")
    nb, kvh = 3, 2
    ours = torch.zeros(nb, kvh, bs, 2 * d, dtype=dtype)
    theirs = ours.clone()
    key, value, slots = _tokens(17, kvh, d, dtype, nb, bs)
    ops.write_kv(key, value, *kv_views_cpu(ours, isa), slots)
    k_cache, v_cache = theirs.view(nb, kvh, bs * 2, d).chunk(2, dim=2)  # cpu_attn.py's own split
    vllm_ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), k_cache, v_cache, slots, isa)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- native Triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize(("layout", "dtype", "bs", "kvh", "d"), CASES)
def test_gpu_write_and_copy(layout: str, dtype: torch.dtype, bs: int, kvh: int, d: int) -> None:
    nb = 64
    raw, views = make_cache(layout, nb, bs, kvh, d, dtype, device="cuda", layers=2)
    raw_ref, views_ref = make_cache(layout, nb, bs, kvh, d, dtype, device="cuda", layers=2)
    key, value, slots = (t.cuda() for t in _tokens(300, kvh, d, dtype, nb, bs))
    ops.write_kv(key, value, *views[1], slots)
    write_kv_reference(key, value, *views_ref[1], slots)
    assert torch.equal(raw, raw_ref)
    src, dst = (t.cuda() for t in _pairs(nb, bs, 100))
    ops.copy_kv_slots([t for kv in views for t in kv], src, dst)
    copy_kv_slots_reference([t for kv in views_ref for t in kv], src, dst)
    assert torch.equal(raw, raw_ref)
