"""Differential fuzzing: the fused update against mlx.optimizers.RMSprop and
the float64 truth, on inputs nobody picked by hand.

Profiles (environment variable RMSPROP_FUZZ_PROFILE):
  ci    (default) derandomized, 2,360 examples in total (~30 s)
  long  randomized, 25x the examples, for a soak run:
        RMSPROP_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py
"""

import math
import os

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_fused_rmsprop import rmsprop_update
from oracle import assert_at_least_as_close, bit_equal, reference_step

CI_EXAMPLES = {"single_steps": 1700, "multi_step": 600, "big": 60}
PROFILE = os.environ.get("RMSPROP_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"RMSPROP_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")


def fuzz_settings(name):
    n = CI_EXAMPLES[name]
    return settings(
        max_examples=n if PROFILE == "ci" else 25 * n,
        derandomize=PROFILE == "ci",
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


DTYPES = [mx.float32, mx.float16, mx.bfloat16]
LAYOUTS = ["contiguous", "transposed", "strided", "broadcast_grad", "broadcast_state", "reversed_view"]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-45, 3e38, 1e-8, 65504.0]

small_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).filter(
    lambda s: math.prod(s) <= 4096
)
odd_sizes = st.sampled_from([1, 3, 7, 15, 16, 17, 31, 33, 255, 257, 1023, 1025, 4095, 4097]).map(
    lambda n: (n,)
)
hyper = st.tuples(
    st.one_of(st.just(0.0), st.floats(1e-6, 10.0)),  # lr, 0 included
    st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),  # alpha in [0, 1]
    st.floats(-12, 0).map(lambda e: 10.0**e),  # eps from 1e-12 to 1
)


@st.composite
def leaves(draw, shapes=st.one_of(small_shapes, odd_sizes)):
    """(grad, param, v) in a drawn dtype, layout and value regime."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(shapes))
    layout = draw(st.sampled_from(LAYOUTS))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 1e3, 1e30]))
    special_rate = draw(st.sampled_from([0.0, 0.0, 0.01, 0.3]))
    seed = draw(st.integers(0, 2**31 - 1))
    keys = mx.random.split(mx.random.key(seed), 6)

    def values(k, shape, positive=False):
        x = mx.random.normal(shape, key=keys[k]) * scale
        if special_rate:
            picks = mx.random.randint(0, len(SPECIALS), shape, key=keys[4])
            mask = mx.random.uniform(shape=shape, key=keys[5]) < special_rate
            x = mx.where(mask, mx.array(SPECIALS)[picks], x)
        return (mx.abs(x) if positive else x).astype(dtype)

    def view(k, positive=False):
        if layout == "transposed" and len(shape) >= 2:
            return values(k, shape[::-1], positive).T
        if layout == "strided" and len(shape) >= 1:
            big = values(k, shape[:-1] + (2 * shape[-1] + 1,), positive)
            return big[..., 1::2]
        if layout == "reversed_view" and len(shape) >= 1:
            return values(k, shape, positive)[::-1]
        return values(k, shape, positive)

    grad, param, v = view(0), view(1), view(2, positive=True)
    if layout == "broadcast_grad" and len(shape) >= 1:
        grad = mx.broadcast_to(values(0, (1,) * len(shape)), shape)
    if layout == "broadcast_state" and len(shape) >= 1:
        v = mx.broadcast_to(values(2, shape[-1:], positive=True), shape)
    return dtype, grad, param, v


def check_one_step(dtype, grad, param, v, lr, alpha, eps):
    ours = rmsprop_update(grad, param, v, mx.array(lr), alpha=alpha, eps=eps)
    ref = reference_step(grad, param, v, lr, alpha, eps)
    mx.eval(ours, ref)
    assert ours[0].shape == param.shape and ours[0].dtype == dtype
    if dtype == mx.float32:
        assert bit_equal(ours[0], ref[0]), "param differs from mlx.optimizers.RMSprop"
        assert bit_equal(ours[1], ref[1]), "v differs from mlx.optimizers.RMSprop"
    else:
        assert_at_least_as_close(ours, ref, grad, param, v, lr, alpha, eps)
    return ours


@fuzz_settings("single_steps")
@given(leaf=leaves(), hp=hyper)
def test_single_steps(leaf, hp):
    check_one_step(*leaf, *hp)


@fuzz_settings("multi_step")
@given(leaf=leaves(), hp=hyper, steps=st.integers(2, 5))
def test_multi_step_sequences(leaf, hp, steps):
    dtype, grad, param, v = leaf
    for step in range(steps):
        g = (grad * (step + 1)).astype(dtype)
        param, v = check_one_step(dtype, g, param, v, *hp)


@fuzz_settings("big")
@given(
    leaf=leaves(
        shapes=st.sampled_from([((1 << 20) + 3,), (1031, 2049), (3, 257, 1025), (2, 1 << 20)])
    ),
    hp=hyper,
)
def test_large_leaves(leaf, hp):
    check_one_step(*leaf, *hp)
