"""Layer 2, the runtime: runner-agnostic per-request state and step logic inside the worker process
(row tables with staged writes, the steering state, the abstention step, VFD pipeline state, capture,
counters). Built on ``value_steer.core`` and ``value_steer.kernels``; imports no vLLM.
"""
