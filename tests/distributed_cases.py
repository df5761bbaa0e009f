"""The model the launched tests train: shared by the worker ranks and the test.

Leaves of mixed sizes and dtypes, so that with 2 and 3 ranks leaves are split
between ranks, one leaf (``scale``) is smaller than the number of ranks, and
the gather runs one bucket per dtype (float32, float16, bfloat16) -- several
per dtype with a small ``shard_bucket_bytes``. The ``state8`` model has
leaves of hundreds to thousands of elements for 8-bit state (with
``min_8bit_size=256``: a float32, a bfloat16 and a float16 leaf quantized, a
small bias not), so that with 2 and 3 ranks a rank boundary falls inside an
8-bit leaf and moves to a block boundary.
"""

from __future__ import annotations

import mlx.core as mx

SHAPES = {
    "layers": [
        {"weight": ((13, 9), mx.float32), "bias": ((9,), mx.float32)},
        {"weight": ((9, 4), mx.float32), "bias": ((4,), mx.float32)},
    ],
    "scale": ((1,), mx.float32),
    "embed": ((6, 5), mx.float16),
    "norm": ((7,), mx.bfloat16),
}


STATE8_SHAPES = {
    "layers": [
        {"weight": ((50, 60), mx.float32), "bias": ((60,), mx.float32)},
        {"weight": ((700,), mx.bfloat16)},
    ],
    "embed": ((20, 15), mx.float16),
}
# For the memory-lean options: E = 5 + 407 + 29 = 441 elements, so 2 ranks
# split the bfloat16 leaf "w" (at its element 216, or 256 when it is 8-bit
# with min_8bit_size=256: a block never spans ranks).
LEAN_SHAPES = {
    "a": ((5,), mx.float32),
    "w": ((37, 11), mx.bfloat16),
    "h": ((29,), mx.float16),
}

MODELS = {"default": SHAPES, "state8": STATE8_SHAPES, "lean": LEAN_SHAPES}


def _tree(seed: int, scale: float, shapes: dict = SHAPES) -> dict:
    key = mx.random.key(seed)

    def make(spec):
        nonlocal key
        if isinstance(spec, dict):
            return {k: make(v) for k, v in spec.items()}
        if isinstance(spec, list):
            return [make(v) for v in spec]
        shape, dtype = spec
        key, sub = mx.random.split(key)
        return (scale * mx.random.normal(shape, key=sub)).astype(dtype)

    return make(shapes)


def initial_parameters(model: str = "default") -> dict:
    """The parameters before the first step (the same on every rank)."""
    return _tree(7, 1.0, MODELS[model])


def gradients_at(step: int, rank: int, model: str = "default") -> dict:
    """Rank ``rank``'s gradients at ``step`` (deterministic)."""
    return _tree(1000 + 131 * step + rank, 0.1, MODELS[model])


def eight_bit_pieces(flat: dict) -> list[tuple[str, int, int]]:
    """(path, start, stop) of each piece of an 8-bit leaf (codes as ``v``)
    in a sharded_state_dict()."""
    out = []
    for key, record in flat.items():
        path = key[: -len(".__shard__")]
        if key.endswith(".__shard__") and flat.get(f"{path}.v", mx.zeros(0)).dtype == mx.uint8:
            _, start, stop, *_ = record.tolist()
            out.append((path, start, stop))
    return out


def same_bits(x: mx.array, y: mx.array) -> bool:
    """Bit for bit, NaN included (centered variance in float16 can go
    negative, and sharded and unsharded must give the same NaN bits)."""
    if x.dtype in (mx.float16, mx.bfloat16, mx.float32):
        as_int = {2: mx.uint16, 4: mx.uint32}[x.dtype.size]
        x, y = x.view(as_int), y.view(as_int)
    return mx.array_equal(x, y).item()
