"""Reading what a client sent without letting it crash the server: bounded JSON and finite numbers.

Every value_steer input that a client controls (HTTP bodies, ``vllm_xargs`` strings, registry entries) goes
through these helpers, so hostile input ends as a :class:`RequestArgError` naming the field (HTTP 400), never
as a ``RecursionError`` (deep nesting), an ``OverflowError`` (``float(10**400)``) or a ``ValueError`` without
a field (``int(float("nan"))``) that a server would answer with a 500 or an anonymous 400.

Pure core: stdlib and numpy.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any

import numpy as np

# JSON nesting a request may carry: a steering spec needs 4 levels, a chat body with tool schemas a few
# dozen; Python's json parser raises RecursionError near 1000 (fewer on a deep ASGI stack).
MAX_JSON_DEPTH = 64
# Values land in fp32 tables: a finite float64 above this would become inf on the device.
F32_MAX = float(np.finfo(np.float32).max)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class RequestArgError(ValueError):
    """Invalid per-request input (the server answers HTTP 400); the message names the field.

    Its public home is :mod:`value_steer.core.config` (re-exported there and by the steering spec).
    """


class JSONSyntaxError(RequestArgError):
    """Client input that is not JSON at all (a syntax error), as opposed to JSON too deep or too large to read."""


def json_depth(data: str | bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in a JSON text, outside strings, without parsing it.

    Linear in the text at C speed (a regex drops the strings, numpy counts the brackets), so a body can be
    measured before ``json.loads`` recurses into it. Texts that are not JSON give some number; they fail
    to parse later.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if b"[" not in raw and b"{" not in raw:
        return 0
    stripped = _STRING.sub(b'""', raw)
    steps = _OPEN[np.frombuffer(stripped, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def loads_bounded(data: str | bytes, field: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for client input: too deep, not JSON, or an integer of more digits than Python
    converts are each a :class:`RequestArgError` naming ``field``."""
    depth = json_depth(data)
    if depth > max_depth:
        raise RequestArgError(f"{field}: JSON nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(data)
    except RecursionError:
        raise RequestArgError(f"{field}: JSON nested too deeply to read; at most {max_depth} levels are "
                              "accepted") from None
    except json.JSONDecodeError as exc:
        raise JSONSyntaxError(f"{field}: not valid JSON ({exc})") from None
    except ValueError as exc:  # int() beyond sys.get_int_max_str_digits()
        raise RequestArgError(f"{field}: not valid JSON ({exc})") from None


def is_number(x: Any) -> bool:
    """A JSON number (bools are not numbers here)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def finite_float(value: Any, field: str, *, strings: bool = False, f32: bool = False) -> float:
    """``value`` as a finite float, or a :class:`RequestArgError` naming ``field``.

    Args:
        value: a number (an int of any size, a float), or with ``strings`` a numeric string (``vllm_xargs``
            values arrive as strings from some clients).
        strings: accept numeric strings.
        f32: also require ``|value| <= F32_MAX`` (the value lands in an fp32 table).
    """
    if strings and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RequestArgError(f"{field} must be a number, got {short_repr(value)}") from None
    if not is_number(value):
        raise RequestArgError(f"{field} must be a finite number, got {short_repr(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond the float range
        raise RequestArgError(f"{field} must be a finite number, got an integer of {_digits(value)} digits") from None
    if not math.isfinite(v):
        raise RequestArgError(f"{field} must be a finite number, got {short_repr(value)}")
    if f32 and abs(v) > F32_MAX:
        raise RequestArgError(f"{field} = {short_repr(value)} is outside the float32 range (|x| <= {F32_MAX:.4g})")
    return v


def _digits(value: Any) -> int:
    try:
        return len(str(abs(int(value))))
    except ValueError:  # more digits than str() converts
        return int(abs(int(value)).bit_length() * 0.30103) + 1


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a huge client value must not fill the error body)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {_digits(value)} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
