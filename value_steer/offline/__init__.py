"""Layer 5, offline: models, tasks, the capture/train/calibrate/eval pipeline, the CLI, the compat check.

Uses the public vLLM API only (``vllm.LLM``, ``SamplingParams``), through
:func:`value_steer.offline.engines.offline_llm`.
"""
