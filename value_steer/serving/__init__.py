"""Serving layer: what vLLM loads or users run (worker, launcher, request validation hand-off).

Importing this package imports no vLLM; :mod:`value_steer.serving.worker` does (it resolves the
platform's worker class through the adapter).
"""

# The public --worker-cls path (a stable shim over value_steer.serving.worker).
WORKER_CLS = "value_steer.worker.ValueSteerWorker"
