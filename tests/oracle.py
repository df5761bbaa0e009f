"""The oracle: mlx.optimizers.RMSprop itself, the float64 truth, and the
contract a result must meet against them on each device."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_fused_rmsprop._reference import (  # noqa: F401 (re-exported)
    bit_equal,
    count_worse_than_reference,
    float32_contract_failures,
    reference_step,
    ulp_distance,
)

FLOAT_DTYPES = [mx.float32, mx.float16, mx.bfloat16]

def assert_at_least_as_close(ours, ref, grad, param, v, lr, alpha, eps):
    """Per element, ours is no further from the float64 truth than the
    reference, up to the float32 rounding of the fused computation."""
    counts = count_worse_than_reference(ours, ref, grad, param, v, lr, alpha, eps)
    for name, n_worse in counts.items():
        assert n_worse == 0, (
            f"{name}: {n_worse} of {param.size} elements further from the "
            f"float64 truth than mlx.optimizers.RMSprop"
        )


def assert_float32_contract(device, ours, ref, grad, param, v, lr, alpha, eps, what=""):
    """The float32 contract of one step computed on `device` (see
    float32_contract_failures): bit-identical to mlx.optimizers.RMSprop on the
    CPU; on the GPU bit-identical to our CPU primitive and within
    GPU_REFERENCE_ULPS of MLX's GPU reference."""
    failures = float32_contract_failures(device, ours, ref, grad, param, v, lr, alpha, eps)
    assert not failures, f"{what}: " + "; ".join(failures)


def assert_trees_bit_equal_in_any_order(a, b) -> None:
    """The same leaves at the same paths, bit for bit (NaN included), in any
    key order (safetensors sorts keys); non-array leaves equal."""
    fa = sorted(tree_flatten(a), key=lambda kv: kv[0])
    fb = sorted(tree_flatten(b), key=lambda kv: kv[0])
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (key, x), (_, y) in zip(fa, fb):
        if isinstance(x, mx.array):
            assert bit_equal(x, y), key
        else:
            assert x == y, key
