"""value_steer: inference-time value steering for vLLM.

The pure core (this package minus ``worker``/``patches``) imports no vLLM: value head, checkpoints,
calibration, training and the steering math (torch references). ``value_steer.kernels`` holds the
fused Triton kernels registered as ``torch.ops.value_steer.*`` custom ops; ``value_steer.patches``
is the only code that binds to vLLM internals.
"""

from __future__ import annotations

from value_steer._ext import extension, has_extension, require_extension

__version__ = "0.3.0.dev0"

__all__ = ["__version__", "extension", "has_extension", "require_extension"]
