"""The oracle: mlx.optimizers.RMSprop itself, and the float64 truth."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from mlx_fused_rmsprop._reference import abs_error, rmsprop_truth

FLOAT_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# Relative rounding error of the float32 arithmetic inside the fused kernel,
# with room for the few operations of one step.
FLOAT32_COMPUTE_TOL = 2.0**-21


def reference_step(grad, param, v, lr, alpha, eps):
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


def assert_at_least_as_close(ours, ref, grad, param, v, lr, alpha, eps):
    """Per element, ours is no further from the float64 truth than the
    reference, up to the float32 rounding of the fused computation."""
    truth_w, truth_v = rmsprop_truth(grad, param, v, lr, alpha, eps)
    s = mx.cpu
    p64 = param.astype(mx.float64, stream=s)
    # Size of the quantities the float32 computation rounds.
    w_scale = mx.abs(p64, stream=s) + mx.abs(p64 - truth_w, stream=s)
    v_scale = mx.abs(truth_v, stream=s)
    for name, mine, theirs, truth, scale in (
        ("param", ours[0], ref[0], truth_w, w_scale),
        ("v", ours[1], ref[1], truth_v, v_scale),
    ):
        tol = FLOAT32_COMPUTE_TOL * mx.where(mx.isfinite(scale), scale, 0.0)
        worse = abs_error(mine, truth) > abs_error(theirs, truth) + tol
        n_worse = worse.sum().item()
        assert n_worse == 0, (
            f"{name}: {n_worse} of {worse.size} elements further from the "
            f"float64 truth than mlx.optimizers.RMSprop"
        )
