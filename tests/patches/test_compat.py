"""value-steer-compat: the adapter's contract holds on the installed vLLM, and steering fires."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")


def test_static_contract_holds():
    from value_steer.patches import get_adapter

    assert get_adapter().check_contract() == []


def test_contract_detects_drift(monkeypatch):
    from value_steer.patches.vllm_0_32 import contract

    monkeypatch.setattr(contract, "CONTRACT", [*contract.CONTRACT,
                        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample", ("self", "no_such_param")),
                        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.gone_method", ())])
    problems = contract.check_contract()
    assert any("no_such_param" in p for p in problems)
    assert any("gone_method" in p for p in problems)


def test_unsupported_version_is_refused():
    from value_steer.patches import adapter_name

    with pytest.raises(RuntimeError, match=r"supports vLLM \['0.32'\]; installed vLLM is 0.19.1"):
        adapter_name("0.19.1")


@pytest.mark.slow
def test_behavioral_cli():
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "value_steer.offline.compat", "--behavioral"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "abstain fires: 2 tokens, finish=stop" in proc.stdout
    assert proc.stdout.strip().endswith("compatible")
