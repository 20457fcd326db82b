"""Layer 5, offline: the head's lifecycle and the experiments.

``assets`` (the committed head, sampling constants, the vLLM CPU environment), ``engines`` (the offline
``vllm.LLM`` constructor), ``models`` / ``data_dir`` (the default model, prepared once), ``tasks`` (the
sentiment judge and prompt splits), ``training``, ``pipeline`` (capture -> label -> train ->
calibrate), ``evaluate`` (``value-steer eval``), ``cli`` (``value-steer``) and ``compat``
(``value-steer-compat``).

Uses the public vLLM API only (``vllm.LLM``, ``SamplingParams``), through
:func:`value_steer.offline.engines.offline_llm`.
"""
