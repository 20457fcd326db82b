"""``value-steer-compat``: check the installed vLLM against the adapter's contract.

Static (default): resolve the adapter for the installed vLLM version and check every internal it binds
to (``CONTRACT``: modules, functions and methods with the parameters the adapter passes or reads, classes
with the attributes it reads). ``--behavioral``: build a tiny
random Llama, start a real engine with ``ValueSteerWorker`` and a planted value head, and assert that
steering fires (abstention forces EOS when the value crosses the threshold, and does nothing when it
does not). Exit status 0 = compatible.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def static_check() -> list[str]:
    from value_steer.patches import adapter_name, get_adapter, vllm_version

    version = vllm_version()
    print(f"vLLM {version} -> adapter {adapter_name(version)}")
    adapter = get_adapter(version)
    problems = adapter.check_contract()
    for module, qualname, _ in adapter.CONTRACT:
        status = "MISSING" if any(p.startswith(f"{module}.{qualname}:") for p in problems) else "ok"
        print(f"  [{status:7s}] {module}.{qualname}")
    return problems


def write_constant_head(path: str | Path, hidden_size: int, logit: float, threshold: float | None = 0.5) -> str:
    """Save a head whose value is ``sigmoid(logit)`` for every input (last layer zero, bias = logit)."""
    import torch

    from value_steer.core.checkpoint import save_value_head
    from value_steer.core.value_head import ValueHead

    head = ValueHead(hidden_size)
    with torch.no_grad():
        head[4].weight.zero_()
        head[4].bias.fill_(logit)
    save_value_head(str(path), head, threshold=threshold, meta={"planted": f"constant logit {logit}"})
    return str(path)


def behavioral_check(workdir: Path) -> list[str]:
    from value_steer.offline.assets import apply_vllm_cpu_env
    from value_steer.offline.engines import offline_llm
    from value_steer.offline.models import make_tiny_llama

    apply_vllm_cpu_env("test")
    from vllm import SamplingParams

    model = make_tiny_llama(workdir / "tiny", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=2)
    # p = sigmoid(0) = 0.5 for every token: threshold 0.4 crosses, 0.6 does not.
    head_path = write_constant_head(workdir / "head.safetensors", 64, 0.0, threshold=0.6)
    llm = offline_llm(str(model), {"abstain": {"value_head_path": head_path}}, max_model_len=128, max_num_seqs=4)
    problems = []
    sp = dict(temperature=0.0, max_tokens=8)
    fired = llm.generate(["hello world"], SamplingParams(**sp, extra_args={"threshold": 0.4}))[0].outputs[0]
    quiet = llm.generate(["hello world"], SamplingParams(**sp, extra_args={"threshold": 0.6}))[0].outputs[0]
    print(f"  abstain fires: {len(fired.token_ids)} tokens, finish={fired.finish_reason}")
    print(f"  abstain quiet: {len(quiet.token_ids)} tokens, finish={quiet.finish_reason}")
    if not (fired.finish_reason == "stop" and len(fired.token_ids) == 2):
        problems.append("abstention did not force EOS on the first decode step")
    if len(quiet.token_ids) != 8:
        problems.append("abstention fired although the value never crossed the threshold")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="value-steer-compat", description=__doc__.splitlines()[0])
    ap.add_argument("--behavioral", action="store_true", help="also run a tiny model and check steering fires")
    args = ap.parse_args(argv)
    problems = static_check()
    if not problems and args.behavioral:
        with tempfile.TemporaryDirectory(prefix="value-steer-compat-") as d:
            problems += behavioral_check(Path(d))
    for p in problems:
        print(f"FAIL: {p}")
    print("compatible" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
