"""Layer 0, the pure core: math and formats (value head, checkpoints, calibration, selection and
activation-steering references, the row-table schema, config schema, feature format, VFD math).

Imports torch, numpy and safetensors only: never vLLM, never a higher value_steer layer.
"""
