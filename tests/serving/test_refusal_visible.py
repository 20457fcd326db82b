"""A request only the worker can refuse reaches an AsyncLLM client (what the OpenAI server runs) as an error with
the reason (``SteeringRefusedError``: HTTP 409), never as an empty, finished output (issue 21).

The engine is driven directly (no HTTP body middleware), so the frontend has not learnt the layers' residual
norms when the request arrives: the validator cannot check its dose, and the worker refuses it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.helpers import TINY_HIDDEN

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_worker_refusal_is_an_error_not_an_empty_output(tiny_model_dir):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from value_steer.offline.assets import apply_vllm_cpu_env
    from value_steer.patches.vllm_0_32.frontend import SteeringRefusedError

    apply_vllm_cpu_env("test")
    args = AsyncEngineArgs(model=str(tiny_model_dir), worker_cls="value_steer.worker.ValueSteerWorker",
                           additional_config={"steering": {"max_relative_dose": 100}}, enforce_eager=True,
                           max_model_len=256, max_num_seqs=4, dtype="float32")
    engine = AsyncLLM.from_engine_args(args)

    async def run(extra_args):
        outs = [o async for o in engine.generate("hello world", SamplingParams(
            max_tokens=4, temperature=0.0, extra_args=extra_args), str(uuid.uuid4()))]
        return outs[-1]

    over = {"steering": {"ops": [{"layer": 0, "op": "add", "vector": [1.0] * TINY_HIDDEN, "scale": 1e4}]}}
    within = {"steering": {"ops": [{"layer": 0, "op": "add", "vector": [1.0] * TINY_HIDDEN, "scale": 1e-3}]}}

    async def both():
        with pytest.raises(SteeringRefusedError, match="relative dose") as info:
            await run(over)
        assert info.value.http_status == 409
        assert len((await run(within)).outputs[0].token_ids) == 4  # a served request is untouched

    try:
        asyncio.run(both())
    finally:
        engine.shutdown()
