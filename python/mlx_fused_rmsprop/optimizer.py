"""The drop-in ``RMSprop`` optimizer."""

from __future__ import annotations

import math
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
        # mlx.optimizers.RMSprop accepts inf and NaN here and fails (or
        # trains on NaN) later; the fused op rejects them, so say it now.
        for name, value in (("alpha", self.alpha), ("epsilon", self.eps)):
            if not math.isfinite(value):
                raise ValueError(
                    f"RMSprop {name} should be a finite number, {value} was provided instead"
                )
        # Set when a state is assigned (e.g. loaded from a checkpoint): the
        # next step first checks it against the parameters, entry by entry.
        self._state_needs_check = False

    @property
    def state(self) -> dict:
        """The optimizer's state dictionary."""
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        self._initialized = False
        self._state = state
        self._state_needs_check = True

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
        if self._state_needs_check:
            _check_assigned_state(self._state, gradients, parameters)
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
        self._state_needs_check = False


_SCALAR_ENTRIES = ("step", "learning_rate")


def _check_assigned_state(state: Any, gradients: Any, parameters: Any) -> None:
    """Raise ValueError naming the entry unless an assigned (loaded) state fits
    the parameters: 'step' and 'learning_rate' present; every other entry at a
    parameter's path, holding exactly {'v': array of the parameter's shape and
    dtype}; and -- unless the state holds no per-parameter entry at all (a
    fresh state, initialized on the first step) -- an entry for every
    parameter that gets a gradient."""
    if not isinstance(state, dict):
        raise ValueError(
            f"RMSprop: the optimizer state must be a dict, got {type(state).__name__}"
        )
    for name in _SCALAR_ENTRIES:
        # An array, or a plain number as mlx.optimizers also steps with.
        if name not in state:
            raise ValueError(f"RMSprop: the optimizer state has no entry '{name}'")
        value = state[name]
        if not isinstance(value, (mx.array, int, float)) or isinstance(value, bool):
            raise ValueError(
                f"RMSprop: the optimizer state entry '{name}' is "
                f"{type(value).__name__}, expected an array or a number"
            )
    leaves = {k: v for k, v in state.items() if k not in _SCALAR_ENTRIES}
    if _check_state_entries(leaves, parameters, "") == 0:
        return
    for path, _, _, leaf_state in _walk_leaves(gradients, parameters, state):
        if leaf_state is _MISSING or leaf_state == {}:
            raise ValueError(
                f"RMSprop: the optimizer state has no entry '{path}.v' "
                "(a state that holds entries must hold one for every trained "
                "parameter; was it saved from another model?)"
            )


def _check_state_entries(node: Any, params: Any, path: str) -> int:
    """Check the state subtree `node` against `params`; return how many
    parameter entries ({'v': ...}) it holds."""
    if isinstance(params, mx.array):
        if isinstance(node, dict) and not node:
            return 0
        if not isinstance(node, dict) or "v" not in node:
            raise ValueError(f"RMSprop: the optimizer state has no entry '{path}.v'")
        extra = sorted(str(k) for k in node if k != "v")
        if extra:
            raise ValueError(
                f"RMSprop: the optimizer state has an unexpected entry "
                f"'{path}.{extra[0]}' (RMSprop keeps only 'v')"
            )
        v = node["v"]
        if not isinstance(v, mx.array) or v.shape != params.shape or v.dtype != params.dtype:
            got = f"{v.shape} {v.dtype}" if isinstance(v, mx.array) else type(v).__name__
            raise ValueError(
                f"RMSprop: the optimizer state entry '{path}.v' is {got}, "
                f"but the parameter is {params.shape} {params.dtype}"
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
        if param is _MISSING:
            raise ValueError(
                f"RMSprop: the optimizer state has an unexpected entry "
                f"'{_join(path, key)}' (no parameter there)"
            )
        count += _check_state_entries(child, param, _join(path, key))
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
    items = _entries(gradients)
    if items is None:
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
