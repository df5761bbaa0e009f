"""The fused primitive against mlx.optimizers.RMSprop and the float64 truth:
dtypes, sizes, hyperparameters, several steps, layouts, specials."""

import mlx.core as mx
import pytest

from mlx_fused_rmsprop import rmsprop_update
from oracle import (
    FLOAT_DTYPES,
    assert_at_least_as_close,
    assert_float32_contract,
    bit_equal,
    reference_step,
)

SHAPES = [(), (1,), (7,), (33,), (1023,), (4097,), (3, 5, 7), (64, 33)]
HYPER = [  # (lr, alpha, eps)
    (1e-2, 0.99, 1e-8),
    (0.1, 0.0, 1e-6),
    (1e-3, 0.5, 1e-3),
    (1.0, 0.999, 1.0),
]
STEPS = 4


def random_leaf(shape, dtype, seed):
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    grad = (mx.random.normal(shape, key=k1) * 0.5).astype(dtype)
    param = mx.random.normal(shape, key=k2).astype(dtype)
    return grad, param


def ours_step(grad, param, v, lr, alpha, eps):
    return rmsprop_update(grad, param, v, mx.array(lr), alpha=alpha, eps=eps)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lr,alpha,eps", HYPER)
def test_float32_bit_equal_over_steps(device, shape, lr, alpha, eps):
    grad, param = random_leaf(shape, mx.float32, seed=len(shape) + 7)
    ours = (param, mx.zeros_like(param))
    for step in range(STEPS):
        g = grad * (1.0 + step)  # a different gradient every step
        state = ours
        ours = ours_step(g, *state, lr, alpha, eps)
        ref = reference_step(g, *state, lr, alpha, eps)  # both from one state
        mx.eval(ours, ref)
        assert_float32_contract(device, ours, ref, g, *state, lr, alpha, eps, f"step {step}")


def test_float64_bit_equal_on_cpu():
    grad, param = random_leaf((1023,), mx.float64, seed=3)
    ours = (param, mx.zeros_like(param))
    ref = (param, mx.zeros_like(param))
    for step in range(STEPS):
        ours = ours_step(grad, *ours, 1e-2, 0.9, 1e-8)
        ref = reference_step(grad, *ref, 1e-2, 0.9, 1e-8)
        assert bit_equal(ours[0], ref[0]) and bit_equal(ours[1], ref[1])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lr,alpha,eps", HYPER)
def test_half_types_at_least_as_close_as_reference(device, dtype, shape, lr, alpha, eps):
    grad, param = random_leaf(shape, dtype, seed=11)
    v = mx.zeros_like(param)
    for step in range(STEPS):
        g = (grad * (1.0 + step)).astype(dtype)
        ours = ours_step(g, param, v, lr, alpha, eps)
        ref = reference_step(g, param, v, lr, alpha, eps)
        mx.eval(ours, ref)
        assert ours[0].dtype == dtype and ours[1].dtype == dtype
        assert_at_least_as_close(ours, ref, g, param, v, lr, alpha, eps)
        param, v = ours  # both candidates start each step from the same state


def test_half_types_stay_finite_where_the_reference_divides_zero_by_zero():
    # In float16, eps=1e-8 rounds to 0 in the reference: a zero gradient on a
    # fresh state gives 0/0 = NaN there. The fused kernel keeps eps in float32.
    param = mx.ones((8,), dtype=mx.float16)
    grad = mx.zeros_like(param)
    ours = ours_step(grad, param, mx.zeros_like(param), 1e-2, 0.99, 1e-8)
    ref = reference_step(grad, param, mx.zeros_like(param), 1e-2, 0.99, 1e-8)
    assert mx.isnan(ref[0]).all().item()
    assert bit_equal(ours[0], param)


def layouts(shape_2d, dtype):
    """(name, grad, param, v) with non-contiguous views for params and grads."""
    rows, cols = shape_2d
    base = lambda seed, shape: mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)
    v_of = lambda a: mx.abs(a) * 0.1
    yield "contiguous", base(1, (rows, cols)), base(2, (rows, cols)), v_of(base(3, (rows, cols)))
    yield "transposed", base(1, (cols, rows)).T, base(2, (cols, rows)).T, v_of(base(3, (cols, rows))).T
    yield "strided", base(1, (2 * rows, 3 * cols))[::2, 1::3], base(2, (2 * rows, 3 * cols))[::2, ::3], v_of(base(3, (rows, 2 * cols)))[:, ::2]
    yield "broadcast_grad", mx.broadcast_to(base(1, (1, cols)), (rows, cols)), base(2, (rows, cols)), v_of(base(3, (rows, cols)))
    yield "broadcast_all", mx.broadcast_to(base(1, (cols,)), (rows, cols)), mx.broadcast_to(base(2, (rows, 1)), (rows, cols)), mx.broadcast_to(v_of(base(3, ())), (rows, cols))
    yield "mixed", base(1, (cols, rows)).T, base(2, (rows, cols)), v_of(base(3, (rows, 2 * cols)))[:, 1::2]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape_2d", [(5, 7), (64, 33), (1, 129)], ids=str)
def test_non_contiguous_layouts(device, dtype, shape_2d):
    for name, grad, param, v in layouts(shape_2d, dtype):
        ours = ours_step(grad, param, v, 0.05, 0.9, 1e-6)
        ref = reference_step(grad, param, v, 0.05, 0.9, 1e-6)
        mx.eval(ours, ref)
        assert ours[0].shape == param.shape and ours[1].shape == param.shape
        if dtype == mx.float32:
            assert_float32_contract(device, ours, ref, grad, param, v, 0.05, 0.9, 1e-6, name)
        else:
            assert_at_least_as_close(ours, ref, grad, param, v, 0.05, 0.9, 1e-6)
        # The inputs are untouched (views must never be written through).
        again = ours_step(grad, param, v, 0.05, 0.9, 1e-6)
        assert bit_equal(again[0], ours[0]) and bit_equal(again[1], ours[1]), name


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 5)], ids=str)
def test_empty_leaves(device, dtype, shape):
    empty = mx.zeros(shape, dtype=dtype)
    param, v = ours_step(empty, empty, empty, 0.1, 0.9, 1e-8)
    mx.eval(param, v)
    assert param.shape == shape and v.shape == shape
    assert param.dtype == dtype and v.dtype == dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_and_inf_gradients_propagate_as_in_the_reference(device, dtype):
    specials = mx.array(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 3.0, 1e30]
    )
    grad = mx.concatenate([specials, specials[::-1]]).astype(dtype)
    param = mx.linspace(-2, 2, grad.size).astype(dtype)
    v = mx.concatenate([mx.zeros((8,)), mx.full((8,), float("inf"))]).astype(dtype)
    ours = ours_step(grad, param, v, 0.01, 0.9, 1e-8)
    ref = reference_step(grad, param, v, 0.01, 0.9, 1e-8)
    mx.eval(ours, ref)
    if dtype == mx.float32:
        assert_float32_contract(device, ours, ref, grad, param, v, 0.01, 0.9, 1e-8)
    else:
        # Where the reference is NaN only because it rounded eps away (see the
        # float16 test above), ours may be finite; everywhere else NaN/Inf match.
        assert_at_least_as_close(ours, ref, grad, param, v, 0.01, 0.9, 1e-8)
    for out in ours:
        assert mx.isnan(out[0]).item()  # NaN gradient -> NaN
    assert mx.isnan(ours[0][1]).item()  # inf / (sqrt(inf) + eps) = inf/inf


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-2], ids=["nan", "inf", "negative"])
def test_unusual_learning_rates_follow_the_reference(lr):
    """A NaN, infinite or negative learning rate (a schedule gone wrong, or
    gradient ascent on purpose) is not rejected: the step computes exactly
    what mlx.optimizers.RMSprop computes (NaN parameters for a NaN lr)."""
    grad, param = random_leaf((33,), mx.float32, seed=6)
    v = mx.abs(grad)
    ours = ours_step(grad, param, v, lr, 0.9, 1e-8)
    ref = reference_step(grad, param, v, lr, 0.9, 1e-8)
    assert bit_equal(ours[0], ref[0]) and bit_equal(ours[1], ref[1])
    if lr != lr:
        assert mx.isnan(ours[0]).all().item() and not mx.isnan(ours[1]).any().item()


def test_lr_is_read_per_call_not_baked_in():
    grad, param = random_leaf((33,), mx.float32, seed=5)
    v = mx.zeros_like(param)
    for lr in (0.1, 0.0, 1e-3, 2.5):
        ours = ours_step(grad, param, v, lr, 0.9, 1e-8)
        ref = reference_step(grad, param, v, lr, 0.9, 1e-8)
        assert bit_equal(ours[0], ref[0])
    zero = ours_step(grad, param, v, 0.0, 0.9, 1e-8)
    assert bit_equal(zero[0], param)


@pytest.mark.parametrize(
    "lr", [mx.array(0.1, dtype=mx.float16), mx.array(0.1, dtype=mx.float64), mx.array([0.1]), mx.array(1)],
    ids=["f16", "f64", "shape1", "int"],
)
def test_lr_dtype_and_shape_variants(lr):
    grad, param = random_leaf((7,), mx.float32, seed=9)
    v = mx.zeros_like(param)
    ours = rmsprop_update(grad, param, v, lr, alpha=0.9, eps=1e-8)
    ref = reference_step(grad, param, v, lr.reshape(()), 0.9, 1e-8)
    assert bit_equal(ours[0], ref[0]) and bit_equal(ours[1], ref[1])
