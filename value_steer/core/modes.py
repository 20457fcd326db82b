"""Steering modes and directions: one home for the ids the row table, kernels and config share."""

from __future__ import annotations

MODE_OFF = 0
MODE_ABSTAIN = 1
MODE_VFD = 2
# Token-level value filtering: a Q-head's predicted values edit the step's logits (no candidate forwards).
MODE_TOKEN = 3
MODES = {"off": MODE_OFF, "abstain": MODE_ABSTAIN, "vfd": MODE_VFD, "token": MODE_TOKEN}
MODE_NAMES = {v: k for k, v in MODES.items()}

DIRECTION_SIGN = {"above": 1.0, "below": -1.0}
