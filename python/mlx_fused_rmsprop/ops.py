"""The fused step as functions of arrays: ``rmsprop_update`` (the algorithm
of :class:`mlx.optimizers.RMSprop`) and ``rmsprop_step`` (any variant)."""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import mlx.core as mx

from . import _ext, _options, _state


def rmsprop_update(
    grad: mx.array,
    param: mx.array,
    v: mx.array,
    lr: Union[mx.array, float],
    *,
    alpha: float = 0.99,
    eps: float = 1e-8,
    stream: Union[mx.Stream, mx.Device, None] = None,
) -> tuple[mx.array, mx.array]:
    r"""One fused RMSprop step for a single leaf.

    .. math::

        v_{t+1} &= \alpha v_t + (1 - \alpha) g_t^2 \\
        w_{t+1} &= w_t - \lambda \frac{g_t}{\sqrt{v_{t+1}} + \epsilon}

    The update of :class:`mlx.optimizers.RMSprop` (bit-identical in float32
    on the CPU) as ONE graph node (primitive ``FusedRMSprop``) with two
    outputs.

    Args:
        grad (array): The gradient :math:`g`.
        param (array): The parameter :math:`w`: float32, float16, bfloat16
          (or float64 on the CPU), of grad's shape and dtype.
        v (array): The running average of squared gradients (param's shape
          and dtype).
        lr (array or float): The learning rate :math:`\lambda`: a
          single-element array, or a number (taken as float32).
        alpha (float, optional): The smoothing constant :math:`\alpha`
          (>= 0). Default: ``0.99``
        eps (float, optional): The term :math:`\epsilon` added to the
          denominator (> 0). Default: ``1e-8``
        stream (Stream or Device, optional): Where to run the update.

    Returns:
        tuple(array, array): The updated parameter and ``v``.
    """
    _options.check_op_arguments("rmsprop_update", lr, {"alpha": alpha, "eps": eps}, {})
    return _ext.rmsprop_update(grad, param, v, lr, alpha=alpha, eps=eps, stream=stream)


def rmsprop_step(
    grad: mx.array,
    param: mx.array,
    state: dict[str, mx.array],
    lr: Union[mx.array, float],
    *,
    step: Union[mx.array, int, None] = None,
    alpha: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    nesterov: bool = False,
    centered: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    eps_in_sqrt: bool = False,
    bias_correction: bool = False,
    maximize: bool = False,
    lr_inside_momentum: bool = False,
    state_bits: Optional[int] = None,
    min_8bit_size: int = 4096,
    stochastic_rounding: bool = False,
    seed: Union[mx.array, int, None] = None,
    kahan_summation: bool = False,
    leaf: int = 0,
    stream: Union[mx.Stream, mx.Device, None] = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    r"""One fused step of any RMSprop variant for a single leaf.

    The math of :class:`mlx_fused_rmsprop.RMSprop` with the same options, as
    ONE graph node (primitive ``FusedRMSprop``) that reads ``grad``,
    ``param`` and the state once and writes the new parameter and state.

    Args:
        grad (array): The gradient :math:`g`.
        param (array): The parameter :math:`w` (grad's shape and dtype).
        state (dict): ``{"v": ...}``, plus ``"mean"`` when ``centered`` and
          ``"momentum_buffer"`` when ``momentum > 0``: arrays of param's shape,
          in param's dtype or float32 beside float16 / bfloat16 parameters;
          or 8-bit (each as uint8 codes plus ``<name>_scale``); plus
          ``"compensation"`` with ``kahan_summation`` (zeros when missing).
          It is converted to the form the options give the parameter (8-bit
          with ``state_bits=8`` and at least ``min_8bit_size`` elements).
        lr (array or float): The learning rate :math:`\lambda`.
        step (array or int, optional): The 1-based step count; needed for
          ``bias_correction`` and ``stochastic_rounding``.
        alpha, eps, momentum, nesterov, centered, weight_decay,
        decoupled_weight_decay, eps_in_sqrt, bias_correction, maximize,
        lr_inside_momentum, state_bits, min_8bit_size, stochastic_rounding,
        kahan_summation: as in :class:`mlx_fused_rmsprop.RMSprop`.
        seed (array or int, optional): Stochastic rounding's seed (needed for
          it), with ``leaf`` (this parameter's number: another leaf of the
          same step must take another one).
        stream (Stream or Device, optional): Where to run the update.

    Returns:
        tuple(array, dict): The new parameter and the new state, in the
        options' form.
    """
    _options.check_op_arguments(
        "rmsprop_step", lr,
        {"alpha": alpha, "eps": eps, "momentum": momentum, "weight_decay": weight_decay},
        {"nesterov": nesterov, "centered": centered,
         "decoupled_weight_decay": decoupled_weight_decay, "eps_in_sqrt": eps_in_sqrt,
         "bias_correction": bias_correction, "maximize": maximize,
         "lr_inside_momentum": lr_inside_momentum},
    )
    # The 1-based count: step 0 would divide by 1 - alpha**0 = 0. (An array's
    # value is not read on the host; the op checks its shape and dtype.)
    if step is not None and not isinstance(step, mx.array) and not (
        isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 1
    ):
        raise ValueError(
            f"[rmsprop_step] step must be None, an int >= 1 or an mlx.core.array, got {step!r}."
        )
    _check_memory_arguments(state_bits, min_8bit_size, stochastic_rounding, seed, kahan_summation, leaf)
    options = _options.options_of(locals())
    if not isinstance(state, dict) or not isinstance(param, mx.array):
        raise ValueError(
            f"[rmsprop_step] state must be a dict of arrays, got {type(state).__name__}."
        )
    layout = _state.Layout(options, mx.float32 if state_bits == 8 else None, 0.0)
    state = layout.convert(state, param)
    quantized = _state.is_quantized(state)
    names = layout.entry_names(quantized, param.dtype)
    if set(state) != set(names):
        raise ValueError(
            f"[rmsprop_step] state must hold exactly {list(names)} for these options, "
            f"got {sorted(state)}."
        )
    if isinstance(seed, int):
        seed = mx.array(seed, mx.uint32)
    outputs = _ext.rmsprop_step(
        grad, param, [state[name] for name in names], lr, step, options, stream,
        quantized=quantized, leaf=leaf, seed=seed,
    )
    return outputs[0], dict(zip(names, outputs[1:]))


def _check_memory_arguments(
    state_bits: Any, min_8bit_size: Any, stochastic_rounding: Any, seed: Any,
    kahan_summation: Any, leaf: Any,
) -> None:
    """Raise ValueError naming the argument unless the memory-lean options
    of rmsprop_step are valid."""
    if state_bits is not None and not (_is_int(state_bits) and state_bits == 8):
        raise ValueError(f"[rmsprop_step] state_bits must be None or 8, got {state_bits!r}.")
    if not (_is_int(min_8bit_size) and min_8bit_size >= 0):
        raise ValueError(f"[rmsprop_step] min_8bit_size must be an int >= 0, got {min_8bit_size!r}.")
    for name, value in (("stochastic_rounding", stochastic_rounding), ("kahan_summation", kahan_summation)):
        if not isinstance(value, bool):
            raise ValueError(f"[rmsprop_step] {name} must be True or False, got {value!r}.")
    if stochastic_rounding and kahan_summation:
        raise ValueError("[rmsprop_step] stochastic_rounding and kahan_summation exclude each other.")
    if not (seed is None or isinstance(seed, mx.array) or (_is_int(seed) and 0 <= seed < 2**32)):
        raise ValueError(f"[rmsprop_step] seed must be None, an int in [0, 2**32) or an array, got {seed!r}.")
    if not (_is_int(leaf) and 0 <= leaf < 2**32):
        raise ValueError(f"[rmsprop_step] leaf must be an int in [0, 2**32), got {leaf!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
