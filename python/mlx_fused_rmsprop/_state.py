r"""The optimizer state of one parameter: which entries it keeps and in which
form, and the conversions between the forms.

A parameter's state holds, as the options keep them, ``v`` (always),
``mean`` (centered) and ``momentum_buffer`` (momentum), plus
``compensation`` (Kahan summation of a float16 / bfloat16 parameter: its
dtype and shape). Each of the first three is either *full precision* (an
array of the parameter's shape, in the parameter's dtype or float32) or
*8-bit* (``state_bits=8`` and at least ``min_8bit_size`` elements, float64
excepted): uint8 codes of the parameter's shape plus ``<name>_scale``,
float32, one per block of 256 elements in row-major order (the last block
may be partial). An element's value is ``map[code] * scale`` (dynamic maps:
unsigned for ``v``, signed for the others; kernels/rmsprop_math.h).

Loading a state converts between the forms, so a run can switch either way:
full-precision entries given to an 8-bit optimizer are quantized as the
kernels requantize; 8-bit entries given to a full-precision one are
dequantized (float32, then the optimizer's state dtype).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import mlx.core as mx

from . import _ext, _options

# Entries of the state that are not per parameter; the first two are always
# there (mlx.optimizers keeps them), the others with the options that use
# them (stochastic rounding's seed, the guards' report).
REQUIRED_SCALARS = ("step", "learning_rate")
SCALAR_ENTRIES = REQUIRED_SCALARS + ("seed", "grad_norm", "skipped_steps")

SCALE_SUFFIX = "_scale"
COMPENSATION = "compensation"
BLOCK = _ext.BLOCK


def blocks(size: int) -> int:
    """Scales of an 8-bit entry of ``size`` elements."""
    return -(-size // BLOCK)


def is_quantized(leaf_state: Any) -> bool:
    """Whether a parameter's state dict holds 8-bit entries (``v`` as codes)."""
    v = leaf_state.get("v") if isinstance(leaf_state, dict) else None
    return isinstance(v, mx.array) and v.dtype == mx.uint8


def quantize(value: mx.array, name: str) -> tuple[mx.array, mx.array]:
    """(codes, scales) of a full-precision entry ``name``."""
    return _ext.quantize_state(value, name == "v")


def dequantize(codes: mx.array, scales: mx.array, name: str) -> mx.array:
    """The float32 values of an 8-bit entry ``name``."""
    return _ext.dequantize_state(codes, scales, name == "v")


class Layout:
    """What the state of each parameter looks like under one optimizer's
    options: built from the optimizer at each step (its hyperparameters may
    have changed), it answers per parameter."""

    def __init__(
        self,
        options: "_ext.RMSpropOptions",
        half_state_dtype: Optional[mx.Dtype],
        initial_scale: float,
    ):
        self.options = options
        self.half_state_dtype = half_state_dtype
        self.initial_scale = initial_scale
        self.state_names: tuple[str, ...] = tuple(options.state_names())

    def quantizes(self, size: int, dtype: mx.Dtype) -> bool:
        """Whether a parameter of ``size`` elements of ``dtype`` keeps 8-bit state."""
        return bool(self.options.quantizes(size, dtype))

    def dtype_of(self, parameter_dtype: mx.Dtype) -> mx.Dtype:
        """The dtype of a full-precision state entry beside such a parameter."""
        if self.half_state_dtype is not None and parameter_dtype in (mx.float16, mx.bfloat16):
            return self.half_state_dtype
        return parameter_dtype

    def entry_names(self, quantized: bool, dtype: mx.Dtype) -> tuple[str, ...]:
        """Every entry of such a parameter's state: the state names, then
        ``compensation`` (Kahan), then the 8-bit scales."""
        return tuple(self.options.entry_names(quantized, dtype))

    def expected(
        self, shape: tuple, dtype: mx.Dtype, quantized: bool
    ) -> dict[str, tuple[tuple, mx.Dtype]]:
        """Each entry's (shape, dtype) for a parameter of ``shape`` and ``dtype``."""
        size = 1
        for n in shape:
            size *= n
        out = {}
        for name in self.entry_names(quantized, dtype):
            if name == COMPENSATION:
                out[name] = (shape, dtype)
            elif name.endswith(SCALE_SUFFIX):
                out[name] = ((blocks(size),), mx.float32)
            elif quantized:
                out[name] = (shape, mx.uint8)
            else:
                out[name] = (shape, self.dtype_of(dtype))
        return out

    def init(
        self,
        shape: tuple,
        dtype: mx.Dtype,
        state: dict,
        quantized: Optional[bool] = None,
    ) -> None:
        """Fill ``state`` with a fresh state for a parameter of ``shape`` and
        ``dtype`` (8-bit as the options say, unless ``quantized`` decides: a
        shard's piece is 8-bit when its whole leaf is)."""
        size = 1
        for n in shape:
            size *= n
        if quantized is None:
            quantized = self.quantizes(size, dtype)
        for name in self.state_names:
            start = self.initial_scale if name == "v" else 0.0
            if quantized:
                if start == 0.0:
                    state[name] = mx.zeros(shape, mx.uint8)
                    state[name + SCALE_SUFFIX] = mx.zeros((blocks(size),), mx.float32)
                else:
                    codes, scales = quantize(mx.full(shape, start, mx.float32), name)
                    state[name], state[name + SCALE_SUFFIX] = codes, scales
            else:
                state[name] = mx.full(shape, start, self.dtype_of(dtype))
        if COMPENSATION in self.entry_names(quantized, dtype):
            state[COMPENSATION] = mx.zeros(shape, dtype)

    def convert(self, leaf_state: dict, parameter: mx.array) -> dict:
        """``leaf_state`` in this layout's form for ``parameter`` (a new dict
        when anything changed): 8-bit entries dequantized or full-precision
        ones quantized as the options say; with 8-bit state, the other
        parameters' full-precision entries cast to float32; a missing
        compensation started at zero, one the options no longer keep
        dropped. Entries it cannot convert are left for the state check to
        report."""
        if not isinstance(leaf_state, dict) or not leaf_state:
            return leaf_state
        want_quantized = self.quantizes(parameter.size, parameter.dtype)
        have_quantized = is_quantized(leaf_state)
        out = dict(leaf_state)
        changed = False
        for name in self.state_names:
            value = out.get(name)
            if not isinstance(value, mx.array):
                continue
            scale_key = name + SCALE_SUFFIX
            if have_quantized and not want_quantized:
                scales = out.get(scale_key)
                if not (value.dtype == mx.uint8 and isinstance(scales, mx.array)):
                    continue
                full = dequantize(value, scales, name)
                out[name] = full.astype(self.dtype_of(parameter.dtype))
                del out[scale_key]
                changed = True
            elif want_quantized and not have_quantized:
                if not mx.issubdtype(value.dtype, mx.floating) or value.shape != parameter.shape:
                    continue
                out[name], out[scale_key] = quantize(value, name)
                changed = True
            elif (
                not want_quantized
                and self.options.state_bits == 8
                and mx.issubdtype(value.dtype, mx.floating)
                and value.dtype != self.dtype_of(parameter.dtype)
            ):
                out[name] = value.astype(self.dtype_of(parameter.dtype))
                changed = True
        wants_compensation = COMPENSATION in self.entry_names(want_quantized, parameter.dtype)
        if wants_compensation and COMPENSATION not in out:
            out[COMPENSATION] = mx.zeros_like(parameter)
            changed = True
        elif not wants_compensation and isinstance(out.get(COMPENSATION), mx.array):
            # Kahan turned off: what the compensation still carries is below
            # half a unit of the weight's last place; dropping it is rounding.
            del out[COMPENSATION]
            changed = True
        return out if changed else leaf_state



def full_precision(leaf_state: dict) -> dict:
    """A parameter's state in the plain layout, float32 (float64 stays, the
    compensation keeps the parameter's dtype): 8-bit entries dequantized,
    their scales dropped."""
    out = {}
    for name, value in leaf_state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scales = leaf_state.get(name + SCALE_SUFFIX)
        if isinstance(value, mx.array) and value.dtype == mx.uint8 and scales is not None:
            out[name] = dequantize(value, scales, name)
        elif name != COMPENSATION and isinstance(value, mx.array) and value.dtype in (
            mx.float16,
            mx.bfloat16,
        ):
            out[name] = value.astype(mx.float32)
        else:
            out[name] = value
    return out


def nbytes(state: dict) -> int:
    """The bytes of a state's per-parameter entries (not the scalar ones)."""
    from ._sharding import flatten  # tree_flatten's order, any leaf

    return sum(
        value.nbytes
        for keys, value in flatten(state)
        if isinstance(value, mx.array) and not (len(keys) == 1 and keys[0] in SCALAR_ENTRIES)
    )


def full_precision_tree(state: dict) -> dict:
    """A whole optimizer state in the plain layout (see full_precision): the
    scalar entries as they are, every parameter's state converted."""

    def convert(tree: Any) -> Any:
        if isinstance(tree, dict) and tree and all(isinstance(v, mx.array) for v in tree.values()):
            return full_precision(tree)
        if isinstance(tree, dict):
            return {k: convert(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(convert(v) for v in tree)
        return tree

    scalars = {k: v for k, v in state.items() if k in SCALAR_ENTRIES}
    rest = {k: v for k, v in state.items() if k not in SCALAR_ENTRIES}
    return {**scalars, **convert(rest)}


def converted(
    state: Any,
    parameters: Any,
    layout: "Layout",
    add_scalar_entries: Callable[[dict], None],
) -> Any:
    """An assigned state in ``layout``'s form (each parameter's state through
    Layout.convert), with the scalar entries the options need added."""
    if not isinstance(state, dict):
        return state
    leaves = {k: v for k, v in state.items() if k not in SCALAR_ENTRIES}
    out = {k: v for k, v in state.items() if k in SCALAR_ENTRIES}
    out.update(map_leaves(leaves, parameters, layout.convert))
    add_scalar_entries(out)
    return out


def add_scalar_entries(state: dict, stochastic_rounding: bool, guarded: bool) -> None:
    """The scalar entries ``state`` lacks for these options: stochastic
    rounding's seed (drawn from mx.random), the guards' report."""
    from . import _guards  # (a module of the same layer)

    if stochastic_rounding and "seed" not in state:
        state["seed"] = _options.draw_seed()
    if guarded:
        for name, value in _guards.initial_entries().items():
            state.setdefault(name, value)


def map_leaves(
    state: Any,
    parameters: Any,
    fn: Callable[[dict, mx.array], Any],
) -> Any:
    """``state`` with each parameter's state dict replaced by
    ``fn(leaf_state, parameter)``, walking the parameters beside it; entries
    with no parameter are kept as they are (the state check reports them)."""
    if isinstance(parameters, mx.array):
        return fn(state, parameters) if isinstance(state, dict) else state
    if isinstance(state, dict) and isinstance(parameters, dict):
        return {k: map_leaves(v, parameters[k], fn) if k in parameters else v for k, v in state.items()}
    if isinstance(state, (list, tuple)) and isinstance(parameters, (list, tuple)):
        out = [
            map_leaves(v, parameters[i], fn) if i < len(parameters) else v
            for i, v in enumerate(state)
        ]
        return type(state)(out) if isinstance(state, tuple) else out
    return state


# ---- Checking an assigned (loaded) state.


def check_assigned(
    state: Any,
    gradients: Any,
    parameters: Any,
    layout: Layout,
    scalar_entries: tuple[str, ...],
) -> None:
    """Raise ValueError naming the entry unless an assigned (loaded) state fits
    the parameters: 'step' and 'learning_rate' present (and any other of
    ``scalar_entries`` present is an array or a number); every other entry at
    a parameter's path, holding exactly the layout's entries for it (``v``,
    and ``mean`` / ``momentum_buffer`` as the options keep them, in full
    precision or 8-bit with their ``_scale`` entries, ``compensation`` with
    Kahan summation), arrays of their shapes and dtypes; and -- unless the
    state holds no
    per-parameter entry at all (a fresh state, initialized on the first step)
    -- an entry for every parameter that gets a gradient."""
    if not isinstance(state, dict):
        raise ValueError(
            f"RMSprop: the optimizer state must be a dict, got {type(state).__name__}"
        )
    for name in scalar_entries:
        # An array, or a plain number as mlx.optimizers also steps with.
        if name not in state:
            if name in REQUIRED_SCALARS:
                raise ValueError(f"RMSprop: the optimizer state has no entry '{name}'")
            continue
        value = state[name]
        if not isinstance(value, (mx.array, int, float)) or isinstance(value, bool):
            raise ValueError(
                f"RMSprop: the optimizer state entry '{name}' is "
                f"{type(value).__name__}, expected an array or a number"
            )
        problem = _scalar_entry_problem(name, value)
        if problem is not None:
            raise ValueError(f"RMSprop: the optimizer state entry '{name}' is {problem}")
    leaves = {k: v for k, v in state.items() if k not in scalar_entries}
    if _check_state_entries(leaves, parameters, "", layout) == 0:
        return
    first = layout.state_names[0]
    for path, _, _, leaf_state in walk_leaves(gradients, parameters, state):
        if leaf_state is MISSING or leaf_state == {}:
            raise ValueError(
                f"RMSprop: the optimizer state has no entry '{path}.{first}' "
                "(a state that holds entries must hold one for every trained "
                "parameter; was it saved from another model?)"
            )


def _scalar_entry_problem(name: str, value: Any) -> Optional[str]:
    """Why a loaded scalar entry (an array or a number) cannot be used, or
    None: one element of a real dtype, not bool; the step, the seed and the
    skipped steps integers, and as numbers >= 0. Only kinds and shapes are
    read: the step may run under mx.compile, where a value cannot."""
    integer = name in ("step", "seed", "skipped_steps")
    if isinstance(value, mx.array):
        kind_ok = mx.issubdtype(value.dtype, mx.integer) if integer else _options.is_real_number(value)
        if value.size == 1 and kind_ok:
            return None
        want = "one integer element" if integer else "one real element"
        return f"an array of shape {value.shape} and dtype {value.dtype}, expected {want}"
    if integer and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        what = "the count of steps taken" if name == "step" else "an integer"
        return f"{value!r}, expected {what} (an int >= 0)"
    return None


def _keeps(names: tuple[str, ...]) -> str:
    if len(names) == 1:
        return f"RMSprop keeps only '{names[0]}'"
    return "this RMSprop keeps " + ", ".join(f"'{n}'" for n in names)


def _check_state_entries(node: Any, params: Any, path: str, layout: Layout) -> int:
    """Check the state subtree `node` against `params`; return how many
    parameter entries (dicts of the state names) it holds."""
    if isinstance(params, mx.array):
        if isinstance(node, dict) and not node:
            return 0
        quantized = layout.quantizes(params.size, params.dtype)
        expected = layout.expected(params.shape, params.dtype, quantized)
        names = tuple(expected)
        if not isinstance(node, dict):
            raise ValueError(f"RMSprop: the optimizer state has no entry '{path}.{names[0]}'")
        extra = sorted(str(k) for k in node if k not in names)
        if extra:
            raise ValueError(
                f"RMSprop: the optimizer state has an unexpected entry "
                f"'{path}.{extra[0]}' ({_keeps(names)})"
            )
        for name in names:
            if name not in node:
                raise ValueError(f"RMSprop: the optimizer state has no entry '{path}.{name}'")
            value = node[name]
            shape, dtype = expected[name]
            if (
                not isinstance(value, mx.array)
                or value.shape != shape
                or value.dtype != dtype
            ):
                got = (
                    f"{value.shape} {value.dtype}"
                    if isinstance(value, mx.array)
                    else type(value).__name__
                )
                want = f"{params.shape} {params.dtype}"
                if shape != params.shape:
                    want += f" (this entry: {shape} {dtype})"
                elif dtype != params.dtype:
                    want += f" (its state: {dtype})"
                hint = ""
                if (
                    isinstance(value, mx.array)
                    and value.shape == shape
                    and value.dtype == mx.float32
                    and dtype in (mx.float16, mx.bfloat16)
                ):
                    # e.g. full_precision_state() of a 16-bit model.
                    hint = "; to keep float32 state beside it, use RMSprop(..., state_dtype=mx.float32)"
                raise ValueError(
                    f"RMSprop: the optimizer state entry '{path}.{name}' is {got}, "
                    f"but the parameter is {want}{hint}"
                )
        return 1
    entries = _entries(node)
    if entries is None:
        raise ValueError(
            f"RMSprop: the optimizer state entry '{path}' is "
            f"{type(node).__name__}, expected a dict or list like the parameters"
        )
    count = 0
    for key, child in entries:
        param = _child(params, key)
        if param is MISSING:
            raise ValueError(
                f"RMSprop: the optimizer state has an unexpected entry "
                f"'{_join(path, key)}' (no parameter there)"
            )
        count += _check_state_entries(child, param, _join(path, key), layout)
    return count


def _entries(tree: Any) -> Any:
    """(key, child) pairs of a dict or list/tuple node of a tree; else None."""
    if isinstance(tree, dict):
        return tree.items()
    if isinstance(tree, (list, tuple)):
        return enumerate(tree)
    return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


MISSING = object()


def walk_leaves(
    gradients: Any, parameters: Any, state: Any, path: str = ""
) -> Iterator[tuple[str, mx.array, Any, Any]]:
    """Yield (path, gradient, parameter, state or MISSING) for every gradient leaf.

    Walks the gradient tree (the update's shape, as in Optimizer.apply_gradients)
    alongside the parameters and the state; a missing entry comes as MISSING.
    """
    if isinstance(gradients, mx.array):
        if parameters is MISSING:
            raise ValueError(f"RMSprop: leaf '{path}': no parameter for this gradient")
        yield path, gradients, parameters, state
        return
    items = _entries(gradients)
    if items is None:
        raise TypeError(
            f"RMSprop: leaf '{path}': the gradient is {type(gradients).__name__}, "
            "expected mlx.core.array"
        )
    for key, grad in items:
        child = f"{path}.{key}" if path else str(key)
        yield from walk_leaves(
            grad, _child(parameters, key), _child(state, key), child
        )


def _child(tree: Any, key: Any) -> Any:
    if isinstance(tree, dict):
        return tree.get(key, MISSING)
    if isinstance(tree, (list, tuple)) and isinstance(key, int) and key < len(tree):
        return tree[key]
    return MISSING
