"""Strict JSON for every file vggnet writes: no ``NaN``, ``Infinity`` or ``-Infinity`` tokens, which Python's
:func:`json.dumps` writes by default but JSON (RFC 8259), ``jq``, browsers and most other parsers refuse.

A non-finite float is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (what Python's ``float()``
and JavaScript's ``Number()`` read back). A reader that needs the number back decodes those strings where a number
belongs (:func:`decode_nonfinite`; the checkpoint record does it for its counters, plateau and history, where the
plateau schedule's initial best is -inf), never elsewhere: a class named "NaN" stays a name. Files written before
(with the bare tokens) are still read, since :func:`json.loads` accepts the tokens.

Encoding is idempotent on what it produced (a decoded or undecoded record encodes to the same text), so the run
directory can compare a file's bytes with a record read back from its commit.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: The strings that stand for the non-finite floats in vggnet's JSON.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_nonfinite(obj: Any) -> Any:
    """``obj`` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by its string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {key: encode_nonfinite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_nonfinite(value) for value in obj]
    return obj


def decode_nonfinite(obj: Any) -> Any:
    """The inverse of :func:`encode_nonfinite` for a value that holds only numbers (at any depth): the strings of
    :data:`NONFINITE` become floats again; anything else is returned as it is."""
    if isinstance(obj, str):
        return NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {key: decode_nonfinite(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [decode_nonfinite(value) for value in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (:func:`json.dumps` with ``allow_nan=False`` after :func:`encode_nonfinite`)."""
    return json.dumps(encode_nonfinite(obj), indent=indent, allow_nan=False)
