"""The drop-in ``RMSprop`` optimizer."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from . import _ext


class RMSprop(Optimizer):
    r"""The RMSprop optimizer [1], fused: one kernel per parameter.

    A drop-in replacement for :class:`mlx.optimizers.RMSprop` (same arguments,
    validation, state and results) that updates each parameter and its state
    in a single pass over memory.

    [1]: Tieleman, T. and Hinton, G. 2012. Lecture 6.5-rmsprop, coursera: Neural
    networks for machine learning

    .. math::

        v_{t+1} &= \alpha v_t + (1 - \alpha) g_t^2 \\
        w_{t+1} &= w_t - \lambda \frac{g_t}{\sqrt{v_{t+1}} + \epsilon}

    float32 results are bit-identical to :class:`mlx.optimizers.RMSprop` on
    the CPU. float16 and bfloat16 parameters are computed in float32 and
    rounded once, which is at least as accurate as the reference.

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`.
        alpha (float, optional): The smoothing constant :math:`\alpha`.
          Default: ``0.99``
        eps (float, optional): The term :math:`\epsilon` added to the denominator
          to improve numerical stability. Default: ``1e-8``
    """

    def __init__(
        self,
        learning_rate: Union[float, Callable[[mx.array], mx.array]],
        alpha: float = 0.99,
        eps: float = 1e-8,
    ):
        super().__init__()

        self._maybe_schedule("learning_rate", learning_rate)
        self.alpha = alpha
        self.eps = eps

        if self.alpha < 0.0:
            raise ValueError(
                f"RMSprop alpha should be >=0, {self.alpha} was provided instead"
            )
        if self.eps <= 0.0:
            raise ValueError(
                f"RMSprop epsilon should be >0, {self.eps} was provided instead"
            )

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Initialize optimizer state"""
        state["v"] = mx.zeros_like(parameter)

    def apply_single(
        self, gradient: mx.array, parameter: mx.array, state: dict
    ) -> mx.array:
        """Performs the RMSprop parameter update with one fused primitive and
        stores :math:`v` in the optimizer state.
        """
        parameter, state["v"] = _ext.rmsprop_update(
            gradient,
            parameter,
            state["v"],
            self.learning_rate,
            alpha=self.alpha,
            eps=self.eps,
        )
        return parameter

    def apply_gradients(self, gradients: dict, parameters: dict) -> Any:
        """Apply the gradients to the parameters and return the updated
        parameters (see :meth:`mlx.optimizers.Optimizer.apply_gradients`).

        Every leaf is checked before anything changes: a bad leaf raises
        ``TypeError`` / ``ValueError`` naming its path (e.g.
        ``layers.0.weight``), and the parameters, the state and the step
        counter are left as they were.
        """
        self.check_gradients(gradients, parameters)
        return super().apply_gradients(gradients, parameters)

    def check_gradients(self, gradients: dict, parameters: dict) -> None:
        """Raise, naming the leaf, unless one step over ``gradients`` can run.

        Changes nothing. Checks that each gradient has a parameter and (once
        the optimizer is initialized) a state ``v`` of the same shape and a
        dtype the fused kernel updates.
        """
        lr = self._state.get("learning_rate")
        for path, grad, param, leaf_state in _walk_leaves(
            gradients, parameters, self._state
        ):
            where = f"RMSprop: leaf '{path}'"
            if not isinstance(param, mx.array):
                raise TypeError(
                    f"{where}: the parameter is {type(param).__name__}, "
                    "expected mlx.core.array"
                )
            if leaf_state is _MISSING or (
                isinstance(leaf_state, dict) and not leaf_state
            ):
                if self._initialized:
                    raise ValueError(f"{where}: the optimizer state has no entry")
                v = param  # init() will create v = zeros_like(param)
            elif not isinstance(leaf_state, dict) or "v" not in leaf_state:
                raise ValueError(f"{where}: the optimizer state has no entry 'v'")
            else:
                v = leaf_state["v"]
                if not isinstance(v, mx.array):
                    raise TypeError(
                        f"{where}: state 'v' is {type(v).__name__}, "
                        "expected mlx.core.array"
                    )
            try:
                _ext.check_rmsprop_inputs(
                    grad, param, v, lr, alpha=self.alpha, eps=self.eps
                )
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None


_MISSING = object()


def _walk_leaves(
    gradients: Any, parameters: Any, state: Any, path: str = ""
) -> Iterator[tuple[str, mx.array, Any, Any]]:
    """Yield (path, gradient, parameter, state or _MISSING) for every gradient leaf.

    Walks the gradient tree (the update's shape, as in Optimizer.apply_gradients)
    alongside the parameters and the state; a missing entry comes as _MISSING.
    """
    if isinstance(gradients, mx.array):
        if parameters is _MISSING:
            raise ValueError(f"RMSprop: leaf '{path}': no parameter for this gradient")
        yield path, gradients, parameters, state
        return
    if isinstance(gradients, dict):
        items = gradients.items()
    elif isinstance(gradients, (list, tuple)):
        items = enumerate(gradients)
    else:
        raise TypeError(
            f"RMSprop: leaf '{path}': the gradient is {type(gradients).__name__}, "
            "expected mlx.core.array"
        )
    for key, grad in items:
        child = f"{path}.{key}" if path else str(key)
        yield from _walk_leaves(
            grad, _child(parameters, key), _child(state, key), child
        )


def _child(tree: Any, key: Any) -> Any:
    if isinstance(tree, dict):
        return tree.get(key, _MISSING)
    if isinstance(tree, (list, tuple)) and isinstance(key, int) and key < len(tree):
        return tree[key]
    return _MISSING
