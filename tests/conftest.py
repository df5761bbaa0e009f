"""Shared fixtures: the devices a test runs on, and the reference optimizer."""

import mlx.core as mx
import pytest

# Tests that take `device` run on the CPU everywhere and also on the GPU where
# Metal is available (a Mac), so there the suite covers the real shader.
DEVICES = [mx.cpu] + ([mx.gpu] if mx.metal.is_available() else [])


@pytest.fixture(params=DEVICES, ids=lambda d: "gpu" if d == mx.gpu else "cpu")
def device(request):
    previous = mx.default_device()
    mx.set_default_device(request.param)
    try:
        yield request.param
    finally:
        mx.set_default_device(previous)
