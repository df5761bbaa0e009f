"""The options, in one place: what kind of value each public argument
takes and its valid range (shared by RMSprop, its presets and the ops), how
they become the primitive's ``_ext.RMSpropOptions``, and the errors of the
native step.

A value of the wrong kind (a string read from a config file, None, a bool
where a number goes) must raise a ValueError naming the argument, not a
TypeError from a comparison or from the extension's argument conversion --
and a bool must not pass as a number (``True`` would silently count as 1).
Ranges are checked where each value is set (the constructor, and the op
at every step).
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from typing import Any, Callable, Optional, TypeVar

import mlx.core as mx

from . import _ext


def is_real_number(value: Any) -> bool:
    """An int or float (numpy's too), or a one-element real array; not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, mx.array):
        return (
            value.size == 1
            and value.dtype != mx.bool_
            and not mx.issubdtype(value.dtype, mx.complexfloating)
        )
    return isinstance(value, numbers.Real)


def is_learning_rate(value: Any) -> bool:
    """A real number of any value (as in mlx.optimizers: NaN, inf and negative
    rates run), or an array, whose shape and dtype the op checks at the step
    (its values are never read on the host)."""
    return isinstance(value, mx.array) or is_real_number(value)


def check_op_arguments(
    op: str, lr: Any, reals: dict[str, Any], flags: dict[str, Any]
) -> None:
    """Raise ``ValueError("[op] name must be ...")`` unless ``lr`` is a
    learning rate, each of ``reals`` a real number and each of ``flags``
    True or False."""
    if not is_learning_rate(lr):
        raise ValueError(f"[{op}] lr must be a number or an mlx.core.array, got {_shown(lr)}.")
    for name, value in reals.items():
        if not is_real_number(value):
            raise ValueError(f"[{op}] {name} must be a real number, got {_shown(value)}.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"[{op}] {name} must be True or False, got {_shown(value)}.")


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# The constructor's options by kind, for the check of their kinds (ranges are
# checked by the constructor and, every step, by the op).
OPTION_KINDS = {
    "alpha": "number", "eps": "number", "momentum": "number",
    "weight_decay": "number", "initial_scale": "number",
    "nesterov": "flag", "centered": "flag", "decoupled_weight_decay": "flag",
    "eps_in_sqrt": "flag", "bias_correction": "flag", "maximize": "flag",
    "lr_inside_momentum": "flag",
}

_Preset = TypeVar("_Preset", bound=Callable[..., Any])


def names_its_arguments(**names: str) -> Callable[[_Preset], _Preset]:
    """A preset's errors name the preset and its own arguments: the
    constructor's ``RMSprop alpha should be ...`` becomes ``RMSprop.from_keras
    rho should be ...`` (``names``: constructor's name -> the preset's)."""

    def decorate(preset: _Preset) -> _Preset:
        @functools.wraps(preset)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return preset(*args, **kwargs)
            except ValueError as e:
                head, _, rest = str(e).partition(" ")
                name, space, tail = rest.partition(" ")
                if head != "RMSprop" or not space:
                    raise
                raise ValueError(
                    f"RMSprop.{preset.__name__} {names.get(name, name)} {tail}"
                ) from None

        return wrapper  # type: ignore[return-value]

    return decorate


# The options of this package (not of the library a preset ports), which
# every preset also takes.
PACKAGE_OPTIONS = (
    "state_dtype",
    "state_bits",
    "min_8bit_size",
    "stochastic_rounding",
    "seed",
    "kahan_summation",
    "max_grad_norm",
    "skip_nonfinite",
)


def check_option_types(values: dict[str, Any]) -> None:
    """Raise ValueError naming the option unless each value (by
    ``OPTION_KINDS``) is a real number (not a bool) or True / False."""
    for name, value in values.items():
        if OPTION_KINDS[name] == "flag":
            if not isinstance(value, bool):
                raise ValueError(
                    f"RMSprop {name} should be True or False, {value!r} was provided instead"
                )
        elif not is_real_number(value):
            raise ValueError(
                f"RMSprop {name} should be a real number, {value!r} "
                f"({type(value).__name__}) was provided instead"
            )


def check_learning_rate(value: Any, schedule: bool) -> None:
    """A number (any value, as mlx.optimizers), an array (checked at the
    step) or, when ``schedule``, a callable of the step count."""
    if is_learning_rate(value) or (schedule and callable(value)):
        return
    kinds = "a number, an mlx.core.array or a schedule" if schedule else "a number or an mlx.core.array"
    raise ValueError(
        f"RMSprop learning_rate should be {kinds}, {value!r} "
        f"({type(value).__name__}) was provided instead"
    )


def draw_seed() -> mx.array:
    """A stochastic-rounding seed from mlx's generator: a 0-d uint32."""
    return mx.random.randint(0, 2**31 - 1, (), dtype=mx.int32).astype(mx.uint32)


def package_options(preset: str, options: dict) -> dict:
    """A preset's extra keywords: this package's own options only."""
    unknown = sorted(set(options) - set(PACKAGE_OPTIONS))
    if unknown:
        raise TypeError(
            f"RMSprop.{preset}() got an unexpected keyword argument '{unknown[0]}' "
            f"(besides its library's arguments it takes {', '.join(PACKAGE_OPTIONS)})"
        )
    return options


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_memory_options(
    state_bits: Any,
    min_8bit_size: Any,
    stochastic_rounding: Any,
    seed: Any,
    kahan_summation: Any,
    max_grad_norm: Any,
    skip_nonfinite: Any,
) -> None:
    """Raise ValueError naming the option unless the memory-lean options and
    the guards are valid."""
    if state_bits is not None and not (_is_int(state_bits) and state_bits == 8):
        raise ValueError(
            f"RMSprop state_bits should be None (full precision) or 8, "
            f"{state_bits!r} was provided instead"
        )
    if not (_is_int(min_8bit_size) and min_8bit_size >= 0):
        raise ValueError(
            f"RMSprop min_8bit_size should be an int >= 0, {min_8bit_size!r} was provided instead"
        )
    for name, value in (
        ("stochastic_rounding", stochastic_rounding),
        ("kahan_summation", kahan_summation),
        ("skip_nonfinite", skip_nonfinite),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"RMSprop {name} should be a bool, {value!r} was provided instead")
    if isinstance(seed, mx.array):
        if seed.size != 1 or mx.issubdtype(seed.dtype, mx.floating):
            raise ValueError(f"RMSprop seed should be a single integer, {seed!r} was provided instead")
    elif seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
        raise ValueError(
            f"RMSprop seed should be None or an int in [0, 2**32), {seed!r} was provided instead"
        )
    if stochastic_rounding and kahan_summation:
        raise ValueError(
            "RMSprop stochastic_rounding and kahan_summation exclude each other: pick one"
        )
    if max_grad_norm is not None and not (
        isinstance(max_grad_norm, (int, float))
        and not isinstance(max_grad_norm, bool)
        and math.isfinite(max_grad_norm)
        and max_grad_norm >= 0
    ):
        raise ValueError(
            f"RMSprop max_grad_norm should be None or a finite number >= 0, "
            f"{max_grad_norm!r} was provided instead"
        )




def check_ranges(
    alpha: float,
    eps: float,
    momentum: float,
    weight_decay: float,
    initial_scale: float,
    nesterov: bool,
) -> None:
    """Raise ValueError naming the option unless the numbers are in range
    (with mlx.optimizers.RMSprop's own messages for alpha and eps)."""
    if alpha < 0.0:
        raise ValueError(f"RMSprop alpha should be >=0, {alpha} was provided instead")
    if eps <= 0.0:
        raise ValueError(f"RMSprop epsilon should be >0, {eps} was provided instead")
    # mlx.optimizers.RMSprop accepts inf and NaN here and fails (or trains on
    # NaN) later; the fused op rejects them, so say it now.
    for name, value in (("alpha", alpha), ("epsilon", eps)):
        if not math.isfinite(value):
            raise ValueError(
                f"RMSprop {name} should be a finite number, {value} was provided instead"
            )
    for name, value in (
        ("momentum", momentum),
        ("weight_decay", weight_decay),
        ("initial_scale", initial_scale),
    ):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(
                f"RMSprop {name} should be a finite number >= 0, "
                f"{value} was provided instead"
            )
    if nesterov and momentum <= 0.0:
        raise ValueError(
            f"RMSprop nesterov=True needs momentum > 0, {momentum} was provided instead"
        )


def check_state_dtype(state_dtype: Any) -> None:
    if state_dtype is not None and not (
        isinstance(state_dtype, mx.Dtype) and state_dtype == mx.float32
    ):
        raise ValueError(
            f"RMSprop state_dtype should be None (the parameter's dtype) or "
            f"mlx.core.float32, {state_dtype} was provided instead"
        )


def check_settings(opt: Any) -> None:
    """Raise ValueError naming the option unless what may have been assigned
    to ``opt`` since construction is valid: the options' kinds, what a new
    state is made with (initial_scale, state_dtype), the memory-lean options
    and the guards. (alpha, eps, momentum and weight_decay's ranges the op
    checks at every step; the seed lives in the state, checked with it.)"""
    check_option_types({name: getattr(opt, name) for name in OPTION_KINDS})
    if not (math.isfinite(opt.initial_scale) and opt.initial_scale >= 0.0):
        raise ValueError(
            f"RMSprop initial_scale should be a finite number >= 0, "
            f"{opt.initial_scale} was provided instead"
        )
    check_state_dtype(opt.state_dtype)
    check_memory_options(
        opt.state_bits, opt.min_8bit_size, opt.stochastic_rounding, None,
        opt.kahan_summation, opt.max_grad_norm, opt.skip_nonfinite,
    )


def rounding_mode(stochastic_rounding: bool, kahan_summation: bool) -> int:
    """The primitive's rounding mode (RMSPROP_ROUND_*) of the two options."""
    if stochastic_rounding:
        return _ext.ROUND_STOCHASTIC
    return _ext.ROUND_KAHAN if kahan_summation else _ext.ROUND_NEAREST


# The fields make_options takes from the optimizer / rmsprop_step's values.
OPTION_FIELDS = (
    "alpha", "eps", "momentum", "weight_decay", "centered", "nesterov",
    "decoupled_weight_decay", "eps_in_sqrt", "bias_correction", "maximize",
    "lr_inside_momentum", "stochastic_rounding", "kahan_summation", "state_bits",
    "min_8bit_size",
)


def options_of(values: Any, guarded: bool = False) -> "_ext.RMSpropOptions":
    """make_options from an object's attributes (the optimizer) or a mapping
    (an op's arguments) named as OPTION_FIELDS."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    return make_options(**{name: get(name) for name in OPTION_FIELDS}, guarded=guarded)


def make_options(
    *,
    alpha: float,
    eps: float,
    momentum: float,
    weight_decay: float,
    centered: bool,
    nesterov: bool,
    decoupled_weight_decay: bool,
    eps_in_sqrt: bool,
    bias_correction: bool,
    maximize: bool,
    lr_inside_momentum: bool,
    stochastic_rounding: bool = False,
    kahan_summation: bool = False,
    guarded: bool = False,
    state_bits: Optional[int] = None,
    min_8bit_size: int = 4096,
) -> "_ext.RMSpropOptions":
    """The primitive's options for the optimizer's or an op's (checked) values."""
    return _ext.RMSpropOptions(
        alpha=alpha,
        eps=eps,
        momentum=momentum,
        weight_decay=weight_decay,
        centered=centered,
        nesterov=nesterov,
        decoupled_weight_decay=decoupled_weight_decay,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction,
        maximize=maximize,
        lr_inside_momentum=lr_inside_momentum,
        rounding=rounding_mode(stochastic_rounding, kahan_summation),
        guarded=guarded,
        state_bits=state_bits or 0,
        min_8bit_size=min_8bit_size,
    )


def optimizer_step(gradients: Any, parameters: Any, *args: Any, **kwargs: Any) -> Any:
    """``_ext.optimizer_step``, with the fix named when a leaf is an integer
    or boolean array (see :func:`_not_trainable_hint`)."""
    try:
        return _ext.optimizer_step(gradients, parameters, *args, **kwargs)
    except ValueError as e:
        hint = _not_trainable_hint(str(e))
        if hint is None:
            raise
        raise ValueError(f"{e} {hint}") from None


_NOT_FLOAT = re.compile(
    r"^RMSprop: leaf '(?P<path>.*)': \[rmsprop_(update|step)\] parameter dtype "
    r"(?P<dtype>bool|u?int\d+) is not supported"
)


def _not_trainable_hint(message: str) -> Optional[str]:
    """For an integer or boolean leaf (e.g. a step counter stored on the
    model), how to keep it out of training; None for any other error.

    mlx.optimizers.RMSprop silently turns such a leaf into float32; this
    optimizer refuses it, and says how to leave it out of the gradients."""
    match = _NOT_FLOAT.match(message)
    if match is None:
        return None
    *holder, key = match["path"].split(".")
    module = "model" + "".join(f"[{k}]" if k.isdigit() else f".{k}" for k in holder)
    key = int(key) if key.isdigit() else key
    return (
        f"This {match['dtype']} array is not a trainable parameter (mlx's RMSprop "
        f"would silently make it float32): freeze it before computing "
        f"gradients, e.g. `{module}.freeze(keys=[{key!r}], recurse=False)`, or "
        f"keep it out of `model.trainable_parameters()` (a Python number, or "
        f"an attribute whose name starts with '_')."
    )
