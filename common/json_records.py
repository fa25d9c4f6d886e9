"""JSON that stays JSON: `json.dumps` writes NaN and Infinity bare, which no strict reader accepts.
A metric with no value (a class absent from a held-out set, an accuracy over nothing) is written
as null instead."""
from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_record(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `value`, non-finite floats as null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
