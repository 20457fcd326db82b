"""Layer 0, the pure core: math and formats, stateless functions and plain data.

``modes`` (mode and direction ids), ``value_head`` (the MLP and its weights), ``checkpoint`` (head +
sidecar IO), ``calibration`` (split-conformal thresholds), ``selection`` (VFD / abstention rules, the
references the kernels are tested against), ``activation`` (activation-steering references for the
coming activation-steering op), ``row_table`` (the per-request device table the kernels read),
``config`` (the ``--additional-config`` and per-request schema, limits), ``features`` (the captured
feature format) and ``vfd_math`` (VFD slot planning, capacity, candidate draw, logprob bookkeeping).

Imports torch, numpy and safetensors only: never vLLM, never a higher value_steer layer.
"""
