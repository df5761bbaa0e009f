"""Shared fixtures: the devices a test runs on."""

import os

import mlx.core as mx
import pytest

# Keras (tests/test_frameworks.py) runs on JAX, on the CPU; it must know
# before it is first imported.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests that take `device` run on the CPU everywhere and also on the GPU where
# Metal is available (a Mac), so there the suite covers the real shader.
DEVICES = [mx.cpu] + ([mx.gpu] if mx.metal.is_available() else [])


@pytest.fixture(autouse=True)
def _cpu_unless_the_test_takes_device():
    """Every test runs on the CPU unless it takes `device`. Bit-equality with
    mlx.optimizers.RMSprop is a CPU promise (MLX's GPU kernels divide with a
    plain `/`, ours with metal::precise::divide); a test that also runs on the
    GPU asserts the GPU contract there (oracle.assert_float32_contract)."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(previous)


@pytest.fixture(params=DEVICES, ids=lambda d: "gpu" if d == mx.gpu else "cpu")
def device(request):
    previous = mx.default_device()
    mx.set_default_device(request.param)
    try:
        yield request.param
    finally:
        mx.set_default_device(previous)
