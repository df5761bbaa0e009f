"""The oracles: mlx.optimizers.RMSprop, the float64 truth of one step, and
how a result compares with both.

Used by ``python -m mlx_fused_rmsprop verify`` and by the test-suite, so the
yardstick for "at least as close as the reference" is defined once.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim


def reference_step(
    grad: mx.array, param: mx.array, v: mx.array, lr, alpha: float, eps: float
) -> tuple[mx.array, mx.array]:
    """One step of mlx.optimizers.RMSprop (its own apply_single) -> (param, v)."""
    opt = optim.RMSprop(learning_rate=lr, alpha=alpha, eps=eps)
    state = {"v": v}
    new_param = opt.apply_single(grad, param, state)
    return new_param, state["v"]


def bit_equal(a: mx.array, b: mx.array) -> bool:
    """Same dtype, shape and values; NaN equals NaN."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and mx.array_equal(a, b, equal_nan=True).item()
    )


def rmsprop_truth(
    grad: mx.array,
    param: mx.array,
    v: mx.array,
    lr: float | mx.array,
    alpha: float,
    eps: float,
) -> tuple[mx.array, mx.array]:
    """One RMSprop step in float64 on the CPU.

    alpha and eps are taken as unrounded doubles; lr as the value an optimizer
    state holds (a Python float becomes a float32 array there, as in mlx).
    """
    s = mx.cpu
    lr = mx.array(lr).item()
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


# Relative rounding error of the float32 arithmetic inside the fused kernel,
# with room for the few operations of one step.
FLOAT32_COMPUTE_TOL = 2.0**-21


def count_worse_than_reference(
    ours: tuple[mx.array, mx.array],
    ref: tuple[mx.array, mx.array],
    grad: mx.array,
    param: mx.array,
    v: mx.array,
    lr: float,
    alpha: float,
    eps: float,
) -> dict[str, int]:
    """Per output ("param", "v"): how many elements of ours are further from
    the float64 truth than the reference's, beyond the float32 rounding of the
    fused computation. The contract for float16/bfloat16 is 0 and 0."""
    truth_w, truth_v = rmsprop_truth(grad, param, v, lr, alpha, eps)
    s = mx.cpu
    p64 = param.astype(mx.float64, stream=s)
    w_scale = mx.add(
        mx.abs(p64, stream=s), mx.abs(mx.subtract(p64, truth_w, stream=s), stream=s),
        stream=s,
    )
    v_scale = mx.abs(truth_v, stream=s)
    counts = {}
    for name, mine, theirs, truth, scale in (
        ("param", ours[0], ref[0], truth_w, w_scale),
        ("v", ours[1], ref[1], truth_v, v_scale),
    ):
        finite_scale = mx.where(mx.isfinite(scale, stream=s), scale, 0.0, stream=s)
        allowed = mx.add(
            abs_error(theirs, truth),
            mx.multiply(FLOAT32_COMPUTE_TOL, finite_scale, stream=s),
            stream=s,
        )
        worse = mx.greater(abs_error(mine, truth), allowed, stream=s)
        counts[name] = int(mx.sum(worse, stream=s).item())
    return counts
