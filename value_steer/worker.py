"""The documented ``--worker-cls`` path: ``value_steer.worker.ValueSteerWorker`` (serving layer).

The class lives in :mod:`value_steer.serving.worker`; this module keeps the public name stable.
"""

from value_steer.serving.worker import ValueSteerWorker

__all__ = ["ValueSteerWorker"]
