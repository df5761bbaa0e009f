"""How the extension lays a leaf out for its kernels: the collapsed joint
layout of grad, param and v (the CPU strided walk and the GPU general kernels
walk it) and the GPU kernel it picks, through the same hook the Metal harness
uses (``_ext._gpu_dispatch``). Views here are broadcasts or ``as_strided``
windows over tiny buffers: they describe leaves of billions of elements
without allocating them, and no kernel ever runs on them."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mlx_fused_rmsprop import _ext

INT32_MAX = 2**31 - 1


def dispatch(grad, param=None, v=None):
    param = grad if param is None else param
    v = grad if v is None else v
    chosen = _ext._gpu_dispatch([grad, param, v])
    return chosen["kernel"], chosen["shape"], chosen["strides"]


def huge(shape):
    """A broadcast view of `shape`: every stride 0, one element of memory."""
    return mx.broadcast_to(mx.zeros((1,) * len(shape)), shape)


def window(shape, strides):
    """A strided view over a 4-element buffer (never read)."""
    return mx.as_strided(mx.zeros((4,)), shape=shape, strides=strides)


@pytest.mark.parametrize(
    "shape",
    [(2, 2**30, 2), (4, 2**30), (2**30, 4), (3, 2**30, 1, 5), (2**31 - 1, 2), (65536, 65536, 3)],
    ids=str,
)
def test_collapsed_extents_never_pass_int32(shape):
    """Dims merge only while the merged extent fits an int (MLX's own rule):
    broadcast views of more than 2^31 elements keep every element, with no
    extent wrapped to 0 or negative (three (2, 2^30, 2) views used to collapse
    to shape [0], and the general kernel then computed `% 0`)."""
    kernel, collapsed, strides = dispatch(huge(shape))
    assert all(0 < extent <= INT32_MAX for extent in collapsed), collapsed
    assert math.prod(collapsed) == math.prod(shape)
    assert [len(s) for s in strides] == [len(collapsed)] * 3
    assert kernel == "general_idx64"


def test_dims_still_merge_up_to_int32_max():
    kernel, collapsed, _ = dispatch(huge((2**15, 2**15, 2)))  # 2^30 merges, x2 does not
    assert collapsed == [2**30, 2]
    assert kernel == "general_idx64"
    kernel, collapsed, _ = dispatch(huge((3, 5, 7)))
    assert collapsed == [105] and kernel == "general_idx32"


@pytest.mark.parametrize(
    "shape,strides,kernel",
    [
        ((2,), (INT32_MAX,), "general_idx32"),  # largest offset 2^31 - 1: fits
        ((2,), (2**31,), "general_idx64"),  # largest offset 2^31: does not
        ((3, 2), (2**30, 1), "general_idx64"),  # 2 * 2^30 + 1
        ((3, 2), (2**29, 1), "general_idx32"),
        ((2, 3), (1, -(2**30)), "general_idx64"),  # negative strides count by size
        ((2, 3), (1, -(2**29)), "general_idx32"),
    ],
)
def test_index_width_follows_the_largest_offset(shape, strides, kernel):
    """32-bit index math unless some offset of some input passes INT32_MAX."""
    view = window(shape, strides)
    dense = mx.zeros(shape)
    assert dispatch(view)[0] == kernel
    assert dispatch(dense, dense, view)[0] == kernel  # v alone decides too
    assert dispatch(view, dense, dense)[0] == kernel  # and grad alone


def test_index_width_follows_the_element_count():
    assert dispatch(huge((INT32_MAX,)))[0] == "general_idx32"
    assert dispatch(huge((2, 2**30)))[0] == "general_idx64"


def test_flat_layouts_take_the_contiguous_kernel_with_no_layout():
    a = mx.zeros((5, 7))
    assert dispatch(a) == ("contiguous", [], [])
    t = mx.zeros((7, 5)).T  # all three transposed alike: still one flat walk
    assert dispatch(t)[0] == "contiguous"
    kernel, collapsed, strides = dispatch(t, a, a)  # only grad transposed
    assert kernel == "general_idx32" and collapsed == [5, 7]
    assert strides == [[1, 5], [7, 1], [7, 1]]
