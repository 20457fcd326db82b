"""value_steer.runtime.token_filter: the runtime's mask path equals the core reference (issue 24)."""

from __future__ import annotations

import pytest
import torch

from value_steer.core.qhead import token_filter_rows
from value_steer.runtime.token_filter import mask_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_rows_equals_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    b, v = 6, 300
    logits = (torch.randn(b, v + 4, generator=g) * 3).to(dtype)
    q = torch.randn(b, v, generator=g) * 2
    q[3] = 5.0  # every token predicted unsafe: the fallback keeps the safest
    q[3, 17] = 4.0
    threshold = torch.tensor([0.5, 0.3, 0.9, 0.5, 0.0, 1.0])
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    on = torch.tensor([True, True, True, True, True, False])
    want = token_filter_rows(logits, q, threshold, sign, torch.zeros(b), on)
    got = mask_rows(logits, q, threshold, sign, on)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got[0][3, :v]).sum() == 1 and torch.isfinite(got[0][3, 17])


def test_mask_rows_with_k_equals_the_reference():
    torch.manual_seed(3)
    b, v = 6, 300
    logits = torch.randn(b, v + 4) * 3
    q = torch.randn(b, v) * 2
    threshold = torch.tensor([0.5, 0.3, 0.7, 0.5, 0.5, 0.9])
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    on = torch.tensor([True, True, True, False, True, True])
    k = torch.tensor([0, 4, 8, 4, 1, 2])
    want = token_filter_rows(logits, q, threshold, sign, torch.zeros(b), on, k=k)
    got = mask_rows(logits, q, threshold, sign, on, k=k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0][3], logits[3])
