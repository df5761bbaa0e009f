"""The float64 truth of one RMSprop step, and how far a result is from it.

Used by ``python -m mlx_fused_rmsprop verify`` and by the test-suite, so the
yardstick for "at least as close as the reference" is defined once.
"""

from __future__ import annotations

import mlx.core as mx


def rmsprop_truth(
    grad: mx.array,
    param: mx.array,
    v: mx.array,
    lr: float,
    alpha: float,
    eps: float,
) -> tuple[mx.array, mx.array]:
    """One RMSprop step in float64 on the CPU (scalars unrounded doubles)."""
    s = mx.cpu
    g = grad.astype(mx.float64, stream=s)
    w = param.astype(mx.float64, stream=s)
    v = v.astype(mx.float64, stream=s)
    v_new = mx.add(
        mx.multiply(alpha, v, stream=s),
        mx.multiply(1.0 - alpha, mx.multiply(g, g, stream=s), stream=s),
        stream=s,
    )
    w_new = mx.subtract(
        w,
        mx.divide(
            mx.multiply(lr, g, stream=s),
            mx.add(mx.sqrt(v_new, stream=s), eps, stream=s),
            stream=s,
        ),
        stream=s,
    )
    return w_new, v_new


def abs_error(result: mx.array, truth: mx.array) -> mx.array:
    """|result - truth| in float64 per element; 0 where both are the same
    non-finite value (NaN and NaN, +Inf and +Inf), +Inf where only one is."""
    s = mx.cpu
    r = result.astype(mx.float64, stream=s)
    t = truth.astype(mx.float64, stream=s)
    same_special = mx.logical_or(
        mx.logical_and(mx.isnan(r, stream=s), mx.isnan(t, stream=s), stream=s),
        mx.logical_and(
            mx.isinf(r, stream=s), mx.equal(r, t, stream=s), stream=s
        ),
        stream=s,
    )
    err = mx.abs(mx.subtract(r, t, stream=s), stream=s)
    err = mx.where(mx.isnan(err, stream=s), mx.inf, err, stream=s)
    return mx.where(same_special, 0.0, err, stream=s)
