"""The yardsticks themselves: ulp distances and the per-device float32
contract. The GPU branch of the contract only meets a real GPU on a Mac; here
it is fed CPU results labelled as GPU ones, to show it accepts what it should
and rejects what it should."""

import mlx.core as mx
import numpy as np
import pytest

from oracle import assert_float32_contract, reference_step, ulp_distance
from mlx_fused_rmsprop import rmsprop_update


def test_ulp_distance_counts_representable_values():
    f32 = np.float32
    a = mx.array([1.0, -0.0, 0.0, np.nan, 1.0, -1.0, np.inf, 1e-45], dtype=mx.float32)
    b = mx.array(
        np.array(
            [np.nextafter(f32(1), f32(2)), 0.0, -1e-45, np.nan, np.nan,
             np.nextafter(f32(-1), f32(0)), np.finfo(f32).max, -1e-45],
            dtype=f32,
        )
    )
    assert ulp_distance(a, b).tolist() == [1, 0, 1, 0, 1 << 62, 1, 1, 2]
    h = mx.array([1.0, -2.0], dtype=mx.float16)
    assert ulp_distance(h, mx.array([1.0 + 2**-10, -2.0 - 2**-9], dtype=mx.float16)).tolist() == [1, 1]
    bf = mx.array([1.0], dtype=mx.bfloat16)
    assert ulp_distance(bf, mx.array([1.0 + 2**-6], dtype=mx.bfloat16)).tolist() == [2]
    with pytest.raises(TypeError):
        ulp_distance(a, h)


def one_step():
    key = mx.random.key(4)
    grad, param = mx.random.normal((2, 257), key=key)
    v = mx.abs(grad) * 0.1
    args = (grad, param, v, 1e-2, 0.9, 1e-8)
    ours = rmsprop_update(grad, param, v, mx.array(1e-2), alpha=0.9, eps=1e-8)
    ref = reference_step(*args)
    mx.eval(ours, ref)
    return ours, ref, args


def nudge(x, ulps):
    """x with element 5 moved `ulps` float32 values up."""
    bits = np.array(x).view(np.uint32).copy()
    bits.flat[5] += ulps
    return mx.array(bits.view(np.float32))


@pytest.mark.parametrize("device", [mx.cpu, mx.gpu], ids=["cpu", "gpu"])
def test_float32_contract_accepts_the_primitive(device):
    ours, ref, args = one_step()
    assert_float32_contract(device, ours, ref, *args)


def test_float32_contract_on_cpu_is_bit_equality():
    ours, ref, args = one_step()
    with pytest.raises(AssertionError, match="differs from mlx.optimizers.RMSprop"):
        assert_float32_contract(mx.cpu, ours, (nudge(ref[0], 1), ref[1]), *args)


def test_float32_contract_on_gpu_allows_one_ulp_from_the_reference_only():
    ours, ref, args = one_step()
    assert_float32_contract(mx.gpu, ours, (nudge(ref[0], 1), ref[1]), *args)
    with pytest.raises(AssertionError, match="2 ulps from the GPU reference"):
        assert_float32_contract(mx.gpu, ours, (nudge(ref[0], 2), ref[1]), *args)
    with pytest.raises(AssertionError, match="differs from the CPU primitive"):
        assert_float32_contract(mx.gpu, (ours[0], nudge(ours[1], 1)), ref, *args)
