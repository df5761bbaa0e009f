r"""The step's guards: global-norm gradient clipping and skipping steps with a
non-finite gradient, decided inside the graph (no host sync; works under
:func:`mlx.core.compile`).

One reduction over every gradient leaf gives the squared global norm
:math:`\|g\|^2`, summed exactly as :func:`mlx.optimizers.clip_grad_norm`
sums it (float16 squares in float32, leaf by leaf in ``tree_flatten``
order; on the CPU one fused read-only pass per leaf, csrc/grad_norm.h).
Then, as ``clip_grad_norm`` computes them,

.. math::

    \|g\| = \sqrt{\|g\|^2}, \qquad
    c = \min\left(\frac{m}{\|g\| + 10^{-6}}, 1\right)

and every leaf's kernel multiplies its gradient by :math:`c` (an input
scalar: no pass writes scaled gradients). The step is skipped -- nothing
changes but ``grad_norm`` and ``skipped_steps`` -- when :math:`\|g\|^2` is
not finite, i.e. when a gradient element is NaN or infinite (or the squares
of huge finite ones overflow float32, :math:`|g| \gtrsim 1.8 \cdot
10^{19}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

from . import _ext

GRAD_NORM = "grad_norm"
SKIPPED_STEPS = "skipped_steps"


@dataclass
class Guards:
    """One step's guard values (0-d arrays)."""

    norm: mx.array  # the global norm before clipping
    clip: Optional[mx.array]  # the clip factor c, when clipping
    skip: Optional[mx.array]  # True when the step is skipped, when skipping


def compute(gradients: Any, max_grad_norm: Optional[float], skip_nonfinite: bool) -> Guards:
    """The guards of a step over ``gradients`` (the whole tree)."""
    squared = _ext.tree_squared_norm(gradients)
    norm = mx.sqrt(squared)
    clip = None
    if max_grad_norm is not None:
        clip = mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)
    skip = mx.logical_not(mx.isfinite(squared)) if skip_nonfinite else None
    return Guards(norm, clip, skip)


def step_values(guards: Optional[Guards], seed: Optional[mx.array]) -> dict:
    """The native step's values beside lr and the step count: the clip
    factor and skip flag (None without guards), the rounding seed."""
    return {
        "clip": guards.clip if guards else None,
        "skip": guards.skip if guards else None,
        "seed": seed,
    }


def initial_entries() -> dict[str, mx.array]:
    """The guards' state entries before the first step."""
    return {GRAD_NORM: mx.array(0.0, mx.float32), SKIPPED_STEPS: mx.array(0, mx.uint64)}


def commit(state: dict, scheduled: dict, step: Any, guards: Optional[Guards]) -> None:
    """Record a step in ``state``: its scheduled hyperparameters and count;
    a skipped one keeps the old ones (schedules and the bias correction do
    not advance) and counts in ``skipped_steps``."""
    if guards is None:
        state.update(scheduled)
        state["step"] = step
        return
    state[GRAD_NORM] = guards.norm.astype(mx.float32)
    skip = guards.skip
    if skip is None:
        state.update(scheduled)
        state["step"] = step
        return
    for name, value in scheduled.items():
        old = state.get(name)
        state[name] = value if old is None else mx.where(skip, old, value)
    state["step"] = mx.where(skip, state["step"], step)
    state[SKIPPED_STEPS] = state[SKIPPED_STEPS] + skip.astype(mx.uint64)
