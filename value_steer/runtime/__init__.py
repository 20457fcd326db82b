"""Layer 2, the runtime: runner-agnostic per-request state and step logic inside the worker process.

``state`` (``SteeringState``: request lifecycle, the row and batch-slot tables, the abstention step),
``staging`` (host->device staging buffers), ``stats`` (per-request statistics accumulated on the
device), ``vfd_*`` (VFD: scratch blocks and lookahead pipelines, the steady step's device work, the
per-step forward schedule), ``capture`` (decode-matched hidden-state capture) and ``metrics``
(Prometheus export).

An adapter in ``value_steer.patches`` drives it with plain tensors and numpy arrays in the runner's batch
order. Built on ``value_steer.core`` and ``value_steer.kernels``; imports no vLLM.
"""
