"""Real-vLLM tests of the adapter: skipped where vLLM is not installed."""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
