"""What kind of value each public argument takes, shared by RMSprop and the ops.

A value of the wrong kind (a string read from a config file, None, a bool
where a number goes) must raise a ValueError naming the argument, not a
TypeError from a comparison or from the extension's argument conversion --
and a bool must not pass as a number (``True`` would silently count as 1).
Ranges are checked where each value is used (the constructor, and the op
at every step).
"""

from __future__ import annotations

import numbers
from typing import Any

import mlx.core as mx


def is_real_number(value: Any) -> bool:
    """An int or float (numpy's too), or a one-element real array; not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, mx.array):
        return (
            value.size == 1
            and value.dtype != mx.bool_
            and not mx.issubdtype(value.dtype, mx.complexfloating)
        )
    return isinstance(value, numbers.Real)


def is_learning_rate(value: Any) -> bool:
    """A real number of any value (as in mlx.optimizers: NaN, inf and negative
    rates run), or an array, whose shape and dtype the op checks at the step
    (its values are never read on the host)."""
    return isinstance(value, mx.array) or is_real_number(value)


def check_op_arguments(
    op: str, lr: Any, reals: dict[str, Any], flags: dict[str, Any]
) -> None:
    """Raise ``ValueError("[op] name must be ...")`` unless ``lr`` is a
    learning rate, each of ``reals`` a real number and each of ``flags``
    True or False."""
    if not is_learning_rate(lr):
        raise ValueError(f"[{op}] lr must be a number or an mlx.core.array, got {_shown(lr)}.")
    for name, value in reals.items():
        if not is_real_number(value):
            raise ValueError(f"[{op}] {name} must be a real number, got {_shown(value)}.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"[{op}] {name} must be True or False, got {_shown(value)}.")


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
