"""Layer 4, serving: what vLLM loads or users run.

``worker`` (``ValueSteerWorker``: the platform worker with the steering runner, its RPC surface),
``plugin`` (the ``vllm.general_plugins`` entry point: start-up checks and defaults, the request validator
and the stats routes for every engine that runs ``ValueSteerWorker``) and ``launcher`` (``vllm serve``
where vLLM is the CPU build, whose console script cannot find its own version). ``value_steer.worker``
and ``value_steer.vllm_cli`` are the documented paths to the worker and the launcher.

Importing this package imports no vLLM; :mod:`value_steer.serving.worker` does (it resolves the
platform's worker class through the adapter).
"""

# The public --worker-cls path (a stable shim over value_steer.serving.worker).
WORKER_CLS = "value_steer.worker.ValueSteerWorker"
