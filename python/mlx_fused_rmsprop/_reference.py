"""The oracles: mlx.optimizers.RMSprop, the float64 truth of one step, and
how a result compares with both.

Used by ``python -m mlx_fused_rmsprop verify`` and by the test-suite, so the
yardstick for "at least as close as the reference" is defined once.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

# On the GPU, how far (in float32 ulps) a fused result may be from MLX's own
# GPU reference: its Metal kernels divide with a plain `/`, not the correctly
# rounded metal::precise::divide of ours, so bit-equality there is with our
# own CPU primitive instead.
GPU_REFERENCE_ULPS = 1


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


# Bits of each float dtype's integer twin, for ulp distances.
_BITS = {mx.float32: mx.int32, mx.float16: mx.int16, mx.bfloat16: mx.int16}


def ulp_distance(a: mx.array, b: mx.array) -> mx.array:
    """Per element, how many representable values of a's dtype (float32,
    float16 or bfloat16) lie between a and b, as int64: 0 where equal (+0 and
    -0 included) or both NaN; huge where only one is NaN."""
    if a.dtype != b.dtype or a.dtype not in _BITS:
        raise TypeError(f"ulp_distance needs two arrays of one float dtype, got {a.dtype}, {b.dtype}")
    s = mx.cpu
    sign = 1 << (8 * a.itemsize - 1)

    def ordered(x):
        # Sign-magnitude bits -> integers in the order of the floats.
        bits = x.view(_BITS[x.dtype]).astype(mx.int64, stream=s)
        return mx.where(bits < 0, mx.subtract(-sign, bits, stream=s), bits, stream=s)

    distance = mx.abs(mx.subtract(ordered(a), ordered(b), stream=s), stream=s)
    nan_a, nan_b = mx.isnan(a, stream=s), mx.isnan(b, stream=s)
    distance = mx.where(mx.logical_and(nan_a, nan_b, stream=s), 0, distance, stream=s)
    return mx.where(mx.logical_xor(nan_a, nan_b, stream=s), 1 << 62, distance, stream=s)


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


def float32_contract_failures(
    device: mx.Device,
    ours: tuple[mx.array, mx.array],
    ref: tuple[mx.array, mx.array],
    grad: mx.array,
    param: mx.array,
    v: mx.array,
    lr,
    alpha: float,
    eps: float,
) -> list[str]:
    """What breaks the float32 contract of one fused step computed on
    `device` (empty: it holds).

    CPU: bit-identical to mlx.optimizers.RMSprop (``ref``). GPU: bit-identical
    to our own CPU primitive on the same inputs, and within
    GPU_REFERENCE_ULPS of MLX's GPU reference."""
    names = ("param", "v")
    if device == mx.cpu:
        return [
            f"{name} differs from mlx.optimizers.RMSprop"
            for name, a, b in zip(names, ours, ref)
            if not bit_equal(a, b)
        ]
    from ._ext import rmsprop_update  # the package imports this module first

    cpu = rmsprop_update(grad, param, v, mx.array(lr), alpha=alpha, eps=eps, stream=mx.cpu)
    failures = []
    for name, a, b, c in zip(names, ours, ref, cpu):
        if not bit_equal(a, c):
            failures.append(f"{name} on the GPU differs from the CPU primitive")
        far = ulp_distance(a, b).max().item() if a.size else 0
        if far > GPU_REFERENCE_ULPS:
            failures.append(f"{name}: {far} ulps from the GPU reference")
    return failures
