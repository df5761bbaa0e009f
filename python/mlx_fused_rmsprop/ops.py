"""The fused step as functions of arrays: ``rmsprop_update`` (the algorithm
of :class:`mlx.optimizers.RMSprop`) and ``rmsprop_step`` (any variant)."""

from __future__ import annotations

import numbers
from typing import Union

import mlx.core as mx

from . import _checks, _ext


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
    _checks.check_op_arguments("rmsprop_update", lr, {"alpha": alpha, "eps": eps}, {})
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
          in param's dtype or float32 beside float16 / bfloat16 parameters.
        lr (array or float): The learning rate :math:`\lambda`.
        step (array or int, optional): The 1-based step count; needed for
          ``bias_correction`` only.
        alpha, eps, momentum, nesterov, centered, weight_decay,
        decoupled_weight_decay, eps_in_sqrt, bias_correction, maximize,
        lr_inside_momentum: as in :class:`mlx_fused_rmsprop.RMSprop`.
        stream (Stream or Device, optional): Where to run the update.

    Returns:
        tuple(array, dict): The new parameter and the new state (same keys).
    """
    _checks.check_op_arguments(
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
    options = _ext.RMSpropOptions(
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
    )
    names = options.state_names()
    if not isinstance(state, dict) or set(state) != set(names):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"[rmsprop_step] state must hold exactly {names} for these options, got {got}."
        )
    outputs = _ext.rmsprop_step(
        grad, param, [state[name] for name in names], lr, step, options, stream
    )
    return outputs[0], dict(zip(names, outputs[1:]))
